"""OpenAI's fine-tuning API over Garrison's `finetune` jobs, so the official client drives it unchanged.

A fine-tuning job is a catalog job of kind `finetune`; this module only translates shapes.
`training_file` / `validation_file` name a dataset (`NAME`, `NAME:N`) or an uploaded file
(`file-...`). Hyperparameter mapping (documented in the operator guide): `n_epochs` and
`batch_size` as given or OpenAI's "auto" heuristics; `learning_rate_multiplier` scales a
base rate of 2e-4 (LoRA) or 2e-5 (full fine-tuning).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from garrison.daemon.http import json_response, principal, query_int, read_json
from garrison.daemon.routing import Route
from garrison.daemon.state import STATE
from garrison.errors import InvalidRequest
from garrison.jobs.store import Job
from garrison.models.names import fine_tuned_name
from garrison.operations import jobs as ops

KIND = "finetune"
_STATUS = {"queued": "queued", "running": "running", "succeeded": "succeeded", "failed": "failed",
           "cancelled": "cancelled"}


def _hyper(job: Job) -> dict[str, Any]:
    given = json.loads(job.params.get("hyperparameters") or "{}")
    used = (job.result or {}).get("hyperparameters") or {}
    return {key: used.get(key, given.get(key, "auto"))
            for key in ("n_epochs", "batch_size", "learning_rate_multiplier")}


def to_openai(job: Job) -> dict[str, Any]:
    result = job.result or {}
    error = None
    if job.state == "failed":
        error = {"code": job.error_code or "job_failed", "message": job.error_message or "", "param": None}
    method = job.params.get("method", "lora")
    return {
        "id": job.id, "object": "fine_tuning.job", "model": job.params.get("model"),
        "created_at": int(job.created_at), "finished_at": int(job.finished_at) if job.finished_at else None,
        "fine_tuned_model": result.get("fine_tuned_model"), "organization_id": "garrison", "result_files": [],
        "status": _STATUS[job.state], "validation_file": job.params.get("validation_file") or None,
        "training_file": job.params.get("training_file"), "hyperparameters": _hyper(job),
        "trained_tokens": result.get("trained_tokens"), "error": error, "seed": job.params.get("seed"),
        "estimated_finish": None, "integrations": [], "user_provided_suffix": job.params.get("suffix") or None,
        "method": {"type": "supervised", "supervised": {"hyperparameters": _hyper(job)}},
        "metadata": {"garrison_method": method, "progress": job.progress, "message": job.progress_message},
    }


async def _job(request: web.Request) -> Job:
    return await asyncio.to_thread(ops.get_job, request.app[STATE], principal(request), request.match_info["job_id"],
                                   kind=KIND)


def _params(body: dict[str, Any]) -> dict[str, Any]:
    model, training = body.get("model"), body.get("training_file")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required", param="model")
    if not isinstance(training, str) or not training:
        raise InvalidRequest("'training_file' is required", param="training_file")
    hyper = body.get("hyperparameters") or {}
    method = body.get("method") or {}
    if isinstance(method, dict) and method.get("type") not in (None, "supervised"):
        raise InvalidRequest("only supervised fine-tuning is supported", param="method")
    if not isinstance(hyper, dict):
        raise InvalidRequest("'hyperparameters' must be an object", param="hyperparameters")
    if isinstance(method, dict):
        supervised = method.get("supervised") or {}
        nested = supervised.get("hyperparameters") or {} if isinstance(supervised, dict) else None
        if not isinstance(nested, dict):
            raise InvalidRequest("'method.supervised.hyperparameters' must be an object", param="method")
        hyper = {**hyper, **nested}
    unknown = set(hyper) - {"n_epochs", "batch_size", "learning_rate_multiplier"}
    if unknown:
        raise InvalidRequest(f"unknown hyperparameter(s): {', '.join(sorted(unknown))}", param="hyperparameters")
    extra = body.get("extra") or {}  # Garrison's own settings, e.g. {"lora_r": 8, "max_steps": 50}
    if not isinstance(extra, dict):
        raise InvalidRequest("'extra' must be an object", param="extra")
    params: dict[str, Any] = {"model": model, "training_file": training,
                              "validation_file": body.get("validation_file") or "",
                              "hyperparameters": json.dumps(hyper), "suffix": body.get("suffix") or ""}
    if body.get("seed") is not None:
        params["seed"] = body["seed"]
    params.update(extra)
    return params


async def create(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    job = await asyncio.to_thread(ops.submit_job, request.app[STATE], principal(request), KIND, _params(body))
    return json_response(to_openai(job))


async def list_jobs(request: web.Request) -> web.StreamResponse:
    limit = query_int(request, "limit", 20, 1, 100)
    after = request.query.get("after")
    jobs = await asyncio.to_thread(ops.list_jobs, request.app[STATE], principal(request), kind=KIND, limit=1000)
    if after:
        ids = [j.id for j in jobs]
        jobs = jobs[ids.index(after) + 1:] if after in ids else []
    page = jobs[:limit]
    return json_response({"object": "list", "data": [to_openai(j) for j in page], "has_more": len(jobs) > limit})


async def retrieve(request: web.Request) -> web.StreamResponse:
    return json_response(to_openai(await _job(request)))


async def cancel(request: web.Request) -> web.StreamResponse:
    job = await asyncio.to_thread(ops.cancel_job, request.app[STATE], principal(request),
                                  request.match_info["job_id"], kind=KIND)
    return json_response(to_openai(job))


async def events(request: web.Request) -> web.StreamResponse:
    limit = query_int(request, "limit", 20, 1, 1000)
    rows = await asyncio.to_thread(ops.job_events, request.app[STATE], principal(request),
                                   request.match_info["job_id"], limit=100_000, kind=KIND)
    data = [{"object": "fine_tuning.job.event", "id": f"ftevent-{e.seq}", "created_at": int(e.at),
             "level": e.level if e.level in ("info", "warn", "error") else "info", "message": e.message or e.type,
             "type": "metrics" if e.type == "metrics" else "message", "data": e.data}
            for e in reversed(rows)]
    after = request.query.get("after")
    if after:
        ids = [d["id"] for d in data]
        data = data[ids.index(after) + 1:] if after in ids else []
    return json_response({"object": "list", "data": data[:limit], "has_more": len(data) > limit})


async def checkpoints(request: web.Request) -> web.StreamResponse:
    from garrison.training.checkpoints import list_checkpoints

    job = await _job(request)
    folder = request.app[STATE].models.layout.checkpoint_folder(job.id)
    found = await asyncio.to_thread(list_checkpoints, folder) if folder.exists() else []
    name = (job.result or {}).get("fine_tuned_model") or fine_tuned_name(str(job.params.get("model")),
                                                                        str(job.params.get("suffix") or ""), job.id)
    data = [{"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{job.id}-{step}",
             "created_at": int(path.stat().st_mtime), "fine_tuned_model_checkpoint": f"{name}:step-{step}",
             "step_number": step, "metrics": {"step": step}, "fine_tuning_job_id": job.id}
            for step, path in sorted(found, reverse=True)]
    return json_response({"object": "list", "data": data, "has_more": False})


_JOB = {"200": "OK", "404": "no such fine-tuning job"}
_AUTO_OR = {"type": "string", "enum": ["auto"]}
_HYPER = {"type": "object", "additionalProperties": False, "properties": {
    "n_epochs": {"oneOf": [{"type": "integer", "minimum": 1}, _AUTO_OR]},
    "batch_size": {"oneOf": [{"type": "integer", "minimum": 1}, _AUTO_OR]},
    "learning_rate_multiplier": {"oneOf": [{"type": "number", "exclusiveMinimum": 0}, _AUTO_OR]}}}

_AUTO_OR = {"type": "string", "enum": ["auto"]}
_HYPER = {"type": "object", "additionalProperties": False, "properties": {
    "n_epochs": {"oneOf": [{"type": "integer", "minimum": 1}, _AUTO_OR]},
    "batch_size": {"oneOf": [{"type": "integer", "minimum": 1}, _AUTO_OR]},
    "learning_rate_multiplier": {"oneOf": [{"type": "number", "exclusiveMinimum": 0}, _AUTO_OR]}}}

ROUTES = (
    Route("POST", "/v1/fine_tuning/jobs", create, "train",
          "Create a fine-tuning job (OpenAI); training_file is a dataset NAME[:N] or a file id.", "fine-tuning",
          body={"type": "object", "required": ["model", "training_file"],
                "properties": {"model": {"type": "string"}, "training_file": {"type": "string"},
                               "validation_file": {"type": "string"}, "suffix": {"type": "string"},
                               "seed": {"type": "integer"}, "hyperparameters": _HYPER,
                               "method": {"type": "object", "properties": {
                                   "type": {"type": "string", "enum": ["supervised"]},
                                   "supervised": {"type": "object", "properties": {"hyperparameters": _HYPER}}}},
                               "extra": {"type": "object", "description": "Garrison settings: method, lora_r, "
                                         "max_steps, max_seq_len, checkpoint_every, export"}}},
          responses={"200": "created", "400": "invalid hyperparameters", "403": "no train scope or grant"}),
    Route("GET", "/v1/fine_tuning/jobs", list_jobs, "train", "List fine-tuning jobs, newest first (OpenAI).",
          "fine-tuning"),
    Route("GET", "/v1/fine_tuning/jobs/{job_id}", retrieve, "train", "One fine-tuning job (OpenAI).",
          "fine-tuning", responses=_JOB),
    Route("POST", "/v1/fine_tuning/jobs/{job_id}/cancel", cancel, "train",
          "Cancel; the last checkpoint is kept (OpenAI).", "fine-tuning", responses=_JOB),
    Route("GET", "/v1/fine_tuning/jobs/{job_id}/events", events, "train",
          "Events, newest first: messages and step metrics (OpenAI).", "fine-tuning", responses=_JOB),
    Route("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints", checkpoints, "train",
          "Checkpoints saved so far (OpenAI); encrypted at rest, not downloadable.", "fine-tuning",
          responses=_JOB),
)
