"""Per-key rate limits: requests and tokens per minute, concurrent requests; pure decisions.

The policy file's `[rate_limits]` table sets them, most specific first:

    [rate_limits.keys.key_0123456789abcdef]   # one key
    [rate_limits.roles.infer]                 # every key of a role
    [rate_limits]                             # every key (the top-level fields)

each with `requests_per_minute`, `tokens_per_minute` and `concurrent_requests` (a positive
integer, or "unlimited" to lift a broader limit). Nothing set means no limit.

The limiter holds token buckets, as OpenAI's limits behave: a bucket holds at most a minute's
allowance and refills continuously, so N requests per minute may come at once and then one every
60/N seconds. A bucket remembers only its level and when it was last filled; the capacity comes
from the limits passed in on every call, so a reloaded policy applies to the buckets already
running. Tokens are known only after the model answers: a request is refused while the key's
token bucket is empty, and charged its real usage afterwards, which may take the bucket below
zero (the next requests wait for it to refill). The clock is injected: tests of the arithmetic
never sleep.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

from garrison.errors import InvalidRequest, RateLimited
from garrison.policies.scopes import ROLES

UNLIMITED = "unlimited"
_KEY_ID = re.compile(r"^key_[0-9a-f]{16}$")
_SECTIONS = frozenset({"roles", "keys"})
#: A refusal's Retry-After is never shorter than this (a bucket a hair short of one request).
MIN_RETRY_S = 0.001


@dataclass(frozen=True)
class Limits:
    """One key's limits; None means no limit on that measure."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None

    @property
    def any(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))


@dataclass(frozen=True)
class _Layer:
    """One table of the policy: a field absent inherits, "unlimited" lifts, a number limits."""

    values: Mapping[str, int | None] = field(default_factory=dict)

    def over(self, base: Limits) -> Limits:
        return replace(base, **self.values) if self.values else base


LIMIT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Limits))


def _layer(data: Any, where: str) -> _Layer:
    if not isinstance(data, Mapping):
        raise InvalidRequest(f"[{where}] must be a table", code="invalid_policy", param=where)
    values: dict[str, int | None] = {}
    for name, value in data.items():
        dotted = f"{where}.{name}"
        if name not in LIMIT_FIELDS:
            raise InvalidRequest(f"unknown key {dotted}; expected {', '.join(LIMIT_FIELDS)}",
                                 code="invalid_policy", param=dotted)
        if value == UNLIMITED:
            values[name] = None
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            values[name] = value
        else:
            raise InvalidRequest(f"{dotted} must be a positive integer or \"{UNLIMITED}\", not {value!r}",
                                 code="invalid_policy", param=dotted)
    return _Layer(values)


@dataclass(frozen=True)
class RateLimitPolicy:
    """No limits unless the policy file sets them."""

    default: _Layer = field(default_factory=_Layer)
    roles: Mapping[str, _Layer] = field(default_factory=lambda: MappingProxyType({}))
    keys: Mapping[str, _Layer] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *, where: str = "rate_limits") -> RateLimitPolicy:
        if not data:
            return cls()
        default = _layer({k: v for k, v in data.items() if k not in _SECTIONS}, where)
        tables: dict[str, dict[str, _Layer]] = {"roles": {}, "keys": {}}
        for section, valid, expected in (("roles", lambda name: name in ROLES, ", ".join(ROLES)),
                                         ("keys", lambda name: bool(_KEY_ID.match(name)),
                                          "key ids as `garrison keys list` shows them (key_ and 16 hex digits)")):
            table = data.get(section, {})
            if not isinstance(table, Mapping):
                raise InvalidRequest(f"[{where}.{section}] must be a table", code="invalid_policy",
                                     param=f"{where}.{section}")
            for name, sub in table.items():
                dotted = f"{where}.{section}.{name}"
                if not valid(name):
                    raise InvalidRequest(f"unknown {section[:-1]} {dotted}; expected {expected}",
                                         code="invalid_policy", param=dotted)
                tables[section][name] = _layer(sub, dotted)
        return cls(default, MappingProxyType(tables["roles"]), MappingProxyType(tables["keys"]))

    def limits_for(self, key_id: str, role: str) -> Limits:
        limits = self.default.over(Limits())
        if (by_role := self.roles.get(role)) is not None:
            limits = by_role.over(limits)
        if (by_key := self.keys.get(key_id)) is not None:
            limits = by_key.over(limits)
        return limits


def go_duration(seconds: float) -> str:
    """A duration as OpenAI's x-ratelimit-reset-* headers write it (Go's style): 20ms, 1.5s, 6m0s, 1h0m0s."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    whole_ms = math.ceil(seconds * 1000)
    hours, rest_ms = divmod(whole_ms, 3_600_000)
    minutes, rest_ms = divmod(rest_ms, 60_000)
    secs = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@dataclass
class _Bucket:
    level: float
    at: float

    def refill(self, capacity: int, now: float) -> float:
        """Bring the level up to `now` at capacity/60 per second; a lowered capacity caps it."""
        rate = capacity / 60.0
        self.level = min(float(capacity), self.level + max(0.0, now - self.at) * rate)
        self.at = now
        return self.level


@dataclass(frozen=True)
class Measure:
    """What the x-ratelimit-*-<measure> headers say: the limit, what is left, and when it is full again."""

    limit: int
    remaining: int
    reset_s: float


@dataclass
class _KeyState:
    requests: _Bucket | None = None
    tokens: _Bucket | None = None
    in_flight: int = 0


@dataclass(frozen=True)
class Refusal:
    """Which limit refused a request (`kind`: requests, tokens or concurrency) and for how long."""

    kind: str
    limit: int
    retry_after_s: float


KINDS = ("requests", "tokens", "concurrency")
_PER_MIN = {"requests": "requests per min (RPM)", "tokens": "tokens per min (TPM)"}


class RateLimiter:
    """Buckets and concurrency counts by key id; not thread-safe (the daemon's event loop owns it)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._keys: dict[str, _KeyState] = {}

    def _state(self, key_id: str) -> _KeyState:
        state = self._keys.get(key_id)
        if state is None:
            state = self._keys[key_id] = _KeyState()
        return state

    def _bucket(self, state: _KeyState, kind: str, capacity: int, now: float) -> _Bucket:
        bucket: _Bucket | None = getattr(state, kind)
        if bucket is None:
            bucket = _Bucket(float(capacity), now)  # a key starts with a full minute's allowance
            setattr(state, kind, bucket)
        bucket.refill(capacity, now)
        return bucket

    def check(self, key_id: str, limits: Limits) -> Refusal | None:
        """Admit one request (taking a request and a concurrency slot) or say which limit refuses it.

        Nothing is taken from a key whose request is refused, so a refused retry costs nothing."""
        state = self._state(key_id)
        now = self.clock()
        if limits.concurrent_requests is not None and state.in_flight >= limits.concurrent_requests:
            return Refusal("concurrency", limits.concurrent_requests, 1.0)
        requests = tokens = None
        if limits.requests_per_minute is not None:
            requests = self._bucket(state, "requests", limits.requests_per_minute, now)
            if requests.level < 1.0:
                wait = (1.0 - requests.level) * 60.0 / limits.requests_per_minute
                return Refusal("requests", limits.requests_per_minute, max(MIN_RETRY_S, wait))
        if limits.tokens_per_minute is not None:
            tokens = self._bucket(state, "tokens", limits.tokens_per_minute, now)
            if tokens.level <= 0.0:
                # Until the bucket holds at least one token again.
                wait = (1.0 - tokens.level) * 60.0 / limits.tokens_per_minute
                return Refusal("tokens", limits.tokens_per_minute, max(MIN_RETRY_S, wait))
        if requests is not None:
            requests.level -= 1.0
        state.in_flight += 1
        return None

    def release(self, key_id: str) -> None:
        """The admitted request has ended (its concurrency slot is free)."""
        state = self._keys.get(key_id)
        if state is not None and state.in_flight > 0:
            state.in_flight -= 1

    def charge_tokens(self, key_id: str, limits: Limits, tokens: int) -> None:
        """Take a finished request's real usage (prompt + completion) from the key's token bucket."""
        if limits.tokens_per_minute is None or tokens <= 0:
            return
        bucket = self._bucket(self._state(key_id), "tokens", limits.tokens_per_minute, self.clock())
        bucket.level -= tokens

    def measures(self, key_id: str, limits: Limits) -> dict[str, Measure]:
        """The state of each limited per-minute measure, for the response headers."""
        state = self._state(key_id)
        now = self.clock()
        found: dict[str, Measure] = {}
        for kind, capacity in (("requests", limits.requests_per_minute), ("tokens", limits.tokens_per_minute)):
            if capacity is None:
                continue
            level = self._bucket(state, kind, capacity, now).level
            found[kind] = Measure(capacity, max(0, math.floor(level)), (capacity - level) * 60.0 / capacity)
        return found

    def headers(self, key_id: str, limits: Limits) -> dict[str, str]:
        """x-ratelimit-{limit,remaining,reset}-{requests,tokens}, as OpenAI sends them."""
        out: dict[str, str] = {}
        for kind, m in self.measures(key_id, limits).items():
            out[f"x-ratelimit-limit-{kind}"] = str(m.limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(m.remaining)
            out[f"x-ratelimit-reset-{kind}"] = go_duration(m.reset_s)
        return out

    def in_flight(self, key_id: str) -> int:
        state = self._keys.get(key_id)
        return state.in_flight if state else 0


def refusal_error(key_id: str, refusal: Refusal) -> RateLimited:
    """The 429 a refusal becomes, worded as OpenAI words its rate-limit errors."""
    retry = refusal.retry_after_s
    # Retry-After is whole seconds: rounded up, so a client that obeys it is not refused again.
    whole = float(math.ceil(retry))
    if refusal.kind == "concurrency":
        return RateLimited(f"Concurrency limit reached for key {key_id}: at most {refusal.limit} requests at "
                           f"once. Please try again when one has finished.", retry_after_s=whole,
                           code="concurrency_limit_exceeded",
                           details={"limit": refusal.kind, "value": refusal.limit})
    return RateLimited(f"Rate limit reached for key {key_id} on {_PER_MIN[refusal.kind]}: Limit {refusal.limit}. "
                       f"Please try again in {go_duration(retry)}.", retry_after_s=whole,
                       details={"limit": refusal.kind, "value": refusal.limit})
