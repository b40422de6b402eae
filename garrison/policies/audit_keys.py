"""The keys that MAC the audit trail: derived from the master key, never stored in the catalog.

Whoever can write the catalog could rewrite a plain hash chain and re-hash it; they cannot make
an HMAC without the master key, which never lives in the state folder. Each entry names the check
value (`kcv`) of the master key its MAC key was derived from, so a trail that spans master-key
rotations verifies with whichever keys this process can read (the configured key, its `.next`
and `.previous` siblings); entries MACed under a key that has since been deleted are vouched for
by the first later entry MACed under a key that is still here (its hash covers theirs).

The keys are found from the process's configuration as its environment names it
(GARRISON_CONFIG, GARRISON_* variables, CREDENTIALS_DIRECTORY; `--config` exports GARRISON_CONFIG
for the job workers, and so for this too). Every process that writes the catalog - the daemon,
`garrison` commands, job workers - therefore signs without being handed a key, and no entry is
ever written without a MAC: when no key can be read the write fails (master_key_missing /
master_key_mismatch). Only a developer install with no key anywhere, no identity and nothing
signed yet gets one minted, exactly as its identity would.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from garrison.config import Config, load_config
from garrison.errors import ConfigError, IntegrityError
from garrison.paths import StateLayout
from garrison.store.master_key import (
    MasterKeySource,
    generate_master_key,
    key_check_value,
    master_key_path,
    recorded_kcv,
)

_AUDIT_KEY_INFO = b"garrison audit mac key v1"


def derive_audit_key(master_key: bytes) -> bytes:
    """One-way from the master key, so an audit MAC key that leaks does not open any wrapped key."""
    return hmac.new(master_key, _AUDIT_KEY_INFO, hashlib.sha256).digest()


@dataclass(frozen=True)
class AuditKeys:
    """The audit keys of one process's configuration (see the module docstring)."""

    config: Config
    env: Mapping[str, str] = field(default_factory=lambda: os.environ)

    @classmethod
    def from_environment(cls) -> AuditKeys:
        return cls(load_config(), os.environ)

    @property
    def anchor_every(self) -> int:
        return int(self.config.audit_anchor_every)

    def _source(self) -> MasterKeySource:
        return MasterKeySource(self.config, self.env)

    def verifying(self) -> dict[str, bytes]:
        """Audit MAC keys by master-key check value, for every master key this process can read."""
        return {key_check_value(key): derive_audit_key(key) for _, key in self._source().candidates()}

    def signing(self, conn: sqlite3.Connection, catalog_path: Path) -> tuple[str, bytes]:
        """(check value, audit MAC key) for a new entry, chosen inside the caller's write transaction.

        The key the catalog records (the one its wrapped keys are wrapped with) when this process
        has it; otherwise another key the catalog's rotation journal names (a service still holding
        the pre-rotation credential keeps auditing under it, and verifies later through the
        `.previous` key or the entries that follow); never a key foreign to this catalog.
        """
        found = [key for _, key in self._source().candidates()]
        by_kcv = {key_check_value(key): key for key in found}
        recorded = recorded_kcv(conn)
        if recorded is not None:
            if recorded in by_kcv:
                return recorded, derive_audit_key(by_kcv[recorded])
            journal = {str(r[0]) for r in conn.execute("SELECT old_kcv FROM key_rotations UNION "
                                                        "SELECT new_kcv FROM key_rotations")}
            for kcv, key in by_kcv.items():
                if kcv in journal:
                    return kcv, derive_audit_key(key)
            raise IntegrityError(f"no master key here is this catalog's (check value {recorded[:12]}...): audit "
                                 "entries cannot be signed; restore it (`garrison keys restore-master`)",
                                 code="master_key_mismatch")
        if found:
            return key_check_value(found[0]), derive_audit_key(found[0])
        key = self._mint(conn, catalog_path)
        return key_check_value(key), derive_audit_key(key)

    def _mint(self, conn: sqlite3.Connection, catalog_path: Path) -> bytes:
        path = master_key_path(self.config, self.env)
        if not self._may_mint(conn, catalog_path):
            raise ConfigError(f"master key {path} does not exist: audit entries are signed with a key derived "
                              "from it (set master_key_file or provide the master.key credential; or restore "
                              "a backup: garrison keys restore-master)", code="master_key_missing",
                              param="master_key_file")
        try:
            return generate_master_key(path)
        except FileExistsError:  # another process minted it a moment ago
            return self._source().primary()

    def _may_mint(self, conn: sqlite3.Connection, catalog_path: Path) -> bool:
        """A developer install that never had a key; anything that shows a key existed forbids it
        (a new key would orphan what the old one signed and wrapped)."""
        credentials = self.env.get("CREDENTIALS_DIRECTORY")
        if self.config.master_key_file or (credentials and (Path(credentials) / "master.key").exists()):
            return False
        if recorded_kcv(conn) is not None:
            return False
        if conn.execute("SELECT 1 FROM audit WHERE mac IS NOT NULL LIMIT 1").fetchone() is not None:
            return False
        identity = StateLayout(catalog_path.parent).identity
        return not (identity.is_dir() and any(identity.iterdir()))
