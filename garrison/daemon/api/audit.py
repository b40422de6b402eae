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
    args: tuple[int, ...]
    if "after" in request.query:  # paging forward from a known entry: the next ones
        sql, args = "SELECT * FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
    else:  # the latest entries, as `garrison audit` shows them: oldest first, newest last
        sql, args = "SELECT * FROM (SELECT * FROM audit ORDER BY seq DESC LIMIT ?) ORDER BY seq", (limit,)
    rows = await asyncio.to_thread(catalog.query, sql, args)
    all_rows = await asyncio.to_thread(catalog.query, "SELECT * FROM audit ORDER BY seq")
    intact, broken = verify_audit(all_rows)
    data = [{"seq": r["seq"], "at": r["at"], "actor": r["actor"], "action": r["action"],
             "resource": r["resource"], "outcome": r["outcome"], "detail": json.loads(r["detail"])}
            for r in rows]
    return json_response({"object": "list", "data": data, "chain_intact": intact, "first_broken": broken})


ROUTES = (
    Route("GET", "/v1/garrison/audit", list_audit, "admin",
          "Audit entries, oldest first, and whether the whole hash chain verifies: the latest `limit` "
          "(as `garrison audit` shows them), or with `after` the `limit` entries that follow it.", "audit",
          query=(("after", "integer", "the entries after this sequence number (paging forward)"),
                 ("limit", "integer", "at most this many (1-10000, default 100)"))),
)
