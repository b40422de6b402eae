"""The encrypted vault: dataset versions at rest, one data key each, wrapped by the master key.

Layout: `vault/<version id>/records.enc` (published) and `vault/.staging-<version id>/` (being
written). A version's plaintext is its records as JSON lines; it is cut into chunks of
`CHUNK_SIZE` bytes, each sealed with AES-256-GCM under the version's random 256-bit data key:

    records.enc = MAGIC || chunk*      chunk = u32 big-endian ciphertext length || nonce(12) || ciphertext+tag
    associated data of chunk i = "garrison-vault-v1" 0 dataset 0 version-id 0 u64(i) u8(last)

Binding the index makes a swapped or reordered chunk fail authentication; binding the "last"
flag (known to the writer through one chunk of look-ahead) makes a file cut at a chunk boundary
fail too, because no chunk that claims to be last is ever reached; the catalog's chunk count is
checked as well, and bytes after the last chunk are refused. Each failure has its own
IntegrityError code (`vault_truncated`, `vault_chunk_reordered`, `vault_chunk_corrupt`, ...), so an
operator can tell a damaged disk from a tampered file.

Keys: KEK = HKDF-SHA256(master key, info "garrison vault kek v1"); a data key is stored in the
catalog as nonce || AES-256-GCM(KEK, data key, "garrison-vault-key-v1" 0 version-id) (GCM rather
than AES-KW for the associated data: a wrapped key cannot be moved to another version's row).
Rotating the master key rewraps every data key in one catalog transaction and touches no file.
Deleting a version destroys its wrapped key (crypto-shredding); the ciphertext is removed too,
but is unreadable from the moment the key row is gone.

Durability: the writer streams into the staging folder holding an flock on `writer.lock`, fsyncs
the data file and the folder, then publishes inside one catalog transaction: the row is inserted,
the folder renamed to its final name and the vault folder fsynced before COMMIT. A crash before
COMMIT leaves a folder with no ready row, which `reap` removes at the next start (never while a
live writer holds its lock), so a kill -9 at any instant leaves no partial version. Plaintext is
only ever in memory: the writer encrypts as it goes and the reader decrypts into memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import sqlite3
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from garrison.errors import ConfigError, IntegrityError, NotFound
from garrison.ingest.datasets import DatasetStore, VersionRecord, new_version_id, resolve_reference, validate_name
from garrison.ingest.records import encode_record
from garrison.paths import StateLayout
from garrison.policies.audit import append_audit
from garrison.store.catalog import Catalog
from garrison.store.durable import fsync_dir
from garrison.store.master_key import MasterKeySource, key_check_value, record_kcv, recorded_kcv

__all__ = [
    "CHUNK_SIZE",
    "DATA_FILE",
    "Vault",
    "VaultWriter",
    "derive_kek",
    "encode_record",
    "read_plaintext",
    "unwrap_key",
    "wrap_key",
]

MAGIC = b"GARRISON-VAULT\x00\x01"
DATA_FILE = "records.enc"
LOCK_FILE = "writer.lock"
STAGING_PREFIX = ".staging-"
CHUNK_SIZE = 1024 * 1024
_LEN = struct.Struct(">I")
_NONCE = 12
_TAG = 16
_MAX_CHUNK = 64 * 1024 * 1024  # a length field beyond this is damage, not a chunk worth allocating
_KEK_INFO = b"garrison vault kek v1"
_KEY_AAD = b"garrison-vault-key-v1\x00"
_CHUNK_AAD = b"garrison-vault-v1\x00"
_REORDER_PROBES = 1024  # on failure only: how many other positions to try before calling a chunk corrupt
_ABANDONED_AFTER_S = 60.0  # a staging folder with no lock file yet is a writer starting up, for this long


# -- keys ------------------------------------------------------------------------------------------


def derive_kek(master_key: bytes) -> bytes:
    """The key-encryption key for data keys: a purpose-bound derivation, never the master key itself."""
    if not isinstance(master_key, bytes) or len(master_key) != 32:
        raise ConfigError("the master key must be 32 bytes", code="master_key_invalid")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KEK_INFO).derive(master_key)


def wrap_key(kek: bytes, data_key: bytes, version_id: str) -> bytes:
    nonce = secrets.token_bytes(_NONCE)
    return nonce + AESGCM(kek).encrypt(nonce, data_key, _KEY_AAD + version_id.encode())


def unwrap_key(kek: bytes, wrapped: bytes, version_id: str) -> bytes:
    """The data key, or IntegrityError `vault_key_unwrap_failed` (wrong master key, or a moved/altered row)."""
    try:
        return AESGCM(kek).decrypt(wrapped[:_NONCE], wrapped[_NONCE:], _KEY_AAD + version_id.encode())
    except (InvalidTag, ValueError):
        raise IntegrityError(f"the data key of dataset version {version_id} does not open with this master key "
                             "(wrong master key, or the catalog row was altered)",
                             code="vault_key_unwrap_failed") from None


def _chunk_aad(dataset: str, version_id: str, index: int, last: bool) -> bytes:
    return (_CHUNK_AAD + dataset.encode() + b"\x00" + version_id.encode() + b"\x00"
            + struct.pack(">QB", index, 1 if last else 0))


# -- files -----------------------------------------------------------------------------------------



def _locked_by_live_writer(folder: Path, *, staging: bool) -> bool:
    """True if a process holds the folder's writer lock (flock dies with its holder, kill -9 included).

    A staging folder without its lock file yet belongs to a writer between mkdir and open, for a
    moment; a published-name folder always carries the lock until its row is committed.
    """
    lock = folder / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        if not staging:
            return False
        try:
            return time.time() - folder.stat().st_mtime < _ABANDONED_AFTER_S
        except FileNotFoundError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class VaultWriter:
    """Streams one new version's records into a staging folder, encrypting chunk by chunk.

    Memory holds at most one chunk of plaintext plus the record being added. Use as a context
    manager: leaving it with an exception (or without `publish`) removes the staging folder.
    """

    def __init__(self, layout: StateLayout, dataset: str, *, chunk_size: int = CHUNK_SIZE,
                 version_id: str | None = None) -> None:
        if not 16 <= chunk_size <= _MAX_CHUNK - _TAG:
            raise ValueError("chunk_size out of range")
        self.dataset = validate_name(dataset)
        self.version_id = version_id or new_version_id()
        self.layout = layout
        self.chunk_size = chunk_size
        self.data_key = AESGCM.generate_key(bit_length=256)
        self._aead = AESGCM(self.data_key)
        self.records = 0
        self.chunks = 0
        self.plaintext_bytes = 0
        self.stored_bytes = 0
        self.published = False
        self._buf = bytearray()
        self._finished = False
        layout.vault.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.staging = layout.vault / f"{STAGING_PREFIX}{self.version_id}"
        self.staging.mkdir(mode=0o700)
        self._lock_fd = os.open(self.staging / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._file: BinaryIO | None = open(self.staging / DATA_FILE, "xb")  # noqa: SIM115 (closed in finish/abort)
        os.fchmod(self._file.fileno(), 0o600)
        self._file.write(MAGIC)
        self.stored_bytes = len(MAGIC)

    @property
    def folder(self) -> Path:
        return self.layout.vault / self.version_id

    def write(self, data: bytes) -> None:
        """Append plaintext; full chunks are sealed once more data follows them (so 'last' is known)."""
        if self._finished:
            raise RuntimeError("writer already finished")
        self._buf += data
        self.plaintext_bytes += len(data)
        size = self.chunk_size
        if len(self._buf) <= size:
            return
        # Chunks are sealed from a view of the buffer (no copy of a megabyte per chunk), then cut off.
        done = 0
        with memoryview(self._buf) as view:
            while len(view) - done > size:
                self._seal(view[done:done + size], last=False)
                done += size
        del self._buf[:done]

    def write_record(self, record: Any) -> None:
        self.write(encode_record(record))
        self.records += 1

    def write_lines(self, data: bytes, count: int) -> None:
        """Append `count` records already serialized by `encode_record` (one line each)."""
        self.write(data)
        self.records += count

    def _seal(self, plain: bytes | memoryview, *, last: bool) -> None:
        assert self._file is not None
        nonce = secrets.token_bytes(_NONCE)
        sealed = self._aead.encrypt(nonce, plain, _chunk_aad(self.dataset, self.version_id, self.chunks, last))
        self._file.write(_LEN.pack(len(sealed)) + nonce)
        self._file.write(sealed)
        self.stored_bytes += _LEN.size + _NONCE + len(sealed)
        self.chunks += 1

    def finish(self) -> None:
        """Seal the final chunk and make the staging folder durable (file and folder fsynced)."""
        if self._finished:
            return
        assert self._file is not None
        self._seal(bytes(self._buf), last=True)
        self._buf = bytearray()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        fsync_dir(self.staging)
        self._finished = True

    def publish(self, catalog: Catalog, insert: Callable[[Any], Any]) -> Any:
        """Make the version visible: `insert(conn)` adds its rows, the folder gets its final name, one COMMIT.

        `insert` returns None to publish, or a value meaning "do not publish" (e.g. the id of an
        identical earlier version): then the staging folder is discarded and that value returned.
        """
        self.finish()
        final = self.folder
        renamed = False
        try:
            with catalog.write() as conn:
                result = insert(conn)
                if result is not None:
                    return result
                os.rename(self.staging, final)
                renamed = True
                fsync_dir(self.layout.vault)
        except BaseException:
            if renamed:  # the COMMIT failed: the folder must not stay under a published name
                with contextlib.suppress(OSError):
                    os.rename(final, self.staging)
            raise
        finally:
            if not renamed or not final.exists():
                self.abort()
        self.published = True
        with contextlib.suppress(OSError):
            (final / LOCK_FILE).unlink()
        self._release()
        return None

    def _release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def abort(self) -> None:
        """Discard everything written (nothing of it was ever plaintext on disk)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._buf = bytearray()
        shutil.rmtree(self.staging, ignore_errors=True)
        self._release()

    def __enter__(self) -> VaultWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.published:
            self.abort()


# -- reading ---------------------------------------------------------------------------------------


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    while len(data) < n:
        more = f.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _diagnose(aead: AESGCM, nonce: bytes, sealed: bytes, dataset: str, version_id: str, index: int,
              count: int) -> IntegrityError:
    """Why chunk `index` failed: reordered (it opens at another position), a count mismatch, or damage."""
    last = index == count - 1
    try:
        aead.decrypt(nonce, sealed, _chunk_aad(dataset, version_id, index, not last))
    except InvalidTag:
        pass
    else:
        return IntegrityError(
            f"dataset version {dataset} ({version_id}): chunk {index} is {'not ' if last else ''}the final chunk "
            f"but the catalog records {count} chunks: chunks were removed or added", code="vault_chunk_count_mismatch")
    probes = [j for j in range(max(0, index - _REORDER_PROBES // 2), index + _REORDER_PROBES // 2) if j != index]
    for other in probes:
        for flag in (False, True):
            try:
                aead.decrypt(nonce, sealed, _chunk_aad(dataset, version_id, other, flag))
            except InvalidTag:
                continue
            return IntegrityError(f"dataset version {dataset} ({version_id}): position {index} holds chunk {other}: "
                                  "chunks were swapped or reordered", code="vault_chunk_reordered")
    return IntegrityError(f"dataset version {dataset} ({version_id}): chunk {index} fails authentication (damaged, "
                          "altered, or taken from another version)", code="vault_chunk_corrupt")


def read_plaintext(path: Path, data_key: bytes, dataset: str, version_id: str, chunk_count: int) -> Iterator[bytes]:
    """Authenticated plaintext chunks, in order; raises IntegrityError before yielding anything unverified."""
    aead = AESGCM(data_key)
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise IntegrityError(f"dataset version {dataset} ({version_id}): {path.name} is missing from the vault",
                             code="vault_file_missing") from None
    with f:
        if _read_exact(f, len(MAGIC)) != MAGIC:
            raise IntegrityError(f"{path} is not a Garrison vault file (damaged or replaced)",
                                 code="vault_header_invalid")
        for index in range(chunk_count):
            head = _read_exact(f, _LEN.size + _NONCE)
            if len(head) < _LEN.size + _NONCE:
                raise IntegrityError(
                    f"dataset version {dataset} ({version_id}): the file ends after {index} of {chunk_count} chunks "
                    "(truncated)", code="vault_truncated")
            (length,) = _LEN.unpack(head[:_LEN.size])
            if not _TAG <= length <= _MAX_CHUNK:
                raise IntegrityError(f"dataset version {dataset} ({version_id}): chunk {index} has an impossible "
                                     f"length ({length})", code="vault_chunk_corrupt")
            sealed = _read_exact(f, length)
            if len(sealed) < length:
                raise IntegrityError(f"dataset version {dataset} ({version_id}): the file ends inside chunk {index} "
                                     f"of {chunk_count} (truncated)", code="vault_truncated")
            nonce = head[_LEN.size:]
            try:
                plain = aead.decrypt(nonce, sealed, _chunk_aad(dataset, version_id, index, index == chunk_count - 1))
            except InvalidTag:
                raise _diagnose(aead, nonce, sealed, dataset, version_id, index, chunk_count) from None
            if index == chunk_count - 1 and f.read(1):
                raise IntegrityError(f"dataset version {dataset} ({version_id}): data follows the final chunk",
                                     code="vault_trailing_data")
            yield plain


class VersionReader:
    """An open dataset version: its records, decrypted in memory as they are read."""

    def __init__(self, record: VersionRecord, folder: Path, data_key: bytes) -> None:
        self.record = record
        self._path = folder / DATA_FILE
        self._key = data_key

    def plaintext(self) -> Iterator[bytes]:
        r = self.record
        return read_plaintext(self._path, self._key, r.dataset, r.id, r.chunk_count)

    def verify(self) -> int:
        """Authenticate every chunk without parsing (a worker calls this before training); returns bytes."""
        total = sum(len(chunk) for chunk in self.plaintext())
        if total != self.record.plaintext_bytes:
            raise IntegrityError(f"dataset version {self.record.reference}: {total} bytes, catalog says "
                                 f"{self.record.plaintext_bytes}", code="vault_size_mismatch")
        return total

    def records(self) -> Iterator[dict[str, Any]]:
        """Each record as a dict, streaming: memory holds one chunk and one record."""
        carry = b""
        count = 0
        for chunk in self.plaintext():
            lines = (carry + chunk).split(b"\n")
            carry = lines.pop()
            for line in lines:
                count += 1
                yield json.loads(line)
        if carry:
            raise IntegrityError(f"dataset version {self.record.reference}: the last record is incomplete",
                                 code="vault_record_invalid")
        if count != self.record.record_count:
            raise IntegrityError(f"dataset version {self.record.reference}: {count} records, catalog says "
                                 f"{self.record.record_count}", code="vault_size_mismatch")


# -- the vault -------------------------------------------------------------------------------------


class Vault:
    """Versions in the catalog plus their encrypted folders; the master key comes from `master_key()`.

    `master_key` is a callable so a long-running daemon can pick up a rotated key: on an unwrap
    failure the key is fetched once more before giving up.
    """

    def __init__(self, layout: StateLayout, catalog: Catalog, master_key: Callable[[], bytes], *,
                 chunk_size: int = CHUNK_SIZE, key_source: MasterKeySource | None = None) -> None:
        self.layout = layout
        self.catalog = catalog
        self.store = DatasetStore(catalog)
        self.chunk_size = chunk_size
        self._master_key = master_key
        self._key_source = key_source
        self._kek: bytes | None = None

    def kek(self, *, refresh: bool = False) -> bytes:
        if self._kek is None or refresh:
            self._kek = derive_kek(self._master_key())
        return self._kek

    def writer(self, dataset: str) -> VaultWriter:
        return VaultWriter(self.layout, dataset, chunk_size=self.chunk_size)

    def wrap(self, conn: sqlite3.Connection, writer: VaultWriter) -> bytes:
        """The writer's data key wrapped under the master key the catalog records, inside the transaction
        that publishes it: a rotation that committed meanwhile (SQLite serializes the two) is seen here,
        so no key is ever wrapped under a master key the catalog has rotated away from."""
        return self._wrap_checked(conn, writer.data_key, writer.version_id)

    def secret(self, purpose: str, key_id: str) -> bytes:
        """A random key kept wrapped in the catalog (`wrapped_keys`), made on first use: a fine-tune's
        checkpoint key. Rotations rewrap it with the dataset keys, so it survives them unchanged."""
        aad = f"{purpose}:{key_id}"
        query = "SELECT wrapped FROM wrapped_keys WHERE purpose = ? AND id = ?"
        row = self.catalog.query_one(query, (purpose, key_id))
        if row is None:
            with self.catalog.write() as conn:
                row = conn.execute(query, (purpose, key_id)).fetchone()
                if row is None:
                    key = secrets.token_bytes(32)
                    conn.execute("INSERT INTO wrapped_keys (purpose, id, wrapped, created_at) VALUES (?, ?, ?, ?)",
                                 (purpose, key_id, self._wrap_checked(conn, key, aad), time.time()))
                    return key
        return self._unwrap(bytes(row[0]), aad)

    def _unwrap(self, wrapped: bytes, aad_id: str) -> bytes:
        try:
            return unwrap_key(self.kek(), wrapped, aad_id)
        except IntegrityError:
            if self._key_source is not None:  # rotated since: the key the catalog records now
                self._kek = derive_kek(self._key_source.matching(recorded_kcv(self.catalog.conn)))
                return unwrap_key(self._kek, wrapped, aad_id)
            return unwrap_key(self.kek(refresh=True), wrapped, aad_id)

    def _wrap_checked(self, conn: sqlite3.Connection, data_key: bytes, aad_id: str) -> bytes:
        recorded = recorded_kcv(conn)
        master = self._master_key()
        if recorded is None:
            record_kcv(conn, key_check_value(master))
        elif key_check_value(master) != recorded:
            if self._key_source is None:
                raise IntegrityError("the master key changed (rotated) while this data was being stored; "
                                     "store it again", code="master_key_mismatch")
            master = self._key_source.matching(recorded)
        self._kek = derive_kek(master)
        return wrap_key(self._kek, data_key, aad_id)

    def data_key(self, record: VersionRecord) -> bytes:
        wrapped = self.store.wrapped_key(record.id)
        if wrapped is None:
            raise NotFound(f"dataset version {record.reference} has no key (deleted)", code="dataset_version_gone")
        return self._unwrap(wrapped, record.id)

    def open(self, name: str, version: int | None = None) -> VersionReader:
        """A ready version for reading (workers only: records never leave the appliance through the API)."""
        record = self.store.version(name, version)
        return VersionReader(record, self.layout.vault / record.id, self.data_key(record))

    def open_reference(self, ref: str, param: str = "dataset") -> tuple[str, VersionReader]:
        """`NAME`, `NAME:N` or a file id -> ("NAME:N", reader). Callers authorize the name first."""
        name, version = resolve_reference(self.catalog, ref, param)
        reader = self.open(name, version)
        return reader.record.reference, reader

    # -- deleting ------------------------------------------------------------------------------
    def _shred(self, records: list[VersionRecord], state: str, actor: str, action: str,
               dataset_deleted: str | None = None) -> list[VersionRecord]:
        """Destroy keys (one transaction), then the folders; SQLite overwrites freed bytes, WAL is truncated."""
        if not records and dataset_deleted is None:
            return []
        with self.catalog._lock:
            self.catalog.conn.execute("PRAGMA secure_delete=ON")  # freed cells are zeroed, not left readable
        with self.catalog.write() as conn:
            for record in records:
                DatasetStore.destroy_key(conn, record.id, state)
                append_audit(conn, actor=actor, action=action, resource=f"dataset:{record.reference}",
                             detail={"version_id": record.id, "records": record.record_count})
            if dataset_deleted is not None:
                DatasetStore.mark_dataset_deleted(conn, dataset_deleted)
        with self.catalog._lock:
            # The WAL still holds page images with the key until a checkpoint; truncate it.
            self.catalog.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        for record in records:
            shutil.rmtree(self.layout.vault / record.id, ignore_errors=True)
        if records and self.layout.vault.exists():
            fsync_dir(self.layout.vault)
        return records

    def delete_version(self, name: str, version: int, *, actor: str) -> VersionRecord:
        record = self.store.version(name, version)
        self._shred([record], "deleted", actor, "dataset.version.delete")
        return record

    def delete_dataset(self, name: str, *, actor: str) -> list[VersionRecord]:
        """Shred every version of `name`; the name disappears from listings (tombstones stay for lineage)."""
        self.store.dataset(name)  # NotFound for an unknown name
        return self._shred(self.store.versions(name), "deleted", actor, "dataset.version.delete",
                           dataset_deleted=name)

    def expire(self, now: float | None = None) -> list[VersionRecord]:
        """Retention: shred every version whose `expires_at` has passed."""
        return self._shred(self.store.expired(time.time() if now is None else now), "expired",
                           "system:retention", "dataset.version.expire")

    # -- recovery and rotation -----------------------------------------------------------------
    def reap(self) -> int:
        """Remove staging folders of dead writers and folders without a ready version (crash leftovers)."""
        if not self.layout.vault.exists():
            return 0
        states = self.store.states()
        removed = 0
        for entry in self.layout.vault.iterdir():
            if not entry.is_dir():
                continue
            version_id = entry.name.removeprefix(STAGING_PREFIX)
            published = entry.name == version_id
            if published and states.get(version_id) == "ready":
                continue
            if _locked_by_live_writer(entry, staging=not published):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
        if removed:
            fsync_dir(self.layout.vault)
        return removed
