"""The tamper-evident audit trail: an append-only hash chain in the catalog.

Each entry's hash covers its content and the previous entry's hash, so changing or
removing any entry breaks verification from that point on. Entries never hold key
material or record contents: only ids, actions and outcomes.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

GENESIS = "0" * 64


def _entry_hash(prev_hash: str, at: float, actor: str, action: str, resource: str, outcome: str,
                detail: str) -> str:
    payload = json.dumps([prev_hash, repr(at), actor, action, resource, outcome, detail],
                         separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def append_audit(conn: sqlite3.Connection, *, actor: str, action: str, resource: str = "",
                 outcome: str = "ok", detail: dict[str, Any] | None = None) -> None:
    """Append inside the caller's write transaction, so the entry and the change land together."""
    row = conn.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    prev = row[0] if row else GENESIS
    at = time.time()
    detail_text = json.dumps(detail or {}, sort_keys=True, separators=(",", ":"))
    digest = _entry_hash(prev, at, actor, action, resource, outcome, detail_text)
    conn.execute(
        "INSERT INTO audit (at, actor, action, resource, outcome, detail, prev_hash, hash)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (at, actor, action, resource, outcome, detail_text, prev, digest))


def verify_audit(rows: Iterable[sqlite3.Row]) -> tuple[bool, int | None]:
    """(intact, first broken seq) over all audit rows in `seq` order."""
    prev = GENESIS
    for row in rows:
        expected = _entry_hash(prev, row["at"], row["actor"], row["action"], row["resource"],
                               row["outcome"], row["detail"])
        if row["prev_hash"] != prev or row["hash"] != expected:
            return False, int(row["seq"])
        prev = row["hash"]
    return True, None
