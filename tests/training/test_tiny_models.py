"""The tiny models every other test builds on: real, offline, and accepted (or refused) by llama.cpp."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from garrison.converters.hf_to_gguf import ConversionError, convert_hf_to_gguf


def test_tiny_llama_is_a_real_hf_model(tiny_llama_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (tiny_llama_dir / "tokenizer.model").exists() and (tiny_llama_dir / "tokenizer.json").exists()
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert config["hidden_size"] == 64 and config["num_hidden_layers"] == 2
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip(), "the trained tiny model should answer with some text"


def test_tiny_llama_gguf_answers_through_llama_cpp(tiny_llama_gguf: Path, repack_verdicts: Any) -> None:
    from conftest import gguf_runner

    from garrison.engine.types import Finish, GenerationRequest, SamplingParams

    async def chat() -> Finish:
        async with gguf_runner(tiny_llama_gguf, repack_verdicts) as engine:
            assert engine.chat_template and "<|assistant|>" in engine.chat_template
            prompt = "<|user|>\nHello\n<|assistant|>\n"
            tokens = await engine.tokenize(prompt, add_special=True, parse_special=True)
            finish = None
            async for item in engine.generate(GenerationRequest(tokens, SamplingParams(temperature=0,
                                                                                       max_tokens=16))):
                if isinstance(item, Finish):
                    finish = item
            assert finish is not None
            return finish

    assert asyncio.run(chat()).completion_tokens > 0


def test_byte_level_bpe_is_refused_with_a_clear_reason(tiny_bpe_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bpe.gguf"
    with pytest.raises(ConversionError) as caught:
        convert_hf_to_gguf(tiny_bpe_llama_dir, out, "f16")
    assert caught.value.code == "unsupported_tokenizer"
    assert "pre-tokenizer" in caught.value.message
    assert not out.exists() and not list(tmp_path.iterdir()), "a refused conversion leaves no file"


def test_missing_converter_is_reported(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GARRISON_CONVERTER_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ConversionError) as caught:
        convert_hf_to_gguf(tiny_llama_dir, tmp_path / "x.gguf")
    assert caught.value.code == "converter_missing"


def test_tiny_bert_carries_its_pooling(tiny_bert_dir: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    pooling = json.loads((tiny_bert_dir / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] is True
    modules = json.loads((tiny_bert_dir / "modules.json").read_text())
    assert any(m["type"].endswith("Normalize") for m in modules)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    model = AutoModel.from_pretrained(tiny_bert_dir)
    batch = tokenizer(["the quick brown fox", "hello"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape[-1] == 64
    assert tokenizer.unk_token_id not in batch["input_ids"][0].tolist()


def test_builds_are_cached_and_deterministic(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from garrison.training.tiny_models import BUILDER_VERSION, ensure_model

    assert tiny_llama_dir.parent.name == BUILDER_VERSION
    again = ensure_model("tiny-llama", tiny_llama_dir.parent.parent)
    assert again == tiny_llama_dir
    with pytest.raises(KeyError):
        ensure_model("no-such-model", tmp_path)
