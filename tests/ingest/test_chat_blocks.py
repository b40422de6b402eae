"""The plain chat fast path (whole blocks decoded, checked and encoded in C) and the worker pool through
the pipeline: both may change speed, never what is stored, counted or refused."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import pool_blocks

from garrison.ingest import parallel
from garrison.ingest.formats import BadLine, block_lines, jsonl_items
from garrison.ingest.parallel import RecordRedactor, Segment, _block_segments, segments
from garrison.ingest.pii import Redactor
from garrison.ingest.pipeline import IngestPolicy, IngestRefused, IngestRequest, IngestService
from garrison.ingest.policy import RedactionPolicy
from garrison.ingest.records import ROLES, decode_chat_block, encode_chat_records, encode_record

KEY = b"k" * 32
POLICY: dict[str, Any] = {
    "actions": {"email": "hash", "phone": "mask"},
    "patterns": {"marker": {"regex": "DROPME", "action": "drop"}},
    "word_lists": {"codenames": {"words": ["Project Falcon", "张伟"], "action": "hash"}},
}
ODD = ["", "\"quoted\" \\ back/slash", "tab\there\nnew line\r\x00\x1f\x7f", "\u2028\u2029 é 张伟 😀",
       "mail bob@example.com", "call +44 20 7946 0018 or +1 415 555 0132", "card 4111 1111 1111 1111",
       "x DROPME y a@b.example", "Project  Falcon", "</script> & <b>", "\ufeff bom inside"]


def _line(rng: random.Random, i: int) -> str:
    messages = [{"role": rng.choice(["system", "user", "tool", "developer", "function"]), "content": rng.choice(ODD)}
                for _ in range(rng.randrange(0, 3))]
    messages.append({"role": "assistant", "content": rng.choice(ODD) + f" {i}"})
    messages.insert(rng.randrange(len(messages) + 1), {"role": "user", "content": rng.choice(ODD)})
    if rng.random() < 0.3:
        messages = [{"content": m["content"], "role": m["role"]} for m in messages]  # content first
    style = rng.randrange(3)
    if style == 0:
        return json.dumps({"messages": messages})
    if style == 1:
        return json.dumps({"messages": messages}, ensure_ascii=False, separators=(",", ":"))
    return "  " + json.dumps({"messages": messages}, indent=None).replace("/", "\\/") + " \r"


def _general(data: bytes, redact: RecordRedactor) -> list[Segment | BadLine]:
    lines, long_numbers = block_lines(1, data)
    return list(segments(jsonl_items(lines, long_numbers, "chat", {}), redact))


def _flat(segs: list[Segment | BadLine]) -> tuple[bytes, int, int, dict[str, int], list[BadLine]]:
    counts: dict[str, int] = {}
    for s in segs:
        if isinstance(s, Segment):
            for k, v in s.counts.items():
                counts[k] = counts.get(k, 0) + v
    kept = [s for s in segs if isinstance(s, Segment)]
    return (b"".join(s.data for s in kept), sum(s.count for s in kept), sum(s.dropped for s in kept), counts,
            [s for s in segs if isinstance(s, BadLine)])


def test_roles_are_the_formats_roles() -> None:
    from garrison.ingest.formats import CHAT_ROLES

    assert ROLES == CHAT_ROLES == {"system", "developer", "user", "assistant", "tool", "function"}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_chat_block_gives_the_general_paths_bytes_and_counts(seed: int) -> None:
    rng = random.Random(seed)
    data = "\n".join(_line(rng, i) for i in range(600)).encode()
    policy = RedactionPolicy.from_dict(POLICY)
    fast = RecordRedactor(Redactor(policy, KEY))
    segment = fast.chat_segment(data)
    assert segment is not None, "every line is a plain chat record: the fast path must take the block"
    general = RecordRedactor(Redactor(policy, KEY))
    expected = _flat(_general(data, general))
    assert _flat([segment]) == expected
    assert dict(fast.counts) == dict(general.counts)
    assert expected[2] > 10 and expected[3]["email"] > 10 and expected[3]["codenames"] > 10  # drops, hashes, tags
    records = [json.loads(line) for line in expected[0].splitlines()]
    assert all(encode_record(r) == json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
               for r in records)


def test_encoding_is_json_dumps_exactly() -> None:
    everything = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    line = json.dumps({"messages": [{"role": "user", "content": everything}, {"role": "assistant", "content": "ok"}]})
    records = decode_chat_block(line.encode())
    assert records is not None
    assert encode_chat_records(records) == encode_record(json.loads(line))


BOTH = '{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}'
REFUSED = {
    "two values on a line": BOTH + BOTH,
    "a value over two lines": '{"messages":[{"role":"user","content":"a"},\n{"role":"assistant","content":"b"}]}',
    "byte-order mark": "\ufeff" + BOTH,
    "blank line": BOTH + "\n\n" + BOTH,
    "blank last line": BOTH + "\n",
    "spaces only": BOTH + "\n   \n" + BOTH,
    "extra top-level key": BOTH[:-1] + ',"meta":1}',
    "extra message key": BOTH.replace('"content":"b"', '"content":"b","weight":1'),
    "unknown role": BOTH.replace('"user"', '"robot"'),
    "role not a string": BOTH.replace('"user"', "3"),
    "content null": BOTH.replace('"a"', "null"),
    "content parts": BOTH.replace('"a"', '[{"type":"text","text":"a"}]'),
    "no assistant": BOTH.replace('"assistant"', '"user"'),
    "no messages": '{"messages":[]}',
    "messages twice, the first bad": '{"messages":[],' + BOTH[1:],
    "too many messages": json.dumps({"messages": [{"role": "assistant", "content": "x"}] * 4097}),
    "lone surrogate": BOTH.replace('"a"', '"\\ud800"'),
    "trailing garbage": BOTH + " x",
    "not JSON": "{broken",
    "a number": "5",
    "nesting": '{"messages":[[' * 600 + "]]" * 600 + "}",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_anything_else_takes_the_general_path(name: str) -> None:
    """The fast path never decides a line is bad: it hands the whole block back, and the general
    path's records, line numbers and reasons come out as they always did."""
    data = (BOTH + "\n" + REFUSED[name] + "\n" + BOTH).encode()
    assert decode_chat_block(data) is None
    policy = RedactionPolicy.from_dict(POLICY)
    got = _block_segments(1, data, "chat", RecordRedactor(Redactor(policy, KEY)), {})
    assert _flat(got) == _flat(_general(data, RecordRedactor(Redactor(policy, KEY))))


def test_invalid_utf8_takes_the_general_path() -> None:
    data = BOTH.replace('"a"', '"\xff"').encode("latin-1")
    assert decode_chat_block(data) is None
    got = _block_segments(1, data, "chat", RecordRedactor(Redactor(None, KEY)), {})
    assert got == [BadLine(1, "not valid UTF-8")]


def test_duplicate_keys_agree_with_the_general_path() -> None:
    lines = ['{"messages":[{"role":"user","content":"a","role":"assistant"}]}',
             '{"messages":[{"role":"user","content":"a","content":"mail c@d.example"},'
             '{"role":"assistant","content":"b"}]}',
             '{"messages":[{"role":"user","content":"x"}],"messages":[{"role":"assistant","content":"y"}]}']
    data = "\n".join(lines).encode()
    got = _block_segments(1, data, "chat", RecordRedactor(Redactor(None, KEY)), {})
    assert _flat(got) == _flat(_general(data, RecordRedactor(Redactor(None, KEY))))


# ------------------------------------------------------------------------- the pool, through the pipeline

def _children_alive() -> list[psutil.Process]:
    """Live processes under this one, but multiprocessing's resource tracker (one per process, for good)."""
    alive = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline()):
                alive.append(p)
        except psutil.NoSuchProcess:
            continue
    return alive


def test_pool_ingestion_stores_what_one_process_stores(service: IngestService, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(5)
    lines = [_line(rng, i) for i in range(4000)]
    lines[1500] = "{broken"
    source = tmp_path / "big.jsonl"
    source.write_text("\n".join(lines) + "\n")
    policy = IngestPolicy.from_dict({"redaction": {**POLICY, "on_bad_lines": "skip"}})
    monkeypatch.setattr(parallel, "BLOCK_BYTES", 64 * 1024)
    submitted = pool_blocks(monkeypatch)

    def run(dataset: str, min_bytes: int) -> list[dict[str, Any]]:
        monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", min_bytes)
        with source.open("rb") as src:
            result = service.ingest(src, IngestRequest(dataset=dataset, source="cli", sealed=False,
                                                       source_name="big.jsonl"), policy=policy)
        report = {k: v for k, v in result.report.items() if k not in ("dataset", "duration_s")}
        return [report, *service.vault.open(dataset).records()]

    pooled = run("pooled", 1)
    assert _children_alive() == []  # the workers are gone once the ingestion returns
    assert len(submitted) > 5
    alone = run("alone", 1 << 62)
    assert len(submitted) == len(set(submitted))
    assert pooled == alone
    assert pooled[0]["records_refused"] == [{"line": 1501, "reason": pooled[0]["records_refused"][0]["reason"]}]
    assert pooled[0]["records_dropped"] > 10 and pooled[0]["redactions"]["email"] > 100


def test_refused_pool_ingestion_leaves_no_worker(service: IngestService, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(6)
    source = tmp_path / "bad.jsonl"
    source.write_text("\n".join([_line(rng, i) for i in range(3000)] + ["{broken"]) + "\n")
    monkeypatch.setattr(parallel, "BLOCK_BYTES", 64 * 1024)
    monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 1)
    monkeypatch.setattr("garrison.ingest.pipeline.worker_count", lambda: 2)
    with source.open("rb") as src, pytest.raises(IngestRefused) as refused:
        service.ingest(src, IngestRequest(dataset="bad", source="cli", sealed=False, source_name="bad.jsonl"))
    assert refused.value.code == "bad_lines"
    assert _children_alive() == []
    assert service.catalog.query("SELECT * FROM dataset_versions") == []


def test_pool_is_closed_when_the_redactor_cannot_be_built(service: IngestService, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "x.jsonl"
    source.write_text(BOTH + "\n")
    monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 1)
    monkeypatch.setattr("garrison.ingest.pipeline.worker_count", lambda: 2)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("no redactor")

    monkeypatch.setattr("garrison.ingest.pipeline.Redactor", broken)
    with source.open("rb") as src, pytest.raises(RuntimeError, match="no redactor"):
        service.ingest(src, IngestRequest(dataset="x", source="cli", sealed=False, source_name="x.jsonl"))
    assert _children_alive() == []


def test_stream_of_unknown_size_stays_in_process(service: IngestService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 1)
    started: list[int] = []
    monkeypatch.setattr(parallel.RedactionPool, "__init__", lambda self, *a: started.append(1))
    result = service.ingest(io.BytesIO((BOTH + "\n").encode() * 10),
                            IngestRequest(dataset="s", source="cli", sealed=False, source_name="s.jsonl"))
    assert result.version.record_count == 10 and started == []


def test_stream_with_a_declared_size_uses_the_pool(service: IngestService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 1000)
    monkeypatch.setattr("garrison.ingest.pipeline.worker_count", lambda: 2)
    started: list[int] = []
    real_init = parallel.RedactionPool.__init__

    def init(self: parallel.RedactionPool, workers: int, *args: Any) -> None:
        started.append(workers)
        real_init(self, workers, *args)

    monkeypatch.setattr(parallel.RedactionPool, "__init__", init)
    data = (BOTH + "\n").encode() * 100
    for declared, pooled in ((len(data), True), (999, False), (None, False)):
        started.clear()
        result = service.ingest(io.BytesIO(data), IngestRequest(dataset=f"d{declared}", source="upload", sealed=False,
                                                                source_name="s.jsonl", declared_bytes=declared))
        assert (result.version.record_count, _children_alive()) == (100, [])
        assert started == ([2] if pooled else [])


_POOL_DRIVER = """
import sys
from garrison.config import load_config
from garrison.ingest import parallel, pipeline
from garrison.ingest.pipeline import IngestRequest, IngestService
from garrison.paths import StateLayout
from garrison.store.catalog import Catalog

if __name__ == "__main__":  # spawned workers re-run this script: they must not ingest too
    parallel.PARALLEL_MIN_BYTES = 1
    parallel.BLOCK_BYTES = 16 * 1024
    pipeline.worker_count = lambda: 2
    config = load_config()
    layout = StateLayout(config.state_path)
    layout.ensure()
    service = IngestService(config, Catalog(layout.catalog))
    with open(sys.argv[1], "rb") as src:
        service.ingest(src, IngestRequest(dataset="big", source="cli", sealed=False, source_name="big.jsonl"),
                       progress=lambda n: print("read", n, flush=True))
    print("done", flush=True)
"""


def test_kill_9_of_the_parent_ends_its_workers(service: IngestService, env: dict[str, str], tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    rng = random.Random(8)
    source = tmp_path / "big.jsonl"
    source.write_text("\n".join(_line(rng, i) for i in range(40000)) + "\n")
    script = tmp_path / "driver.py"
    script.write_text(_POOL_DRIVER)
    proc = subprocess.Popen([sys.executable, str(script), str(source)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **env})
    assert proc.stdout is not None
    workers: list[psutil.Process] = []
    deadline = time.monotonic() + 60
    while len(workers) < 2 and time.monotonic() < deadline:  # reading, with both workers started
        line = proc.stdout.readline()
        assert line.startswith("read "), (line, proc.stderr.read() if proc.stderr else "")
        workers = [p for p in psutil.Process(proc.pid).children() if "resource_tracker" not in " ".join(p.cmdline())]
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == [], "a redaction worker outlived its parent"
    assert service.catalog.query("SELECT * FROM dataset_versions") == []


@pytest.mark.parametrize("pooled", [False, True])
def test_a_file_to_refuse_is_only_checked_after_its_first_bad_line(service: IngestService, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   pooled: bool) -> None:
    rng = random.Random(9)
    lines = [_line(rng, i) for i in range(3000)]
    for k in (100, 1700, 2900):
        lines[k] = "{broken"
    lines[2000] = '{"text": "a text record in a chat file"}'
    source = tmp_path / "bad.jsonl"
    source.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(parallel, "BLOCK_BYTES", 16 * 1024)
    if pooled:
        monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", 1)
        pool_blocks(monkeypatch)
    redacted: list[int] = []
    real = RecordRedactor.chat_segment

    def chat_segment(self: RecordRedactor, data: bytes) -> Segment | None:
        redacted.append(len(data))
        return real(self, data)

    monkeypatch.setattr(RecordRedactor, "chat_segment", chat_segment)
    with source.open("rb") as src, pytest.raises(IngestRefused) as refused:
        service.ingest(src, IngestRequest(dataset="bad", source="cli", sealed=False, source_name="bad.jsonl"))
    report = refused.value.details["report"]
    assert [r["line"] for r in report["records_refused"]] == [101, 1701, 2001, 2901]
    assert report["records_refused"][2]["reason"] == "a text record in a chat file"
    assert report["records_refused_count"] == 4 and report["records_accepted"] == 0
    blocks = source.stat().st_size // (16 * 1024)
    assert 0 < len(redacted) <= 3 < blocks  # in this process: the blocks up to the first bad line, not the rest
    assert service.catalog.query("SELECT * FROM dataset_versions") == [] and _children_alive() == []
