"""Record formats: streaming parsers that turn a plaintext byte stream into validated records.

Formats (ARCHITECTURE.md, "Data formats"):

- `chat`: JSONL of `{"messages": [{"role", "content"}, ...]}`, OpenAI's fine-tuning format (at least
  one assistant message; content a string, a list of text parts, or null beside tool calls);
- `completion`: JSONL of `{"prompt", "completion"}`;
- `text`: JSONL of `{"text"}`;
- `jsonl`: any one of the three, decided by the first valid record (every later record must match);
- `csv`: a header row and a column mapping onto `prompt`/`completion`, `text`, or
  `system`/`user`/`assistant` (a chat turn); without a mapping, columns named so are used;
- `plain`: UTF-8 text, one record per paragraph (blank lines separate records);
- `auto`: by the file name (`.csv`, `.txt`/`.md`, `.jsonl`/`.json`, an outer `.age` ignored), else by
  the first byte (`{`: jsonl, otherwise plain).

A parser yields `Record(line, value)` or `BadLine(line, reason)` in file order; line numbers are
1-based physical lines (for CSV and plain text, the line a record starts on). Reasons describe
what is wrong without quoting the data, because they end up in reports, logs and the catalog,
where no record content may go. Problems that make the rest of the file unreadable (a CSV header
without the mapped columns, undecodable CSV bytes) raise `FormatError` instead: the file is refused
whatever the policy. Memory per record is bounded by `MAX_RECORD_BYTES`.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from garrison.errors import InvalidRequest
from garrison.ingest.records import MAX_MESSAGES, ROLES

__all__ = [
    "FORMATS",
    "JSONL_KINDS",
    "MAX_RECORD_BYTES",
    "BadLine",
    "FormatError",
    "Record",
    "block_lines",
    "detect_format",
    "jsonl_items",
    "parse",
    "parse_columns",
    "raw_blocks",
]

FORMATS = ("auto", "jsonl", "chat", "completion", "text", "csv", "plain")
JSONL_KINDS = ("chat", "completion", "text")
MAX_RECORD_BYTES = 8 * 1024 * 1024
CHAT_ROLES = ROLES
CSV_TARGETS = ("prompt", "completion", "text", "system", "user", "assistant")
_PEEK = 64 * 1024


class FormatError(InvalidRequest):
    """The file as a whole cannot be read in its format: refused whatever `on_bad_lines` says."""

    code = "invalid_format"


@dataclass(frozen=True)
class Record:
    line: int
    value: dict[str, Any]


@dataclass(frozen=True)
class BadLine:
    line: int
    reason: str


Item = Record | BadLine


def parse_columns(text: str | Mapping[str, str] | None) -> dict[str, str] | None:
    """`prompt=question,completion=answer` (or a mapping) -> a validated CSV column mapping."""
    if text is None or text == "":
        return None
    pairs: dict[str, str] = {}
    if isinstance(text, Mapping):
        items = list(text.items())
    else:
        items = []
        for part in str(text).split(","):
            target, sep, column = part.partition("=")
            if not sep:
                raise InvalidRequest(f"column mapping entry {part.strip()[:60]!r} is not TARGET=COLUMN",
                                     code="invalid_columns", param="columns")
            items.append((target, column))
    for target, column in items:
        target = str(target).strip()
        if target not in CSV_TARGETS:
            raise InvalidRequest(f"unknown column mapping target {target[:40]!r}; targets are {', '.join(CSV_TARGETS)}",
                                 code="invalid_columns", param="columns")
        if not isinstance(column, str) or not column.strip():
            raise InvalidRequest(f"column mapping for {target!r} names no column", code="invalid_columns",
                                 param="columns")
        pairs[target] = column.strip()
    _csv_kind(pairs)
    return pairs


def _csv_kind(mapping: Mapping[str, str]) -> str:
    keys = set(mapping)
    if keys & {"user", "assistant", "system"}:
        if not {"user", "assistant"} <= keys or keys & {"prompt", "completion", "text"}:
            raise InvalidRequest("a chat column mapping needs user and assistant (system optional) and nothing else",
                                 code="invalid_columns", param="columns")
        return "chat"
    if keys & {"prompt", "completion"}:
        if keys != {"prompt", "completion"}:
            raise InvalidRequest("a completion column mapping needs exactly prompt and completion",
                                 code="invalid_columns", param="columns")
        return "completion"
    if keys == {"text"}:
        return "text"
    raise InvalidRequest("the column mapping must name prompt+completion, text, or user+assistant(+system)",
                         code="invalid_columns", param="columns")


def detect_format(fmt: str, name_hint: str, head: bytes) -> str:
    """Resolve `auto` by file name, then by the first non-blank byte; other formats pass through."""
    if fmt not in FORMATS:
        raise InvalidRequest(f"unknown format {fmt[:40]!r}; formats are {', '.join(FORMATS)}", code="invalid_format",
                             param="format")
    if fmt != "auto":
        return fmt
    name = name_hint.lower()
    for suffix in (".age", ".asc"):
        name = name.removesuffix(suffix)
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".txt", ".text", ".md")):
        return "plain"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    return "jsonl" if stripped.startswith(b"{") else "plain"


# -- physical lines --------------------------------------------------------------------------------


# Read a bounded piece at a time (a BufferedReader's read1 is at most one raw read): the parser
# streams, it does not read ahead of the records it has handed out by more than this.
_BLOCK = 64 * 1024
_BOM = b"\xef\xbb\xbf"
# orjson reads integers beyond 64 bits as floats, where json gives ints; a block with a run of 19
# digits anywhere has its lines parsed by json (the table maps digits to "0", the rest to " ").
_DIGITS_ONLY = bytes(48 if 48 <= b <= 57 else 32 for b in range(256))
_LONG_NUMBER = b"0" * 19
# json refuses nesting deeper than the interpreter's recursion limit allows (it depends on the
# caller's stack), orjson at 1024; lines that could be that deep are parsed by json alone.
_DEEP_CANDIDATE_BYTES = 1024
_DEEP_BRACKETS = 512
# JSON may escape half of a UTF-16 surrogate pair alone ("\ud800"); json reads it into a str that
# no UTF-8 encoder accepts, so such a line is refused (orjson refuses it first; json is asked only then).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

Lines = list[tuple[int, bytes | None]]


def _line_blocks(stream: io.BufferedIOBase) -> Iterator[tuple[Lines, bool]]:
    """Physical lines a block at a time: ([(line number, bytes without the newline) or (n, None) for a line
    over MAX_RECORD_BYTES, skipped], whether the block holds a run of 19 digits)."""
    number = 0
    rest = b""
    skipping = False
    read = getattr(stream, "read1", stream.read)
    while True:
        block = read(_BLOCK)
        if not block:
            break
        if skipping:  # the rest of an over-long line, a bounded piece at a time
            cut = block.find(b"\n")
            if cut < 0:
                continue
            block = block[cut + 1:]
            skipping = False
        data = rest + block if rest else block
        pieces = data.split(b"\n")
        rest = pieces.pop()
        out: Lines = []
        for raw in pieces:
            number += 1
            if len(raw) > MAX_RECORD_BYTES:
                out.append((number, None))
                continue
            if number == 1 and raw.startswith(_BOM):
                raw = raw[3:]
            out.append((number, raw.rstrip(b"\r")))
        if len(rest) > MAX_RECORD_BYTES:
            number += 1
            out.append((number, None))
            rest = b""
            skipping = True
        if out:
            yield out, _LONG_NUMBER in data.translate(_DIGITS_ONLY)
    if rest:
        number += 1
        if number == 1 and rest.startswith(_BOM):
            rest = rest[3:]
        yield [(number, rest.rstrip(b"\r"))], _LONG_NUMBER in rest.translate(_DIGITS_ONLY)


def _lines(stream: io.BufferedIOBase) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes without the newline), or (n, None) for a line over MAX_RECORD_BYTES (skipped)."""
    for lines, _ in _line_blocks(stream):
        yield from lines


def _text(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


# -- JSONL -----------------------------------------------------------------------------------------


def _kind_of(obj: dict[str, Any]) -> str | None:
    if "messages" in obj:
        return "chat"
    if "prompt" in obj or "completion" in obj:
        return "completion"
    if "text" in obj:
        return "text"
    return None


def _check_content(content: Any, i: int) -> str | None:
    if isinstance(content, str):
        return None
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                return f"messages[{i}].content parts must be {{\"type\": \"text\", \"text\": string}}"
        return None
    return f"messages[{i}].content must be a string or a list of text parts"


def _lone_surrogate(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_chat(obj: dict[str, Any]) -> str | None:
    # Nearly every message is exactly {"role", "content": string}: those records are accepted in one
    # cheap pass; anything else (or a record this pass cannot accept) gets the full check and its reason.
    messages = obj.get("messages")
    if type(messages) is list and 0 < len(messages) <= MAX_MESSAGES:
        assistant = False
        roles = CHAT_ROLES
        for message in messages:
            if type(message) is not dict or len(message) != 2:
                break
            role = message.get("role")
            if type(message.get("content")) is not str or type(role) is not str or role not in roles:
                break
            if role == "assistant":
                assistant = True
        else:
            if assistant:
                return None
    return _check_chat_fully(messages)


def _check_chat_fully(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    if len(messages) > MAX_MESSAGES:
        return f"more than {MAX_MESSAGES} messages"
    assistant = False
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] must be an object"
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            return f"messages[{i}].role must be one of {', '.join(sorted(CHAT_ROLES))}"
        content = message.get("content")
        if content is None:
            if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
                assistant = True
                continue
            return f"messages[{i}].content is missing"
        problem = _check_content(content, i)
        if problem:
            return problem
        if "weight" in message and message["weight"] not in (0, 1):
            return f"messages[{i}].weight must be 0 or 1"
        assistant = assistant or role == "assistant"
    if not assistant:
        return "no assistant message (a chat example must show at least one answer)"
    return None


def _check_completion(obj: dict[str, Any]) -> str | None:
    if not isinstance(obj.get("prompt"), str):
        return "prompt must be a string"
    completion = obj.get("completion")
    if not isinstance(completion, str) or not completion:
        return "completion must be a non-empty string"
    return None


def _check_text(obj: dict[str, Any]) -> str | None:
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        return "text must be a non-empty string"
    return None


_CHECKS = {"chat": _check_chat, "completion": _check_completion, "text": _check_text}


def _parse_jsonl(stream: io.BufferedIOBase, kind: str | None, state: dict[str, str]) -> Iterator[Item]:
    for lines, long_numbers in _line_blocks(stream):
        yield from jsonl_items(lines, long_numbers, kind, state)
        kind = state.get("format") or kind


def jsonl_items(lines: Lines, long_numbers: bool, kind: str | None, state: dict[str, str]) -> Iterator[Item]:
    """Records and bad lines of JSONL lines; `kind` None: decided by the first valid record (into state)."""
    # orjson parses ~4x faster than json and agrees with it on every line it accepts, except the
    # cases routed to json here (long digit runs, possibly deep nesting); any line orjson refuses
    # goes through json too, so a refused line gets json's reason, as it always did.
    loads = orjson.loads
    checks = _CHECKS
    for number, raw in lines:
        if raw is None:
            yield BadLine(number, f"line longer than {MAX_RECORD_BYTES} bytes")
            continue
        if not raw or raw.isspace():
            continue
        obj: Any = None
        if not long_numbers and (len(raw) < _DEEP_CANDIDATE_BYTES
                                 or raw.count(b"[") + raw.count(b"{") < _DEEP_BRACKETS):
            try:
                obj = loads(raw)
            except orjson.JSONDecodeError:
                obj = None
        if obj is None:
            text = _text(raw)
            if text is None:
                yield BadLine(number, "not valid UTF-8")
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield BadLine(number, f"not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            except RecursionError:
                yield BadLine(number, "JSON nested too deeply")
                continue
            if _SURROGATE_ESCAPE.search(raw) and _lone_surrogate(obj):
                yield BadLine(number, "a string holds a lone surrogate escape (\\uD800-\\uDFFF unpaired): not Unicode")
                continue
        if not isinstance(obj, dict):
            yield BadLine(number, f"a record must be a JSON object, not {type(obj).__name__}")
            continue
        found = "chat" if "messages" in obj else _kind_of(obj)
        if found is None:
            yield BadLine(number, "unrecognised record: expected 'messages', 'prompt'/'completion' or 'text'")
            continue
        if kind is None:
            kind = found
            state["format"] = kind
        elif found != kind:
            yield BadLine(number, f"a {found} record in a {kind} file")
            continue
        problem = checks[kind](obj)
        if problem:
            yield BadLine(number, problem)
            continue
        yield Record(number, obj)


def raw_blocks(stream: io.BufferedIOBase, size: int) -> Iterator[tuple[int, bytes | None]]:
    """(first line number, about `size` bytes of whole lines without the last newline), or (n, None) for
    a line over MAX_RECORD_BYTES (skipped): the unit of work that is parsed elsewhere (`block_lines`)."""
    number = 0
    rest = b""
    skipping = False
    read = getattr(stream, "read1", stream.read)
    eof = False
    while not eof:
        parts = [rest]
        have = len(rest)
        while True:  # at least one read per round: a carried partial line may already be `size` long
            piece = read(_BLOCK)
            if not piece:
                eof = True
                break
            if skipping:
                cut = piece.find(b"\n")
                if cut < 0:
                    continue
                piece = piece[cut + 1:]
                skipping = False
            parts.append(piece)
            have += len(piece)
            if have >= size:
                break
        data = b"".join(parts)
        cut = (len(data) - 1 if data.endswith(b"\n") else len(data)) if eof else data.rfind(b"\n")
        if cut < 0:
            if len(data) > MAX_RECORD_BYTES:
                number += 1
                yield number, None
                rest, skipping = b"", True
            else:
                rest = data
            continue
        whole, rest = data[:cut], data[cut + 1:]
        first = whole.find(b"\n")
        if (first if first >= 0 else len(whole)) > MAX_RECORD_BYTES:  # only the first line can be that long
            number += 1
            yield number, None
            whole = whole[first + 1:] if first >= 0 else b""
            if not whole:
                continue
        if whole or not eof:
            yield number + 1, whole
            number += whole.count(b"\n") + 1


def block_lines(first: int, data: bytes) -> tuple[Lines, bool]:
    """A `raw_blocks` block as `_line_blocks` gives lines: numbered, BOM off line 1, CR stripped."""
    lines: Lines = []
    number = first
    for raw in data.split(b"\n"):
        if len(raw) > MAX_RECORD_BYTES:
            lines.append((number, None))
            number += 1
            continue
        if number == 1 and raw.startswith(_BOM):
            raw = raw[3:]
        lines.append((number, raw.rstrip(b"\r")))
        number += 1
    return lines, _LONG_NUMBER in data.translate(_DIGITS_ONLY)


# -- CSV -------------------------------------------------------------------------------------------


def _parse_csv(stream: io.BufferedIOBase, columns: Mapping[str, str] | None, state: dict[str, str]) -> Iterator[Item]:
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="strict", newline="")  # type: ignore[type-var]
    csv.field_size_limit(MAX_RECORD_BYTES)
    reader = csv.reader(text)
    try:
        header = next(reader, None)
        if header is None:
            return
        names = [h.strip() for h in header]
        mapping = dict(columns) if columns else {t: t for t in CSV_TARGETS if t in names}
        if not columns and not mapping:
            raise FormatError("the CSV header names none of prompt, completion, text, system, user, assistant: "
                              "give a column mapping (e.g. prompt=question,completion=answer)", code="csv_no_mapping")
        if not columns and ("user" in mapping or "assistant" in mapping):
            mapping = {k: v for k, v in mapping.items() if k in ("system", "user", "assistant")}
        elif not columns and "prompt" in mapping:
            mapping = {k: v for k, v in mapping.items() if k in ("prompt", "completion")}
        kind = _csv_kind(mapping)
        missing = [c for c in mapping.values() if c not in names]
        if missing:
            raise FormatError(f"the CSV header lacks the mapped column(s) {', '.join(repr(m[:60]) for m in missing)}",
                              code="csv_missing_column")
        index = {target: names.index(column) for target, column in mapping.items()}
        state["format"] = "chat" if kind == "chat" else kind
        previous_end = reader.line_num
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                start, previous_end = previous_end + 1, reader.line_num
                yield BadLine(start, f"malformed CSV ({exc})")
                continue
            start, previous_end = previous_end + 1, reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(names):
                yield BadLine(start, f"{len(row)} fields where the header has {len(names)}")
                continue
            cells = {target: row[i] for target, i in index.items()}
            if kind == "chat":
                if not cells["user"].strip() or not cells["assistant"].strip():
                    yield BadLine(start, "empty user or assistant cell")
                    continue
                messages = ([{"role": "system", "content": cells["system"]}] if cells.get("system", "").strip()
                            else [])
                messages += [{"role": "user", "content": cells["user"]},
                             {"role": "assistant", "content": cells["assistant"]}]
                yield Record(start, {"messages": messages})
            else:
                value: dict[str, Any] = {t: cells[t] for t in ("prompt", "completion", "text") if t in cells}
                problem = _CHECKS[kind](value)
                if problem:
                    yield BadLine(start, problem)
                    continue
                yield Record(start, value)
    except UnicodeDecodeError:
        raise FormatError(f"the CSV is not valid UTF-8 (after line {reader.line_num})",
                          code="invalid_encoding") from None
    finally:
        text.detach()


# -- plain text ------------------------------------------------------------------------------------


def _parse_plain(stream: io.BufferedIOBase, state: dict[str, str]) -> Iterator[Item]:
    state["format"] = "text"
    start = 0
    parts: list[str] = []
    size = 0
    bad = False
    for number, raw in _lines(stream):
        text = None if raw is None else _text(raw)
        if raw is not None and not raw.strip():
            if parts and not bad:
                yield Record(start, {"text": "\n".join(parts)})
            parts, size, bad = [], 0, False
            continue
        if not parts and not bad:
            start = number
        if bad:
            continue
        if raw is None or text is None:
            yield BadLine(number, "not valid UTF-8" if raw is not None
                          else f"line longer than {MAX_RECORD_BYTES} bytes")
            parts, size, bad = [], 0, True
            continue
        size += len(raw) + 1
        if size > MAX_RECORD_BYTES:
            yield BadLine(start, f"paragraph longer than {MAX_RECORD_BYTES} bytes")
            parts, size, bad = [], 0, True
            continue
        parts.append(text)
    if parts and not bad:
        yield Record(start, {"text": "\n".join(parts)})


# -- entry point -----------------------------------------------------------------------------------


class Parser:
    """`for item in Parser(stream, "auto", name_hint="x.jsonl.age")`; `.format` is the resolved record kind."""

    def __init__(self, stream: io.BufferedReader[Any], fmt: str = "auto", *, name_hint: str = "",
                 columns: Mapping[str, str] | None = None) -> None:
        head = stream.peek(_PEEK)[:_PEEK]
        self.container = detect_format(fmt, name_hint, head)
        if columns and self.container != "csv":
            raise InvalidRequest("a column mapping applies to CSV files only", code="invalid_columns", param="columns")
        self._stream = stream
        self._columns = columns
        self._state: dict[str, str] = {}
        if self.container in JSONL_KINDS:
            self._state["format"] = self.container

    @property
    def state(self) -> dict[str, str]:
        """The parse state ("format" once known), shared with `parallel.jsonl_segments` when it parses instead."""
        return self._state

    @property
    def format(self) -> str:
        """chat, completion or text once known (the stored record shape); '' before the first record."""
        return self._state.get("format", "")

    def __iter__(self) -> Iterator[Item]:
        if self.container == "csv":
            return _parse_csv(self._stream, self._columns, self._state)
        if self.container == "plain":
            return _parse_plain(self._stream, self._state)
        kind = self.container if self.container in JSONL_KINDS else None
        return _parse_jsonl(self._stream, kind, self._state)


def parse(stream: io.BufferedReader[Any], fmt: str = "auto", *, name_hint: str = "",
          columns: Mapping[str, str] | None = None) -> Parser:
    return Parser(stream, fmt, name_hint=name_hint, columns=columns)
