"""GPU discovery, the memory estimate, and refusals that say what would fit (imaginary GPUs on a CPU machine)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from garrison.errors import InvalidRequest
from garrison.training.finetune import FinetuneConfig
from garrison.training.gpus import (
    GIB,
    GpuInfo,
    ModelShape,
    discover_gpus,
    estimate_memory,
    lora_params,
    memory_breakdown,
    model_shape,
    plan_devices,
)

# Llama-2-7B's shape, so the figures can be compared with what people measure on real cards.
LLAMA_7B = ModelShape(n_params=6_738_415_616, hidden=4096, layers=32, intermediate=11008, vocab=32000, heads=32,
                      kv_heads=32, head_dim=128)
LLAMA_70B = ModelShape(n_params=68_976_648_192, hidden=8192, layers=80, intermediate=28672, vocab=32000, heads=64,
                       kv_heads=8, head_dim=128)


def gpu(index: int = 0, gib: float = 80, capability: tuple[int, int] = (9, 0), name: str = "H100") -> GpuInfo:
    return GpuInfo(index, name, int(gib * GIB), int(gib * GIB), capability)


def cfg(**over: object) -> FinetuneConfig:
    settings: dict[str, object] = dict(base_model="/nonexistent", batch_size=8, max_seq_len=2048)
    settings.update(over)
    return FinetuneConfig(**settings)  # type: ignore[arg-type]


def test_discovery_without_cuda_is_empty() -> None:
    import torch

    if torch.cuda.is_available():
        found = discover_gpus()
        assert found and all(g.total_memory > 0 and g.capability[0] >= 3 for g in found)
    else:
        assert discover_gpus() == []


def test_model_shape_counts_the_real_parameters(tiny_llama_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shape = model_shape(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert shape.n_params == sum(p.numel() for p in model.parameters())
    assert (shape.hidden, shape.layers, shape.vocab) == (64, 2, 512)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_params(shape, 8, "all-linear") == trainable
    assert lora_params(shape, 8, ["q_proj", "v_proj"]) == 2 * 8 * (64 + 64 + 64 + 32)


def test_estimate_is_ordered_and_in_the_right_range() -> None:
    lora = estimate_memory(cfg(), shape=LLAMA_7B)
    assert estimate_memory(cfg(method="full"), shape=LLAMA_7B) > lora
    assert estimate_memory(cfg(gradient_checkpointing=True), shape=LLAMA_7B) < lora
    assert estimate_memory(cfg(batch_size=1), shape=LLAMA_7B) < lora
    assert estimate_memory(cfg(max_seq_len=512), shape=LLAMA_7B) < lora
    assert estimate_memory(cfg(), n_params=1_000_000_000, shape=LLAMA_7B) < lora
    parts = memory_breakdown(cfg(method="full"), LLAMA_7B, precision="bf16", on_gpu=True)
    # full fine-tuning with AdamW: 16 bytes per parameter before activations (~100 GiB for 7B)
    assert parts["weights"] + parts["gradients"] + parts["optimizer_states"] == 16 * LLAMA_7B.n_params
    # LoRA 7B, batch 1 x 2048, checkpointing: a ~16-20 GiB job as commonly measured
    small = estimate_memory(cfg(batch_size=1, gradient_checkpointing=True), shape=LLAMA_7B)
    assert 14 * GIB < small < 24 * GIB


def test_no_gpu_plans_the_cpu_in_fp32(tiny_llama_dir: Path) -> None:
    plan = plan_devices(FinetuneConfig(base_model=str(tiny_llama_dir)), gpus=[])
    assert (plan.kind, plan.precision, plan.world_size, plan.devices) == ("cpu", "fp32", 1, [])
    with pytest.raises(InvalidRequest) as caught:
        plan_devices(FinetuneConfig(base_model=str(tiny_llama_dir), devices=[0]), gpus=[])
    assert caught.value.code == "gpu_unavailable"
    with pytest.raises(InvalidRequest) as caught:
        plan_devices(cfg(method="full"), gpus=[], shape=LLAMA_7B, ram_bytes=24 * GIB)
    assert caught.value.code == "insufficient_memory"


def test_plan_picks_gpus_and_precision() -> None:
    plan = plan_devices(cfg(batch_size=4, max_seq_len=1024, gradient_checkpointing=True),
                        gpus=[gpu(0), gpu(1)], shape=LLAMA_7B)
    assert (plan.kind, plan.devices, plan.precision, plan.world_size) == ("cuda", [0, 1], "bf16", 2)
    assert plan.estimate_bytes <= plan.available_bytes
    turing = plan_devices(cfg(batch_size=1, max_seq_len=512, gradient_checkpointing=True),
                          gpus=[gpu(0, 24, (7, 5), "T4"), gpu(1, 24, (7, 5))], shape=LLAMA_7B)
    assert turing.precision == "fp16" and turing.devices == [0], "a batch of 1 cannot be split over two ranks"
    chosen = plan_devices(cfg(devices=[1], batch_size=2, max_seq_len=512), gpus=[gpu(0), gpu(1)], shape=LLAMA_7B)
    assert chosen.devices == [1]
    with pytest.raises(InvalidRequest) as caught:
        plan_devices(cfg(devices=[3]), gpus=[gpu(0)], shape=LLAMA_7B)
    assert caught.value.code == "gpu_unavailable"


def test_impossible_jobs_are_refused_with_what_would_fit() -> None:
    # full fine-tuning of a 7B model on one 24 GiB card: only LoRA can fit
    with pytest.raises(InvalidRequest) as caught:
        plan_devices(cfg(method="full", batch_size=8, max_seq_len=2048), gpus=[gpu(0, 24, (8, 9), "L4")],
                     shape=LLAMA_7B)
    err = caught.value
    assert err.code == "insufficient_gpu_memory" and err.http_status == 400
    assert "24.0 GiB free" in err.message and "method=lora" in err.message
    assert err.details["estimate_bytes"] > err.details["available_bytes"]

    # LoRA with a big batch and no checkpointing on 80 GiB: smaller micro-batches or checkpointing fit
    with pytest.raises(InvalidRequest) as caught:
        plan_devices(cfg(batch_size=16, max_seq_len=4096), gpus=[gpu()], shape=LLAMA_7B)
    hints = caught.value.details["suggestions"]
    assert any(h.startswith("micro_batch_size=") for h in hints)
    assert any("gradient_checkpointing" in h for h in hints)
    micro = int(next(h for h in hints if h.startswith("micro_batch_size=")).split("=")[1].split()[0])
    plan = plan_devices(cfg(batch_size=16, max_seq_len=4096, micro_batch_size=micro), gpus=[gpu()], shape=LLAMA_7B)
    assert plan.micro_batch_size == micro, "the suggested setting is accepted"

    # a 70B model on a 16 GiB card: nothing fits, and more such GPUs would not help
    with pytest.raises(InvalidRequest) as caught:
        plan_devices(cfg(), gpus=[gpu(0, 16), gpu(1, 16)], shape=LLAMA_70B)
    assert "Nothing fits" in caught.value.message and "more GPUs do not help" in caught.value.message


def test_every_knob_the_advice_names_is_a_job_parameter_and_a_cli_option() -> None:
    """The refusal's advice is only useful if the operator can follow it from the CLI and the API."""
    import re

    from garrison.cli import cli
    from garrison.jobs.kinds import job_kind

    hints: list[str] = []
    for config, shape, gpus in ((cfg(batch_size=16, max_seq_len=4096), LLAMA_7B, [gpu()]),
                                (cfg(method="full", batch_size=8), LLAMA_7B, [gpu(0, 24, (8, 9), "L4")]),
                                (cfg(batch_size=4, max_seq_len=65536), LLAMA_7B, [gpu(0, 40)])):
        with pytest.raises(InvalidRequest) as caught:
            plan_devices(config, gpus=gpus, shape=shape)
        hints += caught.value.details["suggestions"]
    knobs = {name for hint in hints for name in re.findall(r"([a-z_]+)=", hint)}
    knobs |= {name for hint in hints for name in ("micro_batch_size", "gradient_checkpointing") if name in hint}
    assert {"micro_batch_size", "gradient_checkpointing", "method", "max_seq_len"} <= knobs, hints
    params = {p.name for p in job_kind("finetune").params}
    command = cli.commands["finetune"]
    options = {opt for p in command.params for opt in getattr(p, "opts", [])}
    for knob in knobs:
        assert knob in params, f"{knob}: not settable through the API (extra) / job parameters"
        assert f"--{knob.replace('_', '-')}" in options, f"{knob}: no CLI flag"


def test_a_262k_vocabulary_model_fine_tunes_on_the_cpu_with_default_settings(
        tiny_real_dir: Callable[[str], Path], tmp_path: Path) -> None:
    """The estimate comes from the real examples (30 tokens), not 2,048-token rows times 262k logits (7 GiB):
    within 1.5x of the training process's measured peak (its peak RSS, the whole process: torch and all)."""
    import json
    import subprocess
    import sys

    model = tiny_real_dir("gemma3")
    shape = model_shape(model)
    assert shape.vocab >= 262_000
    old = estimate_memory(FinetuneConfig.from_openai(str(model), None, 8), shape=shape, precision="fp32",
                          on_gpu=False)
    assert old > 6 * GIB  # what the worst-case estimate would have demanded
    script = f"""
import json, tempfile
from collections.abc import Callable
from pathlib import Path
from garrison.training.finetune import FinetuneConfig, train
rows = [{{"messages": [{{"role": "user", "content": f"What is item {{i}}?"}},
                       {{"role": "assistant", "content": f"Item {{i}} is a small parcel for the north gate."}}]}}
        for i in range(8)]
config = FinetuneConfig.from_openai({str(model)!r}, None, len(rows), max_steps=10)
result = train(config, lambda: rows, None, workdir=Path({str(tmp_path)!r}), checkpoint_key=b"k" * 32,
               on_progress=lambda e: None, should_stop=lambda: False)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of a large pytest process would
# report its parent's size; VmHWM belongs to this process's own memory since exec.
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"estimate": result.device["estimate_bytes"], "data": result.device["data"],
                  "peak": hwm * 1024, "state": result.state}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["state"] == "succeeded" and out["data"]["width"] < 64
    assert out["estimate"] / 1.5 <= out["peak"] <= out["estimate"] * 1.5, out
