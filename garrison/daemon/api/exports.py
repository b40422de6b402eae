"""Exports over HTTP: the same job as `garrison export`, followed through the jobs API."""

from __future__ import annotations

import asyncio

from aiohttp import web

from garrison.daemon.http import json_response, principal, read_json
from garrison.daemon.routing import Route
from garrison.daemon.state import STATE
from garrison.errors import InvalidRequest
from garrison.operations import jobs as ops


async def create_export(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model, targets = body.get("model"), body.get("to")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required", param="model")
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        targets = ",".join(targets)
    if not isinstance(targets, str):
        raise InvalidRequest("'to' must be a list of targets such as [\"gguf:q4_k_m\", \"onnx:int8\"]", param="to")
    params = {"model": model, "to": targets}
    for name in ("imatrix", "base_gguf"):
        if name in body:
            params[name] = body[name]
    job = await asyncio.to_thread(ops.submit_job, request.app[STATE], principal(request), "export", params)
    return json_response(job.to_json(), status=202)


ROUTES = (
    Route("POST", "/v1/garrison/exports", create_export, "export",
          "Start an export job (GGUF/ONNX targets, parity-gated, signed); follow it under /v1/garrison/jobs.",
          "exports", body={"type": "object", "required": ["model", "to"],
                           "properties": {"model": {"type": "string"},
                                          "to": {"type": "array", "items": {"type": "string"}},
                                          "imatrix": {"type": "string", "description": "builtin, dataset:NAME[:N] "
                                                      "or (admin keys) the path of an imatrix .gguf file"},
                                          "base_gguf": {"type": "string", "description": "for an adapter: the "
                                                        "GGUF model to serve it on"}}},
          responses={"202": "job queued", "400": "unknown target or a source that cannot be exported",
                     "403": "no export scope, or a model or dataset not granted", "404": "no such model or dataset"}),
)
