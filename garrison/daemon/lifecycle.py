"""`garrison serve` and `garrison worker`: start, notify, reload, drain, stop.

SIGTERM: STOPPING=1, stop accepting, let in-flight requests finish within the grace
period, and tell workers to checkpoint (they go back to the queue and resume on the
next start). SIGHUP: RELOADING=1, re-read the configuration and the policy file and apply every
setting that can change live (garrison.config's `reload` column says which); a bad file refuses the
whole reload, naming the key, and the old configuration and policy keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import sqlite3
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from aiohttp import web

from garrison.config import SETTINGS, Config, Reload
from garrison.daemon.api.datasets import ingest_service
from garrison.daemon.api.responses import response_store
from garrison.daemon.app import create_app, load_policy, manager_settings
from garrison.daemon.connections import ConnectionGate, GatedSite, raise_file_limit
from garrison.daemon.notify import SystemdNotifier, watchdog_interval_s
from garrison.daemon.state import STATE, DaemonState
from garrison.daemon.tls import load_certificate, server_context
from garrison.errors import ConfigError, Conflict, GarrisonError
from garrison.ingest.inbox import InboxWatcher
from garrison.jobs.runner import JobRunner, RunnerSettings
from garrison.jobs.store import JobStore
from garrison.logs import log_event, set_level, setup_logging
from garrison.operations.stored_responses import sweep_periodically
from garrison.paths import StateLayout
from garrison.policies.audit import anchor_at_shutdown, append_audit
from garrison.store.catalog import Catalog

log = logging.getLogger("garrison.daemon")

ConfigLoader = Callable[[], Config]


@contextlib.contextmanager
def daemon_lock(layout: StateLayout, info: dict[str, object]) -> Iterator[IO[str]]:
    """One daemon per state folder; the lock file also tells the CLI where it listens."""
    layout.ensure()
    handle = layout.daemon_lock.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise Conflict(f"a Garrison daemon already runs on {layout.root}", code="daemon_running") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(info))
        handle.flush()
        yield handle
    finally:
        with contextlib.suppress(OSError):
            handle.seek(0)
            handle.truncate()
        handle.close()


def running_daemon(layout: StateLayout) -> dict[str, object] | None:
    """What the daemon on this state folder wrote in its lock, or None if none runs."""
    try:
        handle = layout.daemon_lock.open("r")
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                info: dict[str, object] = json.loads(handle.read() or "{}")
            except json.JSONDecodeError:
                info = {}
            return info
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


def serve(load: ConfigLoader) -> int:
    config = load()
    setup_logging(config.log_level)
    return asyncio.run(_serve(load, config))


def _running_values(old: Config, new: Config, *, serves_tls: bool | None) -> Config:
    """`new`, except where a setting cannot change without a restart: there the running value stays (so
    `state.config` says what the daemon really does) and the change is logged as needing a restart.
    `serves_tls`: whether the listening socket has TLS (None: no socket, the worker)."""
    kept = {s.key: getattr(old, s.key) for s in SETTINGS
            if s.reload is Reload.RESTART and getattr(new, s.key) != getattr(old, s.key)}
    if serves_tls is not None and serves_tls != bool(new.tls_cert_file):
        # a renewed certificate reloads; TLS on or off would be another socket
        kept |= {key: getattr(old, key) for key in ("tls_cert_file", "tls_key_file")
                 if getattr(new, key) != getattr(old, key)}
    for key in kept:
        log_event(log, "config.needs_restart", level=logging.WARNING, key=key, running=getattr(old, key),
                  configured=getattr(new, key))
    return dataclasses.replace(new, **kept) if kept else new


def _connection_cap(config: Config, file_limit: int) -> int:
    """max_connections, within what the open-file limit allows (512 descriptors kept for everything else)."""
    return min(config.max_connections, max(64, file_limit - 512))


@dataclasses.dataclass(frozen=True)
class Reloadable:
    """What SIGHUP reconfigures beside DaemonState: the TLS context and the connection gate."""

    tls: ssl.SSLContext | None
    gate: ConnectionGate
    file_limit: int


def _reload(load: ConfigLoader, state: DaemonState, notifier: SystemdNotifier, live: Reloadable) -> None:
    """Everything is read and checked first (configuration, policy file, certificate), then applied at once:
    a mistake anywhere refuses the whole reload, naming the key, and the old configuration and policy run on."""
    notifier.reloading()
    try:
        new = load()
        policy = load_policy(new)
        if live.tls is not None and new.tls_cert_file:
            server_context(new)  # the certificate loads into a scratch context before the live one is touched
    except GarrisonError as exc:
        event = "policy.reload_refused" if exc.code == "invalid_policy" else "config.reload_failed"
        log_event(log, event, level=logging.ERROR, code=exc.code, key=exc.param, error=exc.message,
                  kept_config=state.config.source, kept_policy=state.policy.source)
        _audit_reload(state, "refused", {"code": exc.code, "key": exc.param, "error": exc.message[:300],
                                         "kept_policy": state.policy.source,
                                         "kept_policy_sha256": state.policy.digest})
        notifier.send(READY=1, STATUS=f"reload refused, old configuration and policy kept: {exc.message}"[:200])
        return
    new = _running_values(state.config, new, serves_tls=live.tls is not None)
    changed = [s.key for s in SETTINGS if getattr(new, s.key) != getattr(state.config, s.key)]
    if live.tls is not None and new.tls_cert_file:
        load_certificate(live.tls, new)  # for the connections made from now on
        log_event(log, "tls.reloaded", certificate=new.tls_cert_file)
    state.config, state.policy = new, policy  # handlers, the job runner and ingestion read these per use
    state.reloads += 1
    set_level(new.log_level)
    live.gate.reconfigure(max_connections=_connection_cap(new, live.file_limit),
                          header_timeout_s=new.header_timeout_s)
    state.manager.reconfigure(manager_settings(new))
    log_event(log, "config.reloaded", source=new.source, changed=changed, policy=policy.source)
    _audit_reload(state, "ok", {"config": new.source, "changed": changed, "policy": policy.source,
                                "policy_sha256": policy.digest})
    notifier.send(READY=1, STATUS=f"serving on {state.config.base_url} (reloaded)")


def _audit_reload(state: DaemonState, outcome: str, detail: dict[str, Any]) -> None:
    """Which rules the appliance ran when is part of its record: every SIGHUP, applied or refused, is audited
    (the sender of a signal is not known to its handler, so the actor is the signal). A failure to write is
    logged, never a reason to keep the old rules."""
    try:
        with state.catalog.write() as conn:
            append_audit(conn, actor="signal:SIGHUP", action="config.reload", resource="config", outcome=outcome,
                         detail=detail)
    except (GarrisonError, sqlite3.Error) as exc:
        log_event(log, "audit.write_failed", level=logging.ERROR, action="config.reload", error=str(exc)[:300])


async def _watchdog(notifier: SystemdNotifier, interval: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        notifier.watchdog()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


async def _drain(runner: web.AppRunner, state: DaemonState) -> None:
    """Stop accepting, then wait for in-flight requests within the grace period.

    aiohttp's own shutdown stops reading from every connection at once, so a request
    still receiving its body would be cut off; draining first lets it complete.
    """
    for site in list(runner.sites):
        await site.stop()
    deadline = time.monotonic() + state.config.shutdown_grace_s
    while state.in_flight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    if state.in_flight:
        log_event(log, "daemon.drain_timeout", level=logging.WARNING, in_flight=state.in_flight)


ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]


def _quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> ExceptionHandler:
    """Out of file descriptors, asyncio logs a traceback per failed accept (thousands a second): one
    line per 10 s with a count instead. Everything else goes to the default handler."""
    state = {"count": 0, "last": 0.0}

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "accept" not in str(context.get("message", "")):
            loop.default_exception_handler(context)
            return
        state["count"] += 1
        now = time.monotonic()
        if now - state["last"] >= 10.0:
            log_event(log, "connections.accept_failed", level=logging.ERROR, count=int(state["count"]),
                      error=str(context.get("exception", ""))[:200])
            state["last"], state["count"] = now, 0
    return handler


def _expire_previous_master_key(config: Config, catalog: Catalog) -> None:
    from garrison.operations.master_key import expire_previous_key

    removed = expire_previous_key(config, catalog, actor="system:retention")
    if removed:
        log_event(log, "master_key.previous_expired", removed=[str(p) for p in removed])


async def _serve(load: ConfigLoader, config: Config) -> int:
    started = time.monotonic()
    layout = StateLayout(config.state_path)
    notifier = SystemdNotifier()
    info = {"pid": os.getpid(), "url": config.base_url, "listen": config.listen}
    if os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE":
        # Right for training workers (garrison.jobs.worker sets it there), ruinous here: llama.cpp's
        # OpenMP barriers then sleep on every graph node (~3x slower decoding, measured 46 vs 140 tok/s).
        log_event(log, "daemon.omp_passive", level=logging.WARNING,
                  hint="unset OMP_WAIT_POLICY in the serving daemon's environment; inference will be slow")
    with daemon_lock(layout, info):
        catalog = Catalog(layout.catalog)
        app = create_app(config, catalog)
        state = app[STATE]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        tls = server_context(config)

        soft, _hard = raise_file_limit()
        gate = ConnectionGate(max_connections=_connection_cap(config, soft), header_timeout_s=config.header_timeout_s)
        loop.add_signal_handler(signal.SIGHUP, _reload, load, state, notifier, Reloadable(tls, gate, soft))
        app.middlewares.insert(0, gate.middleware)  # outermost: sees every request, refused ones included
        loop.set_exception_handler(_quiet_accept_errors(loop))
        runner = web.AppRunner(app, handle_signals=False, access_log=None,
                               shutdown_timeout=config.shutdown_grace_s)
        await runner.setup()
        site = GatedSite(runner, gate, config.host, config.port, reuse_address=True, ssl_context=tls)
        await site.start()

        job_stop = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        if config.run_jobs:
            state.runner = JobRunner(state.jobs, state.runner_settings)
            tasks.append(asyncio.create_task(state.runner.run(job_stop)))
        interval = watchdog_interval_s()
        watchdog_stop = asyncio.Event()
        if interval:
            tasks.append(asyncio.create_task(_watchdog(notifier, interval, watchdog_stop)))
        tasks.append(asyncio.create_task(state.manager.run_keep_alive(watchdog_stop)))
        tasks.append(asyncio.create_task(InboxWatcher(ingest_service(app)).run(job_stop)))
        tasks.append(asyncio.create_task(sweep_periodically(lambda: response_store(app), watchdog_stop)))

        await asyncio.to_thread(_expire_previous_master_key, config, catalog)
        notifier.ready(f"serving on {config.base_url}")
        log_event(log, "daemon.ready", url=config.base_url, state_dir=str(layout.root),
                  startup_ms=round((time.monotonic() - started) * 1000, 1), jobs=config.run_jobs,
                  pid=os.getpid(), open_files_limit=soft, max_connections=gate.max_connections)
        await stop.wait()

        log_event(log, "daemon.stopping", grace_s=state.config.shutdown_grace_s)
        notifier.stopping()
        state.shutting_down.set()
        job_stop.set()  # workers checkpoint while in-flight requests drain
        await _drain(runner, state)
        await runner.cleanup()
        watchdog_stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await state.manager.close()
        await asyncio.to_thread(anchor_at_shutdown, catalog)
        catalog.close()
        log_event(log, "daemon.stopped")
    return 0


def run_worker(load: ConfigLoader) -> int:
    """`garrison worker`: the job runner alone, for its own systemd unit."""
    config = load()
    setup_logging(config.log_level)
    return asyncio.run(_run_worker(load, config))


async def _run_worker(load: ConfigLoader, config: Config) -> int:
    layout = StateLayout(config.state_path)
    layout.ensure()
    catalog = Catalog(layout.catalog)
    store = JobStore(catalog)
    current = {"config": config}

    def settings() -> RunnerSettings:
        c = current["config"]
        return RunnerSettings(concurrency=c.job_concurrency, poll_s=c.job_poll_s,
                              heartbeat_s=c.job_heartbeat_s, stale_after_s=c.job_stale_after_s,
                              shutdown_grace_s=c.shutdown_grace_s)

    notifier = SystemdNotifier()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def reload() -> None:
        """The worker's share of SIGHUP: the job runner's settings (read per poll) and the log level. Its
        jobs read the configuration and the policy file themselves, in each worker subprocess."""
        notifier.reloading()
        try:
            new = _running_values(current["config"], load(), serves_tls=None)
        except ConfigError as exc:
            log_event(log, "config.reload_failed", level=logging.ERROR, code=exc.code, key=exc.param,
                      error=exc.message, kept_config=current["config"].source)
            notifier.send(READY=1, STATUS=f"running jobs; reload refused: {exc.message}"[:200])
            return
        changed = [s.key for s in SETTINGS if getattr(new, s.key) != getattr(current["config"], s.key)]
        current["config"] = new
        set_level(new.log_level)
        log_event(log, "config.reloaded", source=new.source, changed=changed)
        notifier.send(READY=1, STATUS="running jobs")

    loop.add_signal_handler(signal.SIGHUP, reload)
    runner = JobRunner(store, settings)
    job_stop = asyncio.Event()
    task = asyncio.create_task(runner.run(job_stop))
    watchdog_stop = asyncio.Event()
    interval = watchdog_interval_s()
    dog = asyncio.create_task(_watchdog(notifier, interval, watchdog_stop)) if interval else None
    notifier.ready("running jobs")
    log_event(log, "worker.ready", state_dir=str(layout.root), pid=os.getpid())
    await stop.wait()
    notifier.stopping()
    job_stop.set()
    await task
    watchdog_stop.set()
    if dog:
        await dog
    await asyncio.to_thread(anchor_at_shutdown, catalog)
    catalog.close()
    return 0


def state_layout(config: Config) -> StateLayout:
    return StateLayout(Path(config.state_dir))
