"""The master key: where it comes from, and the checks before Garrison trusts it.

It never lives in the state folder. Under systemd it arrives as a credential
(`$CREDENTIALS_DIRECTORY/master.key`, which `LoadCredentialEncrypted=` can bind to a
TPM); otherwise it is the root-only file named by `master_key_file`; a developer
install gets one generated in `~/.config/garrison/`. It wraps data keys and the
appliance's identity, so rotating it rewraps keys, not data.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from garrison.config import Config
from garrison.errors import ConfigError, IntegrityError
from garrison.store.durable import fsync_dir

if TYPE_CHECKING:
    from garrison.store.catalog import Catalog

KEY_BYTES = 32


def master_key_path(config: Config, env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    credentials = env.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / "master.key").exists():
        return Path(credentials) / "master.key"
    if config.master_key_file:
        return Path(config.master_key_file)
    home = env.get("HOME") or str(Path.home())
    base = env.get("XDG_CONFIG_HOME") or str(Path(home) / ".config")
    return Path(base) / "garrison" / "master.key"


def generate_master_key(path: Path) -> bytes:
    """Write a new key atomically with mode 0600; refuses to overwrite one."""
    key = secrets.token_bytes(KEY_BYTES)
    write_key_file(path, key, replace=False)
    return key


def load_master_key(config: Config, *, create: bool = False, env: Mapping[str, str] | None = None) -> bytes:
    path = master_key_path(config, env)
    if not path.exists():
        if create:
            return generate_master_key(path)
        raise ConfigError(f"master key {path} does not exist (set master_key_file or provide the "
                          "master.key credential; or restore a backup: garrison keys restore-master)",
                          code="master_key_missing", param="master_key_file")
    in_credentials = "CREDENTIALS_DIRECTORY" in (env or os.environ) and path.parent == Path(
        (env or os.environ)["CREDENTIALS_DIRECTORY"])
    key = read_key_file(path, check_mode=not in_credentials)
    return key


# -- custody: which key the catalog's wrapped keys need, and where a rotation leaves the others ------

_KCV_INFO = b"garrison master key check v1"


def key_check_value(master_key: bytes) -> str:
    """Names a master key without revealing it: HMAC-SHA256(key, constant), first 16 bytes, hex.

    Stored in the catalog (master_key_state) as the key every wrapped key is wrapped with.
    """
    return hmac.new(master_key, _KCV_INFO, hashlib.sha256).hexdigest()[:32]


def next_path(path: Path) -> Path:
    """Where a rotation puts the new key before it becomes the key (beside it, same protection)."""
    return path.with_name(path.name + ".next")


def previous_path(path: Path) -> Path:
    """Where the replaced key is kept until the operator confirms (`rotate-master --finish`)."""
    return path.with_name(path.name + ".previous")


def read_key_file(path: Path, *, check_mode: bool = True) -> bytes:
    """32 raw bytes or 64 hex digits, from a file only its owner may read."""
    if check_mode and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"master key {path} is accessible to other users (mode "
                          f"{stat.S_IMODE(path.stat().st_mode):o}); chmod 600 it", code="master_key_exposed",
                          param="master_key_file")
    raw = path.read_bytes().strip()
    try:
        key = bytes.fromhex(raw.decode("ascii")) if len(raw) == 2 * KEY_BYTES else raw
    except (UnicodeDecodeError, ValueError):
        key = raw
    if len(key) != KEY_BYTES:
        raise ConfigError(f"master key {path} must hold {KEY_BYTES} bytes (or {2 * KEY_BYTES} hex digits)",
                          code="master_key_invalid", param="master_key_file")
    return key


def write_key_file(path: Path, key: bytes, *, replace: bool) -> None:
    """Write a key (hex, mode 0600) atomically: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if the file exists: never replace a key by accident
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def recorded_kcv(conn: sqlite3.Connection) -> str | None:
    """The check value of the key the catalog's wrapped keys are wrapped with (None: not recorded yet)."""
    row = conn.execute("SELECT kcv FROM master_key_state WHERE id = 1").fetchone()
    return str(row[0]) if row else None


def record_kcv(conn: sqlite3.Connection, kcv: str) -> None:
    conn.execute("INSERT INTO master_key_state (id, kcv, updated_at) VALUES (1, ?, ?) "
                 "ON CONFLICT (id) DO UPDATE SET kcv = excluded.kcv, updated_at = excluded.updated_at",
                 (kcv, time.time()))


class MasterKeySource:
    """The master key as this process finds it: the configured key, and during or after a rotation
    its `.next` / `.previous` siblings, chosen by the check value the catalog records.

    A daemon that runs across a rotation needs no restart: the rotation commits the new check value
    with the rewrapped keys in one transaction and leaves the new key beside the old one; the next
    wrap or unwrap here finds it. With a systemd credential the new key must be installed as the
    credential (the rotation says so); until then, wraps fail with master_key_mismatch (nothing is
    ever wrapped under the old key) and reads use the `.previous` key where it is kept.
    """

    def __init__(self, config: Config, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.env = os.environ if env is None else env

    @property
    def path(self) -> Path:
        return master_key_path(self.config, self.env)

    def primary(self) -> bytes:
        return load_master_key(self.config, env=self.env)

    def candidates(self) -> list[tuple[Path, bytes]]:
        """The configured key first, then the rotation's siblings (credential: also the key file's)."""
        paths = [self.path, next_path(self.path), previous_path(self.path)]
        if self.config.master_key_file and Path(self.config.master_key_file) != self.path:
            configured = Path(self.config.master_key_file)
            paths += [configured, next_path(configured), previous_path(configured)]
        out: list[tuple[Path, bytes]] = []
        for path in paths:
            in_credentials = self.path == path and "CREDENTIALS_DIRECTORY" in self.env
            try:
                out.append((path, read_key_file(path, check_mode=not in_credentials)))
            except (FileNotFoundError, PermissionError):
                continue  # absent, or root's copy that the service user may not read (it has the credential)
        return out

    def matching(self, kcv: str | None) -> bytes:
        """The key whose check value is `kcv` (None: nothing recorded yet, the configured key)."""
        if kcv is None:
            return self.primary()
        candidates = self.candidates()
        for _, key in candidates:
            if key_check_value(key) == kcv:
                return key
        tried = ", ".join(str(p) for p, _ in candidates) or str(self.path)
        raise IntegrityError(f"no master key here ({tried}) is the one this state folder's keys are wrapped with "
                             f"(check value {kcv[:12]}...); restore it (`garrison keys restore-master`) or install "
                             "the rotated key", code="master_key_mismatch")


def current_master_key(config: Config, catalog: Catalog, env: Mapping[str, str] | None = None) -> bytes:
    """The key that opens this state folder's wrapped keys now (see MasterKeySource)."""
    return MasterKeySource(config, env).matching(recorded_kcv(catalog.conn) if _has_table(catalog) else None)


def _has_table(catalog: Catalog) -> bool:
    with catalog._lock:
        row = catalog.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'master_key_state'"
                                   ).fetchone()
    return row is not None
