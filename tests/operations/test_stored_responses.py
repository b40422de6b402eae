"""Stored responses: sealed per response, owned by their key, shredded by retention (a real catalog and vault)."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest

from garrison.errors import IntegrityError, NotFound
from garrison.ingest.vault import Vault
from garrison.operations.stored_responses import ResponseStore, StoredResponse
from garrison.paths import StateLayout
from garrison.store.catalog import Catalog

KEY = secrets.token_bytes(32)


def _store(tmp_path: Path, days: list[float]) -> ResponseStore:
    layout = StateLayout(tmp_path)
    catalog = Catalog(layout.catalog)
    return ResponseStore(catalog, Vault(layout, catalog, lambda: KEY), lambda: days[0])


def _record(rid: str, created: float, key_id: str = "k1") -> StoredResponse:
    return StoredResponse(rid, key_id, "m", created, {"id": rid, "output": []},
                          [{"role": "user", "content": "Where is my parcel?"}], [])


def test_retention_shreds_old_responses_and_their_keys(tmp_path: Path) -> None:
    days = [30.0]
    store = _store(tmp_path, days)
    now = time.time()
    store.save(_record("resp_old", now - 31 * 86400))
    store.save(_record("resp_new", now - 86400))
    with pytest.raises(NotFound):
        store.load("resp_old", "k1")  # past retention: gone to readers before the sweep
    assert store.load("resp_new", "k1").messages[0]["content"] == "Where is my parcel?"
    with pytest.raises(NotFound):
        store.load("resp_new", "k2")  # another key's
    assert store.expire(now) == 1
    keys = [r[0] for r in store.catalog.query("SELECT id FROM wrapped_keys WHERE purpose = 'response'")]
    assert keys == ["resp_new"]
    days[0] = 0.5  # the live setting: a reload shortens retention for stored responses too
    assert store.expire(now) == 1
    assert store.catalog.query("SELECT id FROM responses") == []
    assert store.catalog.query("SELECT id FROM wrapped_keys WHERE purpose = 'response'") == []


def test_a_body_moved_under_another_id_does_not_open(tmp_path: Path) -> None:
    store = _store(tmp_path, [30.0])
    now = time.time()
    store.save(_record("resp_a", now))
    store.save(_record("resp_b", now))
    with store.catalog.write() as conn:
        conn.execute("UPDATE responses SET body = (SELECT body FROM responses WHERE id = 'resp_a') "
                     "WHERE id = 'resp_b'")
    with pytest.raises(IntegrityError):
        store.load("resp_b", "k1")


async def test_the_timer_sweeps_without_a_create(tmp_path: Path) -> None:
    """The daemon's timer shreds expired responses while nobody creates new ones, and stops when told."""
    import asyncio

    from garrison.operations.stored_responses import sweep_periodically

    store = _store(tmp_path, [30.0])
    store.save(_record("resp_old", time.time() - 31 * 86400))
    store.save(_record("resp_new", time.time()))
    stop = asyncio.Event()
    task = asyncio.create_task(sweep_periodically(lambda: store, stop, every_s=0.05))
    for _ in range(200):
        if len(store.catalog.query("SELECT id FROM responses")) == 1:
            break
        await asyncio.sleep(0.02)
    assert [r[0] for r in store.catalog.query("SELECT id FROM responses")] == ["resp_new"]
    stop.set()
    await asyncio.wait_for(task, timeout=5)
