"""Importance matrices for quantization, computed on the appliance from calibration text.

llama.cpp weighs quantization error per input column of every matrix by how large the
activations entering it are (the mean of x² over calibration tokens). llama.cpp computes
that with its `llama-imatrix` tool, which is not part of llama-cpp-python; we collect the
same statistic from the float32 Hugging Face model with forward hooks on every linear
layer and write it in llama-imatrix's GGUF layout (`NAME.in_sum2`, `NAME.counts`), with
tensor names mapped by llama.cpp's own gguf-py tables, so `llama_model_quantize` reads it
as its own. Calibration text is built in, or an ingested dataset read in memory only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from garrison.converters.hf_to_gguf import ConversionError
from garrison.converters.quantize import gguf_py
from garrison.corpus import machine_corpus

# Architectures whose tensor names gguf-py maps (one row per supported family).
ARCHITECTURES: dict[str, str] = {"LlamaForCausalLM": "LLAMA", "MistralForCausalLM": "LLAMA",
                                 "Qwen2ForCausalLM": "QWEN2", "GPT2LMHeadModel": "GPT2"}


def builtin_calibration(max_chars: int = 200_000) -> list[str]:
    """Calibration text every machine has (the built-in corpus), in paragraphs."""
    return [p for p in machine_corpus(max_chars).split("\n\n") if p.strip()]


def record_texts(records: Iterable[dict[str, Any]]) -> Iterable[str]:
    """The text of ingested records (chat messages, prompt/completion, text), never written anywhere."""
    for record in records:
        if isinstance(record.get("messages"), list):
            yield "\n".join(str(m.get("content", "")) for m in record["messages"] if isinstance(m, dict))
        else:
            yield "\n".join(str(v) for v in record.values() if isinstance(v, str))


def compute_imatrix(model_dir: Path, texts: Iterable[str], out: Path, *, chunk_size: int = 256,
                    max_chunks: int = 32, label: str = "builtin") -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    arch_name = next((ARCHITECTURES[a] for a in config.get("architectures") or [] if a in ARCHITECTURES), None)
    if arch_name is None:
        raise ConversionError(f"importance matrices are supported for {', '.join(ARCHITECTURES)}",
                              code="imatrix_unsupported_architecture")
    gguf = gguf_py()
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch_name), int(config["num_hidden_layers"]))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= chunk_size * max_chunks:
            break
    chunks = [ids[i:i + chunk_size] for i in range(0, len(ids) - chunk_size + 1, chunk_size)][:max_chunks]
    if not chunks:
        raise ConversionError(f"not enough calibration text for one chunk of {chunk_size} tokens",
                              code="imatrix_no_calibration")
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    hooks = []
    for module_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        mapped = names.get_name(module_name)
        if mapped is None:
            continue
        key = f"{mapped}.weight"

        def hook(_m: Any, inputs: tuple[Any, ...], _out: Any, key: str = key) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + (x * x).sum(dim=0)
            counts[key] = counts.get(key, 0) + x.shape[0]

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for chunk in chunks:
                model(torch.tensor([chunk]))
    finally:
        for h in hooks:
            h.remove()
    import numpy as np

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    writer = gguf.GGUFWriter(str(partial), arch="imatrix")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", [label])
    writer.add_uint32("imatrix.chunk_count", len(chunks))
    writer.add_uint32("imatrix.chunk_size", chunk_size)
    for key in sorted(sums):
        writer.add_tensor(f"{key}.in_sum2", sums[key].float().numpy().astype(np.float32))
        writer.add_tensor(f"{key}.counts", np.array([counts[key]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(out)
    return out
