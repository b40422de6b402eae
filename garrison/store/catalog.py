"""The SQLite catalog: one file, WAL mode, every commit durable.

Several processes share it (the daemon, `garrison` CLI commands, job workers), so
writes use `BEGIN IMMEDIATE` with a generous busy timeout, and within one process a
lock funnels every write through one path. `synchronous=FULL` because an acknowledged
write must survive power loss (FACTS.md: NORMAL may lose the last commits).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from garrison.errors import CatalogError
from garrison.store.migrations import MIGRATIONS

BUSY_TIMEOUT_MS = 30_000


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
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            else:
                self.conn.execute("COMMIT")

    def query(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self.conn.execute(sql, params).fetchall())

    def query_one(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self.conn.execute(sql, params).fetchone()
            return row

    def integrity_check(self) -> str:
        row = self.query_one("PRAGMA integrity_check")
        return str(row[0]) if row else "no result"

    def close(self) -> None:
        with self._lock:
            self.conn.close()
