"""The model registry as operations: list, show, import, remove, for the CLI and the API alike.

A key sees only the models it is granted (an artifact `NAME:VARIANT` through a grant on NAME),
and only an unrestricted admin sees where a model was imported from: a host path says more
about the machine than a scoped key needs to know.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from garrison.errors import InvalidRequest, NotFound
from garrison.models.names import check_model_id, check_name
from garrison.models.registry import ModelRecord, Progress
from garrison.operations.appliance import Appliance
from garrison.policies.access import authorize, granted
from garrison.policies.keys import Principal

HOST_DETAILS = ("source",)  # manifest fields that name paths on this machine


def model_view(who: Principal, record: ModelRecord) -> dict[str, Any]:
    data = record.to_json()
    if "admin" not in who.scopes:
        for key in HOST_DETAILS:
            data.pop(key, None)
    return data


def list_models(app: Appliance, who: Principal) -> list[ModelRecord]:
    authorize(who, "read")
    return [r for r in app.models.list() if granted(who, ("model", r.name))]


def get_model(app: Appliance, who: Principal, name: str, *, scope: str = "read") -> ModelRecord:
    """A model the key is granted; one it is not is "not found", as one that does not exist."""
    name = check_model_id(name)
    authorize(who, scope)
    if not granted(who, ("model", name)):
        raise NotFound(f"model {name!r} not found", code="model_not_found", param="model")
    return app.models.get(name)


def import_model(app: Appliance, who: Principal, path: str, name: str | None = None, *,
                 settings: dict[str, Any] | None = None, base: str | None = None,
                 progress: Progress | None = None) -> ModelRecord:
    """Host paths are the administrator's: the admin scope, and a grant on the name it takes."""
    authorize(who, "admin")
    if not isinstance(path, str) or not path or "\0" in path:
        raise InvalidRequest("'path' (a file or folder on this machine, no NUL) is required", param="path")
    if name is not None:
        check_name(name)
        authorize(who, "admin", ("model", name))
    if base is not None:
        authorize(who, "admin", ("model", check_model_id(base, param="base")))
    return app.models.import_path(Path(path), name, settings=settings or {}, base=base, actor=who.actor,
                                  progress=progress)


def remove_model(app: Appliance, who: Principal, name: str) -> ModelRecord:
    """Callers that serve models unload it first (the daemon's manager)."""
    name = check_model_id(name)
    authorize(who, "admin", ("model", name))
    return app.models.remove(name, actor=who.actor)
