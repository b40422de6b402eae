"""Datasets, their versions and OpenAI files in the catalog (tables of migration m005_datasets).

A dataset is a name; what it holds are versions, each one ingestion (one delivered file) stored
in the vault under its own data key. Versions are numbered 1, 2, 3... per dataset and never
renumbered: a deleted or expired version stays as a tombstone row whose wrapped key is gone
(crypto-shredded), so a model's lineage can still say which data it came from. A reference is
`NAME` (the newest ready version) or `NAME:N`.

Only metadata lives here: counts, sizes, the ingestion report (counts and line numbers, never
record text), and the wrapped key. Reading and writing records is garrison.ingest.vault's job.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from garrison.errors import InvalidRequest, NotFound
from garrison.store.catalog import Catalog

__all__ = [
    "DatasetStore",
    "FileRecord",
    "VersionRecord",
    "new_file_id",
    "new_version_id",
    "parse_reference",
    "validate_name",
]

# Same alphabet as key grants (garrison.policies.keys) minus ':', which separates NAME:VERSION.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_COLUMNS = (
    "v.id, v.dataset_id, d.name AS dataset, v.version, v.state, v.format, v.wrapped_key IS NOT NULL AS has_key,"
    " v.record_count, v.chunk_count, v.plaintext_bytes, v.stored_bytes, v.source, v.source_name,"
    " v.source_sha256, v.report, v.created_at, v.created_by, v.expires_at, v.deleted_at")
_FROM = " FROM dataset_versions v JOIN datasets d ON d.id = v.dataset_id"


def validate_name(name: Any, param: str = "dataset") -> str:
    """A dataset name, or InvalidRequest naming the rule (names appear in paths and grants)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequest(f"invalid dataset name {str(name)[:80]!r}: use 1-128 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit", code="invalid_dataset_name", param=param)
    return name


def parse_reference(ref: str) -> tuple[str, int | None]:
    """`NAME` -> (NAME, None: newest ready version); `NAME:N` -> (NAME, N)."""
    name, sep, number = ref.partition(":")
    validate_name(name)
    if not sep:
        return name, None
    if not (number.isascii() and number.isdigit()) or int(number) < 1:
        raise InvalidRequest(f"invalid dataset version {number[:20]!r} in {ref[:150]!r}: expected NAME:N with N >= 1",
                             code="invalid_dataset_name", param="dataset")
    return name, int(number)


def resolve_reference(catalog: Catalog, ref: str, param: str = "dataset") -> tuple[str, int | None]:
    """A dataset reference (`NAME`, `NAME:N`) or an uploaded file id (`file-...`) -> (NAME, version or None).

    Resolving touches only metadata, so grants can be checked before any data key is unwrapped."""
    if not isinstance(ref, str) or not ref:
        raise InvalidRequest(f"'{param}' must name a dataset (NAME, NAME:N) or a file id", param=param)
    if ref.startswith("file-"):
        record = DatasetStore(catalog).file(ref)
        if record.dataset is None or record.version is None:
            raise InvalidRequest(f"file {ref[:80]} holds no dataset version", param=param, code="file_not_usable")
        return record.dataset, record.version
    try:
        return parse_reference(ref)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, code=exc.code, param=param) from None


def new_version_id() -> str:
    return "dsv_" + secrets.token_hex(12)


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


@dataclass(frozen=True)
class VersionRecord:
    """One dataset version's catalog row (without its wrapped key)."""

    id: str
    dataset_id: str
    dataset: str
    version: int
    state: str
    format: str
    has_key: bool
    record_count: int
    chunk_count: int
    plaintext_bytes: int
    stored_bytes: int
    source: str
    source_name: str
    source_sha256: str
    report: dict[str, Any]
    created_at: float
    created_by: str | None
    expires_at: float | None
    deleted_at: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> VersionRecord:
        return cls(id=row["id"], dataset_id=row["dataset_id"], dataset=row["dataset"], version=int(row["version"]),
                   state=row["state"], format=row["format"], has_key=bool(row["has_key"]),
                   record_count=int(row["record_count"]), chunk_count=int(row["chunk_count"]),
                   plaintext_bytes=int(row["plaintext_bytes"]), stored_bytes=int(row["stored_bytes"]),
                   source=row["source"], source_name=row["source_name"], source_sha256=row["source_sha256"],
                   report=json.loads(row["report"] or "{}"), created_at=float(row["created_at"]),
                   created_by=row["created_by"], expires_at=row["expires_at"], deleted_at=row["deleted_at"])

    @property
    def reference(self) -> str:
        return f"{self.dataset}:{self.version}"

    def to_json(self, *, report: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "object": "garrison.dataset_version", "dataset": self.dataset, "version": self.version,
            "reference": self.reference, "state": self.state, "format": self.format,
            "records": self.record_count, "chunks": self.chunk_count, "plaintext_bytes": self.plaintext_bytes,
            "stored_bytes": self.stored_bytes, "source": self.source, "source_name": self.source_name,
            "source_sha256": self.source_sha256, "created_at": int(self.created_at), "created_by": self.created_by,
            "expires_at": int(self.expires_at) if self.expires_at else None,
            "deleted_at": int(self.deleted_at) if self.deleted_at else None,
        }
        if report:
            out["report"] = self.report
        return out


@dataclass(frozen=True)
class FileRecord:
    """An OpenAI file (/v1/files): an upload that became dataset version `dataset:version`."""

    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: float
    created_by: str | None
    version_id: str | None
    status: str
    dataset: str | None
    version: int | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> FileRecord:
        return cls(id=row["id"], filename=row["filename"], purpose=row["purpose"], bytes=int(row["bytes"]),
                   created_at=float(row["created_at"]), created_by=row["created_by"], version_id=row["version_id"],
                   status=row["status"], dataset=row["dataset"], version=row["version"])

    def to_openai(self) -> dict[str, Any]:
        """OpenAI's FileObject, plus where the data went (extra fields the client keeps)."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": int(self.created_at),
                "filename": self.filename, "purpose": self.purpose, "status": self.status,
                "status_details": None, "dataset": self.dataset, "version": self.version}


class DatasetStore:
    """Reads and writes of the dataset tables; writes take the caller's transaction connection
    so a version row, its files row and the audit entry commit together with the vault rename."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    # -- reading ------------------------------------------------------------------------------
    def list_datasets(self, grants: frozenset[str] | None = None) -> list[dict[str, Any]]:
        """Datasets with at least one ready version (or none yet deleted), newest version first."""
        rows = self.catalog.query(
            "SELECT d.id, d.name, d.created_at, d.created_by,"
            " SUM(v.state = 'ready') AS versions, MAX(CASE WHEN v.state = 'ready' THEN v.version END) AS latest,"
            " SUM(CASE WHEN v.state = 'ready' THEN v.record_count ELSE 0 END) AS records,"
            " SUM(CASE WHEN v.state = 'ready' THEN v.stored_bytes ELSE 0 END) AS stored_bytes"
            " FROM datasets d LEFT JOIN dataset_versions v ON v.dataset_id = d.id"
            " WHERE d.deleted_at IS NULL GROUP BY d.id ORDER BY d.name")
        return [{"id": r["id"], "object": "garrison.dataset", "name": r["name"], "created_at": int(r["created_at"]),
                 "created_by": r["created_by"], "versions": int(r["versions"] or 0), "latest_version": r["latest"],
                 "records": int(r["records"] or 0), "stored_bytes": int(r["stored_bytes"] or 0)}
                for r in rows if grants is None or r["name"] in grants]

    def dataset(self, name: str) -> dict[str, Any]:
        """One dataset with every version (tombstones included, so deletions stay visible)."""
        validate_name(name)
        found = [d for d in self.list_datasets() if d["name"] == name]
        if not found:
            raise NotFound(f"no dataset named {name!r}", code="dataset_not_found", param="dataset")
        versions = self.versions(name, include_gone=True)
        return {**found[0], "data": [v.to_json(report=False) for v in versions]}

    def versions(self, name: str, *, include_gone: bool = False) -> list[VersionRecord]:
        sql = f"SELECT {_VERSION_COLUMNS}{_FROM} WHERE d.name = ?"
        if not include_gone:
            sql += " AND v.state = 'ready'"
        return [VersionRecord.from_row(r) for r in self.catalog.query(sql + " ORDER BY v.version", (name,))]

    def version(self, name: str, number: int | None = None, *, ready: bool = True) -> VersionRecord:
        """`name:number`, or the newest ready version; NotFound with a code that says which part is missing."""
        validate_name(name)
        if number is None:
            row = self.catalog.query_one(f"SELECT {_VERSION_COLUMNS}{_FROM} WHERE d.name = ? AND v.state = 'ready'"
                                         " ORDER BY v.version DESC LIMIT 1", (name,))
        else:
            row = self.catalog.query_one(f"SELECT {_VERSION_COLUMNS}{_FROM} WHERE d.name = ? AND v.version = ?",
                                         (name, number))
        if row is None:
            what = f"{name}:{number}" if number is not None else f"{name} (no ready version)"
            raise NotFound(f"no dataset version {what}", code="dataset_not_found", param="dataset")
        record = VersionRecord.from_row(row)
        if ready and record.state != "ready":
            raise NotFound(f"dataset version {record.reference} was {record.state}: its key is destroyed and its "
                           "data cannot be read", code="dataset_version_gone", param="dataset")
        return record

    def version_by_id(self, version_id: str) -> VersionRecord | None:
        row = self.catalog.query_one(f"SELECT {_VERSION_COLUMNS}{_FROM} WHERE v.id = ?", (version_id,))
        return VersionRecord.from_row(row) if row is not None else None

    def wrapped_key(self, version_id: str) -> bytes | None:
        row = self.catalog.query_one("SELECT wrapped_key FROM dataset_versions WHERE id = ?", (version_id,))
        return bytes(row[0]) if row is not None and row[0] is not None else None

    def states(self) -> dict[str, str]:
        """version id -> state, for the vault's reaper."""
        return {r[0]: r[1] for r in self.catalog.query("SELECT id, state FROM dataset_versions")}

    def expired(self, now: float) -> list[VersionRecord]:
        return [VersionRecord.from_row(r) for r in self.catalog.query(
            f"SELECT {_VERSION_COLUMNS}{_FROM} WHERE v.state = 'ready' AND v.expires_at IS NOT NULL"
            " AND v.expires_at <= ? ORDER BY v.expires_at", (now,))]

    # -- writing (inside the caller's transaction) --------------------------------------------
    @staticmethod
    def find_duplicate(conn: sqlite3.Connection, name: str, source_sha256: str) -> str | None:
        """The ready version of `name` already made from these exact delivered bytes, if any."""
        if not source_sha256:
            return None
        row = conn.execute("SELECT v.id FROM dataset_versions v JOIN datasets d ON d.id = v.dataset_id"
                           " WHERE d.name = ? AND v.source_sha256 = ? AND v.state = 'ready'",
                           (name, source_sha256)).fetchone()
        return str(row[0]) if row is not None else None

    @staticmethod
    def insert_version(conn: sqlite3.Connection, *, version_id: str, name: str, format: str, wrapped_key: bytes,
                       record_count: int, chunk_count: int, plaintext_bytes: int, stored_bytes: int, source: str,
                       source_name: str, source_sha256: str, report: dict[str, Any], created_by: str | None,
                       retention_days: float | None) -> int:
        """Create the dataset if needed (or revive a deleted one) and add the next version; returns its number."""
        now = time.time()
        conn.execute("INSERT OR IGNORE INTO datasets (id, name, created_at, created_by) VALUES (?, ?, ?, ?)",
                     ("ds_" + secrets.token_hex(12), name, now, created_by))
        conn.execute("UPDATE datasets SET deleted_at = NULL WHERE name = ?", (name,))
        dataset_id = conn.execute("SELECT id FROM datasets WHERE name = ?", (name,)).fetchone()[0]
        number = int(conn.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM dataset_versions WHERE dataset_id = ?",
                                  (dataset_id,)).fetchone()[0])
        expires = now + retention_days * 86400 if retention_days else None
        report = {**report, "version": number}
        conn.execute(
            "INSERT INTO dataset_versions (id, dataset_id, version, state, format, wrapped_key, record_count,"
            " chunk_count, plaintext_bytes, stored_bytes, source, source_name, source_sha256, report, created_at,"
            " created_by, expires_at) VALUES (?, ?, ?, 'ready', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (version_id, dataset_id, number, format, wrapped_key, record_count, chunk_count, plaintext_bytes,
             stored_bytes, source, source_name, source_sha256, json.dumps(report, sort_keys=True), now, created_by,
             expires))
        return number

    @staticmethod
    def destroy_key(conn: sqlite3.Connection, version_id: str, state: str) -> None:
        """Crypto-shred: the wrapped key is overwritten with NULL; the row stays as a tombstone."""
        conn.execute("UPDATE dataset_versions SET wrapped_key = NULL, state = ?, deleted_at = ? WHERE id = ?",
                     (state, time.time(), version_id))
        conn.execute("UPDATE files SET status = 'deleted', deleted_at = ? WHERE version_id = ? AND status != 'deleted'",
                     (time.time(), version_id))

    @staticmethod
    def mark_dataset_deleted(conn: sqlite3.Connection, name: str) -> None:
        conn.execute("UPDATE datasets SET deleted_at = ? WHERE name = ?", (time.time(), name))

    # -- files (/v1/files) ---------------------------------------------------------------------
    @staticmethod
    def insert_file(conn: sqlite3.Connection, *, file_id: str, filename: str, purpose: str, size: int,
                    version_id: str, created_by: str | None) -> None:
        conn.execute("INSERT INTO files (id, filename, purpose, bytes, created_at, created_by, version_id, status)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?, 'processed')",
                     (file_id, filename, purpose, size, time.time(), created_by, version_id))

    _FILE_SQL = ("SELECT f.*, d.name AS dataset, v.version AS version FROM files f"
                 " LEFT JOIN dataset_versions v ON v.id = f.version_id LEFT JOIN datasets d ON d.id = v.dataset_id")

    def files(self, grants: frozenset[str] | None = None, purpose: str | None = None) -> list[FileRecord]:
        sql = self._FILE_SQL + " WHERE f.status = 'processed'"
        params: tuple[Any, ...] = ()
        if purpose:
            sql += " AND f.purpose = ?"
            params = (purpose,)
        found = [FileRecord.from_row(r) for r in self.catalog.query(sql + " ORDER BY f.created_at DESC", params)]
        return [f for f in found if grants is None or f.dataset in grants]

    def file(self, file_id: str) -> FileRecord:
        row = self.catalog.query_one(self._FILE_SQL + " WHERE f.id = ? AND f.status = 'processed'", (file_id,))
        if row is None:
            raise NotFound(f"no file {file_id[:80]!r}", code="file_not_found", param="file_id")
        return FileRecord.from_row(row)
