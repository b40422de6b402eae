"""The ingestion pipeline end to end with real components: Debian's age sealing to the appliance,
real SQLite, the vault; refusals store nothing; the CLI; kill -9 mid-ingestion leaves no partial version."""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from garrison.commands.ingest import datasets_group, ingest_command
from garrison.commands.master_key import rotate_master_command
from garrison.config import load_config
from garrison.crypto.identity import load_appliance_identity
from garrison.errors import GarrisonError, PayloadTooLarge
from garrison.ingest.pipeline import IngestPolicy, IngestRefused, IngestRequest, IngestService, pseudonym_key
from garrison.paths import StateLayout
from garrison.store.catalog import Catalog

needs_age = pytest.mark.skipif(shutil.which("age") is None, reason="Debian's age (apt install age) is needed")

POLICY = """
retention_days = 30
[redaction]
on_bad_lines = "skip"
[redaction.actions]
email = "hash"
phone = "mask"
secret = "drop"
[redaction.word_lists.codenames]
words = ["Project Falcon"]
"""


def seal(data: bytes, recipient: str, *, armor: bool = False) -> bytes:
    args = ["age", *(["-a"] if armor else []), "-r", recipient]
    return subprocess.run(args, input=data, capture_output=True, check=True).stdout


def chat(user: str, assistant: str = "noted") -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]})


def nothing_stored(service: IngestService) -> None:
    assert service.catalog.query("SELECT * FROM dataset_versions") == []
    assert service.catalog.query("SELECT * FROM datasets") == []
    assert list(service.layout.vault.iterdir()) == []


@needs_age
def test_sealed_by_debian_age_becomes_a_redacted_version(service: IngestService) -> None:
    lines = [chat("mail alice@example.com or call +44 20 7946 0958"),
             chat("alice@example.com again, about Project Falcon"),
             "{broken",
             chat("key -----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----"),
             chat("order 12345678, version 1.2.3", "fine")]
    sealed = seal(("\n".join(lines) + "\n").encode(), service.identity().recipient)
    result = service.ingest(io.BytesIO(sealed), IngestRequest(dataset="support", source="cli", source_name="s.age"),
                            policy=IngestPolicy.from_toml(POLICY))
    r = result.report
    assert (r["records_accepted"], r["records_dropped"], r["records_refused_count"]) == (3, 1, 1)
    assert r["records_refused"] == [{"line": 3, "reason": r["records_refused"][0]["reason"]}]
    assert r["redactions"] == {"codenames": 1, "email": 2, "phone": 1, "secret": 1}
    assert r["bytes_in"] == len(sealed) and r["sealed"] and r["format"] == "chat" and r["duration_s"] >= 0
    version = result.version
    assert (version.dataset, version.version, version.record_count, version.state) == ("support", 1, 3, "ready")
    assert version.expires_at and version.expires_at - version.created_at == pytest.approx(30 * 86400)
    got = [rec["messages"][0]["content"] for rec in service.vault.open("support").records()]
    pseudonym = re.search(r"<EMAIL:[0-9a-f]{10}>", got[0])
    assert pseudonym and got[0] == f"mail {pseudonym.group()} or call ****************"
    assert got[1] == f"{pseudonym.group()} again, about [CODENAMES]"  # same person, same pseudonym
    assert got[2] == "order 12345678, version 1.2.3"
    assert all(rec["messages"][0]["role"] == "user" for rec in service.vault.open("support").records())
    audit = service.catalog.query("SELECT action, resource FROM audit WHERE action = 'dataset.ingest'")
    assert [tuple(a) for a in audit] == [("dataset.ingest", "dataset:support:1")]


def test_pseudonyms_are_stable_per_appliance(service: IngestService, tmp_path: Path) -> None:
    policy = IngestPolicy.from_dict({"redaction": {"actions": {"email": "hash"}}})
    for name in ("a", "b"):
        service.ingest(io.BytesIO((chat("bob@example.org") + "\n").encode()),
                       IngestRequest(dataset=name, source="cli", sealed=False), policy=policy)
    first, second = ([r["messages"][0]["content"] for r in service.vault.open(n).records()] for n in ("a", "b"))
    assert first == second and first[0].startswith("<EMAIL:")
    other = load_appliance_identity(load_config(overrides={"state_dir": str(tmp_path / "other")}))
    assert pseudonym_key(other) != pseudonym_key(service.identity())


def test_refuse_policy_stores_nothing_and_reports_every_bad_line(service: IngestService) -> None:
    data = "\n".join([chat("fine"), "[1]", chat("fine too"), '{"messages": []}']) + "\n"
    with pytest.raises(IngestRefused) as info:
        service.ingest(io.BytesIO(data.encode()), IngestRequest(dataset="d", source="cli", sealed=False))
    assert info.value.code == "bad_lines" and info.value.http_status == 400
    assert [b["line"] for b in info.value.details["report"]["records_refused"]] == [2, 4]
    nothing_stored(service)


def test_no_acceptable_record_is_refused(service: IngestService) -> None:
    policy = IngestPolicy.from_dict({"redaction": {"on_bad_lines": "skip", "actions": {"email": "drop"}}})
    data = "\n".join(["nope", chat("x@example.com")]) + "\n"
    with pytest.raises(IngestRefused) as info:
        service.ingest(io.BytesIO(data.encode()), IngestRequest(dataset="d", source="cli", sealed=False, format="chat"),
                       policy=policy)
    assert info.value.code == "no_records"
    assert info.value.details["report"]["records_dropped"] == 1
    nothing_stored(service)


def _header_end(blob: bytes) -> int:
    return blob.index(b"\n--- ") + 1


def _refusals(recipient: str, other: str) -> dict[str, bytes]:
    data = ("\n".join(chat(f"record {i} " + "z" * 200) for i in range(400)) + "\n").encode()
    assert len(data) > 70_000  # more than one age chunk
    good = seal(data, recipient)
    mac_flip = bytearray(good)
    mac_at = _header_end(good) + 4
    mac_flip[mac_at] = ord("A") if good[mac_at] != ord("A") else ord("B")
    payload_flip = bytearray(good)
    payload_flip[len(good) - 100] ^= 1
    chunk_boundary = good.index(b"\n", _header_end(good)) + 1 + 16 + 65536 + 16
    armored = seal(data, recipient, armor=True).decode().splitlines()
    armored[3] = armored[3][:10] + "!" + armored[3][11:]
    return {
        "age_no_matching_identity": seal(data, other),
        "age_truncated": good[:chunk_boundary],
        "age_header_mac_invalid": bytes(mac_flip),
        "age_payload_corrupt": bytes(payload_flip),
        "age_bad_armor": ("\n".join(armored) + "\n").encode(),
        "age_empty": b"",
        "age_not_age": b'{"messages": []}\n',
    }


@needs_age
def test_each_damaged_delivery_is_refused_with_its_own_code(service: IngestService, tmp_path: Path) -> None:
    keys = tmp_path / "other.txt"
    subprocess.run(["age-keygen", "-o", str(keys)], check=True, capture_output=True)
    other = subprocess.run(["age-keygen", "-y", str(keys)], check=True, capture_output=True, text=True).stdout.strip()
    cases = _refusals(service.identity().recipient, other)
    for expected, blob in cases.items():
        with pytest.raises(GarrisonError) as info:
            service.ingest(io.BytesIO(blob), IngestRequest(dataset="d", source="upload"))
        assert info.value.code == expected, (expected, info.value.message)
        assert info.value.http_status == 400 and info.value.message
        nothing_stored(service)


def test_plaintext_detection_and_sealed_requirement(service: IngestService) -> None:
    data = (json.dumps({"text": "hello"}) + "\n").encode()
    result = service.ingest(io.BytesIO(data), IngestRequest(dataset="p", source="cli", sealed=None))
    assert not result.report["sealed"] and result.version.format == "text"
    with pytest.raises(GarrisonError) as info:
        service.ingest(io.BytesIO(data + b"x"), IngestRequest(dataset="p", source="upload", sealed=True))
    assert info.value.code == "age_not_age"


def test_same_bytes_twice_is_one_version(service: IngestService) -> None:
    data = (chat("hello") + "\n").encode()
    first = service.ingest(io.BytesIO(data), IngestRequest(dataset="d", source="cli", sealed=False))
    again = service.ingest(io.BytesIO(data), IngestRequest(dataset="d", source="cli", sealed=False))
    assert again.duplicate and again.version.id == first.version.id
    other = service.ingest(io.BytesIO(data), IngestRequest(dataset="e", source="cli", sealed=False))
    assert not other.duplicate
    assert len(service.catalog.query("SELECT * FROM dataset_versions")) == 2
    assert len(list(service.layout.vault.iterdir())) == 2


def test_size_limit(service: IngestService) -> None:
    data = ("\n".join(chat(f"m {i}") for i in range(200)) + "\n").encode()
    with pytest.raises(PayloadTooLarge):
        service.ingest(io.BytesIO(data), IngestRequest(dataset="d", source="upload", sealed=False, max_bytes=1000))
    nothing_stored(service)


def test_policy_file_validation(tmp_path: Path) -> None:
    assert IngestPolicy.from_toml(POLICY).retention_days == 30
    for bad in ("retention_days = -1", "colour = 1", "[redaction]\nemial = 'hash'", "not toml ="):
        with pytest.raises(GarrisonError) as info:
            IngestPolicy.from_toml(bad)
        assert info.value.code == "invalid_policy"


def test_appliance_policy_file_in_state_folder(service: IngestService) -> None:
    (service.layout.root / "policy.toml").write_text('[redaction]\non_bad_lines = "skip"\n')
    assert service.policy().on_bad_lines == "skip"


# -- the CLI ---------------------------------------------------------------------------------------


@needs_age
def test_cli_ingest_list_show_rm(service: IngestService, tmp_path: Path) -> None:
    source = tmp_path / "in" / "chats.jsonl"
    source.parent.mkdir()
    source.write_text("\n".join([chat("call +44 20 7946 0958"), chat("plain")]) + "\n")
    sealed = tmp_path / "in" / "chats.jsonl.age"
    sealed.write_bytes(seal(source.read_bytes(), service.identity().recipient))
    runner = CliRunner()
    out = runner.invoke(ingest_command, [str(sealed), "--dataset", "support"])
    assert out.exit_code == 0, out.output
    assert "support:1: 2 records accepted, 0 refused, 0 dropped by policy; redactions: phone 1" in out.output
    out = runner.invoke(ingest_command, [str(source), "--dataset", "support", "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["version"] == 2
    bad = tmp_path / "in" / "bad.jsonl"
    bad.write_text(chat("ok") + "\n{oops\n")
    out = runner.invoke(ingest_command, [str(bad), "--dataset", "support"])
    assert isinstance(out.exception, IngestRefused) and out.exception.code == "bad_lines"
    assert "line 2: not valid JSON" in out.stderr
    policy = tmp_path / "skip.toml"
    policy.write_text('[redaction]\non_bad_lines = "skip"\n')
    out = runner.invoke(ingest_command, [str(bad), "--dataset", "support", "--policy", str(policy)])
    assert out.exit_code == 0 and "support:3: 1 records accepted, 1 refused" in out.output

    listed = runner.invoke(datasets_group, ["list", "--json"])
    assert [(d["name"], d["versions"], d["records"]) for d in json.loads(listed.output)] == [("support", 3, 5)]
    shown = runner.invoke(datasets_group, ["show", "support:1", "--json"])
    assert json.loads(shown.output)["report"]["redactions"] == {"phone": 1}
    assert "v3" in runner.invoke(datasets_group, ["show", "support"]).output
    assert runner.invoke(datasets_group, ["rm", "support:2"], input="n\n").exit_code == 1  # aborted
    assert runner.invoke(datasets_group, ["rm", "support:2", "--yes"]).exit_code == 0
    assert json.loads(runner.invoke(datasets_group, ["show", "support:2", "--json"]).output)["state"] == "deleted"
    assert runner.invoke(datasets_group, ["rm", "support"], input="y\n").exit_code == 0
    assert json.loads(runner.invoke(datasets_group, ["list", "--json"]).output) == []


def test_cli_rotate_master(service: IngestService, tmp_path: Path) -> None:
    service.ingest(io.BytesIO((chat("hello") + "\n").encode()), IngestRequest(dataset="d", source="cli", sealed=False))
    recipient = service.identity().recipient
    new_key = tmp_path / "new.key"
    new_key.write_text(os.urandom(32).hex() + "\n")
    new_key.chmod(0o600)
    out = CliRunner().invoke(rotate_master_command, ["--new-key", str(new_key)])
    assert out.exit_code == 0, out.output
    assert "1 dataset key(s)" in out.output
    config = load_config()
    fresh = IngestService(config, Catalog(StateLayout(config.state_path).catalog))
    assert fresh.identity().recipient == recipient
    assert [r["messages"][0]["content"] for r in fresh.vault.open("d").records()] == ["hello"]


# -- kill -9 at any instant ------------------------------------------------------------------------

_DRIVER = """
import os, sys, signal
from pathlib import Path
from garrison.config import load_config
from garrison.ingest import vault as vault_module
from garrison.ingest.pipeline import IngestRequest, IngestService
from garrison.paths import StateLayout
from garrison.store.catalog import Catalog

mode = sys.argv[2]
if mode in ("before-rename", "after-rename"):
    real_rename = os.rename
    def rename(src, dst):
        if mode == "before-rename":
            os.kill(os.getpid(), signal.SIGKILL)
        real_rename(src, dst)
        os.kill(os.getpid(), signal.SIGKILL)
    vault_module.os.rename = rename
config = load_config()
layout = StateLayout(config.state_path)
layout.ensure()
service = IngestService(config, Catalog(layout.catalog), chunk_size=8192)
print("started", flush=True)
# "random": report every read so the test can kill at a chosen point of the stream.
progress = (lambda n: print("read", n, flush=True)) if mode == "random" else None
with open(sys.argv[1], "rb") as src:
    result = service.ingest(src, IngestRequest(dataset="big", source="cli"), progress=progress)
print("done", result.version.version, result.version.record_count, flush=True)
"""


def _launch(script: Path, source: Path, mode: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(script), str(source), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


@needs_age
def test_kill_9_mid_ingestion_leaves_no_partial_version(service: IngestService, env: dict[str, str],
                                                        tmp_path: Path) -> None:
    records = 6000
    data = ("\n".join(chat(f"ticket {i} from user{i}@example.com about the invoice " + "q" * 80)
                      for i in range(records)) + "\n").encode()
    source = tmp_path / "big.jsonl.age"
    source.write_bytes(seal(data, service.identity().recipient))
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    rng = random.Random(5)
    layout = service.layout

    def check_clean() -> None:
        assert service.catalog.query("SELECT * FROM dataset_versions") == []
        assert service.catalog.integrity_check() == "ok"
        service.recover()
        assert list(layout.vault.iterdir()) == [], "a partial version survived the crash"

    for mode in ("before-rename", "after-rename"):
        proc = _launch(script, source, mode, env)
        proc.wait(timeout=120)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
        check_clean()

    kills = 0
    for _ in range(4):
        proc = _launch(script, source, "random", env)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        # Kill once a random share of the sealed file has been read: mid-ingestion whatever the
        # machine's speed (a timed sleep let a fast ingestion finish first).
        target, seen = rng.uniform(0.05, 0.95) * source.stat().st_size, 0
        while seen < target:
            line = proc.stdout.readline()
            if not line.startswith("read "):
                break
            seen += int(line.split()[1])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            # mid-stream there is a staging folder; publish is all or nothing
            rows = service.catalog.query("SELECT record_count FROM dataset_versions")
            assert rows == [] or [r[0] for r in rows] == [records]
            if rows:
                break
            check_clean()
    assert kills >= 3

    proc = _launch(script, source, "complete", env)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    rows = service.catalog.query("SELECT version, record_count, state FROM dataset_versions")
    assert [tuple(r) for r in rows] == [(1, records, "ready")]
    assert sum(1 for _ in service.vault.open("big").records()) == records
    assert service.catalog.integrity_check() == "ok"
    assert [p.name for p in layout.vault.iterdir()] == [service.vault.store.version("big").id]
