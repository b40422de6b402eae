"""CORS: which browser pages may call the API, decided once for every route.

A page served from another origin (a local web UI on http://localhost:3000) can call the API
only if the daemon says so. Before a request that carries a key (an Authorization header) or
JSON, the browser sends a preflight: OPTIONS with Origin and Access-Control-Request-Method,
and never the key. So the preflight is answered here, ahead of authentication; the request
that follows still needs its key like any other.

Origins come from the `cors_origins` setting (none by default: no page elsewhere may call).
Responses to an allowed origin carry Access-Control-Allow-Origin (on every response, errors
and streams included, through on_response_prepare); others carry nothing, so the browser
keeps the answer from the page. Access-Control-Allow-Credentials is never sent: keys travel in
a header the page sets itself, and cookies (the console's session) must never authorize a
cross-origin call. For the same reason `*` is safe to allow: it opens reading, never a session.
"""

from __future__ import annotations

import re

from aiohttp import web
from aiohttp.typedefs import Handler

from garrison.daemon.state import STATE
from garrison.errors import PermissionDenied

#: Methods a page may use; each route still decides what it answers to.
ALLOWED_METHODS = "GET, POST, PUT, PATCH, DELETE"
#: Response headers a page may read besides the CORS-safelisted ones (rate-limit state, waits).
EXPOSED_HEADERS = ("Retry-After, retry-after-ms, x-ratelimit-limit-requests, x-ratelimit-limit-tokens, "
                   "x-ratelimit-remaining-requests, x-ratelimit-remaining-tokens, x-ratelimit-reset-requests, "
                   "x-ratelimit-reset-tokens")
#: How long a browser may cache a preflight's answer (seconds).
PREFLIGHT_MAX_AGE = "600"
_HEADER_NAMES = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*$")


def allowed_origin(origin: str | None, allowed: tuple[str, ...]) -> str | None:
    """The Access-Control-Allow-Origin value for this request's Origin, or None when it is not allowed."""
    if not origin or not allowed:
        return None
    if "*" in allowed:
        return "*"
    return origin if origin.rstrip("/").lower() in allowed else None


def _is_preflight(request: web.Request) -> bool:
    return (request.method == "OPTIONS" and "Origin" in request.headers
            and "Access-Control-Request-Method" in request.headers)


class CorsOriginNotAllowed(PermissionDenied):
    """A browser preflight from an origin the cors_origins setting does not list."""

    code = "cors_origin_not_allowed"


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answers preflights (before authentication: they never carry a key); other requests pass through."""
    if not _is_preflight(request):
        return await handler(request)
    origin = request.headers["Origin"]
    allow = allowed_origin(origin, request.app[STATE].config.cors_origins)
    if allow is None:
        raise CorsOriginNotAllowed(f"origin {origin[:200]!r} may not call this API from a browser; the operator "
                                   "lists the origins that may in the cors_origins setting")
    headers = {"Access-Control-Allow-Methods": ALLOWED_METHODS, "Access-Control-Max-Age": PREFLIGHT_MAX_AGE}
    # The page's own headers (Authorization, Content-Type, the openai client's x-stainless-*): reflected,
    # which is safe because no ambient credential (cookie) is ever allowed along.
    wanted = request.headers.get("Access-Control-Request-Headers", "").strip()
    if wanted and _HEADER_NAMES.match(wanted):
        headers["Access-Control-Allow-Headers"] = wanted
    return web.Response(status=204, headers=headers)


async def _cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every response (errors and event streams too) to an allowed origin says so."""
    allowed = request.app[STATE].config.cors_origins
    if not allowed:
        return
    if "*" not in allowed:
        response.headers.add("Vary", "Origin")  # the answer depends on the Origin: caches must keep them apart
    allow = allowed_origin(request.headers.get("Origin"), allowed)
    if allow is not None:
        response.headers["Access-Control-Allow-Origin"] = allow
        if not _is_preflight(request):
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS


def install(app: web.Application) -> None:
    """The header hook; cors_middleware goes into the app's middleware list, ahead of authentication."""
    app.on_response_prepare.append(_cors_headers)
