"""Export targets and builds: what a source can become, and how one artifact is made.

The job that drives them (convert, gate on parity, sign, publish) is `garrison.jobs.export`:
this module knows conversion and nothing of jobs, grants or the catalog.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from garrison.errors import InvalidRequest

GGUF_DIRECT = ("f32", "f16", "bf16")  # written by the converter itself
ONNX_PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Target:
    format: str  # gguf | onnx
    variant: str  # q4_k_m, f16, int8...

    @property
    def kind(self) -> str:
        """The parity table's key."""
        return f"{self.format}:{self.variant}"

    @property
    def suffix(self) -> str:
        """The published id's variant: NAME:q4_k_m, NAME:onnx-int8, NAME:lora, NAME:merged."""
        return f"onnx-{self.variant}" if self.format == "onnx" else self.variant


def allowed_targets(source_format: str | None = None) -> dict[str, set[str]]:
    """What each kind of source can become: a model converts and quantizes, an adapter converts or merges."""
    from garrison.converters.quantize import QUANT_TYPES

    by_source = {"hf": {"gguf": set(GGUF_DIRECT) | set(QUANT_TYPES), "onnx": set(ONNX_PRECISIONS)},
                 "peft": {"gguf": {"lora"}, "hf": {"merged"}}}
    if source_format is not None:
        return by_source.get(source_format, {})
    union: dict[str, set[str]] = {}
    for table in by_source.values():
        for fmt, variants in table.items():
            union.setdefault(fmt, set()).update(variants)
    return union


def parse_targets(spec: str, source_format: str | None = None) -> list[Target]:
    """"gguf:q4_k_m,onnx:int8" -> targets, checked against the table of what the source can become."""
    allowed = allowed_targets(source_format)
    targets: list[Target] = []
    for item in (part.strip().lower() for part in spec.split(",")):
        fmt, sep, variant = item.partition(":")
        if not sep or fmt not in allowed or variant not in allowed[fmt]:
            options = "; ".join(f"{f}:{'|'.join(sorted(v))}" for f, v in allowed.items())
            raise InvalidRequest(f"unknown export target {item!r}; targets: {options}", param="to",
                                 code="unknown_export_target")
        target = Target(fmt, variant)
        if target not in targets:
            targets.append(target)
    if not targets:
        raise InvalidRequest("at least one export target is required", param="to")
    return targets


def tool_versions() -> dict[str, str]:
    out = {}
    for dist in ("llama-cpp-python", "optimum", "optimum-onnx", "onnxruntime", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def build_target(target: Target, source: Path, work: Path, cache: dict[str, Path], imatrix: Path | None) -> Path:
    """One artifact in the scratch folder; shared intermediates (F16 GGUF, fp32 ONNX) made once."""
    from garrison.converters.hf_to_gguf import convert_hf_to_gguf

    if target.format == "gguf":
        if target.variant in GGUF_DIRECT:
            return convert_hf_to_gguf(source, work / f"model.{target.variant}.gguf", target.variant)
        from garrison.converters.quantize import quantize_gguf

        if "f16" not in cache:
            cache["f16"] = convert_hf_to_gguf(source, work / "model.f16.gguf", "f16")
        return quantize_gguf(cache["f16"], work / f"model.{target.variant}.gguf", target.variant, imatrix=imatrix)
    from garrison.converters.hf_to_onnx import export_hf_to_onnx, quantize_onnx_dir

    if "onnx-fp32" not in cache:
        cache["onnx-fp32"] = export_hf_to_onnx(source, work / "onnx-fp32").path
    if target.variant == "fp32":
        return cache["onnx-fp32"]
    return quantize_onnx_dir(cache["onnx-fp32"], work / f"onnx-{target.variant}", target.variant).path


def merge_adapter(adapter_dir: Path, base_dir: Path, out: Path) -> Path:
    """peft's merge_and_unload: the adapter folded into a full copy of its base's weights."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out
