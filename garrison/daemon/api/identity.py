"""The appliance's public keys over HTTP: what data producers seal to, what manifests are signed with."""

from __future__ import annotations

import asyncio

from aiohttp import web

from garrison.crypto.identity import IdentityCache
from garrison.daemon.http import json_response
from garrison.daemon.routing import Route
from garrison.daemon.state import STATE

# Used until the daemon state carries its own cache (an `identity_cache` attribute wins): loading
# needs the master key and an AES-GCM open, so it is done once per state folder, not per request.
_FALLBACK_CACHE = IdentityCache()


def identity_cache(app: web.Application) -> IdentityCache:
    """The daemon's identity cache: `state.identity_cache` when present, else the module's."""
    cache = getattr(app[STATE], "identity_cache", None)
    return cache if isinstance(cache, IdentityCache) else _FALLBACK_CACHE


async def get_identity(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    identity = await asyncio.to_thread(identity_cache(request.app).get, state.config)
    return json_response(identity.public_json())


ROUTES = (
    Route("GET", "/v1/garrison/identity", get_identity, "read",
          "The appliance's age recipient (seal data for it) and its Ed25519 signing public key (hex).",
          "identity",
          responses={"200": "{recipient, signing_public_key}", "500": "master key missing or wrong"}),
)
