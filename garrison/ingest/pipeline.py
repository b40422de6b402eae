"""The one ingestion path: delivered bytes in, a durable encrypted dataset version out.

Every delivery (the inbox, the sealed-upload route, OpenAI's /v1/files, `garrison ingest`) calls
`ingest()`, so the rules below hold everywhere:

    source bytes -> [age decrypt, streaming] -> parse -> validate -> redact -> vault writer -> version

- Plaintext exists only in memory: the age reader yields authenticated chunks, the parser reads
  lines from them, the redactor works on strings and the vault writer encrypts each chunk before
  it writes it. No temporary file ever holds plaintext (spooling sealed bytes is fine).
- A refused file stores nothing: the vault writer's staging folder is discarded and no catalog
  row is written. Refusals are `GarrisonError`s with a stable code (the age codes, `bad_lines`,
  `no_records`, `invalid_format`, ...) and, where useful, the report in `details["report"]`.
- A version is acknowledged (returned) only after its files are fsynced and its row committed.
- Delivering the same bytes to the same dataset again returns the existing version
  (`duplicate=True`) instead of a second copy: clients and the inbox can retry safely.

The report says what happened without quoting data: records accepted, refused (line numbers and
reasons), dropped by the redaction policy, redactions per entity type, bytes in, duration.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from garrison.crypto.age import ARMOR_BEGIN, MAGIC, AgeReader, decrypt_stream
from garrison.crypto.age import CHUNK_SIZE as CHUNK_SIZE_AGE
from garrison.errors import InvalidRequest, PayloadTooLarge
from garrison.ingest import parallel
from garrison.ingest.datasets import DatasetStore, VersionRecord, validate_name
from garrison.ingest.formats import JSONL_KINDS, BadLine, Parser
from garrison.ingest.parallel import (
    REFUSING,
    RecordRedactor,
    RedactionPool,
    Segment,
    jsonl_segments,
    segments,
    worker_count,
)
from garrison.ingest.pii import Redactor
from garrison.ingest.policy import RedactionPolicy
from garrison.ingest.vault import CHUNK_SIZE, Vault
from garrison.paths import StateLayout
from garrison.policies.audit import append_audit
from garrison.store.catalog import Catalog
from garrison.store.master_key import MasterKeySource

if TYPE_CHECKING:
    import sqlite3

    from garrison.config import Config
    from garrison.crypto.identity import ApplianceIdentity

__all__ = [
    "IngestPolicy",
    "IngestRefused",
    "IngestRequest",
    "IngestResult",
    "IngestService",
    "PolicyProvider",
    "ingest",
    "ingest_part",
    "load_policy",
    "policy_file",
    "pseudonym_key",
]

SOURCES = ("inbox", "upload", "files", "cli")
MAX_REFUSED_LISTED = 1000  # the report lists this many bad lines; `records_refused_count` has the total
POLICY_FILE = "policy.toml"
_PSEUDONYM_INFO = b"garrison pii pseudonym v1"


class IngestRefused(InvalidRequest):
    """The delivered file was refused as a whole; nothing was stored."""

    code = "ingest_refused"


@dataclass(frozen=True)
class IngestPolicy:
    """What the operator decided: the redaction policy (with on_bad_lines) and retention.

    A policy file is TOML: a `[redaction]` table (garrison.ingest.policy) and an optional top-level
    `retention_days` (versions older than this are shredded; absent or 0: kept until deleted).
    """

    redaction: RedactionPolicy = field(default_factory=RedactionPolicy)
    retention_days: float | None = None

    @property
    def on_bad_lines(self) -> str:
        return self.redaction.on_bad_lines

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> IngestPolicy:
        data = dict(data or {})
        unknown = sorted(set(data) - {"redaction", "retention_days"})
        if unknown:
            raise InvalidRequest(f"unknown key(s) in the ingest policy: {', '.join(unknown)}; expected "
                                 "[redaction] and retention_days", code="invalid_policy", param=unknown[0])
        days = data.get("retention_days")
        if days is not None and (isinstance(days, bool) or not isinstance(days, int | float) or days < 0):
            raise InvalidRequest("retention_days must be a number of days >= 0", code="invalid_policy",
                                 param="retention_days")
        return cls(RedactionPolicy.from_dict(data.get("redaction")), float(days) if days else None)

    @classmethod
    def from_toml(cls, text: str) -> IngestPolicy:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequest(f"the ingest policy is not valid TOML: {exc}", code="invalid_policy") from None
        return cls.from_dict(doc)

    @classmethod
    def from_file(cls, path: Path) -> IngestPolicy:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidRequest(f"cannot read the policy file {path}: {exc.strerror}", code="invalid_policy") from None
        return cls.from_toml(text)

    def summary(self) -> dict[str, Any]:
        return {"on_bad_lines": self.on_bad_lines, "default_action": self.redaction.default,
                "retention_days": self.retention_days}


#: The top-level keys of the appliance's policy file that belong to ingestion; the file's other
#: sections ([rate_limits], [inference_privacy]) are validated by garrison.operations.policy.
INGEST_KEYS = frozenset({"redaction", "retention_days"})

#: Where a caller gets the policy each ingestion runs under: the daemon passes the live one (reloaded
#: on SIGHUP), the CLI one that validates the whole file.
PolicyProvider = Callable[[], IngestPolicy]


def ingest_part(path: Path) -> IngestPolicy:
    """Ingestion's part of an appliance policy file; the other sections are left to their owners."""
    try:
        doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidRequest(f"cannot read the policy file {path}: {exc.strerror}", code="invalid_policy") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequest(f"the policy is not valid TOML: {exc}", code="invalid_policy") from None
    return IngestPolicy.from_dict({k: v for k, v in doc.items() if k in INGEST_KEYS})


def policy_file(config: Config) -> Path | None:
    """The `policy_file` setting, else `<state_dir>/policy.toml` if present, else None (the defaults)."""
    if config.policy_file:
        return Path(config.policy_file)
    default = config.state_path / POLICY_FILE
    return default if default.exists() else None


def load_policy(config: Config) -> IngestPolicy:
    """Ingestion's part of the appliance's policy file (see `policy_file`), else the defaults (tag every
    entity, refuse bad lines). Read at each call: callers that must not see a half-edited file between
    two reloads (the daemon) pass IngestService a provider instead."""
    path = policy_file(config)
    return ingest_part(path) if path is not None else IngestPolicy()


def pseudonym_key(identity: ApplianceIdentity) -> bytes:
    """The redactor's HMAC key: stable per appliance, and across master-key rotations.

    Derived from the appliance's age identity (itself kept encrypted under the master key) rather
    than from the master key directly, because rotating the master key must not change every
    pseudonym: datasets ingested before and after a rotation must still agree on who is who.
    """
    secret = identity.age_identity.private_bytes_raw()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_PSEUDONYM_INFO).derive(secret)


@dataclass
class IngestRequest:
    """Where the bytes come from and where they go. `sealed`: True (must be age), False (plaintext),
    None (decide by the first bytes). `on_publish(conn, version)` runs inside the publishing transaction
    (e.g. to add the /v1/files row atomically with the version). `declared_bytes`: the size a stream's
    sender announced (Content-Length), which lets a large upload use the worker pool as a file does; the
    bytes are still counted and bounded as they arrive."""

    dataset: str
    source: str
    source_name: str = ""
    format: str = "auto"
    columns: Mapping[str, str] | None = None
    sealed: bool | None = True
    actor: str = "local"
    max_bytes: int | None = None
    declared_bytes: int | None = None
    on_publish: Callable[[sqlite3.Connection, VersionRecord], None] | None = None


@dataclass(frozen=True)
class IngestResult:
    version: VersionRecord
    report: dict[str, Any]
    duplicate: bool = False

    def to_json(self) -> dict[str, Any]:
        return {**self.version.to_json(report=False), "report": self.report, "duplicate": self.duplicate}


class _Metered(io.RawIOBase):
    """Counts, hashes and bounds the delivered bytes as they are read; reports progress."""

    def __init__(self, src: Any, max_bytes: int | None = None, progress: Callable[[int], None] | None = None, *,
                 digest: bool = True) -> None:
        super().__init__()
        self._src = src
        self._max = max_bytes
        self._progress = progress
        self._digest = digest
        self.count = 0
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        readinto = getattr(self._src, "readinto", None)
        if readinto is not None:
            n = readinto(view) or 0
        else:
            data = self._src.read(len(view)) or b""
            n = len(data)
            view[:n] = data
        if n:
            self.count += n
            if self._digest:
                self.sha256.update(view[:n])
            if self._max is not None and self.count > self._max:
                raise PayloadTooLarge(f"the delivered file is larger than the limit of {self._max} bytes",
                                      code="upload_too_large")
            if self._progress is not None:
                self._progress(n)
        return n


def _looks_sealed(head: bytes) -> bool:
    return head.startswith(MAGIC) or head.lstrip(b" \t\r\n").startswith(ARMOR_BEGIN)


def ingest(src: Any, request: IngestRequest, *, vault: Vault, identity: ApplianceIdentity,
           policy: IngestPolicy | None = None, progress: Callable[[int], None] | None = None) -> IngestResult:
    """Run one delivery through the pipeline; see the module docstring for the guarantees.

    `src` is a binary file object (anything with read() or readinto()) of the delivered bytes.
    Raises an AgeError subclass for a sealed file that does not open, IngestRefused (`bad_lines`,
    `no_records`) with the report in its details, FormatError, PayloadTooLarge.
    """
    with contextlib.ExitStack() as cleanup:
        return _ingest(src, request, vault, identity, policy or IngestPolicy(), progress, cleanup)


def _ingest(src: Any, request: IngestRequest, vault: Vault, identity: ApplianceIdentity, policy: IngestPolicy,
            progress: Callable[[int], None] | None, cleanup: contextlib.ExitStack) -> IngestResult:
    """`ingest`, with `cleanup` to stop what it starts (the worker pool) however it ends."""
    validate_name(request.dataset)
    if request.source not in SOURCES:
        raise ValueError(f"unknown source {request.source!r}")
    started = time.monotonic()
    metered = _Metered(src, request.max_bytes, progress)
    raw = io.BufferedReader(metered, buffer_size=256 * 1024)
    sealed = _looks_sealed(raw.peek(64)[:64]) if request.sealed is None else request.sealed
    # The parser reads from a buffer over the (decrypted) stream; the meter counts plaintext bytes.
    plain_meter = _Metered(AgeReader(decrypt_stream(raw, [identity.age_identity])) if sealed else raw, digest=False)
    plain = io.BufferedReader(plain_meter, buffer_size=CHUNK_SIZE_AGE)
    parser = Parser(plain, request.format, name_hint=request.source_name, columns=request.columns)
    key = pseudonym_key(identity)
    jsonl = parser.container in ("jsonl", *JSONL_KINDS)
    workers = worker_count() if jsonl and _large(src, request) else 0
    # Asked for before the redactor is built, so that the workers start while it compiles.
    pool = RedactionPool(workers, policy.redaction, key) if workers >= 2 else None
    if pool is not None:
        cleanup.callback(pool.close)
    redact = RecordRedactor(Redactor(policy.redaction, key, saved=vault.layout.cache))
    redactions: Counter[str] = Counter()
    refused: list[dict[str, Any]] = []
    refused_count = dropped = 0
    skip = policy.on_bad_lines == "skip"

    def report(accepted: int, stored: int, chunks: int) -> dict[str, Any]:
        return {"dataset": request.dataset, "format": parser.format or parser.container, "source": request.source,
                "source_name": request.source_name, "sealed": bool(sealed), "records_accepted": accepted,
                "records_refused": refused, "records_refused_count": refused_count, "records_dropped": dropped,
                "redactions": dict(sorted(redactions.items())), "bytes_in": metered.count,
                "plaintext_bytes": plain_meter.count, "stored_bytes": stored, "chunks": chunks,
                "duration_s": round(time.monotonic() - started, 3), "policy": policy.summary()}

    if jsonl:
        kind = parser.container if parser.container in JSONL_KINDS else None
        source: Iterator[Segment | BadLine] = jsonl_segments(plain, kind, parser.state, redact, pool)
    else:
        source = segments(parser, redact)
    writer = vault.writer(request.dataset)
    with writer, contextlib.closing(source):  # type: ignore[type-var]
        for item in source:
            if isinstance(item, BadLine):
                refused_count += 1
                if len(refused) < MAX_REFUSED_LISTED:
                    refused.append({"line": item.line, "reason": item.reason})
                if not skip:
                    parser.state[REFUSING] = "1"  # the file will be refused: later JSONL blocks are only checked
                    if writer.records:
                        writer.abort()  # stop holding its records, keep reading for the report
                continue
            if refused_count and not skip:
                continue  # records after a refused line are not counted (nor kept)
            redactions.update(item.counts)
            dropped += item.dropped
            if item.count:
                writer.write_lines(item.data, item.count)
        if refused_count and not skip:
            raise IngestRefused(
                f"{refused_count} bad line(s) (first at line {refused[0]['line']}: {refused[0]['reason']}); the policy "
                "refuses files with bad lines (on_bad_lines = \"refuse\"): nothing was stored",
                code="bad_lines", details={"report": report(0, 0, 0)})
        if not writer.records:
            raise IngestRefused("the file holds no acceptable record: nothing was stored", code="no_records",
                                details={"report": report(0, 0, 0)})
        writer.finish()
        source_sha256 = metered.sha256.hexdigest()
        final = report(writer.records, writer.stored_bytes, writer.chunks)
        published: dict[str, VersionRecord] = {}

        def insert(conn: sqlite3.Connection) -> str | None:
            duplicate = DatasetStore.find_duplicate(conn, request.dataset, source_sha256)
            if duplicate is not None:
                return duplicate
            wrapped = vault.wrap(conn, writer)
            number = DatasetStore.insert_version(
                conn, version_id=writer.version_id, name=request.dataset, format=parser.format, wrapped_key=wrapped,
                record_count=writer.records, chunk_count=writer.chunks, plaintext_bytes=writer.plaintext_bytes,
                stored_bytes=writer.stored_bytes, source=request.source, source_name=request.source_name,
                source_sha256=source_sha256, report=final, created_by=request.actor,
                retention_days=policy.retention_days)
            record = _version_in(conn, writer.version_id)
            published["version"] = record
            if request.on_publish is not None:
                request.on_publish(conn, record)
            append_audit(conn, actor=request.actor, action="dataset.ingest", resource=f"dataset:{request.dataset}:"
                         f"{number}", detail={"source": request.source, "records": writer.records,
                                              "refused": refused_count, "dropped": dropped,
                                              "redactions": final["redactions"]})
            return None

        duplicate_of = writer.publish(vault.catalog, insert)
    if duplicate_of is not None:
        existing = vault.store.version_by_id(duplicate_of)
        assert existing is not None
        return IngestResult(existing, existing.report, duplicate=True)
    version = published["version"]
    return IngestResult(version, version.report)


def _large(src: Any, request: IngestRequest) -> bool:
    """Whether the delivery is large enough for the worker pool (streams of unknown size stay in-process)."""
    try:
        size = os.fstat(src.fileno()).st_size
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        if request.declared_bytes is None:
            return False
        size = request.declared_bytes
    return size >= parallel.PARALLEL_MIN_BYTES and (request.max_bytes is None or size <= request.max_bytes)


def _version_in(conn: sqlite3.Connection, version_id: str) -> VersionRecord:
    """The row just inserted, read through the transaction's own connection."""
    row = conn.execute(
        "SELECT v.id, v.dataset_id, d.name AS dataset, v.version, v.state, v.format, v.wrapped_key IS NOT NULL AS"
        " has_key, v.record_count, v.chunk_count, v.plaintext_bytes, v.stored_bytes, v.source, v.source_name,"
        " v.source_sha256, v.report, v.created_at, v.created_by, v.expires_at, v.deleted_at"
        " FROM dataset_versions v JOIN datasets d ON d.id = v.dataset_id WHERE v.id = ?", (version_id,)).fetchone()
    return VersionRecord.from_row(row)


class IngestService:
    """The pipeline bound to one appliance: its catalog, vault, identity and policy (daemon and CLI).

    `policy` provides the policy of each ingestion; without one, ingestion's part of the policy file
    is read at each ingestion (`load_policy`).

    The identity is loaded on first use (through `identity_loader`, e.g. the daemon's IdentityCache),
    then the master key; both are cached. Thread-safe: the daemon runs ingestions in worker threads.
    """

    def __init__(self, config: Config, catalog: Catalog, *,
                 identity_loader: Callable[[Config], ApplianceIdentity] | None = None,
                 chunk_size: int = CHUNK_SIZE, policy: PolicyProvider | None = None) -> None:
        from garrison.crypto.identity import load_appliance_identity

        self.config = config
        self._policy = policy or (lambda: load_policy(config))
        self.catalog = catalog
        self.layout = StateLayout(config.state_path)
        self._identity_loader = identity_loader or load_appliance_identity
        self._lock = threading.Lock()
        self._master: bytes | None = None
        self.vault = Vault(self.layout, catalog, self._master_key, chunk_size=chunk_size,
                           key_source=MasterKeySource(config))

    def identity(self) -> ApplianceIdentity:
        return self._identity_loader(self.config)

    def _master_key(self) -> bytes:
        from garrison.store.master_key import current_master_key

        self.identity()  # a developer install creates its master key together with the identity
        with self._lock:
            self._master = current_master_key(self.config, self.vault.catalog)
            return self._master

    def policy(self) -> IngestPolicy:
        """The policy an ingestion starting now runs under (asked per ingestion, so a reload applies)."""
        return self._policy()

    def ingest(self, src: Any, request: IngestRequest, *, policy: IngestPolicy | None = None,
               progress: Callable[[int], None] | None = None) -> IngestResult:
        return ingest(src, request, vault=self.vault, identity=self.identity(), policy=policy or self.policy(),
                      progress=progress)

    def recover(self) -> int:
        """At start: remove what crashed ingestions left in the vault (never a live writer's folder)."""
        return self.vault.reap()
