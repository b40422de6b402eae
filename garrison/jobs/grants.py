"""What a job touches, and whether its principal may touch it.

Every parameter that names a model or a dataset, directly (`model`, `training_file`) or inside
a value (`imatrix: "dataset:NAME"`, a `file-...` id, an adapter's base), is one row of
`RESOURCE_PARAMS`. The same resolution runs when the job is submitted (403 before anything is
queued) and in the worker before the job opens anything (a key revoked, or a grant narrowed,
since submission stops the job), so there is one list of what a job reaches, not one per face.

Resolution reads metadata only (file rows, model rows): nothing is decrypted to decide.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from garrison.errors import InvalidRequest, NotFound, PermissionDenied
from garrison.ingest.datasets import resolve_reference
from garrison.models.names import check_model_id
from garrison.models.registry import ModelRegistry
from garrison.policies.access import authorize, granted
from garrison.policies.keys import LOCAL_ADMIN, KeyStore, Principal
from garrison.store.catalog import Catalog

Resource = tuple[str, str]  # ("model" | "dataset", name)
IMATRIX_DATASET = "dataset:"
IMATRIX_BUILTIN = "builtin"


@dataclass(frozen=True)
class ResourceParam:
    """A job parameter that names resources; `resolve` turns its value into them (may be none)."""

    kind: str  # the job kind
    param: str
    resolve: Callable[[Catalog, ModelRegistry, str, str], list[Resource]]
    doc: str


def _model(catalog: Catalog, registry: ModelRegistry, value: str, param: str) -> list[Resource]:
    """A model, and for an adapter its base too: exporting or serving an adapter reads the base's weights."""
    if not value:
        return []
    name = check_model_id(value, param=param)
    found: list[Resource] = [("model", name)]
    if registry.exists(name):
        base = registry.get(name).base
        if base:
            found.append(("model", base))
    return found


def _dataset(catalog: Catalog, registry: ModelRegistry, value: str, param: str) -> list[Resource]:
    """`NAME`, `NAME:N` or an uploaded file's id (resolved to the dataset it became)."""
    if not value:
        return []
    name, _version = resolve_reference(catalog, value, param)
    return [("dataset", name)]


def _models(catalog: Catalog, registry: ModelRegistry, value: str, param: str) -> list[Resource]:
    """A comma-separated list of models (an evaluation's), each as `_model` resolves it."""
    found: list[Resource] = []
    for name in value.split(","):
        found += [r for r in _model(catalog, registry, name.strip(), param) if r not in found]
    return found


def _calibration(catalog: Catalog, registry: ModelRegistry, value: str, param: str) -> list[Resource]:
    return [] if value == IMATRIX_BUILTIN else _dataset(catalog, registry, value, param)


def _imatrix(catalog: Catalog, registry: ModelRegistry, value: str, param: str) -> list[Resource]:
    if value.startswith(IMATRIX_DATASET):
        return _dataset(catalog, registry, value[len(IMATRIX_DATASET):], param)
    return []


RESOURCE_PARAMS: tuple[ResourceParam, ...] = (
    ResourceParam("export", "model", _model, "the model exported (and an adapter's base)"),
    ResourceParam("export", "imatrix", _imatrix, "dataset:NAME[:N] reads an ingested dataset"),
    ResourceParam("export", "base_gguf", _model, "the GGUF model an adapter is served on"),
    ResourceParam("finetune", "model", _model, "the base model"),
    ResourceParam("finetune", "training_file", _dataset, "dataset NAME[:N] or file id"),
    ResourceParam("finetune", "validation_file", _dataset, "dataset NAME[:N] or file id"),
    ResourceParam("eval", "models", _models, "the models compared (and adapters' bases)"),
    ResourceParam("eval", "dataset", _dataset, "the dataset whose held-out records are scored"),
    ResourceParam("prune", "model", _model, "the model pruned"),
    ResourceParam("prune", "calibration", _calibration, "dataset NAME[:N] whose training split is measured"),
    ResourceParam("prune", "eval", _dataset, "the dataset the result is evaluated on"),
    ResourceParam("distill", "teacher", _model, "the teacher"),
    ResourceParam("distill", "student", _model, "the student"),
    ResourceParam("distill", "dataset", _dataset, "the dataset learned from and evaluated on"),
)


def job_resources(catalog: Catalog, registry: ModelRegistry, kind: str, params: dict[str, Any]) -> list[Resource]:
    """Every model and dataset a job of `kind` with `params` reaches, in parameter order, without repeats."""
    found: list[Resource] = []
    for row in RESOURCE_PARAMS:
        if row.kind != kind:
            continue
        value = params.get(row.param)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise InvalidRequest(f"parameter {row.param!r} must be a string", param=row.param)
        for resource in row.resolve(catalog, registry, value, row.param):
            if resource not in found:
                found.append(resource)
    return found


def authorize_resources(who: Principal, scope: str, resources: list[Resource]) -> None:
    for resource in resources:
        authorize(who, scope, resource)


def may_see(who: Principal, resources: list[Resource]) -> bool:
    """A job is visible to a key granted every model and dataset it touches (its parameters name them)."""
    return all(granted(who, resource) for resource in resources)


def principal_for(catalog: Catalog, actor: str | None) -> Principal:
    """Who a job acts for: the key that submitted it (as that key stands now), or the local operator
    (CLI commands run by someone who can read the state folder and the master key)."""
    if actor and actor.startswith("key:"):
        try:
            return KeyStore(catalog).principal(actor[len("key:"):])
        except NotFound:
            raise PermissionDenied(f"the key that submitted this job ({actor}) no longer exists",
                                   code="principal_inactive") from None
    return LOCAL_ADMIN


def authorize_job(catalog: Catalog, registry: ModelRegistry, who: Principal, kind: str, scope: str,
                  params: dict[str, Any]) -> list[Resource]:
    """The kind's scope and a grant for every resource its parameters reach; the resources, for the record."""
    authorize(who, scope)
    resources = job_resources(catalog, registry, kind, params)
    authorize_resources(who, scope, resources)
    return resources


KINDS_WITH_RESOURCES = frozenset(row.kind for row in RESOURCE_PARAMS)
