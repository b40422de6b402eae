"""The console's routes: pages that show what the operations return to the session's key, and forms
that call the same operations the API and the CLI call (every check is theirs, none is made here).

Actions are plain HTML forms carrying the CSRF token (they work without a script and from the
keyboard), answered with a redirect to the page and a notice; a key's secret is the exception,
shown once on the page that answers its creation. The job page follows a running job through the
API's event stream and redraws its curves from /console/jobs/{id}/curves; the chat page streams
from /v1/chat/completions. Both scripts send the session cookie, and the CSRF token where they post.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psutil
from aiohttp import web

from garrison.daemon.api.audit import MONITOR
from garrison.daemon.api.datasets import ingest_service
from garrison.daemon.console import plots
from garrison.daemon.console.sessions import (
    CSRF_FIELD,
    SESSIONS,
    check_csrf,
    check_origin,
    clear_cookie,
    current_session,
    set_cookie,
)
from garrison.daemon.console.templating import home_for, render
from garrison.daemon.http import principal
from garrison.daemon.routing import Route
from garrison.daemon.state import STATE
from garrison.daemon.usage import RECORDER
from garrison.errors import AuthenticationError, GarrisonError, InvalidRequest, NotFound
from garrison.jobs.store import Job
from garrison.models.evaluations import TABLE_COLUMNS
from garrison.models.registry import ModelRecord, canonical_manifest
from garrison.operations import datasets as dataset_ops
from garrison.operations import evaluations as evaluation_ops
from garrison.operations import jobs as job_ops
from garrison.operations import keys as key_ops
from garrison.operations import models as model_ops
from garrison.operations import runners as runner_ops
from garrison.operations.usage import usage_report
from garrison.policies.access import allowed, authorize
from garrison.policies.audit import verify_trail
from garrison.policies.audit_keys import AuditKeys
from garrison.policies.keys import Principal
from garrison.policies.scopes import ROLE_DESCRIPTIONS, ROLES

STATIC = Path(__file__).parent / "static"
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}

# What a redirect after an action says on the page it lands on (a code in the query, never free text).
NOTICES: dict[str, str] = {
    "cancelled": "Cancellation requested: a running job stops at its next check.",
    "revoked": "The key is revoked: it and its console sessions no longer work.",
    "deleted": "The dataset is deleted: its keys are destroyed, its data unreadable.",
    "loaded": "The model is loaded.",
    "unloaded": "The model is unloaded: its runner ended and its memory returned.",
    "signed_out": "You are signed out.",
}


def _redirect(location: str, notice: str | None = None) -> web.Response:
    if notice is not None:
        location += ("&" if "?" in location else "?") + urlencode({"notice": notice})
    return web.Response(status=303, headers={"Location": location})


def _notice(request: web.Request) -> str | None:
    return NOTICES.get(request.query.get("notice", ""))


async def _form(request: web.Request) -> dict[str, str]:
    data = await request.post()
    return {k: v for k, v in data.items() if isinstance(v, str) and k != CSRF_FIELD}


# ---- public: sign-in, sign-out, static files --------------------------------------------------------

def _next(raw: str | None) -> str | None:
    """Only a console path: a sign-in link cannot send the browser anywhere else."""
    if raw and raw.startswith("/console") and "//" not in raw and "\\" not in raw:
        return raw
    return None


async def sign_in_page(request: web.Request) -> web.StreamResponse:
    session = await current_session(request)
    if session is not None:
        try:
            who = await asyncio.to_thread(request.app[SESSIONS].principal, session)
            return _redirect(_next(request.query.get("next")) or home_for(who))
        except AuthenticationError:
            pass
    return await render(request, "sign_in.html", None, next=_next(request.query.get("next")) or "",
                        error=None, notice=_notice(request))


async def sign_in(request: web.Request) -> web.StreamResponse:
    """The key exchanged for a session; the key itself is never stored in the browser."""
    check_origin(request)  # no session yet: a page of another origin must not sign this browser in
    form = await _form(request)
    config = request.app[STATE].config
    try:
        session, who = await asyncio.to_thread(request.app[SESSIONS].sign_in, form.get("key", "").strip() or None,
                                               config.console_session_hours, request.headers.get("User-Agent", ""))
    except AuthenticationError as err:
        return await render(request, "sign_in.html", None, status=401, next=_next(form.get("next")) or "",
                            error=err.message, notice=None)
    response = _redirect(_next(form.get("next")) or home_for(who))
    set_cookie(request, response, session)
    return response


async def sign_out(request: web.Request) -> web.StreamResponse:
    session = await current_session(request)
    if session is not None:
        await check_csrf(request, session)
        await asyncio.to_thread(request.app[SESSIONS].sign_out, session)
    response = _redirect("/console/sign-in", "signed_out")
    clear_cookie(request, response)
    return response


async def static_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    path = STATIC / name
    kind = STATIC_TYPES.get(path.suffix)
    if kind is None or "/" in name or name.startswith(".") or not path.is_file():
        raise NotFound(f"no console file {name!r}", code="not_found")
    return web.Response(body=path.read_bytes(), content_type=kind, charset="utf-8",
                        headers={"Cache-Control": "no-cache"})


# ---- overview -----------------------------------------------------------------------------------------

def _gpus() -> list[str]:
    """NVIDIA GPUs as the driver lists them (no library, no subprocess): names, or none."""
    root = Path("/proc/driver/nvidia/gpus")
    names = []
    for info in sorted(root.glob("*/information")) if root.is_dir() else []:
        model = next((line.split(":", 1)[1].strip() for line in info.read_text(errors="replace").splitlines()
                      if line.startswith("Model:")), "NVIDIA GPU")
        names.append(f"{model} ({info.parent.name})")
    return names


def _machine() -> dict[str, Any]:
    memory = psutil.virtual_memory()
    return {"cpus": os.cpu_count(), "load": os.getloadavg(), "cpu_percent": psutil.cpu_percent(interval=None),
            "memory_total": memory.total, "memory_available": memory.available,
            "rss": psutil.Process().memory_info().rss, "gpus": _gpus()}


async def _runners(request: web.Request, who: Principal) -> list[dict[str, Any]]:
    # The same rows, filtered by the same grant check, as GET /v1/garrison/runners.
    return [r for r in await request.app[STATE].manager.runners() if allowed(who, "read", ("model", r["model"]))]


async def overview(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    who = principal(request)
    queued, running, failed = await asyncio.gather(*(
        asyncio.to_thread(job_ops.list_jobs, state, who, state=s, limit=limit)
        for s, limit in (("queued", 1000), ("running", 1000), ("failed", 5))))
    ready = "ok"
    try:
        await asyncio.to_thread(state.catalog.query_one, "SELECT 1")
    except Exception as exc:  # the page must show a broken catalog, not fail with it
        ready = f"catalog error: {type(exc).__name__}"
    return await render(request, "overview.html", who, notice=_notice(request), health=ready,
                        shutting_down=state.shutting_down.is_set(), uptime=time.time() - state.started_at,
                        machine=await asyncio.to_thread(_machine), runners=await _runners(request, who),
                        queued=queued, running=running, failed=failed, job_runner=state.runner is not None)


# ---- models -------------------------------------------------------------------------------------------

def _signature(request: web.Request, record: ModelRecord) -> str:
    """The manifest's signature against this appliance's key (files are hashed when the model loads)."""
    signature = record.manifest.get("signature")
    if not signature:
        return "unsigned"
    signer = request.app[STATE].models.signer
    if signer is None:
        return "not checked"
    try:
        signer().verify(canonical_manifest(record.manifest), bytes.fromhex(str(signature)))
    except (GarrisonError, ValueError):
        return "INVALID"
    return "valid"


def _parent(record: ModelRecord) -> str | None:
    lineage = record.manifest.get("lineage") or {}
    parent = lineage.get("source") or lineage.get("base") or record.base
    return str(parent) if parent else None


def _lineage_tree(records: list[ModelRecord]) -> list[tuple[int, ModelRecord]]:
    """Base models first, each followed by what was made from it (fine-tunes, then their exports)."""
    names = {r.name for r in records}
    children: dict[str | None, list[ModelRecord]] = {}
    for record in records:
        parent = _parent(record)
        children.setdefault(parent if parent in names else None, []).append(record)
    out: list[tuple[int, ModelRecord]] = []

    def walk(parent: str | None, depth: int) -> None:
        for record in sorted(children.get(parent, []), key=lambda r: r.name):
            out.append((depth, record))
            if depth < 8:
                walk(record.name, depth + 1)

    walk(None, 0)
    return out


async def models_page(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    who = principal(request)
    records = await asyncio.to_thread(model_ops.list_models, state, who)
    signatures = {r.name: await asyncio.to_thread(_signature, request, r) for r in records}
    runners = {r["model"]: r for r in await _runners(request, who)}
    rows = [{"depth": depth, "view": model_ops.model_view(who, r), "record": r, "parent": _parent(r),
             "signature": signatures[r.name], "runner": runners.get(r.name),
             "parity": r.manifest.get("parity")} for depth, r in _lineage_tree(records)]
    return await render(request, "models.html", who, notice=_notice(request), rows=rows,
                        can_load=lambda name: allowed(who, "infer", ("model", name)),
                        can_unload=lambda name: allowed(who, "admin", ("model", name)))


async def load_model(request: web.Request) -> web.StreamResponse:
    """Load as a request would (the infer scope and a grant): the model stays for keep-alive."""
    state = request.app[STATE]
    who = principal(request)
    record = await asyncio.to_thread(model_ops.get_model, state, who, request.match_info["name"], scope="infer")
    authorize(who, "infer", ("model", record.name))
    capability = "embed" if record.manifest.get("capability") == "embed" else "generate"
    try:
        async with state.manager.use(record.name, capability):
            pass
    except InvalidRequest as err:
        if err.code != "model_capability_mismatch":  # loaded all the same, for the other capability
            raise
    return _redirect("/console/models", "loaded")


async def unload_model(request: web.Request) -> web.StreamResponse:
    """As DELETE /v1/garrison/runners/{model}: the admin scope and a grant."""
    state = request.app[STATE]
    who = principal(request)
    record = await asyncio.to_thread(model_ops.get_model, state, who, request.match_info["name"], scope="admin")
    await runner_ops.stop_runner(state.manager, state.catalog, who, record.name, via="console", missing_ok=True)
    return _redirect("/console/models", "unloaded")


# ---- datasets -----------------------------------------------------------------------------------------

async def datasets_page(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    who = principal(request)
    datasets = await asyncio.to_thread(dataset_ops.list_datasets, state.catalog, who)
    return await render(request, "datasets.html", who, notice=_notice(request), datasets=datasets,
                        retention_days=state.policy.ingest.retention_days)


async def dataset_page(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    who = principal(request)
    name = request.match_info["name"]
    dataset = await asyncio.to_thread(dataset_ops.get_dataset, state.catalog, who, name)
    versions = [await asyncio.to_thread(dataset_ops.get_version, state.catalog, who, name, int(v["version"]))
                for v in dataset["data"]]
    return await render(request, "dataset.html", who, notice=_notice(request), dataset=dataset,
                        versions=list(reversed(versions)), retention_days=state.policy.ingest.retention_days,
                        can_delete=allowed(who, "ingest", ("dataset", dataset["name"])), error=None)


async def delete_dataset(request: web.Request) -> web.StreamResponse:
    """Crypto-shredding cannot be undone: the form must repeat the dataset's name."""
    who = principal(request)
    name = request.match_info["name"]
    form = await _form(request)
    if form.get("confirm", "").strip() != name:
        raise InvalidRequest(f"type the dataset's name ({name}) to confirm the deletion", param="confirm",
                             code="confirmation_required")
    await asyncio.to_thread(dataset_ops.delete_dataset, ingest_service(request.app).vault, who, name)
    return _redirect("/console/datasets", "deleted")


# ---- jobs ---------------------------------------------------------------------------------------------

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


async def jobs_page(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    who = principal(request)
    wanted = request.query.get("state") if request.query.get("state") in JOB_STATES else None
    jobs = await asyncio.to_thread(job_ops.list_jobs, state, who, state=wanted, limit=200)
    return await render(request, "jobs.html", who, notice=_notice(request), jobs=jobs, states=JOB_STATES,
                        wanted=wanted)


async def _job_curves(request: web.Request, who: Principal, job: Job) -> tuple[Any, list[dict[str, Any]]]:
    events = await asyncio.to_thread(job_ops.job_events, request.app[STATE], who, job.id, limit=5000)
    data = [e.to_json() for e in events]
    loss, evals = plots.curves_from_events(data)
    history = job.result or {}
    if not loss.points and history.get("loss_history"):  # a finished job: its whole history
        loss = plots.Series(loss.name, loss.css, loss.marker, [tuple(p) for p in history["loss_history"]])
    if not evals.points and history.get("eval_history"):
        evals = plots.Series(evals.name, evals.css, evals.marker, [tuple(p) for p in history["eval_history"]])
    return plots.line_chart(f"Loss of job {job.id}", [loss, evals]), data


async def job_page(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    who = principal(request)
    job = await asyncio.to_thread(job_ops.get_job, state, who, request.match_info["job_id"])
    chart, events = await _job_curves(request, who, job)
    checkpoints = [e for e in events if e["type"] == "metrics" and (e["data"] or {}).get("kind") == "checkpoint"]
    after = events[-1]["seq"] if events else 0
    return await render(request, "job.html", who, notice=_notice(request), job=job, chart=chart,
                        events=list(reversed(events[-200:])), checkpoints=checkpoints, after=after,
                        can_cancel=not job.terminal and allowed(who, _kind_scope(job.kind)))


def _kind_scope(kind: str) -> str:
    from garrison.jobs.kinds import job_kind

    try:
        return job_kind(kind).scope
    except GarrisonError:
        return "admin"


async def job_curves(request: web.Request) -> web.StreamResponse:
    """The chart alone, for the job page's script to redraw as metrics arrive."""
    who = principal(request)
    job = await asyncio.to_thread(job_ops.get_job, request.app[STATE], who, request.match_info["job_id"])
    chart, _ = await _job_curves(request, who, job)
    return web.Response(text=str(chart), content_type="image/svg+xml", charset="utf-8")


async def cancel_job(request: web.Request) -> web.StreamResponse:
    job_id = request.match_info["job_id"]
    await asyncio.to_thread(job_ops.cancel_job, request.app[STATE], principal(request), job_id)
    return _redirect(f"/console/jobs/{job_id}", "cancelled")


# ---- evaluations --------------------------------------------------------------------------------------

async def evaluations_page(request: web.Request) -> web.StreamResponse:
    """Stored comparisons side by side (issue 16's eval jobs), those whose dataset and models the key holds."""
    who = principal(request)
    found = await asyncio.to_thread(evaluation_ops.list_evaluations, request.app[STATE], who, limit=50)
    return await render(request, "evaluations.html", who, evaluations=found, columns=TABLE_COLUMNS)


# ---- keys ---------------------------------------------------------------------------------------------

async def _keys_page(request: web.Request, *, status: int = 200, created: dict[str, Any] | None = None,
                     error: str | None = None) -> web.Response:
    state = request.app[STATE]
    who = principal(request)
    records = await asyncio.to_thread(key_ops.list_keys, state.keys, who)
    await request.app[RECORDER].flush_async()
    usage = await asyncio.to_thread(usage_report, state.catalog, since="30d", by="key")
    visible = {r.id for r in records}
    usage_rows = [row for row in usage["data"] if row["key_id"] in visible]
    return await render(request, "keys.html", who, status=status, notice=_notice(request), keys=records,
                        roles=[(role, ROLE_DESCRIPTIONS.get(role, "")) for role in ROLES], usage=usage_rows,
                        created=created, error=error)


async def keys_page(request: web.Request) -> web.StreamResponse:
    return await _keys_page(request)


def _names(text: str) -> list[str] | None:
    names = [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]
    return names or None


async def create_key(request: web.Request) -> web.StreamResponse:
    """Answered with the page itself: the secret is shown this once and never stored."""
    form = await _form(request)
    try:
        record, secret = await asyncio.to_thread(
            key_ops.create_key, request.app[STATE].keys, principal(request), form.get("role", ""),
            name=form.get("name", "").strip(), models=_names(form.get("models", "")),
            datasets=_names(form.get("datasets", "")), expires=form.get("expires", "").strip() or None)
    except InvalidRequest as err:
        return await _keys_page(request, status=err.http_status, error=err.message)
    return await _keys_page(request, status=201, created={"record": record, "secret": secret})


async def revoke_key(request: web.Request) -> web.StreamResponse:
    await asyncio.to_thread(key_ops.revoke_key, request.app[STATE].keys, principal(request),
                            request.match_info["key_id"])
    return _redirect("/console/keys", "revoked")


# ---- audit --------------------------------------------------------------------------------------------

async def audit_page(request: web.Request) -> web.StreamResponse:
    """The latest entries and the trail's standing, as GET /v1/garrison/audit; `verify=1` checks it all now."""
    state = request.app[STATE]
    who = principal(request)
    rows = await asyncio.to_thread(state.catalog.query,
                                   "SELECT * FROM (SELECT * FROM audit ORDER BY seq DESC LIMIT 200) ORDER BY seq DESC")
    keys = await asyncio.to_thread(AuditKeys(state.config).verifying)
    report = await asyncio.to_thread(MONITOR.report, state.catalog, keys)
    verification = None
    if request.query.get("verify") == "1":
        verification = (await asyncio.to_thread(verify_trail, state.catalog, keys)).as_dict()
    return await render(request, "audit.html", who, notice=_notice(request), rows=rows, report=report,
                        verification=verification)


# ---- chat ---------------------------------------------------------------------------------------------

async def chat_page(request: web.Request) -> web.StreamResponse:
    """The models come from GET /v1/models and the answer from POST /v1/chat/completions (streamed)."""
    return await render(request, "chat.html", principal(request), notice=None)



ROUTES: tuple[Route, ...] = (
    Route("GET", "/console/sign-in", sign_in_page, None, "Console sign-in page.", "console"),
    Route("POST", "/console/sign-in", sign_in, None, "Exchange an API key for a console session.", "console"),
    Route("POST", "/console/sign-out", sign_out, None, "End the console session.", "console"),
    Route("GET", "/console/static/{name}", static_file, None, "The console's script and stylesheet.", "console"),
    Route("GET", "/console", overview, "read", "Console: overview.", "console"),
    Route("GET", "/console/models", models_page, "read", "Console: models.", "console"),
    Route("POST", "/console/models/{name}/load", load_model, "infer", "Console: load a model.", "console"),
    Route("POST", "/console/models/{name}/unload", unload_model, "admin", "Console: unload a model.", "console"),
    Route("GET", "/console/datasets", datasets_page, "read", "Console: datasets.", "console"),
    Route("GET", "/console/datasets/{name}", dataset_page, "read", "Console: one dataset.", "console"),
    Route("POST", "/console/datasets/{name}/delete", delete_dataset, "ingest", "Console: delete a dataset.",
          "console"),
    Route("GET", "/console/jobs", jobs_page, "read", "Console: jobs.", "console"),
    Route("GET", "/console/jobs/{job_id}", job_page, "read", "Console: one job.", "console"),
    Route("GET", "/console/jobs/{job_id}/curves", job_curves, "read", "Console: a job's loss curves (SVG).",
          "console"),
    Route("POST", "/console/jobs/{job_id}/cancel", cancel_job, "read", "Console: cancel a job.", "console"),
    Route("GET", "/console/evaluations", evaluations_page, "read", "Console: evaluations side by side.", "console"),
    Route("GET", "/console/keys", keys_page, "admin", "Console: keys and usage.", "console"),
    Route("POST", "/console/keys", create_key, "admin", "Console: create a key.", "console"),
    Route("POST", "/console/keys/{key_id}/revoke", revoke_key, "admin", "Console: revoke a key.", "console"),
    Route("GET", "/console/audit", audit_page, "admin", "Console: audit trail.", "console"),
    Route("GET", "/console/chat", chat_page, "infer", "Console: chat playground.", "console"),
)

# Routes that answer without a key or a session (besides /health): a browser must reach them to sign in.
PUBLIC_PATHS = frozenset(route.path for route in ROUTES if route.scope is None)
