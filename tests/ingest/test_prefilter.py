"""The native prefilter and the block-parallel path: both must change speed, never results."""

from __future__ import annotations

import io
import json
import re
import re._parser as re_parser
from typing import Any

import pytest
from pii_corpus import generate

from garrison.ingest import formats, parallel
from garrison.ingest import pii_prefilter as prefilter_module
from garrison.ingest.formats import BadLine, Parser, block_lines, raw_blocks
from garrison.ingest.parallel import RecordRedactor, RedactionPool, Segment, jsonl_segments, segments
from garrison.ingest.pii import Redactor
from garrison.ingest.pii_prefilter import FOLD_EXTRAS, Prefilter, translate
from garrison.ingest.policy import RedactionPolicy

KEY = b"k" * 32
POLICY: dict[str, Any] = {
    "actions": {"email": "hash", "phone": "mask"},
    "patterns": {"employee_id": {"regex": r"(?<![A-Z])EMP-(?P<value>\d{6})\b", "action": "tag"},
                 "ticket": {"regex": r"(?i)\bT\d{3,}(?=\W|$)"}},
    "word_lists": {"codenames": {"words": ["Project Falcon", "Nightjar", "Müller", "张伟"], "action": "hash"}},
}


def test_ignorecase_extras_are_exactly_the_non_ascii_folds_of_ascii() -> None:
    everything = "".join(chr(c) for c in range(0x80, 0x110000) if not 0xD800 <= c <= 0xDFFF)
    found = {ord(m.group()) for m in re.finditer("[\x00-\x7f]", everything, re.IGNORECASE)}
    assert found == set(FOLD_EXTRAS)


@pytest.mark.parametrize("policy", [None, POLICY])
def test_prefiltered_find_equals_exhaustive_find_on_the_labelled_corpus(policy: dict[str, Any] | None) -> None:
    redactor = Redactor(RedactionPolicy.from_dict(policy), KEY)
    texts = [r.text for r in generate(3000, seed=20240506)]
    texts += ["EMP-123456 met nightjar and PROJECT  falcon", "张伟的邮箱 zw@example.cn", "Herr MÜLLER", "t1234 T99"]
    assert not redactor._prefilter.always, "every built-in and policy row should compile"
    batched = redactor.find_many(texts)
    for text, spans in zip(texts, batched, strict=True):
        assert spans == redactor.find_exhaustive(text), text
    assert [redactor.redact(t) for t in texts[:300]] == [
        redactor._apply(t, redactor.find_exhaustive(t)) for t in texts[:300]]


def test_unicode_and_surrogates_reach_the_exact_pass() -> None:
    redactor = Redactor(RedactionPolicy.from_dict(POLICY), KEY)
    texts = ["\ud800 mail a@b.example \udfff", "ＥＭＰ-١٢٣٤٥٦", "emp-123456", "ｂｏｂ@example.com"]
    for text, spans in zip(texts, redactor.find_many(texts), strict=True):
        assert spans == redactor.find_exhaustive(text)


def test_untranslatable_or_empty_patterns_always_run() -> None:
    pf = Prefilter([re.compile(r"(?<=a)\b"), re.compile(r"x+")])
    assert pf.always == frozenset({0})
    assert pf.flags(["zzz", "axx"]) == [frozenset({0}), frozenset({0, 1})]
    assert "(?" not in translate(re.compile(r"(?i)(?<!q)ab(?=c)")).replace("(?:", "")


# ------------------------------------------------------------------------- blocks and workers

def _jsonl(n: int) -> bytes:
    lines = []
    for i in range(n):
        if i % 97 == 5:
            lines.append("{not json")
        elif i % 131 == 7:
            lines.append("")
        elif i % 53 == 3:
            lines.append(json.dumps({"messages": [{"role": "user", "content": f"drop me DROPME {i}"},
                                                  {"role": "assistant", "content": "ok"}]}))
        else:
            lines.append(json.dumps({"messages": [{"content": f"mail u{i}@example.com card 4111 1111 1111 1111",
                                                   "role": "user"},
                                                  {"role": "assistant", "content": f"call +44 20 7946 {i % 9999:04d}",
                                                   "weight": 1}], "meta": {"n": i, "x": 0.5 if i % 7 else 1e-05}}))
    return ("\ufeff" + "\r\n".join(lines) + "\n").encode()


def _policy() -> RedactionPolicy:
    return RedactionPolicy.from_dict({"patterns": {"marker": {"regex": "DROPME", "action": "drop"}}})


def _flatten(segs: list[Segment | BadLine]) -> tuple[bytes, list[BadLine], dict[str, int], int, int]:
    data = b"".join(s.data for s in segs if isinstance(s, Segment))
    bad = [s for s in segs if isinstance(s, BadLine)]
    counts: dict[str, int] = {}
    for s in segs:
        if isinstance(s, Segment):
            for k, v in s.counts.items():
                counts[k] = counts.get(k, 0) + v
    return (data, bad, counts, sum(s.count for s in segs if isinstance(s, Segment)),
            sum(s.dropped for s in segs if isinstance(s, Segment)))


def test_raw_blocks_number_lines_as_the_line_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(formats, "MAX_RECORD_BYTES", 300)
    data = _jsonl(400) + b"x" * 1000 + b"\n" + b'{"text": "tail"}' + b"y" * 700
    expected = list(formats._lines(io.BufferedReader(io.BytesIO(data))))
    got: list[tuple[int, bytes | None]] = []
    for first, block in raw_blocks(io.BufferedReader(io.BytesIO(data)), 2000):
        got += [(first, None)] if block is None else block_lines(first, block)[0]
    assert [x for x in got if x[1] != b""] == [x for x in expected if x[1] != b""]


def test_jsonl_segments_equal_sequential(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _jsonl(3000)
    policy = _policy()
    sequential = list(segments(Parser(io.BufferedReader(io.BytesIO(data)), "jsonl"),
                               RecordRedactor(Redactor(policy, KEY))))
    monkeypatch.setattr(parallel, "BLOCK_BYTES", 16 * 1024)  # many blocks, bad lines on both sides of cuts
    state: dict[str, str] = {}
    stream = io.BufferedReader(io.BytesIO(data))
    pool = RedactionPool(2, policy, KEY)
    got = list(jsonl_segments(stream, None, state, RecordRedactor(Redactor(policy, KEY)), pool))
    assert state["format"] == "chat"
    seq, par = _flatten(sequential), _flatten(got)
    assert par == seq
    assert seq[3] > 2000 and seq[4] > 20 and len(seq[1]) > 20 and seq[2]["email"] > 2000


# ------------------------------------------------------------------------- the plain chat fast path

def _chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"messages": list(messages), **extra}


def _mixed_records() -> list[dict[str, Any]]:
    u, a = "user", "assistant"
    return [
        _chat({"role": u, "content": "mail bob@example.com"}, {"role": a, "content": "noted"}),
        _chat({"role": u, "content": "nothing here"}, {"role": a, "content": "fine"}),
        _chat({"content": "nothing here", "role": u}, {"role": a, "content": "fine"}),  # role not first
        _chat({"role": u, "content": "T1234 and EMP-123456"}, {"content": "call +44 20 7946 0018", "role": a}),
        # dropped at the second message: the first is counted, the third is not
        _chat({"role": u, "content": "a@b.example"}, {"role": a, "content": "x DROPME y a@b.example"},
              {"role": u, "content": "call +44 20 7946 0018"}, {"role": a, "content": "ok"}),
        _chat({"role": u, "content": "DROPME first"}, {"role": a, "content": "mail z@example.com"}),
        _chat({"role": u, "content": "Project  Falcon and Müller, 张伟。"}, {"role": a, "content": "naïve é x"}),
        _chat({"role": u, "content": "mail c@example.com"}, {"role": a, "content": "ok"}, meta={"n": 1, "x": 1e-05}),
        {"meta": "first c@example.com", "messages": [{"role": u, "content": "x"}, {"role": a, "content": "y"}]},
        _chat({"role": u, "content": [{"type": "text", "text": "parts d@example.com"}]},
              {"role": a, "content": None, "tool_calls": [{"id": "1", "function": {"arguments": "e@example.com"}}]},
              {"role": "tool", "content": "card 4111 1111 1111 1111", "tool_call_id": "1"},
              {"role": a, "content": "done"}),
        _chat({"role": u, "content": "f@example.com", "weight": 0}, {"role": a, "content": "ok", "weight": 1}),
        _chat({"role": u, "content": 5}, {"role": a, "content": "g@example.com"}),
        _chat({"role": 3, "content": "h@example.com"}, {"role": a, "content": "ok"}),
        _chat(),
        {"messages": "i@example.com"},
        {"text": "j@example.com DROPME"},
        {"prompt": "k@example.com", "completion": "call +44 20 7946 0018"},
    ]


def test_chat_fast_path_gives_the_generic_bytes_and_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = RedactionPolicy.from_dict({**POLICY, "patterns": {**POLICY["patterns"],
                                                               "marker": {"regex": "DROPME", "action": "drop"}}})
    records = _mixed_records() * 3
    fast = RecordRedactor(Redactor(policy, KEY))
    fast_lines = [fast.encode_batch([r]) for r in records] + [fast.encode_batch(records)]
    fast_segment = fast.segment(records)

    taken: list[bool] = []
    real = parallel._chat_contents

    def generic(record: dict[str, Any], out: list[str]) -> bool:
        taken.append(real(record, []))
        return False

    monkeypatch.setattr(parallel, "_chat_contents", generic)
    slow = RecordRedactor(Redactor(policy, KEY))
    slow_lines = [slow.encode_batch([r]) for r in records] + [slow.encode_batch(records)]
    slow_segment = slow.segment(records)

    assert fast_lines == slow_lines
    assert fast_segment == slow_segment
    assert list(fast.counts.items()) == list(slow.counts.items())
    assert list(fast_segment.counts.items()) == list(slow_segment.counts.items())
    assert 0 < sum(taken) < len(taken)  # both paths were exercised
    assert fast_segment.dropped == 3 * 3 and fast.counts["marker"] > 0 and fast.counts["email"] > 0
    clean = records[1]
    assert fast._rebuild_chat(clean, [None, None]) is clean  # nothing found, canonical: not copied


@pytest.mark.parametrize("odd", ["", "é", "张", "\ud800", "\udfff\ud800"])
def test_batch_offsets_name_the_right_text(odd: str) -> None:
    redactor = Redactor(RedactionPolicy.from_dict(POLICY), KEY)
    texts = ["a@b.example", "", "x", "call +44 20 7946 0018", f"{odd}T1234", "none", f"c@d.example{odd}",
             "EMP-123456", "Nightjar", "\n", "4111 1111 1111 1111"] * 3
    assert redactor.find_many(texts) == [redactor.find_exhaustive(t) for t in texts]


# ------------------------------------------------------------------------- shortest finish, export

def test_a_value_is_reported_once_not_once_per_possible_end() -> None:
    """The translation keeps only the shortest finish of a pattern: a phone number, a card or an
    address is one match report, whatever its length (the reports are Python callbacks)."""
    redactor = Redactor(None, KEY)
    pf = redactor.prefilter
    texts = ["call +44 20 7946 0018 now", "card 4111 1111 1111 1111", "mail someone.long@mail.example.com",
             "call +1 (415) 555-0132"]
    reports: list[int] = []
    pf._db.scan("\n".join(texts).encode(), match_event_handler=lambda row, *a: reports.append(row))
    assert len(reports) <= len(texts) + 1  # the address twice: after "@mail.ex" and after "@mail.example.co"
    assert redactor.find_many(texts) == [redactor.find_exhaustive(t) for t in texts]
    for pattern, width in ((r"ab+c?(?:de|f{2,9})?", (2, 2)), (r"x(?:yz){3,}", (7, 7)), (r"(a|bc*)", (1, 1)),
                           (r"\d{3}[ -]?\d{2,4}(?=\D)", (5, 6))):
        tail = re.sub(r"\\x\{([0-9a-f]+)\}", lambda m: f"\\U{int(m.group(1), 16):08x}", translate(re.compile(pattern)))
        assert re_parser.parse(tail).getwidth() == width, (pattern, tail)


def test_exported_prefilter_is_the_one_a_worker_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    redactor = Redactor(RedactionPolicy.from_dict(POLICY), KEY)
    exported = redactor.prefilter.export()
    monkeypatch.setattr(prefilter_module, "_DATABASES", {})
    monkeypatch.setattr(prefilter_module, "_compile", lambda expressions: pytest.fail("compiled again"))
    Prefilter.preload(exported)
    again = Redactor(RedactionPolicy.from_dict(POLICY), KEY)
    texts = [r.text for r in generate(300, seed=3)]
    assert again.find_many(texts) == redactor.find_many(texts)


def test_saved_database_spares_the_next_process_a_compilation(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    patterns = [det.pattern for det in Redactor(RedactionPolicy.from_dict(POLICY), KEY).detectors]
    texts = [r.text for r in generate(300, seed=4)]
    monkeypatch.setattr(prefilter_module, "_DATABASES", {})
    first = Prefilter(patterns, saved=tmp_path)
    (saved,) = tmp_path.iterdir()
    assert saved.suffix == ".hsdb" and saved.stat().st_mode & 0o777 == 0o600
    real_compile = prefilter_module._compile
    monkeypatch.setattr(prefilter_module, "_DATABASES", {})  # a new process: nothing in memory
    monkeypatch.setattr(prefilter_module, "_compile", lambda expressions: pytest.fail("compiled again"))
    assert Prefilter(patterns, saved=tmp_path).flags(texts) == first.flags(texts)
    # A damaged file (or one from another Hyperscan build) is compiled again and replaced.
    saved.write_bytes(saved.read_bytes()[:-100])
    monkeypatch.setattr(prefilter_module, "_DATABASES", {})
    monkeypatch.setattr(prefilter_module, "_compile", real_compile)
    assert Prefilter(patterns, saved=tmp_path).flags(texts) == first.flags(texts)
    monkeypatch.setattr(prefilter_module, "_DATABASES", {})
    monkeypatch.setattr(prefilter_module, "_compile", lambda expressions: pytest.fail("compiled again"))
    assert Prefilter(patterns, saved=tmp_path).flags(texts) == first.flags(texts)
    # Another pattern set has its own file.
    monkeypatch.setattr(prefilter_module, "_compile", real_compile)
    Prefilter(patterns[:3], saved=tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
