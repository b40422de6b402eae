"""Training renders real models' chat templates with Garrison's renderer: the ids equal transformers'.

Training and serving share garrison.engine.chat_template, so the prompt a fine-tuned model is
served is the one it was trained on; these tests hold that renderer equal to transformers' own
`apply_chat_template` on the real Qwen3, Llama 3.1 and Gemma 3 tokenizers and templates.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from garrison.training import data as td

RECORD = {"messages": [
    {"role": "system", "content": "Answer briefly. Café 'ü' <&>"},
    {"role": "user", "content": "What does the falcon eat?"},
    {"role": "assistant", "content": "The falcon eats plums."},
    {"role": "user", "content": "And the otter?"},
    {"role": "assistant", "content": "The otter eats kelp."},
]}


@pytest.mark.parametrize("name", ["qwen3", "llama3_1", "gemma3"])
def test_training_examples_tokenize_as_transformers_renders(name: str,
                                                            real_tokenizer_dir: Callable[[str], Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_tokenizer_dir(name))
    example, truncated = td.tokenize_chat(tokenizer, RECORD, 2048)
    assert example is not None and not truncated
    assert example.input_ids == tokenizer.apply_chat_template(RECORD["messages"], tokenize=True)
    trained = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True)
                                if label != td.IGNORE_INDEX])
    assert "The otter eats kelp." in trained and "falcon eat?" not in trained and "Café" not in trained
