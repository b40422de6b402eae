"""The built-in `selftest` job kind: a resumable counter.

It exercises everything the runner promises with no heavy dependency: progress,
checkpoints, resume after a crash, retries, cancel and shutdown.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any

from garrison.jobs.context import JobContext


def run(ctx: JobContext) -> dict[str, Any]:
    steps: int = ctx.params["steps"]
    step_s: float = ctx.params["step_s"]
    start = int((ctx.checkpoint or {}).get("step", 0))
    if start:
        ctx.log(f"resuming at step {start} of {steps}")
    if ctx.attempt <= ctx.params["fail_attempts"]:
        raise RuntimeError(f"selftest: failing attempt {ctx.attempt} on purpose")
    for step in range(start, steps):
        if not ctx.params["ignore_stop"]:
            ctx.check()
        if ctx.params["crash_at_step"] and step == ctx.params["crash_at_step"] and ctx.attempt == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(step_s)
        ctx.save_checkpoint({"step": step + 1})
        ctx.progress(step + 1, steps, f"step {step + 1}/{steps}")
    result: dict[str, Any] = {"steps": steps, "resumed_from": start, "attempt": ctx.attempt}
    if ctx.params["probe_address"]:
        result["network_probe"] = _probe(ctx.params["probe_address"])
    return result


def _probe(address: str) -> str:
    """Try to reach `address`; the network guard must refuse before any packet leaves."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return "connected"
    except PermissionError as exc:
        return f"refused by guard: {exc}"
    except OSError as exc:
        return f"failed: {exc}"
