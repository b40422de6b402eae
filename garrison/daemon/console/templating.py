"""The console's pages: one autoescaping Jinja environment over the package's templates, and the
navigation, shown to a key only where its scopes reach."""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from typing import Any

import jinja2
from aiohttp import web

from garrison import __version__
from garrison.daemon.console.sessions import current_session
from garrison.policies.keys import Principal


@dataclass(frozen=True)
class NavItem:
    path: str
    label: str
    scope: str


# The pages in the navigation, in order; each is shown to keys holding its scope.
NAV: tuple[NavItem, ...] = (
    NavItem("/console", "Overview", "read"),
    NavItem("/console/models", "Models", "read"),
    NavItem("/console/datasets", "Datasets", "read"),
    NavItem("/console/jobs", "Jobs", "read"),
    NavItem("/console/evaluations", "Evaluations", "read"),
    NavItem("/console/keys", "Keys", "admin"),
    NavItem("/console/audit", "Audit", "admin"),
    NavItem("/console/chat", "Chat", "infer"),
)


def home_for(who: Principal) -> str:
    return next((item.path for item in NAV if item.scope in who.scopes), "/console/sign-in")


def _when(stamp: float | int | None) -> str:
    if not stamp:
        return "–"
    return datetime.datetime.fromtimestamp(float(stamp), datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(stamp: float | int | None) -> str:
    if not stamp:
        return "–"
    return _duration(time.time() - float(stamp)) + " ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = max(0.0, float(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _size(value: float | int | None) -> str:
    if value is None:
        return "–"
    number = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(number) < 1024 or unit == "TiB":
            return f"{number:.0f} {unit}" if unit == "B" else f"{number:.1f} {unit}"
        number /= 1024
    return str(value)


ENV = jinja2.Environment(loader=jinja2.PackageLoader("garrison.daemon.console", "templates"),
                         autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
ENV.filters.update(when=_when, ago=_ago, duration=_duration, size=_size)


async def render(request: web.Request, template: str, who: Principal | None, *, status: int = 200,
                 **context: Any) -> web.Response:
    session = await current_session(request) if who is not None else None
    context.setdefault("notice", None)
    nav = [item for item in NAV if who is not None and item.scope in who.scopes]
    html = ENV.get_template(template).render(
        who=who, nav=nav, here=request.path, csrf=session.csrf if session else "", version=__version__,
        session_expires=session.expires_at if session else None, **context)
    return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")
