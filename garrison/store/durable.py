"""Durability helpers shared by everything that publishes files with a rename.

A rename is durable only once the folder holding it is fsynced; every atomic write in
Garrison (models, vault versions, identity, checkpoints, inbox moves) ends with this call.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace `path` with `text` so that a crash leaves the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def keep_previous(path: Path, previous: Path) -> None:
    """Make `previous` a copy of `path` (a hard link) while `path` stays in place, atomically."""
    tmp = previous.with_name(f".{previous.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.link(path, tmp)
    os.replace(tmp, previous)
    fsync_dir(path.parent)
