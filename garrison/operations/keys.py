"""API keys as operations: create, list, revoke, for the CLI and the API alike.

A key can hand out no more than it holds: an admin key restricted to some models or datasets
creates only keys restricted to a subset of them, and sees and revokes only such keys, so a
scoped administrator cannot mint an unrestricted key for itself.
"""

from __future__ import annotations

from garrison.errors import NotFound, PermissionDenied
from garrison.policies.access import authorize
from garrison.policies.keys import KeyRecord, KeyStore, Principal


def _within(held: frozenset[str] | None, given: list[str] | None) -> bool:
    return held is None or (given is not None and set(given) <= held)


def _covers(who: Principal, record: KeyRecord) -> bool:
    return _within(who.models, record.models) and _within(who.datasets, record.datasets)


def create_key(keys: KeyStore, who: Principal, role: str, *, name: str = "", models: list[str] | None = None,
               datasets: list[str] | None = None, expires: str | None = None) -> tuple[KeyRecord, str]:
    authorize(who, "admin")
    for kind, held, given in (("models", who.models, models), ("datasets", who.datasets, datasets)):
        if not _within(held, given):
            raise PermissionDenied(f"this key may grant only {kind} it holds itself: name them in '{kind}' "
                                   f"({', '.join(sorted(held or ()))})", code="resource_not_granted", param=kind)
    return keys.create(role, name=name, models=models, datasets=datasets, expires=expires, actor=who.actor)


def list_keys(keys: KeyStore, who: Principal) -> list[KeyRecord]:
    authorize(who, "admin")
    return [record for record in keys.list() if _covers(who, record)]


def revoke_key(keys: KeyStore, who: Principal, key_id: str) -> KeyRecord:
    authorize(who, "admin")
    if not _covers(who, keys.get(key_id)):
        raise NotFound(f"no key with id {key_id!r}", code="key_not_found", param="key_id")
    return keys.revoke(key_id, actor=who.actor)
