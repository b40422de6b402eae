"""The master key: where it comes from, and the checks before Garrison trusts it.

It never lives in the state folder. Under systemd it arrives as a credential
(`$CREDENTIALS_DIRECTORY/master.key`, which `LoadCredentialEncrypted=` can bind to a
TPM); otherwise it is the root-only file named by `master_key_file`; a developer
install gets one generated in `~/.config/garrison/`. It wraps data keys and the
appliance's identity, so rotating it rewraps keys, not data.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from garrison.config import Config
from garrison.errors import ConfigError

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
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_bytes(KEY_BYTES)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if a key appeared meanwhile: never replace a key
    finally:
        tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return key


def load_master_key(config: Config, *, create: bool = False, env: Mapping[str, str] | None = None) -> bytes:
    path = master_key_path(config, env)
    if not path.exists():
        if create:
            return generate_master_key(path)
        raise ConfigError(f"master key {path} does not exist (set master_key_file or provide the "
                          "master.key credential)", code="master_key_missing", param="master_key_file")
    mode = path.stat().st_mode
    in_credentials = "CREDENTIALS_DIRECTORY" in (env or os.environ) and path.parent == Path(
        (env or os.environ)["CREDENTIALS_DIRECTORY"])
    if not in_credentials and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"master key {path} is accessible to other users (mode {stat.S_IMODE(mode):o}); "
                          "chmod 600 it", code="master_key_exposed", param="master_key_file")
    raw = path.read_bytes().strip()
    try:
        key = bytes.fromhex(raw.decode("ascii")) if len(raw) == 2 * KEY_BYTES else raw
    except (UnicodeDecodeError, ValueError):
        key = raw
    if len(key) != KEY_BYTES:
        raise ConfigError(f"master key {path} must hold {KEY_BYTES} bytes (or {2 * KEY_BYTES} hex digits)",
                          code="master_key_invalid", param="master_key_file")
    return key
