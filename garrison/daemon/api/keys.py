"""API keys over HTTP: the same operations as `garrison keys`."""

from __future__ import annotations

import asyncio

from aiohttp import web

from garrison.daemon.http import json_response, principal, read_json
from garrison.daemon.routing import Route
from garrison.daemon.state import STATE
from garrison.daemon.usage import RECORDER
from garrison.errors import InvalidRequest
from garrison.operations import keys as ops
from garrison.operations.usage import GROUPINGS, usage_report
from garrison.policies.scopes import ROLES


def _str_list(body: dict[str, object], name: str) -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"'{name}' must be a list of names", param=name)
    return list(value)


async def list_keys(request: web.Request) -> web.StreamResponse:
    records = await asyncio.to_thread(ops.list_keys, request.app[STATE].keys, principal(request))
    return json_response({"object": "list", "data": [r.to_json() for r in records]})


async def create_key(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    role = body.get("role")
    if not isinstance(role, str):
        raise InvalidRequest("'role' is required", param="role")
    name = body.get("name", "")
    expires = body.get("expires")
    if not isinstance(name, str) or (expires is not None and not isinstance(expires, str)):
        raise InvalidRequest("'name' and 'expires' must be strings")
    record, secret = await asyncio.to_thread(
        ops.create_key, request.app[STATE].keys, principal(request), role, name=name, models=_str_list(body, "models"),
        datasets=_str_list(body, "datasets"), expires=expires)
    return json_response({**record.to_json(), "key": secret}, status=201)


async def revoke_key(request: web.Request) -> web.StreamResponse:
    record = await asyncio.to_thread(ops.revoke_key, request.app[STATE].keys, principal(request),
                                     request.match_info["key_id"])
    return json_response(record.to_json())


async def key_usage(request: web.Request) -> web.StreamResponse:
    await request.app[RECORDER].flush_async()  # the report includes the last few seconds too
    query = request.query
    report = await asyncio.to_thread(usage_report, request.app[STATE].catalog, key_id=query.get("key"),
                                     since=query.get("since"), by=query.get("by", "model"))
    return json_response(report)


ROUTES = (
    Route("GET", "/v1/garrison/keys", list_keys, "admin", "List API keys (never their secrets).", "keys"),
    Route("POST", "/v1/garrison/keys", create_key, "admin",
          "Create a key; the response holds the secret, shown this once.", "keys",
          body={"type": "object", "required": ["role"],
                "properties": {"role": {"type": "string", "enum": list(ROLES)}, "name": {"type": "string"},
                               "models": {"type": "array", "items": {"type": "string"}},
                               "datasets": {"type": "array", "items": {"type": "string"}},
                               "expires": {"type": "string", "description": "30d, 12h or ISO-8601"}}},
          responses={"201": "created", "400": "invalid role, grant or expiry",
                     "403": "a grant wider than the creating key's own"}),
    Route("GET", "/v1/garrison/keys/usage", key_usage, "admin",
          "Requests and tokens (prompt, completion) used by each key, per model (or per key, day or hour).",
          "keys", query=(("key", "string", "only this key id"),
                         ("since", "string", "90m, 12h, 7d, 2w, all (default) or an ISO date"),
                         ("by", "string", f"grouping: {', '.join(GROUPINGS)} (default model)")),
          responses={"200": "OK", "400": "invalid since or by", "404": "no such key"}),
    Route("DELETE", "/v1/garrison/keys/{key_id}", revoke_key, "admin", "Revoke a key.", "keys",
          responses={"200": "revoked", "404": "no such key"}),
)
