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
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from garrison.errors import InvalidRequest, Unavailable
from garrison.logs import log_event
from garrison.models.names import check_model_id
from garrison.models.registry import ModelRecord, ModelRegistry

log = logging.getLogger("garrison.serving")


class Engine(Protocol):
    def close(self) -> None: ...


@dataclass(frozen=True)
class ManagerSettings:
    memory_budget_bytes: int
    keep_alive_s: float
    max_queue: int
    n_threads: int | None


@dataclass(frozen=True)
class Handle:
    """What one request holds: the engine, and the adapter to attach for it (LoRA models)."""

    name: str
    engine: Any
    lora_path: Path | None = None


@dataclass
class LoadedModel:
    record: ModelRecord
    engine: Any
    capability: str  # "generate" or "embed"
    size_bytes: int
    loaded_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    users: int = 0

    @property
    def name(self) -> str:
        return self.record.name


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


def _load_gguf(record: ModelRecord, settings: ManagerSettings) -> tuple[Any, str]:
    from garrison.engine.llama_engine import LlamaEngine

    s = record.settings
    engine = LlamaEngine(record.entry_path, n_ctx_per_slot=int(s["n_ctx_per_slot"]), n_parallel=int(s["n_parallel"]),
                         n_batch=max(512, int(s["n_parallel"])), n_threads=settings.n_threads,
                         n_gpu_layers=int(s["n_gpu_layers"]),
                         max_queue=settings.max_queue if s.get("max_queue") is None else int(s["max_queue"]))
    return engine, "generate"


def _load_onnx(record: ModelRecord, settings: ManagerSettings) -> tuple[Any, str]:
    capability = _onnx_capability(record)
    if capability == "generate":
        from garrison.engine.onnx_engine import OnnxDecoderEngine

        queue = settings.max_queue if record.settings.get("max_queue") is None else int(record.settings["max_queue"])
        return OnnxDecoderEngine(record.folder, model_file=record.entry, intra_op_threads=settings.n_threads,
                                 max_concurrency=int(record.settings["n_parallel"]), max_queue=queue), capability
    from garrison.engine.onnx_engine import OnnxEmbeddingEngine

    return OnnxEmbeddingEngine(record.folder, model_file=record.entry, intra_op_threads=settings.n_threads), capability


# How each servable format becomes an engine.
LOADERS: dict[str, Callable[[ModelRecord, ManagerSettings], tuple[Any, str]]] = {
    "gguf": _load_gguf,
    "onnx": _load_onnx,
}


def default_budget_bytes(configured_mb: float) -> int:
    if configured_mb > 0:
        return int(configured_mb * 1024 * 1024)
    return int(psutil.virtual_memory().total // 2)


class ModelManager:
    def __init__(self, registry: ModelRegistry, settings: ManagerSettings) -> None:
        self.registry = registry
        self.settings = settings
        self.loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Future[LoadedModel]] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._verified_adapters: set[tuple[str, float]] = set()
        self.loads = 0
        self.evictions = 0

    def resolve(self, model_id: str) -> ModelRecord:
        check_model_id(model_id)
        record = self.registry.get(model_id)
        if not record.servable:
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
        try:
            yield Handle(name=record.name, engine=loaded.engine, lora_path=lora)
        finally:
            loaded.users -= 1
            loaded.last_used = time.monotonic()

    async def _acquire(self, model_id: str) -> LoadedModel:
        current = self.loaded.get(model_id)
        if current is not None:
            return current
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
            engine, capability = await asyncio.to_thread(LOADERS[record.format], record, self.settings)
            loaded = LoadedModel(record=record, engine=engine, capability=capability, size_bytes=size)
            self.loaded[model_id] = loaded
            self.loads += 1
            log_event(log, "model.loaded", model=model_id, format=record.format,
                      seconds=round(time.monotonic() - started, 2))
            future.set_result(loaded)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: every waiter re-raises it
        finally:
            self._loading.pop(model_id, None)

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
        loaded = self.loaded.pop(model_id, None)
        if loaded is None:
            return False
        self.evictions += 1
        await asyncio.to_thread(loaded.engine.close)
        log_event(log, "model.unloaded", model=model_id, reason=reason)
        return True

    async def expire_idle(self) -> None:
        if self.settings.keep_alive_s <= 0:
            return
        now = time.monotonic()
        for model in list(self.loaded.values()):
            if model.users == 0 and now - model.last_used > self.settings.keep_alive_s:
                await self.unload(model.name, reason="keep-alive expired")

    async def run_keep_alive(self, stop: asyncio.Event) -> None:
        interval = max(1.0, min(60.0, self.settings.keep_alive_s / 4)) if self.settings.keep_alive_s else 60.0
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
            await self.expire_idle()

    async def close(self) -> None:
        for name in list(self.loaded):
            await self.unload(name, reason="daemon stopping")

    def stats(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, model in self.loaded.items():
            engine_stats = model.engine.stats() if hasattr(model.engine, "stats") else None
            out[name] = {"users": model.users, "size_bytes": model.size_bytes,
                         "idle_s": round(time.monotonic() - model.last_used, 1),
                         "engine": engine_stats.as_dict() if engine_stats is not None else {}}
        return out

