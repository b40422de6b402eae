"""The model registry over HTTP: the same operations as `garrison models`."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from garrison.daemon.http import json_response, principal, read_json
from garrison.daemon.routing import Route
from garrison.daemon.state import STATE
from garrison.errors import InvalidRequest
from garrison.operations import models as ops


async def list_models(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    records = await asyncio.to_thread(ops.list_models, request.app[STATE], who)
    return json_response({"object": "list", "data": [ops.model_view(who, r) for r in records]})


async def show_model(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    record = await asyncio.to_thread(ops.get_model, request.app[STATE], who, request.match_info["name"])
    data = ops.model_view(who, record)
    loaded = request.app[STATE].manager.stats().get(record.name)
    data["loaded"] = loaded is not None
    if loaded:
        data["runtime"] = loaded
    return json_response(data)


async def import_model(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    settings: Any = body.get("settings") or {}
    if not isinstance(settings, dict):
        raise InvalidRequest("'settings' must be an object", param="settings")
    name, base = body.get("name"), body.get("base")
    if name is not None and not isinstance(name, str):
        raise InvalidRequest("'name' must be a string", param="name")
    if base is not None and not isinstance(base, str):
        raise InvalidRequest("'base' must be a model name", param="base")
    record = await asyncio.to_thread(ops.import_model, request.app[STATE], principal(request), body.get("path", ""),
                                     name, settings=settings, base=base)
    return json_response(record.to_json(), status=201)


async def remove_model(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    who = principal(request)
    record = await asyncio.to_thread(ops.get_model, state, who, request.match_info["name"], scope="admin")
    await state.manager.unload(record.name, reason="removed")
    record = await asyncio.to_thread(ops.remove_model, state, who, record.name)
    return json_response({"id": record.name, "object": "model", "deleted": True})


ROUTES = (
    Route("GET", "/v1/garrison/models", list_models, "read",
          "The models this key is granted, with manifests and settings (import paths for admin keys only).",
          "models"),
    Route("POST", "/v1/garrison/models", import_model, "admin",
          "Import a GGUF file, a Hugging Face folder or an ONNX folder from a path on this machine.", "models",
          body={"type": "object", "required": ["path"],
                "properties": {"path": {"type": "string"}, "name": {"type": "string"},
                               "base": {"type": "string", "description": "for a GGUF LoRA adapter: its base"},
                               "settings": {"type": "object", "properties": {
                                   "n_parallel": {"type": "integer"}, "n_ctx_per_slot": {"type": "integer"},
                                   "n_gpu_layers": {"type": "integer"}, "max_queue": {"type": "integer"},
                                   "gpu": {"type": "integer", "description": "serve on this GPU only"}}}}},
          responses={"201": "imported", "400": "unknown format or invalid name", "409": "name taken"}),
    Route("GET", "/v1/garrison/models/{name}", show_model, "read", "One model, and its runtime state if loaded.",
          "models", responses={"200": "OK", "404": "model not found"}),
    Route("DELETE", "/v1/garrison/models/{name}", remove_model, "admin", "Unload and delete a model.", "models",
          responses={"200": "deleted", "404": "model not found"}),
)
