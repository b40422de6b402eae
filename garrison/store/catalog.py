"""The SQLite catalog: one file, WAL mode, every commit durable.

Several processes share it (the daemon, `garrison` CLI commands, job workers), so
writes use `BEGIN IMMEDIATE` with a generous busy timeout, and within one process a
lock funnels every write through one connection. `synchronous=FULL` because an acknowledged
write must survive power loss (FACTS.md: NORMAL may lose the last commits).

Reads go through a small pool of other connections (`PRAGMA query_only`): in WAL mode a
reader never waits for a writer, in this process or another, so checking an API key does not
queue behind a long write (it would wait up to the busy timeout, 30 s, on one shared
connection). Each read is one statement in autocommit, finished before the connection goes
back to the pool, so it sees every transaction committed before it began: a read after a
write, on any connection, sees the write. A read made inside `write()` on the same thread
uses the writer's connection, so it sees the transaction's own uncommitted changes.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from garrison.errors import CatalogError
from garrison.store.migrations import MIGRATIONS

BUSY_TIMEOUT_MS = 30_000
#: Read connections open at most; a read beyond them waits for one (reads take milliseconds).
MAX_READERS = 8


class Catalog:
    """An open catalog; `write()` is the one way to change it."""

    def __init__(self, path: Path, *, migrate: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            conn = sqlite3.connect(str(self.path), check_same_thread=False,
                                   timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.Error as exc:
            raise CatalogError(f"cannot open catalog {self.path}: {exc}") from None
        self._lock = threading.RLock()
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise CatalogError(f"{self.path} is not a usable SQLite catalog: {exc}") from None
        if str(mode).lower() != "wal":
            conn.close()
            raise CatalogError(f"cannot put {self.path} in WAL mode (got {mode})")
        conn.row_factory = sqlite3.Row
        self.conn = conn
        self.db = Database(conn, execute_plugins=False)
        self._writing: int | None = None  # the thread inside write(), whose reads use its transaction
        self._idle_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._reader_slots = threading.BoundedSemaphore(MAX_READERS)
        self._closed = False
        with contextlib.suppress(OSError):
            self.path.chmod(0o600)
        if migrate:
            self.migrate()

    # -- schema ---------------------------------------------------------------
    def schema_status(self) -> tuple[list[str], list[str]]:
        """(applied names unknown to this Garrison, pending names)."""
        known = {m.name for m in MIGRATIONS._migrations}
        applied = [m.name for m in MIGRATIONS.applied(self.db)]
        unknown = [name for name in applied if name not in known]
        pending = [m.name for m in MIGRATIONS.pending(self.db)]
        return unknown, pending

    def migrate(self) -> list[str]:
        """Refuse a catalog from a newer Garrison; bring an older one up to date."""
        with self._lock:
            unknown, pending = self.schema_status()
            if unknown:
                raise CatalogError(
                    f"catalog {self.path} has a newer schema than this Garrison understands "
                    f"(unknown migrations: {', '.join(unknown)}); upgrade Garrison",
                    code="catalog_schema_newer")
            if pending:
                # One transaction for the whole upgrade, holding the write lock so two
                # processes starting at once do not race; each migration nests in it as
                # a savepoint (sqlite-utils' atomic()).
                with self.write():
                    unknown, pending = self.schema_status()
                    MIGRATIONS.apply(self.db)
            return pending

    @property
    def schema_version(self) -> int:
        return len(MIGRATIONS.applied(self.db))

    # -- access ---------------------------------------------------------------
    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A durable transaction; commits on success, rolls back on any exception."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            with self._begun() as conn:
                yield conn

    @contextlib.contextmanager
    def _begun(self) -> Iterator[sqlite3.Connection]:
        """The body of a transaction already begun under the lock: commit, or roll back on any exception."""
        outer, self._writing = self._writing, threading.get_ident()
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")
        finally:
            self._writing = outer

    def try_write(self, change: Callable[[sqlite3.Connection], object]) -> bool:
        """Run `change` in a durable transaction if the catalog is free now; False (nothing done) when another
        thread or process is writing. For bookkeeping that may wait for the next chance (a key's last use),
        on paths that must never queue behind a write (authentication)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self.conn.execute("PRAGMA busy_timeout=0")
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
                return False
            finally:
                self.conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            with self._begun() as conn:
                change(conn)
            return True
        finally:
            self._lock.release()

    def _open_reader(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA query_only=ON")
        except sqlite3.Error as exc:
            raise CatalogError(f"cannot open catalog {self.path} for reading: {exc}") from None
        conn.row_factory = sqlite3.Row
        return conn

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        if self._writing == threading.get_ident():
            yield self.conn  # inside this thread's write(): see its own changes
            return
        with self._reader_slots:
            with self._readers_lock:
                if self._closed:
                    raise CatalogError(f"catalog {self.path} is closed")
                conn = self._idle_readers.pop() if self._idle_readers else None
            if conn is None:
                conn = self._open_reader()
            try:
                yield conn
            finally:
                with self._readers_lock:
                    if self._closed:
                        conn.close()
                    else:
                        self._idle_readers.append(conn)

    def query(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        with self._reader() as conn:
            return list(conn.execute(sql, params).fetchall())

    def query_one(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> sqlite3.Row | None:
        with self._reader() as conn:
            cursor = conn.execute(sql, params)
            try:
                row: sqlite3.Row | None = cursor.fetchone()
            finally:
                cursor.close()  # ends the statement, and with it the read transaction (a stale snapshot otherwise)
            return row

    def integrity_check(self) -> str:
        row = self.query_one("PRAGMA integrity_check")
        return str(row[0]) if row else "no result"

    def close(self) -> None:
        """Close the writer and every read connection (one still in use closes when its read ends)."""
        with self._readers_lock:
            self._closed = True
            idle, self._idle_readers = self._idle_readers, []
        for conn in idle:
            conn.close()
        with self._lock:
            self.conn.close()
