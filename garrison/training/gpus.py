"""GPU discovery, a job's memory estimate, and the device plan (or a refusal that says what would fit).

A fine-tuning job that runs out of GPU memory fails minutes in, after loading the model,
and leaves the operator guessing. So the worker estimates the peak before it loads
anything (from config.json and the safetensors headers, no weights read) and refuses a
job that will not fit with `InvalidRequest` code ``insufficient_gpu_memory``, naming
settings that would fit: gradient checkpointing, a smaller micro-batch (same results via
gradient accumulation), a shorter max_seq_len, or LoRA instead of full fine-tuning.

The estimate is deliberately rough and errs high: weights, trainable copies, gradients and
AdamW's two moments are exact byte counts; activations use a per-token, per-layer constant
for Llama-style decoders (sdpa, no stored attention matrix), the logits (autocast dtype,
fp32 copy for the loss and its gradient), and the packed block-diagonal mask; then a fixed
allowance for the CUDA context and 10% for allocator fragmentation.

The tokens one forward pass holds come from the real data when it is known (`DataShape`,
measured after tokenization and packing: the widest micro-batch the loop can build), else
from ``micro_batch_size x max_seq_len``: 30-token chat examples with a 262k vocabulary need
megabytes of logits, not the 27 GiB a full 2,048-token row would.

Nothing here imports torch at module level: the daemon may estimate at job creation.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from garrison.errors import InvalidRequest

if TYPE_CHECKING:
    from garrison.training.finetune import FinetuneConfig

GIB = 1 << 30
CUDA_CONTEXT_BYTES = 1 * GIB  # CUDA context, cuBLAS workspaces, kernels: measured 0.5-1 GiB per process
CPU_RUNTIME_BYTES = GIB // 2  # torch + transformers imported, tokenizer, Python heap
FRAGMENTATION = 1.10
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_memory: int
    free_memory: int
    capability: tuple[int, int]

    @property
    def bf16(self) -> bool:
        return self.capability >= (8, 0)


def discover_gpus() -> list[GpuInfo]:
    """Every CUDA device torch can see (CUDA_VISIBLE_DEVICES applies); [] without CUDA."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    found = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        try:
            free, total = torch.cuda.mem_get_info(i)
        except RuntimeError:
            free, total = props.total_memory, props.total_memory
        found.append(GpuInfo(i, props.name, int(total), int(free), (props.major, props.minor)))
    return found


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs about a model, read without loading its weights."""

    n_params: int
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each per-layer linear of a Llama-style block; LoRA sizes follow from these."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _safetensors_params(model_dir: Path) -> int:
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, meta in header.items():
            if name != "__metadata__":
                total += math.prod(meta["shape"])
    return total


def model_shape(model_dir: Path) -> ModelShape:
    """Shape from config.json; parameter count from the safetensors headers (exact) or from the shape."""
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    hidden = int(cfg["hidden_size"])
    heads = int(cfg.get("num_attention_heads", max(1, hidden // 128)))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    shape = ModelShape(
        n_params=0, hidden=hidden, layers=int(cfg["num_hidden_layers"]),
        intermediate=int(cfg.get("intermediate_size", 4 * hidden)), vocab=int(cfg["vocab_size"]), heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads", heads)), head_dim=head_dim)
    n = _safetensors_params(model_dir)
    if not n:
        per_layer = sum(a * b for a, b in shape.linear_shapes().values()) + 2 * hidden
        embeddings = shape.vocab * hidden * (1 if cfg.get("tie_word_embeddings") else 2)
        n = per_layer * shape.layers + embeddings + hidden
    return replace(shape, n_params=n)


def lora_params(shape: ModelShape, r: int, target_modules: str | list[str]) -> int:
    """Trainable parameters of a LoRA: r * (in + out) for each targeted linear of each layer."""
    linears = shape.linear_shapes()
    names = list(LLAMA_LINEAR) if target_modules == "all-linear" else list(target_modules)
    per_layer = sum(r * (linears[n][0] + linears[n][1]) for n in names if n in linears)
    if not per_layer:  # unknown module names: assume the attention projections
        per_layer = sum(r * (a + b) for n, (a, b) in linears.items() if n.endswith("_proj") and n[0] in "qkvo")
    return per_layer * shape.layers


@dataclass(frozen=True)
class DataShape:
    """What one forward pass holds on the real data: rows x width of its widest micro-batch."""

    rows: int
    width: int

    @property
    def tokens(self) -> int:
        return self.rows * self.width

    def as_dict(self) -> dict[str, int]:
        return {"rows": self.rows, "width": self.width, "tokens": self.tokens}


def _precision_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def memory_breakdown(config: FinetuneConfig, shape: ModelShape, *, precision: str, on_gpu: bool,
                     micro_batch: int | None = None, data: DataShape | None = None) -> dict[str, int]:
    """Peak bytes per device, by component. `micro_batch` is the examples one forward pass holds; `data`, when
    known, the rows and width of the widest pass on the real data (a smaller micro-batch scales it down)."""
    act = _precision_bytes(precision)
    mb = micro_batch or config.micro_batch_size or config.batch_size
    if data is not None:
        rows = min(data.rows, mb)
        width = min(data.width, config.max_seq_len)
    else:
        rows, width = mb, config.max_seq_len
    tokens = rows * width
    if config.method == "lora":
        weight_bytes = act if on_gpu else 4  # the frozen base in the autocast dtype on a GPU
        trainable = lora_params(shape, config.lora_r, config.lora_target_modules)
        out = {"weights": shape.n_params * weight_bytes, "trainable_weights": trainable * 4}
    else:
        trainable = shape.n_params
        out = {"weights": shape.n_params * 4, "trainable_weights": 0}  # fp32 master weights
    out["gradients"] = trainable * 4
    out["optimizer_states"] = trainable * 8  # AdamW: exp_avg + exp_avg_sq, fp32
    h, i = shape.hidden, shape.intermediate
    per_layer_full = tokens * (12 * h + 4 * i) * act
    if config.gradient_checkpointing:
        layers = tokens * h * act * shape.layers + per_layer_full  # saved inputs + one layer recomputed
    else:
        layers = per_layer_full * shape.layers
    out["activations"] = layers
    out["logits"] = tokens * shape.vocab * (act + 4 + 4)
    out["attention_mask"] = rows * width ** 2 if config.packing else 0
    out["runtime"] = CUDA_CONTEXT_BYTES if on_gpu else CPU_RUNTIME_BYTES
    out["total"] = int(sum(out.values()) * FRAGMENTATION)
    return out


def estimate_memory(config: FinetuneConfig, n_params: int | None = None, *, shape: ModelShape | None = None,
                    precision: str | None = None, on_gpu: bool = True, micro_batch: int | None = None,
                    data: DataShape | None = None) -> int:
    """Estimated peak bytes on one device (every DDP rank holds a full replica)."""
    shape = shape or model_shape(Path(config.base_model))
    if n_params is not None:
        shape = replace(shape, n_params=n_params)
    prec = precision or ("bf16" if on_gpu else "fp32")
    return memory_breakdown(config, shape, precision=prec, on_gpu=on_gpu, micro_batch=micro_batch,
                            data=data)["total"]


@dataclass
class DevicePlan:
    kind: str  # "cuda" | "cpu"
    devices: list[int]
    precision: str  # "bf16" | "fp16" | "fp32"
    micro_batch_size: int
    estimate_bytes: int
    available_bytes: int
    gpus: list[GpuInfo] = field(default_factory=list)
    data: DataShape | None = None  # the real data's widest pass, when the estimate used it

    @property
    def world_size(self) -> int:
        return max(1, len(self.devices))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"world_size": self.world_size}


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _suggestions(config: FinetuneConfig, shape: ModelShape, precision: str, available: int, on_gpu: bool,
                 micro: int, data: DataShape | None = None) -> list[str]:
    """Settings that would fit, each named as the CLI and the API's `extra` take it (micro_batch_size,
    gradient_checkpointing, max_seq_len, method)."""
    def fits(cfg: FinetuneConfig, mb: int) -> bool:
        return estimate_memory(cfg, shape=shape, precision=precision, on_gpu=on_gpu, micro_batch=mb,
                               data=data) <= available

    out = []
    if not config.gradient_checkpointing and fits(replace(config, gradient_checkpointing=True), micro):
        out.append("gradient_checkpointing=true (same results, about a third slower)")
    for cfg, label in ((config, ""), (replace(config, gradient_checkpointing=True), " with gradient_checkpointing")):
        best = next((mb for mb in range(micro - 1, 0, -1) if fits(cfg, mb)), None)
        if best is not None:
            out.append(f"micro_batch_size={best}{label} (batch_size {config.batch_size} kept through gradient "
                       "accumulation)")
            break
    if not out:  # not even one example of this length fits: shorter sequences are the remaining knob
        seq = config.max_seq_len // 2
        while seq >= 128 and not fits(replace(config, max_seq_len=seq, gradient_checkpointing=True), 1):
            seq //= 2
        if seq >= 128:
            out.append(f"max_seq_len={seq} with micro_batch_size=1 and gradient_checkpointing")
    if config.method == "full":
        lora = replace(config, method="lora")
        if fits(lora, micro) or fits(replace(lora, gradient_checkpointing=True), 1):
            out.append("method=lora (trains adapters only; the frozen base needs no gradients or optimizer state)")
    return out


def plan_devices(config: FinetuneConfig, gpus: list[GpuInfo] | None = None,
                 shape: ModelShape | None = None, ram_bytes: int | None = None,
                 data: DataShape | None = None) -> DevicePlan:
    """Choose devices and precision for `config`, or refuse with what would fit.

    GPUs come from `discover_gpus()` unless given (tests pass imaginary ones). CPU when the
    config asks for it or when there is no GPU. With several GPUs every rank holds a full
    replica (DDP), so the estimate is per device and more GPUs never make a job fit.
    """
    shape = shape or model_shape(Path(config.base_model))
    gpus = discover_gpus() if gpus is None else gpus
    micro = config.micro_batch_size or config.batch_size
    if config.devices == "cpu" or not gpus:
        if isinstance(config.devices, list) and config.devices:
            raise InvalidRequest(f"GPUs {config.devices} were asked for but none is visible to the worker",
                                 code="gpu_unavailable", param="devices")
        cpu_precision = "fp32" if config.precision == "auto" else config.precision
        estimate = estimate_memory(config, shape=shape, precision=cpu_precision, on_gpu=False, micro_batch=micro,
                                   data=data)
        if ram_bytes is None:
            import psutil

            ram_bytes = int(psutil.virtual_memory().total)
        if estimate > ram_bytes:
            hints = _suggestions(config, shape, cpu_precision, ram_bytes, False, micro, data)
            raise InvalidRequest(
                f"training on the CPU needs about {_gib(estimate)} of memory; this machine has {_gib(ram_bytes)}. "
                + ("Would fit: " + "; ".join(hints) + "." if hints else "No setting of this job fits."),
                code="insufficient_memory", details={"estimate_bytes": estimate, "available_bytes": ram_bytes,
                                                     "suggestions": hints})
        return DevicePlan("cpu", [], cpu_precision, micro, estimate, ram_bytes, data=data)
    by_index = {g.index: g for g in gpus}
    if isinstance(config.devices, list) and config.devices:
        missing = [d for d in config.devices if d not in by_index]
        if missing:
            raise InvalidRequest(f"no GPU {missing}; this machine has {sorted(by_index)}", code="gpu_unavailable",
                                 param="devices")
        chosen = [by_index[d] for d in config.devices]
    else:
        chosen = list(gpus)
    chosen = chosen[: max(1, config.batch_size)]  # every rank needs at least one example per step
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if all(g.bf16 for g in chosen) else "fp16"
    per_rank_micro = min(micro, math.ceil(config.batch_size / len(chosen)))
    available = min(g.free_memory for g in chosen)
    estimate = estimate_memory(config, shape=shape, precision=precision, on_gpu=True, micro_batch=per_rank_micro,
                               data=data)
    if estimate > available:
        hints = _suggestions(config, shape, precision, available, True, per_rank_micro, data)
        weights_only = estimate_memory(replace(config, method="lora", max_seq_len=1, gradient_checkpointing=True),
                                       shape=shape, precision=precision, on_gpu=True, micro_batch=1)
        tail = ("Would fit: " + "; ".join(hints) + "." if hints else
                f"Nothing fits: the model alone needs about {_gib(weights_only)} per GPU (each DDP rank holds a full "
                "copy, so more GPUs do not help); use a smaller base model or a GPU with more memory.")
        names = ", ".join(f"{g.index}:{g.name}" for g in chosen)
        raise InvalidRequest(
            f"this job needs about {_gib(estimate)} per GPU ({config.method}, batch {per_rank_micro} x "
            f"{config.max_seq_len} tokens, {precision}); GPU(s) {names} have {_gib(available)} free. {tail}",
            code="insufficient_gpu_memory",
            details={"estimate_bytes": estimate, "available_bytes": available, "suggestions": hints})
    return DevicePlan("cuda", [g.index for g in chosen], precision, micro, estimate, available, chosen, data)
