"""Master key custody: rotation that cannot lose data (daemon running, kill -9 anywhere), backups, credentials.

Every test drives the real `garrison` command on a real state folder (developer install: the key
lives in XDG_CONFIG_HOME beside the state folder), and checks what matters: every dataset version
still decrypts, the identity still opens, and the audit trail says what happened.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, free_port, garrison_env, run_cli

from garrison.config import load_config
from garrison.crypto.age import encode_identity, encrypt_bytes, generate_identity, recipient_of
from garrison.crypto.identity import load_identity
from garrison.ingest.vault import Vault
from garrison.operations.master_key import STEPS
from garrison.paths import StateLayout
from garrison.store.catalog import Catalog
from garrison.store.master_key import MasterKeySource, key_check_value, read_key_file, recorded_kcv

SAMPLE = Path(__file__).parents[2] / "garrison" / "data" / "support_sample.jsonl"


def key_file(state: Path) -> Path:
    return state.parent / "xdg-config" / "garrison" / "master.key"


def new_key(tmp: Path, name: str) -> Path:
    path = tmp / name
    run_cli(tmp, "keys", "new-master-key", str(path), env=garrison_env(tmp / "none"))
    return path


def opened(state: Path) -> dict[str, Any]:
    """What a process starting now finds: the key the catalog records, the identity, every version's records."""
    env = garrison_env(state)
    config = load_config("/dev/null", env=env, overrides={"state_dir": str(state)})
    source = MasterKeySource(config, env)
    catalog = Catalog(StateLayout(state).catalog)
    try:
        key = source.matching(recorded_kcv(catalog.conn))
        identity = load_identity(StateLayout(state), key)  # this key alone opens one of the identity files
        vault = Vault(StateLayout(state), catalog, lambda: key)
        counts = {}
        for row in catalog.query("SELECT d.name, v.version FROM dataset_versions v JOIN datasets d ON "
                                 "d.id = v.dataset_id WHERE v.state = 'ready'"):
            counts[f"{row[0]}:{row[1]}"] = sum(1 for _ in vault.open(row[0], row[1]).records())
        return {"kcv": key_check_value(key), "recipient": identity.recipient, "records": counts}
    finally:
        catalog.close()


def audit_actions(state: Path) -> list[tuple[str, str]]:
    catalog = Catalog(StateLayout(state).catalog)
    try:
        return [(r["action"], r["outcome"]) for r in catalog.query("SELECT action, outcome FROM audit ORDER BY seq")]
    finally:
        catalog.close()


@pytest.fixture
def appliance(tmp_path: Path) -> Path:
    """A state folder with an identity and two datasets (three versions)."""
    state = tmp_path / "state"
    env = garrison_env(state)
    shorter = tmp_path / "shorter.jsonl"
    shorter.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:10]))
    for name, source in (("support", SAMPLE), ("support", shorter), ("other", SAMPLE)):
        run_cli(state, "ingest", str(source), "--dataset", name, "--json", env=env)
    return state


def rotate(state: Path, key: Path | None = None, *extra: str, check: bool = True,
           env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    args = ["keys", "rotate-master", *(["--new-key", str(key)] if key else []), *extra]
    return run_cli(state, *args, env={**garrison_env(state), **(env_extra or {})}, check=check)


def test_rotation_rewraps_keys_not_data_and_keeps_the_old_key_until_finished(appliance: Path, tmp_path: Path) -> None:
    before = opened(appliance)
    vault_files = {p: p.read_bytes() for p in (appliance / "vault").rglob("*") if p.is_file()}
    old = read_key_file(key_file(appliance))
    k2 = new_key(tmp_path, "k2.key")
    out = rotate(appliance, k2).stdout
    assert "3 dataset key(s)" in out and "master.key.previous" in out
    after = opened(appliance)
    assert after["records"] == before["records"] and after["recipient"] == before["recipient"]
    assert after["kcv"] == key_check_value(read_key_file(k2)) != before["kcv"]
    assert {p: p.read_bytes() for p in (appliance / "vault").rglob("*") if p.is_file()} == vault_files
    previous = key_file(appliance).with_name("master.key.previous")
    assert read_key_file(previous) == old and (previous.stat().st_mode & 0o777) == 0o600
    assert read_key_file(key_file(appliance)) == read_key_file(k2)
    # Rerun with the same key: already done. A wrong attempt changes nothing and is audited.
    assert "already rotated to this key" in rotate(appliance, k2).stdout
    short = tmp_path / "short.key"
    short.write_text("00" * 10 + "\n")
    short.chmod(0o600)
    bad = rotate(appliance, short, check=False)
    assert bad.returncode == 2 and "master_key_invalid" in bad.stderr
    assert ("master_key.rotate", "failed") in audit_actions(appliance)
    finish = rotate(appliance, None, "--finish").stdout
    assert "master.key.previous" in finish and not previous.exists()
    assert not (appliance / "identity" / "keys.enc.previous").exists()
    assert opened(appliance)["records"] == before["records"]
    assert [a for a in audit_actions(appliance) if a[0].startswith("master_key")] == [
        ("master_key.rotate", "ok"), ("master_key.rotate", "failed"), ("master_key.rotate.finish", "ok")]


def test_rotation_while_the_daemon_serves_and_uploads_arrive(appliance: Path, tmp_path: Path) -> None:
    """The field failure: an upload after a rotation, to a daemon that was never restarted."""
    env = garrison_env(appliance)
    daemon = Daemon(appliance, free_port(), env, tmp_path / "daemon.log").start()
    try:
        recipient = run_cli(appliance, "identity", env=env).stdout.strip()
        key = daemon.key("ingest")

        def upload(name: str) -> None:
            body = encrypt_bytes(SAMPLE.read_bytes(), [recipient])
            status, answer = daemon_post(daemon, f"/v1/garrison/datasets/{name}/versions", body, key)
            assert status == 201, answer

        upload("before")
        rotate(appliance, new_key(tmp_path, "k2.key"))
        upload("between")  # wrapped by a daemon that read the old key at start
        rotate(appliance, new_key(tmp_path, "k3.key"))  # a second rotation succeeds
        upload("after")
        status, _ = daemon.request("GET", "/health", role=None)
        assert status == 200
    finally:
        daemon.stop()
    state = opened(appliance)
    assert set(state["records"]) == {"support:1", "support:2", "other:1", "before:1", "between:1", "after:1"}
    assert all(n > 0 for n in state["records"].values())
    assert run_cli(appliance, "identity", env=env).stdout.strip() == state["recipient"]
    assert audit_actions(appliance).count(("master_key.rotate", "ok")) == 2


def daemon_post(daemon: Daemon, path: str, body: bytes, key: str) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(daemon.url + path, data=body, method="POST",
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_kill_9_at_every_step_and_at_20_random_instants_leaves_a_state_that_opens(appliance: Path,
                                                                                  tmp_path: Path) -> None:
    """After each kill the state opens with the old or the new key; rerunning completes the rotation."""
    records = opened(appliance)["records"]
    keys = [read_key_file(key_file(appliance))]
    landed: list[str] = []

    def after_kill(new: Path) -> None:
        state = opened(appliance)  # opens with one of the two keys, whatever the instant
        assert state["records"] == records
        assert state["kcv"] in (key_check_value(keys[-1]), key_check_value(read_key_file(new)))
        journal = Catalog(StateLayout(appliance).catalog)
        row = journal.query_one("SELECT state FROM key_rotations ORDER BY started_at DESC LIMIT 1")
        journal.close()
        landed.append(row[0] if row else "before the journal")
        rotate(appliance, new)  # completes or rolls back, then rotates to `new`
        final = opened(appliance)
        assert final["records"] == records and final["kcv"] == key_check_value(read_key_file(new))
        keys.append(read_key_file(new))

    for i, step in enumerate(STEPS):
        new = new_key(tmp_path, f"step{i}.key")
        killed = rotate(appliance, new, check=False, env_extra={"GARRISON_ROTATION_KILL_AT": step})
        assert killed.returncode == -signal.SIGKILL, (step, killed.stderr)
        after_kill(new)
    started = time.monotonic()
    rotate(appliance, new_key(tmp_path, "timed.key"))
    keys.append(read_key_file(tmp_path / "timed.key"))
    full = time.monotonic() - started
    rng = random.Random(20261205)
    for i in range(20):
        new = new_key(tmp_path, f"random{i}.key")
        proc = subprocess.Popen([sys.executable, "-m", "garrison.cli", "keys", "rotate-master", "--new-key", str(new)],
                                env=garrison_env(appliance), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, full))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        after_kill(new)
    assert len(landed) == len(STEPS) + 20
    assert {"prepared", "committed"} <= set(landed), landed  # the kills reached both sides of the commit


def test_backup_then_restore_on_a_fresh_machine_gives_back_the_appliance(appliance: Path, tmp_path: Path) -> None:
    before = opened(appliance)
    env = {**garrison_env(appliance), "GARRISON_BACKUP_PASSPHRASE": "correct horse battery staple"}
    run_cli(appliance, "keys", "backup-master", "--to", str(tmp_path / "master.backup"), env=env)
    recovery = generate_identity()
    (tmp_path / "recovery.txt").write_text(encode_identity(recovery) + "\n")
    run_cli(appliance, "keys", "backup-master", "--to", str(tmp_path / "master.age"), "--recipient",
            recipient_of(recovery), env=env)
    assert (tmp_path / "master.backup").stat().st_mode & 0o777 == 0o600
    if shutil.which("age"):  # the backup is a plain age file: Debian's age opens it too
        plain = subprocess.run(["age", "-d", "-i", str(tmp_path / "recovery.txt"), str(tmp_path / "master.age")],
                               capture_output=True, check=True).stdout
        assert json.loads(plain)["master_key"] == read_key_file(key_file(appliance)).hex()
    # A new machine: the state folder copied over, no master key.
    fresh = tmp_path / "fresh" / "state"
    shutil.copytree(appliance, fresh)
    fresh_env = garrison_env(fresh)
    missing = run_cli(fresh, "identity", env=fresh_env, check=False)
    assert missing.returncode != 0 and "master_key_missing" in missing.stderr
    assert not key_file(fresh).exists()  # no key was minted over the copied identity
    wrong = run_cli(fresh, "keys", "restore-master", "--from", str(tmp_path / "master.backup"),
                    env={**fresh_env, "GARRISON_BACKUP_PASSPHRASE": "wrong passphrase!!"}, check=False)
    assert wrong.returncode == 2 and "age_no_matching_identity" in wrong.stderr
    run_cli(fresh, "keys", "restore-master", "--from", str(tmp_path / "master.backup"),
            env={**fresh_env, "GARRISON_BACKUP_PASSPHRASE": "correct horse battery staple"})
    assert opened(fresh) == before
    assert run_cli(fresh, "identity", env=fresh_env).stdout.strip() == before["recipient"]
    # The recovery-key backup restores too (already installed: nothing to change).
    again = run_cli(fresh, "keys", "restore-master", "--from", str(tmp_path / "master.age"), "--identity",
                    str(tmp_path / "recovery.txt"), env=fresh_env).stdout
    assert "already holds this key" in again
    assert ("master_key.restore", "ok") in audit_actions(fresh)


def test_a_backup_of_another_appliance_is_refused(appliance: Path, tmp_path: Path) -> None:
    other = tmp_path / "other" / "state"
    run_cli(other, "identity", env=garrison_env(other))
    env = {**garrison_env(other), "GARRISON_BACKUP_PASSPHRASE": "another long passphrase"}
    run_cli(other, "keys", "backup-master", "--to", str(tmp_path / "other.backup"), env=env)
    out = run_cli(appliance, "keys", "restore-master", "--from", str(tmp_path / "other.backup"),
                  env={**garrison_env(appliance), "GARRISON_BACKUP_PASSPHRASE": "another long passphrase"},
                  check=False)
    assert out.returncode == 8 and "master_key_mismatch" in out.stderr
    assert opened(appliance)["records"]  # unchanged


def test_the_master_key_as_a_systemd_credential(appliance: Path, tmp_path: Path) -> None:
    """As the unit loads it: `systemd-creds encrypt` once, LoadCredentialEncrypted= at start (decrypted here
    with systemd-creds offline; tpm2-absent is a null key, for tests only)."""
    if shutil.which("systemd-creds") is None:
        pytest.fail("systemd-creds (Debian's systemd package) is needed; install.sh installs it")
    before = opened(appliance)
    cred = tmp_path / "master.key.cred"
    subprocess.run(["systemd-creds", "encrypt", "--with-key=tpm2-absent", "--name=master.key",
                    str(key_file(appliance)), str(cred)], check=True, capture_output=True)
    assert read_key_file(key_file(appliance)).hex().encode() not in cred.read_bytes()
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    subprocess.run(["systemd-creds", "decrypt", "--name=master.key", str(cred), str(credentials / "master.key")],
                   check=True, capture_output=True)
    key_file(appliance).rename(tmp_path / "moved-away.key")  # only the credential has the key now
    env = {**garrison_env(appliance), "CREDENTIALS_DIRECTORY": str(credentials)}
    assert run_cli(appliance, "identity", env=env).stdout.strip() == before["recipient"]


def test_new_master_key_files_are_private_and_never_overwritten(tmp_path: Path) -> None:
    path = new_key(tmp_path, "fresh.key")
    assert (path.stat().st_mode & 0o777) == 0o600 and len(read_key_file(path)) == 32
    again = run_cli(tmp_path, "keys", "new-master-key", str(path), env=garrison_env(tmp_path / "none"), check=False)
    assert again.returncode == 5 and "file_exists" in again.stderr


def test_a_rotation_that_cannot_verify_changes_nothing_and_is_audited(appliance: Path, tmp_path: Path) -> None:
    """A wrapped key that opens with neither key (a damaged row) stops the rotation before anything commits."""
    catalog = Catalog(StateLayout(appliance).catalog)
    with catalog.write() as conn:
        conn.execute("UPDATE dataset_versions SET wrapped_key = ? WHERE id = (SELECT id FROM dataset_versions "
                     "ORDER BY created_at LIMIT 1)", (os.urandom(60),))
    catalog.close()
    old = read_key_file(key_file(appliance))
    out = rotate(appliance, new_key(tmp_path, "k2.key"), check=False)
    assert out.returncode == 8 and "vault_key_unwrap_failed" in out.stderr
    assert read_key_file(key_file(appliance)) == old
    assert not key_file(appliance).with_name("master.key.next").exists()  # rolled back by the next run, or now
    assert ("master_key.rotate", "failed") in audit_actions(appliance)
    rotate(appliance, None)  # the failed attempt's leftovers are cleaned up
    assert not (appliance / "identity" / "keys.enc.next").exists()


def test_the_previous_key_is_deleted_once_its_retention_passes(appliance: Path, tmp_path: Path) -> None:
    rotate(appliance, new_key(tmp_path, "k2.key"))
    previous = key_file(appliance).with_name("master.key.previous")
    assert previous.exists()
    short = {"GARRISON_MASTER_KEY_KEEP_PREVIOUS_DAYS": "0.00001"}  # under a second
    time.sleep(1.2)
    rotate(appliance, None, env_extra={"GARRISON_MASTER_KEY_KEEP_PREVIOUS_DAYS": "0"})  # 0: kept until --finish
    assert previous.exists()
    rotate(appliance, None, env_extra=short)
    assert not previous.exists() and not (appliance / "identity" / "keys.enc.previous").exists()
    assert ("master_key.rotate.finish", "ok") in audit_actions(appliance)
    assert opened(appliance)["records"]
