"""Structured pruning of a decoder-only Hugging Face model, ranked on calibration text.

Depth (ShortGPT, Men et al. 2024): each decoder block's influence is the angular distance
between the hidden state entering it and the one leaving it, averaged over calibration
tokens (arccos of their cosine similarity, over pi); the blocks that change their input
least are removed whole. Width (Minitron, Muralidharan et al. 2024): each MLP
intermediate channel's importance is the mean magnitude of its activation (the input of
`down_proj`) over calibration tokens; the least important channels are sliced out of
`gate_proj`/`up_proj` rows and `down_proj` columns, the same number in every block (a
Llama config has one `intermediate_size`).

The result is an ordinary Hugging Face folder with a smaller config (fewer
`num_hidden_layers`, a smaller `intermediate_size`) and the source's tokenizer, so
export, parity, serving and fine-tuning take it unchanged. Runs in worker processes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from garrison.errors import InvalidRequest

_SPEC = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")


def parse_amount(spec: str, total: int, param: str) -> int:
    """"N" (blocks or channels) or "P%" of `total`, rounded to the nearest whole, as a count to remove."""
    if not spec:
        return 0
    match = _SPEC.match(spec)
    if not match:
        raise InvalidRequest(f"{param} must be a count such as 2 or a percentage such as 25%", param=param)
    value, percent = float(match.group(1)), bool(match.group(2))
    if percent:
        if value >= 100:
            raise InvalidRequest(f"{param} must be below 100%", param=param)
        return max(1, round(total * value / 100)) if value > 0 else 0  # 25% of 2 blocks is one, not none
    if not value.is_integer():
        raise InvalidRequest(f"{param} must be a whole count or a percentage", param=param)
    return int(value)


@dataclass
class PruningPlan:
    """What was removed and why: recorded in the pruned model's lineage."""

    source_layers: int
    source_intermediate: int
    removed_layers: list[int] = field(default_factory=list)
    layer_scores: list[float] = field(default_factory=list)  # angular distance of every source block
    intermediate_size: int = 0
    width_fraction: float = 0.0
    calibration: str = "builtin"
    calibration_tokens: int = 0
    method: dict[str, str] = field(default_factory=lambda: {"depth": "shortgpt-angular-distance",
                                                              "width": "minitron-mlp-activation"})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _decoder_layers(model: Any) -> Any:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise InvalidRequest(f"{type(model).__name__} has no model.layers: structured pruning supports "
                             "Llama-style decoders", param="model", code="prune_unsupported_model")
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise InvalidRequest("structured pruning supports gated MLPs (gate_proj, up_proj, down_proj)",
                                 param="model", code="prune_unsupported_model")
    return layers


def calibration_batches(tokenizer: Any, texts: Iterable[str], *, max_tokens: int, seq_len: int) -> list[list[int]]:
    """Token sequences of at most `seq_len` ids, `max_tokens` in all."""
    out: list[list[int]] = []
    total = 0
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])[:seq_len]
        if len(ids) < 2:
            continue
        out.append(ids)
        total += len(ids)
        if total >= max_tokens:
            break
    if not out:
        raise InvalidRequest("the calibration data has no text to measure the blocks on", param="calibration",
                             code="prune_no_calibration")
    return out


def measure(model: Any, batches: Sequence[list[int]], *, check: Callable[[], None] = lambda: None
            ) -> tuple[list[float], list[Any], int]:
    """Per block: mean angular distance between its input and output; per block: mean |activation| of each MLP
    channel. Also the number of calibration tokens."""
    import torch

    layers = _decoder_layers(model)
    n = len(layers)
    distance = [0.0] * n
    channel: list[Any] = [None] * n
    tokens = 0
    hooks = []

    def block_hook(i: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).clamp(-1, 1)
            distance[i] += float((torch.arccos(cos) / math.pi).sum())
        return hook

    def mlp_hook(i: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            act = args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).sum(0)
            channel[i] = act if channel[i] is None else channel[i] + act
        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(block_hook(i), with_kwargs=True))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(mlp_hook(i)))
    model.eval()
    try:
        with torch.no_grad():
            for ids in batches:
                check()
                model(torch.tensor([ids]), use_cache=False)
                tokens += len(ids)
    finally:
        for h in hooks:
            h.remove()
    return [d / max(1, tokens) for d in distance], [c / max(1, tokens) for c in channel], tokens


def remove_layers(model: Any, drop: Sequence[int]) -> None:
    import torch

    layers = _decoder_layers(model)
    keep = [i for i in range(len(layers)) if i not in set(drop)]
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(model.model.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new  # the KV cache is indexed by it
    model.config.num_hidden_layers = len(keep)
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(layers):
        model.config.layer_types = [layer_types[i] for i in keep]


def shrink_mlp(model: Any, importance: Sequence[Any], new_size: int) -> None:
    import torch

    for layer, score in zip(_decoder_layers(model), importance, strict=True):
        keep = torch.sort(torch.topk(score, new_size).indices).values
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = torch.nn.Linear(old.in_features, new_size, bias=old.bias is not None, dtype=old.weight.dtype)
            new.weight.data = old.weight.data[keep].clone()
            if old.bias is not None:
                new.bias.data = old.bias.data[keep].clone()
            setattr(mlp, name, new)
        old = mlp.down_proj
        down = torch.nn.Linear(new_size, old.out_features, bias=old.bias is not None, dtype=old.weight.dtype)
        down.weight.data = old.weight.data[:, keep].clone()
        if old.bias is not None:
            down.bias.data = old.bias.data.clone()
        mlp.down_proj = down
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = new_size
    model.config.intermediate_size = new_size


def prune(source: Path, out: Path, texts: Iterable[str], *, depth: str, width: str, calibration: str,
          max_tokens: int = 32768, seq_len: int = 512, check: Callable[[], None] = lambda: None,
          threads: int | None = None) -> PruningPlan:
    """Measure `source` on `texts`, remove `depth` blocks and `width` of the MLP channels, save to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    layers = _decoder_layers(model)
    n_layers, inter = len(layers), int(model.config.intermediate_size)
    n_drop = parse_amount(depth, n_layers, "depth")
    n_channels = parse_amount(width, inter, "width")
    if not n_drop and not n_channels:
        raise InvalidRequest("nothing to prune: give --depth and/or --width", param="depth", code="prune_nothing")
    if n_drop >= n_layers:
        raise InvalidRequest(f"depth {depth} would remove all {n_layers} blocks", param="depth")
    if n_channels >= inter:
        raise InvalidRequest(f"width {width} would remove all {inter} MLP channels", param="width")
    batches = calibration_batches(tokenizer, texts, max_tokens=max_tokens, seq_len=seq_len)
    distance, importance, tokens = measure(model, batches, check=check)
    plan = PruningPlan(source_layers=n_layers, source_intermediate=inter, layer_scores=[round(d, 6) for d in distance],
                       intermediate_size=inter - n_channels, width_fraction=round(n_channels / inter, 6),
                       calibration=calibration, calibration_tokens=tokens)
    if n_drop:
        # Never the first or last block: they map embeddings in and out and always score high anyway.
        candidates = sorted(range(1, n_layers - 1) if n_layers > 2 else range(n_layers), key=lambda i: distance[i])
        plan.removed_layers = sorted(candidates[:n_drop])
        if len(plan.removed_layers) < n_drop:
            raise InvalidRequest(f"depth {depth} leaves too few blocks", param="depth")
    if n_channels:  # channels first: the importance list is per source block
        shrink_mlp(model, importance, inter - n_channels)
    if plan.removed_layers:
        remove_layers(model, plan.removed_layers)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for extra in ("generation_config.json",):
        if (source / extra).is_file() and not (out / extra).is_file():
            (out / extra).write_bytes((source / extra).read_bytes())
    return plan


def chat_texts(tokenizer: Any, records: Iterable[Any]) -> list[str]:
    """Records rendered as the model sees them (its chat template); records that do not parse are skipped."""
    from garrison.training import data as td

    texts = []
    for record in records:
        try:
            texts.append(td.assistant_turns(tokenizer, td.normalize_record(record))[0])
        except ValueError:
            continue
    return texts
