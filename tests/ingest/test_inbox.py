"""The inbox drop folder: files sealed with Debian's age become versions; half-written files are not
taken; refusals land in .rejected/ with a reason file; a crash never loses a delivered file."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from garrison.errors import ConfigError
from garrison.ingest.inbox import InboxWatcher, Outcome, dataset_for
from garrison.ingest.pipeline import IngestService

pytestmark = pytest.mark.skipif(shutil.which("age") is None or shutil.which("age-keygen") is None,
                                reason="Debian's age (apt install age) is needed")


@pytest.fixture
def watcher(service: IngestService) -> InboxWatcher:
    w = InboxWatcher(service, poll_s=0.01, settle_s=0.0)
    w.recover()
    return w


def chat(user: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "ok"}]})


def age_file(tmp_path: Path, lines: list[str], recipient: str, out: Path, *, armor: bool = False) -> Path:
    """`age -r RECIPIENT -o out data.jsonl`, exactly as a data producer runs it."""
    data = tmp_path / "producer" / "data.jsonl"
    data.parent.mkdir(exist_ok=True)
    data.write_text("\n".join(lines) + "\n")
    subprocess.run(["age", *(["-a"] if armor else []), "-r", recipient, "-o", str(out), str(data)], check=True)
    return out


def two_polls(watcher: InboxWatcher) -> list[Outcome]:
    first = watcher.poll_once()
    return first + watcher.poll_once()


def test_age_drop_becomes_a_redacted_version(watcher: InboxWatcher, service: IngestService, tmp_path: Path) -> None:
    (service.layout.root / "policy.toml").write_text('[redaction.actions]\nemail = "mask"\n')
    out = age_file(tmp_path, [chat("write to carol@example.com"), chat("no pii")], service.identity().recipient,
                   watcher.inbox / "x.age")
    assert watcher.poll_once() == []  # first sight: not taken yet
    outcomes = watcher.poll_once()
    assert outcomes == [Outcome("x.age", "ingested", "x", 1)]
    assert not out.exists() and list(watcher.processing.iterdir()) == []
    texts = [r["messages"][0]["content"] for r in service.vault.open("x").records()]
    assert texts == ["write to " + "*" * len("carol@example.com"), "no pii"]
    version = service.vault.store.version("x")
    assert version.source == "inbox" and version.source_name == "x.age" and version.created_by == "inbox"
    assert version.report["redactions"] == {"email": 1}


def test_naming_rules_and_sidecar(watcher: InboxWatcher, service: IngestService, tmp_path: Path) -> None:
    recipient = service.identity().recipient
    age_file(tmp_path, [chat("a")], recipient, watcher.inbox / "support-chats__2024-06.jsonl.age")
    (watcher.inbox / "blob.age.meta.json").write_text(json.dumps({"dataset": "faq", "format": "csv",
                                                                 "columns": {"prompt": "q", "completion": "a"}}))
    age_file(tmp_path, ["q,a", "what,that"], recipient, watcher.inbox / "blob.age")
    outcomes = sorted(two_polls(watcher), key=lambda o: o.name)
    assert [(o.name, o.status, o.dataset) for o in outcomes] == [("blob.age", "ingested", "faq"),
                                                                ("support-chats__2024-06.jsonl.age", "ingested",
                                                                 "support-chats")]
    assert list(service.vault.open("faq").records()) == [{"prompt": "what", "completion": "that"}]
    assert sorted(os.listdir(watcher.inbox)) == [".processing", ".rejected"]
    assert dataset_for("plain.jsonl.age", None) == ("plain", "auto", None)


def test_files_being_written_are_not_taken(watcher: InboxWatcher, service: IngestService, tmp_path: Path) -> None:
    sealed = age_file(tmp_path, [chat(f"m{i}") for i in range(50)], service.identity().recipient,
                      tmp_path / "s.age").read_bytes()
    target = watcher.inbox / "growing.age"
    with target.open("wb") as fh:
        fh.write(sealed[:100])
        fh.flush()
        assert watcher.poll_once() == []
        fh.write(sealed[100:200])
        fh.flush()
        assert watcher.poll_once() == []  # the size changed between polls
        fh.write(sealed[200:])
    for name in (".hidden.age", "partial.age.part", "x.tmp"):
        (watcher.inbox / name).write_bytes(sealed)
    settling = InboxWatcher(service, settle_s=3600)
    settling._seen = dict(watcher._seen)
    settling.poll_once()
    assert settling.poll_once() == []  # modified less than settle_s ago
    outcomes = two_polls(watcher)
    assert [(o.name, o.status) for o in outcomes] == [("growing.age", "ingested")]
    assert sorted(os.listdir(watcher.inbox)) == [".hidden.age", ".processing", ".rejected", "partial.age.part",
                                                 "x.tmp"]


def test_refusals_go_to_rejected_with_reasons_and_store_nothing(watcher: InboxWatcher, service: IngestService,
                                                                tmp_path: Path) -> None:
    keys = tmp_path / "other.txt"
    subprocess.run(["age-keygen", "-o", str(keys)], check=True, capture_output=True)
    other = subprocess.run(["age-keygen", "-y", str(keys)], check=True, capture_output=True, text=True).stdout.strip()
    recipient = service.identity().recipient
    lines = [chat(f"record {i} " + "z" * 300) for i in range(300)]
    good = age_file(tmp_path, lines, recipient, tmp_path / "good.age").read_bytes()
    header_end = good.index(b"\n--- ") + 1
    boundary = good.index(b"\n", header_end) + 1 + 16 + 65536 + 16
    mac_flip = bytearray(good)
    mac_flip[header_end + 4] = ord("A") if good[header_end + 4] != ord("A") else ord("B")
    payload_flip = bytearray(good)
    payload_flip[-50] ^= 0x20
    armored = age_file(tmp_path, lines, recipient, tmp_path / "armored.age", armor=True).read_text().splitlines()
    armored[2] = armored[2][:5] + "*" + armored[2][6:]
    age_file(tmp_path, lines, other, watcher.inbox / "wrong-recipient.age")
    drops = {
        "truncated.age": good[:boundary], "header-flip.age": bytes(mac_flip), "payload-flip.age": bytes(payload_flip),
        "broken-armor.age": ("\n".join(armored) + "\n").encode(), "empty.age": b"", "not-age.age": b"hello\n",
        "bad-lines.age": age_file(tmp_path, [chat("ok"), "{nope"], recipient, tmp_path / "b.age").read_bytes(),
        "Bad Name!.age": good,
    }
    for name, blob in drops.items():
        (watcher.inbox / name).write_bytes(blob)
    outcomes = {o.name: o for o in two_polls(watcher)}
    expected = {"wrong-recipient.age": "age_no_matching_identity", "truncated.age": "age_truncated",
                "header-flip.age": "age_header_mac_invalid", "payload-flip.age": "age_payload_corrupt",
                "broken-armor.age": "age_bad_armor", "empty.age": "age_empty", "not-age.age": "age_not_age",
                "bad-lines.age": "bad_lines", "Bad Name!.age": "invalid_dataset_name"}
    assert {n: o.code for n, o in outcomes.items()} == expected
    assert all(o.status == "rejected" for o in outcomes.values())
    for name, code in expected.items():
        assert (watcher.rejected / name).exists()
        reason = json.loads((watcher.rejected / (name + ".reason.json")).read_text())
        assert reason["code"] == code and reason["message"] and reason["received_as"] == name
    bad = json.loads((watcher.rejected / "bad-lines.age.reason.json").read_text())
    assert bad["details"]["report"]["records_refused"][0]["line"] == 2
    assert service.catalog.query("SELECT * FROM dataset_versions") == []
    assert list(service.layout.vault.iterdir()) == []
    assert sorted(os.listdir(watcher.inbox)) == [".processing", ".rejected"]
    assert list(watcher.processing.iterdir()) == []
    # Dropping the same name again never overwrites the first refusal.
    (watcher.inbox / "empty.age").write_bytes(b"")
    two_polls(watcher)
    assert (watcher.rejected / "empty.age.1").exists() and (watcher.rejected / "empty.age.1.reason.json").exists()


def test_not_the_files_fault_means_retry_not_reject(service: IngestService, tmp_path: Path) -> None:
    recipient = service.identity().recipient
    broken = IngestService(service.config, service.catalog,
                           identity_loader=lambda _c: (_ for _ in ()).throw(ConfigError("master key missing",
                                                                                        code="master_key_missing")))
    watcher = InboxWatcher(broken, settle_s=0.0, retry_s=3600)
    watcher.recover()
    age_file(tmp_path, [chat("keep me")], recipient, watcher.inbox / "later.age")
    outcomes = two_polls(watcher)
    assert [(o.status, o.code) for o in outcomes] == [("retry", "master_key_missing")]
    assert (watcher.inbox / "later.age").exists() and list(watcher.rejected.iterdir()) == []
    assert two_polls(watcher) == []  # backing off
    fixed = InboxWatcher(service, settle_s=0.0)
    assert [o.status for o in two_polls(fixed)] == ["ingested"]


_KILLED_WATCHER = """
import sys
from garrison.config import load_config
from garrison.ingest.inbox import InboxWatcher
from garrison.ingest.pipeline import IngestService
from garrison.paths import StateLayout
from garrison.store.catalog import Catalog
config = load_config()
service = IngestService(config, Catalog(StateLayout(config.state_path).catalog), chunk_size=4096)
watcher = InboxWatcher(service, settle_s=0.0)
watcher.recover()
watcher.poll_once()
print("polling", flush=True)
print(watcher.poll_once(), flush=True)
"""


def test_kill_9_while_processing_never_loses_the_file(watcher: InboxWatcher, service: IngestService,
                                                      tmp_path: Path, env: dict[str, str]) -> None:
    lines = [chat(f"ticket {i} from u{i}@example.com " + "w" * 100) for i in range(6000)]
    age_file(tmp_path, lines, service.identity().recipient, watcher.inbox / "big.age")
    script = tmp_path / "watch.py"
    script.write_text(_KILLED_WATCHER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **env})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "polling"
    deadline = time.monotonic() + 30
    while not (watcher.processing / "big.age").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the ingestion finished before the kill; make the input bigger"
    assert (watcher.processing / "big.age").exists() and not (watcher.inbox / "big.age").exists()
    assert service.catalog.query("SELECT * FROM dataset_versions") == []

    restarted = InboxWatcher(service, settle_s=0.0)
    assert restarted.recover() == ["big.age"]
    assert list(service.layout.vault.iterdir()) == []  # the dead writer's staging folder is reaped
    assert [(o.name, o.status) for o in two_polls(restarted)] == [("big.age", "ingested")]
    assert service.vault.store.version("big").record_count == 6000


async def test_run_task_polls_and_sweeps_retention(service: IngestService, tmp_path: Path) -> None:
    (service.layout.root / "policy.toml").write_text("retention_days = 0.00001\n")  # about a second
    watcher = InboxWatcher(service, poll_s=0.02, settle_s=0.0, retention_every_s=0.05)
    age_file(tmp_path, [chat("short-lived")], service.identity().recipient, service.layout.inbox / "tmp.age")
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    deadline = time.monotonic() + 20
    states: list[str] = []
    while time.monotonic() < deadline:
        states = [r[0] for r in service.catalog.query("SELECT state FROM dataset_versions")]
        if states == ["expired"]:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert states == ["expired"]
    assert list(service.layout.vault.iterdir()) == []
