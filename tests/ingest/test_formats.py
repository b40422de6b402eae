"""Record formats: streaming parsers, validation with line numbers and reasons, detection, CSV mapping."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from garrison.errors import InvalidRequest
from garrison.ingest import formats
from garrison.ingest.formats import BadLine, FormatError, Parser, Record, detect_format, parse_columns

SECRET_VALUE = "ZEBRA-CANARY-314159"


def run(data: bytes | str, fmt: str = "auto", name: str = "", columns: dict[str, str] | None = None
        ) -> tuple[Parser, list[Record], list[BadLine]]:
    raw = data.encode() if isinstance(data, str) else data
    parser = Parser(io.BufferedReader(io.BytesIO(raw)), fmt, name_hint=name, columns=columns)
    items = list(parser)
    return parser, [i for i in items if isinstance(i, Record)], [i for i in items if isinstance(i, BadLine)]


def jl(*objs: Any) -> str:
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs)


CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}]}


def test_chat_with_bad_lines_reported_by_line_number() -> None:
    data = jl(CHAT, "", "{not json", [1, 2], {"messages": []}, {"messages": [{"role": "user", "content": "q"}]},
              {"messages": [{"role": "wizard", "content": SECRET_VALUE}, {"role": "assistant", "content": "a"}]},
              {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
              {"prompt": "p", "completion": "c"},
              {"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                            {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
              CHAT)
    parser, good, bad = run(data)
    assert parser.container == "jsonl" and parser.format == "chat"
    assert [r.line for r in good] == [1, 10, 11]
    assert [(b.line, b.reason.split(" ")[0]) for b in bad] == [
        (3, "not"), (4, "a"), (5, "messages"), (6, "no"), (7, "messages[0].role"), (8, "messages[0].content"),
        (9, "a")]
    assert "completion record in a chat file" in bad[-1].reason
    assert all(SECRET_VALUE not in b.reason for b in bad), "reasons must not quote the data"


def test_completion_and_text_and_crlf_bom() -> None:
    parser, good, bad = run("\ufeff" + jl({"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": ""},
                                          {"prompt": 1, "completion": "c"}).replace("\n", "\r\n"))
    assert parser.format == "completion" and [r.line for r in good] == [1] and [b.line for b in bad] == [2, 3]
    assert good[0].value == {"prompt": "p", "completion": "c"}
    parser, good, bad = run(jl({"text": "a"}, {"text": "  "}, {"other": 1}), fmt="text")
    assert parser.format == "text" and len(good) == 1 and [b.line for b in bad] == [2, 3]


def test_fixed_kind_refuses_other_kinds() -> None:
    _, good, bad = run(jl({"text": "a"}, CHAT), fmt="chat")
    assert [r.line for r in good] == [2] and bad[0].line == 1 and "text record in a chat file" in bad[0].reason


def test_invalid_utf8_and_overlong_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(formats, "MAX_RECORD_BYTES", 100)
    data = jl({"text": "ok"}).encode() + b'{"text": "\xff\xfe"}\n' + b'{"text": "' + b"z" * 500 + b'"}\n' \
        + jl({"text": "after"}).encode()
    _, good, bad = run(data, fmt="text")
    assert [r.value["text"] for r in good] == ["ok", "after"]
    assert [(b.line, b.reason) for b in bad] == [(2, "not valid UTF-8"), (3, "line longer than 100 bytes")]


@pytest.mark.parametrize(("name", "head", "expected"), [
    ("data.csv.age", b"", "csv"), ("notes.txt", b"{", "plain"), ("x.md.age", b"", "plain"),
    ("x.jsonl.age", b"", "jsonl"), ("blob.age", b"  \n{\"text\"", "jsonl"), ("blob", b"Dear team", "plain"),
])
def test_detect_format(name: str, head: bytes, expected: str) -> None:
    assert detect_format("auto", name, head) == expected


def test_unknown_format_refused() -> None:
    with pytest.raises(InvalidRequest) as info:
        detect_format("xml", "", b"")
    assert info.value.code == "invalid_format"


def test_csv_mapping_multiline_and_bad_rows() -> None:
    data = ('question,answer,extra\r\n"What is\r\nthe vault?",Encrypted storage,1\r\nshort row\r\n'
            ',empty question is fine,2\r\nQ,,3\r\n\r\nlast,one,4\r\n')
    parser, good, bad = run(data, name="faq.csv", columns={"prompt": "question", "completion": "answer"})
    assert parser.container == "csv" and parser.format == "completion"
    assert [(r.line, r.value) for r in good] == [
        (2, {"prompt": "What is\r\nthe vault?", "completion": "Encrypted storage"}),
        (5, {"prompt": "", "completion": "empty question is fine"}), (8, {"prompt": "last", "completion": "one"})]
    assert [(b.line, b.reason) for b in bad] == [(4, "1 fields where the header has 3"),
                                                  (6, "completion must be a non-empty string")]


def test_csv_default_columns_and_chat_mapping() -> None:
    parser, good, _ = run("text,id\nhello,1\n", fmt="csv")
    assert parser.format == "text" and good[0].value == {"text": "hello"}
    parser, good, bad = run("sys,q,a\nbe brief,hi,hello\n,hi,\n", fmt="csv",
                            columns=parse_columns("system=sys,user=q,assistant=a"))
    assert parser.format == "chat"
    assert good[0].value == {"messages": [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "hello"}]}
    assert bad[0].line == 3


def test_csv_whole_file_errors() -> None:
    with pytest.raises(FormatError) as info:
        run("a,b\n1,2\n", fmt="csv")
    assert info.value.code == "csv_no_mapping"
    with pytest.raises(FormatError) as info:
        run("a,b\n1,2\n", fmt="csv", columns={"text": "c"})
    assert info.value.code == "csv_missing_column"
    with pytest.raises(FormatError) as info:
        run(b"text\nok\n\xff\xfe\n", fmt="csv")
    assert info.value.code == "invalid_encoding"


@pytest.mark.parametrize("bad", ["prompt", "nope=x", "prompt=q", "user=q", "text=t,prompt=p,completion=c", "text="])
def test_parse_columns_refuses(bad: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_columns(bad)
    assert info.value.code == "invalid_columns"


def test_columns_only_for_csv() -> None:
    with pytest.raises(InvalidRequest):
        run(jl({"text": "a"}), columns={"text": "a"})


def test_plain_text_paragraphs(monkeypatch: pytest.MonkeyPatch) -> None:
    data = "First para\nstill first\n\n\nSecond\n \nThird \xe9\n"
    parser, good, bad = run(data, name="notes.txt")
    assert parser.container == "plain" and parser.format == "text" and not bad
    assert [(r.line, r.value["text"]) for r in good] == [(1, "First para\nstill first"), (5, "Second"),
                                                          (7, "Third \xe9")]
    monkeypatch.setattr(formats, "MAX_RECORD_BYTES", 30)
    _, good, bad = run("a\n" * 20 + "\nok\n", fmt="plain")
    assert [r.value["text"] for r in good] == ["ok"] and bad[0].line == 1 and "paragraph longer" in bad[0].reason


def test_streaming_does_not_read_ahead_unboundedly() -> None:
    """The parser pulls lines as it is iterated: the first record arrives before the stream is consumed."""

    class Counting(io.RawIOBase):
        def __init__(self, lines: int) -> None:
            self.data = io.BytesIO(jl(*({"text": f"line {i}"} for i in range(lines))).encode())
            self.read_bytes = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            n = self.data.readinto(b)
            self.read_bytes += n
            return n

    source = Counting(200_000)
    iterator = iter(Parser(io.BufferedReader(source, 65536), "text"))
    first = next(iterator)
    assert isinstance(first, Record) and first.value == {"text": "line 0"}
    assert source.read_bytes <= 2 * 65536 < len(source.data.getvalue())


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    [{"content": "q", "role": "user"}, {"content": "a", "role": "assistant"}],
    [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}],
    [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}],
    [{"role": "user", "content": "q"}, {"role": 1, "content": "a"}],
    [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [{}]}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "text": "a"}],
    [{"role": "user", "content": [{"type": "text", "text": "q"}]}, {"role": "assistant", "content": "a"}],
    [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "a"}],
    [["user", "q"], {"role": "assistant", "content": "a"}],
    [], {"role": "assistant", "content": "a"}, None,
    [{"role": "assistant", "content": "a"}] * (formats.MAX_MESSAGES + 1),
])
def test_chat_quick_check_agrees_with_the_full_check(messages: Any) -> None:
    assert formats._check_chat({"messages": messages}) == formats._check_chat_fully(messages)
