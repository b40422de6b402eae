"""Small request/response helpers shared by the route handlers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from garrison.daemon.state import STATE
from garrison.errors import InvalidRequest, PayloadTooLarge, RequestTimeout
from garrison.policies.keys import Principal

PRINCIPAL = web.RequestKey("principal", Principal)


def principal(request: web.Request) -> Principal:
    found: Principal = request[PRINCIPAL]
    return found


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The body, at most `limit` bytes. Read here rather than by aiohttp's `request.read()`, whose limit
    (`client_max_size`) is fixed when the app is made: `max_request_mb` is read per request, so a
    SIGHUP that changes it applies to the next request."""
    def too_large() -> PayloadTooLarge:
        return PayloadTooLarge(f"request body larger than max_request_mb ({limit} bytes)")

    if request.content_length is not None and request.content_length > limit:
        raise too_large()  # refused before a byte of the body is read
    body = bytearray()
    while chunk := await request.content.readany():
        body.extend(chunk)
        if len(body) > limit:
            raise too_large()
    return bytes(body)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, with a clear 400/413 for anything else."""
    config = request.app[STATE].config
    try:
        raw = await asyncio.wait_for(_read_body(request, int(config.max_request_mb * 1024 * 1024)),
                                     config.body_timeout_s)
    except TimeoutError:
        raise RequestTimeout("the request body did not arrive in time (body_timeout_s)") from None
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        # The C parser stops at Python's recursion limit (about 1,000 levels) at once, whatever the size.
        raise InvalidRequest("request body is nested too deeply", code="json_too_deep") from None
    except ValueError as exc:  # an integer beyond sys.get_int_max_str_digits() (4,300 digits)
        raise InvalidRequest(f"request body has a number too large to read ({str(exc)[:80]})",
                             code="number_too_large") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    _refuse_lone_surrogates(body)
    return body


def _refuse_lone_surrogates(body: dict[str, Any]) -> None:
    """JSON's \\uD800 escapes decode to strings that are not Unicode text: refused here, with the field
    named, instead of failing later (a tokenizer, a log line, SQLite) as a 500."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            texts: list[tuple[str, str]] = []
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                texts.append((where, key))
                stack.append((where, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
            continue
        elif isinstance(value, str):
            texts = [(path, value)]
        else:
            continue
        for where, text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                field = where.split(".", 1)[0].split("[", 1)[0]
                raise InvalidRequest(f"{where!r} holds a lone UTF-16 surrogate (not Unicode text)",
                                     code="invalid_unicode", param=field) from None


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
