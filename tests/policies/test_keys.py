"""Keys: shown once, stored as a hash, revocable, expiring, scoped and granted."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest
from conftest import run_cli

from garrison.errors import AuthenticationError, InvalidRequest, PermissionDenied
from garrison.policies.access import authorize
from garrison.policies.audit import verify_trail
from garrison.policies.audit_keys import AuditKeys
from garrison.policies.keys import KeyStore, parse_expiry
from garrison.policies.scopes import ROLES, SCOPES
from garrison.store.catalog import Catalog


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(Catalog(tmp_path / "catalog.db"))


def test_key_has_prefix_and_256_random_bits_and_only_its_hash_is_stored(store: KeyStore,
                                                                        tmp_path: Path) -> None:
    record, secret = store.create("admin", name="ops")
    assert secret.startswith("grs_")
    raw = base64.urlsafe_b64decode(secret[4:] + "=" * (-len(secret[4:]) % 4))
    assert len(raw) * 8 >= 256
    store.catalog.close()
    for path in tmp_path.iterdir():
        assert secret.encode() not in path.read_bytes()
        assert secret[4:20].encode() not in path.read_bytes()
    assert record.display_prefix.startswith(secret[:8])


def test_authenticate_revoke_and_expire(store: KeyStore) -> None:
    record, secret = store.create("infer")
    principal = store.authenticate(secret)
    assert principal.key_id == record.id and principal.scopes == ROLES["infer"]
    with pytest.raises(AuthenticationError) as missing:
        store.authenticate(None)
    assert missing.value.code == "missing_api_key"
    with pytest.raises(AuthenticationError):
        store.authenticate(secret + "x")
    store.revoke(record.id)
    with pytest.raises(AuthenticationError) as revoked:
        store.authenticate(secret)
    assert revoked.value.code == "api_key_revoked"
    _, short = store.create("read", expires="1s")
    time.sleep(1.2)
    with pytest.raises(AuthenticationError) as expired:
        store.authenticate(short)
    assert expired.value.code == "api_key_expired"


def test_expiry_parsing() -> None:
    now = 1_000_000.0
    assert parse_expiry("30d", now) == now + 30 * 86400
    assert parse_expiry("2h", now) == now + 7200
    assert parse_expiry(None) is None
    with pytest.raises(InvalidRequest):
        parse_expiry("tomorrowish")
    with pytest.raises(InvalidRequest):
        parse_expiry("2001-01-01")


def test_scopes_and_grants(store: KeyStore) -> None:
    _, secret = store.create("operator", models=["support-bot"], datasets=["tickets"])
    who = store.authenticate(secret)
    authorize(who, "infer", ("model", "support-bot"))
    authorize(who, "infer", ("model", "support-bot:q4_k_m"))
    with pytest.raises(PermissionDenied) as not_granted:
        authorize(who, "infer", ("model", "other"))
    assert not_granted.value.code == "resource_not_granted"
    with pytest.raises(PermissionDenied) as no_scope:
        authorize(who, "admin")
    assert no_scope.value.code == "insufficient_scope"
    assert ROLES["admin"] == frozenset(SCOPES)


def test_bad_role_and_grant_are_refused(store: KeyStore) -> None:
    with pytest.raises(InvalidRequest):
        store.create("root")
    with pytest.raises(InvalidRequest):
        store.create("read", models=["../etc"])


def test_key_operations_are_audited_in_a_verifiable_chain(store: KeyStore) -> None:
    record, _ = store.create("read")
    store.revoke(record.id)
    rows = store.catalog.query("SELECT * FROM audit ORDER BY seq")
    assert [r["action"] for r in rows] == ["keys.create", "keys.revoke"]
    keys = AuditKeys.from_environment().verifying()
    assert verify_trail(store.catalog, keys).intact
    with store.catalog.write() as conn:
        conn.execute("UPDATE audit SET actor = 'someone-else' WHERE seq = 1")
    broken = verify_trail(store.catalog, keys).broken
    assert broken is not None and (broken.seq, broken.kind) == (1, "edited")


def test_keys_cli(state_dir: Path) -> None:
    secret = run_cli(state_dir, "keys", "create", "--role", "train", "--name", "ci",
                     "--expires", "7d").stdout.strip()
    assert secret.startswith("grs_")
    listing = run_cli(state_dir, "keys", "list").stdout
    assert "train" in listing and "ci" in listing and secret not in listing
    key_id = listing.splitlines()[1].split()[0]
    assert "revoked" in run_cli(state_dir, "keys", "revoke", key_id).stdout
    bad = run_cli(state_dir, "keys", "revoke", "key_nope", check=False)
    assert bad.returncode == 4 and "key_not_found" in bad.stderr
