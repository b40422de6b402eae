"""Structured pruning on a tiny model: the ranking finds the block that changes its input least, and the
pruned folder is an ordinary, smaller Hugging Face model."""

from __future__ import annotations

from pathlib import Path

import pytest

from garrison.corpus import PARAGRAPHS
from garrison.errors import InvalidRequest
from garrison.training.pruning import parse_amount, prune


def test_amounts() -> None:
    assert parse_amount("25%", 4, "depth") == 1 and parse_amount("2", 4, "depth") == 2
    assert parse_amount("", 4, "depth") == 0 and parse_amount("25%", 384, "width") == 96
    for bad in ("x", "100%", "1.5"):
        with pytest.raises(InvalidRequest):
            parse_amount(bad, 4, "depth")


def test_an_identity_block_is_the_one_removed(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    # Block 0 made an identity (its attention and MLP write nothing into the residual stream).
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
    source = tmp_path / "source"
    model.save_pretrained(source)
    for f in tiny_llama_dir.glob("tokenizer*"):
        (source / f.name).write_bytes(f.read_bytes())
    plan = prune(source, tmp_path / "out", PARAGRAPHS, depth="1", width="25%", calibration="builtin")
    assert plan.removed_layers == [0] and plan.layer_scores[0] == pytest.approx(0.0, abs=1e-3)
    assert plan.layer_scores[1] > 0.01 and plan.intermediate_size == 96 and plan.calibration_tokens > 100
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert pruned.config.num_hidden_layers == 1 and pruned.config.intermediate_size == 96
    # Removing an identity block changes nothing the model computes.
    ids = torch.tensor([[1, 30, 40, 50, 60]])
    with torch.no_grad():
        before = model(ids).logits
        model.model.layers = torch.nn.ModuleList([model.model.layers[1]])
        model.model.layers[0].self_attn.layer_idx = 0
        model.config.num_hidden_layers = 1
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-5)
    # The width pruning kept each block's most active channels: its output is close to the unpruned one's.
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(pruned(ids).logits.flatten(), after.flatten(), dim=0) > 0.5
