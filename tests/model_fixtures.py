"""Session fixtures for tiny real models, built once per machine (not per test run).

Models are built by garrison.training.tiny_models into $GARRISON_TEST_CACHE (default
~/.cache/garrison/test-models), keyed by the builder's version, so a second run of the
suite reuses them and a change to a builder rebuilds. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

__all__ = ["test_model_root", "tiny_bert_dir", "tiny_bpe_llama_dir", "tiny_llama_dir", "tiny_llama_gguf",
           "tiny_lora_dir", "tiny_lora_gguf"]


@pytest.fixture(scope="session")
def test_model_root() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "garrison" / "test-models"
    return Path(os.environ.get("GARRISON_TEST_CACHE") or default)


@pytest.fixture(scope="session")
def tiny_llama_dir(test_model_root: Path) -> Path:
    """Hugging Face folder: LlamaForCausalLM (hidden 64, 2 layers), SentencePiece tokenizer, chat template."""
    from garrison.training.tiny_models import ensure_model

    return ensure_model("tiny-llama", test_model_root)


@pytest.fixture(scope="session")
def tiny_bpe_llama_dir(test_model_root: Path) -> Path:
    """A Llama with a byte-level BPE tokenizer that llama.cpp's converter refuses."""
    from garrison.training.tiny_models import ensure_model

    return ensure_model("tiny-bpe-llama", test_model_root)


@pytest.fixture(scope="session")
def tiny_bert_dir(test_model_root: Path) -> Path:
    """BERT encoder with mean pooling + normalization (sentence-transformers layout)."""
    from garrison.training.tiny_models import ensure_model

    return ensure_model("tiny-bert", test_model_root)


@pytest.fixture(scope="session")
def tiny_llama_gguf(tiny_llama_dir: Path) -> Path:
    """The tiny Llama as an F16 GGUF written by llama.cpp's reference converter."""
    from garrison.converters.hf_to_gguf import ensure_gguf

    return ensure_gguf(tiny_llama_dir, "f16")


@pytest.fixture(scope="session")
def tiny_lora_dir(test_model_root: Path, tiny_llama_dir: Path) -> Path:
    """A peft LoRA adapter of the tiny Llama (answers in capitals)."""
    from garrison.training.tiny_models import ensure_model

    return ensure_model("tiny-lora", test_model_root)


@pytest.fixture(scope="session")
def tiny_lora_gguf(tiny_lora_dir: Path, tiny_llama_dir: Path) -> Path:
    """The adapter as a GGUF LoRA written by llama.cpp's convert_lora_to_gguf.py."""
    from garrison.converters.hf_to_gguf import convert_lora_to_gguf

    out = tiny_lora_dir.parent / "tiny-lora.f16.gguf"
    if not out.exists():
        convert_lora_to_gguf(tiny_lora_dir, tiny_llama_dir, out)
    return out
