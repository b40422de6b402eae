"""The `finetune` job kind: a dataset version and a base model in, a served fine-tune out.

The job composes the domains (ingest's vault, training, the converters, the registry); each model and
dataset it opens is authorized again against the job's principal first (`ctx.open_model`, `ctx.open_dataset`).

The worker reads the dataset's records decrypted in memory from the vault, trains (LoRA by
default) with encrypted, resumable checkpoints in the job's folder, registers the adapter
with its lineage, converts it to a GGUF LoRA through the export machinery (parity-gated,
signed) and so makes `fine_tuned_model` servable at once on the base's GGUF export (made
first when missing). Optional exports of the merged model go through the same gate.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from garrison.errors import InvalidRequest, JobFailed
from garrison.jobs.context import JobContext, StopRequested
from garrison.models.names import check_name, fine_tuned_name
from garrison.models.registry import ModelRecord, ModelRegistry
from garrison.policies.keys import Principal
from garrison.store.catalog import Catalog

SUFFIX_MAX = 40


def dataset_records(state_dir: str, ref: str) -> Any:
    """Records of a dataset version, decrypted in this process's memory (each DDP rank calls it)."""
    import os

    from garrison.config import load_config
    from garrison.ingest.vault import Vault
    from garrison.paths import StateLayout
    from garrison.store.catalog import Catalog
    from garrison.store.master_key import load_master_key

    config = load_config(os.environ.get("GARRISON_CONFIG"), overrides={"state_dir": state_dir})
    master = load_master_key(config)
    layout = StateLayout(Path(state_dir))
    # The rank opens the reference its parent authorized and resolved to NAME:N a moment before.
    _, reader = Vault(layout, Catalog(layout.catalog, migrate=False), lambda: master).open_reference(ref)
    return reader.records()


def _train_ddp(ctx: JobContext, config: Any, plan: Any, workdir: Path, key: bytes, train_ref: str,
               val_ref: str | None, on_progress: Any) -> Any:
    """Several GPUs: PyTorch's own torchrun (DDP); each rank reads the records itself, in memory."""
    import dataclasses

    from garrison.training.ddp import launch
    from garrison.training.finetune import FinetuneResult, ProgressEvent

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "progress" and "step" in event:
            fields = {f.name for f in dataclasses.fields(ProgressEvent)}
            on_progress(ProgressEvent(**{k: v for k, v in event.items() if k in fields}))

    kwargs = {"state_dir": str(ctx.layout.root), "ref": train_ref}
    raw = launch(dataclasses.replace(config, devices=plan.devices), "garrison.jobs.finetune:dataset_records",
                 records_kwargs=kwargs, val_records="garrison.jobs.finetune:dataset_records" if val_ref else None,
                 val_records_kwargs={**kwargs, "ref": val_ref} if val_ref else None, workdir=workdir,
                 checkpoint_key=key, nproc=plan.world_size, on_event=on_event)
    return FinetuneResult(**{k: v for k, v in raw.items() if k in {f.name for f in dataclasses.fields(FinetuneResult)}})


def _message(event: Any) -> str:
    parts = [f"step {event.step}/{event.total_steps}"]
    if event.loss is not None:
        parts.append(f"loss {event.loss:.4f}")
    if event.eval_loss is not None:
        parts.append(f"eval {event.eval_loss:.4f}")
    if event.eta_s is not None and math.isfinite(event.eta_s):
        parts.append(f"eta {event.eta_s:.0f}s")
    return " ".join(parts)


METHODS = ("lora", "full")
HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")


def _base(record: ModelRecord) -> ModelRecord:
    if record.format != "hf":
        raise InvalidRequest(f"model {record.name!r} is a {record.format} model; fine-tuning needs a Hugging Face "
                             "model", param="model", code="finetune_needs_hf_model")
    return record


def check_training_params(params: dict[str, Any]) -> None:
    """`method` and OpenAI's `hyperparameters`, as fine-tuning and distillation (its loop) take them."""
    if params["method"] not in METHODS:
        raise InvalidRequest(f"method must be one of {', '.join(METHODS)}", param="method")
    try:
        hyper = json.loads(params["hyperparameters"] or "{}")
    except json.JSONDecodeError:
        raise InvalidRequest("hyperparameters must be a JSON object", param="hyperparameters") from None
    if not isinstance(hyper, dict) or set(hyper) - set(HYPERPARAMETERS):
        raise InvalidRequest(f"hyperparameters must be an object of {', '.join(HYPERPARAMETERS)}",
                             param="hyperparameters")


def check(catalog: Catalog, registry: ModelRegistry, who: Principal, params: dict[str, Any]) -> None:
    """At submission, after grants: what would otherwise fail only inside the worker fails here with a 400/404."""
    from garrison.converters.export import parse_targets
    from garrison.ingest.datasets import DatasetStore, resolve_reference

    base = _base(registry.get(check_name(params["model"], param="model")))
    check_training_params(params)
    fine_tuned_name(base.name, params["suffix"], "job_00000000")
    if params["method"] == "lora":  # the adapter is served on a GGUF export of the base: refuse what cannot be
        from garrison.converters.hf_to_gguf import check_tokenizer_files
        from garrison.jobs.export import check_adapter_base, gguf_exports

        check_adapter_base(registry, base.name)
        if not gguf_exports(registry, base.name):
            check_tokenizer_files(base.folder)
    if params["export"]:
        parse_targets(params["export"], "hf")
    store = DatasetStore(catalog)
    for param in ("training_file", "validation_file"):
        if params[param]:
            name, version = resolve_reference(catalog, params[param], param)
            store.version(name, version)


def run(ctx: JobContext) -> dict[str, Any]:
    from garrison.converters.export import Target, parse_targets
    from garrison.ingest.vault import Vault
    from garrison.jobs.export import run_adapter_export, run_model_export
    from garrison.training.finetune import FinetuneConfig, data_shape, train
    from garrison.training.gpus import plan_devices

    p = ctx.params
    registry = ModelRegistry(ctx.store.catalog, ctx.layout, signer=ctx.identity)
    base = _base(ctx.open_model(registry, check_name(p["model"], param="model")))
    registry.verify(base)
    master = ctx.master_key()
    vault = Vault(ctx.layout, ctx.store.catalog, lambda: master, key_source=ctx.master_key_source())
    train_ref, train_reader = ctx.open_dataset(vault, p["training_file"], "training_file")
    val_ref, val_reader = (ctx.open_dataset(vault, p["validation_file"], "validation_file") if p["validation_file"]
                           else (None, None))
    if p["method"] == "lora" and not any(r.format == "gguf" and r.manifest.get("lineage", {}).get("source") == base.name
                                         for r in registry.list()):
        # Before training, not after: a base whose GGUF export fails (its tokenizer, its parity) fails the job
        # now, with the cause, instead of after hours of training.
        ctx.event("export", f"exporting {base.name} to GGUF F16 to serve the adapter on")
        run_model_export(ctx, registry, base, [Target("gguf", "f16")])
    hyper = json.loads(p["hyperparameters"] or "{}")
    overrides: dict[str, Any] = {"method": p["method"], "lora_r": p["lora_r"], "seed": p["seed"],
                                 "checkpoint_every": p["checkpoint_every"], "max_seq_len": p["max_seq_len"]}
    if p["max_steps"]:
        overrides["max_steps"] = p["max_steps"]
    if p.get("micro_batch_size"):
        overrides["micro_batch_size"] = p["micro_batch_size"]
    if p.get("gradient_checkpointing"):
        overrides["gradient_checkpointing"] = True
    config = FinetuneConfig.from_openai(str(base.folder), hyper, train_reader.record.record_count, **overrides)
    # Estimated from the real examples (their lengths after packing, the vocabulary, the micro-batch).
    plan = plan_devices(config, data=data_shape(config, train_reader.records))
    ctx.event("plan", f"training on {plan.kind} {plan.devices or ''} in {plan.precision}, estimated "
              f"{plan.estimate_bytes / 2**30:.2f} GiB", plan=plan.as_dict(), config=config.as_dict())
    workdir = ctx.layout.training_folder(ctx.job.id)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def on_progress(event: Any) -> None:
        force = event.kind != "step"
        ctx.progress(event.step, event.total_steps, _message(event), force=force)
        if event.kind != "step" or event.step % 10 == 0:
            ctx.event("metrics", _message(event), **event.as_dict())

    # Per job (one job's checkpoints cannot be swapped into another's), random and kept wrapped by the
    # master key in the catalog: a resumed attempt finds it again, across master-key rotations too.
    key = vault.secret("checkpoint", ctx.job.id)
    if plan.world_size > 1:
        result = _train_ddp(ctx, config, plan, workdir, key, train_ref, val_ref, on_progress)
    else:
        result = train(config, train_reader.records, val_reader.records if val_reader else None, workdir=workdir,
                       checkpoint_key=key, on_progress=on_progress, should_stop=lambda: ctx.stop_requested)
    if result.state == "stopped":
        ctx.check()  # cancelled or shutting down: the checkpoint is saved, the runner records why
        raise StopRequested(cancelled=False)
    if result.output_dir is None:
        raise JobFailed("training produced no output", code="finetune_no_output")
    name = fine_tuned_name(base.name, p["suffix"], ctx.job.id)
    lineage = {"base": base.name, "datasets": [r for r in (train_ref, val_ref) if r], "job": ctx.job.id,
               "hyperparameters": {"n_epochs": config.n_epochs, "batch_size": config.batch_size,
                                   "learning_rate_multiplier": config.learning_rate_multiplier,
                                   "learning_rate": config.effective_learning_rate(), "method": config.method,
                                   "lora_r": config.lora_r},
               "eval_loss_before": result.eval_loss_before, "eval_loss_after": result.eval_loss_after,
               "trained_tokens": result.train_tokens, "steps": result.step}
    for existing in (name, f"{name}:lora", f"{name}:merged"):
        if registry.exists(existing):
            registry.remove(existing, actor=ctx.principal.actor)
    out = Path(result.output_dir)
    if config.method == "lora":
        record = registry.import_path(out, name, base=base.name, lineage=lineage, actor=ctx.principal.actor)
        ctx.own(name)
        targets = [Target("gguf", "lora")] + ([Target("hf", "merged")] if p["export"] else [])
        run_adapter_export(ctx, registry, record, targets)
        fine_tuned = f"{name}:lora"
        merged_name = f"{name}:merged"
    else:
        record = registry.import_path(out, name, lineage=lineage, actor=ctx.principal.actor)
        ctx.own(name)
        run_model_export(ctx, registry, record, [Target("gguf", "f16")])
        fine_tuned = f"{name}:f16"
        merged_name = name
    exported: list[str] = []
    if p["export"]:
        merged = registry.get(merged_name)
        results = run_model_export(ctx, registry, merged, parse_targets(p["export"], "hf"))
        exported = [r["model"] for r in results["artifacts"]]
    return {"fine_tuned_model": fine_tuned, "adapter": record.name, "exports": exported,
            "trained_tokens": result.train_tokens, "steps": result.step, "resumed_from_step": result.resumed_from_step,
            "eval_loss_before": result.eval_loss_before, "eval_loss_after": result.eval_loss_after,
            "tokens_per_s": result.tokens_per_s, "early_stopped": result.early_stopped,
            "hyperparameters": lineage["hyperparameters"], "training_file": train_ref, "validation_file": val_ref,
            "seconds": round(time.monotonic() - started, 1), "loss_history": result.loss_history[-200:]}
