"""Stopping a loaded model's runner, for the API (`DELETE /v1/garrison/runners/{model}`) and the console alike.

Unloading is an operator's act on shared capacity (every key using the model loses its warm
runner), so it needs the admin scope and a grant on the model, and it is audited with who did it
and from where: one place, so the two faces cannot disagree on either.
"""

from __future__ import annotations

import asyncio

from garrison.errors import NotFound
from garrison.models.names import check_model_id
from garrison.policies.access import authorize
from garrison.policies.audit import append_audit
from garrison.policies.keys import Principal
from garrison.serving.manager import ModelManager
from garrison.store.catalog import Catalog


async def stop_runner(manager: ModelManager, catalog: Catalog, who: Principal, name: str, *, via: str,
                      missing_ok: bool = False) -> bool:
    """End `name`'s runner now (its memory returns to the OS; a failed model may load again). Not loaded and
    not failed: NotFound, unless `missing_ok`."""
    name = check_model_id(name, param="model")
    authorize(who, "admin", ("model", name))
    was_known = name in manager.loaded or name in manager.health
    stopped = await manager.unload(name, reason=f"stopped by {who.actor} ({via})")
    if not (stopped or was_known):
        if missing_ok:
            return False
        raise NotFound(f"model {name!r} is not loaded", code="model_not_loaded", param="model")
    await asyncio.to_thread(_audit, catalog, who, name, stopped, via)
    return stopped


def _audit(catalog: Catalog, who: Principal, name: str, stopped: bool, via: str) -> None:
    with catalog.write() as conn:
        append_audit(conn, actor=who.actor, action="runners.stop", resource=f"model:{name}",
                     detail={"stopped": stopped, "via": via})
