"""Responses kept on the appliance (OpenAI's Responses API with `store`), for `previous_response_id`.

A stored response is one catalog row (`responses`) whose body, the conversation so far as chat messages,
the input items and the response object, is sealed with AES-256-GCM under a random key of its own. The
key is kept wrapped by the master key beside the vault's other keys (`wrapped_keys`, purpose "response"),
so a master-key rotation rewraps it and a copy of the catalog without the master key reads nothing. The
response id is the associated data: a body cannot be moved under another id. Deleting or expiring a
response destroys its key first (crypto-shredding) and the row's freed pages are zeroed.

A response belongs to the key that made it: to any other key it does not exist (404), so ids cannot be
probed. Retention (`responses_retention_days`) is read at each sweep and each read, so a reload applies
to responses already stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from garrison.errors import GarrisonError, IntegrityError, NotFound
from garrison.ingest.vault import Vault
from garrison.logs import log_event
from garrison.store.catalog import Catalog

log = logging.getLogger("garrison.responses")

PURPOSE = "response"
_NONCE = 12
_AAD = b"garrison-response-v1:"
#: A key wrapped for a response whose row never landed (a crash between the two) is removed after this.
_ORPHAN_AFTER_S = 3600.0
#: Expired responses are swept at most this often (each create asks; the sweep runs off the event loop).
SWEEP_EVERY_S = 60.0


@dataclass(frozen=True)
class StoredResponse:
    id: str
    key_id: str
    model: str
    created_at: float
    response: dict[str, Any]
    messages: list[dict[str, Any]]  # the conversation through this response, as chat messages (no instructions)
    input_items: list[dict[str, Any]]


class ResponseStore:
    """Sealed responses in the catalog; `retention_days` is asked each time (the live setting)."""

    def __init__(self, catalog: Catalog, vault: Vault, retention_days: Callable[[], float]) -> None:
        self.catalog = catalog
        self.vault = vault
        self.retention_days = retention_days
        self._last_sweep = 0.0
        self._sweep_lock = threading.Lock()

    def _cutoff(self, now: float) -> float:
        return now - self.retention_days() * 86400.0

    def save(self, record: StoredResponse) -> None:
        key = self.vault.secret(PURPOSE, record.id)
        plain = json.dumps({"response": record.response, "messages": record.messages,
                            "input_items": record.input_items}, separators=(",", ":")).encode()
        nonce = secrets.token_bytes(_NONCE)
        sealed = nonce + AESGCM(key).encrypt(nonce, plain, _AAD + record.id.encode())
        with self.catalog.write() as conn:
            conn.execute("INSERT INTO responses (id, key_id, model, created_at, body) VALUES (?, ?, ?, ?, ?)",
                         (record.id, record.key_id, record.model, record.created_at, sealed))

    def load(self, response_id: str, key_id: str) -> StoredResponse:
        row = self.catalog.query_one("SELECT key_id, model, created_at, body FROM responses WHERE id = ?",
                                     (response_id,))
        if row is None or row["key_id"] != key_id or float(row["created_at"]) < self._cutoff(time.time()):
            raise NotFound(f"no response with id {response_id!r}", code="response_not_found")
        key = self.vault.secret(PURPOSE, response_id)
        blob = bytes(row["body"])
        try:
            plain = AESGCM(key).decrypt(blob[:_NONCE], blob[_NONCE:], _AAD + response_id.encode())
        except InvalidTag:
            raise IntegrityError(f"stored response {response_id} does not decrypt (altered or moved)",
                                 code="response_corrupt") from None
        data = json.loads(plain)
        return StoredResponse(response_id, str(row["key_id"]), str(row["model"]), float(row["created_at"]),
                              data["response"], data["messages"], data["input_items"])

    def delete(self, response_id: str, key_id: str) -> None:
        row = self.catalog.query_one("SELECT key_id FROM responses WHERE id = ?", (response_id,))
        if row is None or row["key_id"] != key_id:
            raise NotFound(f"no response with id {response_id!r}", code="response_not_found")
        self._shred([response_id])

    def _shred(self, ids: list[str]) -> None:
        """Keys first, in the same transaction as the rows; freed pages zeroed, the WAL truncated."""
        if not ids:
            return
        with self.catalog.write() as conn:
            conn.execute("PRAGMA secure_delete=ON")
            for rid in ids:
                conn.execute("DELETE FROM wrapped_keys WHERE purpose = ? AND id = ?", (PURPOSE, rid))
                conn.execute("DELETE FROM responses WHERE id = ?", (rid,))
        with self.catalog._lock:  # the WAL holds the deleted pages until a checkpoint (as the vault's shredding)
            self.catalog.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def expire(self, now: float | None = None) -> int:
        """Shred every response older than the retention, and keys left without a row by a crash."""
        now = time.time() if now is None else now
        expired = [str(r[0]) for r in self.catalog.query("SELECT id FROM responses WHERE created_at < ?",
                                                         (self._cutoff(now),))]
        orphans = [str(r[0]) for r in self.catalog.query(
            "SELECT id FROM wrapped_keys WHERE purpose = ? AND created_at < ? "
            "AND id NOT IN (SELECT id FROM responses)", (PURPOSE, now - _ORPHAN_AFTER_S))]
        self._shred(expired + orphans)
        return len(expired)

    def sweep_if_due(self, min_interval_s: float = SWEEP_EVERY_S) -> int:
        """`expire`, at most once every `min_interval_s` (asked on every create, and by the daemon's timer)."""
        with self._sweep_lock:
            now = time.time()
            if now - self._last_sweep < min_interval_s:
                return 0
            self._last_sweep = now
        return self.expire(now)


async def sweep_periodically(store: Callable[[], ResponseStore], stop: asyncio.Event,
                             every_s: float = SWEEP_EVERY_S) -> None:
    """Expired responses are shredded on time even when nobody creates a new one (a sweep asked only on create
    would keep them, sealed but present, for as long as the endpoint is idle). Off the event loop; a failed
    sweep is logged and tried again at the next tick."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_s)
        if stop.is_set():
            return
        try:
            swept = await asyncio.to_thread(store().sweep_if_due, every_s / 2)
        except (GarrisonError, sqlite3.Error, OSError) as exc:
            log_event(log, "responses.sweep_failed", level=logging.ERROR, error=str(exc)[:300])
            continue
        if swept:
            log_event(log, "responses.expired", count=swept)
