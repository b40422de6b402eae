"""Structured pruning on a tiny model: the ranking finds the block that changes its input least, and the
pruned folder is an ordinary, smaller Hugging Face model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def _random_llama(tokenizer_dir: Path, out: Path, **config: int) -> Path:
    """A random Llama with the tiny tokenizer: the equivalence tests need exact structure, not training."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    settings = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256} | config
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, **settings))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _logits(folder: Path, edit: Any = None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    with torch.no_grad():
        return model(torch.tensor([[1, 30, 40, 50, 60, 70, 80]])).logits


def test_each_width_axis_removes_what_contributes_least(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Embedding channels the residual stream never carries and MLP channels that never fire are the ones removed,
    and removing them (and one query head per group) computes exactly what the source computes without them."""
    import torch
    from transformers import AutoModelForCausalLM

    source = _random_llama(tiny_llama_dir, tmp_path / "source")
    silent = [5, 17, 40, 63]
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, silent] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[silent, :] = 0
            layer.mlp.down_proj.weight[silent, :] = 0
            layer.mlp.gate_proj.weight[:32, :] = 0  # silu(0) * up = 0: these channels never fire
    model.save_pretrained(source)
    plan = prune(source, tmp_path / "out", PARAGRAPHS, width="32", heads="2", hidden="4", calibration="builtin")
    assert (plan.hidden_size, plan.intermediate_size, plan.num_attention_heads, plan.num_key_value_heads) == \
        (60, 96, 2, 2)
    assert plan.head_strategy == "per_group" and len(plan.removed_heads) == 3
    assert all(len(heads) == 2 and heads[0] < 2 <= heads[1] for heads in plan.removed_heads)  # one per group
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "out").config
    assert (config.hidden_size, config.head_dim, config.intermediate_size) == (60, 16, 96)

    def without_removed_heads(m: Any) -> None:
        for layer, removed in zip(m.model.layers, plan.removed_heads, strict=True):
            for head in removed:
                layer.self_attn.o_proj.weight[:, head * 16:(head + 1) * 16] = 0

    assert torch.allclose(_logits(tmp_path / "out"), _logits(source, without_removed_heads), atol=1e-4)


def test_whole_key_value_groups_go_when_groups_have_one_head(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import torch

    source = _random_llama(tiny_llama_dir, tmp_path / "source", num_key_value_heads=4)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[32:48, :] = 0  # head 2 attends but writes nothing
    model.save_pretrained(source)
    plan = prune(source, tmp_path / "out", PARAGRAPHS, heads="25%", calibration="builtin")
    assert plan.head_strategy == "whole_groups" and plan.removed_heads == [[2], [2], [2]]
    assert (plan.num_attention_heads, plan.num_key_value_heads) == (3, 3)
    assert torch.allclose(_logits(tmp_path / "out"), _logits(source), atol=1e-5)


def test_heads_that_cannot_leave_even_groups_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    source = _random_llama(tiny_llama_dir, tmp_path / "source")  # 4 query heads over 2 key/value heads
    with pytest.raises(InvalidRequest) as refused:
        prune(source, tmp_path / "out", PARAGRAPHS, heads="1", calibration="builtin")
    assert refused.value.code == "prune_heads_uneven" and "removable counts: 2" in str(refused.value)
    with pytest.raises(InvalidRequest) as nothing:
        prune(source, tmp_path / "out", PARAGRAPHS, calibration="builtin")
    assert nothing.value.code == "prune_nothing"
    assert not (tmp_path / "out").exists()


def test_a_size_that_breaks_k_quant_alignment_is_noted() -> None:
    from garrison.training.pruning import PruningPlan, alignment_notes

    plan = PruningPlan(source_layers=8, source_intermediate=2048, source_hidden=512, hidden_size=384,
                       intermediate_size=1536)
    [note] = alignment_notes(plan)
    assert "hidden size 384 is not a multiple of 256" in note and note.endswith("256 would keep them")
    # A source that was not aligned (the tiny models) has nothing to lose; an aligned result nothing to say.
    assert alignment_notes(PruningPlan(source_layers=4, source_intermediate=384, source_hidden=128,
                                       hidden_size=96, intermediate_size=288)) == []
    assert alignment_notes(PruningPlan(source_layers=8, source_intermediate=2048, source_hidden=512,
                                       hidden_size=512, intermediate_size=1536)) == []
