"""PII redaction of ingested text, driven by the detector table and the operator's policy.

    redactor = Redactor(RedactionPolicy.from_dict(cfg), hmac_key=derived_key)
    result = redactor.redact("mail bob@example.com")   # RedactionResult(text="mail [EMAIL]", ...)

`find` runs every detector row whose hints occur in the text and that the native prefilter
(garrison.ingest.pii_prefilter) says may match, keeps the candidates their validators accept,
and resolves overlaps by priority, then length, then position, so the spans it returns never
overlap. `find_many` and `redact_many` do the same for a batch of texts with one native scan.
`redact` applies the policy's action per entity type:

- mask: the span becomes a run of "*" of the same length (layout survives, value does not);
- tag:  "[EMAIL]", "[PAYMENT_CARD]", "[EMPLOYEE_ID]";
- hash: "<EMAIL:1a2b3c4d5e>", HMAC-SHA256 under the appliance's key over the type and a
        normalised value, so the same person gets the same pseudonym across datasets on
        this appliance (training data keeps its co-reference structure) and a different
        one on any other appliance (pseudonyms cannot be joined across customers);
- drop: the whole record is withdrawn (`dropped=True`, text empty);
- keep: left as is, but counted, so reports still show what the data contains.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from garrison.ingest.pii_detectors import DETECTORS, Detector
from garrison.ingest.pii_prefilter import Prefilter
from garrison.ingest.policy import RedactionPolicy, WordList

__all__ = [
    "PSEUDONYM_HEX_CHARS",
    "RecordRedaction",
    "RedactionResult",
    "Redactor",
    "Span",
    "map_strings",
]

#: Hex characters of the HMAC kept in a pseudonym (40 bits: collisions start to be likely
#: only around a million distinct values of one type in one corpus).
PSEUDONYM_HEX_CHARS = 10
MIN_KEY_BYTES = 16
# Trimming retries the validator once per separator; the rows that trim have bounded
# patterns, and this bound keeps a custom or future row from turning that quadratic.
MAX_TRIM_CHARS = 256
# Distinct sets of flagged rows remembered per redactor (a handful in practice; the bound is for safety).
_MAX_PLANS = 4096


class Span(NamedTuple):
    """A finding: text[start:end] is a value of entity `type`, found by detector row `detector`.

    A named tuple (immutable, ordered by its fields) rather than a frozen dataclass: the
    redactor makes one per finding, and building a tuple costs a fraction of a dataclass.
    """

    start: int
    end: int
    type: str
    detector: str


class RedactionResult(NamedTuple):
    """The redacted text (empty when dropped) and how many values of each type were found.

    A named tuple, like `Span`: one is made per text in which something was found.
    """

    text: str
    counts: dict[str, int]
    dropped: bool


@dataclass(frozen=True)
class RecordRedaction:
    """`redact_record`'s answer: the record with every string redacted, summed counts."""

    value: Any
    counts: dict[str, int]
    dropped: bool


def _digits(s: str) -> str:
    return "".join(ch for ch in s if ch.isdigit())


def _ip(s: str) -> str:
    try:
        return ipaddress.ip_address(s).compressed
    except ValueError:
        return s.lower()


# What "the same value" means per type, so that formatting does not split a pseudonym:
# "+1 (415) 555-0132" and "+1-415-555-0132" are one person.
_NORMALIZE: dict[str, Callable[[str], str]] = {
    "email": str.lower,
    "phone": lambda s: "+" + _digits(s.replace("(0)", "", 1)),
    "payment_card": _digits,
    "iban": lambda s: s.replace(" ", "").upper(),
    "ipv4": _ip,
    "ipv6": _ip,
    "us_ssn": _digits,
    "prc_id": str.upper,
}

# Word characters that take part in whole-word matching; Han, kana and Hangul do not,
# because those scripts write names with no space around them ("我是张伟。").
_LATIN_WORD = r"[^\W\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]"


def _trie_regex(words: Iterable[str]) -> str:
    """One alternation shaped as a prefix tree: thousands of names cost one pass, not thousands."""
    root: dict[str, Any] = {}
    for word in words:
        node = root
        for ch in word.lower():
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict[str, Any]) -> str:
        branches = [(r"\s+" if ch == " " else re.escape(ch)) + emit(child)
                    for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return emit(root)


def _word_list_detector(wl: WordList) -> Detector:
    pattern = re.compile(f"(?<!{_LATIN_WORD})(?:{_trie_regex(wl.words)})(?!{_LATIN_WORD})", re.IGNORECASE)
    return Detector(wl.name, f"word_list:{wl.name}", pattern, priority=wl.priority)


class Redactor:
    """Finds PII with the detector table plus the policy's own entries, and applies the policy.

    Immutable after construction and safe to share between threads.
    """

    def __init__(self, policy: RedactionPolicy | None, hmac_key: bytes, *, saved: Path | None = None) -> None:
        """`saved`: a folder where the compiled prefilter is kept for the next process (see Prefilter)."""
        if not isinstance(hmac_key, bytes | bytearray) or len(hmac_key) < MIN_KEY_BYTES:
            raise ValueError(f"hmac_key must be at least {MIN_KEY_BYTES} bytes (derive it from the master key)")
        self.policy = policy or RedactionPolicy()
        self._key = bytes(hmac_key)
        rows: list[Detector] = list(DETECTORS)
        for cp in self.policy.patterns:
            groups = ("value",) if "value" in cp.pattern.groupindex else ()
            rows.append(Detector(cp.name, f"pattern:{cp.name}", cp.pattern, priority=cp.priority,
                                 value_groups=groups))
        rows.extend(_word_list_detector(wl) for wl in self.policy.word_lists)
        self._rows: tuple[Detector, ...] = tuple(rows)
        self._rank = {det.name: (det.priority, i) for i, det in enumerate(rows)}
        # Each distinct hint is looked for once per text, not once per row that names it.
        self._hints = tuple(sorted({h for det in rows for h in det.hints}))
        self._actions = {t: self.policy.action_for(t) for t in self.policy.entity_types}
        entities = {*self._actions, *(det.entity for det in rows)}
        self._drops = frozenset(t for t in entities if self._actions.get(t, self.policy.default) == "drop")
        # Per entity type, what a found value becomes: decided once here, not per value.
        self._replace: dict[str, Callable[[str], str]] = {t: self._replacer(t) for t in entities}
        self._word_lists = frozenset(wl.name for wl in self.policy.word_lists)
        self._prefilter = Prefilter([det.pattern for det in rows], saved=saved)
        # A cache, not state: filled in any order by any thread, each entry computed the same way.
        self._plans: dict[int, tuple[Detector, ...]] = {}

    @property
    def prefilter(self) -> Prefilter:
        return self._prefilter

    @property
    def detectors(self) -> tuple[Detector, ...]:
        """The rows in use: the built-in table followed by the policy's entries."""
        return self._rows

    # ------------------------------------------------------------------ finding

    def candidates(self, text: str) -> list[Span]:
        """Every validated match of every row whose hints occur, overlaps included: the exhaustive pass
        (diagnostics, and the tests' reference for the prefilter, which decides which rows run instead)."""
        low = text.lower()
        present = {h for h in self._hints if h in low}
        return self._candidates(text, tuple(det for det in self._rows
                                            if not det.hints or not present.isdisjoint(det.hints)))

    @staticmethod
    def _candidates(text: str, dets: tuple[Detector, ...]) -> list[Span]:
        found: list[Span] = []
        for det in dets:
            if det.requires is not None and det.requires.search(text) is None:
                continue
            if det.finder is not None:
                spans: Iterable[tuple[int, int]] = det.finder(text)
            elif det.value_groups:
                spans = [_value_span(m, det.value_groups) for m in det.pattern.finditer(text)]
            else:
                spans = [m.span() for m in det.pattern.finditer(text)]
            validator = det.validator
            for start, end in spans:
                if start == end:
                    continue
                if validator is not None and not validator(text[start:end]):
                    end = _trim(text, start, end, det)
                    if end < 0:
                        continue
                found.append(Span(start, end, det.entity, det.name))
        return found

    def _plan(self, mask: int) -> tuple[Detector, ...]:
        """The rows of a bit mask (`Prefilter.flagged`) in table order; the prefilter hands out few
        distinct sets of rows, so each is worked out once per redactor rather than once per text."""
        plan = self._plans.get(mask)
        if plan is None:
            plan = tuple(det for k, det in enumerate(self._rows) if mask >> k & 1)
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            self._plans[mask] = plan
        return plan

    def find(self, text: str) -> list[Span]:
        """Non-overlapping findings in text order; higher priority wins, then the longer span."""
        return self.find_many([text])[0]

    def find_exhaustive(self, text: str) -> list[Span]:
        """`find` without the prefilter: every row runs (the reference the prefilter must agree with)."""
        return self._resolve(self.candidates(text))

    def find_many(self, texts: Sequence[str]) -> list[list[Span]]:
        """`find` for each text, with one prefilter scan for the whole batch."""
        found: list[list[Span]] = [[] for _ in texts]
        for i, mask in self._prefilter.flagged(texts):
            found[i] = self._resolve(self._candidates(texts[i], self._plan(mask)))
        return found

    def _resolve(self, cands: list[Span]) -> list[Span]:
        if len(cands) <= 1:
            return cands
        rank = self._rank
        cands.sort(key=lambda s: (-rank[s.detector][0], s.start - s.end, s.start, rank[s.detector][1]))
        starts: list[int] = []
        ends: list[int] = []
        kept: list[Span] = []
        for span in cands:
            i = bisect.bisect_left(starts, span.end) - 1
            if i >= 0 and ends[i] > span.start:
                continue
            starts.insert(i + 1, span.start)
            ends.insert(i + 1, span.end)
            kept.append(span)
        kept.sort()
        return kept

    # ------------------------------------------------------------------ redacting

    def redact(self, text: str) -> RedactionResult:
        """Apply the policy to one record's text."""
        return self._apply(text, self.find(text))

    def redact_many(self, texts: Sequence[str]) -> list[RedactionResult | None]:
        """`redact` for each text (one prefilter scan); None where nothing was found (text unchanged)."""
        results: list[RedactionResult | None] = [None] * len(texts)
        for i, result in self.redact_changed(texts):
            results[i] = result
        return results

    def redact_changed(self, texts: Sequence[str]) -> list[tuple[int, RedactionResult]]:
        """(index, result) for each text in which something was found, in text order; one prefilter
        scan for the batch, and no work at all for the texts it clears (most of them)."""
        out: list[tuple[int, RedactionResult]] = []
        plan = self._plan
        candidates = self._candidates
        for i, mask in self._prefilter.flagged(texts):
            text = texts[i]
            spans = candidates(text, plan(mask))
            if spans:
                out.append((i, self._apply(text, spans if len(spans) == 1 else self._resolve(spans))))
        return out

    def _apply(self, text: str, spans: list[Span]) -> RedactionResult:
        if len(spans) == 1:  # the usual case, without the loops
            start, end, entity, _ = spans[0]
            if entity in self._drops:
                return RedactionResult("", {entity: 1}, True)
            return RedactionResult(text[:start] + self._replace[entity](text[start:end]) + text[end:], {entity: 1},
                                   False)
        counts: dict[str, int] = {}
        for s in spans:
            counts[s.type] = counts.get(s.type, 0) + 1
        if not self._drops.isdisjoint(counts):  # per type, not per span: the same answer
            return RedactionResult("", counts, True)
        if not spans:
            return RedactionResult(text, counts, False)
        replace = self._replace
        out: list[str] = []
        pos = 0
        for s in spans:
            out.append(text[pos:s.start])
            out.append(replace[s.type](text[s.start:s.end]))
            pos = s.end
        out.append(text[pos:])
        return RedactionResult("".join(out), counts, False)

    def redact_record(self, value: Any) -> RecordRedaction:
        """Redact every string inside a JSON-like record (dict keys are left alone: they are schema)."""
        counts: Counter[str] = Counter()
        dropped = False

        def one(text: str) -> str:
            nonlocal dropped
            r = self.redact(text)
            counts.update(r.counts)
            dropped = dropped or r.dropped
            return r.text

        out = map_strings(value, one)
        return RecordRedaction(None if dropped else out, dict(counts), dropped)

    def replacement(self, entity: str, value: str) -> str:
        """What one found value becomes under the policy (drop is handled per record by `redact`)."""
        fn = self._replace.get(entity)
        return (fn or self._replacer(entity))(value)

    def _replacer(self, entity: str) -> Callable[[str], str]:
        return _REPLACERS[self._actions.get(entity, self.policy.default)](self, entity)

    def pseudonym(self, entity: str, value: str) -> str:
        """The keyed hash of a value: stable on this appliance, unlinkable across appliances."""
        norm = self._normalize(entity, value)
        mac = hmac.new(self._key, entity.encode() + b"\x00" + norm.encode(), hashlib.sha256)
        return mac.hexdigest()[:PSEUDONYM_HEX_CHARS]

    def _normalize(self, entity: str, value: str) -> str:
        if entity in self._word_lists:
            return " ".join(value.casefold().split())
        fn = _NORMALIZE.get(entity)
        return fn(value) if fn is not None else value


def _masked(redactor: Redactor, entity: str) -> Callable[[str], str]:
    return lambda value: "*" * len(value)


def _tagged(redactor: Redactor, entity: str) -> Callable[[str], str]:
    tag = f"[{entity.upper()}]"
    return lambda value: tag


def _hashed(redactor: Redactor, entity: str) -> Callable[[str], str]:
    return lambda value: f"<{entity.upper()}:{redactor.pseudonym(entity, value)}>"


def _kept(redactor: Redactor, entity: str) -> Callable[[str], str]:
    return str


# Per action, what makes an entity type's replacement function ("drop" withdraws the record, in
# `_apply`; its values are left as they are).
_REPLACERS: dict[str, Callable[[Redactor, str], Callable[[str], str]]] = {
    "mask": _masked, "tag": _tagged, "hash": _hashed, "keep": _kept, "drop": _kept}


def map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """A copy of a JSON-like value with every string passed through fn, in document order; dict
    keys are kept as they are (they are schema, not data)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_strings(x, fn) for k, x in value.items()}
    if isinstance(value, list | tuple):
        return [map_strings(x, fn) for x in value]
    return value


def _value_span(m: re.Match[str], groups: tuple[str, ...]) -> tuple[int, int]:
    for g in groups:
        if m.start(g) >= 0:
            return m.span(g)
    return m.span()


def _trim(text: str, start: int, end: int, det: Detector) -> int:
    """Cut a rejected candidate back at `det.trim` characters, longest first; -1 if none passes."""
    if not det.trim or det.validator is None or end - start > MAX_TRIM_CHARS:
        return -1
    for i in range(end - 1, start, -1):
        if text[i] in det.trim and det.validator(text[start:i]):
            return i
    return -1
