"""The `distill` job kind: a student model trained towards a teacher's distributions on a dataset version.

Also the healing step after pruning (`garrison distill MODEL MODEL-pruned-X DATASET`). The job
composes the registry, the vault (records decrypted in this worker's memory only) and the
training domain's distillation (`garrison.training.distill`, fine-tuning's loop with another
loss), with the same encrypted, resumable checkpoints as a fine-tune. The teacher's top-k are
cached encrypted under the state folder's cache, keyed by teacher, dataset version and k, so a
resumed or repeated job reuses them. The result is a plain Hugging Face model (a LoRA student
is merged) registered with its lineage (teacher, student, the student's pruning plan and
calibration data) and evaluated beside teacher and student at the end.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from garrison.errors import InvalidRequest, JobFailed
from garrison.jobs.context import JobContext, StopRequested
from garrison.jobs.finetune import check_training_params
from garrison.models.names import check_model_id, derived_name
from garrison.models.registry import ModelRecord, ModelRegistry
from garrison.policies.keys import Principal
from garrison.store.catalog import Catalog


def _hf(record: ModelRecord, param: str) -> ModelRecord:
    if record.format != "hf":
        raise InvalidRequest(f"model {record.name!r} is a {record.format} model; distillation needs Hugging Face "
                             "models", param=param, code="distill_needs_hf_model")
    return record


def check(catalog: Catalog, registry: ModelRegistry, who: Principal, params: dict[str, Any]) -> None:
    from garrison.converters.export import parse_targets
    from garrison.ingest.datasets import DatasetStore, resolve_reference
    from garrison.training.distill import check_tokenizers

    teacher = _hf(registry.get(check_model_id(params["teacher"], param="teacher")), "teacher")
    student = _hf(registry.get(check_model_id(params["student"], param="student")), "student")
    check_tokenizers(teacher.folder, student.folder)
    check_training_params(params)
    derived_name(student.name, "distilled", params["suffix"], "job_00000000")
    if not params["dataset"]:
        raise InvalidRequest("'dataset' is required", param="dataset")
    name, version = resolve_reference(catalog, params["dataset"], "dataset")
    DatasetStore(catalog).version(name, version)
    if params["export"]:
        parse_targets(params["export"], "hf")


def run(ctx: JobContext) -> dict[str, Any]:
    from garrison.converters.export import merge_adapter, parse_targets
    from garrison.ingest.vault import Vault
    from garrison.jobs.evaluate import evaluate_models
    from garrison.jobs.export import run_model_export
    from garrison.jobs.finetune import _message
    from garrison.training.distill import DistillConfig, check_tokenizers, distill, tokenizer_fingerprint

    p = ctx.params
    registry = ModelRegistry(ctx.store.catalog, ctx.layout, signer=ctx.identity)
    teacher = _hf(ctx.open_model(registry, p["teacher"], "teacher"), "teacher")
    student = _hf(ctx.open_model(registry, p["student"], "student"), "student")
    registry.verify(teacher)
    registry.verify(student)
    check_tokenizers(teacher.folder, student.folder)
    master = ctx.master_key()
    vault = Vault(ctx.layout, ctx.store.catalog, lambda: master, key_source=ctx.master_key_source())
    ref, reader = ctx.open_dataset(vault, p["dataset"], "dataset")
    hyper = json.loads(p["hyperparameters"] or "{}")
    overrides: dict[str, Any] = {"method": p["method"], "lora_r": p["lora_r"], "seed": p["seed"],
                                 "checkpoint_every": p["checkpoint_every"], "max_seq_len": p["max_seq_len"],
                                 "teacher": str(teacher.folder), "top_k": p["top_k"], "ce_weight": p["ce_weight"]}
    if p["max_steps"]:
        overrides["max_steps"] = p["max_steps"]
    config = DistillConfig.from_openai(str(student.folder), hyper, reader.record.record_count, **overrides)
    assert isinstance(config, DistillConfig)
    cache_id = hashlib.sha256(json.dumps([teacher.name, teacher.manifest.get("signature"), ref, p["top_k"],
                                          p["max_seq_len"], tokenizer_fingerprint(student.folder)]).encode()
                              ).hexdigest()[:32]
    cache_path = ctx.layout.cache / "distill" / cache_id / "teacher-top-k.gck"
    cache_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    cached = cache_path.is_file()
    workdir = ctx.layout.training_folder(ctx.job.id)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    ctx.event("plan", f"distilling {teacher.name} into {student.name} on {ref} ({config.method}, top-{config.top_k}, "
              f"ce_weight {config.ce_weight})", config=config.as_dict(), teacher_cache=cache_id)

    def on_progress(event: Any) -> None:
        ctx.progress(event.step, event.total_steps, _message(event), force=event.kind != "step")
        if event.kind != "step" or event.step % 10 == 0:
            ctx.event("metrics", _message(event), **event.as_dict())

    result = distill(config, reader.records, None, workdir=workdir,
                     checkpoint_key=vault.secret("checkpoint", ctx.job.id), cache_path=cache_path,
                     cache_key=vault.secret("distill-cache", cache_id),
                     on_progress=on_progress, should_stop=lambda: ctx.stop_requested,
                     on_message=lambda m: ctx.progress(0, None, m, force=True))
    if result.state == "stopped":
        ctx.check()
        raise StopRequested(cancelled=False)
    if result.output_dir is None:
        raise JobFailed("distillation produced no output", code="distill_no_output")
    out = Path(result.output_dir)
    if config.method == "lora":
        out = merge_adapter(out, student.folder, workdir / "merged")
    name = derived_name(student.name, "distilled", p["suffix"], ctx.job.id)
    student_lineage = student.manifest.get("lineage", {}) or {}
    lineage = {"teacher": teacher.name, "student": student.name, "job": ctx.job.id, "datasets": [ref],
               "training_uses": [{"dataset": ref, "role": "split", "seed": config.seed,
                                  "fraction": config.validation_fraction, "max_seq_len": config.max_seq_len,
                                  "job": ctx.job.id}],
               "distillation": {"top_k": config.top_k, "ce_weight": config.ce_weight, "method": config.method,
                                "steps": result.step, "n_epochs": config.n_epochs, "batch_size": config.batch_size,
                                "learning_rate": config.effective_learning_rate(),
                                "eval_loss_before": result.eval_loss_before,
                                "eval_loss_after": result.eval_loss_after},
               "pruning": student_lineage.get("pruning"), "calibration": student_lineage.get("calibration")}
    if registry.exists(name):
        registry.remove(name, actor=ctx.principal.actor)
    record = registry.import_path(out, name, lineage=lineage, settings=dict(student.settings),
                                  actor=ctx.principal.actor)
    ctx.own(name)
    shutil.rmtree(workdir / "merged", ignore_errors=True)
    exported: list[str] = []
    if p["export"]:
        results = run_model_export(ctx, registry, record, parse_targets(p["export"], "hf"))
        exported = [r["model"] for r in results["artifacts"]]
    evaluation = evaluate_models(ctx, registry, list(dict.fromkeys([teacher.name, student.name, name, *exported])),
                                 ref, max_new_tokens=p["eval_max_new_tokens"])
    return {"model": name, "teacher": teacher.name, "student": student.name, "dataset": ref, "steps": result.step,
            "resumed_from_step": result.resumed_from_step, "teacher_cache_reused": cached,
            "eval_loss_before": result.eval_loss_before, "eval_loss_after": result.eval_loss_after,
            "exports": exported, "evaluation": evaluation.id, "seconds": round(time.monotonic() - started, 1),
            "loss_history": result.loss_history[-200:],
            "rows": [{"model": r.model, "metrics": {k: v for k, v in r.metrics.items() if k != "per_label"}}
                     for r in evaluation.rows]}
