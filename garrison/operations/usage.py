"""Per-key token usage: recorded in batches by the daemon, reported by `garrison keys usage` and
GET /v1/garrison/keys/usage (one function, `usage_report`, for both).

The daemon's hot path only adds to a dictionary (`UsageRecorder.add`); a background task writes
what gathered to the catalog's `key_usage` table (per key, model and UTC hour) in one transaction
every few seconds and at shutdown, so no request waits on SQLite. The price: a daemon killed with
SIGKILL loses at most the last few seconds of counts (counts, never data anyone was promised).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from garrison.errors import GarrisonError, InvalidRequest
from garrison.logs import log_event
from garrison.policies.keys import KeyStore
from garrison.store.catalog import Catalog

log = logging.getLogger("garrison.usage")

FLUSH_EVERY_S = 5.0
_HOUR = 3600
_DAY = 86400
_AGO = re.compile(r"^(\d+)\s*([mhdw])$")
_UNIT_S = {"m": 60, "h": _HOUR, "d": _DAY, "w": 7 * _DAY}


@dataclass
class Counts:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class UsageRecorder:
    """Counts gathered in memory and written to the catalog in batches."""

    def __init__(self, catalog: Catalog, clock: Callable[[], float] = time.time) -> None:
        self.catalog = catalog
        self.clock = clock
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str, int], Counts] = {}

    def add(self, key_id: str, model: str, prompt_tokens: int, completion_tokens: int, requests: int = 1) -> None:
        hour = int(self.clock()) // _HOUR * _HOUR
        with self._lock:
            counts = self._pending.get((key_id, model, hour))
            if counts is None:
                counts = self._pending[(key_id, model, hour)] = Counts()
            counts.requests += requests
            counts.prompt_tokens += prompt_tokens
            counts.completion_tokens += completion_tokens

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> int:
        """Write what gathered in one transaction; on failure keep it for the next try. Returns rows written."""
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return 0
        rows = [{"key_id": k, "model": m, "hour": h, "requests": c.requests, "prompt": c.prompt_tokens,
                 "completion": c.completion_tokens} for (k, m, h), c in batch.items()]
        try:
            with self.catalog.write() as conn:
                conn.executemany(
                    "INSERT INTO key_usage (key_id, model, hour, requests, prompt_tokens, completion_tokens) "
                    "VALUES (:key_id, :model, :hour, :requests, :prompt, :completion) "
                    "ON CONFLICT (key_id, model, hour) DO UPDATE SET "
                    "requests = requests + excluded.requests, "
                    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                    "completion_tokens = completion_tokens + excluded.completion_tokens", rows)
        except BaseException:
            with self._lock:
                for where, counts in batch.items():
                    kept = self._pending.setdefault(where, Counts())
                    kept.requests += counts.requests
                    kept.prompt_tokens += counts.prompt_tokens
                    kept.completion_tokens += counts.completion_tokens
            raise
        return len(rows)

    async def flush_async(self) -> int:
        return await asyncio.to_thread(self.flush)

    async def run(self, stop: asyncio.Event, every_s: float = FLUSH_EVERY_S) -> None:
        """Flush every `every_s` until `stop`, then once more."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
            try:
                await self.flush_async()
            except (GarrisonError, OSError, sqlite3.Error) as exc:  # the batch is kept and retried
                log_event(log, "usage.flush_failed", level=logging.WARNING, error=str(exc)[:200],
                          pending=self.pending)


def parse_since(text: str | None, now: float | None = None) -> float | None:
    """`90m`, `12h`, `7d`, `2w` ago, or an ISO-8601 date/time (UTC unless it says); None or "all": everything."""
    if text is None or not text.strip() or text.strip().lower() == "all":
        return None
    now = time.time() if now is None else now
    raw = text.strip().lower()
    match = _AGO.match(raw)
    if match:
        return now - int(match.group(1)) * _UNIT_S[match.group(2)]
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidRequest(f"cannot read --since {text!r}: use 90m, 12h, 7d, 2w, all or an ISO date",
                             param="since", code="invalid_since") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _iso(stamp: int) -> str:
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# The report's groupings (`by`): the columns each row is one of, and each column's SQL.
GROUPINGS: dict[str, tuple[str, ...]] = {
    "key": ("key_id",),
    "model": ("key_id", "model"),
    "day": ("key_id", "model", "day"),
    "hour": ("key_id", "model", "hour"),
}
_COLUMN_SQL = {"key_id": "u.key_id", "model": "u.model", "day": f"u.hour - u.hour % {_DAY}", "hour": "u.hour"}


def usage_report(catalog: Catalog, *, key_id: str | None = None, since: str | None = None,
                 by: str = "model", now: float | None = None) -> dict[str, Any]:
    """Requests and tokens per key (and model, day or hour, as `by` says) since a moment.

    Counts are kept per hour: `since` takes in the whole hour it falls in."""
    if by not in GROUPINGS:
        raise InvalidRequest(f"'by' must be one of {', '.join(GROUPINGS)}", param="by", code="invalid_grouping")
    if key_id is not None:
        KeyStore(catalog).get(key_id)  # a typo is a 404, not an empty report
    start = parse_since(since, now)
    first_hour = int(start) // _HOUR * _HOUR if start is not None else None
    where: list[str] = []
    params: list[str | int] = []
    if key_id is not None:
        where.append("u.key_id = ?")
        params.append(key_id)
    if first_hour is not None:
        where.append("u.hour >= ?")
        params.append(first_hour)
    group = [_COLUMN_SQL[c] for c in GROUPINGS[by]]
    selected = ", ".join(f"{_COLUMN_SQL[c]} AS {c}" for c in GROUPINGS[by])
    rows = catalog.query(
        f"SELECT {selected}, k.name AS key_name, k.role AS role, SUM(u.requests) AS requests, "
        "SUM(u.prompt_tokens) AS prompt_tokens, SUM(u.completion_tokens) AS completion_tokens, "
        "MIN(u.hour) AS first_hour, MAX(u.hour) AS last_hour "
        "FROM key_usage u LEFT JOIN api_keys k ON k.id = u.key_id "
        f"{'WHERE ' + ' AND '.join(where) if where else ''} "
        f"GROUP BY {', '.join(group)} ORDER BY {', '.join(group)}", tuple(params))
    data = []
    totals = Counts()
    for r in rows:
        item: dict[str, Any] = {"key_id": r["key_id"], "key_name": r["key_name"] or "", "role": r["role"]}
        for column in GROUPINGS[by][1:]:
            item[column] = _iso(int(r[column])) if column in ("day", "hour") else r[column]
        item.update({"requests": r["requests"], "prompt_tokens": r["prompt_tokens"],
                     "completion_tokens": r["completion_tokens"],
                     "total_tokens": r["prompt_tokens"] + r["completion_tokens"],
                     "first_hour": _iso(r["first_hour"]), "last_hour": _iso(r["last_hour"])})
        data.append(item)
        totals.requests += r["requests"]
        totals.prompt_tokens += r["prompt_tokens"]
        totals.completion_tokens += r["completion_tokens"]
    return {"object": "list", "by": by, "since": _iso(first_hour) if first_hour is not None else None,
            "key_id": key_id, "data": data,
            "totals": {"requests": totals.requests, "prompt_tokens": totals.prompt_tokens,
                       "completion_tokens": totals.completion_tokens,
                       "total_tokens": totals.prompt_tokens + totals.completion_tokens}}
