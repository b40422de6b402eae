"""Master key custody as operations: rotation that cannot lose data, new keys, backups and restores.

Rotation is two-phase and journaled in the catalog (`key_rotations`):

1. prepare: the new key is written beside the current one (`master.key.next`, 0600) and the
   identity is sealed under it (`identity/keys.enc.next`); journal `prepared`.
2. commit, one SQLite transaction: every wrapped key (dataset versions, `wrapped_keys` such as
   fine-tune checkpoint keys) is unwrapped with the old key, wrapped with the new one and
   unwrapped again to verify, the catalog's key check value becomes the new key's, journal
   `committed`, audit entry. Any failure rolls the whole transaction back.
3. install: identity first (keys.enc -> keys.enc.previous, keys.enc.next -> keys.enc), then the
   key file (master.key -> master.key.previous, master.key.next -> master.key); journal
   `installed`. The old key stays in `master.key.previous` until `--finish`.

Why it cannot lose data: before the commit everything opens with the old key (the catalog says
so); after it, with the new key, which exists on disk before the commit; readers pick the key by
the check value the catalog records (garrison.store.master_key.MasterKeySource), and every wrap
checks that value inside its own publishing transaction, so a daemon that keeps serving uploads
across a rotation wraps each key under whichever key the catalog records at that instant.
A rotation killed at any instant is rolled back (prepared) or completed (committed) by the next
run. Every attempt, failed ones included, lands in the audit trail.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from garrison.config import Config
from garrison.crypto.age import IdentityLike, Passphrase, RecipientLike, decrypt_bytes, encrypt_bytes
from garrison.crypto.identity import (
    install_next_identity,
    load_identity,
    next_identity_path,
    previous_identity_path,
    seal_identity,
)
from garrison.errors import ConfigError, Conflict, GarrisonError, IntegrityError, InvalidRequest
from garrison.ingest.vault import derive_kek, unwrap_key, wrap_key
from garrison.paths import StateLayout
from garrison.policies.audit import append_audit
from garrison.store.catalog import Catalog
from garrison.store.durable import fsync_dir, keep_previous
from garrison.store.master_key import (
    KEY_BYTES,
    MasterKeySource,
    key_check_value,
    next_path,
    previous_path,
    read_key_file,
    record_kcv,
    recorded_kcv,
    write_key_file,
)

#: The steps a test may stop a rotation at with SIGKILL (GARRISON_ROTATION_KILL_AT), to prove that
#: every instant between them is recoverable.
STEPS = ("start", "key_next_written", "identity_next_written", "prepared", "committed", "identity_installed",
         "key_previous_linked", "installed")


@dataclass
class RotationResult:
    rotation_id: str
    state: str
    rewrapped: dict[str, int] = field(default_factory=dict)
    key_file: Path | None = None
    previous_key: Path | None = None
    resumed: str | None = None  # "rolled back" / "completed" an earlier interrupted attempt
    credential: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"rotation_id": self.rotation_id, "state": self.state, "rewrapped": self.rewrapped,
                "key_file": str(self.key_file) if self.key_file else None,
                "previous_key": str(self.previous_key) if self.previous_key else None,
                "resumed": self.resumed, "credential": self.credential}


def _step(name: str) -> None:
    if os.environ.get("GARRISON_ROTATION_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _key_file(config: Config, source: MasterKeySource) -> tuple[Path, bool]:
    """The file a rotation replaces, and whether the daemon reads the key as a systemd credential."""
    path = source.path
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and path.parent == Path(credentials):
        if not config.master_key_file:
            raise ConfigError("the master key is a systemd credential with no key file behind it: rotate on the "
                              "file the credential is made from (set master_key_file)", code="master_key_readonly")
        return Path(config.master_key_file), True
    # A configured key file is what the appliance's units hand the services as a credential (install.sh
    # --system): they hold a copy made at their start, so they must be restarted to see the new key.
    return path, bool(credentials) or bool(config.master_key_file)


def _journal(conn: Any, rotation_id: str, state: str, **detail: Any) -> None:
    conn.execute("UPDATE key_rotations SET state = ?, updated_at = ?, detail = ? WHERE id = ?",
                 (state, time.time(), json.dumps(detail, sort_keys=True), rotation_id))


def _unfinished(catalog: Catalog) -> dict[str, Any] | None:
    row = catalog.query_one("SELECT * FROM key_rotations WHERE state IN ('prepared', 'committed') "
                            "ORDER BY started_at DESC LIMIT 1")
    return dict(row) if row else None


def _audit_failure(catalog: Catalog, actor: str, err: BaseException, rotation_id: str | None) -> None:
    code = err.code if isinstance(err, GarrisonError) else type(err).__name__
    try:
        with catalog.write() as conn:
            if rotation_id is not None:
                conn.execute("UPDATE key_rotations SET state = 'failed', updated_at = ? WHERE id = ? AND state = "
                             "'prepared'", (time.time(), rotation_id))
            append_audit(conn, actor=actor, action="master_key.rotate", resource="master_key", outcome="failed",
                         detail={"rotation_id": rotation_id, "error": code, "message": str(err)[:300]})
    except GarrisonError:
        pass


def _roll_back(catalog: Catalog, layout: StateLayout, key_file: Path, pending: dict[str, Any], actor: str) -> None:
    """A rotation stopped before its commit: the old key still opens everything; drop what it prepared."""
    next_path(key_file).unlink(missing_ok=True)
    next_identity_path(layout).unlink(missing_ok=True)
    fsync_dir(key_file.parent)
    with catalog.write() as conn:
        _journal(conn, pending["id"], "rolled_back", reason="interrupted before commit; rerun")
        append_audit(conn, actor=actor, action="master_key.rotate.rollback", resource="master_key",
                     detail={"rotation_id": pending["id"]})


def _abandon(catalog: Catalog, layout: StateLayout, key_file: Path, rotation_id: str) -> None:
    """A rotation that failed before its commit removes what it prepared (the old key opens everything)."""
    row = catalog.query_one("SELECT state FROM key_rotations WHERE id = ?", (rotation_id,))
    if row is None or row["state"] != "prepared":
        return
    next_path(key_file).unlink(missing_ok=True)
    next_identity_path(layout).unlink(missing_ok=True)


def _install(catalog: Catalog, layout: StateLayout, key_file: Path, rotation_id: str, new_kcv: str) -> None:
    """After the commit: identity, then the key file; every step idempotent, so a rerun completes it."""
    install_next_identity(layout)
    _step("identity_installed")
    nxt, prev = next_path(key_file), previous_path(key_file)
    if nxt.exists():
        if key_file.exists() and key_check_value(read_key_file(key_file)) != new_kcv:
            keep_previous(key_file, prev)
            _step("key_previous_linked")
        os.replace(nxt, key_file)  # the key file always exists: the old key, then (atomically) the new one
        fsync_dir(key_file.parent)
    if not key_file.exists() or key_check_value(read_key_file(key_file)) != new_kcv:
        raise IntegrityError(f"the rotation's new key is neither in {nxt} nor in {key_file}: restore it from a "
                             "backup (`garrison keys restore-master`)", code="rotation_key_missing")
    with catalog.write() as conn:
        _journal(conn, rotation_id, "installed")
    _step("installed")


def _wrapped_rows(conn: Any) -> list[tuple[str, str, str, bytes]]:
    """(table, row id, AAD id, wrapped) for every key the master key wraps."""
    rows: list[tuple[str, str, str, bytes]] = [
        ("dataset_versions", str(r[0]), str(r[0]), bytes(r[1]))
        for r in conn.execute("SELECT id, wrapped_key FROM dataset_versions WHERE wrapped_key IS NOT NULL")]
    rows += [("wrapped_keys", f"{r[0]}\x00{r[1]}", f"{r[0]}:{r[1]}", bytes(r[2]))
             for r in conn.execute("SELECT purpose, id, wrapped FROM wrapped_keys")]
    return rows


def _commit(catalog: Catalog, rotation_id: str, old: bytes, new: bytes, actor: str) -> dict[str, int]:
    old_kek, new_kek = derive_kek(old), derive_kek(new)
    counts = {"dataset_versions": 0, "wrapped_keys": 0, "already": 0}
    with catalog._lock:
        catalog.conn.execute("PRAGMA secure_delete=ON")
    with catalog.write() as conn:
        if recorded_kcv(conn) not in (None, key_check_value(old)):
            raise Conflict("another rotation committed meanwhile; run the rotation again",
                           code="rotation_conflict")
        for table, row_id, aad_id, wrapped in _wrapped_rows(conn):
            try:
                data_key = unwrap_key(old_kek, wrapped, aad_id)
            except IntegrityError:
                unwrap_key(new_kek, wrapped, aad_id)  # raises (the whole rotation rolls back): opens with neither
                counts["already"] += 1
                continue
            rewrapped = wrap_key(new_kek, data_key, aad_id)
            if unwrap_key(new_kek, rewrapped, aad_id) != data_key:  # verified before anything is committed
                raise IntegrityError(f"rewrapping {aad_id} did not verify", code="rotation_verify_failed")
            if table == "dataset_versions":
                conn.execute("UPDATE dataset_versions SET wrapped_key = ? WHERE id = ?", (rewrapped, row_id))
            else:
                purpose, key_id = row_id.split("\x00", 1)
                conn.execute("UPDATE wrapped_keys SET wrapped = ? WHERE purpose = ? AND id = ?",
                             (rewrapped, purpose, key_id))
            counts[table] += 1
        record_kcv(conn, key_check_value(new))
        _journal(conn, rotation_id, "committed", **counts)
        append_audit(conn, actor=actor, action="master_key.rotate", resource="master_key",
                     detail={"rotation_id": rotation_id, **counts, "new_kcv": key_check_value(new)[:12]})
    with catalog._lock:
        catalog.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # old wrappings leave the WAL
    return counts


def rotate_master(config: Config, catalog: Catalog, new_key_file: Path | None, *, actor: str) -> RotationResult:
    """Rotate to the key in `new_key_file` (None: only complete or roll back an interrupted rotation)."""
    layout = StateLayout(config.state_path)
    source = MasterKeySource(config)
    rotation_id: str | None = None
    key_file = source.path
    try:
        key_file, credential = _key_file(config, source)
        new_key = read_key_file(new_key_file) if new_key_file is not None else None
        _step("start")
        expire_previous_key(config, catalog, actor=actor)
        resumed: str | None = None
        pending = _unfinished(catalog)
        if pending is not None and pending["state"] == "prepared":
            _roll_back(catalog, layout, key_file, pending, actor)
            resumed = "rolled back"
        elif pending is not None:
            _install(catalog, layout, key_file, pending["id"], pending["new_kcv"])
            resumed = "completed"
            if new_key is None or key_check_value(new_key) == pending["new_kcv"]:
                return RotationResult(pending["id"], "installed", json.loads(pending["detail"] or "{}"), key_file,
                                      previous_path(key_file), resumed, credential)
        if new_key is None:
            return RotationResult(pending["id"] if pending else "", "nothing to do", resumed=resumed,
                                  key_file=key_file, credential=credential)
        old = source.matching(recorded_kcv(catalog.conn))
        if new_key == old:
            last = catalog.query_one("SELECT * FROM key_rotations WHERE state IN ('installed', 'finished') "
                                     "ORDER BY started_at DESC LIMIT 1")
            if last is not None and last["new_kcv"] == key_check_value(new_key):  # a rerun after it completed
                return RotationResult(last["id"], str(last["state"]), json.loads(last["detail"] or "{}"), key_file,
                                      previous_path(key_file), "already completed", credential)
            raise InvalidRequest("the new master key is the current one", code="master_key_unchanged",
                                 param="new_key")
        identity = load_identity(layout, old, other_keys=tuple(k for _, k in source.candidates()))
        rotation_id = "rot_" + secrets.token_hex(8)
        with catalog.write() as conn:
            if recorded_kcv(conn) is None:
                record_kcv(conn, key_check_value(old))
            conn.execute("INSERT INTO key_rotations (id, state, old_kcv, new_kcv, started_at, updated_at, actor) "
                         "VALUES (?, 'prepared', ?, ?, ?, ?, ?)",
                         (rotation_id, key_check_value(old), key_check_value(new_key), time.time(), time.time(),
                          actor))
        write_key_file(next_path(key_file), new_key, replace=True)
        _step("key_next_written")
        seal_identity(layout, identity, new_key, next_identity_path(layout))
        _step("identity_next_written")
        if load_identity(layout, new_key).recipient != identity.recipient:
            raise IntegrityError("the identity sealed under the new key did not verify", code="rotation_verify_failed")
        _step("prepared")
        counts = _commit(catalog, rotation_id, old, new_key, actor)
        _step("committed")
        _install(catalog, layout, key_file, rotation_id, key_check_value(new_key))
        return RotationResult(rotation_id, "installed", counts, key_file, previous_path(key_file), resumed, credential)
    except BaseException as err:
        if rotation_id is not None and isinstance(err, Exception):
            _abandon(catalog, layout, key_file, rotation_id)
        _audit_failure(catalog, actor, err, rotation_id)
        raise


def expire_previous_key(config: Config, catalog: Catalog, *, actor: str, now: float | None = None) -> list[Path]:
    """Retention: a rotation installed longer ago than master_key_keep_previous_days is finished
    (the kept old key and identity file deleted). Best effort: a process that may not touch the key
    file (the service user, with a root-only key) leaves it to the next root command."""
    days = config.master_key_keep_previous_days
    if days <= 0:
        return []
    row = catalog.query_one("SELECT updated_at FROM key_rotations WHERE state = 'installed' "
                            "ORDER BY updated_at DESC LIMIT 1")
    if row is None or (time.time() if now is None else now) - float(row[0]) < days * 86400:
        return []
    try:
        return finish_rotation(config, catalog, actor=actor, reason=f"retention ({days:g} days)")
    except (OSError, GarrisonError):
        return []


def finish_rotation(config: Config, catalog: Catalog, *, actor: str, reason: str = "confirmed") -> list[Path]:
    """The operator confirms the new key works: the old key and the old identity file are deleted."""
    layout = StateLayout(config.state_path)
    source = MasterKeySource(config)
    key_file, _ = _key_file(config, source)
    if _unfinished(catalog) is not None:
        raise Conflict("a rotation is unfinished: run `garrison keys rotate-master` (no --new-key) to complete it "
                       "first", code="rotation_unfinished")
    current = source.matching(recorded_kcv(catalog.conn))
    load_identity(layout, current)  # the new key opens the identity on its own before the old one goes
    removed = [p for p in (previous_path(key_file), previous_identity_path(layout)) if p.exists()]
    for path in removed:
        path.unlink()
    if removed:
        fsync_dir(key_file.parent)
        fsync_dir(layout.identity)
    with catalog.write() as conn:
        conn.execute("UPDATE key_rotations SET state = 'finished', updated_at = ? WHERE state = 'installed'",
                     (time.time(),))
        append_audit(conn, actor=actor, action="master_key.rotate.finish", resource="master_key",
                     detail={"removed": [p.name for p in removed], "reason": reason})
    return removed


def new_master_key_file(path: Path) -> Path:
    """A fresh random key in a new file, mode 0600 (refuses to overwrite)."""
    if path.exists():
        raise Conflict(f"{path} exists; choose a new file", code="file_exists", param="path")
    write_key_file(path, secrets.token_bytes(KEY_BYTES), replace=False)
    return path



# -- backups ---------------------------------------------------------------------------------------

BACKUP_FORMAT = "garrison-master-key/1"


def backup_master(config: Config, catalog: Catalog, dest: Path, recipient: RecipientLike, *,
                  actor: str) -> dict[str, Any]:
    """Write the current master key sealed with age to `recipient` (an age1... key, or a Passphrase:
    age's scrypt recipient), so `restore-master` (or `age -d`) can bring it back on a new machine."""
    if dest.exists():
        raise Conflict(f"{dest} exists; back up to a new file", code="file_exists", param="to")
    key = MasterKeySource(config).matching(recorded_kcv(catalog.conn))
    payload = json.dumps({"format": BACKUP_FORMAT, "master_key": key.hex(), "kcv": key_check_value(key),
                          "created": time.time(), "state_dir": str(config.state_path)}).encode()
    sealed = encrypt_bytes(payload, [recipient], armor=True)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, sealed)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(dest.parent.resolve())
    kind = "passphrase" if isinstance(recipient, Passphrase) else "age recipient"
    with catalog.write() as conn:
        append_audit(conn, actor=actor, action="master_key.backup", resource="master_key",
                     detail={"to": str(dest), "sealed_to": kind, "kcv": key_check_value(key)[:12]})
    return {"to": str(dest), "sealed_to": kind, "kcv": key_check_value(key)}


def read_backup(src: Path, identity: IdentityLike) -> bytes:
    """The master key in a backup, checked against the check value sealed with it."""
    try:
        data = json.loads(decrypt_bytes(src.read_bytes(), [identity]))
    except ValueError as exc:
        raise InvalidRequest(f"{src} is not a Garrison master key backup ({exc})", code="not_a_backup") from None
    if not isinstance(data, dict) or data.get("format") != BACKUP_FORMAT:
        raise InvalidRequest(f"{src} is not a Garrison master key backup", code="not_a_backup")
    key = bytes.fromhex(str(data["master_key"]))
    if len(key) != KEY_BYTES or key_check_value(key) != data.get("kcv"):
        raise IntegrityError(f"the key in {src} does not match its check value", code="backup_invalid")
    return key


def restore_master(config: Config, src: Path, identity: IdentityLike, *, force: bool, actor: str) -> dict[str, Any]:
    """Install a backed-up master key as this machine's key file, after checking it opens this state folder."""
    key = read_backup(src, identity)
    source = MasterKeySource(config)
    target, _ = _key_file(config, source)
    layout = StateLayout(config.state_path)
    catalog = Catalog(layout.catalog) if layout.catalog.exists() else None
    try:
        recorded = recorded_kcv(catalog.conn) if catalog is not None else None
        if recorded is not None and recorded != key_check_value(key) and not force:
            raise IntegrityError(f"the backup's key is not the one this state folder's keys are wrapped with "
                                 f"(check value {recorded[:12]}...); --force installs it anyway",
                                 code="master_key_mismatch")
        if (layout.identity / "keys.enc").exists():
            load_identity(layout, key)  # raises identity_unreadable: the wrong appliance's backup
        if target.exists():
            current = read_key_file(target)
            if current == key:
                return {"installed": str(target), "changed": False}
            if not force:
                raise Conflict(f"{target} holds another master key; --force keeps it as "
                               f"{previous_path(target).name} and installs the backup", code="master_key_exists")
            keep_previous(target, previous_path(target))
        write_key_file(target, key, replace=True)
        if catalog is not None:
            with catalog.write() as conn:
                if recorded is None:
                    record_kcv(conn, key_check_value(key))
                append_audit(conn, actor=actor, action="master_key.restore", resource="master_key",
                             detail={"from": str(src), "kcv": key_check_value(key)[:12], "forced": force})
    finally:
        if catalog is not None:
            catalog.close()
    return {"installed": str(target), "changed": True, "kcv": key_check_value(key)}
