"""Exports over HTTP: the same job as `garrison export`, followed through the jobs API."""

from __future__ import annotations

import asyncio

from aiohttp import web

from garrison.daemon.http import json_response, principal, read_json
from garrison.daemon.routing import Route
from garrison.daemon.state import STATE
from garrison.errors import InvalidRequest
from garrison.policies.access import authorize


async def create_export(request: web.Request) -> web.StreamResponse:
    from garrison.converters.export import parse_targets

    body = await read_json(request)
    model, targets = body.get("model"), body.get("to")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required", param="model")
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        targets = ",".join(targets)
    if not isinstance(targets, str):
        raise InvalidRequest("'to' must be a list of targets such as [\"gguf:q4_k_m\", \"onnx:int8\"]", param="to")
    parse_targets(targets)
    who = principal(request)
    authorize(who, "export", ("model", model))
    state = request.app[STATE]
    imatrix = body.get("imatrix", "")
    if not isinstance(imatrix, str):
        raise InvalidRequest("'imatrix' must be a path", param="imatrix")
    job = await asyncio.to_thread(state.jobs.create, "export", {"model": model, "to": targets, "imatrix": imatrix},
                                  created_by=who.actor, default_max_attempts=state.config.job_max_attempts,
                                  default_timeout_s=state.config.job_timeout_s)
    return json_response(job.to_json(), status=202)


ROUTES = (
    Route("POST", "/v1/garrison/exports", create_export, "export",
          "Start an export job (GGUF/ONNX targets, parity-gated, signed); follow it under /v1/garrison/jobs.",
          "exports", body={"type": "object", "required": ["model", "to"],
                           "properties": {"model": {"type": "string"},
                                          "to": {"type": "array", "items": {"type": "string"}},
                                          "imatrix": {"type": "string"}}},
          responses={"202": "job queued", "400": "unknown target", "403": "no export scope or model grant"}),
)
