"""The catalog: WAL, durable commits, migrations forward, refusal of a newer schema."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from garrison.errors import CatalogError
from garrison.store.catalog import Catalog
from garrison.store.migrations import MIGRATIONS


def test_new_catalog_is_wal_full_sync_and_migrated(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog.db")
    assert catalog.query_one("PRAGMA journal_mode")[0] == "wal"
    assert catalog.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL, on the connection that writes
    assert catalog.schema_version == len(MIGRATIONS._migrations)
    assert catalog.integrity_check() == "ok"
    assert (tmp_path / "catalog.db").stat().st_mode & 0o077 == 0


def test_older_catalog_is_migrated_in_one_transaction(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    first = MIGRATIONS._migrations[0].name
    old = Catalog(path, migrate=False)
    MIGRATIONS.apply(old.db, stop_before=MIGRATIONS._migrations[1].name)
    assert [m.name for m in MIGRATIONS.applied(old.db)] == [first]
    old.close()
    catalog = Catalog(path)
    assert catalog.schema_version == len(MIGRATIONS._migrations)
    assert catalog.query_one("SELECT COUNT(*) FROM api_keys")[0] == 0


def test_failed_migration_leaves_the_old_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "catalog.db"
    old = Catalog(path, migrate=False)
    MIGRATIONS.apply(old.db, stop_before=MIGRATIONS._migrations[1].name)
    old.close()
    original = MIGRATIONS._migrations[-1]

    def broken(db: object) -> None:
        original.fn(db)  # type: ignore[arg-type]
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(MIGRATIONS, "_migrations",
                        [*MIGRATIONS._migrations[:-1], type(original)(original.name, broken, True)])
    with pytest.raises(RuntimeError):
        Catalog(path)
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    applied = [r[0] for r in conn.execute("SELECT name FROM _sqlite_migrations")]
    assert "api_keys" not in tables and "audit" not in tables
    assert len(applied) == 1


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    Catalog(path).close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO _sqlite_migrations (migration_set, name, applied_at) VALUES"
                 " ('garrison', 'm999_from_the_future', '2030-01-01')")
    conn.commit()
    conn.close()
    with pytest.raises(CatalogError) as err:
        Catalog(path)
    assert err.value.code == "catalog_schema_newer" and "m999_from_the_future" in err.value.message


def test_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "catalog.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CatalogError, match="not a usable SQLite catalog"):
        Catalog(path)


def test_write_rolls_back_on_error(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog.db")
    with pytest.raises(ValueError), catalog.write() as conn:
        conn.execute("INSERT INTO api_keys (id, hash, display_prefix, role, created_at)"
                     " VALUES ('k', 'h', 'p', 'read', 0)")
        raise ValueError("abort")
    assert catalog.query_one("SELECT COUNT(*) FROM api_keys")[0] == 0
