"""Shared fixtures: real state folders, a real daemon subprocess, real HTTP on loopback.

Model fixtures (tiny Llama, tiny BERT, GGUF) come from model_fixtures.py and are built
once per machine into a cache folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from model_fixtures import *  # noqa: F403

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch in test processes; see garrison.jobs.worker
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def garrison_env(state_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GARRISON_") and k not in {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}}
    env.update({"GARRISON_STATE_DIR": str(state_dir), "GARRISON_CONFIG": "/dev/null",
                # the developer master key goes beside the state folder, never into the real home
                "XDG_CONFIG_HOME": str(state_dir.parent / "xdg-config"),
                "GARRISON_JOB_POLL_S": "0.05", "GARRISON_JOB_HEARTBEAT_S": "0.2",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def run_cli(state_dir: Path, *args: str, env: dict[str, str] | None = None, check: bool = True,
            timeout: float = 120, input_: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "garrison.cli", *args], capture_output=True, text=True,
                          env=env or garrison_env(state_dir), timeout=timeout, input=input_)
    if check and proc.returncode != 0:
        raise AssertionError(f"garrison {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


@dataclass
class Daemon:
    state_dir: Path
    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *extra_args: str, wait: bool = True) -> Daemon:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "garrison.cli", "serve", "--listen", f"127.0.0.1:{self.port}", *extra_args],
            env=self.env, stdout=log, stderr=log)
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"daemon not healthy in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def key(self, role: str = "admin") -> str:
        if role not in self.keys:
            self.keys[role] = run_cli(self.state_dir, "keys", "create", "--role", role,
                                      env=self.env).stdout.strip()
        return self.keys[role]

    def request(self, method: str, path: str, body: Any = None, role: str | None = "admin",
                key: str | None = None, timeout: float = 30) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if key or role:
            req.add_header("Authorization", f"Bearer {key or self.key(role or 'admin')}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as err:
            raw = err.read()
            status = err.code
        try:
            return status, json.loads(raw)
        except json.JSONDecodeError:
            return status, raw.decode()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


@pytest.fixture(autouse=True)
def _private_master_key_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit entries are MACed with a key derived from the master key, and a developer install mints
    that key in XDG_CONFIG_HOME: in a test, never in the real home of whoever runs it."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg-config")))


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A developer install isolated in tmp_path, in this process: its own state folder and ~/.config (master key)."""
    for name in list(os.environ):
        if name.startswith("GARRISON_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)
    values = {"GARRISON_CONFIG": "/dev/null", "GARRISON_STATE_DIR": str(tmp_path / "state"),
              "HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "home" / ".config")}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture
def service(env: dict[str, str]) -> Iterator[Any]:
    """An ingestion service on that isolated install (small vault chunks, so tests see several)."""
    from garrison.config import load_config
    from garrison.ingest.pipeline import IngestService
    from garrison.paths import StateLayout
    from garrison.store.catalog import Catalog

    config = load_config()
    layout = StateLayout(config.state_path)
    layout.ensure()
    catalog = Catalog(layout.catalog)
    yield IngestService(config, catalog, chunk_size=4096)
    catalog.close()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def make_daemon(state_dir: Path, tmp_path: Path) -> Iterator[Any]:
    started: list[Daemon] = []

    def make(**env_extra: str) -> Daemon:
        daemon = Daemon(state_dir, free_port(), garrison_env(state_dir, **env_extra),
                        tmp_path / f"daemon{len(started)}.log")
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


@pytest.fixture
def daemon(make_daemon: Any) -> Daemon:
    started: Daemon = make_daemon().start()
    return started


def pool_blocks(monkeypatch: pytest.MonkeyPatch, workers: int = 2) -> list[int]:
    """Make ingestions use a pool of `workers` whatever this machine has; the list this returns
    collects the first line number of every block handed to a worker."""
    from garrison.ingest import parallel

    monkeypatch.setattr("garrison.ingest.pipeline.worker_count", lambda: workers)
    submitted: list[int] = []
    real_submit = parallel.RedactionPool.submit

    def submit(self: parallel.RedactionPool, first: int, *args: Any) -> Any:
        submitted.append(first)
        return real_submit(self, first, *args)

    monkeypatch.setattr(parallel.RedactionPool, "submit", submit)
    return submitted


@pytest.fixture(scope="session")
def repack_verdicts(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """This machine's CPU-kernel verdicts (probed once per test session, in throw-away processes)."""
    from garrison.engine.cpu_kernels import RepackVerdicts

    return RepackVerdicts(tmp_path_factory.mktemp("kernels") / "cpu-kernels.json")


@contextlib.asynccontextmanager
async def gguf_runner(path: Path, verdicts: Any, **spec: Any) -> AsyncIterator[Any]:
    """A GGUF model in its own runner process, as the daemon serves it: native code never runs in
    the test process, so a kernel that faults on this CPU fails the test instead of killing pytest."""
    from garrison.engine import wire
    from garrison.serving.runners import RunnerGenerationEngine, RunnerProcess

    use_extra, _why = verdicts.decide(spec.pop("cpu_repack", "auto"), path)
    exits: list[Any] = []
    runner = RunnerProcess(wire.Spec(format="gguf", path=str(path), use_extra_bufts=use_extra,
                                     **{"n_ctx_per_slot": 256, "n_parallel": 2, "n_threads": 2, **spec}),
                           name=path.name, on_exit=lambda _r, how: exits.append(how))
    await runner.start()
    try:
        yield RunnerGenerationEngine(runner)
    finally:
        await runner.stop()


def serve_model(root: Path, model: Path, name: str, policy: str | None = None) -> Daemon:
    """A daemon over a fresh state folder serving one GGUF model as `name` (2 slots of 1,024 tokens), with an
    optional policy file: what the tool-calling and Responses suites share."""
    state = root / "state"
    extra = {}
    if policy is not None:
        (root / "policy.toml").write_text(policy)
        extra["GARRISON_POLICY_FILE"] = str(root / "policy.toml")
    env = garrison_env(state, **extra)
    run_cli(state, "models", "import", str(model), "--name", name, "--parallel", "2", "--ctx", "1024", env=env)
    return Daemon(state, free_port(), env, root / "daemon.log").start()
