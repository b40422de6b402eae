"""The `prune` job kind: a Hugging Face model made smaller by structured pruning, registered with its plan.

Blocks and MLP channels are ranked on calibration data (`garrison.training.pruning`): an
ingested dataset's records, decrypted in this worker's memory, or the built-in text every
machine has. From a dataset only the records a fine-tune with the default split would
train on are used (the evaluation's held-out records stay unseen), and the pruned model's
lineage says so. At the end the source and the pruned model are evaluated side by side on
that dataset's held-out records (or on `eval`'s).
"""

from __future__ import annotations

import json
import shutil
from typing import Any

from garrison.errors import InvalidRequest
from garrison.jobs.context import JobContext
from garrison.models.names import check_model_id, derived_name
from garrison.models.registry import ModelRecord, ModelRegistry
from garrison.policies.keys import Principal
from garrison.store.catalog import Catalog

BUILTIN = "builtin"
AXES = ("depth", "width", "heads", "hidden")


def _source(record: ModelRecord) -> ModelRecord:
    if record.format != "hf":
        raise InvalidRequest(f"model {record.name!r} is a {record.format} model; pruning needs a Hugging Face "
                             "model", param="model", code="prune_needs_hf_model")
    return record


def check(catalog: Catalog, registry: ModelRegistry, who: Principal, params: dict[str, Any]) -> None:
    from garrison.converters.export import parse_targets
    from garrison.ingest.datasets import DatasetStore, resolve_reference
    from garrison.training.pruning import Shape, amounts

    source = _source(registry.get(check_model_id(params["model"], param="model")))
    amounts(Shape.of(json.loads((source.folder / "config.json").read_text())), **{a: params[a] for a in AXES})
    derived_name(params["model"], "pruned", params["suffix"], "job_00000000")
    for param in ("calibration", "eval"):
        if params[param] and params[param] != BUILTIN:
            name, version = resolve_reference(catalog, params[param], param)
            DatasetStore(catalog).version(name, version)
    if params["export"]:
        parse_targets(params["export"], "hf")


def run(ctx: JobContext) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from garrison.converters.export import parse_targets
    from garrison.corpus import machine_corpus
    from garrison.ingest.vault import Vault
    from garrison.jobs.evaluate import evaluate_models
    from garrison.jobs.export import run_model_export
    from garrison.training import evaluation as ev
    from garrison.training.pruning import chat_texts, prune

    p = ctx.params
    registry = ModelRegistry(ctx.store.catalog, ctx.layout, signer=ctx.identity)
    source = _source(ctx.open_model(registry, p["model"]))
    registry.verify(source)
    calibration = p["calibration"] or BUILTIN
    uses: list[dict[str, Any]] = []
    ctx.progress(0, 4, f"reading calibration data ({calibration})", force=True)
    if calibration == BUILTIN:
        texts = [t for t in machine_corpus(400_000).split("\n\n") if t.strip()]
    else:
        master = ctx.master_key()
        vault = Vault(ctx.layout, ctx.store.catalog, lambda: master, key_source=ctx.master_key_source())
        calibration, reader = ctx.open_dataset(vault, calibration, "calibration")
        records = list(reader.records())
        tokenizer = AutoTokenizer.from_pretrained(source.folder)
        trained, _held = ev.validation_indices(tokenizer, records, fraction=ev.DEFAULT_FRACTION,
                                               seed=ev.DEFAULT_SEED, max_seq_len=ev.DEFAULT_MAX_SEQ_LEN)
        texts = chat_texts(tokenizer, [records[i] for i in sorted(trained)])
        uses.append({"dataset": calibration, "role": "split", "seed": ev.DEFAULT_SEED,
                     "fraction": ev.DEFAULT_FRACTION, "max_seq_len": ev.DEFAULT_MAX_SEQ_LEN, "job": ctx.job.id})
    work = ctx.layout.jobs / ctx.job.id / "pruned"
    shutil.rmtree(work, ignore_errors=True)
    ctx.progress(1, 4, f"measuring {source.name}'s blocks and channels", force=True)
    plan = prune(source.folder, work, texts, **{axis: p[axis] for axis in AXES}, calibration=calibration,
                 max_tokens=p["calibration_tokens"], check=ctx.check)
    name = derived_name(source.name, "pruned", p["suffix"], ctx.job.id)
    lineage = {"source": source.name, "source_manifest_signature": source.manifest.get("signature"),
               "job": ctx.job.id, "pruning": plan.to_json(), "calibration": calibration, "training_uses": uses}
    if registry.exists(name):
        registry.remove(name, actor=ctx.principal.actor)
    try:
        record = registry.import_path(work, name, lineage=lineage, settings=dict(source.settings),
                                      actor=ctx.principal.actor)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ctx.own(name)
    ctx.event("pruned", f"{name}: {plan.summary()}", plan=plan.to_json())
    for note in plan.notes:
        ctx.event("note", note)
    exported: list[str] = []
    if p["export"]:
        ctx.progress(2, 4, f"exporting {name}", force=True)
        results = run_model_export(ctx, registry, record, parse_targets(p["export"], "hf"))
        exported = [r["model"] for r in results["artifacts"]]
    evaluation = None
    eval_ref = p["eval"] or (calibration if calibration != BUILTIN else "")
    if eval_ref:
        evaluation = evaluate_models(ctx, registry, [source.name, name, *exported], eval_ref,
                                     max_new_tokens=p["eval_max_new_tokens"], progress=(0.75, 1.0))
    ctx.progress(4, 4, "done", force=True)
    return {"model": name, "source": source.name, "plan": plan.to_json(), "size_bytes": record.size_bytes,
            "source_size_bytes": source.size_bytes, "exports": exported,
            "evaluation": evaluation.id if evaluation else None,
            "rows": [{"model": r.model, "metrics": {k: v for k, v in r.metrics.items() if k != "per_label"}}
                     for r in evaluation.rows] if evaluation else []}
