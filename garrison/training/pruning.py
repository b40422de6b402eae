"""Structured pruning of a decoder-only Hugging Face model, ranked on calibration text.

Four axes, each ranked on the same calibration pass and each removed as a whole unit, so the
result is a dense model with a smaller config:

- depth (ShortGPT, Men et al. 2024): a decoder block's influence is the angular distance
  between the hidden state entering it and the one leaving it (arccos of their cosine
  similarity, over pi, averaged over calibration tokens); the blocks that change their input
  least are removed whole.
- width, MLP channels (Minitron, Muralidharan et al. 2024): a channel's importance is the mean
  magnitude of its activation (the input of `down_proj`); the least important rows of
  `gate_proj`/`up_proj` and columns of `down_proj` go, the same number in every block (a
  config has one `intermediate_size`).
- attention heads (Minitron): a query head's importance is the mean L2 norm of its output
  (its slice of the input of `o_proj`). With grouped-query attention every key/value head must
  keep the same number of query heads, so heads go either the same number from each group, or
  as whole groups with their key/value head.
- embedding channels, the hidden size (Minitron): a channel's importance is the mean magnitude
  of the normalisation layers' outputs, summed over every block; the channel is sliced out of
  the embeddings, the output layer, every norm and every projection that reads or writes the
  residual stream. This is the axis that shrinks the output layer, which dominates decoding in
  small models.

The surgery is done on the state dict from data-driven tables (which tensor has which axis
along which dimension), and the result is loaded strictly into a model built from the smaller
config, so a tensor the tables got wrong fails loudly instead of saving a broken model. The
result is an ordinary Hugging Face folder with the source's tokenizer: export, parity,
serving and fine-tuning take it unchanged. Runs in worker processes.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from garrison.errors import InvalidRequest

_SPEC = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")

# Inside a decoder block: which dimension of a tensor runs along which prunable axis.
# "q": query-head rows (head_dim each), "kv": key/value-head rows, "mlp": MLP channels, "hidden": embedding channels.
BLOCK_AXES: dict[str, tuple[tuple[int, str], ...]] = {
    "self_attn.q_proj.weight": ((0, "q"), (1, "hidden")),
    "self_attn.q_proj.bias": ((0, "q"),),
    "self_attn.k_proj.weight": ((0, "kv"), (1, "hidden")),
    "self_attn.k_proj.bias": ((0, "kv"),),
    "self_attn.v_proj.weight": ((0, "kv"), (1, "hidden")),
    "self_attn.v_proj.bias": ((0, "kv"),),
    "self_attn.o_proj.weight": ((0, "hidden"), (1, "q")),
    "self_attn.o_proj.bias": ((0, "hidden"),),
    "mlp.gate_proj.weight": ((0, "mlp"), (1, "hidden")),
    "mlp.gate_proj.bias": ((0, "mlp"),),
    "mlp.up_proj.weight": ((0, "mlp"), (1, "hidden")),
    "mlp.up_proj.bias": ((0, "mlp"),),
    "mlp.down_proj.weight": ((0, "hidden"), (1, "mlp")),
    "mlp.down_proj.bias": ((0, "hidden"),),
}
# A block's own norms (input_layernorm, post_attention_layernorm, Gemma's pre/post_feedforward_layernorm...):
# one-dimensional, hidden-sized, direct children of the block. Per-head norms (Qwen3's q_norm) are not.
BLOCK_NORM = re.compile(r"^[A-Za-z0-9_]*norm\.(weight|bias)$")
# Outside the blocks.
MODEL_AXES: dict[str, tuple[tuple[int, str], ...]] = {
    "model.embed_tokens.weight": ((1, "hidden"),),
    "lm_head.weight": ((1, "hidden"),),
    "model.norm.weight": ((0, "hidden"),),
    "model.norm.bias": ((0, "hidden"),),
}
# Norms whose scale is stored as an offset from one (out = x / rms * (1 + weight)); any other norm multiplies by weight.
OFFSET_NORMS = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm", "Gemma3nRMSNorm"})
_BLOCK_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
REQUIRED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")


def parse_amount(spec: str, total: int, param: str) -> int:
    """"N" (blocks, channels or heads) or "P%" of `total`, rounded to the nearest whole, as a count to remove."""
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


def head_removal(n_heads: int, n_kv: int, n_remove: int) -> tuple[str, int]:
    """How `n_remove` query heads can go so that every key/value head keeps as many query heads as the others:
    ("per_group", k) removes k query heads from each group; ("whole_groups", k) removes k groups entirely."""
    group = n_heads // n_kv
    if n_remove % n_kv == 0 and 0 < n_remove // n_kv < group:
        return "per_group", n_remove // n_kv
    if n_remove % group == 0 and 0 < n_remove // group < n_kv:
        return "whole_groups", n_remove // group
    valid = sorted({k * n_kv for k in range(1, group)} | {k * group for k in range(1, n_kv)})
    can = f"removable counts: {', '.join(map(str, valid))}" if valid else "no head can be removed"
    raise InvalidRequest(f"heads: {n_remove} of {n_heads} query heads cannot be removed evenly from {n_kv} key/value "
                         f"heads of {group} query heads each; {can}", param="heads", code="prune_heads_uneven")


@dataclass
class PruningPlan:
    """What was removed and why: recorded in the pruned model's lineage."""

    source_layers: int
    source_intermediate: int
    source_hidden: int = 0
    source_heads: int = 0
    source_kv_heads: int = 0
    head_dim: int = 0
    removed_layers: list[int] = field(default_factory=list)
    layer_scores: list[float] = field(default_factory=list)  # angular distance of every source block
    intermediate_size: int = 0
    width_fraction: float = 0.0
    hidden_size: int = 0
    hidden_fraction: float = 0.0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_strategy: str = ""  # "per_group" or "whole_groups" when heads were removed
    removed_heads: list[list[int]] = field(default_factory=list)  # per source block, query heads removed
    calibration: str = "builtin"
    calibration_tokens: int = 0
    notes: list[str] = field(default_factory=list)  # what the operator should know about the result's exports
    method: dict[str, str] = field(default_factory=lambda: {"depth": "shortgpt-angular-distance",
                                                              "width": "minitron-mlp-activation",
                                                              "heads": "minitron-head-output-norm",
                                                              "hidden": "minitron-norm-activation"})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for the job's events: what the pruned model kept of each axis."""
        return (f"{self.source_layers - len(self.removed_layers)}/{self.source_layers} blocks, MLP "
                f"{self.intermediate_size}/{self.source_intermediate}, hidden {self.hidden_size}/{self.source_hidden}, "
                f"heads {self.num_attention_heads}/{self.source_heads} (KV {self.num_key_value_heads}/"
                f"{self.source_kv_heads})")


@dataclass
class Measurements:
    """Calibration statistics of every source block, each averaged over the calibration tokens."""

    distance: list[float]  # per block: angular distance between its input and output
    mlp: list[Any]  # per block: mean |activation| of each MLP channel
    heads: list[Any]  # per block: mean L2 norm of each query head's output
    hidden: Any  # mean |norm output| of each embedding channel, summed over the norms (None: no norm found)
    tokens: int


def _decoder_layers(model: Any) -> Any:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise InvalidRequest(f"{type(model).__name__} has no model.layers: structured pruning supports "
                             "Llama-style decoders", param="model", code="prune_unsupported_model")
    for layer in layers:
        if not all(_submodule(layer, path) is not None for path in REQUIRED):
            raise InvalidRequest("structured pruning supports Llama-style blocks (self_attn.q/k/v/o_proj, gated "
                                 "mlp.gate/up/down_proj)", param="model", code="prune_unsupported_model")
    return layers


def _submodule(module: Any, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part, None)
    return module


def _block_norms(layer: Any, hidden: int) -> list[Any]:
    return [m for name, m in layer.named_children()
            if name.endswith("norm") and getattr(getattr(m, "weight", None), "shape", None) == (hidden,)]


def rescale_norms(model: Any, kept: int) -> None:
    """Scale every hidden-sized norm by sqrt(hidden / kept) before embedding channels go.

    An RMS norm divides by the root mean square over all channels; with fewer channels the same
    activations give a larger mean, which would shrink every norm's output. The channels removed are
    the ones with the least activation, so this keeps the norms' outputs where they were (exactly
    where the removed channels were silent).
    """
    import torch

    hidden = int(model.config.hidden_size)
    norms = [n for layer in _decoder_layers(model) for n in _block_norms(layer, hidden)]
    final = getattr(model.model, "norm", None)
    norms += [final] if final is not None else []
    factor = math.sqrt(hidden / kept)
    with torch.no_grad():
        for norm in norms:
            offset = 1.0 if type(norm).__name__ in OFFSET_NORMS else 0.0
            norm.weight.add_(offset).mul_(factor).sub_(offset)


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
            ) -> Measurements:
    """One pass over the calibration batches with hooks that collect every axis's importance."""
    import torch

    layers = _decoder_layers(model)
    shape = Shape.of(model.config.to_dict())
    n, hidden, head_dim = len(layers), shape.hidden, shape.head_dim
    distance = [0.0] * n
    sums: dict[tuple[str, int], Any] = {}
    hooks = []

    def add(key: tuple[str, int], value: Any) -> None:
        sums[key] = value if key not in sums else sums[key] + value

    def block_hook(i: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).clamp(-1, 1)
            distance[i] += float((torch.arccos(cos) / math.pi).sum())
        return hook

    def mlp_hook(i: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            add(("mlp", i), args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).sum(0))
        return hook

    def head_hook(i: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float()
            add(("heads", i), x.reshape(-1, x.shape[-1] // head_dim, head_dim).norm(dim=-1).sum(0))
        return hook

    def norm_hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
        add(("hidden", 0), output.detach().float().abs().reshape(-1, hidden).sum(0))

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(block_hook(i), with_kwargs=True))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(mlp_hook(i)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(i)))
        hooks.extend(norm.register_forward_hook(norm_hook) for norm in _block_norms(layer, hidden))
    final_norm = getattr(model.model, "norm", None)
    if final_norm is not None:
        hooks.append(final_norm.register_forward_hook(norm_hook))
    tokens = 0
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
    per = max(1, tokens)
    return Measurements(distance=[d / per for d in distance], mlp=[sums[("mlp", i)] / per for i in range(n)],
                        heads=[sums[("heads", i)] / per for i in range(n)],
                        hidden=sums[("hidden", 0)] / per if ("hidden", 0) in sums else None,
                        tokens=tokens)


def _keep_top(score: Any, keep: int) -> Any:
    import torch

    return torch.sort(torch.topk(score, keep).indices).values


def _keep_heads(score: Any, n_kv: int, strategy: str, k: int) -> tuple[Any, Any]:
    """Query heads and key/value heads one block keeps (sorted indices)."""
    import torch

    group = score.shape[0] // n_kv
    per_group = score.reshape(n_kv, group)
    if strategy == "per_group":
        kept = torch.sort(torch.topk(per_group, group - k, dim=1).indices, dim=1).values
        q = (kept + torch.arange(n_kv).unsqueeze(1) * group).flatten()
        return q, torch.arange(n_kv)
    kv = _keep_top(per_group.sum(1), n_kv - k)
    q = (kv.unsqueeze(1) * group + torch.arange(group).unsqueeze(0)).flatten()
    return q, kv


def _rows(heads: Any, head_dim: int) -> Any:
    import torch

    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim).unsqueeze(0)).flatten()


def _slice(tensor: Any, axes: Sequence[tuple[int, str]], keep: dict[str, Any]) -> Any:
    for dim, axis in axes:
        if keep.get(axis) is not None:
            tensor = tensor.index_select(dim, keep[axis])
    return tensor


def sliced_state(state: dict[str, Any], keep_blocks: Sequence[int], block_keep: Sequence[dict[str, Any]],
                 model_keep: dict[str, Any]) -> dict[str, Any]:
    """The state dict of the pruned model: blocks renumbered, every tensor sliced along its pruned axes."""
    renumber = {old: new for new, old in enumerate(keep_blocks)}
    out: dict[str, Any] = {}
    for key, tensor in state.items():
        match = _BLOCK_KEY.match(key)
        if match is None:
            out[key] = _slice(tensor, MODEL_AXES.get(key, ()), model_keep).clone()
            continue
        block, rest = int(match.group(1)), match.group(2)
        if block not in renumber:
            continue
        axes = BLOCK_AXES.get(rest) or (((0, "hidden"),) if BLOCK_NORM.match(rest) else ())
        out[f"model.layers.{renumber[block]}.{rest}"] = _slice(tensor, axes, block_keep[block]).clone()
    return out


@dataclass(frozen=True)
class Shape:
    """The prunable sizes of a model, read from its config (a dict, so the job's check runs without torch)."""

    layers: int
    intermediate: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: dict[str, Any]) -> Shape:
        try:
            heads = int(config["num_attention_heads"])
            return cls(layers=int(config["num_hidden_layers"]), intermediate=int(config["intermediate_size"]),
                       hidden=int(config["hidden_size"]), heads=heads,
                       kv_heads=int(config.get("num_key_value_heads") or heads),
                       head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRequest(f"the model's config has no {exc}: structured pruning supports Llama-style "
                                 "decoders", param="model", code="prune_unsupported_model") from exc


def amounts(shape: Shape, *, depth: str = "", width: str = "", heads: str = "", hidden: str = "") -> dict[str, int]:
    """How many blocks, MLP channels, query heads and embedding channels to remove; refused when nothing, all,
    or heads that cannot leave the key/value groups even."""
    totals = {"depth": (shape.layers, "blocks"), "width": (shape.intermediate, "MLP channels"),
              "heads": (shape.heads, "query heads"), "hidden": (shape.hidden, "embedding channels")}
    specs = {"depth": depth, "width": width, "heads": heads, "hidden": hidden}
    counts = {axis: parse_amount(specs[axis], total, axis) for axis, (total, _what) in totals.items()}
    if not any(counts.values()):
        raise InvalidRequest("nothing to prune: give --depth, --width, --heads and/or --hidden", param="depth",
                             code="prune_nothing")
    for axis, (total, what) in totals.items():
        if counts[axis] >= total:
            raise InvalidRequest(f"{axis} would remove all {total} {what}", param=axis)
    if counts["heads"]:
        head_removal(shape.heads, shape.kv_heads, counts["heads"])
    return counts


def prune(source: Path, out: Path, texts: Iterable[str], *, depth: str = "", width: str = "", heads: str = "",
          hidden: str = "", calibration: str, max_tokens: int = 32768, seq_len: int = 512,
          check: Callable[[], None] = lambda: None, threads: int | None = None) -> PruningPlan:
    """Measure `source` on `texts`, remove what `depth`, `width`, `heads` and `hidden` ask, save to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    config = model.config
    _decoder_layers(model)
    shape = Shape.of(config.to_dict())
    counts = amounts(shape, depth=depth, width=width, heads=heads, hidden=hidden)
    n_layers, inter, n_hidden = shape.layers, shape.intermediate, shape.hidden
    n_heads, n_kv, head_dim = shape.heads, shape.kv_heads, shape.head_dim
    strategy, per = head_removal(n_heads, n_kv, counts["heads"]) if counts["heads"] else ("", 0)
    batches = calibration_batches(tokenizer, texts, max_tokens=max_tokens, seq_len=seq_len)
    found = measure(model, batches, check=check)
    plan = PruningPlan(source_layers=n_layers, source_intermediate=inter, source_hidden=n_hidden,
                       source_heads=n_heads, source_kv_heads=n_kv, head_dim=head_dim,
                       layer_scores=[round(d, 6) for d in found.distance], intermediate_size=inter - counts["width"],
                       width_fraction=round(counts["width"] / inter, 6), hidden_size=n_hidden - counts["hidden"],
                       hidden_fraction=round(counts["hidden"] / n_hidden, 6),
                       num_attention_heads=n_heads - counts["heads"],
                       num_key_value_heads=n_kv - (per if strategy == "whole_groups" else 0),
                       head_strategy=strategy, calibration=calibration, calibration_tokens=found.tokens)
    if counts["depth"]:
        # Never the first or last block: they map embeddings in and out and always score high anyway.
        candidates = sorted(range(1, n_layers - 1) if n_layers > 2 else range(n_layers),
                            key=lambda i: found.distance[i])
        plan.removed_layers = sorted(candidates[:counts["depth"]])
        if len(plan.removed_layers) < counts["depth"]:
            raise InvalidRequest(f"depth {depth} leaves too few blocks", param="depth")
    if counts["hidden"] and found.hidden is None:
        raise InvalidRequest("this model has no hidden-sized norms to rank embedding channels on", param="hidden",
                             code="prune_unsupported_model")
    model_keep = {"hidden": _keep_top(found.hidden, plan.hidden_size) if counts["hidden"] else None}
    block_keep: list[dict[str, Any]] = []
    for i in range(n_layers):
        keep = dict(model_keep)
        if counts["width"]:
            keep["mlp"] = _keep_top(found.mlp[i], plan.intermediate_size)
        if strategy:
            q, kv = _keep_heads(found.heads[i], n_kv, strategy, per)
            keep["q"], keep["kv"] = _rows(q, head_dim), _rows(kv, head_dim)
            plan.removed_heads.append(sorted(set(range(n_heads)) - set(q.tolist())))
        block_keep.append(keep)
    kept_blocks = [i for i in range(n_layers) if i not in set(plan.removed_layers)]
    plan.notes = alignment_notes(plan)
    if counts["hidden"]:
        rescale_norms(model, plan.hidden_size)
    state = sliced_state(model.state_dict(), kept_blocks, block_keep, model_keep)
    pruned = AutoModelForCausalLM.from_config(_pruned_config(config, plan, kept_blocks), dtype=torch.float32)
    try:
        pruned.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # a tensor the axis tables do not know about: refuse rather than save a broken model
        raise InvalidRequest(f"{type(model).__name__} has weights structured pruning does not know how to slice: "
                             f"{str(exc).splitlines()[-1].strip()[:300]}", param="model",
                             code="prune_unsupported_model") from exc
    out.mkdir(parents=True, exist_ok=True)
    pruned.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for extra in ("generation_config.json",):
        if (source / extra).is_file() and not (out / extra).is_file():
            (out / extra).write_bytes((source / extra).read_bytes())
    return plan


# llama.cpp's K-quants (Q2_K...Q6_K, so Q4_K_M) pack rows in blocks of 256 values: a matrix whose rows are not
# a multiple of that falls back to an older type (larger, and measured slower in bench/decode_share.py).
K_QUANT_BLOCK = 256


def alignment_notes(plan: PruningPlan) -> list[str]:
    """A pruned size that breaks K-quant alignment the source had: said, since it costs speed after export."""
    notes = []
    for what, before, after in (("hidden size", plan.source_hidden, plan.hidden_size),
                                ("MLP size", plan.source_intermediate, plan.intermediate_size)):
        if before % K_QUANT_BLOCK == 0 and after % K_QUANT_BLOCK:
            lower, upper = after // K_QUANT_BLOCK * K_QUANT_BLOCK, (after // K_QUANT_BLOCK + 1) * K_QUANT_BLOCK
            notes.append(f"the {what} {after} is not a multiple of {K_QUANT_BLOCK} (the source's {before} was): "
                         f"K-quant exports such as Q4_K_M fall back to older types for the matrices that read it; "
                         f"{' or '.join(str(n) for n in (lower, upper) if 0 < n < before)} would keep them")
    return notes


def _pruned_config(config: Any, plan: PruningPlan, kept_blocks: Sequence[int]) -> Any:
    new = copy.deepcopy(config)
    new.num_hidden_layers = len(kept_blocks)
    new.intermediate_size = plan.intermediate_size
    new.hidden_size = plan.hidden_size
    new.num_attention_heads = plan.num_attention_heads
    new.num_key_value_heads = plan.num_key_value_heads
    new.head_dim = plan.head_dim  # explicit: it no longer follows from hidden_size / heads
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == plan.source_layers:
        new.layer_types = [layer_types[i] for i in kept_blocks]
    return new


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
