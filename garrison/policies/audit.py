"""The tamper-evident audit trail: a hash chain in the catalog, MACed under a key the catalog does not
hold, and anchored outside the catalog.

Entry n stores `hash` = SHA-256 over the previous entry's hash and its own content (the chain that
catalogs before migration m007 hold alone), and `mac` = HMAC-SHA256 over its sequence number, the
previous entry's MAC, its hash and `kcv`, under a key derived from the master key whose check value
`kcv` names (garrison.policies.audit_keys). Editing an entry breaks its hash; re-hashing the chain
after it, the old attack on a plain chain, breaks the MACs, which nobody without the master key can
recompute. Deleting the newest entries leaves a shorter chain that still verifies, so the head is
also anchored outside the catalog (garrison.policies.audit_anchors) and the catalog's own
AUTOINCREMENT high-water mark is compared with the last entry.

Entries written before m007 have no MAC: they are a legacy prefix, vouched for by the first MACed
entry (its hash covers theirs). A missing MAC after a MACed entry is a break.

Entries never hold key material or record contents: only ids, actions and outcomes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from garrison.errors import ConfigError, GarrisonError, IntegrityError
from garrison.logs import log_event
from garrison.policies.audit_anchors import (
    Anchor,
    anchor_file,
    committed_head,
    last_anchor,
    make_anchor,
    read_anchors,
    write_anchor,
)
from garrison.policies.audit_keys import AuditKeys

if TYPE_CHECKING:
    from garrison.store.catalog import Catalog

log = logging.getLogger("garrison.audit")

GENESIS = "0" * 64
_MAC_INFO = "garrison audit entry v1"
_PAGE = 2000


def entry_hash(prev_hash: str, at: float, actor: str, action: str, resource: str, outcome: str,
               detail: str) -> str:
    payload = json.dumps([prev_hash, repr(at), actor, action, resource, outcome, detail],
                         separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def entry_mac(key: bytes, seq: int, prev_mac: str, digest: str, kcv: str) -> str:
    """Covers the sequence number too: the legacy hash does not, and renumbering must not verify."""
    message = json.dumps([_MAC_INFO, seq, prev_mac, digest, kcv], separators=(",", ":"))
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def catalog_file(conn: sqlite3.Connection) -> Path:
    for row in conn.execute("PRAGMA database_list").fetchall():
        if row[1] == "main":
            return Path(row[2])
    raise IntegrityError("the audit trail needs a catalog file", code="audit_chain_broken")


# -- writing ---------------------------------------------------------------------------------------
def append_audit(conn: sqlite3.Connection, *, actor: str, action: str, resource: str = "",
                 outcome: str = "ok", detail: dict[str, Any] | None = None, keys: AuditKeys | None = None) -> int:
    """Append inside the caller's write transaction, so the entry and the change land together.

    Signed with the process's audit key (`keys`, by default found from the environment's
    configuration); without one it raises and the caller's transaction rolls back: an unsigned entry
    is never written. Returns the entry's sequence number.
    """
    path = catalog_file(conn)
    keys = keys or AuditKeys.from_environment()
    kcv, key = keys.signing(conn, path)
    last = conn.execute("SELECT seq, hash, mac, kcv FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    high = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit'").fetchone()
    # After the high-water mark, not after the last row: entries deleted from the tail stay a gap.
    seq = max(int(last[0]) if last else 0, int(high[0]) if high else 0) + 1
    prev_hash = str(last[1]) if last else GENESIS
    prev_mac = str(last[2]) if last and last[2] is not None else ""
    at = time.time()
    detail_text = json.dumps(detail or {}, sort_keys=True, separators=(",", ":"))
    digest = entry_hash(prev_hash, at, actor, action, resource, outcome, detail_text)
    conn.execute(
        "INSERT INTO audit (seq, at, actor, action, resource, outcome, detail, prev_hash, hash, kcv, mac)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (seq, at, actor, action, resource, outcome, detail_text, prev_hash, digest, kcv,
         entry_mac(key, seq, prev_mac, digest, kcv)))
    if last is not None and last[2] is not None:
        _anchor_if_due(path, int(last[0]), str(last[3]), keys.anchor_every, kcv, key)
    return seq


def _anchor_if_due(path: Path, prev_seq: int, prev_kcv: str, every: int, kcv: str, key: bytes) -> None:
    """Anchors the committed head when `every` entries passed since the last anchor, or the key changed
    (the first MACed entry, a rotation). The entry just inserted is not committed yet, so the head
    anchored is at most the one before it; shutdown anchors the rest."""
    anchors = anchor_file(path)
    mark = last_anchor(anchors)
    if mark is not None and prev_seq - mark.seq < every and prev_kcv == mark.kcv:
        return
    try:
        head = committed_head(path)
        if head is None or head["mac"] is None or (mark is not None and head["seq"] <= mark.seq
                                                   and head["kcv"] == mark.kcv):
            return
        reason = "first" if mark is None else "every" if head["kcv"] == mark.kcv else "key"
        write_anchor(anchors, make_anchor(head, akcv=kcv, key=key, reason=reason))
    except (OSError, sqlite3.Error) as exc:
        # The entry itself is signed and lands; a missing anchor only weakens truncation checks, and says so.
        log_event(log, "audit.anchor_failed", level=logging.ERROR, path=str(anchors), error=str(exc)[:200])


def anchor_head(catalog: Catalog, reason: str = "shutdown", keys: AuditKeys | None = None) -> Anchor | None:
    """Anchor the committed head now if it is newer than the last anchor (daemon shutdown)."""
    keys = keys or AuditKeys.from_environment()
    anchors = anchor_file(catalog.path)
    head = committed_head(catalog.path)
    mark = last_anchor(anchors)
    if head is None or head["mac"] is None or (mark is not None and (mark.seq, mark.kcv) == (head["seq"],
                                                                                             head["kcv"])):
        return None
    with catalog.write() as conn:  # the catalog's key choice is read under its write lock, as appends do
        kcv, key = keys.signing(conn, catalog.path)
    anchor = make_anchor(head, akcv=kcv, key=key, reason=reason)
    write_anchor(anchors, anchor)
    return anchor


def anchor_at_shutdown(catalog: Catalog) -> None:
    """The daemon's and the worker's last act on the catalog; a failure is logged, never stops the stop."""
    try:
        anchor = anchor_head(catalog, "shutdown")
    except (GarrisonError, OSError, sqlite3.Error) as exc:
        log_event(log, "audit.anchor_failed", level=logging.ERROR, reason="shutdown", error=str(exc)[:200])
        return
    if anchor is not None:
        log_event(log, "audit.anchored", seq=anchor.seq, reason="shutdown")


# -- verifying -------------------------------------------------------------------------------------
#: Each kind of break: the error code `garrison audit verify` exits with (8), and what it means.
BREAKS: dict[str, tuple[str, str]] = {
    "edited": ("audit_chain_broken", "its content or hash was changed (edited)"),
    "deleted": ("audit_chain_broken", "it is missing (deleted)"),
    "unsigned": ("audit_chain_broken", "it has no MAC although an earlier entry has one (MAC stripped, or "
                                       "written around Garrison)"),
    "mac_mismatch": ("audit_chain_broken", "its MAC does not verify (rewritten and re-hashed, or forged)"),
    "unknown_key": ("audit_chain_broken", "it and every later entry are MACed under keys this appliance does "
                                          "not have (forged with another key)"),
    "truncated": ("audit_truncated", "it and every later entry are gone (the tail was deleted)"),
    "rewritten": ("audit_rewritten", "the catalog no longer holds the head anchored outside it (rewritten)"),
    "anchor_forged": ("audit_anchor_invalid", "an anchor names it with a MAC that does not verify (the anchor "
                                              "file was written around Garrison)"),
}


@dataclass(frozen=True)
class TrailBreak:
    seq: int  # the first bad sequence number
    kind: str
    note: str = ""

    @property
    def code(self) -> str:
        return BREAKS[self.kind][0]

    @property
    def message(self) -> str:
        return f"audit trail broken at entry {self.seq}: {BREAKS[self.kind][1]}{self.note}"

    def error(self) -> IntegrityError:
        return IntegrityError(self.message, code=self.code, details={"first_bad_seq": self.seq, "kind": self.kind})


@dataclass
class AuditReport:
    entries: int = 0
    last_seq: int = 0
    legacy: int = 0  # entries from before MACs (m007), vouched for by the first MACed one
    macs_checked: int = 0
    anchors: int = 0  # anchors compared with the catalog
    anchors_unverifiable: int = 0  # MACed under a master key no longer here (they anchor nothing)
    anchored_seq: int | None = None
    broken: TrailBreak | None = None
    checked_at: float = field(default_factory=time.time)

    @property
    def intact(self) -> bool:
        return self.broken is None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "intact": self.intact, "entries": self.entries, "last_seq": self.last_seq, "legacy": self.legacy,
            "macs_checked": self.macs_checked, "anchors": self.anchors,
            "anchors_unverifiable": self.anchors_unverifiable, "anchored_seq": self.anchored_seq,
            "checked_at": self.checked_at, "first_bad_seq": None, "kind": None, "code": None, "message": None}
        if self.broken is not None:
            out.update(first_bad_seq=self.broken.seq, kind=self.broken.kind, code=self.broken.code,
                       message=self.broken.message)
        return out

    def raise_if_broken(self) -> None:
        if self.broken is not None:
            raise self.broken.error()


class ChainCheck:
    """Walks entries in order, once; fed incrementally by TrailMonitor."""

    def __init__(self, keys: Mapping[str, bytes], anchors: Mapping[int, Anchor]) -> None:
        self.keys = keys
        self.anchors = dict(anchors)
        self.last_seq = 0
        self.last_hash = GENESIS
        self.last_mac = ""
        self.signed = False
        self.unvouched_from: int | None = None
        self.anchored_ok = 0
        self.entries = self.legacy = self.macs_checked = self.anchors_compared = 0
        self.broken: TrailBreak | None = None

    def feed(self, row: sqlite3.Row) -> bool:
        """False once broken (the first break is the one reported)."""
        if self.broken is not None:
            return False
        seq = int(row["seq"])
        if seq != self.last_seq + 1:
            return self._break(self.last_seq + 1, "deleted")
        expected = entry_hash(self.last_hash, row["at"], row["actor"], row["action"], row["resource"],
                              row["outcome"], row["detail"])
        if row["prev_hash"] != self.last_hash or row["hash"] != expected:
            return self._break(seq, "edited")
        mac, kcv = row["mac"], row["kcv"]
        if mac is None:
            if self.signed:
                return self._break(seq, "unsigned")
            self.legacy += 1
        else:
            self.signed = True
            key = self.keys.get(str(kcv))
            if key is None:
                self.unvouched_from = self.unvouched_from or seq
            elif not hmac.compare_digest(str(mac), entry_mac(key, seq, self.last_mac, str(row["hash"]), str(kcv))):
                return self._break(seq, "mac_mismatch")
            else:
                self.macs_checked += 1
                self.unvouched_from = None  # its hash covers every entry before it
        anchor = self.anchors.get(seq)
        if anchor is not None:
            self.anchors_compared += 1
            if (anchor.hash, anchor.mac) != (row["hash"], mac or ""):
                if self.unvouched_from is not None:  # the run under a foreign key is where it starts
                    return self._break(self.unvouched_from, "unknown_key")
                # MACs that verify prove nothing against a holder of the key; the anchor's hash covers the
                # whole prefix: the change is after the last anchor that matched.
                return self._break(self.anchored_ok + 1, "rewritten", f"; entry {seq} differs from its anchor")
            self.anchored_ok = seq
        self.last_seq, self.last_hash, self.last_mac = seq, str(row["hash"]), str(mac or "")
        self.entries += 1
        return True

    def _break(self, seq: int, kind: str, note: str = "") -> bool:
        self.broken = TrailBreak(seq, kind, note)
        return False

    def finish(self, high_water: int) -> TrailBreak | None:
        """What the walk so far leaves unexplained (not recorded: the walk may go on)."""
        if self.broken is not None:
            return self.broken
        if self.unvouched_from is not None:
            return TrailBreak(self.unvouched_from, "unknown_key")
        past = max([high_water, *self.anchors])
        if past > self.last_seq:
            return TrailBreak(self.last_seq + 1, "truncated", f" (entries up to {past} existed)")
        return None

    def report(self, high_water: int, *, unverifiable: int = 0, forged: Sequence[Anchor] = ()) -> AuditReport:
        broken = self.finish(high_water)
        if broken is None and forged:
            broken = TrailBreak(min(a.seq for a in forged), "anchor_forged")
        return AuditReport(entries=self.entries, last_seq=self.last_seq, legacy=self.legacy,
                           macs_checked=self.macs_checked, anchors=self.anchors_compared,
                           anchors_unverifiable=unverifiable,
                           anchored_seq=max(self.anchors) if self.anchors else None, broken=broken)


def _sorted_anchors(files: Sequence[Path], keys: Mapping[str, bytes],
                    offsets: dict[Path, int] | None = None) -> tuple[dict[int, Anchor], int, list[Anchor]]:
    """(authentic anchors by seq, how many could not be checked, forged ones)."""
    authentic: dict[int, Anchor] = {}
    unverifiable = 0
    forged: list[Anchor] = []
    for path in files:
        start = offsets.get(path, 0) if offsets is not None else 0
        found, end = read_anchors(path, start)
        if offsets is not None:
            offsets[path] = end
        for anchor in found:
            verdict = anchor.authentic(keys)
            if verdict is None:
                unverifiable += 1
            elif verdict:
                authentic[anchor.seq] = anchor
            else:
                forged.append(anchor)
    return authentic, unverifiable, forged


def _rows_after(catalog: Catalog, seq: int) -> Iterator[sqlite3.Row]:
    """Pages, so a long trail is never all in memory."""
    while True:
        page = catalog.query("SELECT * FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", (seq, _PAGE))
        yield from page
        if len(page) < _PAGE:
            return
        seq = int(page[-1]["seq"])


def _high_water(catalog: Catalog) -> int:
    row = catalog.query_one("SELECT seq FROM sqlite_sequence WHERE name = 'audit'")
    return int(row[0]) if row else 0


def _require(keys: Mapping[str, bytes]) -> None:
    if not keys:
        raise ConfigError("verifying the audit trail needs the master key (its MACs are keyed from it): run this "
                          "where the daemon's key or credential is readable", code="master_key_missing",
                          param="master_key_file")


def verify_trail(catalog: Catalog, keys: Mapping[str, bytes], anchor_files: Sequence[Path] = ()) -> AuditReport:
    """Every entry, every anchor in the state folder's anchor file and in `anchor_files`
    (say, anchors exported from the journal)."""
    _require(keys)
    files = [anchor_file(catalog.path), *anchor_files]
    authentic, unverifiable, forged = _sorted_anchors(files, keys)
    check = ChainCheck(keys, authentic)
    for row in _rows_after(catalog, 0):
        if not check.feed(row):
            break
    return check.report(_high_water(catalog), unverifiable=unverifiable, forged=forged)


@dataclass
class _Watch:
    check: ChainCheck
    offsets: dict[Path, int]
    unverifiable: int
    forged: list[Anchor]
    full_at: float


class TrailMonitor:
    """The audit list's `chain_intact` without reading the whole trail on every call.

    A full verification at most every `full_every_s`; between them each call checks only what is
    new (entries after the last one verified, new anchor lines) and that the last verified entry is
    still there unchanged. An edit deep in the trail is therefore reported within `full_every_s`;
    `verify_trail` (GET /v1/garrison/audit/verify, `garrison audit verify`) checks everything now.
    """

    def __init__(self, full_every_s: float = 60.0) -> None:
        self.full_every_s = full_every_s
        self._lock = threading.Lock()
        self._watches: dict[Path, _Watch] = {}

    def report(self, catalog: Catalog, keys: Mapping[str, bytes]) -> AuditReport:
        _require(keys)
        with self._lock:
            watch = self._watches.get(catalog.path)
            if watch is None or not self._extend(watch, catalog, keys):
                watch = self._full(catalog, keys)
                self._watches[catalog.path] = watch
            return watch.check.report(_high_water(catalog), unverifiable=watch.unverifiable, forged=watch.forged)

    def _full(self, catalog: Catalog, keys: Mapping[str, bytes]) -> _Watch:
        offsets: dict[Path, int] = {}
        authentic, unverifiable, forged = _sorted_anchors([anchor_file(catalog.path)], keys, offsets)
        check = ChainCheck(keys, authentic)
        for row in _rows_after(catalog, 0):
            if not check.feed(row):
                break
        return _Watch(check, offsets, unverifiable, forged, time.monotonic())

    def _extend(self, watch: _Watch, catalog: Catalog, keys: Mapping[str, bytes]) -> bool:
        """False when only a full verification will do."""
        check = watch.check
        if check.broken is not None or time.monotonic() - watch.full_at > self.full_every_s:
            return False
        if set(keys) != set(check.keys):
            return False  # a rotation: keys came or went
        if check.last_seq:
            row = catalog.query_one("SELECT hash, mac FROM audit WHERE seq = ?", (check.last_seq,))
            if row is None or (row["hash"], row["mac"] or "") != (check.last_hash, check.last_mac):
                return False
        authentic, unverifiable, forged = _sorted_anchors([anchor_file(catalog.path)], keys, watch.offsets)
        for seq, anchor in authentic.items():
            if seq <= check.last_seq:  # anchors lag: most name an entry already walked past
                row = catalog.query_one("SELECT hash, mac FROM audit WHERE seq = ?", (seq,))
                if row is None or (row["hash"], row["mac"] or "") != (anchor.hash, anchor.mac):
                    return False  # the full walk says where it broke
                check.anchors_compared += 1
            check.anchors[seq] = anchor
        watch.unverifiable += unverifiable
        watch.forged.extend(forged)
        for row in _rows_after(catalog, check.last_seq):
            if not check.feed(row):
                break
        return True
