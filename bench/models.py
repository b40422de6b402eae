"""The serving benchmark's model: FACTS.md's 124M-parameter random-init Llama, as a Q4_K_M GGUF.

Throughput does not depend on trained weights, so the stand-in is never trained: it has the
shape of a small real model (hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536,
tied embeddings, vocab 32000) and goes through the product's own chain (llama.cpp's reference
converter to F16, then `quantize_gguf` to Q4_K_M), so what the servers load is what a user's
model would be.

Two deliberate departures from a real model, both invisible to the per-token cost:

* The SentencePiece vocabulary trained on the built-in corpus has only a few hundred pieces
  (SentencePiece cannot make 32000 from it). The config's vocab_size is 32000 and llama.cpp's
  converter pads the vocabulary with unused [PAD] tokens, so the output matmul and the
  sampler work over 32000 logits exactly like a real 32k-vocab model.
* The embedding rows (tied: also the output rows) of every token that is not a plain text
  piece (control, byte, user-defined, padding) are zero, so their logit is 0 while the best
  real piece's logit is clearly positive. Greedy decoding therefore never ends on EOS and
  every generated token carries text: each server streams exactly the requested number of
  tokens, one text chunk per token, and aggregate tokens/s compares like with like.

    .venv/bin/python bench/models.py [--quick]      # build (or locate) the GGUF, print its path
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from garrison.training.tiny_models import CHAT_TEMPLATE, _seed, _train_sentencepiece

BUILD_VERSION = "1"


@dataclass(frozen=True)
class StandinSpec:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    context: int = 2048
    spm_vocab: int = 8000  # an upper bound: hard_vocab_limit=False keeps what the corpus supports
    seed: int = 0


STANDIN_124M = StandinSpec("llama-124m", hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=32000)
# --quick: seconds to build and to serve; only proves the benchmark's plumbing.
STANDIN_QUICK = StandinSpec("llama-quick", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=2048)


def models_root() -> Path:
    from garrison.paths import cache_dir

    return cache_dir() / "bench" / "models"


def _silence_non_text_tokens(model: Any, sp_model: Path, vocab: int) -> int:
    """Zero the tied rows of every non-text token (see the module docstring); returns how many."""
    import sentencepiece as spm
    import torch

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    text_ids = [i for i in range(sp.get_piece_size())
                if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i)
                        or sp.id_to_piece(i).startswith("<|"))]
    keep = torch.zeros(vocab, dtype=torch.bool)
    keep[text_ids] = True
    with torch.no_grad():
        model.get_input_embeddings().weight[~keep] = 0.0
    return int((~keep).sum())


def build_hf(spec: StandinSpec, out: Path) -> Path:
    """Save the random-init Llama and its tokenizer with save_pretrained (F16 weights, half the disk)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast

    _seed(spec.seed)
    work = Path(tempfile.mkdtemp(prefix="garrison-bench-spm-"))
    try:
        sp_model = _train_sentencepiece(work, spec.spm_vocab)
        tokenizer = LlamaTokenizerFast(vocab_file=str(sp_model), legacy=False, add_bos_token=True,
                                       add_eos_token=False, clean_up_tokenization_spaces=False)
        tokenizer.chat_template = CHAT_TEMPLATE
        if len(tokenizer) > spec.vocab:
            raise ValueError(f"tokenizer has {len(tokenizer)} pieces, more than vocab {spec.vocab}")
        config = LlamaConfig(
            vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
            max_position_embeddings=spec.context, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True, rms_norm_eps=1e-5)
        model: Any = LlamaForCausalLM(config)
        _silence_non_text_tokens(model, sp_model, spec.vocab)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.to(torch.float16).save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def parameter_count(spec: StandinSpec) -> int:
    """Parameters of the stand-in (tied embeddings), to check it against FACTS.md's 124M."""
    h, kv_dim = spec.hidden, spec.hidden // spec.heads * spec.kv_heads
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * spec.intermediate + 2 * h
    return spec.vocab * h + spec.layers * per_layer + h


def ensure_standin(spec: StandinSpec = STANDIN_124M, qtype: str = "q4_k_m") -> Path:
    """The stand-in as a `qtype` GGUF, built once under ~/.cache/garrison/bench/models/ (a crash leaves none)."""
    from garrison.converters.hf_to_gguf import convert_hf_to_gguf
    from garrison.converters.quantize import quantize_gguf

    root = models_root()
    final = root / f"{spec.name}-v{BUILD_VERSION}.{qtype}.gguf"
    if final.exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{spec.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.exists():
            return final
        work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=root))
        try:
            hf = build_hf(spec, work / "hf")
            f16 = convert_hf_to_gguf(hf, work / "model.f16.gguf", "f16")
            shutil.rmtree(hf)
            quantize_gguf(f16, work / "model.gguf", qtype, nthread=min(2, os.cpu_count() or 1))
            os.replace(work / "model.gguf", final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="the tiny plumbing model instead of the 124M one")
    args = parser.parse_args()
    spec = STANDIN_QUICK if args.quick else STANDIN_124M
    path = ensure_standin(spec)
    print(f"{path}  ({parameter_count(spec) / 1e6:.1f}M parameters, {path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
