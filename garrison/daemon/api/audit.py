"""The audit trail: read and verify the hash chain."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from garrison.daemon.http import json_response, query_int
from garrison.daemon.routing import Route
from garrison.daemon.state import STATE
from garrison.policies.audit import verify_audit


async def list_audit(request: web.Request) -> web.StreamResponse:
    catalog = request.app[STATE].catalog
    limit = query_int(request, "limit", 100, 1, 10000)
    after = query_int(request, "after", 0, 0, 2**62)
    rows = await asyncio.to_thread(
        catalog.query, "SELECT * FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))
    all_rows = await asyncio.to_thread(catalog.query, "SELECT * FROM audit ORDER BY seq")
    intact, broken = verify_audit(all_rows)
    data = [{"seq": r["seq"], "at": r["at"], "actor": r["actor"], "action": r["action"],
             "resource": r["resource"], "outcome": r["outcome"], "detail": json.loads(r["detail"])}
            for r in rows]
    return json_response({"object": "list", "data": data, "chain_intact": intact, "first_broken": broken})


ROUTES = (
    Route("GET", "/v1/garrison/audit", list_audit, "admin",
          "Audit entries and whether the hash chain verifies.", "audit",
          query=(("after", "integer", "entries after this sequence number"),
                 ("limit", "integer", "at most this many (1-10000)"))),
)
