"""The parity gate's prompt check: a served prompt's token ids must be the training tokenizer's.

Sample conversations are rendered as serving renders them (the artifact's own template and special
tokens) and tokenized by llama.cpp; training renders them with the source tokenizer and takes
garrison.engine.prompt_tokens.prompt_ids. A difference fails the gate with `tokenizer_mismatch`.
"""

from __future__ import annotations

from pathlib import Path

from garrison.converters.hf_to_gguf import ensure_gguf
from garrison.converters.parity import check_parity


def test_a_sentencepiece_model_whose_prompts_tokenize_alike_passes(tiny_spaced_llama_dir: Path) -> None:
    result = check_parity(tiny_spaced_llama_dir, ensure_gguf(tiny_spaced_llama_dir, "f16"), "gguf:f16")
    assert result.passed, result.reason
    assert result.prompt_match is True and result.code == "ok"


def test_a_dummy_prefix_that_llama_cpp_adds_after_special_tokens_fails_tokenizer_mismatch(
        tiny_prefixed_llama_dir: Path) -> None:
    result = check_parity(tiny_prefixed_llama_dir, ensure_gguf(tiny_prefixed_llama_dir, "f16"), "gguf:f16")
    assert not result.passed and result.prompt_match is False and result.code == "tokenizer_mismatch"
    assert "sample conversation 0: the served prompt's token ids differ from training's at token 1" in result.reason
    assert "served [" in result.reason and "'▁'" in result.reason
