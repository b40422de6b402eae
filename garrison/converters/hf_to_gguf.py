"""HF -> GGUF through llama.cpp's own reference converter, never one of ours.

The converter is unpacked by install.sh from the source distribution of the pinned
llama-cpp-python, so the GGUF it writes always matches the runtime's llama.cpp revision.
It runs in a subprocess (it imports torch and numpy at module level and prints freely);
its refusals become a `ConversionError` that names what is unsupported.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from garrison.errors import GarrisonError
from garrison.paths import converter_dir


class ConversionError(GarrisonError):
    """A conversion was refused or failed: an unsupported architecture, tokenizer or task, a broken model."""

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


def _llama_hf_vocab(tokenizer_json: dict[str, Any]) -> bool:
    """llama.cpp's LlamaHfVocab case: a SentencePiece-style BPE (byte fallback, a Sequence decoder) in
    tokenizer.json only. The converter then writes every token's score as a -1000 placeholder, and
    llama.cpp, which merges by score, tokenizes differently from the model's own tokenizer."""
    model = tokenizer_json.get("model") or {}
    decoder = tokenizer_json.get("decoder") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and decoder.get("type") == "Sequence"


@dataclass(frozen=True)
class TokenizerNeed:
    """A tokenizer file llama.cpp's converter needs for some architectures, and when."""

    architectures: frozenset[str]
    file: str
    applies: Callable[[dict[str, Any]], bool]  # on tokenizer.json, when `file` is absent
    why: str


# Folders the converter would convert into a GGUF that cannot tokenize as the model does: refused
# before converting, naming the missing file, rather than failing the parity gate afterwards.
TOKENIZER_NEEDS: tuple[TokenizerNeed, ...] = (
    TokenizerNeed(frozenset({"LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"}),
                  "tokenizer.model", _llama_hf_vocab,
                  "a SentencePiece tokenizer (tokenizer.json: BPE with byte fallback) whose SentencePiece model "
                  "file is missing; without it llama.cpp's converter gives every token a placeholder score and "
                  "the GGUF tokenizes differently from the model"),
)


def check_tokenizer_files(model_dir: Path) -> None:
    """Refuse (`tokenizer_incomplete`, naming the file) a folder whose tokenizer the converter cannot reproduce."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # nothing to judge here: the converter itself says what it cannot read
    architectures = set(config.get("architectures") or [])
    for need in TOKENIZER_NEEDS:
        if architectures & need.architectures and not (model_dir / need.file).is_file() \
                and need.applies(tokenizer_json):
            raise ConversionError(f"the tokenizer of {model_dir.name} is incomplete: `{need.file}` is missing. It is "
                                  f"{need.why}. Put the model's original {need.file} in the folder and import it "
                                  "again", code="tokenizer_incomplete")


def converter_script(name: str = "convert_hf_to_gguf.py") -> Path:
    script = converter_dir() / name
    if not script.exists():
        raise ConversionError(f"llama.cpp's converter is not installed at {script}; run ./install.sh",
                              code="converter_missing")
    return script


def run_converter(script_name: str, args: list[str], out_file: Path, *, timeout_s: float = 3600) -> Path:
    """Run one of llama.cpp's converter scripts into a temporary name, then rename.

    A killed conversion leaves only a hidden `.partial` file, never a visible artifact;
    the converter's refusals become a ConversionError that names what is unsupported.
    """
    script = converter_script(script_name)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(f".{out_file.name}.partial")
    # The script puts its own gguf-py (same revision) first on sys.path unless NO_LOCAL_GGUF is set.
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    proc = subprocess.run([sys.executable, str(script), *args, "--outfile", str(partial)],
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
        raise ConversionError(f"llama.cpp's {script_name} failed (exit {proc.returncode}): {tail}")
    with partial.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(partial, out_file)
    return out_file


def _check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise ConversionError(f"unknown GGUF output type {outtype!r}; choose from {', '.join(OUTTYPES)}",
                              code="invalid_outtype")


def convert_hf_to_gguf(model_dir: Path, out_file: Path, outtype: str = "f16", *, timeout_s: float = 3600) -> Path:
    _check_outtype(outtype)
    check_tokenizer_files(model_dir)
    return run_converter("convert_hf_to_gguf.py", [str(model_dir), "--outtype", outtype], out_file,
                         timeout_s=timeout_s)


def convert_lora_to_gguf(adapter_dir: Path, base_dir: Path, out_file: Path, outtype: str = "f16", *,
                         timeout_s: float = 3600) -> Path:
    """A peft adapter folder -> GGUF LoRA adapter, which the engine attaches per request to its base."""
    _check_outtype(outtype)
    if not (adapter_dir / "adapter_config.json").exists():
        raise ConversionError(f"{adapter_dir} is not a peft adapter folder (no adapter_config.json)",
                              code="invalid_adapter")
    return run_converter("convert_lora_to_gguf.py", [str(adapter_dir), "--base", str(base_dir),
                                                     "--outtype", outtype], out_file, timeout_s=timeout_s)


def ensure_gguf(model_dir: Path, outtype: str = "f16") -> Path:
    """The model converted once by llama.cpp's reference converter, cached beside it."""
    out = model_dir.parent / f"{model_dir.name}.{outtype}.gguf"
    if not out.exists():
        convert_hf_to_gguf(model_dir, out, outtype)
    return out
