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
