"""The console's answers: strict headers on every one, errors as pages, a lapsed session back to sign-in.

The Content-Security-Policy allows scripts, styles, images and connections from this origin only,
and no inline script or style at all: pages load /console/static/console.js and console.css, and
the SVG plots are styled by class. Nothing may frame the console.
"""

from __future__ import annotations

from urllib.parse import quote

from aiohttp import web
from aiohttp.typedefs import Handler

from garrison.daemon.http import PRINCIPAL
from garrison.errors import AuthenticationError, GarrisonError, NotFound

PREFIX = "/console"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")

HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # no-referrer would make browsers send "Origin: null" on our own posts
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), interest-cohort=()",
}


def _wants_page(request: web.Request) -> bool:
    """A browser navigating (a link or a form), not a script's fetch() reading JSON."""
    return "text/html" in request.headers.get("Accept", "")


async def _error_page(request: web.Request, err: GarrisonError) -> web.StreamResponse:
    from garrison.daemon.console.templating import render

    if not _wants_page(request):
        raise err  # scripts read the API's JSON error
    if isinstance(err, AuthenticationError):
        target = request.path_qs if request.method == "GET" and request.path not in {PREFIX, PREFIX + "/"} else ""
        location = PREFIX + "/sign-in" + (f"?next={quote(target, safe='')}" if target else "")
        return web.Response(status=303, headers={"Location": location})
    return await render(request, "error.html", request.get(PRINCIPAL), status=err.http_status, error=err)


@web.middleware
async def console_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not (request.path == PREFIX or request.path.startswith(PREFIX + "/")):
        return await handler(request)
    try:
        response = await handler(request)
    except GarrisonError as err:
        response = await _error_page(request, err)
    except web.HTTPNotFound:
        response = await _error_page(request, NotFound(f"No console page {request.path}."))
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    if "Cache-Control" not in response.headers:
        response.headers["Cache-Control"] = "no-store"
    return response
