"""The inbox drop folder: sealed files put into `<state>/inbox/` become dataset versions.

The daemon runs one `InboxWatcher` task. It polls (no inotify: polling works on every file
system, including network mounts and bind mounts into containers, and costs one listdir a second).

When a file is taken. Only regular files whose names do not start with "." and do not end in
`.part`, `.tmp` or `.meta.json`. A file is taken once its size and modification time are the same
on two consecutive polls and it has not been modified for `settle_s` seconds, so a file still
being copied in is not taken half. The reliable way to deliver is still to write `.NAME` or
`NAME.part` and rename it when complete (rename is atomic): such names are never taken.

Which dataset. In order: a sidecar `NAME.meta.json` written *before* NAME, holding
`{"dataset": ..., "format": ..., "columns": {...}}` (every key optional); else a name of the form
`DATASET__anything` (two underscores); else the name up to its first dot (`support.jsonl.age`
-> `support`).

What happens. The file (and its sidecar) is first renamed into `inbox/.processing/`, so it has
left the inbox but is never lost: after a crash, `recover()` (run at start) moves it back and it
is retried. The pipeline takes only sealed (age) files here. On success the file is removed
(after the version is committed). On refusal it goes to `inbox/.rejected/` next to
`NAME.reason.json` (code, message, report with bad line numbers). A failure that is not the
file's fault (the master key missing, the disk full) moves it back to the inbox and it is retried
after `retry_s`. Redelivering the same bytes after a crash between commit and removal does not
make a second version: the pipeline recognises the bytes and answers with the existing one.

Retention runs here too: every `retention_every_s` the watcher shreds versions whose time is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from garrison.errors import GarrisonError, InvalidRequest, PayloadTooLarge
from garrison.ingest.datasets import validate_name
from garrison.ingest.formats import FORMATS, parse_columns
from garrison.ingest.pipeline import IngestRequest, IngestService
from garrison.logs import log_event
from garrison.store.durable import fsync_dir

__all__ = ["InboxWatcher", "Outcome", "dataset_for"]

log = logging.getLogger("garrison.inbox")

PROCESSING = ".processing"
REJECTED = ".rejected"
SIDECAR = ".meta.json"
REASON = ".reason.json"
_IGNORED_SUFFIXES = (".part", ".tmp", SIDECAR)
_SIDECAR_KEYS = frozenset({"dataset", "format", "columns"})


@dataclass(frozen=True)
class Outcome:
    """What became of one inbox file."""

    name: str
    status: str  # ingested | duplicate | rejected | retry
    dataset: str = ""
    version: int | None = None
    code: str = ""
    message: str = ""



def _free_name(folder: Path, name: str) -> Path:
    """`folder/name`, or `name.1`, `name.2`... if taken (a refusal never overwrites an earlier one)."""
    target = folder / name
    n = 0
    while target.exists() or (folder / (target.name + REASON)).exists():
        n += 1
        target = folder / f"{name}.{n}"
    return target


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def dataset_for(name: str, sidecar: dict[str, Any] | None) -> tuple[str, str, dict[str, str] | None]:
    """(dataset, format, columns) for an inbox file, by the rules in the module docstring."""
    meta = sidecar or {}
    unknown = sorted(set(meta) - _SIDECAR_KEYS)
    if unknown:
        raise InvalidRequest(f"the sidecar {name}{SIDECAR} has unknown key(s) {', '.join(unknown)}; expected "
                             f"{', '.join(sorted(_SIDECAR_KEYS))}", code="invalid_sidecar")
    if "dataset" in meta:
        dataset = meta["dataset"]
    elif "__" in name:
        dataset = name.split("__", 1)[0]
    else:
        dataset = name.split(".", 1)[0]
    fmt = meta.get("format", "auto")
    if fmt not in FORMATS:
        raise InvalidRequest(f"the sidecar names an unknown format; formats are {', '.join(FORMATS)}",
                             code="invalid_sidecar")
    return validate_name(dataset), str(fmt), parse_columns(meta.get("columns"))


class InboxWatcher:
    """Polls the inbox and runs each settled file through the ingestion pipeline, one at a time."""

    def __init__(self, service: IngestService, *, poll_s: float = 1.0, settle_s: float = 1.0,
                 retry_s: float = 30.0, retention_every_s: float = 60.0) -> None:
        self.service = service
        self.inbox = service.layout.inbox
        self.processing = self.inbox / PROCESSING
        self.rejected = self.inbox / REJECTED
        self.poll_s = poll_s
        self.settle_s = settle_s
        self.retry_s = retry_s
        self.retention_every_s = retention_every_s
        self._seen: dict[str, tuple[int, int]] = {}
        self._retry_at: dict[str, float] = {}

    def _folders(self) -> None:
        for folder in (self.inbox, self.processing, self.rejected):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- start-up ------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Move files a crash left in `.processing/` back into the inbox, and reap the vault."""
        self._folders()
        self.service.recover()
        moved = []
        for path in sorted(self.processing.iterdir()):
            if not path.is_file():
                continue
            target = _free_name(self.inbox, path.name)
            os.rename(path, target)
            moved.append(target.name)
        if moved:
            fsync_dir(self.processing)
            fsync_dir(self.inbox)
            log_event(log, "inbox.recovered", files=len(moved))
        return moved

    # -- polling -------------------------------------------------------------------------------
    def settled(self, now: float | None = None) -> list[Path]:
        """Files whose size and mtime did not change since the last poll and are older than settle_s."""
        now = time.time() if now is None else now
        current: dict[str, tuple[int, int]] = {}
        ready = []
        for entry in os.scandir(self.inbox):
            name = entry.name
            if name.startswith(".") or name.endswith(_IGNORED_SUFFIXES) or not entry.is_file(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
            current[name] = (st.st_size, st.st_mtime_ns)
            if self._seen.get(name) == current[name] and now - st.st_mtime_ns / 1e9 >= self.settle_s \
                    and self._retry_at.get(name, 0.0) <= now:
                ready.append(Path(entry.path))
        self._seen = current
        return sorted(ready)

    def poll_once(self) -> list[Outcome]:
        self._folders()
        return [self.process(path) for path in self.settled()]

    async def run(self, stop: asyncio.Event) -> None:
        """The daemon's task: recover, then poll until `stop`; also sweeps retention."""
        await asyncio.to_thread(self.recover)
        next_sweep = 0.0
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.poll_once)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.retention_every_s
                    expired = await asyncio.to_thread(self.service.vault.expire)
                    if expired:
                        log_event(log, "retention.expired", versions=[v.reference for v in expired])
            except Exception as exc:  # the watcher must outlive any one bad poll
                log_event(log, "inbox.poll_failed", level=logging.ERROR, error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.poll_s)

    # -- one file ------------------------------------------------------------------------------
    def process(self, path: Path) -> Outcome:
        name = path.name
        sidecar_path = path.with_name(name + SIDECAR)
        taken = self.processing / name
        taken_sidecar = self.processing / (name + SIDECAR)
        os.rename(path, taken)
        if sidecar_path.exists():
            os.rename(sidecar_path, taken_sidecar)
        fsync_dir(self.processing)
        fsync_dir(self.inbox)
        self._seen.pop(name, None)
        dataset = ""
        try:
            sidecar = None
            if taken_sidecar.exists():
                try:
                    sidecar = json.loads(taken_sidecar.read_text(encoding="utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise InvalidRequest(f"the sidecar {name}{SIDECAR} is not valid JSON: {exc}",
                                         code="invalid_sidecar") from None
                if not isinstance(sidecar, dict):
                    raise InvalidRequest(f"the sidecar {name}{SIDECAR} must be a JSON object", code="invalid_sidecar")
            dataset, fmt, columns = dataset_for(name, sidecar)
            request = IngestRequest(dataset=dataset, source="inbox", source_name=name, format=fmt, columns=columns,
                                    sealed=True, actor="inbox")
            with taken.open("rb") as src:
                result = self.service.ingest(src, request)
        except (InvalidRequest, PayloadTooLarge) as err:
            return self._reject(taken, taken_sidecar, name, dataset, err)
        except Exception as exc:
            # Not the file's fault (master key, disk, catalog): put it back and try again later.
            self._put_back(taken, taken_sidecar, name)
            self._retry_at[name] = time.time() + self.retry_s
            code = exc.code if isinstance(exc, GarrisonError) else type(exc).__name__
            log_event(log, "inbox.retry_later", level=logging.ERROR, file=name, code=code, error=str(exc)[:300])
            return Outcome(name, "retry", dataset, code=code, message=str(exc)[:300])
        taken.unlink()
        taken_sidecar.unlink(missing_ok=True)
        fsync_dir(self.processing)
        self._retry_at.pop(name, None)
        status = "duplicate" if result.duplicate else "ingested"
        log_event(log, f"inbox.{status}", file=name, dataset=dataset, version=result.version.version,
                  records=result.version.record_count)
        return Outcome(name, status, dataset, result.version.version)

    def _put_back(self, taken: Path, taken_sidecar: Path, name: str) -> None:
        target = _free_name(self.inbox, name)
        if taken_sidecar.exists():
            os.rename(taken_sidecar, target.with_name(target.name + SIDECAR))
        os.rename(taken, target)
        fsync_dir(self.inbox)

    def _reject(self, taken: Path, taken_sidecar: Path, name: str, dataset: str, err: GarrisonError) -> Outcome:
        target = _free_name(self.rejected, name)
        reason = {"file": target.name, "received_as": name, "dataset": dataset, "code": err.code,
                  "message": err.message, "rejected_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  **({"details": err.details} if err.details else {})}
        _write_atomic(target.with_name(target.name + REASON),
                      json.dumps(reason, indent=2, sort_keys=True, default=str).encode() + b"\n")
        if taken_sidecar.exists():
            os.rename(taken_sidecar, target.with_name(target.name + SIDECAR))
        os.rename(taken, target)
        fsync_dir(self.rejected)
        fsync_dir(self.processing)
        self._retry_at.pop(name, None)
        log_event(log, "inbox.rejected", level=logging.WARNING, file=name, code=err.code, error=err.message[:300])
        return Outcome(name, "rejected", dataset, code=err.code, message=err.message)
