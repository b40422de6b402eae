"""The model manager: which models are in memory, loaded on first use, evicted when idle.

Loading a model takes seconds and much memory, so the manager makes sure that two
concurrent first requests load it once, that the sum of loaded models stays under a
budget (the least recently used idle model goes first), and that a model nobody used for
`keep_alive_s` is unloaded. A model's files are checked against its manifest before it is
loaded, so a tampered artifact is refused with an integrity error, never served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from garrison.engine import wire
from garrison.engine.cpu_kernels import RepackVerdicts
from garrison.engine.protocols import EmbeddingEngine, GenerationEngine
from garrison.engine.wire import EngineCrashed, ModelFailed
from garrison.errors import InvalidRequest, Unavailable
from garrison.logs import log_event
from garrison.models.names import check_model_id
from garrison.models.registry import ModelRecord, ModelRegistry
from garrison.serving.runners import RunnerEmbeddingEngine, RunnerExit, RunnerGenerationEngine, RunnerProcess

log = logging.getLogger("garrison.serving")

BASE_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
#: A request waits out a restart backoff up to this long; past it, 503 with Retry-After.
MAX_RESTART_WAIT_S = 5.0
STATS_INTERVAL_S = 2.0


@dataclass(frozen=True)
class ManagerSettings:
    memory_budget_bytes: int
    keep_alive_s: float
    max_queue: int
    n_threads: int | None
    cpu_repack: str = "auto"
    #: Crashes in a row (no request finished in between) after which a model is marked failed.
    max_crashes: int = 3


Engine = GenerationEngine | EmbeddingEngine


@dataclass(frozen=True)
class Handle:
    """What one request holds: the engine, and the adapter to attach for it (LoRA models)."""

    name: str
    engine: Engine
    lora_path: Path | None = None

    @property
    def generator(self) -> GenerationEngine:
        if not isinstance(self.engine, GenerationEngine):
            raise TypeError(f"{self.name} is not a generation engine")
        return self.engine

    @property
    def embedder(self) -> EmbeddingEngine:
        if not isinstance(self.engine, EmbeddingEngine):
            raise TypeError(f"{self.name} is not an embedding engine")
        return self.engine


@dataclass
class LoadedModel:
    record: ModelRecord
    engine: Engine
    runner: RunnerProcess
    capability: str  # "generate" or "embed"
    size_bytes: int
    repack_reason: str = ""
    loaded_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    users: int = 0

    @property
    def name(self) -> str:
        return self.record.name


@dataclass
class ModelHealth:
    """A model's runner history: crashes in a row, the last one, and whether it was given up on."""

    crashes_in_a_row: int = 0
    crashes_total: int = 0
    last_crash: str | None = None
    last_crash_at: float | None = None
    restart_not_before: float = 0.0
    failed_reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"crashes_in_a_row": self.crashes_in_a_row, "crashes_total": self.crashes_total,
                "last_crash": self.last_crash, "last_crash_at": self.last_crash_at,
                "failed": self.failed_reason is not None, "failed_reason": self.failed_reason}


def _onnx_capability(record: ModelRecord) -> str:
    """Decoders generate, encoders embed: from the export's manifest, else the model's architectures."""
    import json

    for name in ("garrison_onnx.json", "config.json"):
        path = record.folder / name
        if path.exists():
            data = json.loads(path.read_text())
            if name == "garrison_onnx.json" and data.get("kind") in ("decoder", "encoder"):
                return "generate" if data["kind"] == "decoder" else "embed"
            if name == "config.json":
                return "generate" if "CausalLM" in " ".join(data.get("architectures") or []) else "embed"
    return "embed"


def _fault_injection(name: str) -> int | None:
    """GARRISON_RUNNER_FAULT=model:SIGNAL makes that model's runner kill itself after loading.

    Fault injection for the supervision tests (a runner that always crashes), as a model that
    faults natively on one CPU would; unset in production.
    """
    spec = os.environ.get("GARRISON_RUNNER_FAULT", "")
    model, _, sig = spec.partition(":")
    if model != name or not sig:
        return None
    return int(signal.Signals[sig] if not sig.isdigit() else int(sig))


def _gguf_spec(record: ModelRecord, settings: ManagerSettings, verdicts: RepackVerdicts) -> tuple[wire.Spec, str]:
    s = record.settings
    use_extra, why = verdicts.decide(settings.cpu_repack, record.entry_path)
    spec = wire.Spec(format="gguf", path=str(record.entry_path), capability="generate",
                     n_ctx_per_slot=int(s["n_ctx_per_slot"]), n_parallel=int(s["n_parallel"]),
                     n_batch=max(512, int(s["n_parallel"])), n_threads=settings.n_threads,
                     n_gpu_layers=int(s["n_gpu_layers"]),
                     max_queue=settings.max_queue if s.get("max_queue") is None else int(s["max_queue"]),
                     use_extra_bufts=use_extra, crash_after_load=_fault_injection(record.name),
                     gpu=None if s.get("gpu") is None else int(s["gpu"]))
    return spec, why


def _onnx_spec(record: ModelRecord, settings: ManagerSettings, verdicts: RepackVerdicts) -> tuple[wire.Spec, str]:
    queue = settings.max_queue if record.settings.get("max_queue") is None else int(record.settings["max_queue"])
    spec = wire.Spec(format="onnx", path=str(record.folder), model_file=record.entry,
                     capability=_onnx_capability(record), n_parallel=int(record.settings["n_parallel"]),
                     n_threads=settings.n_threads, max_queue=queue, use_extra_bufts=False,
                     crash_after_load=_fault_injection(record.name))
    return spec, "not llama.cpp"


# How each servable format becomes a runner's Spec.
SPECS: dict[str, Callable[[ModelRecord, ManagerSettings, RepackVerdicts], tuple[wire.Spec, str]]] = {
    "gguf": _gguf_spec,
    "onnx": _onnx_spec,
}


def default_budget_bytes(configured_mb: float) -> int:
    if configured_mb > 0:
        return int(configured_mb * 1024 * 1024)
    return int(psutil.virtual_memory().total // 2)


class ModelManager:
    """Loads models into runner processes on demand, keeps them under a budget, supervises them.

    A runner that dies fails only its in-flight requests (engine_crashed); the model is
    dropped from `loaded` and reloaded by the next request, after a backoff that doubles with
    each crash in a row. After `max_crashes` in a row the model is marked failed (its reason
    in `garrison ps`) and refused with model_failed until it is unloaded or the daemon reloads.
    """

    def __init__(self, registry: ModelRegistry, settings: ManagerSettings) -> None:
        self.registry = registry
        self.settings = settings
        self.loaded: dict[str, LoadedModel] = {}
        self.health: dict[str, ModelHealth] = {}
        self._loading: dict[str, asyncio.Future[LoadedModel]] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._verified_adapters: set[tuple[str, float]] = set()
        self.verdicts = RepackVerdicts(registry.layout.cache / "cpu-kernels.json")
        self.loads = 0
        self.evictions = 0
        self.crashes: dict[tuple[str, str], int] = {}  # (model, how) -> count, for /metrics

    def resolve(self, model_id: str) -> ModelRecord:
        check_model_id(model_id)
        record = self.registry.get(model_id)
        if not record.servable:
            parity = record.manifest.get("parity")
            if parity and not parity.get("passed", True):  # an artifact whose export failed: say why, not "export it"
                raise InvalidRequest(f"model {model_id!r} failed its parity gate when it was exported and is never "
                                     f"served ({parity.get('code') or 'parity_failed'}): {parity.get('reason')}",
                                     param="model", code="model_failed_parity", details={"parity": parity})
            raise InvalidRequest(f"model {model_id!r} is a {record.format} model and cannot be served; export it "
                                 "to GGUF or ONNX first (`garrison export`)", param="model", code="model_not_servable")
        return record

    @contextlib.asynccontextmanager
    async def use(self, model_id: str, capability: str) -> AsyncIterator[Handle]:
        """Hold a model for one request: it is not evicted while held.

        A LoRA model holds its base: every adapter of a base shares the one loaded copy.
        """
        lora: Path | None = None
        record = await asyncio.to_thread(self.resolve, model_id)
        if record.base:
            key = (record.name, record.created_at)
            if key not in self._verified_adapters:
                await asyncio.to_thread(self.registry.verify, record)
                self._verified_adapters.add(key)
            lora = record.entry_path
            model_id = record.base
        loaded = await self._acquire(model_id)
        if loaded.capability != capability:
            what = "text generation" if capability == "generate" else "embeddings"
            raise InvalidRequest(f"model {model_id!r} does not support {what}", param="model",
                                 code="model_capability_mismatch")
        loaded.users += 1
        loaded.last_used = time.monotonic()
        ok = False
        try:
            yield Handle(name=record.name, engine=loaded.engine, lora_path=lora)
            ok = True
        finally:
            loaded.users -= 1
            loaded.last_used = time.monotonic()
            if ok and loaded.runner.alive:
                # A request that ended on a live runner: the model works, crashes are no longer "in a row".
                health = self.health.get(model_id)
                if health is not None:
                    health.crashes_in_a_row = 0

    async def _acquire(self, model_id: str) -> LoadedModel:
        current = self.loaded.get(model_id)
        if current is not None:
            return current
        await self._wait_for_restart(model_id)
        async with self._lock:
            current = self.loaded.get(model_id)
            if current is not None:
                return current
            future = self._loading.get(model_id)
            if future is None:
                future = asyncio.get_running_loop().create_future()
                self._loading[model_id] = future
                task = asyncio.create_task(self._load(model_id, future))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(future)

    async def _wait_for_restart(self, model_id: str) -> None:
        health = self.health.get(model_id)
        if health is None:
            return
        if health.failed_reason is not None:
            raise ModelFailed(f"model {model_id!r} is failed: {health.failed_reason}. Unload it "
                              f"(`garrison stop {model_id}`) to try again",
                              details=health.as_dict())
        wait = health.restart_not_before - time.monotonic()
        if wait > MAX_RESTART_WAIT_S:
            err = EngineCrashed(f"the runner of {model_id!r} crashed ({health.last_crash}); it restarts in "
                                f"{wait:.0f} s", details=health.as_dict())
            err.retry_after_s = wait
            raise err
        if wait > 0:
            await asyncio.sleep(wait)

    async def _load(self, model_id: str, future: asyncio.Future[LoadedModel]) -> None:
        try:
            record = await asyncio.to_thread(self.resolve, model_id)
            size = record.size_bytes
            if size > self.settings.memory_budget_bytes:
                raise Unavailable(f"model {model_id!r} ({size >> 20} MiB) is larger than the model memory budget "
                                  f"({self.settings.memory_budget_bytes >> 20} MiB); raise model_memory_mb",
                                  code="model_over_budget")
            await self._make_room(size)
            await asyncio.to_thread(self.registry.verify, record)
            started = time.monotonic()
            spec, why = await asyncio.to_thread(SPECS[record.format], record, self.settings, self.verdicts)
            runner = RunnerProcess(spec, name=model_id, on_exit=self._runner_exited)
            hello = await runner.start()
            engine: Engine = RunnerGenerationEngine(runner) if hello.capability == "generate" \
                else RunnerEmbeddingEngine(runner)
            loaded = LoadedModel(record=record, engine=engine, runner=runner, capability=hello.capability,
                                 size_bytes=size, repack_reason=why)
            self.loaded[model_id] = loaded
            self.loads += 1
            log_event(log, "model.loaded", model=model_id, format=record.format, pid=runner.pid,
                      backend=hello.backend, variant=hello.variant, device=hello.device,
                      extra_bufts=hello.extra_bufts, extra_bufts_reason=why,
                      seconds=round(time.monotonic() - started, 2))
            future.set_result(loaded)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: every waiter re-raises it
        finally:
            self._loading.pop(model_id, None)

    def _runner_exited(self, runner: RunnerProcess, how: RunnerExit) -> None:
        """Called once per runner when its process is gone: supervision's single entry point."""
        current = self.loaded.get(runner.name)
        if current is not None and current.runner is runner:
            del self.loaded[runner.name]
        if how.expected:
            return
        health = self.health.setdefault(runner.name, ModelHealth())
        health.crashes_in_a_row += 1
        health.crashes_total += 1
        health.last_crash = f"{how.how}{' while loading' if how.during_load else ''} (pid {how.pid})"
        health.last_crash_at = time.time()
        backoff = min(MAX_BACKOFF_S, BASE_BACKOFF_S * 2 ** (health.crashes_in_a_row - 1))
        health.restart_not_before = time.monotonic() + backoff
        self.crashes[(runner.name, how.how)] = self.crashes.get((runner.name, how.how), 0) + 1
        if health.crashes_in_a_row >= self.settings.max_crashes:
            health.failed_reason = (f"its runner crashed {health.crashes_in_a_row} times in a row "
                                    f"(last: {health.last_crash})")
        log_event(log, "runner.crashed", level=logging.ERROR, model=runner.name, pid=how.pid, exit=how.how,
                  during_load=how.during_load, in_a_row=health.crashes_in_a_row,
                  failed=health.failed_reason is not None, restart_in_s=round(backoff, 2))

    def reconfigure(self, settings: ManagerSettings) -> None:
        """SIGHUP's new settings. The budget, keep-alive and crash limit are read where they are used, so they
        apply at once (and idle models beyond a smaller budget are unloaded now); threads, queue and CPU
        repack are part of a runner's spec, so they apply to models loaded from now on."""
        self.settings = settings
        task = asyncio.get_running_loop().create_task(self.fit_budget())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def fit_budget(self) -> None:
        """Unload idle models, least recently used first, until the loaded ones fit the budget; busy ones
        stay (the next load makes room once they are idle)."""
        while self._used_bytes() > self.settings.memory_budget_bytes:
            idle = sorted((m for m in self.loaded.values() if m.users == 0), key=lambda m: m.last_used)
            if not idle:
                return
            await self.unload(idle[0].name, reason="memory budget")

    def _used_bytes(self) -> int:
        return sum(m.size_bytes for m in self.loaded.values())

    async def _make_room(self, size: int) -> None:
        while self._used_bytes() + size > self.settings.memory_budget_bytes:
            idle = sorted((m for m in self.loaded.values() if m.users == 0), key=lambda m: m.last_used)
            if not idle:
                raise Unavailable("every loaded model is busy and the model memory budget is full; retry shortly",
                                  code="model_memory_full")
            await self.unload(idle[0].name, reason="memory budget")

    async def unload(self, model_id: str, *, reason: str) -> bool:
        """End the model's runner (its memory goes back to the OS) and forget its crash history."""
        self.health.pop(model_id, None)
        loaded = self.loaded.pop(model_id, None)
        if loaded is None:
            return False
        self.evictions += 1
        await loaded.runner.stop()
        log_event(log, "model.unloaded", model=model_id, reason=reason, pid=loaded.runner.pid)
        return True

    async def expire_idle(self) -> None:
        if self.settings.keep_alive_s <= 0:
            return
        now = time.monotonic()
        for model in list(self.loaded.values()):
            if model.users == 0 and now - model.last_used > self.settings.keep_alive_s:
                await self.unload(model.name, reason="keep-alive expired")

    async def refresh_stats(self) -> None:
        await asyncio.gather(*(m.runner.refresh_stats() for m in list(self.loaded.values())))

    async def run_keep_alive(self, stop: asyncio.Event) -> None:
        interval = max(1.0, min(60.0, self.settings.keep_alive_s / 4)) if self.settings.keep_alive_s else 60.0
        interval = min(interval, STATS_INTERVAL_S)
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
            await self.expire_idle()
            await self.refresh_stats()

    async def close(self) -> None:
        for name in list(self.loaded):
            await self.unload(name, reason="daemon stopping")

    def stats(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, model in self.loaded.items():
            engine_stats = model.engine.stats()
            out[name] = {"users": model.users, "size_bytes": model.size_bytes, "pid": model.runner.pid,
                         "idle_s": round(time.monotonic() - model.last_used, 1),
                         "engine": engine_stats.as_dict() if engine_stats is not None else {}}
        return out

    async def runners(self) -> list[dict[str, Any]]:
        """`garrison ps`: every loaded model's runner, and every model with a crash history."""
        await self.refresh_stats()
        rows: list[dict[str, Any]] = []
        keep = self.settings.keep_alive_s
        now = time.monotonic()
        for name, model in sorted(self.loaded.items()):
            hello = model.runner.hello
            assert hello is not None
            engine_stats = model.engine.stats()
            idle_until = None
            if keep > 0:
                idle_until = time.time() + max(0.0, keep - (now - model.last_used)) if model.users == 0 else None
            rows.append({
                "model": name, "state": "ready", "pid": model.runner.pid, "format": model.record.format,
                "backend": hello.backend, "variant": hello.variant, "device": hello.device,
                "extra_bufts": hello.extra_bufts, "extra_bufts_reason": model.repack_reason,
                "memory_bytes": model.runner.memory_bytes(), "size_bytes": model.size_bytes,
                "slots_busy": engine_stats.active_slots if engine_stats else model.runner.in_flight,
                "slots": hello.n_parallel, "in_flight": model.runner.in_flight, "users": model.users,
                "idle_until": idle_until, "loaded_for_s": round(now - model.loaded_at, 1),
                "steps": model.runner.steps_received, "ipc_us_per_step": model.runner.ipc_us_per_step(),
                **{k: v for k, v in self.health.get(name, ModelHealth()).as_dict().items() if k != "failed"}})
        for name, health in sorted(self.health.items()):
            if name in self.loaded:
                continue
            rows.append({"model": name, "state": "failed" if health.failed_reason else "restarting",
                         "pid": None, **health.as_dict()})
        return rows
