"""Routes as data: method, path, handler, scope and documentation in one table.

The router, the authentication middleware, the OpenAPI document and the tests all read
`Route` rows, so a route cannot exist without a scope or without documentation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    scope: str | None  # None only for /health
    summary: str
    tag: str
    body: dict[str, Any] | None = None  # the request body's schema (JSON Schema), in the media type below
    body_type: str = "application/json"
    query: tuple[tuple[str, str, str], ...] = ()  # (name, json type, description)
    responses: dict[str, str] = field(default_factory=lambda: {"200": "OK"})
    streaming: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.method, self.path)
