"""Knowledge distillation: a student learns a teacher's next-token distributions on chat records.

The loss of each assistant token is the forward KL divergence from the teacher's top-k
distribution (its log-probabilities at its k most likely tokens, renormalised over them) to
the student's, plus `ce_weight` times the usual cross-entropy on the reference token. The
teacher runs once per (teacher, dataset examples, k): its top-k are cached encrypted under a
key wrapped by the master key, like checkpoints, so a resumed or repeated job does not run
the teacher again. Everything else (LoRA or full, devices, checkpoints, resume after kill -9,
the held-out split, evaluation loss as plain cross-entropy) is fine-tuning's loop
(`garrison.training.finetune`), of which the trainer here is a subclass. Teacher and student
must share a tokenizer, or the distributions are over different vocabularies.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from garrison.errors import IntegrityError, InvalidRequest
from garrison.training import checkpoints as ckpt
from garrison.training import data as td
from garrison.training.finetune import FinetuneConfig, FinetuneResult, ProgressEvent, _Trainer, train

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class DistillConfig(FinetuneConfig):
    teacher: str = ""  # the teacher's Hugging Face folder
    top_k: int = 16
    ce_weight: float = 0.5

    def validate(self) -> None:
        super().validate()
        if not (Path(self.teacher) / "config.json").is_file():
            raise InvalidRequest(f"teacher folder {self.teacher} has no config.json", param="teacher",
                                 code="model_not_found")
        if not 1 <= self.top_k <= 1024:
            raise InvalidRequest("top_k must be between 1 and 1024", param="top_k", code="invalid_hyperparameters")
        if self.ce_weight < 0:
            raise InvalidRequest("ce_weight must be at least 0", param="ce_weight", code="invalid_hyperparameters")


def tokenizer_fingerprint(folder: Path) -> str:
    """What decides token ids: tokenizer.json's model and added tokens (or the SentencePiece model's bytes).
    Read as plain files, so the daemon can refuse a mismatch at submission without loading a tokenizer."""
    digest = hashlib.sha256()
    path = folder / "tokenizer.json"
    if path.is_file():
        raw = json.loads(path.read_text())
        digest.update(json.dumps([raw.get("model"), raw.get("added_tokens"), raw.get("pre_tokenizer"),
                                  raw.get("normalizer")], sort_keys=True).encode())
        return digest.hexdigest()
    path = folder / "tokenizer.model"
    if path.is_file():
        digest.update(path.read_bytes())
        return digest.hexdigest()
    raise InvalidRequest(f"{folder.name} has no tokenizer.json or tokenizer.model", code="distill_tokenizer_mismatch")


def check_tokenizers(teacher: Path, student: Path) -> None:
    if tokenizer_fingerprint(teacher) != tokenizer_fingerprint(student):
        raise InvalidRequest("teacher and student do not share a tokenizer: their next-token distributions are over "
                             "different vocabularies; distil between models of one family", param="teacher",
                             code="distill_tokenizer_mismatch")


def _example_key(example: td.Example) -> str:
    return hashlib.sha256(json.dumps(example.input_ids).encode()).hexdigest()


def teacher_top_k(teacher: Path, examples: list[td.Example], k: int, device: Any,
                  check: Callable[[], None] = lambda: None) -> dict[str, tuple[Any, Any, Any]]:
    """Per example: (positions [n], top-k token ids [n, k], their log-probabilities [n, k]) at every position
    whose next token is an assistant label."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).to(device)
    model.eval()
    out: dict[str, tuple[Any, Any, Any]] = {}
    with torch.no_grad():
        for example in examples:
            check()
            key = _example_key(example)
            if key in out:
                continue
            positions = [t - 1 for t in range(1, len(example.labels)) if example.labels[t] != td.IGNORE_INDEX]
            logits = model(torch.tensor([example.input_ids], device=device)).logits[0, positions].float()
            logp = torch.log_softmax(logits, dim=-1)
            values, indices = torch.topk(logp, k, dim=-1)
            out[key] = (torch.tensor(positions, dtype=torch.int32), indices.to(torch.int32).cpu(), values.cpu())
    del model
    return out


def _unpack(entry: tuple[Any, Any, Any]) -> tuple[Any, Any, Any]:
    positions, ids, values = entry
    return positions.long(), ids.long(), values.float()


def trainer_class(cache_path: Path, cache_key: bytes, progress: Callable[[str], None]) -> type[_Trainer]:
    """A fine-tuning trainer whose loss is distillation's, with the teacher's cache at `cache_path`."""

    class DistillTrainer(_Trainer):
        config: DistillConfig

        def load_data(self, train_records: Callable[[], Iterable[dict[str, Any]]],
                      val_records: Callable[[], Iterable[dict[str, Any]]] | None) -> None:
            super().load_data(train_records, val_records)
            cfg = self.config
            self.teacher: dict[str, tuple[Any, Any, Any]] = {}
            if cache_path.is_file():
                try:
                    state = ckpt.load_checkpoint(cache_path, cache_key)
                    if state.get("top_k") == cfg.top_k:
                        self.teacher = state["targets"]
                except IntegrityError:
                    self.teacher = {}
            missing = [e for e in self.train_examples if _example_key(e) not in self.teacher]
            if missing:
                progress(f"computing the teacher's top-{cfg.top_k} on {len(missing)} examples (cached for reuse)")
                self.teacher.update(teacher_top_k(Path(cfg.teacher), missing, cfg.top_k, self.device,
                                                  check=lambda: None))
                if self.dist.rank == 0:
                    ckpt.save_checkpoint(cache_path.parent, 0, {"top_k": cfg.top_k, "targets": self.teacher},
                                         cache_key).replace(cache_path)
            self.teacher_hits = len(self.train_examples) - len(missing)

        def micro_batches(self, examples: list[td.Example]) -> Iterator[dict[str, Any]]:
            """Unpacked rows (one example each), with the teacher's top-k aligned to the rows' positions."""
            torch = self.torch
            k = self.config.top_k
            for i in range(0, len(examples), self.micro):
                part = examples[i:i + self.micro]
                batch = td.collate(td.as_rows(part), self.pad_id, packed=False)
                entries = [self.teacher.get(_example_key(e)) for e in part]
                if all(entry is not None for entry in entries):
                    width = batch["input_ids"].shape[1]
                    idx = torch.zeros((len(part), width, k), dtype=torch.long)
                    logp = torch.zeros((len(part), width, k), dtype=torch.float32)
                    mask = torch.zeros((len(part), width), dtype=torch.bool)
                    for r, entry in enumerate(entries):
                        positions, ids, values = _unpack(entry)  # type: ignore[arg-type]
                        idx[r, positions] = ids
                        logp[r, positions] = values
                        mask[r, positions] = True
                    batch |= {"teacher_ids": idx, "teacher_logp": logp, "teacher_mask": mask}
                yield batch

        def _forward_sum(self, model: Any, batch: dict[str, Any]) -> Any:
            """Summed KL(teacher top-k || student) + ce_weight x summed cross-entropy; plain cross-entropy for
            batches without teacher targets (the validation set: eval loss stays fine-tuning's)."""
            torch = self.torch
            teacher = {k: batch.pop(k) for k in ("teacher_ids", "teacher_logp", "teacher_mask") if k in batch}
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self.autocast():
                out = model(**batch, use_cache=False, num_items_in_batch=1)
            if not teacher:
                return out.loss
            ids = teacher["teacher_ids"].to(self.device)
            t_logp = teacher["teacher_logp"].to(self.device)
            mask = teacher["teacher_mask"].to(self.device)
            t_logp = t_logp - torch.logsumexp(t_logp, dim=-1, keepdim=True)  # renormalised over the top k
            s_logp = torch.log_softmax(out.logits.float(), dim=-1).gather(-1, ids)
            kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
            return (kl * mask).sum() + self.config.ce_weight * out.loss

    return DistillTrainer


def distill(config: DistillConfig, train_records: Callable[[], Iterable[dict[str, Any]]],
            val_records: Callable[[], Iterable[dict[str, Any]]] | None, *, workdir: Path, checkpoint_key: bytes,
            cache_path: Path, cache_key: bytes, on_progress: Callable[[ProgressEvent], None],
            should_stop: Callable[[], bool], on_message: Callable[[str], None] = lambda m: None) -> FinetuneResult:
    """Train `config.base_model` (the student) towards `config.teacher`; resumable exactly as `train` is."""
    config.validate()
    check_tokenizers(Path(config.teacher), Path(config.base_model))
    return train(config, train_records, val_records, workdir=workdir, checkpoint_key=checkpoint_key,
                 on_progress=on_progress, should_stop=should_stop,
                 trainer=trainer_class(cache_path, cache_key, on_message))
