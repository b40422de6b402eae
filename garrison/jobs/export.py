"""The `export` job kind: a Hugging Face model to GGUF and ONNX artifacts, each gated and signed.

For every target the job converts (llama.cpp's reference converter, `llama_model_quantize`,
optimum-onnx), runs the parity gate against the float32 source, and publishes the result
as a model of its own (`NAME:q4_k_m`, `NAME:onnx-int8`) with a signed manifest carrying
lineage and parity. Work happens in the job's scratch folder; publishing is the registry's
atomic import, so a killed job leaves no artifact listed and a rerun starts clean. An
artifact that fails the gate is recorded with its parity and never served.

Every model and dataset the job opens is authorized again against the job's principal
(`ctx.authorize`) just before it is opened, not only when the job was queued.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from garrison.converters.export import GGUF_DIRECT, Target, build_target, merge_adapter, parse_targets, tool_versions
from garrison.converters.hf_to_gguf import ConversionError, check_tokenizer_files
from garrison.errors import InvalidRequest, JobFailed, PermissionDenied
from garrison.jobs.context import JobContext
from garrison.jobs.grants import IMATRIX_BUILTIN, IMATRIX_DATASET, job_resources
from garrison.models.names import check_model_id
from garrison.models.registry import ModelRecord, ModelRegistry
from garrison.policies.keys import Principal
from garrison.store.catalog import Catalog


def _source_targets(source: ModelRecord, spec: str) -> list[Target]:
    if source.format not in ("hf", "peft"):
        raise InvalidRequest(f"model {source.name!r} is a {source.format} model; export takes a Hugging Face model "
                             "or a peft adapter", param="model", code="export_needs_hf_model")
    return parse_targets(spec, source.format)


def _imatrix_file(who: Principal, spec: str) -> Path:
    """An imatrix made elsewhere, by path: host paths are the machine administrator's to name (as for
    model imports), and a key without `admin` learns nothing of which paths exist."""
    if "admin" not in who.scopes:
        raise PermissionDenied("only an admin key may name a file on this machine as the importance matrix; "
                               "use builtin or dataset:NAME", code="host_path_not_allowed", param="imatrix")
    path = Path(spec)
    if not path.is_absolute() or not path.is_file() or path.suffix != ".gguf":
        raise InvalidRequest(f"importance matrix {spec[:200]!r} is not builtin, dataset:NAME or the absolute path of "
                             "an imatrix .gguf file", param="imatrix", code="imatrix_invalid")
    return path


def check(catalog: Catalog, registry: ModelRegistry, who: Principal, params: dict[str, Any]) -> None:
    """At submission, after grants: what would otherwise fail only inside the worker fails here with a 400/404."""
    source = registry.get(check_model_id(params["model"], param="model"))
    targets = _source_targets(source, params["to"])
    if source.format == "hf" and any(t.format == "gguf" for t in targets):
        check_tokenizer_files(source.folder)  # tokenizer_incomplete now, not after a conversion
    spec = str(params.get("imatrix") or "")
    if spec and spec != IMATRIX_BUILTIN and not spec.startswith(IMATRIX_DATASET):
        _imatrix_file(who, spec)
    elif spec.startswith(IMATRIX_DATASET):
        from garrison.ingest.datasets import DatasetStore, resolve_reference

        name, version = resolve_reference(catalog, spec[len(IMATRIX_DATASET):], "imatrix")
        DatasetStore(catalog).version(name, version)
    if params.get("base_gguf"):
        base = registry.get(check_model_id(params["base_gguf"], param="base_gguf"))
        if base.format != "gguf":
            raise InvalidRequest(f"base_gguf {base.name!r} is not a GGUF model", param="base_gguf")
        if not base.servable:
            raise InvalidRequest(f"base_gguf {base.name!r} failed its parity gate and is never served: "
                                 f"{parity_report(base)}", param="base_gguf", code="base_parity_failed")
    job_resources(catalog, registry, "export", params)  # every reference resolves


def run(ctx: JobContext) -> dict[str, Any]:
    registry = ModelRegistry(ctx.store.catalog, ctx.layout, signer=ctx.identity)
    source = ctx.open_model(registry, ctx.params["model"])
    targets = _source_targets(source, ctx.params["to"])
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
                artifact = build_target(target, source.folder, work, cache, imatrix)
            except ConversionError as exc:
                raise JobFailed(f"{target.kind}: {exc.message}", code=exc.code) from None
            ctx.check()
            ctx.progress(2 * i + 1, steps, f"parity gate {target.kind}", force=True)
            parity = check_parity(source.folder, artifact, target.kind)
            published = f"{name.replace(':', '-')}:{target.suffix}"
            if registry.exists(published):
                registry.remove(published, actor=ctx.principal.actor)
            lineage = {"source": name, "source_manifest_signature": source.manifest.get("signature"),
                       "target": target.kind, "job": ctx.job.id, "versions": tool_versions(),
                       "quantization": {"type": target.variant,
                                        "imatrix": ctx.params.get("imatrix") or None if imatrix else None}}
            settings = {k: source.settings.get(k) for k in ("n_parallel", "n_ctx_per_slot", "n_gpu_layers")}
            record = registry.import_path(artifact, published, lineage=lineage, parity=parity.to_json(),
                                          settings=settings, actor=ctx.principal.actor)
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
    if spec == IMATRIX_BUILTIN:
        ctx.progress(0, 1, "computing the importance matrix from built-in calibration text", force=True)
        return compute_imatrix(model_dir, builtin_calibration(), work / "imatrix.gguf", label="builtin")
    if spec.startswith(IMATRIX_DATASET):
        from garrison.ingest.vault import Vault

        master = ctx.master_key()
        ref, reader = ctx.open_dataset(Vault(ctx.layout, ctx.store.catalog, lambda: master),
                                       spec[len(IMATRIX_DATASET):], "imatrix")
        ctx.progress(0, 1, f"computing the importance matrix from dataset {ref}", force=True)
        return compute_imatrix(model_dir, record_texts(reader.records()), work / "imatrix.gguf", label=ref)
    return _imatrix_file(ctx.principal, spec)


def _fail_on_parity(results: list[dict[str, Any]]) -> None:
    failed = [r for r in results if r["parity"] is not None and not r["parity"]["passed"]]
    if failed:
        # The tokenizer's own code when that is all that failed: the weights are fine, the prompts are not.
        codes = {r["parity"].get("code") for r in failed}
        raise JobFailed("parity gate failed for " + "; ".join(f"{r['model']}: {r['parity']['reason']}"
                                                              for r in failed)
                        + " (recorded, never served)",
                        code="tokenizer_mismatch" if codes == {"tokenizer_mismatch"} else "parity_failed")


def parity_report(record: ModelRecord) -> str:
    """What an artifact's parity gate found, in a sentence: why it is never served."""
    parity = record.manifest.get("parity") or {}
    return f"{record.name}: {parity.get('code') or 'parity_failed'}: {parity.get('reason', 'no report recorded')}"


def gguf_exports(registry: Any, hf_base: str) -> list[ModelRecord]:
    """Every GGUF export of a Hugging Face model, served or not (an export that failed its gate is recorded)."""
    return [r for r in registry.list() if r.format == "gguf" and r.manifest.get("lineage", {}).get("source") == hf_base]


def check_adapter_base(registry: Any, hf_base: str) -> None:
    """Refuse to base an adapter on a model whose every GGUF export failed parity, naming the gate's report:
    exporting it again fails the same way."""
    exports = gguf_exports(registry, hf_base)
    if exports and not any(r.servable for r in exports):
        raise InvalidRequest(f"no GGUF export of {hf_base!r} passed its parity gate, so an adapter of it cannot be "
                             "served: " + "; ".join(parity_report(r) for r in exports), param="model",
                             code="base_parity_failed")


def _serving_base(registry: Any, hf_base: str, requested: str) -> Any:
    """The GGUF model an adapter is served on: the one asked for, else the base's best GGUF export."""
    if requested:
        record = registry.get(requested)
        if record.format != "gguf" or record.manifest.get("lineage", {}).get("source") not in (hf_base, None):
            raise InvalidRequest(f"{requested!r} is not a GGUF export of {hf_base!r}", param="base_gguf")
        return record
    all_exports = gguf_exports(registry, hf_base)
    exports = {r.name: r for r in all_exports if r.servable}
    for variant in ("f16", "bf16", "f32", "q8_0", "q6_k", "q5_k_m", "q4_k_m"):
        if f"{hf_base}:{variant}" in exports:
            return exports[f"{hf_base}:{variant}"]
    if exports:
        return next(iter(exports.values()))
    if all_exports:
        raise JobFailed(f"no GGUF export of {hf_base!r} passed its parity gate, so the adapter has no base to be "
                        "served on: " + "; ".join(parity_report(r) for r in all_exports), code="base_parity_failed")
    raise JobFailed(f"no GGUF export of {hf_base!r} to serve the adapter on; run `garrison export {hf_base} "
                    "--to gguf:f16` first", code="adapter_base_missing")


def run_adapter_export(ctx: JobContext, registry: Any, source: Any, targets: list[Target]) -> dict[str, Any]:
    """A peft adapter to a GGUF LoRA on its base's GGUF export, and/or a merged model."""
    from garrison.converters.hf_to_gguf import convert_lora_to_gguf
    from garrison.converters.parity import check_parity

    hf_base = ctx.open_model(registry, str(source.base), "model")
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
                       "versions": tool_versions()}
            if registry.exists(published):
                registry.remove(published, actor=ctx.principal.actor)
            if target.format == "hf":
                record = registry.import_path(merged, published, lineage=lineage, actor=ctx.principal.actor)
                results.append({"model": record.name, "format": record.format, "parity": None})
                continue
            ctx.progress(1, 3, "converting the adapter with llama.cpp's convert_lora_to_gguf.py", force=True)
            try:
                lora = convert_lora_to_gguf(source.folder, hf_base.folder, work / "adapter.gguf")
            except ConversionError as exc:
                raise JobFailed(f"{target.kind}: {exc.message}", code=exc.code) from None
            requested = str(ctx.params.get("base_gguf") or "")
            if requested:
                ctx.authorize(("model", requested))
            base = _serving_base(registry, hf_base.name, requested)
            ctx.progress(2, 3, f"parity gate: {base.name} + adapter against the merged model", force=True)
            variant = base.name.partition(":")[2] or "f16"
            parity = check_parity(merged, base.entry_path, "gguf:lora", lora=lora,
                                  threshold_kind=f"gguf:{variant}")
            record = registry.import_path(lora, published, base=base.name, lineage=lineage,
                                          parity=parity.to_json(), actor=ctx.principal.actor)
            results.append({"model": record.name, "format": record.format, "base": base.name,
                            "servable": record.servable, "parity": parity.to_json()})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ctx.progress(3, 3, "done", force=True)
    _fail_on_parity(results)
    return {"model": source.name, "artifacts": results}
