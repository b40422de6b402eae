"""The job runner: claims jobs from the catalog and runs each in a worker subprocess.

It lives inside `garrison serve`, in `garrison worker` (its own systemd unit), or in a
CLI command running one job in the foreground; the code is the same. Several runners
may share a catalog: claims are transactions, and a runner only touches workers it
started, except to reap jobs whose worker is provably gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from garrison.jobs.store import Job, JobStore
from garrison.jobs.worker import EXIT_DONE, EXIT_SHUTDOWN
from garrison.logs import log_event

log = logging.getLogger("garrison.jobs")

CANCEL_GRACE_S = 10.0


@dataclass
class RunnerSettings:
    concurrency: int = 1
    poll_s: float = 0.25
    heartbeat_s: float = 2.0
    stale_after_s: float = 30.0
    shutdown_grace_s: float = 20.0


@dataclass
class _Active:
    job_id: str
    token: str
    proc: asyncio.subprocess.Process
    started: float
    timeout_s: float
    cancel_sent_at: float | None = None
    timed_out: bool = False
    pump: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


def _process_matches(pid: int | None, token: str | None) -> bool:
    """True when `pid` is alive and is the worker started for `token` (pids get reused)."""
    if not pid or not token:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return token.encode() in cmdline


class JobRunner:
    def __init__(self, store: JobStore, settings: Callable[[], RunnerSettings]) -> None:
        self.store = store
        self._settings = settings
        self.active: dict[str, _Active] = {}
        self._stopping = False

    @property
    def settings(self) -> RunnerSettings:
        return self._settings()

    # -- the loop ---------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; then ask workers to checkpoint and stop."""
        log_event(log, "jobs.runner_started", concurrency=self.settings.concurrency)
        try:
            while not stop.is_set():
                try:
                    await self.tick()
                except Exception as exc:  # the runner outlives any one bad row
                    log_event(log, "jobs.runner_error", level=logging.ERROR, error=repr(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.settings.poll_s)
        finally:
            await self.shutdown()

    async def tick(self) -> None:
        await asyncio.to_thread(self.reap_orphans)
        await self._police_active()
        while len(self.active) < self.settings.concurrency and not self._stopping:
            job = await asyncio.to_thread(self.store.claim)
            if job is None:
                break
            await self._start(job)

    # -- foreground ---------------------------------------------------------------
    async def run_until_done(self, job_id: str, on_update: Callable[[Job], None] | None = None) -> Job:
        """Run one job here (the CLI when no daemon runs), retries included."""
        while True:
            job = self.store.get(job_id)
            if on_update:
                on_update(job)
            if job.terminal:
                return job
            if job.state == "queued" and job.run_after <= time.time():
                claimed = self.store.claim(job_id=job_id)
                if claimed is not None:
                    active = await self._start(claimed)
                    while not active.done.is_set():
                        await self._police_active()
                        if on_update:
                            on_update(self.store.get(job_id))
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(active.done.wait(), timeout=self.settings.poll_s)
                    continue
            elif job.state == "running":
                self.reap_orphans()
            await asyncio.sleep(self.settings.poll_s)

    # -- workers ----------------------------------------------------------------
    async def _start(self, job: Job) -> _Active:
        assert job.worker_token is not None
        s = self.settings
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "garrison.jobs.worker",
            "--catalog", str(self.store.catalog.path), "--job", job.id, "--token", job.worker_token,
            "--heartbeat-s", str(s.heartbeat_s), "--parent-pid", str(os.getpid()),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        await asyncio.to_thread(self.store.set_worker_pid, job.id, job.worker_token, proc.pid)
        active = _Active(job.id, job.worker_token, proc, time.monotonic(), job.timeout_s)
        self.active[job.id] = active
        active.pump = asyncio.create_task(self._pump(active))
        log_event(log, "jobs.started", job=job.id, kind=job.kind, attempt=job.attempts, pid=proc.pid)
        return active

    async def _pump(self, active: _Active) -> None:
        """Collect the worker's output into the job's log tail, then settle its exit."""
        assert active.proc.stdout is not None
        try:
            async for raw in active.proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    await asyncio.to_thread(self.store.append_log, active.job_id, line[:2000])
            code = await active.proc.wait()
            await asyncio.to_thread(self._settle, active, code)
        finally:
            self.active.pop(active.job_id, None)
            active.done.set()

    def _settle(self, active: _Active, code: int) -> None:
        job = self.store.get(active.job_id)
        if job.state == "running" and job.worker_token == active.token:
            if active.timed_out:
                self.store.fail(job.id, active.token, code="job_timeout",
                                reason=f"attempt exceeded its time limit of {job.timeout_s:g} s")
            elif code == EXIT_SHUTDOWN or self._stopping:
                self.store.release(job.id, active.token, reason="interrupted by shutdown",
                                   code="interrupted", count_attempt=False)
            else:
                how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
                self.store.release(job.id, active.token, reason=f"worker {how}", code="worker_crashed",
                                   retry_delay_s=min(60.0, 2.0 ** job.attempts * 0.5))
        final = self.store.get(active.job_id)
        log_event(log, "jobs.worker_exited", job=active.job_id, code=code, state=final.state,
                  level=logging.INFO if code in (EXIT_DONE, EXIT_SHUTDOWN) else logging.WARNING)

    async def _police_active(self) -> None:
        """Deliver cancellations and enforce time limits on the workers this runner owns."""
        now = time.monotonic()
        for active in list(self.active.values()):
            if active.proc.returncode is not None:
                continue
            if now - active.started > active.timeout_s and not active.timed_out:
                active.timed_out = True
                log_event(log, "jobs.timeout", level=logging.WARNING, job=active.job_id)
                with contextlib.suppress(ProcessLookupError):
                    active.proc.kill()
                continue
            if active.cancel_sent_at is None:
                if await asyncio.to_thread(self.store.cancel_requested, active.job_id):
                    active.cancel_sent_at = now
                    with contextlib.suppress(ProcessLookupError):
                        active.proc.send_signal(signal.SIGUSR1)
            elif now - active.cancel_sent_at > CANCEL_GRACE_S:
                with contextlib.suppress(ProcessLookupError):
                    active.proc.kill()

    def reap_orphans(self) -> list[str]:
        """Requeue (or fail) running jobs whose worker is gone: after a crash or a restart."""
        reaped = []
        stale_after = self.settings.stale_after_s
        for job in self.store.running():
            if job.id in self.active or job.worker_token is None:
                continue
            alive = _process_matches(job.worker_pid, job.worker_token)
            stale = (time.time() - (job.heartbeat_at or job.updated_at)) > stale_after
            if alive and not stale:
                continue
            if alive and job.worker_pid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(job.worker_pid, signal.SIGKILL)
            if job.worker_pid is None and not stale:
                continue  # just claimed by another runner, pid not yet recorded
            reason = "worker stopped sending heartbeats" if alive else "worker lost (daemon or worker died)"
            final = self.store.release(job.id, job.worker_token, reason=reason, code="worker_lost")
            log_event(log, "jobs.orphan", level=logging.WARNING, job=job.id, state=final.state)
            reaped.append(job.id)
        return reaped

    async def shutdown(self) -> None:
        """Tell workers to checkpoint and stop; kill those that outlive the grace period."""
        self._stopping = True
        if not self.active:
            return
        for active in list(self.active.values()):
            with contextlib.suppress(ProcessLookupError):
                active.proc.send_signal(signal.SIGTERM)
        waits = [a.done.wait() for a in self.active.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout=self.settings.shutdown_grace_s)
        except TimeoutError:
            for active in list(self.active.values()):
                with contextlib.suppress(ProcessLookupError):
                    active.proc.kill()
            await asyncio.gather(*[a.done.wait() for a in list(self.active.values())])
