"""One writer, many readers: reads never queue behind a write, in this process or another, and a read
after a commit sees it on whichever connection it runs."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from garrison.errors import CatalogError
from garrison.store.catalog import Catalog

HOLD_S = 5.0
_INSERT = ("INSERT INTO api_keys (id, hash, display_prefix, role, created_at) VALUES (?, ?, 'p', 'read', 0)")

# Another process takes the write lock, inserts a row and holds the transaction open for a while.
_HOLDER = f"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute({_INSERT!r}, ("held", "h-held"))
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def _hold_write_lock(path: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def _keys(catalog: Catalog) -> set[str]:
    return {row["id"] for row in catalog.query("SELECT id FROM api_keys")}


def test_reads_answer_at_once_while_another_process_holds_the_write_lock(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog.db")
    holder = _hold_write_lock(catalog.path, HOLD_S)
    # A write of this process now waits for the other one, holding this process's writer lock meanwhile.
    def local_write() -> None:
        with catalog.write() as conn:
            conn.execute(_INSERT, ("local", "h-local"))

    writer = threading.Thread(target=local_write)
    writer.start()
    try:
        time.sleep(0.3)
        assert writer.is_alive(), "the local write did not wait for the other process: the test proves nothing"
        started = time.monotonic()
        assert _keys(catalog) == set()  # the other process's transaction is not committed yet
        assert catalog.query_one("SELECT COUNT(*) FROM api_keys")[0] == 0
        assert catalog.integrity_check() == "ok"
        took = time.monotonic() - started
        print(f"three reads under another process's write lock: {took * 1000:.1f} ms")
        assert took < 1.0, f"reads waited {took:.2f}s behind a write lock held {HOLD_S}s"
        assert holder.poll() is None, "the lock was released before the reads finished: the test proves nothing"
        # A write of bookkeeping gives up at once rather than wait.
        started = time.monotonic()
        assert catalog.try_write(lambda conn: conn.execute(_INSERT, ("skipped", "h-skipped"))) is False
        assert time.monotonic() - started < 1.0
    finally:
        assert holder.wait(timeout=30) == 0
        writer.join(timeout=30)
    assert _keys(catalog) == {"held", "local"}  # both committed: the next read sees them
    assert catalog.try_write(lambda conn: conn.execute(_INSERT, ("late", "h-late"))) is True
    assert _keys(catalog) == {"held", "local", "late"}
    catalog.close()


def test_read_your_writes_across_connections(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog.db")
    seen_elsewhere: list[set[str]] = []
    for n in range(20):  # reads go back to a pool of connections: none may keep an old snapshot
        with catalog.write() as conn:
            conn.execute(_INSERT, (f"k{n}", f"h{n}"))
            # Inside the transaction, this thread reads its own uncommitted row (the writer's connection) ...
            assert f"k{n}" in _keys(catalog)
            # ... and another thread reads the committed state without waiting for the transaction.
            other = threading.Thread(target=lambda: seen_elsewhere.append(_keys(catalog)))
            other.start()
            other.join(timeout=5)
            assert not other.is_alive(), "a read on another thread waited for this thread's write"
            assert f"k{n}" not in seen_elsewhere[-1]
        assert f"k{n}" in _keys(catalog)
        assert catalog.query_one("SELECT id FROM api_keys WHERE id = ?", (f"k{n}",)) is not None
    assert len(_keys(catalog)) == 20


def _open_files(path: Path) -> int:
    """Descriptors this process holds on the catalog's file (each connection holds one)."""
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            count += fd.readlink() == path
        except OSError:
            continue
    return count


def test_close_closes_every_connection(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog.db")
    gate = threading.Barrier(4)

    def read() -> None:
        gate.wait()  # four reads at once: four read connections
        catalog.query("SELECT 1")

    readers = [threading.Thread(target=read) for _ in range(4)]
    for thread in readers:
        thread.start()
    for thread in readers:
        thread.join()
    assert _open_files(catalog.path.resolve()) >= 2  # the writer and at least one reader
    catalog.close()
    assert _open_files(catalog.path.resolve()) == 0
    with pytest.raises(CatalogError):
        catalog.query("SELECT 1")


def test_authentication_answers_while_another_process_holds_the_write_lock(daemon: Any) -> None:
    key = daemon.key()  # not used yet: its first use would record it (a write), which must not wait either
    holder = _hold_write_lock(daemon.state_dir / "catalog.db", HOLD_S)
    try:
        started = time.monotonic()
        status, body = daemon.request("GET", "/v1/models", key=key, timeout=HOLD_S * 2)
        took = time.monotonic() - started
        print(f"GET /v1/models under another process's write lock: {took * 1000:.1f} ms")
        assert status == 200 and body["object"] == "list"
        assert took < 1.0, f"authentication waited {took:.2f}s behind a write lock held {HOLD_S}s"
        assert holder.poll() is None, "the lock was released before the request finished: the test proves nothing"
    finally:
        assert holder.wait(timeout=30) == 0
