"""HF -> GGUF through llama.cpp's own reference converter, never one of ours.

The converter is unpacked by install.sh from the source distribution of the pinned
llama-cpp-python, so the GGUF it writes always matches the runtime's llama.cpp revision.
It runs in a subprocess (it imports torch and numpy at module level and prints freely);
its refusals become a `ConversionError` that names what is unsupported.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from garrison.errors import GarrisonError
from garrison.paths import converter_dir


class ConversionError(GarrisonError):
    code = "conversion_failed"
    http_status = 422
    exit_code = 11
    error_type = "invalid_request_error"


@dataclass(frozen=True)
class Refusal:
    pattern: str
    code: str
    explain: str


# What the reference converter says when it cannot handle a model, and how we say it.
REFUSALS: tuple[Refusal, ...] = (
    Refusal(r"BPE pre-tokenizer was not recognized", "unsupported_tokenizer",
            "llama.cpp does not recognize this model's BPE pre-tokenizer (it identifies pre-tokenizers "
            "by the vocabularies of known models); use a SentencePiece tokenizer or a known model's"),
    Refusal(r"Model (\S+) is not supported", "unsupported_architecture",
            "llama.cpp's converter does not support this architecture"),
    Refusal(r"Can not map tensor '([^']+)'", "unsupported_tensor",
            "llama.cpp's converter cannot map a tensor of this model"),
)

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def converter_script() -> Path:
    script = converter_dir() / "convert_hf_to_gguf.py"
    if not script.exists():
        raise ConversionError(f"llama.cpp's converter is not installed at {script}; run ./install.sh",
                              code="converter_missing")
    return script


def convert_hf_to_gguf(model_dir: Path, out_file: Path, outtype: str = "f16", *, timeout_s: float = 3600) -> Path:
    """Convert into a temporary name and rename, so a killed conversion leaves nothing half-written."""
    if outtype not in OUTTYPES:
        raise ConversionError(f"unknown GGUF output type {outtype!r}; choose from {', '.join(OUTTYPES)}",
                              code="invalid_outtype")
    script = converter_script()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(f".{out_file.name}.partial")
    # The script puts its own gguf-py (same revision) first on sys.path unless NO_LOCAL_GGUF is set.
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    proc = subprocess.run(
        [sys.executable, str(script), str(model_dir), "--outfile", str(partial), "--outtype", outtype],
        capture_output=True, text=True, env=env, timeout=timeout_s)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        output = proc.stderr + proc.stdout
        for refusal in REFUSALS:
            match = re.search(refusal.pattern, output)
            if match:
                detail = f" ({match.group(1)})" if match.groups() else ""
                raise ConversionError(f"{refusal.explain}{detail}", code=refusal.code)
        tail = "\n".join(output.strip().splitlines()[-5:])
        raise ConversionError(f"llama.cpp's converter failed (exit {proc.returncode}): {tail}")
    with partial.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(partial, out_file)
    return out_file
