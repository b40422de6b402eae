"""The parity gate: an artifact must compute what its source computed, or it is not served.

On a fixed probe set, the artifact's next-token distributions are compared with the
Hugging Face model's in float32 (top-1 agreement, mean KL divergence), and perplexity on
held-out text is measured for both. The same token ids go to both sides (the artifact's
own tokenizer is checked separately), so a difference is the weights' and the graph's,
not the tokenizer's. Thresholds live in one table, per format and quantization type.

The artifact's tokenizer is checked twice: on the probes as plain text, and on sample
conversations as serving will see them: rendered with the artifact's own chat template and
special tokens, tokenized by the artifact (llama.cpp, or `tokenizers` for ONNX) with the
special tokens in the text parsed; the ids must be the training tokenizer's for the text
training renders (garrison.engine.prompt_tokens), or a fine-tune would be served prompts it
was never trained on. Either difference fails the gate with code ``tokenizer_mismatch``.
Runs in worker processes: imports torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from garrison.corpus import PARAGRAPHS
from garrison.engine.chat_template import chosen_template, render
from garrison.engine.prompt_tokens import prompt_ids
from garrison.errors import InvalidRequest

# Probe prompts: what the model is asked. Held-out text: perplexity, never trained on verbatim.
PROBES: tuple[str, ...] = (
    "Garrison is an appliance that",
    "The capital of France is",
    "A job is a row in the catalog. It is queued, then",
    "Hello! How can I help",
    "Quantization makes a model smaller and",
    "One, two, three, four,",
)
HELD_OUT: tuple[str, ...] = (
    "The appliance keeps every dataset encrypted, and a worker reads it only in memory while it trains.",
    "Tomorrow the weather brings clouds and a light rain in the afternoon over the hills.",
    PARAGRAPHS[2],
)

# Conversations whose served prompt (generation prompt added) must tokenize as training tokenizes it.
# A template that refuses one on the training side (no system role, say) skips it.
CONVERSATIONS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "When does my parcel ship?"},),
    ({"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hello! Who are you?"}),
    ({"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three."},
     {"role": "user", "content": "Now in French, s'il vous plaît."}),
)


@dataclass(frozen=True)
class Threshold:
    min_top1: float
    max_kl: float
    max_ppl_ratio: float


# Per artifact kind: how close it must stay to the float32 source. Lossless conversions get
# tight bounds; quantized ones get bounds in line with llama.cpp's published deltas for
# those types, widened for the tiny test models whose 64-wide rows quantize worst.
THRESHOLDS: dict[str, Threshold] = {
    "gguf:f32": Threshold(0.999, 1e-4, 1.001),
    "gguf:f16": Threshold(0.98, 2e-3, 1.01),
    "gguf:bf16": Threshold(0.97, 1e-2, 1.02),
    "gguf:q8_0": Threshold(0.95, 2e-2, 1.03),
    "gguf:q6_k": Threshold(0.90, 5e-2, 1.06),
    "gguf:q5_k_m": Threshold(0.85, 0.10, 1.10),
    "gguf:q5_0": Threshold(0.85, 0.10, 1.10),
    "gguf:q4_k_m": Threshold(0.80, 0.20, 1.20),
    "gguf:q4_0": Threshold(0.75, 0.30, 1.30),
    "gguf:iq4_xs": Threshold(0.75, 0.30, 1.30),
    "gguf:q3_k_m": Threshold(0.65, 0.50, 1.50),
    "gguf:q2_k": Threshold(0.50, 1.00, 2.00),
    "onnx:fp32": Threshold(0.999, 1e-4, 1.001),
    "onnx:fp16": Threshold(0.97, 1e-2, 1.02),
    "onnx:int8": Threshold(0.75, 0.30, 1.30),
}


@dataclass(frozen=True)
class ParityResult:
    kind: str
    top1_agreement: float
    mean_kl: float
    perplexity: float
    reference_perplexity: float
    tokenizer_match: bool
    positions: int
    threshold: dict[str, float]
    passed: bool
    reason: str
    prompt_match: bool | None = None  # sample conversations' served prompt ids; None: no chat template
    code: str = "ok"  # "tokenizer_mismatch" | "parity_failed" when not passed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


Logits = npt.NDArray[np.float64]


def _log_softmax(logits: Logits) -> Logits:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    out: Logits = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return out


def _hf_logits(model_dir: Path, sequences: list[list[int]]) -> list[Logits]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    out = []
    with torch.no_grad():
        for ids in sequences:
            logits = model(torch.tensor([ids])).logits[0].double().numpy()
            out.append(logits)
    return out


def prompt_mismatch(tokenizer: Any, served_template: str | None, served_special: dict[str, str],
                    tokenize_served: Any) -> str | None:
    """How the first sample conversation's served prompt differs from training's, or None when none does.

    Training renders with the source tokenizer's template and special tokens and takes
    `prompt_ids`; serving renders with the artifact's and tokenizes with `tokenize_served`.
    """
    template = chosen_template(tokenizer.chat_template)
    if not template:
        return None
    for n, conversation in enumerate(CONVERSATIONS):
        try:
            text = render(template, conversation, special_tokens=tokenizer.special_tokens_map)
        except InvalidRequest:
            continue
        try:
            served_text = render(served_template, conversation, special_tokens=served_special)
        except InvalidRequest as exc:
            return f"sample conversation {n}: the artifact's chat template fails ({exc.message})"
        if served_text != text:
            k = next((i for i, (a, b) in enumerate(zip(served_text, text, strict=False)) if a != b),
                     min(len(text), len(served_text)))
            return (f"sample conversation {n}: the served prompt's text differs from training's at character {k}: "
                    f"{served_text[k:k + 24]!r} vs {text[k:k + 24]!r}")
        trained = prompt_ids(tokenizer, text)
        served = list(tokenize_served(text))
        if served != trained:
            k = next((i for i, (a, b) in enumerate(zip(served, trained, strict=False)) if a != b),
                     min(len(served), len(trained)))
            shown = [(ids[k:k + 4], tokenizer.convert_ids_to_tokens(ids[k:k + 4])) for ids in (served, trained)]
            return (f"sample conversation {n}: the served prompt's token ids differ from training's at token {k}: "
                    f"served {shown[0][0]} {shown[0][1]}, trained {shown[1][0]} {shown[1][1]}")
    return None


def _gguf_logits(path: Path, sequences: list[list[int]], texts: list[str], tokenizer: Any,
                 lora: Path | None = None) -> tuple[list[Logits], bool, str | None]:
    from garrison.engine.llama_logits import SequenceScorer

    longest = max(len(s) for s in sequences)
    with SequenceScorer(path, n_ctx=max(64, longest + 8), lora=lora) as scorer:
        out = [scorer.logits(ids) for ids in sequences]
        match = all(scorer.tokenize(t, add_special=True, parse_special=False) == ids
                    for t, ids in zip(texts, sequences, strict=True))
        prompts = prompt_mismatch(tokenizer, scorer.chat_template,
                                  {"bos_token": scorer.bos_token, "eos_token": scorer.eos_token},
                                  lambda text: scorer.tokenize(text, add_special=False, parse_special=True))
    return out, match, prompts


def _onnx_logits(folder: Path, sequences: list[list[int]], texts: list[str],
                 tokenizer: Any) -> tuple[list[Logits], bool, str | None]:
    from garrison.engine.onnx_engine import OnnxDecoderEngine

    with OnnxDecoderEngine(folder) as engine:
        out = [engine.sequence_logits(ids) for ids in sequences]
        match = all(engine.tokenize(t) == ids for t, ids in zip(texts, sequences, strict=True))
        prompts = prompt_mismatch(tokenizer, engine.chat_template,
                                  {"bos_token": engine.bos_token, "eos_token": engine.eos_token},
                                  lambda text: engine.tokenize(text, add_special=False, parse_special=True))
    return out, match, prompts


def _perplexity(logits: list[Logits], sequences: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for lg, ids in zip(logits, sequences, strict=True):
        logp = _log_softmax(lg[:-1])
        targets = np.asarray(ids[1:])
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
    return math.exp(nll / max(1, count))


def compare(reference: list[Logits], candidate: list[Logits]) -> tuple[float, float]:
    """Top-1 agreement and mean KL(reference || candidate) over every position."""
    agree, kl, n = 0, 0.0, 0
    for ref, cand in zip(reference, candidate, strict=True):
        lp_ref, lp_cand = _log_softmax(ref), _log_softmax(cand[:, :ref.shape[1]])
        agree += int((ref.argmax(-1) == cand[:, :ref.shape[1]].argmax(-1)).sum())
        kl += float((np.exp(lp_ref) * (lp_ref - lp_cand)).sum())
        n += ref.shape[0]
    return agree / n, kl / n


def check_parity(source_dir: Path, artifact: Path, kind: str, *, lora: Path | None = None,
                 threshold_kind: str | None = None) -> ParityResult:
    """Run the gate for one artifact (`kind` such as "gguf:q4_k_m" or "onnx:int8").

    For a LoRA adapter, `artifact` is the GGUF base it is served on, `lora` the adapter, the
    source the adapter merged into its base, and the threshold the base's (`threshold_kind`).
    """
    from transformers import AutoTokenizer

    threshold = THRESHOLDS.get(threshold_kind or kind)
    if threshold is None:
        raise KeyError(f"no parity threshold for {kind}")
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    texts = list(PROBES) + list(HELD_OUT)
    sequences = [list(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]
    reference = _hf_logits(source_dir, sequences)
    if kind.startswith("gguf:"):
        candidate, tokenizer_match, prompts = _gguf_logits(artifact, sequences, texts, tokenizer, lora)
    else:
        candidate, tokenizer_match, prompts = _onnx_logits(artifact, sequences, texts, tokenizer)
    top1, kl = compare(reference, candidate)
    held = len(PROBES)
    ppl = _perplexity(candidate[held:], sequences[held:])
    ref_ppl = _perplexity(reference[held:], sequences[held:])
    failures = []
    if not tokenizer_match:
        failures.append("the artifact's tokenizer gives other token ids than the source's")
    if prompts is not None:
        failures.append(prompts)
    tokenizer_failed = bool(failures)
    if top1 < threshold.min_top1:
        failures.append(f"top-1 agreement {top1:.4f} < {threshold.min_top1}")
    if kl > threshold.max_kl:
        failures.append(f"mean KL {kl:.5f} > {threshold.max_kl}")
    if ppl > ref_ppl * threshold.max_ppl_ratio:
        failures.append(f"perplexity {ppl:.3f} > {threshold.max_ppl_ratio} x source {ref_ppl:.3f}")
    return ParityResult(kind=kind, top1_agreement=round(top1, 6), mean_kl=round(kl, 8), perplexity=round(ppl, 5),
                        reference_perplexity=round(ref_ppl, 5), tokenizer_match=tokenizer_match,
                        positions=sum(len(s) for s in sequences), threshold=asdict(threshold),
                        passed=not failures, reason="; ".join(failures) or "ok",
                        prompt_match=None if not chosen_template(tokenizer.chat_template) else prompts is None,
                        code="tokenizer_mismatch" if tokenizer_failed else "parity_failed" if failures else "ok")
