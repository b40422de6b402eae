"""Datasets and uploaded files as operations: ingest, list, read metadata, delete (crypto-shredding).

Each takes the principal and checks the scope and the dataset grant before anything is read or
changed; a file is authorized through the dataset it became. Records themselves never leave
through an operation: only metadata and ingestion reports do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO

from garrison.ingest.datasets import DatasetStore, FileRecord, VersionRecord, validate_name
from garrison.ingest.pipeline import IngestPolicy, IngestRequest, IngestResult, IngestService
from garrison.ingest.vault import Vault
from garrison.policies.access import authorize
from garrison.policies.keys import Principal
from garrison.store.catalog import Catalog


def _dataset(who: Principal, scope: str, name: str) -> str:
    name = validate_name(name)
    authorize(who, scope, ("dataset", name))
    return name


def ingest(service: IngestService, who: Principal, src: BinaryIO | Any, request: IngestRequest, *,
           policy: IngestPolicy | None = None, progress: Callable[[int], None] | None = None) -> IngestResult:
    """A delivery into `request.dataset`, recorded under the principal's name (`policy`: a one-off policy
    file the operator names on the command line, else the appliance's)."""
    _dataset(who, "ingest", request.dataset)
    request.actor = who.actor
    return service.ingest(src, request, policy=policy, progress=progress)


def list_datasets(catalog: Catalog, who: Principal) -> list[dict[str, Any]]:
    authorize(who, "read")
    return DatasetStore(catalog).list_datasets(who.datasets)


def get_dataset(catalog: Catalog, who: Principal, name: str) -> dict[str, Any]:
    return DatasetStore(catalog).dataset(_dataset(who, "read", name))


def get_version(catalog: Catalog, who: Principal, name: str, number: int) -> VersionRecord:
    return DatasetStore(catalog).version(_dataset(who, "read", name), number, ready=False)


def delete_dataset(vault: Vault, who: Principal, name: str) -> list[VersionRecord]:
    return vault.delete_dataset(_dataset(who, "ingest", name), actor=who.actor)


def delete_version(vault: Vault, who: Principal, name: str, number: int) -> VersionRecord:
    return vault.delete_version(_dataset(who, "ingest", name), number, actor=who.actor)


def list_files(catalog: Catalog, who: Principal, purpose: str | None = None) -> list[FileRecord]:
    authorize(who, "read")
    return DatasetStore(catalog).files(who.datasets, purpose)


def get_file(catalog: Catalog, who: Principal, file_id: str, *, scope: str = "read") -> FileRecord:
    record = DatasetStore(catalog).file(file_id)
    authorize(who, scope, ("dataset", record.dataset or record.id))
    return record


def delete_file(vault: Vault, who: Principal, file_id: str) -> FileRecord:
    """The file's dataset version is shredded; a dataset that exists only for this file goes with it."""
    record = get_file(vault.catalog, who, file_id, scope="ingest")
    if record.dataset and record.version is not None:
        if record.dataset == record.id:
            vault.delete_dataset(record.dataset, actor=who.actor)
        else:
            vault.delete_version(record.dataset, record.version, actor=who.actor)
    return record
