"""The `eval` job kind: registered models scored side by side on one dataset version's held-out records.

The job composes the registry (what each model is, its lineage), the vault (the records,
decrypted in this worker's memory only) and the training domain's scoring
(`garrison.training.evaluation`). Which records are held out is decided from the compared
models' lineage: every fine-tune, distillation or pruning that learned from this dataset
version held out its own deterministic split, and only the records every one of them held
out are scored. The result is one catalog comparison (`garrison.models.evaluations`) with
each model's lineage; model answers are not stored (they can quote the data).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from garrison.errors import InvalidRequest
from garrison.jobs.context import JobContext
from garrison.models.evaluations import Evaluation, EvaluationRow, EvaluationStore
from garrison.models.names import check_model_id
from garrison.models.registry import ModelRecord, ModelRegistry
from garrison.policies.keys import Principal
from garrison.store.catalog import Catalog

SCORABLE = ("hf", "peft", "gguf", "onnx", "lora")
MAX_MODELS = 24  # a compression study: base, exports, and each variant before and after healing, with exports
# Lineage keys that name the model a model was made from (export source, adapter base, teacher, student).
PARENT_KEYS = ("source", "base", "student", "teacher")
LEARNING_KINDS = ("finetune", "distill", "prune")


def model_names(value: str, param: str = "models") -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise InvalidRequest("name at least one model to evaluate", param=param)
    if len(names) > MAX_MODELS:
        raise InvalidRequest(f"at most {MAX_MODELS} models in one evaluation", param=param)
    if len(set(names)) != len(names):
        raise InvalidRequest("a model is named twice", param=param)
    return [check_model_id(n, param=param) for n in names]


def check(catalog: Catalog, registry: ModelRegistry, who: Principal, params: dict[str, Any]) -> None:
    from garrison.ingest.datasets import DatasetStore, resolve_reference

    for name in model_names(params["models"]):
        record = registry.get(name)
        if record.format not in SCORABLE:
            raise InvalidRequest(f"model {name!r} is a {record.format} model; evaluation scores "
                                 f"{', '.join(SCORABLE)} models", param="models", code="eval_unsupported_model")
        tokenizer_folder(registry, record)
    if not params["dataset"]:
        raise InvalidRequest("'dataset' is required", param="dataset")
    dataset, version = resolve_reference(catalog, params["dataset"], "dataset")
    DatasetStore(catalog).version(dataset, version)


def _parents(record: ModelRecord) -> list[str]:
    lineage = record.manifest.get("lineage", {}) or {}
    names = [str(lineage[k]) for k in PARENT_KEYS if isinstance(lineage.get(k), str)]
    if record.base:
        names.append(record.base)
    return list(dict.fromkeys(names))


def tokenizer_folder(registry: ModelRegistry, record: ModelRecord, seen: frozenset[str] = frozenset()) -> Path:
    """The Hugging Face folder whose tokenizer `record` shares: its own, or its nearest HF ancestor's (the parity
    gate checked that an export tokenizes as its source does)."""
    if record.format == "hf":
        return record.folder
    for parent in _parents(record):
        if parent in seen or not registry.exists(parent):
            continue
        try:
            return tokenizer_folder(registry, registry.get(parent), seen | {record.name})
        except InvalidRequest:
            continue
    if record.format == "onnx" and (record.folder / "tokenizer.json").is_file():
        return record.folder
    raise InvalidRequest(f"model {record.name!r} has no Hugging Face ancestor in the registry to tokenize with",
                         param="models", code="eval_needs_tokenizer")


def training_uses(registry: ModelRegistry, ctx: JobContext, record: ModelRecord) -> dict[str, list[Any]]:
    """Every job in `record`'s ancestry that learned from a dataset, by dataset version (NAME:N)."""
    from garrison.training.evaluation import TrainingUse

    uses: dict[str, list[TrainingUse]] = {}
    stack, seen = [record], set()
    while stack:
        current = stack.pop()
        if current.name in seen:
            continue
        seen.add(current.name)
        lineage = current.manifest.get("lineage", {}) or {}
        for use in _lineage_uses(registry, ctx, current, lineage):
            uses.setdefault(str(use["dataset"]), []).append(TrainingUse(
                model=current.name, job=use.get("job"), role=use["role"], seed=int(use.get("seed", 42)),
                fraction=float(use.get("fraction", 0.1)), max_seq_len=int(use.get("max_seq_len", 2048)),
                tokenizer_dir=use.get("tokenizer_dir")))
        stack += [registry.get(p) for p in _parents(current) if registry.exists(p)]
    return uses


def learned_elsewhere(ctx: JobContext, vault: Any, uses: dict[str, list[Any]], tokenizer_dir: Path
                      ) -> tuple[frozenset[str], list[str], list[str]]:
    """Fingerprints of the records the compared models learned from other datasets and versions, so a copy of a
    training record in the evaluated version is not scored as held out. Only datasets the job's principal is
    granted are opened (the others are listed, not compared: their contents are not the caller's to probe)."""
    from garrison.ingest.datasets import resolve_reference
    from garrison.training.evaluation import trained_fingerprints

    learned: set[str] = set()
    compared: list[str] = []
    not_compared: list[str] = []
    for ref, dataset_uses in sorted(uses.items()):
        if all(u.role == "validation" for u in dataset_uses):
            continue
        try:
            name, _version = resolve_reference(vault.catalog, ref, "dataset")
        except InvalidRequest:
            not_compared.append(ref)  # deleted since
            continue
        if not ctx.granted(("dataset", name)):
            not_compared.append(ref)
            continue
        ctx.check()
        _ref, reader = ctx.open_dataset(vault, ref, "dataset")
        learned |= trained_fingerprints(list(reader.records()), dataset_uses, tokenizer_dir)
        compared.append(ref)
    return frozenset(learned), compared, not_compared


def _lineage_uses(registry: ModelRegistry, ctx: JobContext, record: ModelRecord,
                  lineage: dict[str, Any]) -> list[dict[str, Any]]:
    """How a model's own job used its datasets: written by distill and prune jobs, derived for fine-tunes."""
    tokenizer_dir: Path | None = None
    for key in ("base", "student", "source"):
        parent = lineage.get(key)
        if isinstance(parent, str) and registry.exists(parent):
            try:
                tokenizer_dir = tokenizer_folder(registry, registry.get(parent))
                break
            except InvalidRequest:
                continue
    if "training_uses" in lineage:
        return [dict(u, tokenizer_dir=tokenizer_dir) for u in lineage["training_uses"]]
    datasets = lineage.get("datasets")
    job_id = lineage.get("job")
    if not isinstance(datasets, list) or not datasets or not job_id:
        return []
    try:
        job = ctx.store.get(str(job_id))
    except Exception:  # the job row is gone: assume the fine-tune's defaults
        job = None
    params = job.params if job is not None and job.kind in LEARNING_KINDS else {}
    seed, max_seq_len = int(params.get("seed", 42)), int(params.get("max_seq_len", 2048))
    train_ref, val_ref = datasets[0], (datasets[1] if len(datasets) > 1 else None)
    out = [{"dataset": train_ref, "role": "train" if val_ref else "split", "seed": seed, "max_seq_len": max_seq_len,
            "job": job_id, "tokenizer_dir": tokenizer_dir}]
    if val_ref and val_ref != train_ref:
        out.append({"dataset": val_ref, "role": "validation", "seed": seed, "max_seq_len": max_seq_len,
                    "job": job_id, "tokenizer_dir": tokenizer_dir})
    return out


def _under_test(ctx: JobContext, registry: ModelRegistry, record: ModelRecord, work: Path) -> Any:
    from garrison.training.evaluation import ModelUnderTest

    tokenizer_dir = tokenizer_folder(registry, record)
    if record.format == "hf":
        return ModelUnderTest(record.name, "hf", record.folder, tokenizer_dir)
    if record.format == "peft":
        from garrison.converters.export import merge_adapter

        base = ctx.open_model(registry, str(record.base), "models")
        merged = merge_adapter(record.folder, base.folder, work / record.name.replace(":", "-"))
        return ModelUnderTest(record.name, "hf", merged, tokenizer_dir)
    if record.format == "lora":
        base = ctx.open_model(registry, str(record.base), "models")
        return ModelUnderTest(record.name, "gguf", base.entry_path, tokenizer_dir, lora=record.entry_path)
    if record.format == "gguf":
        return ModelUnderTest(record.name, "gguf", record.entry_path, tokenizer_dir)
    return ModelUnderTest(record.name, "onnx", record.folder, tokenizer_dir)


def evaluate_models(ctx: JobContext, registry: ModelRegistry, names: list[str], dataset_ref: str, *,
                    max_new_tokens: int = 64, max_records: int = 0, threads: int = 2,
                    progress: tuple[float, float] = (0.0, 1.0)) -> Evaluation:
    """Score `names` on `dataset_ref`'s held-out records and record the comparison (shared by prune and distill,
    which evaluate what they made). `progress` maps this work into a slice of the job's progress bar."""
    from transformers import AutoTokenizer

    from garrison.ingest.vault import Vault
    from garrison.training import evaluation as ev

    records_by_model = [ctx.open_model(registry, n, "models") for n in names]
    for record in records_by_model:
        registry.verify(record)
    master = ctx.master_key()
    vault = Vault(ctx.layout, ctx.store.catalog, lambda: master, key_source=ctx.master_key_source())
    ref, reader = ctx.open_dataset(vault, dataset_ref, "dataset")
    records = list(reader.records())  # decrypted in this process's memory only
    by_dataset: dict[str, list[Any]] = {}
    for record in records_by_model:
        for dataset, found in training_uses(registry, ctx, record).items():
            known = by_dataset.setdefault(dataset, [])
            known += [u for u in found if u not in known]
    uses = by_dataset.pop(ref, [])
    first_tokenizer = tokenizer_folder(registry, records_by_model[0])
    seen, compared, not_compared = learned_elsewhere(ctx, vault, by_dataset, first_tokenizer)
    indices, split = ev.held_out_records(records, first_tokenizer, uses, max_records, seen=seen)
    split["dataset"] = ref
    split["compared_with_training_data_of"] = compared
    if not_compared:
        split["not_compared_with"] = not_compared
    labels = ev.is_label_set([ev._last_answer(records[i]) for i in indices])
    split["labels"] = labels
    ctx.event("split", f"{len(indices)} held-out records of {ref}", split={k: v for k, v in split.items()
                                                                            if k != "indices"})
    work = ctx.layout.jobs / ctx.job.id / "eval"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows: list[EvaluationRow] = []
    low, high = progress
    tokenizers: dict[Path, Any] = {}
    try:
        for m, record in enumerate(records_by_model):
            ctx.check()
            model = _under_test(ctx, registry, record, work)
            if model.tokenizer_dir not in tokenizers:
                tokenizers[model.tokenizer_dir] = AutoTokenizer.from_pretrained(model.tokenizer_dir)
            tokenizer = tokenizers[model.tokenizer_dir]
            items = ev.eval_items(tokenizer, records, indices, ev.DEFAULT_MAX_SEQ_LEN)
            longest = max((len(i.example) for i in items), default=16)
            scorer = ev.open_scorer(model, n_ctx=longest + max_new_tokens + 8, threads=threads)

            def tick(n: int, m: int = m, total: int = len(items), name: str = record.name) -> None:
                done = (m + n / max(1, total)) / len(records_by_model)
                ctx.progress(low + (high - low) * done, 1.0, f"scoring {name} ({n}/{total})")

            try:
                score = ev.score_model(scorer, items, tokenizer, ev.eos_ids(tokenizer, model.tokenizer_dir),
                                       max_new_tokens=max_new_tokens, labels=labels, should_stop=ctx.check,
                                       on_item=tick)
            finally:
                scorer.close()
            ctx.event("score", f"{record.name}: perplexity {score.metrics.get('perplexity')}", model=record.name,
                      metrics={k: v for k, v in score.metrics.items() if k != "per_label"})
            rows.append(EvaluationRow(model=record.name, format=record.format, size_bytes=record.size_bytes,
                                      metrics=score.metrics, lineage=record.manifest.get("lineage", {}) or {}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return EvaluationStore(ctx.store.catalog).record(dataset=ref, split=split, rows=rows, job_id=ctx.job.id,
                                                     created_by=ctx.principal.actor)


def run(ctx: JobContext) -> dict[str, Any]:
    p = ctx.params
    registry = ModelRegistry(ctx.store.catalog, ctx.layout, signer=ctx.identity)
    evaluation = evaluate_models(ctx, registry, model_names(p["models"]), p["dataset"],
                                 max_new_tokens=p["max_new_tokens"], max_records=p["max_records"])
    ctx.progress(1, 1, "done", force=True)
    return {"evaluation": evaluation.id, "dataset": evaluation.dataset,
            "held_out": evaluation.split.get("held_out"), "split_digest": evaluation.split.get("digest"),
            "rows": [{"model": r.model, "format": r.format, "size_bytes": r.size_bytes,
                      "metrics": {k: v for k, v in r.metrics.items() if k != "per_label"}} for r in evaluation.rows]}
