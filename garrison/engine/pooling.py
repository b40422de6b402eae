"""Sentence-embedding pooling in numpy, configured by the model's own sentence-transformers files.

An encoder returns one vector per token; how those become one vector per text is part of
the model (it was trained with it), so it is read from the model folder, never chosen by
us: modules.json names the Pooling module's folder, whose config.json sets the modes, and
a Normalize module means unit-length vectors. Folders without those files get mean pooling
and normalization, what most embedding models use.

Pure numpy, so the daemon needs neither torch nor sentence-transformers to serve embeddings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from garrison.errors import ConfigError

FloatArray = npt.NDArray[np.float32]

# sentence-transformers' config key for each mode, in the order it concatenates them.
MODE_KEYS: tuple[tuple[str, str], ...] = (
    ("cls", "pooling_mode_cls_token"),
    ("max", "pooling_mode_max_tokens"),
    ("mean", "pooling_mode_mean_tokens"),
    ("mean_sqrt_len", "pooling_mode_mean_sqrt_len_tokens"),
    ("weightedmean", "pooling_mode_weightedmean_tokens"),
    ("lasttoken", "pooling_mode_lasttoken"),
)
MODES = tuple(mode for mode, _ in MODE_KEYS)


@dataclass(frozen=True)
class PoolingConfig:
    """Pooling modes (concatenated in this order when several are on) and whether to L2-normalize."""

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = True

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> PoolingConfig:
        """Read modules.json + the Pooling folder's config.json; defaults when the folder has neither."""
        model_dir = Path(model_dir)
        modules_file = model_dir / "modules.json"
        if not modules_file.is_file():
            return cls()
        modules = _read_json(modules_file)
        if not isinstance(modules, list):
            raise ConfigError(f"{modules_file} is not a list of modules")
        types = [str(m.get("type", "")) for m in modules if isinstance(m, dict)]
        normalize = any(t.endswith("Normalize") for t in types)
        pooling_dirs = [str(m.get("path", "")) for m in modules
                        if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling")]
        if not pooling_dirs:
            return cls(modes=("mean",), normalize=normalize)
        config_file = model_dir / pooling_dirs[0] / "config.json"
        if not config_file.is_file():
            return cls(modes=("mean",), normalize=normalize)
        config = _read_json(config_file)
        if not isinstance(config, dict):
            raise ConfigError(f"{config_file} is not a JSON object")
        modes = modes_from_config(config)
        return cls(modes=modes, normalize=normalize)


def modes_from_config(config: dict[str, Any]) -> tuple[str, ...]:
    """Modes switched on in a sentence-transformers Pooling config ("pooling_mode" string or flags)."""
    named = config.get("pooling_mode")
    if isinstance(named, str):
        alias = {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max"}.get(named, named)
        if alias not in MODES:
            raise ConfigError(f"unknown pooling mode {named!r}; supported: {', '.join(MODES)}")
        return (alias,)
    modes = tuple(mode for mode, key in MODE_KEYS if config.get(key))
    return modes or ("mean",)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from err


def pool(hidden: npt.NDArray[Any], mask: npt.NDArray[Any], modes: tuple[str, ...]) -> FloatArray:
    """[batch, tokens, dim] hidden states + [batch, tokens] attention mask -> [batch, dim * len(modes)].

    Padding positions never contribute (padded batches pool exactly like single texts).
    Computed in float32 even for fp16 models: sums over hundreds of tokens lose precision in fp16.
    """
    h = hidden.astype(np.float32, copy=False)
    m = mask.astype(np.float32)[:, :, None]
    parts: list[FloatArray] = []
    for mode in modes:
        if mode == "cls":
            parts.append(h[:, 0])
        elif mode == "max":
            parts.append(np.where(m > 0, h, np.float32(-1e9)).max(axis=1))
        elif mode in ("mean", "mean_sqrt_len"):
            counts = np.clip(m.sum(axis=1), 1e-9, None)
            summed = (h * m).sum(axis=1)
            parts.append(summed / (counts if mode == "mean" else np.sqrt(counts)))
        elif mode == "weightedmean":
            weights = m * np.arange(1, h.shape[1] + 1, dtype=np.float32)[None, :, None]
            parts.append((h * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None))
        elif mode == "lasttoken":
            # Right padding: the last real token is at (number of real tokens - 1).
            last = np.clip(mask.sum(axis=1).astype(np.int64) - 1, 0, None)
            parts.append(h[np.arange(h.shape[0]), last])
        else:
            raise ConfigError(f"unknown pooling mode {mode!r}; supported: {', '.join(MODES)}")
    out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    return np.ascontiguousarray(out, dtype=np.float32)


def l2_normalize(vectors: FloatArray) -> FloatArray:
    """Unit-length rows; an all-zero row stays zero instead of becoming NaN."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    result: FloatArray = (vectors / np.clip(norms, 1e-12, None)).astype(np.float32, copy=False)
    return result
