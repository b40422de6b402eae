"""Cross-cutting rules, in order: metrics, error mapping, authentication, rate limits.

`errors` is the single place a `GarrisonError` becomes an HTTP response (OpenAI's error
shape; Ollama's under /api/), `auth` the single place a route's scope is enforced, and
`rate_limit` the single place a key's limits are applied (garrison.policies.rate_limits) and
its usage counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from garrison.daemon.console import sessions as console_sessions
from garrison.daemon.http import PRINCIPAL, json_response
from garrison.daemon.metrics import METRICS
from garrison.daemon.routing import Route
from garrison.daemon.state import STATE
from garrison.daemon.usage import ADMITTED, LIMITER, RECORDER, USAGE, Admitted, RequestUsage
from garrison.errors import GarrisonError, NotFound, Unavailable
from garrison.logs import log_event
from garrison.policies.access import authorize
from garrison.policies.rate_limits import refusal_error
from garrison.serving.ollama_format import error_body as ollama_error_body

log = logging.getLogger("garrison.http")

ROUTE_TABLE = web.AppKey("route_table", dict[tuple[str, str], Route])


def _route_label(request: web.Request) -> str:
    info = request.match_info
    if info.http_exception is not None:
        return "unmatched"
    resource = info.route.resource
    return resource.canonical if resource is not None else "unmatched"


# The error object each API's clients read, by path prefix (first match); OpenAI's everywhere else.
ERROR_SHAPES: tuple[tuple[str, Callable[[dict[str, Any]], dict[str, Any]]], ...] = (
    ("/api/", ollama_error_body),  # Ollama's clients raise the string under "error"
)


def _shaped(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
    for prefix, shape in ERROR_SHAPES:
        if request.path.startswith(prefix):
            return shape(body)
    return body


def _error_response(request: web.Request, err: GarrisonError) -> web.Response:
    headers = {}
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(err.retry_after_s)))
    return json_response(_shaped(request, err.to_openai()), status=err.http_status, headers=headers)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app[METRICS]
    state = request.app[STATE]
    route = _route_label(request)
    if state.shutting_down.is_set():
        # Arrived on a kept-alive connection after SIGTERM: not in flight, so refuse it.
        metrics.requests.labels(request.method, route, "503").inc()
        err = Unavailable("Garrison is shutting down; retry shortly.", code="shutting_down")
        response = json_response(_shaped(request, err.to_openai()), status=503,
                                 headers={"Connection": "close", "Retry-After": "5"})
        return response
    started = time.perf_counter()
    status = 500
    metrics.in_flight.inc()
    state.in_flight += 1
    try:
        result = await handler(request)
        status = result.status
        return result
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    finally:
        metrics.in_flight.dec()
        state.in_flight -= 1
        elapsed = time.perf_counter() - started
        metrics.requests.labels(request.method, route, str(status)).inc()
        metrics.latency.labels(request.method, route).observe(elapsed)
        if route != "/health":
            log_event(log, "http.request", method=request.method, route=route, status=status,
                      ms=round(elapsed * 1000, 1),
                      key=getattr(request.get(PRINCIPAL), "key_id", "-"))


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GarrisonError as err:
        return _error_response(request, err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status, f"http_{exc.status}")
        message = {404: f"No route {request.method} {request.path}.",
                   405: f"Method {request.method} is not allowed on {request.path}.",
                   413: "Request body too large."}.get(exc.status, exc.reason)
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                          "code": code}}
        return json_response(_shaped(request, body), status=exc.status)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error", extra={"event": "http.unhandled_error",
                                                "fields": {"route": _route_label(request)}})
        body = {"error": {"message": "Internal server error; see the daemon's log.",
                          "type": "server_error", "param": None, "code": "internal_error"}}
        return json_response(_shaped(request, body), status=500)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("X-Api-Key") or None


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    info = request.match_info
    route = None
    if info.http_exception is None and info.route.resource is not None:
        route = request.app[ROUTE_TABLE].get((info.route.method, info.route.resource.canonical))
    if route is not None and route.scope is None:
        return await handler(request)
    # A key in the headers, else a web console session (CSRF-checked when it changes anything).
    principal = await console_sessions.authenticate(request, _bearer(request))
    request[PRINCIPAL] = principal
    if route is None:
        # Unknown path or method: only a caller with a key learns that it does not exist.
        if info.http_exception is not None:
            raise info.http_exception
        raise NotFound(f"No route {request.method} {request.path}.")
    assert route.scope is not None
    authorize(principal, route.scope)
    return await handler(request)


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """After authentication, on every route with a key: admit under the key's limits, then charge
    the token bucket and record the usage the handler noted (a stream's when it has ended)."""
    who = request.get(PRINCIPAL)
    if who is None:  # /health and other routes without a key
        return await handler(request)
    app = request.app
    limits = app[STATE].policy.rate_limits.limits_for(who.key_id, who.role)
    limiter = app[LIMITER]
    if limits.any:
        refusal = limiter.check(who.key_id, limits)
        request[ADMITTED] = Admitted(who.key_id, limits, refusal)
        if refusal is not None:
            app[METRICS].rate_limited.labels(who.key_id, refusal.kind).inc()
            raise refusal_error(who.key_id, refusal)
    usage = request[USAGE] = RequestUsage()
    try:
        return await handler(request)
    finally:
        if limits.any:
            limiter.release(who.key_id)
        if usage.noted and usage.model is not None:
            limiter.charge_tokens(who.key_id, limits, usage.total)
            app[RECORDER].add(who.key_id, usage.model, usage.prompt_tokens, usage.completion_tokens)
            tokens = app[METRICS].key_tokens
            tokens.labels(who.key_id, "prompt").inc(usage.prompt_tokens)
            tokens.labels(who.key_id, "completion").inc(usage.completion_tokens)
