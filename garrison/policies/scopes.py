"""Scopes and roles as data: a role is a named set of scopes.

A scope is an action family (Datasette's named actions): `infer` runs models,
`ingest` brings data in, `train` fine-tunes, `export` converts and downloads,
`read` looks at the catalog, `admin` manages keys and policy. Adding a role is one row.
"""

from __future__ import annotations

from types import MappingProxyType

SCOPES: tuple[str, ...] = ("admin", "ingest", "train", "export", "infer", "read")

ROLES: MappingProxyType[str, frozenset[str]] = MappingProxyType({
    "admin": frozenset(SCOPES),
    "operator": frozenset({"ingest", "train", "export", "infer", "read"}),
    "train": frozenset({"train", "read"}),
    "ingest": frozenset({"ingest", "read"}),
    "export": frozenset({"export", "read"}),
    "infer": frozenset({"infer"}),
    "read": frozenset({"read"}),
})

ROLE_DESCRIPTIONS: MappingProxyType[str, str] = MappingProxyType({
    "admin": "everything, including keys and policy",
    "operator": "every data and model operation, but not keys or policy",
    "train": "start and watch fine-tuning jobs; read the catalog",
    "ingest": "deliver datasets; read the catalog",
    "export": "convert, quantize and download artifacts; read the catalog",
    "infer": "call the OpenAI-compatible inference routes only",
    "read": "read the catalog, jobs and metrics",
})


def scopes_for(role: str) -> frozenset[str]:
    return ROLES.get(role, frozenset())
