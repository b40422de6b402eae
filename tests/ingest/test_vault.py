"""The vault: chunked AES-256-GCM bound to dataset, version, index and finality; wrapped data keys;
rotation rewraps keys only; deletion destroys keys (crypto-shredding); staging reaped after crashes."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from garrison.config import load_config
from garrison.errors import IntegrityError, NotFound
from garrison.ingest.datasets import DatasetStore, VersionRecord
from garrison.ingest.vault import DATA_FILE, MAGIC, STAGING_PREFIX, Vault, VaultWriter
from garrison.paths import StateLayout
from garrison.store.catalog import Catalog
from garrison.store.master_key import master_key_path, write_key_file

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def layout(tmp_path: Path) -> StateLayout:
    layout = StateLayout(tmp_path / "state")
    layout.ensure()
    return layout


@pytest.fixture
def vault(layout: StateLayout) -> Vault:
    # KEY_A is this install's master key, so the audit entries (MACed under a key derived from the
    # master key the catalog records) are signed with it too.
    write_key_file(master_key_path(load_config()), KEY_A, replace=False)
    return Vault(layout, Catalog(layout.catalog), lambda: KEY_A, chunk_size=256)


def put(vault: Vault, name: str, records: list[dict[str, Any]], *, retention_days: float | None = None,
        sha: str = "") -> VersionRecord:
    """Write and publish a version the way the pipeline does."""
    with vault.writer(name) as writer:
        for record in records:
            writer.write_record(record)
        writer.finish()
        def insert(conn: sqlite3.Connection) -> None:
            DatasetStore.insert_version(
                conn, version_id=writer.version_id, name=name, format="text", wrapped_key=vault.wrap(conn, writer),
                record_count=writer.records, chunk_count=writer.chunks, plaintext_bytes=writer.plaintext_bytes,
                stored_bytes=writer.stored_bytes, source="cli", source_name="", source_sha256=sha, report={},
                created_by="test", retention_days=retention_days)

        writer.publish(vault.catalog, insert)
    found = vault.store.version_by_id(writer.version_id)
    assert found is not None
    return found


def records(n: int, marker: str = "plain") -> list[dict[str, Any]]:
    return [{"text": f"{marker} record {i} " + "x" * (i % 50)} for i in range(n)]


def chunks_of(path: Path) -> tuple[bytes, list[bytes]]:
    """Split a vault file into (magic, framed chunks) to damage it the way an attacker would."""
    data = path.read_bytes()
    pos, out = len(MAGIC), []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        end = pos + 4 + 12 + length
        out.append(data[pos:end])
        pos = end
    return data[:len(MAGIC)], out


def code(vault: Vault, name: str, version: int | None = None) -> str:
    with pytest.raises(IntegrityError) as info:
        list(vault.open(name, version).records())
    with pytest.raises(IntegrityError) as again:
        vault.open(name, version).verify()
    assert again.value.code == info.value.code
    return info.value.code


def test_round_trip_streams_many_chunks_and_keeps_no_plaintext(vault: Vault, layout: StateLayout) -> None:
    data = records(300, marker="PLAINTEXT-MARKER")
    version = put(vault, "notes", data)
    assert version.chunk_count > 20 and version.record_count == 300 and version.version == 1
    reader = vault.open("notes")
    assert list(reader.records()) == data
    assert reader.verify() == version.plaintext_bytes
    blob = (layout.vault / version.id / DATA_FILE).read_bytes()
    assert b"PLAINTEXT-MARKER" not in blob
    assert oct((layout.vault / version.id / DATA_FILE).stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in (layout.vault / version.id).iterdir()) == [DATA_FILE]
    assert put(vault, "notes", data[:5]).version == 2


def test_exact_chunk_multiple_still_has_a_final_chunk(vault: Vault) -> None:
    # 256 bytes per chunk; 8 records of exactly 64 bytes fill 2 chunks: the last is still marked final.
    data = [{"text": "y" * (64 - len('{"text":""}\n'))} for _ in range(8)]
    version = put(vault, "exact", data)
    assert version.plaintext_bytes == 512 and version.chunk_count == 2
    assert list(vault.open("exact").records()) == data


def _rewrite(path: Path, magic: bytes, chunks: list[bytes], tail: bytes = b"") -> None:
    path.write_bytes(magic + b"".join(chunks) + tail)


def test_swapped_chunks_are_refused(vault: Vault, layout: StateLayout) -> None:
    version = put(vault, "swap", records(40))
    path = layout.vault / version.id / DATA_FILE
    magic, chunks = chunks_of(path)
    chunks[1], chunks[2] = chunks[2], chunks[1]
    _rewrite(path, magic, chunks)
    assert code(vault, "swap") == "vault_chunk_reordered"


def test_last_chunk_truncated_or_removed_is_refused(vault: Vault, layout: StateLayout) -> None:
    version = put(vault, "cut", records(40))
    path = layout.vault / version.id / DATA_FILE
    original = path.read_bytes()
    magic, chunks = chunks_of(path)
    path.write_bytes(original[:-5])  # cut inside the last chunk
    assert code(vault, "cut") == "vault_truncated"
    _rewrite(path, magic, chunks[:-1])  # the whole last chunk gone: a clean chunk boundary
    assert code(vault, "cut") == "vault_truncated"


def test_other_damage_has_its_own_code(vault: Vault, layout: StateLayout) -> None:
    a = put(vault, "a", records(30))
    b = put(vault, "b", records(30))
    path = layout.vault / a.id / DATA_FILE
    original = path.read_bytes()
    magic, chunks = chunks_of(path)

    flipped = bytearray(original)
    flipped[len(MAGIC) + 4 + 12 + 3] ^= 1
    path.write_bytes(bytes(flipped))
    assert code(vault, "a") == "vault_chunk_corrupt"

    _, other = chunks_of(layout.vault / b.id / DATA_FILE)
    _rewrite(path, magic, [other[0], *chunks[1:]])  # a chunk from another version
    assert code(vault, "a") == "vault_chunk_corrupt"

    _rewrite(path, magic, chunks, tail=b"more")
    assert code(vault, "a") == "vault_trailing_data"

    _rewrite(path, b"X" * len(magic), chunks)
    assert code(vault, "a") == "vault_header_invalid"

    path.write_bytes(original)
    with vault.catalog.write() as conn:  # the catalog claims one chunk fewer: the last one read is not final
        conn.execute("UPDATE dataset_versions SET chunk_count = chunk_count - 1 WHERE id = ?", (a.id,))
    assert code(vault, "a") == "vault_chunk_count_mismatch"


def test_wrapped_key_bound_to_its_version(vault: Vault) -> None:
    a = put(vault, "a", records(3))
    b = put(vault, "b", records(3))
    with vault.catalog.write() as conn:
        conn.execute("UPDATE dataset_versions SET wrapped_key = (SELECT wrapped_key FROM dataset_versions WHERE id = ?)"
                     " WHERE id = ?", (b.id, a.id))
    with pytest.raises(IntegrityError) as info:
        vault.open("a")
    assert info.value.code == "vault_key_unwrap_failed"


def _file_hashes(layout: StateLayout) -> dict[str, str]:
    return {str(p.relative_to(layout.vault)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in layout.vault.rglob("*") if p.is_file()}


def _state_bytes(layout: StateLayout) -> bytes:
    return b"".join(p.read_bytes() for p in layout.root.rglob("*") if p.is_file())


def test_delete_destroys_the_key(vault: Vault, layout: StateLayout) -> None:
    keep = put(vault, "keep", records(5))
    gone = put(vault, "gone", records(5))
    wrapped = vault.store.wrapped_key(gone.id)
    assert wrapped is not None and wrapped in _state_bytes(layout)
    vault.delete_version("gone", 1, actor="test")
    assert not (layout.vault / gone.id).exists()
    assert vault.store.wrapped_key(gone.id) is None
    assert wrapped not in _state_bytes(layout), "the wrapped key survives in the catalog's pages or WAL"
    with pytest.raises(NotFound) as info:
        vault.open("gone", 1)
    assert info.value.code == "dataset_version_gone"
    tomb = vault.store.version("gone", 1, ready=False)
    assert tomb.state == "deleted" and not tomb.has_key and tomb.deleted_at
    assert list(vault.open("keep").records()) == records(5)
    assert keep.id in {p.name for p in layout.vault.iterdir()}

    put(vault, "gone", records(2))
    assert vault.store.version("gone").version == 2  # numbers are never reused
    shredded = vault.delete_dataset("gone", actor="test")
    assert [r.version for r in shredded] == [2]
    assert "gone" not in [d["name"] for d in vault.store.list_datasets()]
    assert [r["action"] for r in vault.catalog.query("SELECT action FROM audit")].count("dataset.version.delete") == 2


def test_retention_expires_versions(vault: Vault) -> None:
    old = put(vault, "short", records(3), retention_days=1)
    put(vault, "forever", records(3))
    assert old.expires_at is not None and old.expires_at > time.time() + 86000
    assert vault.expire() == []
    expired = vault.expire(now=time.time() + 2 * 86400)
    assert [r.id for r in expired] == [old.id]
    assert vault.store.version("short", 1, ready=False).state == "expired"
    assert vault.store.wrapped_key(old.id) is None
    assert list(vault.open("forever").records()) == records(3)


def test_refused_publish_leaves_nothing(vault: Vault, layout: StateLayout) -> None:
    with vault.writer("x") as writer:
        writer.write_record({"text": "a"})

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO datasets (id, name, created_at) VALUES ('ds_x', 'x', 0)")
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            writer.publish(vault.catalog, insert)
    assert list(layout.vault.iterdir()) == []
    assert vault.catalog.query("SELECT * FROM datasets") == []


def test_reap_removes_dead_writers_only(vault: Vault, layout: StateLayout) -> None:
    ready = put(vault, "ready", records(3))
    live = VaultWriter(layout, "live")
    live.write_record({"text": "in progress"})
    # A writer killed mid-stream: its staging folder stays, its lock died with it.
    script = ("import os, sys; from pathlib import Path; from garrison.paths import StateLayout;"
              "from garrison.ingest.vault import VaultWriter;"
              "w = VaultWriter(StateLayout(Path(sys.argv[1])), 'dead'); w.write_record({'text': 'x'});"
              "print(w.staging, flush=True); os.kill(os.getpid(), 9)")
    out = subprocess.run([sys.executable, "-c", script, str(layout.root)], capture_output=True, text=True)
    dead = Path(out.stdout.strip())
    assert dead.exists() and dead.name.startswith(STAGING_PREFIX)
    orphan = layout.vault / "dsv_orphan"  # renamed into place, but the COMMIT never happened
    orphan.mkdir()
    (orphan / DATA_FILE).write_bytes(MAGIC)
    assert vault.reap() == 2
    assert not dead.exists() and not orphan.exists()
    assert live.staging.exists() and (layout.vault / ready.id).exists()
    live.abort()
    assert not live.staging.exists()


def test_folder_permissions_and_no_stray_files(vault: Vault, layout: StateLayout) -> None:
    version = put(vault, "perm", records(2))
    folder = layout.vault / version.id
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    shutil.rmtree(folder)
    with pytest.raises(IntegrityError) as info:
        list(vault.open("perm").records())
    assert info.value.code == "vault_file_missing"
    assert os.listdir(layout.vault) == []
