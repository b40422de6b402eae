"""The appliance's own keys: an age X25519 identity (what producers seal to) and an Ed25519 signing key.

Both are made at first start and kept in one file, `identity/keys.enc` in the state folder,
encrypted under a key derived from the master key, so the state folder alone (a backup, a stolen
disk) reveals neither. The master key never lives beside them (see garrison.store.master_key);
rotating it reseals this one small file (`seal_identity`, `install_next_identity`) and nothing else.

File format (version 1): `MAGIC || nonce(12) || AES-256-GCM(key, nonce, JSON, aad)`, where
key = HKDF-SHA256(master key, info "garrison identity v1") and the associated data names the file's
purpose and version, so the ciphertext cannot be replayed as any other Garrison secret.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from garrison.crypto.age import encode_identity, encode_recipient, parse_identity
from garrison.errors import ConfigError, IntegrityError, NotFound
from garrison.paths import StateLayout
from garrison.store.durable import fsync_dir, keep_previous

if TYPE_CHECKING:
    from garrison.config import Config

MAGIC = b"GARRISON-IDENTITY\x00\x01"
KEYS_FILE = "keys.enc"
LOCK_FILE = "keys.lock"
_KDF_INFO = b"garrison identity v1"
_AAD = b"garrison identity v1|identity/keys.enc|x25519+ed25519"
_NONCE = 12
_MASTER_KEY_BYTES = 32


class ApplianceIdentity:
    """The appliance's decrypted keys; secrets never appear in repr or logs."""

    def __init__(self, age_identity: X25519PrivateKey, signing_key: Ed25519PrivateKey, created: float) -> None:
        self._age = age_identity
        self._signing = signing_key
        self.created = created
        self.recipient: str = encode_recipient(age_identity.public_key())
        self.signing_public_key: Ed25519PublicKey = signing_key.public_key()
        self.signing_public_key_hex: str = self.signing_public_key.public_bytes_raw().hex()

    @property
    def age_identity(self) -> X25519PrivateKey:
        """For `garrison.crypto.age.decrypt_stream(src, [identity.age_identity])`."""
        return self._age

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature (64 bytes), e.g. over a model manifest's canonical bytes."""
        return self._signing.sign(data)

    def verify(self, data: bytes, signature: bytes) -> None:
        """Raise IntegrityError `signature_invalid` unless this appliance signed `data`."""
        verify_signature(self.signing_public_key_hex, data, signature)

    def public_json(self) -> dict[str, str]:
        """What may be published: the API's and `garrison identity --json`'s body."""
        return {"recipient": self.recipient, "signing_public_key": self.signing_public_key_hex}

    def __repr__(self) -> str:
        return f"ApplianceIdentity(recipient={self.recipient!r}, signing_public_key={self.signing_public_key_hex!r})"

    def _plaintext(self) -> bytes:
        return json.dumps({
            "version": 1,
            "age_identity": encode_identity(self._age),
            "signing_key": self._signing.private_bytes_raw().hex(),
            "created": self.created,
        }, sort_keys=True).encode()


def verify_signature(public_key_hex: str, data: bytes, signature: bytes) -> None:
    """Check an Ed25519 signature against a published key (hex); IntegrityError `signature_invalid` if not."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex)).verify(signature, data)
    except (InvalidSignature, ValueError):
        raise IntegrityError("signature does not verify with the appliance's signing key",
                             code="signature_invalid") from None


def _file_key(master_key: bytes) -> bytes:
    if not isinstance(master_key, bytes) or len(master_key) != _MASTER_KEY_BYTES:
        raise ConfigError(f"the master key must be {_MASTER_KEY_BYTES} bytes", code="master_key_invalid")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KDF_INFO).derive(master_key)


def _seal(identity: ApplianceIdentity, master_key: bytes) -> bytes:
    nonce = secrets.token_bytes(_NONCE)
    return MAGIC + nonce + AESGCM(_file_key(master_key)).encrypt(nonce, identity._plaintext(), _AAD)


def _open(blob: bytes, master_key: bytes, path: Path) -> ApplianceIdentity:
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + _NONCE + 16:
        raise IntegrityError(f"{path} is not a Garrison identity file (damaged or replaced)",
                             code="identity_unreadable")
    nonce = blob[len(MAGIC):len(MAGIC) + _NONCE]
    try:
        plain = AESGCM(_file_key(master_key)).decrypt(nonce, blob[len(MAGIC) + _NONCE:], _AAD)
    except InvalidTag:
        raise IntegrityError(
            f"the master key does not open this appliance's identity ({path}): wrong master key "
            "(or the file was damaged); restore the master key this state folder was created with",
            code="identity_unreadable") from None
    fields: dict[str, Any] = json.loads(plain)
    if fields.get("version") != 1:
        raise IntegrityError(f"{path}: identity format version {fields.get('version')!r} is not supported",
                             code="identity_unreadable")
    return ApplianceIdentity(parse_identity(fields["age_identity"]),
                             Ed25519PrivateKey.from_private_bytes(bytes.fromhex(fields["signing_key"])),
                             float(fields["created"]))



def _write_atomic(path: Path, data: bytes, *, replace: bool) -> None:
    """tmp + fsync + (link | rename) + fsync of the folder: a crash leaves the old file or the new.

    `replace=False` links instead of renaming, so an existing identity is never overwritten even
    if the lock were bypassed (two appliances' worth of keys must never exist).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


@contextmanager
def _locked(layout: StateLayout) -> Iterator[None]:
    layout.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    layout.identity.mkdir(exist_ok=True, mode=0o700)
    fd = os.open(layout.identity / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def identity_path(layout: StateLayout) -> Path:
    return layout.identity / KEYS_FILE


def next_identity_path(layout: StateLayout) -> Path:
    """The identity sealed under a rotation's new key, before it replaces keys.enc."""
    return layout.identity / (KEYS_FILE + ".next")


def previous_identity_path(layout: StateLayout) -> Path:
    """The identity under the replaced key, kept until the rotation is finished."""
    return layout.identity / (KEYS_FILE + ".previous")


def load_identity(layout: StateLayout, master_key: bytes, *, other_keys: tuple[bytes, ...] = ()) -> ApplianceIdentity:
    """The existing identity; FileNotFoundError if the appliance has none yet.

    A rotation interrupted at any instant leaves keys.enc (old or new key), keys.enc.next (new key)
    or keys.enc.previous (old key): each file is tried with each key this process has, so the
    identity opens with either key whatever instant the rotation stopped at.
    """
    first_error: IntegrityError | None = None
    found = False
    for path in (identity_path(layout), next_identity_path(layout), previous_identity_path(layout)):
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            continue
        found = True
        for key in (master_key, *other_keys):
            try:
                return _open(blob, key, path)
            except IntegrityError as err:
                first_error = first_error or err
    if not found:
        raise FileNotFoundError(identity_path(layout))
    assert first_error is not None
    raise first_error


def seal_identity(layout: StateLayout, identity: ApplianceIdentity, master_key: bytes, path: Path) -> None:
    """Write `identity` sealed under `master_key` to `path` (a rotation's keys.enc.next), atomically."""
    with _locked(layout):
        _write_atomic(path, _seal(identity, master_key), replace=True)


def install_next_identity(layout: StateLayout) -> None:
    """keys.enc -> keys.enc.previous, keys.enc.next -> keys.enc; each step atomic, the pair idempotent."""
    nxt, current, previous = next_identity_path(layout), identity_path(layout), previous_identity_path(layout)
    with _locked(layout):
        if not nxt.exists():
            return
        if current.exists():
            keep_previous(current, previous)
        os.replace(nxt, current)  # keys.enc always exists: sealed under the old key, then under the new
        fsync_dir(current.parent)


def load_or_create_identity(layout: StateLayout, master_key: bytes, *,
                            other_keys: tuple[bytes, ...] = ()) -> ApplianceIdentity:
    """The appliance's identity, made on first use; concurrent first starts agree on one.

    The fast path reads without the lock (the file only ever appears or changes by rename); the
    slow path takes an exclusive flock and checks again before creating.
    """
    _file_key(master_key)  # a malformed master key fails before anything is written
    try:
        return load_identity(layout, master_key, other_keys=other_keys)
    except FileNotFoundError:
        pass
    with _locked(layout):
        try:
            return load_identity(layout, master_key, other_keys=other_keys)
        except FileNotFoundError:
            pass
        identity = ApplianceIdentity(X25519PrivateKey.generate(), Ed25519PrivateKey.generate(), time.time())
        _write_atomic(identity_path(layout), _seal(identity, master_key), replace=False)
        return identity


def _may_create_master_key(config: Config, env: Mapping[str, str]) -> bool:
    """Only a developer install (no credential, no configured key file) generates its master key.

    A production appliance whose configured key is missing must stop, not mint a new key that
    would orphan every wrapped data key.
    """
    from garrison.store.master_key import MasterKeySource

    credentials = env.get("CREDENTIALS_DIRECTORY")
    has_credential = bool(credentials) and (Path(credentials or "") / "master.key").exists()
    # A rotation's .next/.previous siblings mean the key exists (mid-rotation): never mint another.
    return not config.master_key_file and not has_credential and not MasterKeySource(config, env).candidates()


def load_appliance_identity(config: Config, env: Mapping[str, str] | None = None, *,
                            create: bool = True) -> ApplianceIdentity:
    """Master key from the configuration, then the identity from the state folder.

    `create=False` is for tools that must seal to an existing appliance (`garrison seal` without
    -r): minting a fresh identity on a producer's laptop would seal data nobody can open, so it
    fails with NotFound `identity_missing` instead, before any master key is generated.
    """
    from garrison.store.master_key import MasterKeySource, load_master_key

    env = os.environ if env is None else env
    layout = StateLayout(config.state_path)
    if not create and not identity_path(layout).exists():
        raise NotFound(f"no appliance identity in {config.state_path}: run this on the appliance, or pass "
                       "-r with its recipient (`garrison identity`, GET /v1/garrison/identity)",
                       code="identity_missing")
    # A state folder that already has an identity was made with a key that exists somewhere: minting a
    # new one here (a copied state folder, a lost key file) would orphan it. Restore it instead.
    mint = create and _may_create_master_key(config, env) and not identity_path(layout).exists()
    master = load_master_key(config, create=mint, env=env)
    others = tuple(key for _, key in MasterKeySource(config, env).candidates() if key != master)
    return load_or_create_identity(layout, master, other_keys=others)


class IdentityCache:
    """Loads the identity once per state folder and keeps it (for the daemon; thread-safe).

    Attach one to the daemon state (e.g. `DaemonState.identity_cache`); handlers call
    `get(state.config)` from a worker thread. A failed load is not cached, so fixing the master
    key and retrying works without a restart.
    """

    def __init__(self, loader: Callable[[Config], ApplianceIdentity] = load_appliance_identity) -> None:
        self._loader = loader
        self._lock = threading.Lock()
        self._by_state: dict[str, ApplianceIdentity] = {}

    def get(self, config: Config) -> ApplianceIdentity:
        key = str(config.state_path.resolve())
        with self._lock:
            found = self._by_state.get(key)
            if found is None:
                found = self._by_state[key] = self._loader(config)
            return found

    def clear(self) -> None:
        """Forget loaded identities (after a master-key rotation)."""
        with self._lock:
            self._by_state.clear()
