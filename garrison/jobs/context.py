"""What a job kind sees of the runner: progress, logs, checkpoints and stop requests.

Kinds call `ctx.check()` between units of work; it raises `StopRequested` when the
job was cancelled or the worker must shut down, after which the worker records the
right state. Progress writes are throttled so a tight loop cannot flood the catalog.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from garrison.config import Config
from garrison.crypto.identity import ApplianceIdentity
from garrison.jobs.store import Job, JobStore
from garrison.paths import StateLayout
from garrison.policies.keys import Principal

if TYPE_CHECKING:  # the worker imports what a kind needs, when it needs it
    from garrison.ingest.vault import Vault, VersionReader
    from garrison.models.registry import ModelRecord, ModelRegistry
from garrison.store.master_key import MasterKeySource

_PROGRESS_EVERY_S = 0.2


class StopRequested(Exception):
    """Raised by `check()`; `cancelled` tells a user's cancel from a shutdown."""

    def __init__(self, cancelled: bool) -> None:
        super().__init__("cancelled" if cancelled else "shutdown")
        self.cancelled = cancelled


class JobContext:
    def __init__(self, store: JobStore, job: Job, token: str) -> None:
        self.store = store
        self.job = job
        self.token = token
        self.params = job.params
        self.attempt = job.attempts
        self.cancel_event = threading.Event()
        self.shutdown_event = threading.Event()
        self._last_progress = 0.0
        self._identity: ApplianceIdentity | None = None
        self._principal: Principal | None = None

    @property
    def principal(self) -> Principal:
        """Who the job acts for, as that key stands now (looked up once per attempt)."""
        if self._principal is None:
            from garrison.jobs.grants import principal_for

            self._principal = principal_for(self.store.catalog, self.job.created_by)
        return self._principal

    def authorize(self, resource: tuple[str, str]) -> None:
        """Re-check a grant just before the job opens the resource (the worker's own check)."""
        from garrison.jobs.kinds import job_kind
        from garrison.policies.access import authorize

        authorize(self.principal, job_kind(self.job.kind).scope, resource)

    def granted(self, resource: tuple[str, str]) -> bool:
        """Whether the job's principal may open `resource` (for work that is skipped, not refused, without it)."""
        from garrison.jobs.kinds import job_kind
        from garrison.policies.access import allowed

        return allowed(self.principal, job_kind(self.job.kind).scope, resource)

    def open_dataset(self, vault: Vault, ref: str, param: str) -> tuple[str, VersionReader]:
        """A dataset version named by `NAME`, `NAME:N` or a file id, opened only if the principal is granted it."""
        from garrison.ingest.datasets import resolve_reference

        name, _version = resolve_reference(vault.catalog, ref, param)
        self.authorize(("dataset", name))
        return vault.open_reference(ref, param)

    def own(self, name: str) -> None:
        """The model this job just registered becomes the submitting key's: without it a restricted key could
        not export, evaluate or serve its own fine-tune (nor could this job's own evaluation at the end)."""
        from garrison.policies.access import granted
        from garrison.policies.keys import KeyStore

        who = self.principal
        if who.models is None or granted(who, ("model", name)):
            return
        if KeyStore(self.store.catalog).grant_made_models(who.key_id, [name], job=self.job.id):
            self._principal = None  # read again, with the new grant, at the next check

    def open_model(self, registry: ModelRegistry, name: str, param: str = "model") -> ModelRecord:
        """A registry entry, checked against the principal's model grants first."""
        from garrison.models.names import check_model_id

        self.authorize(("model", check_model_id(name, param=param)))
        return registry.get(name)

    @property
    def layout(self) -> StateLayout:
        """The state folder of the catalog this job belongs to (workers share the daemon's)."""
        return StateLayout(self.store.catalog.path.parent)

    def _config(self) -> Config:
        import os

        from garrison.config import load_config

        return load_config(os.environ.get("GARRISON_CONFIG"), overrides={"state_dir": str(self.layout.root)})

    def master_key(self) -> bytes:
        """The master key that opens this state folder's wrapped keys now (credential, key file, or the
        developer key; during a rotation whichever of old and new the catalog records)."""
        from garrison.store.master_key import current_master_key

        return current_master_key(self._config(), self.store.catalog)

    def master_key_source(self) -> MasterKeySource:
        return MasterKeySource(self._config())

    def identity(self) -> ApplianceIdentity:
        """The appliance's keys, from the configuration the worker inherited (env, GARRISON_CONFIG)."""
        from garrison.crypto.identity import load_appliance_identity

        if self._identity is None:
            self._identity = load_appliance_identity(self._config())
        return self._identity

    @property
    def checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint saved by any earlier attempt (resume from here)."""
        return self.job.checkpoint

    def check(self) -> None:
        if self.cancel_event.is_set():
            raise StopRequested(cancelled=True)
        if self.shutdown_event.is_set():
            raise StopRequested(cancelled=False)

    @property
    def stop_requested(self) -> bool:
        return self.cancel_event.is_set() or self.shutdown_event.is_set()

    def progress(self, done: float, total: float | None = None, message: str = "", *,
                 force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < _PROGRESS_EVERY_S and (total is None or done < total):
            return
        self._last_progress = now
        fraction = (done / total) if total else 0.0
        self.store.report_progress(self.job.id, self.token, fraction=fraction, message=message,
                                   done=done, total=total)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        self.store.save_checkpoint(self.job.id, self.token, state)
        self.job = self.store.get(self.job.id)

    def log(self, line: str) -> None:
        self.store.append_log(self.job.id, line)

    def event(self, type_: str, message: str = "", **data: Any) -> None:
        self.store.add_event(self.job.id, type_, message, data=data)
