"""Scoring models on held-out chat records: perplexity, greedy answers, label metrics.

Every engine is scored through one narrow interface, a scorer's `logits(ids)` (every
position's next-token logits for a token sequence, what the parity gate measures too), so
an HF model, its GGUF and its ONNX exports are compared on exactly the same token ids:
the records are tokenized once per tokenizer with the training code's own rule
(`garrison.training.data.tokenize_chat`: the chat template, assistant-only labels).

- Perplexity: exp of the mean negative log-likelihood of the assistant-turn tokens, the
  tokens fine-tuning learns (its eval loss is the log of this figure).
- Greedy answers: the conversation up to its last trained assistant turn is the prompt;
  the answer is decoded greedily (argmax, whole-sequence logits each step: slow but the
  same for every engine) until an end-of-sequence token, and compared with the reference
  text: exact match and token-level F1 (SQuAD's normalisation).
- Labels: when the reference answers are a few short labels repeated, accuracy and
  precision, recall and F1 per label (and their macro mean) of the normalised answers.

Held-out split. The fine-tune job holds out `split_validation(examples, fraction, seed)`
of its training set (a seeded hash of each example's token ids); an evaluation scores the
records that every training use of the dataset version held out (`held_out_records`), so
no record a compared model trained on is scored as held-out. Runs in worker processes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from garrison.errors import InvalidRequest
from garrison.training import data as td

Logits = npt.NDArray[np.float64]
DEFAULT_FRACTION = 0.1  # FinetuneConfig.validation_fraction
DEFAULT_SEED = 42  # FinetuneConfig.seed, the fine-tune job's default
DEFAULT_MAX_SEQ_LEN = 2048
LABEL_MAX_WORDS = 3
LABEL_MAX_DISTINCT = 20


class Scorer(Protocol):
    def logits(self, ids: Sequence[int]) -> Logits: ...

    def close(self) -> None: ...


class HFScorer:
    """A Hugging Face causal LM in float32 on the CPU (the parity gate's reference numerics)."""

    def __init__(self, folder: Path, threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        self.model.eval()

    def logits(self, ids: Sequence[int]) -> Logits:
        with self.torch.no_grad():
            out: Logits = self.model(self.torch.tensor([list(ids)])).logits[0].double().numpy()
        return out

    def close(self) -> None:
        del self.model


class GGUFScorer:
    """llama.cpp with the parity gate's portable kernels (no weight repack), plus an optional GGUF LoRA."""

    def __init__(self, path: Path, n_ctx: int, lora: Path | None = None, threads: int = 2) -> None:
        from garrison.engine.llama_logits import SequenceScorer

        self.scorer = SequenceScorer(path, n_ctx=n_ctx, lora=lora, n_threads=threads)

    def logits(self, ids: Sequence[int]) -> Logits:
        return self.scorer.logits(ids)

    def close(self) -> None:
        self.scorer.close()


class OnnxScorer:
    def __init__(self, folder: Path) -> None:
        from garrison.engine.onnx_engine import OnnxDecoderEngine

        self.engine = OnnxDecoderEngine(folder)

    def logits(self, ids: Sequence[int]) -> Logits:
        return self.engine.sequence_logits(ids)

    def close(self) -> None:
        self.engine.close()


@dataclass(frozen=True)
class ModelUnderTest:
    """A model as the scorer opens it: `path` is an HF folder, a GGUF file (with `lora`) or an ONNX folder;
    `tokenizer_dir` the HF folder whose tokenizer the model shares (its own, or its export source's)."""

    name: str
    format: str  # hf | gguf | onnx
    path: Path
    tokenizer_dir: Path
    lora: Path | None = None


def open_scorer(model: ModelUnderTest, n_ctx: int, threads: int = 2) -> Scorer:
    if model.format == "hf":
        return HFScorer(model.path, threads)
    if model.format == "gguf":
        return GGUFScorer(model.path, n_ctx, model.lora, threads)
    if model.format == "onnx":
        return OnnxScorer(model.path)
    raise InvalidRequest(f"model {model.name!r} is a {model.format} model, which cannot be scored",
                         param="models", code="eval_unsupported_model")


# -- records ---------------------------------------------------------------------------------------------
@dataclass
class EvalItem:
    """One held-out record, tokenized: the ids, assistant labels, the greedy prompt and the reference answer."""

    index: int  # the record's position in the dataset version
    example: td.Example
    prompt_len: int  # ids[:prompt_len] is the prompt of the last trained assistant turn
    reference: str


def _last_answer(record: Any) -> str:
    messages = td.normalize_record(record)
    answers = [m["content"] for m in messages if m["role"] == "assistant" and m["weight"]]
    return answers[-1] if answers else ""


def tokenize_indexed(tokenizer: Any, records: Sequence[Any], max_seq_len: int) -> dict[int, td.Example]:
    """Record index -> example, for the records the training code would use (the others are skipped there too)."""
    out: dict[int, td.Example] = {}
    for i, record in enumerate(records):
        try:
            example, _ = td.tokenize_chat(tokenizer, record, max_seq_len)
        except ValueError:
            continue
        if example is not None:
            out[i] = example
    return out


def validation_indices(tokenizer: Any, records: Sequence[Any], *, fraction: float, seed: int,
                       max_seq_len: int) -> tuple[set[int], set[int]]:
    """(records a fine-tune on these records trained on, records it held out): the fine-tune's own
    `split_validation`, mapped back to record positions."""
    by_index = tokenize_indexed(tokenizer, records, max_seq_len)
    indices = list(by_index)
    examples = [by_index[i] for i in indices]
    _train, held = td.split_validation(examples, fraction, seed)
    held_ids = {id(e) for e in held}
    held_idx = {i for i, e in zip(indices, examples, strict=True) if id(e) in held_ids}
    return set(indices) - held_idx, held_idx


@dataclass(frozen=True)
class TrainingUse:
    """How a job that learned from the evaluated dataset version used it (from a model's lineage)."""

    model: str
    job: str | None
    role: str  # "split": trained on all but its validation split; "train": on every record; "validation": none
    seed: int = DEFAULT_SEED
    fraction: float = DEFAULT_FRACTION
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    tokenizer_dir: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "job": self.job, "role": self.role, "seed": self.seed, "fraction": self.fraction,
                "max_seq_len": self.max_seq_len}


def record_fingerprint(record: Any) -> str:
    """The same conversation gives the same fingerprint whatever dataset, version or key order it came in;
    computed in memory, never stored (a record's hash would let anyone holding a guess confirm it)."""
    try:
        body: Any = td.normalize_record(record)
    except ValueError:
        body = record
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


class _Tokenizers:
    """Each tokenizer folder loaded once per evaluation."""

    def __init__(self, default: Path) -> None:
        self.default = default
        self.loaded: dict[str, Any] = {}

    def __call__(self, path: Path | None) -> Any:
        from transformers import AutoTokenizer

        key = str(path or self.default)
        if key not in self.loaded:
            self.loaded[key] = AutoTokenizer.from_pretrained(path or self.default)
        return self.loaded[key]


def use_positions(records: Sequence[Any], use: TrainingUse, tokenizer: Any) -> tuple[set[int], set[int]]:
    """(record positions a training use learned from, positions it held out), by its role."""
    if use.role == "validation":
        return set(), set(tokenize_indexed(tokenizer, records, use.max_seq_len))
    if use.role == "train":
        return set(tokenize_indexed(tokenizer, records, use.max_seq_len)), set()
    return validation_indices(tokenizer, records, fraction=use.fraction, seed=use.seed, max_seq_len=use.max_seq_len)


def trained_fingerprints(records: Sequence[Any], uses: Sequence[TrainingUse], tokenizer_dir: Path) -> set[str]:
    """Fingerprints of every record `uses` (of one dataset version, `records`) learned from."""
    tokenizers = _Tokenizers(tokenizer_dir)
    return {record_fingerprint(records[i]) for use in uses
            for i in use_positions(records, use, tokenizers(use.tokenizer_dir))[0]}


def held_out_records(records: Sequence[Any], tokenizer_dir: Path, uses: Sequence[TrainingUse],
                     max_records: int = 0, seen: frozenset[str] = frozenset()) -> tuple[list[int], dict[str, Any]]:
    """The record positions no training use learned from, and the split's description for the record.

    Without any training use of this dataset version the fine-tune's default split is used
    (seed 42, 10%), so a later fine-tune with the defaults trains on none of these records. A
    held-out record whose content a compared model learned anyway (a duplicate inside this
    version, or a copy in another dataset or version it trained on: `seen`) is not scored.
    """
    tokenizers = _Tokenizers(tokenizer_dir)
    splits = list(uses) or [TrainingUse(model="", job=None, role="split")]
    allowed: set[int] | None = None
    learned = set(seen)
    for use in splits:
        trained, held = use_positions(records, use, tokenizers(use.tokenizer_dir))
        allowed = held if allowed is None else allowed & held
        if uses:  # the default split stands for a future fine-tune: nothing has learned from it yet
            learned |= {record_fingerprint(records[i]) for i in trained}
    candidates = sorted(allowed or set())
    unseen = [i for i in candidates if record_fingerprint(records[i]) not in learned]
    chosen = unseen[:max_records] if max_records else unseen
    digest = hashlib.sha256(",".join(map(str, chosen)).encode()).hexdigest()
    split = {"method": "finetune-split" if uses else "default-finetune-split", "fraction": splits[0].fraction,
             "seed": splits[0].seed, "held_out": len(chosen), "records": len(records), "indices": chosen,
             "digest": digest, "training_uses": [u.to_json() for u in uses],
             "excluded_as_learned": len(candidates) - len(unseen)}
    if not chosen:
        raise InvalidRequest("no record of this dataset version is held out from every compared model's training "
                             "(a model trained on all of it, or splits that do not overlap); evaluate on another "
                             "dataset", param="dataset", code="eval_no_held_out_records")
    return chosen, split


def eval_items(tokenizer: Any, records: Sequence[Any], indices: Sequence[int], max_seq_len: int) -> list[EvalItem]:
    items = []
    for i in indices:
        example, _ = td.tokenize_chat(tokenizer, records[i], max_seq_len)
        if example is None:
            continue
        labelled = {t for t, label in enumerate(example.labels) if label != td.IGNORE_INDEX}
        start = max(labelled)
        while start - 1 in labelled:  # back to the start of the last trained turn
            start -= 1
        items.append(EvalItem(i, example, start, _last_answer(records[i])))
    return items


# -- metrics -----------------------------------------------------------------------------------------------
def _log_softmax(logits: Logits) -> Logits:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    out: Logits = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return out


def assistant_nll(logits: Logits, example: td.Example) -> tuple[float, int]:
    """Summed negative log-likelihood of the assistant tokens and their count (label t from logits t-1)."""
    positions = [t for t in range(1, len(example.labels)) if example.labels[t] != td.IGNORE_INDEX]
    if not positions:
        return 0.0, 0
    logp = _log_softmax(logits[[t - 1 for t in positions]])
    targets = np.asarray([example.input_ids[t] for t in positions])
    return float(-logp[np.arange(len(positions)), targets].sum()), len(positions)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def is_label_set(references: Sequence[str]) -> bool:
    """Answers are labels when they are short and few distinct ones repeat (a classification dataset)."""
    normal = [normalize_answer(r) for r in references]
    distinct = set(normal)
    return (len(normal) >= 2 and all(0 < len(r.split()) <= LABEL_MAX_WORDS for r in normal)
            and len(distinct) <= LABEL_MAX_DISTINCT and len(distinct) < len(normal))


def label_metrics(references: Sequence[str], predictions: Sequence[str]) -> dict[str, Any]:
    """Accuracy, and precision / recall / F1 per label and their macro mean (an answer that is no label counts
    as wrong for its reference's label)."""
    refs = [normalize_answer(r) for r in references]
    preds = [normalize_answer(p) for p in predictions]
    per: dict[str, dict[str, float]] = {}
    for label in sorted(set(refs)):
        tp = sum(1 for r, p in zip(refs, preds, strict=True) if r == label and p == label)
        fp = sum(1 for r, p in zip(refs, preds, strict=True) if r != label and p == label)
        fn = sum(1 for r, p in zip(refs, preds, strict=True) if r == label and p != label)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per[label] = {"precision": round(precision, 6), "recall": round(recall, 6), "f1": round(f1, 6),
                      "support": tp + fn}
    accuracy = sum(1 for r, p in zip(refs, preds, strict=True) if r == p) / max(1, len(refs))
    macro = sum(v["f1"] for v in per.values()) / max(1, len(per))
    return {"accuracy": round(accuracy, 6), "macro_f1": round(macro, 6), "per_label": per}


def greedy_answer(scorer: Scorer, prompt: Sequence[int], eos: set[int], max_new_tokens: int) -> list[int]:
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(scorer.logits([*prompt, *out])[-1].argmax())
        if token in eos:
            break
        out.append(token)
    return out


def eos_ids(tokenizer: Any, model_dir: Path) -> set[int]:
    import json

    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    generation = model_dir / "generation_config.json"
    if generation.is_file():
        value = json.loads(generation.read_text()).get("eos_token_id")
        ids.update(int(v) for v in (value if isinstance(value, list) else [value]) if v is not None)
    return ids


@dataclass
class ModelScore:
    model: str
    metrics: dict[str, Any]
    answers: list[dict[str, Any]] = field(default_factory=list)


def score_model(scorer: Scorer, items: Sequence[EvalItem], tokenizer: Any, eos: set[int], *, max_new_tokens: int,
                labels: bool, should_stop: Callable[[], None] = lambda: None,
                on_item: Callable[[int], None] = lambda n: None) -> ModelScore:
    started = time.monotonic()
    nll, count = 0.0, 0
    predictions: list[str] = []
    ems: list[float] = []
    f1s: list[float] = []
    answers = []
    for n, item in enumerate(items):
        should_stop()
        item_nll, item_count = assistant_nll(scorer.logits(item.example.input_ids), item.example)
        nll += item_nll
        count += item_count
        if max_new_tokens:
            generated = greedy_answer(scorer, item.example.input_ids[:item.prompt_len], eos, max_new_tokens)
            text = tokenizer.decode(generated, skip_special_tokens=True).strip()
            predictions.append(text)
            ems.append(float(normalize_answer(text) == normalize_answer(item.reference)))
            f1s.append(token_f1(text, item.reference))
            answers.append({"record": item.index, "answer": text[:500]})
        on_item(n + 1)
    metrics: dict[str, Any] = {
        "perplexity": round(math.exp(nll / count), 6) if count else None,
        "nll": round(nll / count, 8) if count else None, "tokens": count, "records": len(items),
    }
    if max_new_tokens and items:
        metrics["exact_match"] = round(sum(ems) / len(ems), 6)
        metrics["f1"] = round(sum(f1s) / len(f1s), 6)
        if labels:
            metrics |= label_metrics([i.reference for i in items], predictions)
    metrics["seconds"] = round(time.monotonic() - started, 3)
    return ModelScore(model="", metrics=metrics, answers=answers)
