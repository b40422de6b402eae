"""Loaded models and their runner processes: `garrison ps` and `garrison stop` over HTTP."""

from __future__ import annotations

import asyncio

from aiohttp import web

from garrison.daemon.http import json_response, principal
from garrison.daemon.routing import Route
from garrison.daemon.state import STATE
from garrison.engine import cpu_kernels
from garrison.models.names import check_model_id
from garrison.operations import runners as runner_ops
from garrison.policies.access import allowed


async def list_runners(request: web.Request) -> web.StreamResponse:
    """Like `ollama ps`: what is loaded where, how busy, how much memory, and what crashed."""
    who = principal(request)
    manager = request.app[STATE].manager
    rows = [r for r in await manager.runners() if allowed(who, "read", ("model", r["model"]))]
    verdicts = await asyncio.to_thread(manager.verdicts.all_cached)
    return json_response({
        "object": "list", "data": rows,
        "cpu_kernels": {"cpu_repack": manager.settings.cpu_repack, "cpu_amx": cpu_kernels.cpu_has_amx(),
                        "variants": [p.name for p in cpu_kernels.variant_libraries()],
                        "verdicts": [{"type": v.tensor_type, "extra_bufts": v.extra_bufts, "reason": v.reason,
                                      "variant": v.variant, "probed_at": v.probed_at} for v in verdicts]}})


async def stop_runner(request: web.Request) -> web.StreamResponse:
    """Unload a model now: its runner ends and its memory returns to the OS; a failed model may load again."""
    state = request.app[STATE]
    name = check_model_id(request.match_info["model"])
    stopped = await runner_ops.stop_runner(state.manager, state.catalog, principal(request), name, via="api")
    return json_response({"model": name, "stopped": stopped})


ROUTES = (
    Route("GET", "/v1/garrison/runners", list_runners, "read",
          "Loaded models and their runner processes (pid, backend, CPU variant, device, memory, busy slots, "
          "idle-until, crashes), failed models, and this machine's CPU-kernel verdicts.", "models"),
    Route("DELETE", "/v1/garrison/runners/{model}", stop_runner, "admin",
          "Unload a model: end its runner (memory returns to the OS) and clear a failed state.", "models",
          responses={"200": "stopped", "404": "model not loaded"}),
)
