"""The worker subprocess: runs one attempt of one job, then exits.

Started by the job runner as `python -m garrison.jobs.worker`. Its exit status tells
the runner what happened when the catalog cannot (a crash leaves the row `running`):

- 0: the job reached a final state (succeeded, failed or cancelled) itself;
- 75 (EX_TEMPFAIL): stopped for a shutdown; the job was put back in the queue;
- anything else: a crash; the runner applies the retry policy.

SIGTERM means "checkpoint and stop" (shutdown); SIGUSR1 means "the job was cancelled".
The worker also dies with its parent (PR_SET_PDEATHSIG), so a killed daemon never
leaves a worker writing on behalf of nobody.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from types import FrameType

EXIT_DONE = 0
EXIT_SHUTDOWN = 75


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="garrison-worker")
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--heartbeat-s", type=float, default=2.0)
    parser.add_argument("--parent-pid", type=int, default=0)
    args = parser.parse_args(argv)

    # OpenMP threads spinning while another process holds their core collapse torch's CPU speed
    # (measured: 6 against 77 training steps in 20 s). Workers only: the serving daemon's
    # llama.cpp threads are left to OpenMP's default.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _die_with_parent()
    if args.parent_pid and os.getppid() != args.parent_pid:
        return EXIT_SHUTDOWN  # the parent died before prctl took effect

    # Nothing a worker does may reach the network (Hugging Face libraries included).
    from garrison.policies import network_guard

    network_guard.install()

    from garrison.errors import GarrisonError
    from garrison.jobs.context import JobContext, StopRequested
    from garrison.jobs.grants import authorize_job
    from garrison.jobs.kinds import job_kind
    from garrison.jobs.store import JobStore
    from garrison.models.registry import ModelRegistry
    from garrison.store.catalog import Catalog

    catalog = Catalog(Path(args.catalog), migrate=False)
    store = JobStore(catalog)
    job = store.get(args.job)
    if job.state != "running" or job.worker_token != args.token:
        return EXIT_DONE  # superseded before it started
    ctx = JobContext(store, job, args.token)

    # Each handler ignores its signal before it touches the Event: Event.set() takes a lock, and a
    # second SIGTERM (the parent's shutdown plus its death signal) arriving while the first handler
    # held that lock ran the handler again inside it, on the same thread: a deadlocked worker.
    def on_term(sig: int, _frame: FrameType | None) -> None:
        signal.signal(sig, signal.SIG_IGN)
        ctx.shutdown_event.set()

    def on_cancel(sig: int, _frame: FrameType | None) -> None:
        signal.signal(sig, signal.SIG_IGN)
        ctx.cancel_event.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGUSR1, on_cancel)

    stop_beats = threading.Event()

    def beat() -> None:
        while not stop_beats.wait(args.heartbeat_s):
            try:
                if not store.heartbeat(job.id, args.token):
                    ctx.shutdown_event.set()  # superseded: stop writing
                if store.cancel_requested(job.id):
                    ctx.cancel_event.set()
            except Exception as exc:  # a busy catalog must not kill the job
                print(f"heartbeat failed: {exc}", file=sys.stderr)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
    kind = job_kind(job.kind)
    try:
        if store.cancel_requested(job.id):
            raise StopRequested(cancelled=True)
        # Grants again, as the key stands now, before the job opens anything (it checks once more at each open).
        authorize_job(catalog, ModelRegistry(catalog, ctx.layout), ctx.principal, job.kind, kind.scope, job.params)
        result = kind.load()(ctx)
        store.succeed(job.id, args.token, result or {})
        return EXIT_DONE
    except StopRequested as stop:
        if stop.cancelled:
            store.mark_cancelled(job.id, args.token)
            return EXIT_DONE
        store.release(job.id, args.token, reason="interrupted by shutdown", code="interrupted",
                      count_attempt=False)
        return EXIT_SHUTDOWN
    except GarrisonError as exc:
        # Our own errors are deliberate refusals (bad input, unsupported model): no retry.
        store.fail(job.id, args.token, code=exc.code, reason=exc.message)
        return EXIT_DONE
    except Exception as exc:
        traceback.print_exc()
        store.release(job.id, args.token, reason=f"{type(exc).__name__}: {exc}", code="job_error",
                      retry_delay_s=min(60.0, 2.0 ** job.attempts * 0.5))
        return EXIT_DONE
    finally:
        stop_beats.set()


if __name__ == "__main__":
    sys.exit(main())
