"""The model registry over HTTP: the same operations as `garrison models`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from garrison.daemon.http import json_response, principal, read_json
from garrison.daemon.routing import Route
from garrison.daemon.state import STATE
from garrison.errors import InvalidRequest
from garrison.models.names import check_model_id, check_name


async def list_models(request: web.Request) -> web.StreamResponse:
    records = await asyncio.to_thread(request.app[STATE].models.list)
    return json_response({"object": "list", "data": [r.to_json() for r in records]})


async def show_model(request: web.Request) -> web.StreamResponse:
    name = check_model_id(request.match_info["name"])
    record = await asyncio.to_thread(request.app[STATE].models.get, name)
    data = record.to_json()
    loaded = request.app[STATE].manager.stats().get(name)
    data["loaded"] = loaded is not None
    if loaded:
        data["runtime"] = loaded
    return json_response(data)


async def import_model(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    path = body.get("path")
    if not isinstance(path, str) or not path:
        raise InvalidRequest("'path' (a file or folder on this machine) is required", param="path")
    name = body.get("name")
    if name is not None:
        check_name(name)
    settings: Any = body.get("settings") or {}
    if not isinstance(settings, dict):
        raise InvalidRequest("'settings' must be an object", param="settings")
    base = body.get("base")
    if base is not None and not isinstance(base, str):
        raise InvalidRequest("'base' must be a model name", param="base")
    record = await asyncio.to_thread(request.app[STATE].models.import_path, Path(path), name,
                                     settings=settings, base=base, actor=principal(request).actor)
    return json_response(record.to_json(), status=201)


async def remove_model(request: web.Request) -> web.StreamResponse:
    name = check_model_id(request.match_info["name"])
    state = request.app[STATE]
    await state.manager.unload(name, reason="removed")
    record = await asyncio.to_thread(state.models.remove, name)
    return json_response({"id": record.name, "object": "model", "deleted": True})


ROUTES = (
    Route("GET", "/v1/garrison/models", list_models, "read", "Every model with its manifest and settings.", "models"),
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
