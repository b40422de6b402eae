"""The `export` job kind: a Hugging Face model to GGUF and ONNX artifacts, each gated and signed.

For every target the job converts (llama.cpp's reference converter, `llama_model_quantize`,
optimum-onnx), runs the parity gate against the float32 source, and publishes the result
as a model of its own (`NAME:q4_k_m`, `NAME:onnx-int8`) with a signed manifest carrying
lineage and parity. Work happens in the job's scratch folder; publishing is the registry's
atomic import, so a killed job leaves no artifact listed and a rerun starts clean. An
artifact that fails the gate is recorded with its parity and never served.
"""

from __future__ import annotations

import importlib.metadata
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from garrison.converters.hf_to_gguf import ConversionError
from garrison.errors import InvalidRequest, JobFailed
from garrison.jobs.context import JobContext
from garrison.models.names import check_model_id

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


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("llama-cpp-python", "optimum", "optimum-onnx", "onnxruntime", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _build(target: Target, source: Path, work: Path, cache: dict[str, Path], imatrix: Path | None) -> Path:
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


def run(ctx: JobContext) -> dict[str, Any]:
    from garrison.models.registry import ModelRegistry

    name = check_model_id(ctx.params["model"], param="model")
    registry = ModelRegistry(ctx.store.catalog, ctx.layout, signer=ctx.identity)
    source = registry.get(name)
    if source.format not in ("hf", "peft"):
        raise InvalidRequest(f"model {name!r} is a {source.format} model; export takes a Hugging Face model or "
                             "a peft adapter", param="model", code="export_needs_hf_model")
    targets = parse_targets(ctx.params["to"], source.format)
    if source.format == "peft":
        return run_adapter_export(ctx, registry, source, targets)
    return run_model_export(ctx, registry, source, targets)


def run_model_export(ctx: JobContext, registry: Any, source: Any, targets: list[Target]) -> dict[str, Any]:
    """Convert, gate and publish each target of a Hugging Face model (shared with fine-tuning jobs)."""
    from garrison.converters.parity import check_parity

    name = source.name
    registry.verify(source)
    work = ctx.layout.jobs / ctx.job.id / f"export-{name.replace(':', '-')}"
    shutil.rmtree(work, ignore_errors=True)  # an earlier attempt's half-made files
    work.mkdir(parents=True)
    quantized = any(t.format == "gguf" and t.variant not in GGUF_DIRECT for t in targets)
    imatrix = _imatrix(ctx, source.folder, work, str(ctx.params.get("imatrix") or "")) if quantized else None
    cache: dict[str, Path] = {}
    results: list[dict[str, Any]] = []
    steps = 2 * len(targets)
    try:
        for i, target in enumerate(targets):
            ctx.check()
            ctx.progress(2 * i, steps, f"converting {name} to {target.kind}", force=True)
            try:
                artifact = _build(target, source.folder, work, cache, imatrix)
            except ConversionError as exc:
                raise JobFailed(f"{target.kind}: {exc.message}", code=exc.code) from None
            ctx.check()
            ctx.progress(2 * i + 1, steps, f"parity gate {target.kind}", force=True)
            parity = check_parity(source.folder, artifact, target.kind)
            published = f"{name.replace(':', '-')}:{target.suffix}"
            if registry.exists(published):
                registry.remove(published)
            lineage = {"source": name, "source_manifest_signature": source.manifest.get("signature"),
                       "target": target.kind, "job": ctx.job.id, "versions": _versions(),
                       "quantization": {"type": target.variant,
                                        "imatrix": ctx.params.get("imatrix") or None if imatrix else None}}
            settings = {k: source.settings.get(k) for k in ("n_parallel", "n_ctx_per_slot", "n_gpu_layers")}
            record = registry.import_path(artifact, published, lineage=lineage, parity=parity.to_json(),
                                          settings=settings)
            ctx.event("artifact", f"{published}: parity {'passed' if parity.passed else 'FAILED'}",
                      model=published, parity=parity.to_json())
            results.append({"model": record.name, "format": record.format, "size_bytes": record.size_bytes,
                            "servable": record.servable, "parity": parity.to_json()})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ctx.progress(steps, steps, "done", force=True)
    _fail_on_parity(results)
    return {"model": name, "artifacts": results}


def _imatrix(ctx: JobContext, model_dir: Path, work: Path, spec: str) -> Path | None:
    """"" (none), "builtin" (calibration text every machine has), "dataset:NAME[:N]" (an ingested
    dataset, decrypted in memory only) or the path of an imatrix file made elsewhere."""
    from garrison.converters.imatrix import builtin_calibration, compute_imatrix, record_texts

    if not spec:
        return None
    if spec == "builtin":
        ctx.progress(0, 1, "computing the importance matrix from built-in calibration text", force=True)
        return compute_imatrix(model_dir, builtin_calibration(), work / "imatrix.gguf", label="builtin")
    if spec.startswith("dataset:"):
        from garrison.ingest.vault import Vault
        from garrison.training.job import open_dataset

        master = ctx.master_key()
        ref, reader = open_dataset(Vault(ctx.layout, ctx.store.catalog, lambda: master), spec[len("dataset:"):],
                                   "imatrix")
        ctx.progress(0, 1, f"computing the importance matrix from dataset {ref}", force=True)
        return compute_imatrix(model_dir, record_texts(reader.records()), work / "imatrix.gguf", label=ref)
    path = Path(spec)
    if not path.is_file():
        raise InvalidRequest(f"importance matrix {spec!r} is not builtin, dataset:NAME or a file", param="imatrix",
                             code="imatrix_invalid")
    return path


def _fail_on_parity(results: list[dict[str, Any]]) -> None:
    failed = [r for r in results if r["parity"] is not None and not r["parity"]["passed"]]
    if failed:
        raise JobFailed("parity gate failed for " + "; ".join(f"{r['model']}: {r['parity']['reason']}"
                                                              for r in failed)
                        + " (recorded, never served)", code="parity_failed")


def _serving_base(registry: Any, hf_base: str, requested: str) -> Any:
    """The GGUF model an adapter is served on: the one asked for, else the base's best GGUF export."""
    if requested:
        record = registry.get(requested)
        if record.format != "gguf" or record.manifest.get("lineage", {}).get("source") not in (hf_base, None):
            raise InvalidRequest(f"{requested!r} is not a GGUF export of {hf_base!r}", param="base_gguf")
        return record
    exports = {r.name: r for r in registry.list()
               if r.format == "gguf" and r.manifest.get("lineage", {}).get("source") == hf_base and r.servable}
    for variant in ("f16", "bf16", "f32", "q8_0", "q6_k", "q5_k_m", "q4_k_m"):
        if f"{hf_base}:{variant}" in exports:
            return exports[f"{hf_base}:{variant}"]
    if exports:
        return next(iter(exports.values()))
    raise JobFailed(f"no GGUF export of {hf_base!r} to serve the adapter on; run `garrison export {hf_base} "
                    "--to gguf:f16` first", code="adapter_base_missing")


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


def run_adapter_export(ctx: JobContext, registry: Any, source: Any, targets: list[Target]) -> dict[str, Any]:
    """A peft adapter to a GGUF LoRA on its base's GGUF export, and/or a merged model."""
    from garrison.converters.hf_to_gguf import convert_lora_to_gguf
    from garrison.converters.parity import check_parity

    hf_base = registry.get(source.base)
    registry.verify(source)
    work = ctx.layout.jobs / ctx.job.id / f"adapter-{source.name.replace(':', '-')}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results: list[dict[str, Any]] = []
    try:
        ctx.progress(0, 3, "merging the adapter into its base (the parity reference)", force=True)
        merged = merge_adapter(source.folder, hf_base.folder, work / "merged")
        for target in targets:
            ctx.check()
            published = f"{source.name}:{target.suffix}"
            lineage = {"source": source.name, "base": hf_base.name, "target": target.kind, "job": ctx.job.id,
                       "versions": _versions()}
            if registry.exists(published):
                registry.remove(published)
            if target.format == "hf":
                record = registry.import_path(merged, published, lineage=lineage)
                results.append({"model": record.name, "format": record.format, "parity": None})
                continue
            ctx.progress(1, 3, "converting the adapter with llama.cpp's convert_lora_to_gguf.py", force=True)
            try:
                lora = convert_lora_to_gguf(source.folder, hf_base.folder, work / "adapter.gguf")
            except ConversionError as exc:
                raise JobFailed(f"{target.kind}: {exc.message}", code=exc.code) from None
            base = _serving_base(registry, hf_base.name, ctx.params.get("base_gguf", ""))
            ctx.progress(2, 3, f"parity gate: {base.name} + adapter against the merged model", force=True)
            variant = base.name.partition(":")[2] or "f16"
            parity = check_parity(merged, base.entry_path, "gguf:lora", lora=lora,
                                  threshold_kind=f"gguf:{variant}")
            record = registry.import_path(lora, published, base=base.name, lineage=lineage,
                                          parity=parity.to_json())
            results.append({"model": record.name, "format": record.format, "base": base.name,
                            "servable": record.servable, "parity": parity.to_json()})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ctx.progress(3, 3, "done", force=True)
    _fail_on_parity(results)
    return {"model": source.name, "artifacts": results}
