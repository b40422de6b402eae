"""The job runner through the real CLI in the foreground: progress, retries, crash
recovery from a checkpoint, timeouts and cancellation, all on real worker processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import garrison_env, run_cli

from garrison.jobs.store import JobStore
from garrison.store.catalog import Catalog


def _submit(state_dir: Path, *params: str, extra: tuple[str, ...] = (), check: bool = True
            ) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    args = ["jobs", "submit", "selftest", "--json", *extra]
    for p in params:
        args += ["-p", p]
    proc = run_cli(state_dir, *args, check=check)
    return proc, json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}


def test_foreground_job_succeeds_with_progress_and_events(state_dir: Path) -> None:
    _, job = _submit(state_dir, "steps=5", "step_s=0.01")
    assert job["state"] == "succeeded" and job["attempts"] == 1
    assert job["progress"]["fraction"] == 1.0 and job["result"] == {"steps": 5, "resumed_from": 0, "attempt": 1}
    events = JobStore(Catalog(state_dir / "catalog.db")).events(str(job["id"]))
    assert [e.type for e in events] == ["queued", "started", "succeeded"]


def test_failing_attempts_are_retried(state_dir: Path) -> None:
    _, job = _submit(state_dir, "steps=2", "step_s=0", "fail_attempts=1")
    assert job["state"] == "succeeded" and job["attempts"] == 2
    assert "failing attempt 1 on purpose" in str(job["log_tail"])


def test_job_fails_after_max_attempts_with_reason_and_exit_code(state_dir: Path) -> None:
    proc, _ = _submit(state_dir, "steps=2", "step_s=0", "fail_attempts=5", extra=("--max-attempts", "2"),
                      check=False)
    assert proc.returncode == 9, proc.stderr
    assert "job_error" in proc.stderr and "after 2 attempts" in proc.stderr


def test_worker_crash_resumes_from_checkpoint(state_dir: Path) -> None:
    _, job = _submit(state_dir, "steps=8", "step_s=0.01", "crash_at_step=5")
    assert job["state"] == "succeeded" and job["attempts"] == 2
    assert job["result"]["resumed_from"] == 5  # type: ignore[index]
    events = JobStore(Catalog(state_dir / "catalog.db")).events(str(job["id"]))
    requeued = [e for e in events if e.type == "requeued"]
    assert requeued and "killed by signal 9" in requeued[0].message


def test_timeout_fails_the_job(state_dir: Path) -> None:
    catalog = Catalog(state_dir / "catalog.db")
    store = JobStore(catalog)
    job = store.create("selftest", {"steps": 100, "step_s": 0.1, "ignore_stop": True}, timeout_s=1)
    proc = run_cli(state_dir, "jobs", "watch", job.id, "--json", check=False)
    assert proc.returncode == 9
    final = store.get(job.id)
    assert final.state == "failed" and final.error_code == "job_timeout"


def test_cancel_running_job_keeps_checkpoint(state_dir: Path) -> None:
    env = garrison_env(state_dir)
    runner = subprocess.Popen([sys.executable, "-m", "garrison.cli", "jobs", "submit", "selftest", "--json",
                               "-p", "steps=500", "-p", "step_s=0.02"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    store = JobStore(Catalog(state_dir / "catalog.db"))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        running = store.list(state="running")
        if running and running[0].checkpoint:
            break
        time.sleep(0.05)
    job_id = running[0].id
    assert "cancel requested" in run_cli(state_dir, "jobs", "cancel", job_id).stdout
    _out, err = runner.communicate(timeout=30)
    assert runner.returncode == 1, err
    final = store.get(job_id)
    assert final.state == "cancelled" and final.checkpoint and final.checkpoint["step"] > 0
    again = run_cli(state_dir, "jobs", "cancel", job_id, check=False)
    assert again.returncode == 5 and "job_already_finished" in again.stderr


def test_cancel_queued_job_and_list_show(state_dir: Path) -> None:
    job_id = run_cli(state_dir, "jobs", "submit", "selftest", "--detach").stdout.strip()
    listing = run_cli(state_dir, "jobs", "list").stdout
    assert job_id in listing and "queued" in listing
    assert "cancelled" in run_cli(state_dir, "jobs", "cancel", job_id).stdout
    shown = json.loads(run_cli(state_dir, "jobs", "show", job_id, "--events").stdout)
    assert shown["state"] == "cancelled" and [e["type"] for e in shown["events"]] == ["queued", "cancelled"]
    bad = run_cli(state_dir, "jobs", "submit", "selftest", "-p", "steps=-3", check=False)
    assert bad.returncode == 2 and "steps" in bad.stderr
    unknown = run_cli(state_dir, "jobs", "show", "job_nope", check=False)
    assert unknown.returncode == 4 and "job_not_found" in unknown.stderr
