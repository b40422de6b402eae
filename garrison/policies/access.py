"""The one policy decision: may this principal do this action on this resource?

The HTTP middleware, the route handlers (for per-model and per-dataset grants) and the
job runner all call `authorize`, so a rule cannot live in one face only.
"""

from __future__ import annotations

from garrison.errors import PermissionDenied
from garrison.policies.keys import Principal

RESOURCE_KINDS = ("model", "dataset")


def granted(principal: Principal, resource: tuple[str, str]) -> bool:
    """Grants only (no scope): may this key reach this model or dataset at all?"""
    kind, name = resource
    grants = principal.models if kind == "model" else principal.datasets if kind == "dataset" else None
    if grants is None:
        return True
    # A grant on a model covers its published artifacts (`NAME:q4_k_m`).
    base = name.split(":", 1)[0]
    return name in grants or base in grants


def allowed(principal: Principal, scope: str, resource: tuple[str, str] | None = None) -> bool:
    if scope not in principal.scopes:
        return False
    return resource is None or granted(principal, resource)


def authorize(principal: Principal, scope: str, resource: tuple[str, str] | None = None) -> None:
    if scope not in principal.scopes:
        raise PermissionDenied(
            f"This key (role {principal.role!r}) lacks the {scope!r} scope needed here.",
            code="insufficient_scope", details={"required_scope": scope})
    if not allowed(principal, scope, resource):
        assert resource is not None
        raise PermissionDenied(f"This key has no grant for {resource[0]} {resource[1]!r}.",
                               code="resource_not_granted",
                               details={"resource": f"{resource[0]}:{resource[1]}"})
