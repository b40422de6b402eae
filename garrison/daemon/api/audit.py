"""The audit trail: read it, and verify its chain, MACs and anchors (garrison.policies.audit)."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from garrison.daemon.http import json_response, query_int
from garrison.daemon.routing import Route
from garrison.daemon.state import STATE
from garrison.policies.audit import TrailMonitor, verify_trail
from garrison.policies.audit_keys import AuditKeys

# One per process, keyed inside by catalog: the list route's verification is incremental (see TrailMonitor).
MONITOR = TrailMonitor()


async def list_audit(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    catalog = state.catalog
    limit = query_int(request, "limit", 100, 1, 10000)
    after = query_int(request, "after", 0, 0, 2**62)
    args: tuple[int, ...]
    if "after" in request.query:  # paging forward from a known entry: the next ones
        sql, args = "SELECT * FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
    else:  # the latest entries, as `garrison audit` shows them: oldest first, newest last
        sql, args = "SELECT * FROM (SELECT * FROM audit ORDER BY seq DESC LIMIT ?) ORDER BY seq", (limit,)
    rows = await asyncio.to_thread(catalog.query, sql, args)
    keys = await asyncio.to_thread(AuditKeys(state.config).verifying)
    report = await asyncio.to_thread(MONITOR.report, catalog, keys)
    data = [{"seq": r["seq"], "at": r["at"], "actor": r["actor"], "action": r["action"],
             "resource": r["resource"], "outcome": r["outcome"], "detail": json.loads(r["detail"])}
            for r in rows]
    return json_response({"object": "list", "data": data, "chain_intact": report.intact,
                          "first_broken": report.broken.seq if report.broken else None,
                          "break_kind": report.broken.kind if report.broken else None,
                          "verified_at": report.checked_at})


async def verify_audit(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    keys = await asyncio.to_thread(AuditKeys(state.config).verifying)
    report = await asyncio.to_thread(verify_trail, state.catalog, keys)
    return json_response({"object": "audit.verification", **report.as_dict()})


ROUTES = (
    Route("GET", "/v1/garrison/audit", list_audit, "admin",
          "Audit entries, oldest first, and whether the trail verifies (`chain_intact`, `first_broken`, "
          "`break_kind`; checked incrementally, the whole trail at least every minute): the latest `limit` "
          "(as `garrison audit` shows them), or with `after` the `limit` entries that follow it.", "audit",
          query=(("after", "integer", "the entries after this sequence number (paging forward)"),
                 ("limit", "integer", "at most this many (1-10000, default 100)"))),
    Route("GET", "/v1/garrison/audit/verify", verify_audit, "admin",
          "Verify the whole audit trail now, as `garrison audit verify`: hashes, MACs, gaps, and the catalog "
          "against the anchor file. 200 with `intact` false, `first_bad_seq`, `kind` and `code` when broken.",
          "audit"),
)
