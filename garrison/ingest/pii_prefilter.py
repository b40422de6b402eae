"""A native multi-pattern prefilter for the redactor: which detector rows can match which texts.

The exact detectors (Python regex + validator) cost several regex passes per text, and most
texts contain no PII at all. Hyperscan scans a whole batch of texts against every row at once
and at memory speed; the redactor then runs the exact row only where the prefilter fired.

The prefilter may only ever over-report (a row it does not flag for a text must have no match
there), so each row's Python pattern is translated, mechanically, from the parse tree CPython's
own `re` builds, into a pattern that matches at least a prefix of every match of the original:

- zero-width assertions (look-around, `^`, `$`, `\\b`) are dropped: a condition removed can
  only admit more;
- a back-reference becomes a copy of the group it names (any text the group could match);
- possessive and atomic constructs become plain ones (backtracking can only find more);
- a character class keeps its exact ASCII members (computed by asking `re` itself) and, where
  it could match any non-ASCII character (categories, negation, case folding), admits every
  non-ASCII character: Unicode tables are where Python and Hyperscan differ, so the
  translation never relies on them;
- at the end of the pattern only the shortest finish is kept (trailing parts that may match
  nothing are dropped, a trailing repeat keeps its minimum): a match's prefix lies in the same
  text, and a value is then reported once rather than once per possible end (`_Translator.tail`).

A row whose pattern cannot be translated or compiled (an unknown construct, a pattern that
matches the empty string once its assertions are gone) is marked "always run": the redactor
treats it as flagged for every text, exactly as before the prefilter existed.

Texts are scanned as UTF-8 (a lone surrogate, which JSON allows, becomes U+FFFD, a non-ASCII
character like it). A batch is joined with newlines and one scan reports (row, end offset)
pairs; an end offset names the text it falls in. A match that runs across a separator can
only add a flag, never hide one, because Hyperscan reports every match, overlapping ones too.
The compiled database is shared per pattern set within a process, handed to worker processes
(`Prefilter.export`/`preload`) and, given a folder, kept on disk for the next process.
"""

from __future__ import annotations

import bisect
import codecs
import contextlib
import functools
import hashlib
import itertools
import json
import operator
import os
import platform
import re
import re._constants as _sre_c  # the parse tree of CPython's re (Python is pinned to 3.11)
import re._parser as _sre_p
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hyperscan

__all__ = ["Prefilter", "PrefilterRow", "translate"]

_SEP = "\n"
_MAX_CODEPOINT = 0x10FFFF
# Non-ASCII characters that CPython's IGNORECASE matches against an ASCII letter (KELVIN SIGN
# and friends); checked exhaustively by the tests.
FOLD_EXTRAS: tuple[int, ...] = (0x130, 0x131, 0x17F, 0x212A)
_PROBES = (*range(128), *FOLD_EXTRAS)
_ERRORS = "garrison-prefilter-fffd"
_MAX_BOUND = 16


def _surrogate_to_fffd(exc: UnicodeError) -> tuple[bytes, int]:
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    return "\ufffd".encode() * (exc.end - exc.start), exc.end  # the UTF-8 encoder takes bytes, not non-ASCII str


codecs.register_error(_ERRORS, _surrogate_to_fffd)


class Untranslatable(Exception):
    """The pattern uses something the translation does not know; the row runs on every text."""


# -------------------------------------------------------------------------- translation

def _hex(c: int) -> str:
    return f"\\x{{{c:x}}}"


def _class_text(members: set[int], non_ascii: bool) -> str:
    """A Hyperscan class of the given code points, plus every non-ASCII one if `non_ascii`."""
    points = sorted(c for c in members if c < 128 or not non_ascii)
    if any(0xD800 <= c <= 0xDFFF for c in points):
        raise Untranslatable("a surrogate in a character class")
    parts: list[str] = []
    i = 0
    while i < len(points):
        j = i
        while j + 1 < len(points) and points[j + 1] == points[j] + 1:
            j += 1
        parts.append(_hex(points[i]) if i == j else f"{_hex(points[i])}-{_hex(points[j])}")
        i = j + 1
    if non_ascii:
        parts.append(f"{_hex(0x80)}-{_hex(0xD7FF)}{_hex(0xE000)}-{_hex(_MAX_CODEPOINT)}")
    if not parts:
        raise Untranslatable("an empty character class")
    return "[" + "".join(parts) + "]"


_CATEGORY_SOURCE = {
    _sre_c.CATEGORY_DIGIT: r"\d", _sre_c.CATEGORY_NOT_DIGIT: r"\D",
    _sre_c.CATEGORY_SPACE: r"\s", _sre_c.CATEGORY_NOT_SPACE: r"\S",
    _sre_c.CATEGORY_WORD: r"\w", _sre_c.CATEGORY_NOT_WORD: r"\W",
}
_POSITIVE_CATEGORIES = frozenset({_sre_c.CATEGORY_DIGIT, _sre_c.CATEGORY_SPACE, _sre_c.CATEGORY_WORD})


def _char(c: int) -> str:
    return f"\\U{c:08x}"


def _set_source(items: list[tuple[Any, Any]], flags: int) -> tuple[str, bool]:
    """(Python source of a `[...]` class, whether it may match a non-ASCII character outside the probes)."""
    out: list[str] = []
    non_ascii = False
    negated = False
    for op, av in items:
        if op is _sre_c.NEGATE:
            negated = True
        elif op is _sre_c.LITERAL:
            out.append(_char(av))
            non_ascii = non_ascii or av >= 128
        elif op is _sre_c.RANGE:
            out.append(f"{_char(av[0])}-{_char(av[1])}")
            non_ascii = non_ascii or av[1] >= 128
        elif op is _sre_c.CATEGORY and av in _CATEGORY_SOURCE:
            out.append(_CATEGORY_SOURCE[av])
            # ASCII-mode \d, \w, \s are ASCII only; \D, \W, \S (and Unicode mode) admit non-ASCII.
            non_ascii = non_ascii or not (flags & re.ASCII and av in _POSITIVE_CATEGORIES)
        else:
            raise Untranslatable(f"class item {op}")
    return "[" + ("^" if negated else "") + "".join(out) + "]", non_ascii or negated


@functools.lru_cache(maxsize=4096)
def _one_char(source: str, flags: int, non_ascii: bool) -> str:
    """The exact ASCII (and fold-extra) members of a one-character pattern, asked of `re` itself."""
    compiled = re.compile(source, flags)
    return _class_text({c for c in _PROBES if compiled.fullmatch(chr(c))}, non_ascii)


class _Translator:
    def __init__(self, flags: int, state: Any) -> None:
        if flags & re.LOCALE:
            raise Untranslatable("LOCALE flag")
        self.groups: dict[int, str] = {}
        self.state = state

    def min_width(self, item: tuple[Any, Any]) -> int:
        return int(_sre_p.SubPattern(self.state, [item]).getwidth()[0])

    def tail(self, sub: Any, flags: int) -> str:
        r"""`seq` for the end of a pattern, where only the shortest way to finish matters.

        Every match of `A B` starts with a match of `A` when `B` may match nothing, and with a match
        of `A X` when `B` is `X{m,n}` (m >= 1): so, at the end, parts that may match nothing are
        dropped and a repeat keeps its minimum. The prefilter's question is "may this row match in
        this text", which a match's prefix answers as well, from the same text; and Hyperscan reports
        every end offset of every match, so a variable tail (`\+\d{7,15}`) meant up to ten callbacks
        per value where one now comes.
        """
        items = list(sub)
        while items and self.min_width(items[-1]) == 0:
            items.pop()
        if not items:
            return ""
        *head, (op, av) = items
        return "".join(self.node(o, a, flags) for o, a in head) + self.tail_node(op, av, flags)

    def tail_node(self, op: Any, av: Any, flags: int) -> str:
        c = _sre_c
        if op is c.BRANCH:
            return "(?:" + "|".join(self.tail(alt, flags) for alt in av[1]) + ")"
        if op is c.SUBPATTERN:
            _, add, delete, sub = av
            return f"(?:{self.tail(sub, (flags | add) & ~delete)})"
        if op is c.ATOMIC_GROUP:
            return f"(?:{self.tail(av, flags)})"
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            low, _, sub = av
            low = min(low, _MAX_BOUND)
            last = f"(?:{self.tail(sub, flags)})"
            return (f"(?:{self.seq(sub, flags)}){{{low - 1}}}" if low > 1 else "") + last
        return self.node(op, av, flags)

    def one_char(self, source: str, flags: int, non_ascii: bool) -> str:
        return _one_char(source, flags & (re.IGNORECASE | re.ASCII | re.DOTALL), non_ascii)

    def literal(self, c: int, flags: int) -> str:
        if c >= 128:
            ch = chr(c)
            cased = len({ch, ch.lower(), ch.upper(), ch.casefold()}) > 1
            if not (flags & re.IGNORECASE) or not cased:
                if 0xD800 <= c <= 0xDFFF:
                    raise Untranslatable("a surrogate literal")
                return _hex(c)
            # A cased non-ASCII letter under IGNORECASE: any letter or non-ASCII character.
            letters = {*range(65, 91), *range(97, 123)}
            return _class_text(letters, True)
        return self.one_char(_char(c), flags, False)

    def seq(self, sub: Any, flags: int) -> str:
        return "".join(self.node(op, av, flags) for op, av in sub)

    def node(self, op: Any, av: Any, flags: int) -> str:
        c = _sre_c
        if op is c.LITERAL:
            return self.literal(av, flags)
        if op is c.NOT_LITERAL:
            return self.one_char(f"[^{_char(av)}]", flags, True)
        if op is c.ANY:
            return self.one_char(".", flags, True)
        if op is c.IN:
            source, non_ascii = _set_source(av, flags)
            return self.one_char(source, flags, non_ascii)
        if op is c.BRANCH:
            return "(?:" + "|".join(self.seq(alt, flags) for alt in av[1]) + ")"
        if op is c.SUBPATTERN:
            group, add, delete, sub = av
            inner = self.seq(sub, (flags | add) & ~delete)
            if group is not None:
                self.groups[group] = inner
            return f"(?:{inner})"
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            low, high, sub = av
            body = self.seq(sub, flags)
            # Long bounded repeats make Hyperscan's automata large and slow to build; loosening
            # the bounds keeps the superset and costs only precision on long runs.
            if high is not c.MAXREPEAT and high > _MAX_BOUND:
                high = c.MAXREPEAT
            low = min(low, _MAX_BOUND)
            if high is c.MAXREPEAT:
                quant = "*" if low == 0 else "+" if low == 1 else f"{{{low},}}"
            else:
                quant = f"{{{low},{high}}}" if low != high else f"{{{low}}}"
            return f"(?:{body}){quant}"
        if op is c.ATOMIC_GROUP:
            return f"(?:{self.seq(av, flags)})"
        if op in (c.AT, c.ASSERT, c.ASSERT_NOT):
            return ""  # dropping a zero-width condition can only admit more
        if op is c.GROUPREF:
            if av not in self.groups:
                raise Untranslatable("a reference to a group not yet closed")
            return f"(?:{self.groups[av]})"
        if op is c.GROUPREF_EXISTS:
            _, yes, no = av
            return "(?:" + self.seq(yes, flags) + "|" + (self.seq(no, flags) if no is not None else "") + ")"
        raise Untranslatable(f"regex construct {op}")


def translate(pattern: re.Pattern[str]) -> str:
    """A Hyperscan (UTF-8 mode) pattern that matches a prefix of every match of `pattern`."""
    if not isinstance(pattern.pattern, str):
        raise Untranslatable("a bytes pattern")
    tree = _sre_p.parse(pattern.pattern, pattern.flags)
    flags = pattern.flags | tree.state.flags
    return _Translator(flags, tree.state).tail(tree, flags)


# -------------------------------------------------------------------------- the database

class PrefilterRow:
    """One row's translation: its Hyperscan expression, or None when it always runs."""

    def __init__(self, index: int, expression: str | None, flags: int) -> None:
        self.index = index
        self.expression = expression
        self.flags = flags


_BASE_FLAGS = hyperscan.HS_FLAG_UTF8 | hyperscan.HS_FLAG_DOTALL


def _compile_row(index: int, expression: str | None) -> PrefilterRow:
    if expression is None:
        return PrefilterRow(index, None, 0)
    for flags in (_BASE_FLAGS, _BASE_FLAGS | hyperscan.HS_FLAG_PREFILTER):
        try:
            hyperscan.Database().compile(expressions=[expression.encode()], ids=[0], flags=[flags])
        except hyperscan.error:
            continue
        return PrefilterRow(index, expression, flags)
    return PrefilterRow(index, None, 0)


def _translate_or_none(pattern: re.Pattern[str]) -> str | None:
    try:
        return translate(pattern)
    except (Untranslatable, re.error, RecursionError):
        return None


def _compile(expressions: list[str | None]) -> tuple[tuple[PrefilterRow, ...], hyperscan.Database | None]:
    """All rows in one database; only if that fails, row by row (to find the ones that must always run)."""
    rows = tuple(PrefilterRow(i, e, _BASE_FLAGS if e is not None else 0) for i, e in enumerate(expressions))
    for attempt in range(2):
        scanned = [r for r in rows if r.expression is not None]
        if not scanned:
            return rows, None
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        try:
            db.compile(expressions=[r.expression.encode() for r in scanned if r.expression is not None],
                       ids=[r.index for r in scanned], flags=[r.flags for r in scanned])
        except hyperscan.error:
            if attempt:
                raise
            rows = tuple(_compile_row(i, e) for i, e in enumerate(expressions))
            continue
        return rows, db
    raise AssertionError("unreachable")


_Compiled = tuple[tuple["PrefilterRow", ...], "hyperscan.Database | None"]
_Key = tuple[tuple[str, int], ...]
#: Compiled databases by pattern set (read-only once built, so shared by every redactor and thread).
_DATABASES: dict[_Key, _Compiled] = {}
_DATABASES_LOCK = threading.Lock()
_MAX_DATABASES = 32


def _cached(key: _Key, folder: Path | None = None) -> _Compiled:
    with _DATABASES_LOCK:
        found = _DATABASES.get(key)
    if found is None and folder is not None:
        found = _read_saved(key, folder)
    if found is None:
        found = _compile([_translate_or_none(re.compile(source, flags)) for source, flags in key])
        if folder is not None:
            _save(key, found, folder)
    _remember(key, found)
    return found


# -------------------------------------------------------------------------- saved databases
# A fresh process (`garrison ingest`, a worker, the daemon after a restart) would otherwise spend a
# fraction of a second compiling the same table again. The file holds the rows as JSON and the
# database as Hyperscan serialises it (with its own version, platform and CRC checks); it is named
# by a digest of the patterns and the Hyperscan build, and a file that does not load is rebuilt.

_SAVED_FORMAT = 1


def _saved_path(key: _Key, folder: Path) -> Path:
    ident = json.dumps([_SAVED_FORMAT, getattr(hyperscan, "__version__", ""), platform.machine(), key]).encode()
    return folder / f"prefilter-{hashlib.sha256(ident).hexdigest()[:32]}.hsdb"


def _read_saved(key: _Key, folder: Path) -> _Compiled | None:
    try:
        blob = _saved_path(key, folder).read_bytes()
        size = int.from_bytes(blob[:4], "big")
        header = json.loads(blob[4:4 + size])
        if header["key"] != json.loads(json.dumps(key)):
            return None
        rows = tuple(PrefilterRow(int(i), e, int(f)) for i, e, f in header["rows"])
        data = blob[4 + size:]
        return rows, (hyperscan.loadb(data, hyperscan.HS_MODE_BLOCK) if data else None)
    except (OSError, ValueError, KeyError, TypeError, hyperscan.error):
        return None


def _save(key: _Key, compiled: _Compiled, folder: Path) -> None:
    """Best effort: a folder that cannot be written only costs the next process a compilation."""
    rows, db = compiled
    header = json.dumps({"key": key, "rows": [(r.index, r.expression, r.flags) for r in rows]}).encode()
    blob = len(header).to_bytes(4, "big") + header + (hyperscan.dumpb(db) if db is not None else b"")
    path = _saved_path(key, folder)
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)


def _remember(key: _Key, compiled: _Compiled) -> None:
    with _DATABASES_LOCK:
        if len(_DATABASES) >= _MAX_DATABASES:
            _DATABASES.clear()
        _DATABASES[key] = compiled


class Prefilter:
    """Which rows may match which texts, for a table of row patterns; thread-safe."""

    def __init__(self, patterns: Sequence[re.Pattern[str]], *, saved: Path | None = None) -> None:
        # Compiling costs a fraction of a second; every ingestion builds a redactor, mostly from
        # the same table, so databases are shared per pattern set (they are read-only), and kept
        # in the `saved` folder, when given, for the next process.
        self._key: _Key = tuple((p.pattern, p.flags) for p in patterns)
        self.rows, self._db = _cached(self._key, saved)
        self.always = frozenset(r.index for r in self.rows if r.expression is None)
        self._always_mask = sum(1 << k for k in self.always)
        self._local = threading.local()
        if self._db is not None:
            self._scratch = hyperscan.Scratch(self._db)

    def export(self) -> tuple[_Key, tuple[tuple[int, str | None, int], ...], bytes | None]:
        """This prefilter's compiled form as plain data, for `preload` in another process: a redaction
        worker then skips the translation and compilation (a fraction of a second of CPU each)."""
        rows = tuple((r.index, r.expression, r.flags) for r in self.rows)
        return self._key, rows, None if self._db is None else hyperscan.dumpb(self._db)

    @staticmethod
    def preload(exported: tuple[_Key, tuple[tuple[int, str | None, int], ...], bytes | None]) -> None:
        """Make `export`'s database the one every Prefilter of the same patterns uses in this process."""
        key, rows, data = exported
        db = None if data is None else hyperscan.loadb(data, hyperscan.HS_MODE_BLOCK)
        _remember(key, (tuple(PrefilterRow(*row) for row in rows), db))

    def _thread_scratch(self) -> Any:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = self._scratch.clone()
        return scratch

    def flags(self, texts: Sequence[str]) -> list[frozenset[int] | None]:
        """Per text, the rows that may match it (the always-run rows included), or None for "none"."""
        out: list[frozenset[int] | None] = [None] * len(texts)
        for i, mask in self.flagged(texts):
            out[i] = frozenset(k for k in range(mask.bit_length()) if mask >> k & 1)
        return out

    def flagged(self, texts: Sequence[str]) -> list[tuple[int, int]]:
        """(index, rows that may match it, as a bit mask: bit k for row k) for each text some row may
        match, in text order; the always-run rows count as matching every text. Most texts hold no
        PII: they cost nothing here, and the others a few integer operations."""
        always = self._always_mask
        if self._db is None:
            return [(i, always) for i in range(len(texts))] if always else []
        # One encode of the joined batch; a text's byte length is its length in characters unless the
        # batch has a non-ASCII character (every one encodes to 2+ bytes), and then each is encoded.
        joined = _SEP.join(texts)
        data = joined.encode("utf-8", _ERRORS)
        lengths = (map(len, texts) if len(data) == len(joined)
                   else [len(t) if t.isascii() else len(t.encode("utf-8", _ERRORS)) for t in texts])
        # Text i ends at the separator after it: its bytes and those before it, plus i separators.
        ends = list(map(operator.add, itertools.accumulate(lengths), range(len(texts))))
        found: dict[int, int] = {}
        get = found.get
        bisect_left = bisect.bisect_left

        def on_match(row: int, start: int, end: int, flags: int, context: Any) -> None:
            i = bisect_left(ends, end)  # the text this match ends in
            found[i] = get(i, always) | 1 << row

        self._db.scan(data, match_event_handler=on_match, scratch=self._thread_scratch())
        count = len(texts)
        found.pop(count, None)  # no match ends past the last text; kept for safety
        if always:
            return [(i, get(i, always)) for i in range(count)]
        return sorted(found.items())
