"""Logs: one line per event on stderr, in logfmt, journald-friendly.

Under systemd (JOURNAL_STREAM set) each line starts with a `<N>` syslog priority that
journald turns into the entry's level. Fields are ids, counts and outcomes; callers
never pass key material or record contents (the audit trail has the same rule).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def _quote(value: Any) -> str:
    text = str(value)
    if text and all(c.isalnum() or c in "._-/:@+" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        parts = []
        if self.journald:
            parts.append(f"<{_PRIORITY.get(record.levelno, 6)}>")
        else:
            parts.append(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                         + f".{int(record.msecs):03d}Z")
        parts.append(f"level={record.levelname.lower()}")
        parts.append(f"event={_quote(getattr(record, 'event', record.getMessage()))}")
        parts.extend(f"{k}={_quote(v)}" for k, v in fields.items())
        if record.exc_info and record.levelno >= logging.ERROR:
            exc = record.exc_info[1]
            parts.append(f"error={_quote(type(exc).__name__ + ': ' + str(exc))}")
        return " ".join(parts)


class _NotClientErrors(logging.Filter):
    """aiohttp logs every malformed request head (a NUL in a header, a broken request line) with a
    traceback, after answering it 400: any client could write the log at will. Those records are the
    client's fault and are dropped; aiohttp's other errors still reach the log, as one line each."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or type(exc).__module__ != "aiohttp.http_exceptions"


def setup_logging(level: str = "info") -> None:
    root = logging.getLogger("garrison")
    root.setLevel(level.upper())
    if not any(getattr(h, "_garrison", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(LogfmtFormatter(journald=bool(os.environ.get("JOURNAL_STREAM"))))
        handler._garrison = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
        server = logging.getLogger("aiohttp.server")
        server.addFilter(_NotClientErrors())
        server.addHandler(handler)
        server.propagate = False
    # aiohttp's access log duplicates our request line; keep only its errors.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def set_level(level: str) -> None:
    logging.getLogger("garrison").setLevel(level.upper())


def log_event(logger: logging.Logger, event: str, *, level: int = logging.INFO, **fields: Any) -> None:
    logger.log(level, event, extra={"event": event, "fields": fields})
