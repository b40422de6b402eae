"""Evaluations over HTTP: the same job as `garrison eval`, and the stored side-by-side tables."""

from __future__ import annotations

import asyncio

from aiohttp import web

from garrison.daemon.http import json_response, principal, query_int, read_json
from garrison.daemon.routing import Route
from garrison.daemon.state import STATE
from garrison.errors import InvalidRequest
from garrison.operations import evaluations as ops


async def create_eval(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    models, dataset = body.get("models"), body.get("dataset")
    if isinstance(models, str):
        models = [models]
    if not isinstance(models, list) or not models:
        raise InvalidRequest("'models' must be a non-empty list of model names", param="models")
    if not isinstance(dataset, str) or not dataset:
        raise InvalidRequest("'dataset' is required", param="dataset")
    job = await asyncio.to_thread(ops.start_evaluation, request.app[STATE], principal(request), models, dataset,
                                  max_new_tokens=body.get("max_new_tokens"), max_records=body.get("max_records"))
    return json_response(job.to_json(), status=202)


async def list_evals(request: web.Request) -> web.StreamResponse:
    found = await asyncio.to_thread(ops.list_evaluations, request.app[STATE], principal(request),
                                    model=request.query.get("model"), dataset=request.query.get("dataset"),
                                    limit=query_int(request, "limit", 50, 1, 1000))
    return json_response({"object": "list", "data": [ops.evaluation_json(e) for e in found]})


async def get_eval(request: web.Request) -> web.StreamResponse:
    evaluation = await asyncio.to_thread(ops.get_evaluation, request.app[STATE], principal(request),
                                         request.match_info["evaluation_id"])
    return json_response(ops.evaluation_json(evaluation))


ROUTES = (
    Route("POST", "/v1/garrison/evals", create_eval, "train",
          "Start an evaluation job: the models scored side by side on a dataset version's held-out records "
          "(perplexity, exact match, token F1, per-label metrics); follow it under /v1/garrison/jobs.",
          "evals", body={"type": "object", "required": ["models", "dataset"],
                         "properties": {"models": {"type": "array", "items": {"type": "string"}},
                                        "dataset": {"type": "string", "description": "NAME or NAME:N"},
                                        "max_new_tokens": {"type": "integer", "description": "longest greedy "
                                                           "answer (0: perplexity only)"},
                                        "max_records": {"type": "integer", "description": "at most this many "
                                                        "held-out records (0: all)"}}},
          responses={"202": "job queued", "400": "a model that cannot be scored, or a bad parameter",
                     "403": "no train scope, or a model or dataset not granted", "404": "no such model or dataset"}),
    Route("GET", "/v1/garrison/evals", list_evals, "read",
          "Stored evaluations, newest first, each with its rows and side-by-side table (only those whose models "
          "and dataset the key is granted).", "evals",
          query=(("model", "string", "only evaluations that scored this model"),
                 ("dataset", "string", "only evaluations on this dataset (NAME or NAME:N)"),
                 ("limit", "integer", "at most this many (1-1000, default 50)"))),
    Route("GET", "/v1/garrison/evals/{evaluation_id}", get_eval, "read",
          "One evaluation as JSON: the held-out split, each model's metrics and lineage, and the table.", "evals",
          responses={"200": "OK", "403": "a model or the dataset not granted", "404": "no such evaluation"}),
)
