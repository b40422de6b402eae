"""Small request/response helpers shared by the route handlers."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from garrison.errors import InvalidRequest, PayloadTooLarge
from garrison.policies.keys import Principal

PRINCIPAL = web.RequestKey("principal", Principal)


def principal(request: web.Request) -> Principal:
    found: Principal = request[PRINCIPAL]
    return found


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, with a clear 400/413 for anything else."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body larger than {request.app._client_max_size} bytes") from None
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    return body


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers,
                             dumps=lambda o: json.dumps(o, separators=(",", ":"), default=str))


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"query parameter {name!r} must be an integer", param=name) from None
    if not low <= value <= high:
        raise InvalidRequest(f"query parameter {name!r} must be between {low} and {high}", param=name)
    return value


def query_float(request: web.Request, name: str, default: float, low: float, high: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"query parameter {name!r} must be a number", param=name) from None
    if not low <= value <= high:
        raise InvalidRequest(f"query parameter {name!r} must be between {low:g} and {high:g}", param=name)
    return value
