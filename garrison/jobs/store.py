"""Jobs as catalog rows: every state change is one durable transaction.

A job keeps its row through its whole life (queued -> running -> succeeded | failed |
cancelled), unlike queues that delete a task when a worker takes it (huey's trap): a
crash at any instant leaves a row that says what happened. Each attempt gets a fresh
`worker_token`; a worker's writes are ignored once its token is no longer the job's, so
a stale worker from an earlier attempt cannot overwrite a newer one.
"""

from __future__ import annotations

import builtins
import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from garrison.errors import Conflict, InvalidRequest, NotFound
from garrison.jobs.kinds import JOB_KINDS, job_kind
from garrison.policies.audit import append_audit
from garrison.store.catalog import Catalog

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
LOG_TAIL_CHARS = 8192


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    params: dict[str, Any]
    state: str
    attempts: int
    max_attempts: int
    timeout_s: float
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    heartbeat_at: float | None
    worker_pid: int | None
    worker_token: str | None
    cancel_requested: bool
    run_after: float
    resumable: bool
    progress: float
    progress_message: str
    progress_done: float | None
    progress_total: float | None
    log_tail: str
    checkpoint: dict[str, Any] | None
    result: dict[str, Any] | None
    error_code: str | None
    error_message: str | None
    created_by: str | None
    resources: tuple[tuple[str, str], ...] = ()

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "garrison.job", "kind": self.kind, "params": self.params,
            "state": self.state, "attempts": self.attempts, "max_attempts": self.max_attempts,
            "timeout_s": self.timeout_s, "created_at": self.created_at, "updated_at": self.updated_at,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "heartbeat_at": self.heartbeat_at, "cancel_requested": self.cancel_requested,
            "resumable": self.resumable, "run_after": self.run_after,
            "progress": {"fraction": self.progress, "message": self.progress_message,
                         "done": self.progress_done, "total": self.progress_total},
            "log_tail": self.log_tail, "has_checkpoint": self.checkpoint is not None,
            "result": self.result,
            "error": ({"code": self.error_code, "message": self.error_message}
                      if self.error_code else None),
            "created_by": self.created_by,
            "resources": [f"{kind}:{name}" for kind, name in self.resources],
        }


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"], kind=row["kind"], params=json.loads(row["params"]), state=row["state"],
        attempts=row["attempts"], max_attempts=row["max_attempts"], timeout_s=row["timeout_s"],
        created_at=row["created_at"], updated_at=row["updated_at"], started_at=row["started_at"],
        finished_at=row["finished_at"], heartbeat_at=row["heartbeat_at"], worker_pid=row["worker_pid"],
        worker_token=row["worker_token"], cancel_requested=bool(row["cancel_requested"]),
        run_after=row["run_after"], resumable=bool(row["resumable"]), progress=row["progress"],
        progress_message=row["progress_message"], progress_done=row["progress_done"],
        progress_total=row["progress_total"], log_tail=row["log_tail"],
        checkpoint=json.loads(row["checkpoint"]) if row["checkpoint"] else None,
        result=json.loads(row["result"]) if row["result"] else None,
        error_code=row["error_code"], error_message=row["error_message"], created_by=row["created_by"],
        resources=tuple((str(k), str(n)) for k, n in json.loads(row["resources"] or "[]")),
    )


@dataclass(frozen=True)
class JobEvent:
    seq: int
    job_id: str
    at: float
    level: str
    type: str
    message: str
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "job_id": self.job_id, "at": self.at, "level": self.level,
                "type": self.type, "message": self.message, "data": self.data}


def _event(conn: sqlite3.Connection, job_id: str, type_: str, message: str = "", *,
           level: str = "info", data: dict[str, Any] | None = None) -> None:
    conn.execute("INSERT INTO job_events (job_id, at, level, type, message, data) VALUES (?,?,?,?,?,?)",
                 (job_id, time.time(), level, type_, message, json.dumps(data or {})))


class JobStore:
    """Every read and write of job rows; the runner, the workers, the API and the CLI share it."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    # -- creation and queries --------------------------------------------------
    def create(self, kind: str, params: dict[str, Any] | None = None, *, max_attempts: int | None = None,
               timeout_s: float | None = None, created_by: str = "local",
               default_max_attempts: int = 3, default_timeout_s: float = 86400.0,
               resources: builtins.list[tuple[str, str]] | None = None, validated: bool = False) -> Job:
        """Queue a job. Callers go through `garrison.operations.jobs.submit_job`, which authorizes the
        principal for the kind and every resource first and passes them as `resources`."""
        spec = job_kind(kind)
        clean = dict(params or {}) if validated else spec.validate(params or {})
        attempts = max_attempts if max_attempts is not None else default_max_attempts
        timeout = timeout_s if timeout_s is not None else min(spec.default_timeout_s or default_timeout_s,
                                                               default_timeout_s)
        if not 1 <= attempts <= 100:
            raise InvalidRequest("max_attempts must be between 1 and 100", param="max_attempts")
        if not 1 <= timeout <= 30 * 86400:
            raise InvalidRequest("timeout_s must be between 1 and 2592000", param="timeout_s")
        job_id = "job_" + secrets.token_hex(10)
        now = time.time()
        with self.catalog.write() as conn:
            conn.execute(
                "INSERT INTO jobs (id, kind, params, state, max_attempts, timeout_s, created_at,"
                " updated_at, resumable, created_by, resources) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (job_id, kind, json.dumps(clean), "queued", attempts, timeout, now, now,
                 int(spec.resumable), created_by, json.dumps(resources or [])))
            _event(conn, job_id, "queued", f"{kind} job queued")
            append_audit(conn, actor=created_by, action="jobs.create", resource=job_id,
                         detail={"kind": kind, "resources": [f"{k}:{n}" for k, n in resources or []]})
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        row = self.catalog.query_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if row is None:
            raise NotFound(f"no job with id {job_id!r}", code="job_not_found", param="job_id")
        return _job(row)

    def list(self, *, state: str | None = None, kind: str | None = None, limit: int = 100,
             visible: Callable[[Job], bool] | None = None) -> builtins.list[Job]:
        """Newest first; with `visible`, the newest `limit` jobs it accepts (pages through the rest)."""
        if state is not None and state not in STATES:
            raise InvalidRequest(f"unknown state {state!r}; states: {', '.join(STATES)}", param="state")
        if kind is not None and kind not in JOB_KINDS:
            raise InvalidRequest(f"unknown job kind {kind!r}", param="kind")
        limit = max(1, min(int(limit), 1000))
        sql = "SELECT * FROM jobs WHERE (? IS NULL OR state = ?) AND (? IS NULL OR kind = ?)" \
              " ORDER BY created_at DESC, id LIMIT ? OFFSET ?"
        found: builtins.list[Job] = []
        offset = 0
        while len(found) < limit:
            page = [_job(r) for r in self.catalog.query(sql, (state, state, kind, kind, 500, offset))]
            found.extend(j for j in page if visible is None or visible(j))
            if len(page) < 500:
                break
            offset += len(page)
        return found[:limit]

    def counts_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for row in self.catalog.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            counts[row["state"]] = row["n"]
        return counts

    def events(self, job_id: str, *, after: int = 0, limit: int = 500) -> builtins.list[JobEvent]:
        rows = self.catalog.query(
            "SELECT * FROM job_events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (job_id, after, limit))
        return [JobEvent(r["seq"], r["job_id"], r["at"], r["level"], r["type"], r["message"],
                         json.loads(r["data"])) for r in rows]

    # -- cancellation ---------------------------------------------------------
    def request_cancel(self, job_id: str, *, actor: str = "local") -> Job:
        """A queued job is cancelled at once; a running one is asked to stop."""
        with self.catalog.write() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"no job with id {job_id!r}", code="job_not_found", param="job_id")
            if row["state"] in TERMINAL:
                raise Conflict(f"job {job_id} already {row['state']}", code="job_already_finished")
            now = time.time()
            if row["state"] == "queued":
                conn.execute("UPDATE jobs SET state='cancelled', cancel_requested=1, finished_at=?,"
                             " updated_at=? WHERE id=?", (now, now, job_id))
                _event(conn, job_id, "cancelled", "cancelled before it started")
            else:
                conn.execute("UPDATE jobs SET cancel_requested=1, updated_at=? WHERE id=?", (now, job_id))
                _event(conn, job_id, "cancel_requested", "cancellation requested")
            append_audit(conn, actor=actor, action="jobs.cancel", resource=job_id)
        return self.get(job_id)

    # -- the runner's side ------------------------------------------------------
    def claim(self, *, job_id: str | None = None) -> Job | None:
        """Take the oldest runnable queued job (or one named job) for a new attempt."""
        now = time.time()
        with self.catalog.write() as conn:
            if job_id is not None:
                row = conn.execute("SELECT * FROM jobs WHERE id = ? AND state = 'queued'",
                                   (job_id,)).fetchone()
            else:
                row = conn.execute(
                    "SELECT * FROM jobs WHERE state = 'queued' AND run_after <= ?"
                    " ORDER BY created_at LIMIT 1", (now,)).fetchone()
            if row is None:
                return None
            token = secrets.token_hex(12)
            conn.execute(
                "UPDATE jobs SET state='running', attempts=attempts+1, worker_token=?, worker_pid=NULL,"
                " started_at=COALESCE(started_at, ?), heartbeat_at=?, updated_at=?, error_code=NULL,"
                " error_message=NULL WHERE id=?", (token, now, now, now, row["id"]))
            _event(conn, row["id"], "started", f"attempt {row['attempts'] + 1} of {row['max_attempts']}",
                   data={"attempt": row["attempts"] + 1})
        return self.get(row["id"])

    def set_worker_pid(self, job_id: str, token: str, pid: int) -> None:
        with self.catalog.write() as conn:
            conn.execute("UPDATE jobs SET worker_pid=?, updated_at=? WHERE id=? AND worker_token=?",
                         (pid, time.time(), job_id, token))

    def running(self) -> builtins.list[Job]:
        return [_job(r) for r in self.catalog.query("SELECT * FROM jobs WHERE state = 'running'")]

    def queue_depth(self) -> int:
        row = self.catalog.query_one("SELECT COUNT(*) FROM jobs WHERE state = 'queued'")
        return int(row[0]) if row else 0

    def release(self, job_id: str, token: str, *, reason: str, code: str, retry_delay_s: float = 0.0,
                count_attempt: bool = True) -> Job:
        """End an attempt that did not finish: requeue while attempts remain, else fail."""
        with self.catalog.write() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["state"] != "running" or row["worker_token"] != token:
                return self.get(job_id)
            now = time.time()
            attempts = row["attempts"] if count_attempt else max(0, row["attempts"] - 1)
            if row["cancel_requested"]:
                conn.execute("UPDATE jobs SET state='cancelled', finished_at=?, updated_at=?,"
                             " worker_token=NULL, worker_pid=NULL WHERE id=?", (now, now, job_id))
                _event(conn, job_id, "cancelled", "cancelled; last checkpoint kept")
            elif attempts < row["max_attempts"]:
                conn.execute(
                    "UPDATE jobs SET state='queued', attempts=?, run_after=?, updated_at=?, worker_token=NULL,"
                    " worker_pid=NULL, error_code=?, error_message=? WHERE id=?",
                    (attempts, now + retry_delay_s, now, code, reason, job_id))
                resume = " from its last checkpoint" if row["resumable"] and row["checkpoint"] else ""
                _event(conn, job_id, "requeued", f"{reason}; will run again{resume}", level="warning",
                       data={"code": code, "attempts": attempts})
            else:
                conn.execute(
                    "UPDATE jobs SET state='failed', attempts=?, finished_at=?, updated_at=?,"
                    " worker_token=NULL, worker_pid=NULL, error_code=?, error_message=? WHERE id=?",
                    (attempts, now, now, code, f"{reason} (after {attempts} attempts)", job_id))
                _event(conn, job_id, "failed", reason, level="error", data={"code": code})
        return self.get(job_id)

    def fail(self, job_id: str, token: str | None, *, code: str, reason: str) -> Job:
        """Fail now, whatever attempts remain (timeouts, invalid input)."""
        with self.catalog.write() as conn:
            row = conn.execute("SELECT state, worker_token FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["state"] in TERMINAL or (token is not None and row["worker_token"] != token):
                return self.get(job_id)
            now = time.time()
            conn.execute("UPDATE jobs SET state='failed', finished_at=?, updated_at=?, worker_token=NULL,"
                         " worker_pid=NULL, error_code=?, error_message=? WHERE id=?",
                         (now, now, code, reason, job_id))
            _event(conn, job_id, "failed", reason, level="error", data={"code": code})
        return self.get(job_id)

    # -- the worker's side ----------------------------------------------------
    def _worker_update(self, job_id: str, token: str, sql: str, params: tuple[Any, ...]) -> bool:
        with self.catalog.write() as conn:
            cur = conn.execute(sql + " WHERE id=? AND worker_token=? AND state='running'",
                               (*params, job_id, token))
            return cur.rowcount == 1

    def heartbeat(self, job_id: str, token: str) -> bool:
        now = time.time()
        return self._worker_update(job_id, token, "UPDATE jobs SET heartbeat_at=?", (now,))

    def cancel_requested(self, job_id: str) -> bool:
        row = self.catalog.query_one("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,))
        return bool(row and row[0])

    def report_progress(self, job_id: str, token: str, *, fraction: float, message: str,
                        done: float | None, total: float | None) -> bool:
        now = time.time()
        return self._worker_update(
            job_id, token,
            "UPDATE jobs SET progress=?, progress_message=?, progress_done=?, progress_total=?,"
            " heartbeat_at=?, updated_at=?",
            (max(0.0, min(1.0, fraction)), message[:500], done, total, now, now))

    def append_log(self, job_id: str, line: str) -> None:
        with self.catalog.write() as conn:
            row = conn.execute("SELECT log_tail FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return
            tail = (row["log_tail"] + line.rstrip("\n") + "\n")[-LOG_TAIL_CHARS:]
            conn.execute("UPDATE jobs SET log_tail=? WHERE id=?", (tail, job_id))

    def add_event(self, job_id: str, type_: str, message: str = "", *, level: str = "info",
                  data: dict[str, Any] | None = None) -> None:
        with self.catalog.write() as conn:
            _event(conn, job_id, type_, message, level=level, data=data)

    def save_checkpoint(self, job_id: str, token: str, checkpoint: dict[str, Any]) -> bool:
        now = time.time()
        return self._worker_update(job_id, token, "UPDATE jobs SET checkpoint=?, heartbeat_at=?, updated_at=?",
                                   (json.dumps(checkpoint), now, now))

    def succeed(self, job_id: str, token: str, result: dict[str, Any]) -> bool:
        now = time.time()
        with self.catalog.write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state='succeeded', result=?, progress=1.0, finished_at=?, updated_at=?,"
                " worker_token=NULL, worker_pid=NULL WHERE id=? AND worker_token=? AND state='running'",
                (json.dumps(result), now, now, job_id, token))
            if cur.rowcount == 1:
                _event(conn, job_id, "succeeded", "job succeeded", data={"result": result})
            return cur.rowcount == 1

    def mark_cancelled(self, job_id: str, token: str) -> bool:
        now = time.time()
        with self.catalog.write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state='cancelled', finished_at=?, updated_at=?, worker_token=NULL,"
                " worker_pid=NULL WHERE id=? AND worker_token=? AND state='running'",
                (now, now, job_id, token))
            if cur.rowcount == 1:
                _event(conn, job_id, "cancelled", "cancelled; last checkpoint kept")
            return cur.rowcount == 1

    def iter_all_ids(self) -> Iterator[str]:
        for row in self.catalog.query("SELECT id FROM jobs"):
            yield row["id"]
