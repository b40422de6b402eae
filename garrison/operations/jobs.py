"""Jobs as operations: submit, list, read, follow and cancel, for every face alike.

`submit_job` is the one way a job enters the catalog from outside: the kind's scope, a grant
for every model and dataset its parameters reach (`garrison.jobs.grants`), then the kind's own
submission checks (a model's format, targets, references that resolve), so a job that can only
fail, or that names what its key may not touch, is refused with a 4xx and nothing is queued.
Reading follows the same grants: a key sees, follows and cancels only jobs whose every resource
it is granted.
"""

from __future__ import annotations

from typing import Any

from garrison.errors import InvalidRequest, NotFound, PermissionDenied
from garrison.jobs.grants import KINDS_WITH_RESOURCES, Resource, authorize_job, job_resources, may_see
from garrison.jobs.kinds import job_kind
from garrison.jobs.store import Job, JobEvent
from garrison.operations.appliance import Appliance
from garrison.policies.access import authorize
from garrison.policies.keys import Principal


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"'{name}' must be a number", param=name)
    return float(value)


def submit_job(app: Appliance, who: Principal, kind: str, params: dict[str, Any] | None, *,
               max_attempts: Any = None, timeout_s: Any = None) -> Job:
    spec = job_kind(kind)
    authorize(who, spec.scope)
    attempts, timeout = _number(max_attempts, "max_attempts"), _number(timeout_s, "timeout_s")
    clean = spec.validate(params if params is not None else {})
    resources = authorize_job(app.catalog, app.models, who, kind, spec.scope, clean)
    check = spec.load_check()
    if check is not None:
        check(app.catalog, app.models, who, clean)
    return app.jobs.create(kind, clean, max_attempts=int(attempts) if attempts is not None else None,
                           timeout_s=timeout, created_by=who.actor, resources=resources, validated=True,
                           default_max_attempts=app.config.job_max_attempts,
                           default_timeout_s=app.config.job_timeout_s)


def _resources(app: Appliance, job: Job) -> list[Resource] | None:
    """What the job reaches: as recorded at submission; for jobs queued before that was recorded,
    resolved again (None when that is no longer possible: only unrestricted keys see them)."""
    if job.resources or job.kind not in KINDS_WITH_RESOURCES:
        return list(job.resources)
    try:
        return job_resources(app.catalog, app.models, job.kind, job.params)
    except (InvalidRequest, NotFound):
        return None


def _unrestricted(who: Principal) -> bool:
    return who.models is None and who.datasets is None


def visible(app: Appliance, who: Principal, job: Job) -> bool:
    if _unrestricted(who):
        return True
    resources = _resources(app, job)
    return resources is not None and may_see(who, resources)


def get_job(app: Appliance, who: Principal, job_id: str, *, kind: str | None = None) -> Job:
    """One job, if the key is granted everything it touches (the refusal names no resource: the key
    must not learn what others' jobs work on)."""
    job = app.jobs.get(job_id)
    if kind is not None and job.kind != kind:
        raise NotFound(f"no fine-tuning job {job_id}", code="job_not_found", param="job_id")
    if not visible(app, who, job):
        raise PermissionDenied(f"this key is not granted every model and dataset job {job_id} works on",
                               code="resource_not_granted", details={"job": job_id})
    return job


def list_jobs(app: Appliance, who: Principal, *, state: str | None = None, kind: str | None = None,
              limit: int = 100) -> list[Job]:
    return app.jobs.list(state=state, kind=kind, limit=limit, visible=lambda job: visible(app, who, job))


def job_events(app: Appliance, who: Principal, job_id: str, *, after: int = 0, limit: int = 500,
               kind: str | None = None) -> list[JobEvent]:
    get_job(app, who, job_id, kind=kind)
    return app.jobs.events(job_id, after=after, limit=limit)


def cancel_job(app: Appliance, who: Principal, job_id: str, *, kind: str | None = None) -> Job:
    """Cancelling needs the kind's scope and every grant of the job (a train key cannot stop others' work)."""
    job = get_job(app, who, job_id, kind=kind)
    scope = job_kind(job.kind).scope
    authorize(who, scope)
    resources = _resources(app, job)
    if resources is None and not _unrestricted(who):
        raise PermissionDenied("this job's resources cannot be resolved any more; only an unrestricted key may "
                               "cancel it", code="resource_not_granted")
    for resource in resources or []:
        authorize(who, scope, resource)
    return app.jobs.request_cancel(job_id, actor=who.actor)
