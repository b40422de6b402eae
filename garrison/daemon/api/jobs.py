"""Jobs: list, create (built-in kinds), inspect, wait, cancel, and stream progress (SSE)."""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from garrison.daemon.http import json_response, principal, query_float, query_int, read_json
from garrison.daemon.routing import Route
from garrison.daemon.state import STATE
from garrison.errors import InvalidRequest
from garrison.operations import jobs as ops

_POLL_S = 0.2


async def list_jobs(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    jobs = await asyncio.to_thread(ops.list_jobs, state, principal(request), state=request.query.get("state"),
                                   kind=request.query.get("kind"),
                                   limit=query_int(request, "limit", 100, 1, 1000))
    return json_response({"object": "list", "data": [j.to_json() for j in jobs]})


async def create_job(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    kind_name = body.get("kind")
    if not isinstance(kind_name, str):
        raise InvalidRequest("'kind' is required", param="kind")
    params = body.get("params")
    if params is not None and not isinstance(params, dict):
        raise InvalidRequest("'params' must be an object", param="params")
    job = await asyncio.to_thread(ops.submit_job, state, principal(request), kind_name, params,
                                  max_attempts=body.get("max_attempts"), timeout_s=body.get("timeout_s"))
    return json_response(job.to_json(), status=201)


async def get_job(request: web.Request) -> web.StreamResponse:
    """`?wait=S` long-polls until the job ends or S seconds pass."""
    state = request.app[STATE]
    who = principal(request)
    job_id = request.match_info["job_id"]
    wait = query_float(request, "wait", 0.0, 0.0, 300.0)
    deadline = time.monotonic() + wait
    job = await asyncio.to_thread(ops.get_job, state, who, job_id)
    while not job.terminal and time.monotonic() < deadline and not state.shutting_down.is_set():
        await asyncio.sleep(_POLL_S)
        job = await asyncio.to_thread(state.jobs.get, job_id)
    return json_response(job.to_json())


async def cancel_job(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    job = await asyncio.to_thread(ops.cancel_job, state, principal(request), request.match_info["job_id"])
    return json_response(job.to_json())


async def job_events(request: web.Request) -> web.StreamResponse:
    """JSON list of events, or with `?stream=true` server-sent events until the job ends."""
    state = request.app[STATE]
    job_id = request.match_info["job_id"]
    who = principal(request)
    job = await asyncio.to_thread(ops.get_job, state, who, job_id)
    after = query_int(request, "after", 0, 0, 2**62)
    if request.query.get("stream", "").lower() not in {"1", "true", "yes"}:
        events = await asyncio.to_thread(ops.job_events, state, who, job_id, after=after,
                                         limit=query_int(request, "limit", 500, 1, 5000))
        return json_response({"object": "list", "data": [e.to_json() for e in events]})

    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await response.prepare(request)

    async def send(event: str, data: dict[str, object], seq: int | None = None) -> None:
        head = f"id: {seq}\n" if seq is not None else ""
        await response.write(f"{head}event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode())

    last_progress: tuple[object, ...] | None = None
    while True:
        for event in await asyncio.to_thread(state.jobs.events, job_id, after=after):
            after = event.seq
            await send("event", event.to_json(), event.seq)
        job = await asyncio.to_thread(state.jobs.get, job_id)
        snapshot = (job.state, job.progress, job.progress_message, job.attempts)
        if snapshot != last_progress:
            last_progress = snapshot
            await send("progress", {"state": job.state, "attempts": job.attempts,
                                    **job.to_json()["progress"]})
        if job.terminal:
            await send("done", job.to_json())
            break
        if state.shutting_down.is_set():
            await send("shutdown", {"message": "daemon is shutting down; reconnect with after="
                                               f"{after}"})
            break
        await asyncio.sleep(_POLL_S)
    await response.write_eof()
    return response


_CREATE_BODY = {
    "type": "object", "required": ["kind"],
    "properties": {"kind": {"type": "string"}, "params": {"type": "object"},
                   "max_attempts": {"type": "integer"}, "timeout_s": {"type": "number"}},
}

ROUTES = (
    Route("GET", "/v1/garrison/jobs", list_jobs, "read", "List jobs, newest first.", "jobs",
          query=(("state", "string", "filter by state"), ("kind", "string", "filter by kind"),
                 ("limit", "integer", "at most this many (1-1000)"))),
    Route("POST", "/v1/garrison/jobs", create_job, "read",
          "Queue a job of a built-in kind: the key needs the kind's scope and a grant for every model and dataset "
          "its parameters name.", "jobs",
          body=_CREATE_BODY, responses={"201": "job queued", "400": "invalid kind or parameters",
                                        "403": "no scope for the kind, or a resource not granted"}),
    Route("GET", "/v1/garrison/jobs/{job_id}", get_job, "read", "One job; `wait` long-polls for its end.",
          "jobs", query=(("wait", "number", "seconds to wait for the job to end (0-300)"),),
          responses={"200": "the job", "404": "no such job"}),
    Route("POST", "/v1/garrison/jobs/{job_id}/cancel", cancel_job, "read",
          "Cancel a job: at once if queued; a running one stops at its next check, keeping its "
          "last checkpoint. Needs the kind's scope and the job's grants.", "jobs",
          responses={"200": "the job", "403": "no scope for the kind, or a resource not granted",
                     "404": "no such job", "409": "already finished"}),
    Route("GET", "/v1/garrison/jobs/{job_id}/events", job_events, "read",
          "A job's events; `stream=true` sends server-sent events (progress, event, done).", "jobs",
          query=(("after", "integer", "only events after this sequence number"),
                 ("stream", "boolean", "stream as text/event-stream until the job ends"),
                 ("limit", "integer", "at most this many events (1-5000)")),
          streaming=True),
)
