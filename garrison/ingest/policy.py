"""The redaction policy: what to do with each kind of personal data found in ingested text.

A policy is plain data (a dict, or a TOML table such as `[redaction]` in the appliance's
configuration) so that configuration management can distribute it as a file. It is
validated once, when loaded, and every mistake names the key that caused it: an operator
who typed `emial = "hash"` must hear about it at load time, not discover months later
that e-mail addresses went into the vault untouched.

    [redaction]
    default = "tag"                 # action for built-in types not listed below
    on_bad_lines = "refuse"         # or "skip": carried for the ingestion layer

    [redaction.actions]
    email = "hash"
    secret = "drop"

    [redaction.patterns.employee_id]
    regex = 'EMP-\\d{6}'
    action = "mask"                 # optional, default = tag; also: priority

    [redaction.word_lists.codenames]
    words = ["Project Falcon", "Nightjar"]
    action = "tag"
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from garrison.errors import InvalidRequest
from garrison.ingest.pii_detectors import ENTITY_TYPES

__all__ = [
    "ACTIONS",
    "Action",
    "CustomPattern",
    "RedactionPolicy",
    "WordList",
]

Action = Literal["mask", "tag", "hash", "drop", "keep"]
ACTIONS: tuple[Action, ...] = ("mask", "tag", "hash", "drop", "keep")
OnBadLines = Literal["refuse", "skip"]

# Custom entries rank below the built-ins by default: a word-list name inside an e-mail
# address should not cut the address in two. An operator can raise it per entry.
DEFAULT_CUSTOM_PRIORITY = 20
MAX_WORD_CHARS = 200  # a word list compiles to a prefix tree; this bounds its depth
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_TOP_KEYS = frozenset({"default", "actions", "patterns", "word_lists", "on_bad_lines"})


@dataclass(frozen=True)
class CustomPattern:
    """An operator's regular expression; a group named `value`, if any, is the part redacted."""

    name: str
    pattern: re.Pattern[str]
    action: Action = "tag"
    priority: int = DEFAULT_CUSTOM_PRIORITY


@dataclass(frozen=True)
class WordList:
    """Words or phrases matched whole, case-insensitively (names, code names, client lists)."""

    name: str
    words: tuple[str, ...]
    action: Action = "tag"
    priority: int = DEFAULT_CUSTOM_PRIORITY


@dataclass(frozen=True)
class RedactionPolicy:
    """Per entity type an action, plus custom patterns and word lists.

    `actions` holds only what the operator set; `action_for` falls back to `default`.
    """

    actions: Mapping[str, Action] = field(default_factory=dict)
    default: Action = "tag"
    patterns: tuple[CustomPattern, ...] = ()
    word_lists: tuple[WordList, ...] = ()
    on_bad_lines: OnBadLines = "refuse"

    def action_for(self, entity: str) -> Action:
        """The action for a built-in type or a custom entry's name."""
        for pattern in self.patterns:
            if pattern.name == entity:
                return pattern.action
        for word_list in self.word_lists:
            if word_list.name == entity:
                return word_list.action
        return self.actions.get(entity, self.default)

    @property
    def entity_types(self) -> tuple[str, ...]:
        """Built-in types followed by the custom entries' names, in report order."""
        return (*ENTITY_TYPES, *(c.name for c in self.patterns), *(w.name for w in self.word_lists))

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, where: str = "redaction") -> RedactionPolicy:
        """Validate and build a policy; `where` prefixes key names in error messages."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise _bad(where, f"{where} must be a table, not {type(data).__name__}")
        for key in data:
            if key not in _TOP_KEYS:
                raise _bad(f"{where}.{key}", f"unknown key {where}.{key}; expected one of {sorted(_TOP_KEYS)}")
        default = _action(data.get("default", "tag"), f"{where}.default")
        on_bad = data.get("on_bad_lines", "refuse")
        if on_bad not in ("refuse", "skip"):
            raise _bad(f"{where}.on_bad_lines", f"{where}.on_bad_lines must be 'refuse' or 'skip', not {on_bad!r}")

        actions: dict[str, Action] = {}
        raw_actions = _table(data.get("actions", {}), f"{where}.actions")
        for entity, value in raw_actions.items():
            if entity not in ENTITY_TYPES:
                raise _bad(f"{where}.actions.{entity}",
                           f"unknown entity type {where}.actions.{entity}; built-in types are "
                           f"{', '.join(ENTITY_TYPES)} (custom entries carry their own action)")
            actions[entity] = _action(value, f"{where}.actions.{entity}")

        names: set[str] = set(ENTITY_TYPES)
        patterns = tuple(_pattern(name, spec, f"{where}.patterns.{name}", names)
                         for name, spec in _table(data.get("patterns", {}), f"{where}.patterns").items())
        word_lists = tuple(_word_list(name, spec, f"{where}.word_lists.{name}", names)
                           for name, spec in _table(data.get("word_lists", {}), f"{where}.word_lists").items())
        return cls(actions=actions, default=default, patterns=patterns, word_lists=word_lists,
                   on_bad_lines=cast(OnBadLines, on_bad))

    @classmethod
    def from_toml(cls, text: str, *, table: str | None = "redaction") -> RedactionPolicy:
        """Parse TOML text; `table` is the dotted table holding the policy (None: the whole document)."""
        try:
            doc: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequest(f"redaction policy is not valid TOML: {exc}", code="invalid_policy") from exc
        where = table or "redaction"
        if table:
            for part in table.split("."):
                doc = doc.get(part) if isinstance(doc, dict) else None
        return cls.from_dict(doc, where=where)


def _bad(key: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, code="invalid_policy", param=key)


def _table(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _bad(key, f"{key} must be a table, not {type(value).__name__}")
    return value


def _action(value: Any, key: str) -> Action:
    if value not in ACTIONS:
        raise _bad(key, f"{key}: unknown action {value!r}; expected one of {', '.join(ACTIONS)}")
    return cast(Action, value)


def _priority(spec: Mapping[str, Any], key: str) -> int:
    value = spec.get("priority", DEFAULT_CUSTOM_PRIORITY)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"{key}.priority", f"{key}.priority must be an integer")
    return value


def _check_name(name: str, key: str, taken: set[str]) -> None:
    if not _NAME.fullmatch(name):
        raise _bad(key, f"{key}: names are lower-case letters, digits and _, starting with a letter")
    if name in taken:
        raise _bad(key, f"{key}: name {name!r} is already used by a built-in type or another entry")
    taken.add(name)


def _check_keys(spec: Mapping[str, Any], key: str, allowed: frozenset[str]) -> None:
    for k in spec:
        if k not in allowed:
            raise _bad(f"{key}.{k}", f"unknown key {key}.{k}; expected one of {sorted(allowed)}")


def _pattern(name: str, spec: Any, key: str, taken: set[str]) -> CustomPattern:
    _check_name(name, key, taken)
    spec = {"regex": spec} if isinstance(spec, str) else _table(spec, key)
    _check_keys(spec, key, frozenset({"regex", "action", "priority"}))
    source = spec.get("regex")
    if not isinstance(source, str) or not source:
        raise _bad(f"{key}.regex", f"{key}.regex must be a non-empty string")
    try:
        compiled = re.compile(source)
    except re.error as exc:
        raise _bad(f"{key}.regex", f"{key}.regex is not a valid regular expression: {exc}") from exc
    # A pattern that can match nothing would "find" an empty span at every position.
    if compiled.fullmatch("") is not None:
        raise _bad(f"{key}.regex", f"{key}.regex matches the empty string")
    return CustomPattern(name, compiled, _action(spec.get("action", "tag"), f"{key}.action"),
                         _priority(spec, key))


def _word_list(name: str, spec: Any, key: str, taken: set[str]) -> WordList:
    _check_name(name, key, taken)
    spec = {"words": spec} if isinstance(spec, list) else _table(spec, key)
    _check_keys(spec, key, frozenset({"words", "action", "priority"}))
    words = spec.get("words")
    if not isinstance(words, list) or not words:
        raise _bad(f"{key}.words", f"{key}.words must be a non-empty list of strings")
    cleaned: list[str] = []
    for i, word in enumerate(words):
        if not isinstance(word, str) or not word.strip() or len(word) > MAX_WORD_CHARS:
            raise _bad(f"{key}.words[{i}]",
                       f"{key}.words[{i}] must be a non-empty string of at most {MAX_WORD_CHARS} characters")
        cleaned.append(" ".join(word.split()))
    return WordList(name, tuple(dict.fromkeys(cleaned)), _action(spec.get("action", "tag"), f"{key}.action"),
                    _priority(spec, key))
