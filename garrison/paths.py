"""Where Garrison's files live: the state folder's layout and the installed tools.

One place names every path so the daemon, the CLI and the workers agree on them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"  # below a fine-tuning job's training folder: its encrypted checkpoints


@dataclass(frozen=True)
class StateLayout:
    """The state folder (systemd's StateDirectory) and what lives in it."""

    root: Path

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.db"

    @property
    def vault(self) -> Path:
        return self.root / "vault"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def identity(self) -> Path:
        return self.root / "identity"

    @property
    def jobs(self) -> Path:
        """Per-job scratch and checkpoints (encrypted where they hold data)."""
        return self.root / "jobs"

    def training_folder(self, job_id: str) -> Path:
        """A fine-tuning job's work folder (the trainer writes its checkpoints below it)."""
        return self.jobs / job_id / "train"

    def checkpoint_folder(self, job_id: str) -> Path:
        """A fine-tuning job's encrypted checkpoints: one rule for the trainer and the API that lists them."""
        return self.training_folder(job_id) / CHECKPOINTS

    @property
    def cache(self) -> Path:
        """What is costly to rebuild and safe to lose (the PII prefilter's compiled database)."""
        return self.root / "cache"

    @property
    def daemon_lock(self) -> Path:
        return self.root / "daemon.lock"

    @property
    def audit_anchors(self) -> Path:
        """The audit trail's head, appended every N entries and at shutdown (garrison.policies.audit_anchors)."""
        return self.root / "audit-anchors.jsonl"

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for sub in (self.vault, self.models, self.inbox, self.identity, self.jobs, self.cache):
            sub.mkdir(exist_ok=True, mode=0o700)


def converter_dir() -> Path:
    """llama.cpp's reference converter, installed by install.sh beside the venv.

    install.sh unpacks it from the source distribution of the pinned llama-cpp-python,
    so conversion always matches the runtime's llama.cpp revision.
    """
    override = os.environ.get("GARRISON_CONVERTER_DIR")
    if override:
        return Path(override)
    return Path(sys.prefix) / "share" / "garrison" / "llama.cpp"


# gguf-py's package imports its vocabulary helpers, which load these native tokenizer libraries when they are
# installed (they are, for training). Nothing Garrison does with gguf-py in-process needs them (the converter runs
# as its own process), and the daemon, which reads GGUF headers, keeps native code out of its process.
_TOKENIZER_LIBRARIES = ("sentencepiece", "mistral_common")


def import_gguf_py() -> Any:
    """gguf-py at the runtime's revision, installed beside llama.cpp's converter (not a pip dependency), imported
    without the tokenizer libraries: `import sentencepiece` fails while it loads, which gguf-py expects and
    tolerates, and works again afterwards for whoever needs it."""
    hidden = [name for name in _TOKENIZER_LIBRARIES if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        return _import_gguf()
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        folder = converter_dir() / "gguf-py"
        if not folder.is_dir():
            from garrison.errors import ConfigError

            raise ConfigError(f"reading GGUF files needs gguf-py at {folder}; run ./install.sh",
                              code="converter_missing") from None
        sys.path.insert(0, str(folder))
        import gguf
    return gguf


def cache_dir() -> Path:
    """Built artifacts that are costly to remake (default base model, test models)."""
    override = os.environ.get("GARRISON_CACHE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "garrison"
