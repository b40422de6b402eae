"""The audit trail cannot be rewritten unseen: every attack on the catalog's rows is reported by
`garrison audit verify` with exit 8 and the first bad sequence number; a clean trail exits 0.

Each attack works on the catalog file with plain sqlite3, as someone who can write the state
folder but does not hold the master key would (the insider who does hold it is caught by the
anchors kept outside the catalog).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, garrison_env, run_cli

from garrison.models.registry import ModelRegistry
from garrison.paths import StateLayout
from garrison.policies import audit_anchors
from garrison.policies.audit import GENESIS, anchor_head, append_audit, entry_hash, entry_mac, verify_trail
from garrison.policies.audit_anchors import parse_anchor, read_anchors
from garrison.policies.audit_keys import AuditKeys, derive_audit_key
from garrison.store.catalog import Catalog
from garrison.store.master_key import key_check_value

ENTRIES = 10


@pytest.fixture
def state(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Ten entries, one transaction each, anchored every 3 (at 1, 4, 7) and at shutdown (10)."""
    monkeypatch.setenv("GARRISON_AUDIT_ANCHOR_EVERY", "3")
    layout = StateLayout(Path(env["GARRISON_STATE_DIR"]))
    layout.ensure()
    catalog = Catalog(layout.catalog)
    for n in range(ENTRIES):
        with catalog.write() as conn:
            append_audit(conn, actor=f"key:k{n}", action="keys.create", resource=f"key:k{n}", detail={"n": n})
    assert anchor_head(catalog) is not None
    catalog.close()
    yield layout.root


def verify(state: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(state, "audit", "verify", *extra, env=dict(os.environ), check=False)


def assert_broken(state: Path, seq: int, kind: str, code: str = "audit_chain_broken") -> None:
    proc = verify(state)
    assert proc.returncode == 8, proc.stdout + proc.stderr
    assert f"[{code}]" in proc.stderr and f"broken at entry {seq}:" in proc.stderr, proc.stderr
    report = json.loads(verify(state, "--json").stdout)
    assert (report["intact"], report["first_bad_seq"], report["kind"]) == (False, seq, kind)


def attacker(state: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(StateLayout(state).catalog, isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


def rechain(state: Path, start: int, change: dict[str, Any], *, key: bytes | None = None,
            kcv: str | None = None) -> None:
    """Change entry `start`, then recompute every hash after it (the attack on a plain SHA-256 chain);
    with `key`, recompute the MACs too, naming `kcv`."""
    conn = attacker(state)
    rows = [dict(r) for r in conn.execute("SELECT * FROM audit ORDER BY seq")]
    before = [r for r in rows if r["seq"] < start]
    prev_hash = before[-1]["hash"] if before else GENESIS
    prev_mac = (before[-1]["mac"] or "") if before else ""
    for row in (r for r in rows if r["seq"] >= start):
        if row["seq"] == start:
            row.update(change)
        row["prev_hash"] = prev_hash
        row["hash"] = entry_hash(prev_hash, row["at"], row["actor"], row["action"], row["resource"], row["outcome"],
                                 row["detail"])
        if key is not None:
            row["kcv"] = kcv
            row["mac"] = entry_mac(key, row["seq"], prev_mac, row["hash"], str(kcv))
        conn.execute("UPDATE audit SET actor = ?, prev_hash = ?, hash = ?, kcv = ?, mac = ? WHERE seq = ?",
                     (row["actor"], row["prev_hash"], row["hash"], row["kcv"], row["mac"], row["seq"]))
        prev_hash, prev_mac = row["hash"], row["mac"] or ""
    conn.close()


def master_key() -> bytes:
    return (Path(os.environ["XDG_CONFIG_HOME"]) / "garrison" / "master.key").read_bytes().strip()


def test_a_clean_trail_exits_0_and_is_anchored(state: Path) -> None:
    proc = verify(state)
    assert proc.returncode == 0, proc.stderr
    assert f"chain intact: {ENTRIES} entries" in proc.stdout and f"{ENTRIES} MACs verified" in proc.stdout
    anchors, _ = read_anchors(StateLayout(state).audit_anchors)
    assert [(a.seq, a.reason) for a in anchors] == [(1, "first"), (4, "every"), (7, "every"), (10, "shutdown")]
    report = json.loads(verify(state, "--json").stdout)
    assert report["anchors"] == 4 and report["anchored_seq"] == ENTRIES and report["first_bad_seq"] is None
    shown = run_cli(state, "audit", "--limit", "2", env=dict(os.environ)).stdout.splitlines()
    assert [int(line.split()[0]) for line in shown[:2]] == [9, 10] and "chain intact" in shown[-1]
    # Entries name the key that MACed them, never the key itself.
    conn = attacker(state)
    assert {r[0] for r in conn.execute("SELECT kcv FROM audit")} == {key_check_value(bytes.fromhex(
        master_key().decode()))}
    conn.close()


def test_an_edited_entry(state: Path) -> None:
    conn = attacker(state)
    conn.execute("UPDATE audit SET actor = 'key:mallory' WHERE seq = 4")
    conn.close()
    assert_broken(state, 4, "edited")


def test_one_deleted_entry(state: Path) -> None:
    conn = attacker(state)
    conn.execute("DELETE FROM audit WHERE seq = 4")
    conn.close()
    assert_broken(state, 4, "deleted")


def test_the_tail_deleted(state: Path) -> None:
    conn = attacker(state)
    conn.execute("DELETE FROM audit WHERE seq > 7")
    conn.close()
    assert_broken(state, 8, "truncated", "audit_truncated")


def test_the_tail_deleted_and_the_high_water_mark_lowered(state: Path) -> None:
    """Only the anchor outside the catalog (entry 10, at shutdown) still knows."""
    conn = attacker(state)
    conn.execute("DELETE FROM audit WHERE seq > 8")
    conn.execute("UPDATE sqlite_sequence SET seq = 8 WHERE name = 'audit'")
    conn.close()
    assert_broken(state, 9, "truncated", "audit_truncated")


def test_every_entry_deleted(state: Path) -> None:
    conn = attacker(state)
    conn.execute("DELETE FROM audit")
    conn.execute("DELETE FROM sqlite_sequence WHERE name = 'audit'")
    conn.close()
    assert_broken(state, 1, "truncated", "audit_truncated")


def test_rewritten_and_rehashed_as_a_plain_chain_allows(state: Path) -> None:
    rechain(state, 4, {"actor": "key:mallory"})
    assert_broken(state, 4, "mac_mismatch")


def test_rewritten_and_remaced_with_another_key(state: Path) -> None:
    wrong = os.urandom(32)
    rechain(state, 4, {"actor": "key:mallory"}, key=derive_audit_key(wrong), kcv=key_check_value(wrong))
    assert_broken(state, 4, "unknown_key")
    rechain(state, 4, {"actor": "key:mallory"}, key=derive_audit_key(wrong),
            kcv=key_check_value(bytes.fromhex(master_key().decode())))  # claiming the real key's name
    assert_broken(state, 4, "mac_mismatch")


def test_macs_stripped_to_pass_as_entries_from_before_macs(state: Path) -> None:
    conn = attacker(state)
    conn.execute("UPDATE audit SET mac = NULL, kcv = NULL WHERE seq >= 5")
    conn.close()
    assert_broken(state, 5, "unsigned")
    conn = attacker(state)
    conn.execute("UPDATE audit SET mac = NULL, kcv = NULL")
    conn.close()
    assert_broken(state, 1, "rewritten", "audit_rewritten")  # anchored entry 1 had a MAC


def test_a_wholesale_rewrite_with_the_master_key_is_caught_by_the_anchors(state: Path) -> None:
    """An insider holding the key rewrites entry 5 on and re-MACs everything: the chain verifies, the
    anchors (4 matches, 7 does not) place the change after entry 4."""
    master = bytes.fromhex(master_key().decode())
    rechain(state, 5, {"actor": "key:mallory"}, key=derive_audit_key(master), kcv=key_check_value(master))
    assert_broken(state, 5, "rewritten", "audit_rewritten")


def test_a_forged_anchor_line(state: Path) -> None:
    anchors = StateLayout(state).audit_anchors
    last = parse_anchor(anchors.read_text().splitlines()[-1])
    assert last is not None
    forged = json.loads(last.line()) | {"seq": 50}
    with anchors.open("a") as fh:
        fh.write(json.dumps(forged) + "\n")
    assert_broken(state, 50, "anchor_forged", "audit_anchor_invalid")


def test_anchors_from_the_journal_copy(state: Path, tmp_path: Path) -> None:
    """The journal's copy still knows when the state folder's anchor file lost its last lines."""
    anchors = StateLayout(state).audit_anchors
    copy = tmp_path / "journal-anchors.txt"
    copy.write_text("".join(f"Dec 05 host garrison-audit: {line}\n" for line in anchors.read_text().splitlines()))
    anchors.write_text("".join(line + "\n" for line in anchors.read_text().splitlines()[:2]))  # up to 4
    conn = attacker(state)
    conn.execute("DELETE FROM audit WHERE seq > 6")
    conn.execute("UPDATE sqlite_sequence SET seq = 6 WHERE name = 'audit'")
    conn.close()
    assert verify(state).returncode == 0  # what is left in the catalog agrees with what is left beside it
    proc = verify(state, "--anchors", str(copy))
    assert proc.returncode == 8 and "broken at entry 7:" in proc.stderr and "[audit_truncated]" in proc.stderr


def test_legacy_entries_from_before_macs_still_verify(env: dict[str, str]) -> None:
    """A catalog from before m007: its plain chain is a prefix the first MACed entry vouches for."""
    layout = StateLayout(Path(env["GARRISON_STATE_DIR"]))
    layout.ensure()
    catalog = Catalog(layout.catalog)
    prev = GENESIS
    with catalog.write() as conn:
        for n in range(3):  # as garrison.policies.audit wrote them before
            digest = entry_hash(prev, 1000.0 + n, "local", "keys.create", f"key:{n}", "ok", "{}")
            conn.execute("INSERT INTO audit (at, actor, action, resource, outcome, detail, prev_hash, hash)"
                         " VALUES (?, ?, 'keys.create', ?, 'ok', '{}', ?, ?)", (1000.0 + n, "local", f"key:{n}",
                                                                                 prev, digest))
            prev = digest
    with catalog.write() as conn:
        append_audit(conn, actor="local", action="keys.revoke", resource="key:0")
    report = verify_trail(catalog, AuditKeys.from_environment().verifying())
    assert report.intact and (report.entries, report.legacy, report.macs_checked) == (4, 3, 1)
    with catalog.write() as conn:
        conn.execute("UPDATE audit SET resource = 'key:9' WHERE seq = 2")
    broken = verify_trail(catalog, AuditKeys.from_environment().verifying()).broken
    assert broken is not None and (broken.seq, broken.kind) == (2, "edited")
    catalog.close()


def test_no_key_no_entry(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A production install whose key file is missing writes nothing unsigned: the change rolls back."""
    monkeypatch.setenv("GARRISON_MASTER_KEY_FILE", str(tmp_path / "absent.key"))
    catalog = Catalog(tmp_path / "catalog.db")
    with pytest.raises(Exception) as caught, catalog.write() as conn:
        conn.execute("INSERT INTO api_keys (id, hash, display_prefix, role, created_at) VALUES "
                     "('k', 'h', 'p', 'read', 0)")
        append_audit(conn, actor="local", action="keys.create", resource="key:k")
    assert getattr(caught.value, "code", None) == "master_key_missing"
    assert catalog.query("SELECT COUNT(*) FROM api_keys")[0][0] == 0
    assert catalog.query("SELECT COUNT(*) FROM audit")[0][0] == 0
    catalog.close()


def test_anchors_go_to_the_journal_under_systemd(env: dict[str, str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(tmp_path / "journal.sock"))
    journal.settimeout(5)
    monkeypatch.setattr(audit_anchors, "JOURNAL_SOCKET", str(tmp_path / "journal.sock"))
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef")
    catalog = Catalog(tmp_path / "catalog.db")
    with catalog.write() as conn:
        append_audit(conn, actor="local", action="keys.create", resource="key:k")
    anchor = anchor_head(catalog)
    catalog.close()
    fields = dict(line.split("=", 1) for line in journal.recv(65536).decode().splitlines())
    journal.close()
    assert fields["SYSLOG_IDENTIFIER"] == "garrison-audit" and fields["GARRISON_AUDIT_SEQ"] == "1"
    assert parse_anchor(fields["MESSAGE"]) == anchor


def test_model_import_and_removal_are_audited(env: dict[str, str], tmp_path: Path) -> None:
    layout = StateLayout(Path(env["GARRISON_STATE_DIR"]))
    layout.ensure()
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF" + os.urandom(64))
    registry = ModelRegistry(Catalog(layout.catalog), layout)
    registry.import_path(model, "tiny", actor="key:admin1")
    registry.remove("tiny", actor="key:admin2")
    rows = registry.catalog.query("SELECT actor, action, resource FROM audit ORDER BY seq")
    assert [tuple(r) for r in rows] == [("key:admin1", "models.import", "model:tiny"),
                                        ("key:admin2", "models.remove", "model:tiny")]
    assert verify_trail(registry.catalog, AuditKeys.from_environment().verifying()).intact
    registry.catalog.close()


def test_rotating_the_master_key_keeps_the_trail_verifying(tmp_path: Path) -> None:
    """Entries MACed under the old key stay verifiable after the old key is deleted (`--finish`):
    the first entry under the new key vouches for them."""
    state = tmp_path / "state"
    env = {**garrison_env(state), "GARRISON_AUDIT_ANCHOR_EVERY": "2"}
    run_cli(state, "identity", env=env)
    for n in range(3):
        run_cli(state, "keys", "create", "--role", "read", "--name", f"before-{n}", env=env)
    new_key = tmp_path / "k2.key"
    run_cli(state, "keys", "new-master-key", str(new_key), env=env)
    run_cli(state, "keys", "rotate-master", "--new-key", str(new_key), env=env)
    run_cli(state, "keys", "create", "--role", "read", "--name", "between", env=env)
    assert run_cli(state, "audit", "verify", env=env).returncode == 0
    run_cli(state, "keys", "rotate-master", "--finish", env=env)
    run_cli(state, "keys", "create", "--role", "read", "--name", "after", env=env)
    report = json.loads(run_cli(state, "audit", "verify", "--json", env=env).stdout)
    assert report["intact"] and report["entries"] == 7, report
    conn = sqlite3.connect(StateLayout(state).catalog)
    kcvs = [r[0] for r in conn.execute("SELECT kcv FROM audit ORDER BY seq")]
    conn.close()
    assert len(set(kcvs)) == 2 and kcvs[-1] == key_check_value(bytes.fromhex(new_key.read_text().strip()))
    assert report["macs_checked"] == kcvs.count(kcvs[-1])  # the old key is gone: its entries are vouched for
    # ...and the trail still catches an edit of an entry MACed under the deleted key.
    conn = sqlite3.connect(StateLayout(state).catalog, isolation_level=None)
    conn.execute("UPDATE audit SET actor = 'key:mallory' WHERE seq = 2")
    conn.close()
    proc = run_cli(state, "audit", "verify", env=env, check=False)
    assert proc.returncode == 8 and "broken at entry 2:" in proc.stderr


def test_the_daemon_anchors_at_shutdown_and_reports_over_http(daemon: Daemon) -> None:
    for n in range(3):
        run_cli(daemon.state_dir, "keys", "create", "--role", "read", "--name", f"k{n}", env=daemon.env)
    status, report = daemon.request("GET", "/v1/garrison/audit/verify")
    assert status == 200 and report["intact"] and report["entries"] >= 4, report
    status, listing = daemon.request("GET", "/v1/garrison/audit")
    assert status == 200 and listing["chain_intact"] and listing["first_broken"] is None
    last = listing["data"][-1]["seq"]
    conn = attacker(daemon.state_dir)
    conn.execute("DELETE FROM audit WHERE seq = ?", (last,))
    conn.close()
    status, listing = daemon.request("GET", "/v1/garrison/audit")  # the tail is checked on every call
    assert (listing["chain_intact"], listing["first_broken"], listing["break_kind"]) == (False, last, "truncated")
    status, report = daemon.request("GET", "/v1/garrison/audit/verify")
    assert (report["intact"], report["first_bad_seq"], report["code"]) == (False, last, "audit_truncated")
    assert daemon.stop() == 0
    anchors, _ = read_anchors(StateLayout(daemon.state_dir).audit_anchors)
    assert anchors and anchors[-1].reason == "shutdown" and anchors[-1].seq == last - 1
