"""The audit trail's anchors: its head, written outside the catalog where a catalog edit cannot reach.

A MACed chain stops anyone without the master key from rewriting entries, but not from deleting
the newest ones (or all of them): what is left still verifies. So the head (sequence number, hash,
MAC) is also written, as one JSON line MACed under the audit key, to an append-only file in the
state folder (`audit-anchors.jsonl`, fsynced; an operator can make it kernel-enforced append-only
with `chattr +a`) and, under systemd, to the journal. `garrison audit verify` compares the catalog
with them: an anchored sequence number past the catalog's last entry is a truncation, a different
hash or MAC at an anchored sequence number is a rewrite.

Anchors name only committed entries: a line is written after the entry it names is visible to a
fresh connection (the writer's own transaction could still roll back), so an anchor never names
an entry that does not exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import socket
import sqlite3
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from garrison.paths import StateLayout
from garrison.store.durable import fsync_dir

#: journald's native protocol socket (systemd.journal-fields(7)); a module value so tests can point it
#: at a socket of their own.
JOURNAL_SOCKET = "/run/systemd/journal/socket"
JOURNAL_IDENTIFIER = "garrison-audit"
_ANCHOR_INFO = "garrison audit anchor v1"
_TAIL_BYTES = 4096


@dataclass(frozen=True)
class Anchor:
    """A head of the trail as it was once seen: entry `seq` had this hash and MAC."""

    seq: int
    hash: str
    mac: str
    kcv: str  # the entry's key
    at: float
    reason: str
    akcv: str  # the key the anchor line itself is MACed with
    amac: str

    def payload(self) -> dict[str, Any]:
        return {"v": 1, "seq": self.seq, "hash": self.hash, "mac": self.mac, "kcv": self.kcv, "at": self.at,
                "reason": self.reason, "akcv": self.akcv}

    def line(self) -> str:
        return json.dumps({**self.payload(), "amac": self.amac}, sort_keys=True, separators=(",", ":"))

    def authentic(self, keys: Mapping[str, bytes]) -> bool | None:
        """True / False, or None when the key it was MACed with is not here (rotated away)."""
        key = keys.get(self.akcv)
        return None if key is None else hmac.compare_digest(self.amac, _anchor_mac(key, self.payload()))


def _anchor_mac(key: bytes, payload: Mapping[str, Any]) -> str:
    message = _ANCHOR_INFO + json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def make_anchor(head: sqlite3.Row, *, akcv: str, key: bytes, reason: str) -> Anchor:
    """An anchor of an entry row (seq, hash, mac, kcv), MACed under `key` (check value `akcv`)."""
    seq, digest, mac, kcv, at = int(head["seq"]), str(head["hash"]), str(head["mac"]), str(head["kcv"]), time.time()
    payload = {"v": 1, "seq": seq, "hash": digest, "mac": mac, "kcv": kcv, "at": at, "reason": reason, "akcv": akcv}
    return Anchor(seq=seq, hash=digest, mac=mac, kcv=kcv, at=at, reason=reason, akcv=akcv,
                  amac=_anchor_mac(key, payload))


def anchor_file(catalog_path: Path) -> Path:
    return StateLayout(Path(catalog_path).parent).audit_anchors


def parse_anchor(text: str) -> Anchor | None:
    """One line of an anchor file, or a journal line that holds one (anything before the JSON is skipped)."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        data = json.loads(text[start:])
        return Anchor(seq=int(data["seq"]), hash=str(data["hash"]), mac=str(data["mac"]), kcv=str(data["kcv"]),
                      at=float(data["at"]), reason=str(data["reason"]), akcv=str(data["akcv"]),
                      amac=str(data["amac"]))
    except (ValueError, KeyError, TypeError):
        return None  # a line torn by a crash mid-write: it anchors nothing


def read_anchors(path: Path, offset: int = 0) -> tuple[list[Anchor], int]:
    """The anchors in `path` from byte `offset` on, and the offset after the last complete line."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    complete = data[: data.rfind(b"\n") + 1]
    anchors = [a for a in (parse_anchor(line.decode("utf-8", "replace")) for line in complete.splitlines()) if a]
    return anchors, offset + len(complete)


def last_anchor(path: Path) -> Anchor | None:
    """The newest line (appends are in commit order, bar a shutdown anchor racing a writer)."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - _TAIL_BYTES))
            tail = fh.read()
    except FileNotFoundError:
        return None
    for line in reversed(tail.splitlines()):
        anchor = parse_anchor(line.decode("utf-8", "replace"))
        if anchor is not None:
            return anchor
    return None


def committed_head(catalog_path: Path) -> sqlite3.Row | None:
    """The newest committed entry, seen from a connection of its own (the caller may be mid-transaction)."""
    conn = sqlite3.connect(str(catalog_path), timeout=30)
    try:
        conn.row_factory = sqlite3.Row
        row: sqlite3.Row | None = conn.execute(
            "SELECT seq, hash, mac, kcv FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        return row
    finally:
        conn.close()


def write_anchor(path: Path, anchor: Anchor) -> None:
    """Append one line, fsynced (O_APPEND: concurrent writers never interleave within a line)."""
    line = (anchor.line() + "\n").encode()
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)
    send_to_journal(anchor)


def under_systemd(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return bool(env.get("INVOCATION_ID") or env.get("JOURNAL_STREAM"))


def send_to_journal(anchor: Anchor, env: Mapping[str, str] | None = None) -> bool:
    """The anchor as a structured journal entry (MESSAGE is the anchor line itself, so
    `journalctl -t garrison-audit -o cat` gives a file `garrison audit verify --anchors` reads).

    The native socket first; if it cannot be reached, stderr, which journald captures for a service.
    Never raises: the anchor file is the record, the journal a second copy off the catalog's disk.
    """
    if not under_systemd(env):
        return False
    fields = {"MESSAGE": anchor.line(), "SYSLOG_IDENTIFIER": JOURNAL_IDENTIFIER, "PRIORITY": "6",
              "GARRISON_AUDIT_SEQ": str(anchor.seq), "GARRISON_AUDIT_MAC": anchor.mac,
              "GARRISON_AUDIT_REASON": anchor.reason}
    datagram = "".join(f"{k}={v}\n" for k, v in fields.items()).encode()
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(datagram, JOURNAL_SOCKET)
        return True
    with contextlib.suppress(OSError, ValueError):
        print(f"{JOURNAL_IDENTIFIER}: {anchor.line()}", file=sys.stderr, flush=True)
        return True
    return False
