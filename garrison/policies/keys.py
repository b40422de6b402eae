"""API keys: made once, shown once, stored only as a hash.

A key is `grs_` followed by 256 random bits (base64url). The catalog keeps its SHA-256:
a key is a random secret, not a password, so a slow hash adds nothing, and a fast one
lets every request be checked without a cache of secrets in memory.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from garrison.errors import AuthenticationError, InvalidRequest, NotFound, PermissionDenied
from garrison.policies.audit import append_audit
from garrison.policies.scopes import ROLES, scopes_for
from garrison.store.catalog import Catalog

KEY_PREFIX = "grs_"
_KEY_BYTES = 32
_LAST_USED_EVERY_S = 60.0
_GRANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_DURATION = re.compile(r"^(\d+)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


LOCAL_ACTOR = "local"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id, role, scopes and grants (None means every one)."""

    key_id: str
    role: str
    scopes: frozenset[str]
    models: frozenset[str] | None
    datasets: frozenset[str] | None

    @property
    def actor(self) -> str:
        """How the audit trail and job rows name it: `key:ID`, or `local` for the machine's operator."""
        return self.key_id if self.key_id.partition(":")[0] == LOCAL_ACTOR else f"key:{self.key_id}"


# Commands run on the machine by someone who can read the state folder and the master key.
LOCAL_ADMIN = Principal(LOCAL_ACTOR, "admin", scopes_for("admin"), None, None)


def local_operator() -> Principal:
    """The machine's operator running a command, named in the audit trail by their uid (`local:UID`)."""
    return Principal(f"{LOCAL_ACTOR}:{os.getuid()}", "admin", scopes_for("admin"), None, None)


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    display_prefix: str
    role: str
    models: list[str] | None
    datasets: list[str] | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "garrison.key", "name": self.name,
            "display_prefix": self.display_prefix, "role": self.role,
            "scopes": sorted(scopes_for(self.role)), "models": self.models,
            "datasets": self.datasets, "created_at": int(self.created_at),
            "expires_at": int(self.expires_at) if self.expires_at else None,
            "revoked_at": int(self.revoked_at) if self.revoked_at else None,
            "last_used_at": int(self.last_used_at) if self.last_used_at else None,
            "status": self.status(),
        }

    def status(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if self.revoked_at:
            return "revoked"
        if self.expires_at and self.expires_at <= now:
            return "expired"
        return "active"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def parse_expiry(text: str | None, now: float | None = None) -> float | None:
    """`30d`, `12h`, `90m`, or an ISO-8601 date/time; None or empty means never."""
    if text is None or not str(text).strip():
        return None
    now = time.time() if now is None else now
    raw = str(text).strip().lower()
    match = _DURATION.match(raw)
    if match:
        seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
        if seconds <= 0:
            raise InvalidRequest("expiry must be in the future", param="expires", code="invalid_expiry")
        return now + seconds
    try:
        moment = datetime.fromisoformat(str(text).strip())
    except ValueError:
        raise InvalidRequest(f"cannot read expiry {text!r}: use 30d, 12h, 90m or an ISO date",
                             param="expires", code="invalid_expiry") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    stamp = moment.timestamp()
    if stamp <= now:
        raise InvalidRequest("expiry must be in the future", param="expires", code="invalid_expiry")
    return stamp


def _grants(values: list[str] | None, what: str) -> list[str] | None:
    if values is None:
        return None
    cleaned = sorted({v.strip() for v in values if v.strip()})
    for value in cleaned:
        if value != "*" and not _GRANT_NAME.match(value):
            raise InvalidRequest(f"invalid {what} name {value!r} in grant", param=what,
                                 code="invalid_grant")
    if "*" in cleaned:
        return None
    return cleaned


def _principal(record: KeyRecord) -> Principal:
    return Principal(
        key_id=record.id, role=record.role, scopes=scopes_for(record.role),
        models=frozenset(record.models) if record.models is not None else None,
        datasets=frozenset(record.datasets) if record.datasets is not None else None,
    )


def _record(row: Any) -> KeyRecord:
    return KeyRecord(
        id=row["id"], name=row["name"], display_prefix=row["display_prefix"], role=row["role"],
        models=json.loads(row["models"]) if row["models"] is not None else None,
        datasets=json.loads(row["datasets"]) if row["datasets"] is not None else None,
        created_at=row["created_at"], expires_at=row["expires_at"], revoked_at=row["revoked_at"],
        last_used_at=row["last_used_at"],
    )


class KeyStore:
    """Create, list, revoke and check API keys in the catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._last_used_written: dict[str, float] = {}

    def create(self, role: str, *, name: str = "", models: list[str] | None = None,
               datasets: list[str] | None = None, expires: str | None = None,
               actor: str = "local") -> tuple[KeyRecord, str]:
        """Make a key; the plaintext is returned once and never stored."""
        if role not in ROLES:
            raise InvalidRequest(f"unknown role {role!r}; roles: {', '.join(ROLES)}", param="role",
                                 code="invalid_role")
        if len(name) > 200:
            raise InvalidRequest("key name longer than 200 characters", param="name")
        expires_at = parse_expiry(expires)
        model_grants = _grants(models, "models")
        dataset_grants = _grants(datasets, "datasets")
        secret = KEY_PREFIX + secrets.token_urlsafe(_KEY_BYTES)
        key_id = "key_" + secrets.token_hex(8)
        now = time.time()
        row = {
            "id": key_id, "name": name, "hash": hash_key(secret),
            "display_prefix": secret[:10] + "...", "role": role,
            "models": json.dumps(model_grants) if model_grants is not None else None,
            "datasets": json.dumps(dataset_grants) if dataset_grants is not None else None,
            "created_at": now, "expires_at": expires_at, "revoked_at": None, "last_used_at": None,
        }
        with self.catalog.write() as conn:
            conn.execute(
                "INSERT INTO api_keys (id, name, hash, display_prefix, role, models, datasets,"
                " created_at, expires_at, revoked_at, last_used_at) VALUES (:id, :name, :hash,"
                " :display_prefix, :role, :models, :datasets, :created_at, :expires_at, :revoked_at,"
                " :last_used_at)", row)
            append_audit(conn, actor=actor, action="keys.create", resource=key_id, outcome="ok",
                         detail={"role": role, "models": model_grants, "datasets": dataset_grants})
        return self.get(key_id), secret

    def grant_made_models(self, key_id: str, names: list[str], *, job: str) -> list[str]:
        """Add models a job made for this key to its grants (a key with every model granted needs none): a key
        may use, export and evaluate what it fine-tuned or pruned, and no other restricted key gains it.
        Returns the names added; audited as `keys.grant`."""
        with self.catalog.write() as conn:
            row = conn.execute("SELECT models FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            if row is None or row["models"] is None:
                return []
            current = list(json.loads(row["models"]))
            added = [n for n in dict.fromkeys(names) if n not in current]
            if added:
                conn.execute("UPDATE api_keys SET models = ? WHERE id = ?", (json.dumps(current + added), key_id))
                append_audit(conn, actor=f"key:{key_id}", action="keys.grant", resource=key_id, outcome="ok",
                             detail={"models": added, "job": job, "reason": "made by the key's job"})
        return added

    def get(self, key_id: str) -> KeyRecord:
        row = self.catalog.query_one("SELECT * FROM api_keys WHERE id = ?", (key_id,))
        if row is None:
            raise NotFound(f"no key with id {key_id!r}", code="key_not_found", param="key_id")
        return _record(row)

    def list(self, *, include_revoked: bool = True) -> list[KeyRecord]:
        rows = self.catalog.query("SELECT * FROM api_keys ORDER BY created_at")
        records = [_record(r) for r in rows]
        return [r for r in records if include_revoked or r.status() == "active"]

    def revoke(self, key_id: str, *, actor: str = "local") -> KeyRecord:
        with self.catalog.write() as conn:
            row = conn.execute("SELECT revoked_at FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            if row is None:
                raise NotFound(f"no key with id {key_id!r}", code="key_not_found", param="key_id")
            if row["revoked_at"] is None:
                conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (time.time(), key_id))
                append_audit(conn, actor=actor, action="keys.revoke", resource=key_id, outcome="ok")
        return self.get(key_id)

    def authenticate(self, presented: str | None) -> Principal:
        """Check a presented key; every failure is the same 401 to the caller."""
        if not presented:
            raise AuthenticationError(
                "You didn't provide an API key. Pass it as 'Authorization: Bearer grs_...'",
                code="missing_api_key")
        digest = hash_key(presented)
        row = self.catalog.query_one("SELECT * FROM api_keys WHERE hash = ?", (digest,))
        # Compare in constant time even on a miss, so timing says nothing about the store.
        stored = row["hash"] if row is not None else "0" * 64
        if not hmac.compare_digest(stored, digest) or row is None:
            raise AuthenticationError("Incorrect API key provided.", code="invalid_api_key")
        record = _record(row)
        status = record.status()
        if status != "active":
            raise AuthenticationError(f"This API key is {status}.", code=f"api_key_{status}")
        self._touch(record.id)
        return _principal(record)

    def principal(self, key_id: str) -> Principal:
        """The principal of a key as it stands now, for work done later in its name (a job's worker):
        a key revoked or expired since it queued the job no longer acts."""
        record = self.get(key_id)
        status = record.status()
        if status != "active":
            raise PermissionDenied(f"the key {key_id} that submitted this work is {status}",
                                   code="principal_inactive", details={"key_id": key_id, "status": status})
        return _principal(record)

    def _touch(self, key_id: str) -> None:
        # A durable write per request would cost an fsync each; once a minute is plenty.
        now = time.time()
        if now - self._last_used_written.get(key_id, 0.0) < _LAST_USED_EVERY_S:
            return
        self._last_used_written[key_id] = now
        # Never wait for another writer here (authentication must answer in milliseconds): a busy catalog
        # skips this write, and a later request records the use.
        if not self.catalog.try_write(
                lambda conn: conn.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (now, key_id))):
            self._last_used_written.pop(key_id, None)
