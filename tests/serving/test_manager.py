"""The model manager: one load for concurrent first requests, LRU eviction under a budget, keep-alive."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from garrison.errors import InvalidRequest, NotFound
from garrison.models.registry import ModelRegistry
from garrison.paths import StateLayout
from garrison.serving.manager import ManagerSettings, ModelManager
from garrison.store.catalog import Catalog


@pytest.fixture
def registry(tmp_path: Path, tiny_llama_gguf: Path, tiny_llama_dir: Path) -> ModelRegistry:
    layout = StateLayout(tmp_path / "state")
    layout.ensure()
    reg = ModelRegistry(Catalog(layout.catalog), layout)
    for name in ("a", "b"):
        reg.import_path(tiny_llama_gguf, name, settings={"n_parallel": 2, "n_ctx_per_slot": 256})
    reg.import_path(tiny_llama_dir, "hf")
    return reg


def manager(registry: ModelRegistry, budget: int = 1 << 30, keep_alive: float = 0) -> ModelManager:
    return ModelManager(registry, ManagerSettings(memory_budget_bytes=budget, keep_alive_s=keep_alive,
                                                  max_queue=8, n_threads=2))


async def test_concurrent_first_requests_load_once(registry: ModelRegistry) -> None:
    m = manager(registry)

    async def use() -> int:
        async with m.use("a", "generate") as loaded:
            await asyncio.sleep(0.01)
            return id(loaded.engine)

    engines = await asyncio.gather(*(use() for _ in range(5)))
    assert len(set(engines)) == 1 and m.loads == 1
    await m.close()


async def test_least_recently_used_idle_model_is_evicted(registry: ModelRegistry) -> None:
    one_model = registry.get("a").size_bytes
    m = manager(registry, budget=one_model + one_model // 2)
    async with m.use("a", "generate"):
        pass
    async with m.use("b", "generate"):
        assert set(m.loaded) == {"b"}
    assert m.evictions == 1
    await m.close()


async def test_keep_alive_unloads_idle_models(registry: ModelRegistry) -> None:
    m = manager(registry, keep_alive=0.05)
    async with m.use("a", "generate"):
        await m.expire_idle()
        assert "a" in m.loaded  # in use: never unloaded
    await asyncio.sleep(0.1)
    await m.expire_idle()
    assert not m.loaded


async def test_unservable_and_unknown_models_are_refused(registry: ModelRegistry) -> None:
    m = manager(registry)
    with pytest.raises(InvalidRequest) as hf:
        async with m.use("hf", "generate"):
            pass
    assert hf.value.code == "model_not_servable"
    with pytest.raises(NotFound):
        async with m.use("nope", "generate"):
            pass
    with pytest.raises(InvalidRequest) as wrong:
        async with m.use("a", "embed"):
            pass
    assert wrong.value.code == "model_capability_mismatch"
    await m.close()
