"""Job kinds as data: what runs, who may start it, what parameters it takes.

A worker subprocess imports only the entry point of its kind, so a kind that needs
torch never brings torch into the daemon. A new kind is one row of `JOB_KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from garrison.errors import InvalidRequest


@dataclass(frozen=True)
class Param:
    name: str
    kind: type
    default: Any
    low: float | None = None
    high: float | None = None
    doc: str = ""

    def parse(self, value: Any) -> Any:
        if self.kind is bool:
            if not isinstance(value, bool):
                raise InvalidRequest(f"parameter {self.name!r} must be true or false", param=self.name)
            return value
        if self.kind in (int, float):
            if isinstance(value, bool):
                raise InvalidRequest(f"parameter {self.name!r} must be a number", param=self.name)
            try:
                number = self.kind(value)
            except (TypeError, ValueError):
                raise InvalidRequest(f"parameter {self.name!r} must be a number", param=self.name) from None
            if self.kind is int and isinstance(value, float) and not value.is_integer():
                raise InvalidRequest(f"parameter {self.name!r} must be a whole number", param=self.name)
            if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
                raise InvalidRequest(f"parameter {self.name!r} must be between {self.low:g} and {self.high:g}",
                                     param=self.name)
            return number
        if self.kind is str:
            if not isinstance(value, str) or len(value) > 4096:
                raise InvalidRequest(f"parameter {self.name!r} must be a string", param=self.name)
            return value
        raise InvalidRequest(f"parameter {self.name!r} has an unsupported type", param=self.name)


@dataclass(frozen=True)
class JobKind:
    name: str
    entry: str  # "module:function", imported only inside the worker subprocess
    scope: str
    description: str
    resumable: bool = False
    default_timeout_s: float | None = None
    params: tuple[Param, ...] = field(default_factory=tuple)
    # "module:function(catalog, registry, principal, params)": checks at submission what would
    # otherwise fail only inside the worker (a model's format, a target, a reference that resolves).
    check: str = ""

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(params, dict):
            raise InvalidRequest("params must be an object", param="params")
        known = {p.name: p for p in self.params}
        extra = sorted(set(params) - set(known))
        if extra:
            raise InvalidRequest(f"unknown parameter(s) for {self.name}: {', '.join(extra)}",
                                 param=extra[0], code="unknown_parameter")
        return {name: (spec.parse(params[name]) if name in params else spec.default)
                for name, spec in known.items()}

    def load(self) -> Callable[..., dict[str, Any]]:
        fn: Callable[..., dict[str, Any]] = _resolve(self.entry)
        return fn

    def load_check(self) -> Callable[..., None] | None:
        fn: Callable[..., None] | None = _resolve(self.check) if self.check else None
        return fn


def _resolve(spec: str) -> Any:
    import importlib

    module_name, _, func = spec.partition(":")
    return getattr(importlib.import_module(module_name), func)


JOB_KINDS: dict[str, JobKind] = {
    kind.name: kind
    for kind in (
        JobKind(
            name="selftest",
            entry="garrison.jobs.selftest:run",
            scope="admin",
            resumable=True,
            description="Counts steps with a checkpoint after each: proves the runner end to end "
                        "(progress, cancel, retry, crash recovery) on a new installation.",
            default_timeout_s=3600,
            params=(
                Param("steps", int, 10, 1, 1_000_000, "how many steps to count"),
                Param("step_s", float, 0.1, 0.0, 60.0, "seconds each step takes"),
                Param("fail_attempts", int, 0, 0, 100, "raise an error in this many first attempts"),
                Param("crash_at_step", int, 0, 0, 1_000_000,
                      "in the first attempt, kill the worker abruptly at this step (0: never)"),
                Param("ignore_stop", bool, False, doc="never check for stop requests (tests kill paths)"),
                Param("probe_address", str, "",
                      doc="HOST:PORT this job tries to reach, to prove the network guard refuses it"),
            ),
        ),
        JobKind(
            name="build-default-model",
            entry="garrison.jobs.default_model:run",
            scope="admin",
            description="Builds the default base model (a small Llama pre-trained on text every machine has; no "
                        "download) and registers it; cached across runs.",
            default_timeout_s=1800,
            params=(Param("size", str, "base", doc="base (pre-trained a few minutes) or tiny (tests)"),),
        ),
        JobKind(
            name="export",
            entry="garrison.jobs.export:run",
            check="garrison.jobs.export:check",
            scope="export",
            description="Converts a Hugging Face model to GGUF (llama.cpp's converter and quantizer) and ONNX "
                        "(optimum-onnx), gates every artifact on parity with the source and publishes each as "
                        "NAME:VARIANT with a signed manifest.",
            default_timeout_s=6 * 3600,
            params=(
                Param("model", str, "", doc="the Hugging Face model to export"),
                Param("to", str, "gguf:q4_k_m", doc="comma-separated targets: gguf:TYPE, onnx:fp32|fp16|int8"),
                Param("imatrix", str, "", doc="importance matrix for quantization: builtin (calibration text), "
                                              "dataset:NAME[:N] (an ingested dataset) or an imatrix file"),
                Param("base_gguf", str, "", doc="for a peft adapter: the GGUF model to serve it on "
                                                "(default: the base's best GGUF export)"),
            ),
        ),
        JobKind(
            name="finetune",
            entry="garrison.jobs.finetune:run",
            check="garrison.jobs.finetune:check",
            scope="train",
            resumable=True,
            description="Fine-tunes a Hugging Face model on a dataset version (LoRA by default) with encrypted, "
                        "resumable checkpoints; registers the adapter and serves it at once as a GGUF LoRA on the "
                        "base's GGUF export; optional parity-gated exports of the merged model.",
            default_timeout_s=7 * 86400,
            params=(
                Param("model", str, "", doc="base model (a Hugging Face model in the registry)"),
                Param("training_file", str, "", doc="dataset NAME or NAME:N, or an uploaded file id (file-...)"),
                Param("validation_file", str, "", doc="optional; else a fraction of the training set is held out"),
                Param("hyperparameters", str, "{}", doc="OpenAI's n_epochs, batch_size, learning_rate_multiplier "
                                                        "(JSON; numbers or \"auto\")"),
                Param("method", str, "lora", doc="lora or full"),
                Param("lora_r", int, 16, 1, 1024, "LoRA rank"),
                Param("seed", int, 42, 0, 2**31 - 1, "random seed"),
                Param("max_seq_len", int, 2048, 16, 1 << 20, "longest packed sequence in tokens"),
                Param("max_steps", int, 0, 0, 10**9, "stop after this many optimizer steps (0: the epochs decide)"),
                Param("checkpoint_every", int, 50, 1, 10**9, "steps between encrypted checkpoints"),
                Param("micro_batch_size", int, 0, 0, 1 << 20, "examples per forward pass (0: batch_size); smaller "
                      "saves memory, the batch is kept through gradient accumulation"),
                Param("gradient_checkpointing", bool, False, doc="recompute activations in the backward pass: "
                      "less memory, about a third slower, same results"),
                Param("suffix", str, "", doc="the fine-tuned model's name is BASE-ft-SUFFIX"),
                Param("export", str, "", doc="after training, export the merged model: gguf:q4_k_m,onnx:int8,..."),
            ),
        ),
        JobKind(
            name="eval",
            entry="garrison.jobs.evaluate:run",
            check="garrison.jobs.evaluate:check",
            scope="train",
            description="Scores registered models (Hugging Face, peft, GGUF, GGUF LoRA, ONNX) side by side on a "
                        "dataset version's held-out records: assistant-turn perplexity, exact match and token F1 of "
                        "greedy answers, per-label metrics for label answers; records no compared model trained on.",
            default_timeout_s=6 * 3600,
            params=(
                Param("models", str, "", doc="comma-separated models to compare"),
                Param("dataset", str, "", doc="dataset NAME or NAME:N whose held-out records are scored"),
                Param("max_new_tokens", int, 64, 0, 4096, "longest greedy answer (0: perplexity only)"),
                Param("max_records", int, 0, 0, 10**6, "score at most this many held-out records (0: all)"),
            ),
        ),
        JobKind(
            name="prune",
            entry="garrison.jobs.prune:run",
            check="garrison.jobs.prune:check",
            scope="train",
            description="Structured pruning of a Hugging Face model: whole decoder blocks ranked by angular distance "
                        "(ShortGPT), and MLP channels, attention heads and embedding channels ranked by activation "
                        "(Minitron), on calibration data; registers NAME-pruned-SUFFIX with its plan in the lineage "
                        "and evaluates it beside its source.",
            default_timeout_s=6 * 3600,
            params=(
                Param("model", str, "", doc="the Hugging Face model to prune"),
                Param("depth", str, "", doc="decoder blocks to remove: a count (2) or a percentage (25%)"),
                Param("width", str, "", doc="MLP intermediate channels to remove, a count or a percentage (25%)"),
                Param("heads", str, "", doc="attention query heads to remove, a count or a percentage; every "
                                            "key/value head keeps as many query heads as the others"),
                Param("hidden", str, "", doc="embedding channels (the hidden size) to remove, a count or a "
                                             "percentage; also shrinks the output layer"),
                Param("calibration", str, "", doc="dataset NAME[:N] (its training split) or builtin (default)"),
                Param("calibration_tokens", int, 32768, 64, 10**8, "calibration tokens to measure"),
                Param("eval", str, "", doc="dataset to evaluate source and result on (default: calibration's)"),
                Param("eval_max_new_tokens", int, 32, 0, 4096, "longest greedy answer in that evaluation"),
                Param("suffix", str, "", doc="the result is named MODEL-pruned-SUFFIX"),
                Param("export", str, "", doc="also export the pruned model: gguf:q4_k_m,onnx:int8,..."),
            ),
        ),
        JobKind(
            name="distill",
            entry="garrison.jobs.distill:run",
            check="garrison.jobs.distill:check",
            scope="train",
            resumable=True,
            description="Knowledge distillation (also healing after pruning): the student learns the teacher's top-k "
                        "next-token distributions (forward KL, cached encrypted per dataset version) plus weighted "
                        "cross-entropy; resumable like fine-tuning; registers STUDENT-distilled-SUFFIX with its "
                        "lineage and evaluates it beside teacher and student.",
            default_timeout_s=7 * 86400,
            params=(
                Param("teacher", str, "", doc="the teacher (a Hugging Face model)"),
                Param("student", str, "", doc="the student (a Hugging Face model sharing the teacher's tokenizer)"),
                Param("dataset", str, "", doc="dataset NAME or NAME:N (its training split is learned)"),
                Param("method", str, "full", doc="full or lora (merged into the student at the end)"),
                Param("lora_r", int, 16, 1, 1024, "LoRA rank"),
                Param("hyperparameters", str, "{}", doc="n_epochs, batch_size, learning_rate_multiplier (JSON)"),
                Param("top_k", int, 16, 1, 1024, "teacher log-probabilities kept per position"),
                Param("ce_weight", float, 0.5, 0.0, 100.0, "weight of the cross-entropy next to the KL term"),
                Param("seed", int, 42, 0, 2**31 - 1, "random seed"),
                Param("max_seq_len", int, 2048, 16, 1 << 20, "longest sequence in tokens"),
                Param("max_steps", int, 0, 0, 10**9, "stop after this many optimizer steps (0: the epochs decide)"),
                Param("checkpoint_every", int, 50, 1, 10**9, "steps between encrypted checkpoints"),
                Param("eval_max_new_tokens", int, 32, 0, 4096, "longest greedy answer in the final evaluation"),
                Param("suffix", str, "", doc="the result is named STUDENT-distilled-SUFFIX"),
                Param("export", str, "", doc="also export the result: gguf:q4_k_m,onnx:int8,..."),
            ),
        ),
    )
}


def job_kind(name: str) -> JobKind:
    try:
        return JOB_KINDS[name]
    except KeyError:
        raise InvalidRequest(f"unknown job kind {name!r}; kinds: {', '.join(sorted(JOB_KINDS))}",
                             param="kind", code="unknown_job_kind") from None

