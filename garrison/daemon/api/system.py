"""Probes, metrics and the API description."""

from __future__ import annotations

import time

from aiohttp import web

from garrison import __version__
from garrison.daemon.http import json_response
from garrison.daemon.metrics import METRICS, render_metrics
from garrison.daemon.routing import Route
from garrison.daemon.state import STATE


async def health(request: web.Request) -> web.StreamResponse:
    """Liveness only: answers while the process serves HTTP; no key needed, no details."""
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    checks = {"catalog": "ok", "accepting": "ok"}
    try:
        await request.app.loop.run_in_executor(None, state.catalog.query_one, "SELECT 1")
    except Exception as exc:
        checks["catalog"] = f"error: {type(exc).__name__}"
    if state.shutting_down.is_set():
        checks["accepting"] = "shutting down"
    ok = all(v == "ok" for v in checks.values())
    body = {"status": "ready" if ok else "not_ready", "checks": checks, "version": __version__,
            "uptime_s": round(time.time() - state.started_at, 3),
            "job_runner": state.runner is not None}
    return json_response(body, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.StreamResponse:
    # Engine counters live in the runners: ask them now, so a scrape reads current values.
    await request.app[STATE].manager.refresh_stats()
    body, content_type = render_metrics(request.app[METRICS])
    return web.Response(body=body, headers={"Content-Type": content_type})


HEAVY_MODULES = ("torch", "transformers", "peft", "onnxruntime", "optimum", "sentencepiece")


async def system_info(request: web.Request) -> web.StreamResponse:
    """What an operator asks of a running daemon: versions, memory, and which heavy
    libraries it has loaded (the serving daemon must never load torch)."""
    import dataclasses
    import os
    import platform
    import sys

    import psutil

    state = request.app[STATE]
    proc = psutil.Process()
    return json_response({
        "version": __version__, "pid": os.getpid(), "python": platform.python_version(),
        "uptime_s": round(time.time() - state.started_at, 3),
        "rss_bytes": proc.memory_info().rss, "threads": proc.num_threads(),
        "heavy_modules_loaded": [m for m in HEAVY_MODULES if m in sys.modules],
        "config_source": state.config.source, "config_reloads": state.reloads,
        "policy_source": state.policy.source, "log_level": state.config.log_level,
        "model_manager": dataclasses.asdict(state.manager.settings),  # what SIGHUP last applied
        "job_runner": state.runner is not None,
        "workers_active": len(state.runner.active) if state.runner else 0,
        "catalog_schema_version": state.catalog.schema_version,
    })


async def openapi(request: web.Request) -> web.StreamResponse:
    from garrison.daemon.openapi import build_openapi

    return json_response(build_openapi())


ROUTES = (
    Route("GET", "/health", health, None, "Liveness probe (no key).", "system"),
    Route("GET", "/ready", ready, "read", "Readiness: catalog reachable and not shutting down.", "system",
          responses={"200": "ready", "503": "not ready"}),
    Route("GET", "/metrics", metrics, "read", "Prometheus metrics in the text exposition format.", "system"),
    Route("GET", "/v1/garrison/system", system_info, "read",
          "Daemon facts: version, memory, uptime, heavy libraries loaded, job runner, the configuration and "
          "policy sources and the model manager's settings in force.", "system"),
    Route("GET", "/openapi.json", openapi, "read", "This API's OpenAPI 3.1 document.", "system"),
)
