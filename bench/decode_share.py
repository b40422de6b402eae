"""Where a model's decode time goes: the same shape with one axis cut, side by side through llama.cpp.

Not a test. Issue 16 asks a width-pruned variant (-25% of MLP channels) to decode 1.2x faster than its
source. Whether any pruning axis can reach a speed-up depends on that axis's share of decode time, which
depends on the model's shape, not its training: so this builds random-weight copies of a model's config
(default: the quickstart `garrison-base`, built offline and cached like quickstart does) with one axis cut
at a time, through the same `transformers` -> GGUF F16 -> Q4_K_M path as exports, and decodes each with
llama.cpp exactly as `bench/compression.py` does: greedy tokens from a short prompt, each shape in a fresh
process per round, alternating, so machine noise hits all alike (median, min, max).

    .venv/bin/python bench/decode_share.py [--rounds 5] [--tokens 768] [--threads 1,2] [--model DIR]

Writes bench/out/decode_share.json and bench/out/decode_share.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from compression import OUT, decode_rounds


def shapes(config: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Each shape: the config changes that cut one axis of the source model."""
    inter, hidden, layers = config["intermediate_size"], config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads

    def cut(value: int, fraction: float, multiple: int = 1) -> int:
        return max(multiple, round(value * (1 - fraction) / multiple) * multiple)

    table: dict[str, dict[str, int]] = {
        "source": {},
        "MLP -25%": {"intermediate_size": cut(inter, 0.25, 32)},
        "MLP -50%": {"intermediate_size": cut(inter, 0.5, 32)},
        "MLP -92%": {"intermediate_size": cut(inter, 0.92, 32)},
        "hidden -25%": {"hidden_size": cut(hidden, 0.25, 32)},
        "one block fewer": {"num_hidden_layers": layers - 1},
    }
    if heads // kv > 1:
        table["query heads -50%, per KV group"] = {"num_attention_heads": heads // 2}
    if kv > 1:
        table["query heads -50%, whole KV groups"] = {"num_attention_heads": heads // 2, "num_key_value_heads": kv // 2}
    return table


def build(config: dict[str, Any], tokenizer_dir: Path, change: dict[str, int], out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from garrison.converters.hf_to_gguf import convert_hf_to_gguf
    from garrison.converters.quantize import quantize_gguf

    settings = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version", "dtype")}
    settings["head_dim"] = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    settings.update(change)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings))
    out.mkdir(parents=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    f16 = convert_hf_to_gguf(out, out / "f16.gguf", "f16")
    return quantize_gguf(f16, out / "q4_k_m.gguf", "q4_k_m")


def decode(paths: dict[str, Path], rounds: int, tokens: int, threads: int) -> dict[str, Any]:
    runs = decode_rounds(paths, rounds, tokens, threads)
    source = runs["source"]
    table: dict[str, Any] = {}
    for name, values in runs.items():
        median = statistics.median(values)
        table[name] = {"median": median, "min": min(values), "max": max(values), "runs": values,
                       "speedup": median / statistics.median(source),
                       "rounds_apart": name == "source" or min(values) > max(source) or max(values) < min(source)}
    return table


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Decode time by axis ({result['machine']['cpus']} CPUs, {result['tokens']} tokens, Q4_K_M)", "",
             f"Source shape: {json.dumps(result['source_shape'])}", ""]
    for threads, table in result["decode"].items():
        lines += [f"## {threads} thread(s)", "", "| shape | change | tok/s median (min-max) | speed-up |",
                  "|---|---|---:|---:|"]
        for name, row in table.items():
            verdict = "" if row["rounds_apart"] else " (level: rounds overlap)"
            lines.append(f"| {name} | {json.dumps(result['shapes'][name])} | {row['median']:.0f} "
                         f"({row['min']:.0f}-{row['max']:.0f}) | {row['speedup']:.2f}x{verdict} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="a Hugging Face folder whose config to copy "
                                                    "(default: the quickstart garrison-base)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=768)
    parser.add_argument("--threads", default="1,2")
    args = parser.parse_args()
    if args.model:
        source = Path(args.model)
    else:
        from garrison.paths import cache_dir
        from garrison.training.tiny_models import ensure_model

        source = ensure_model("garrison-base", cache_dir() / "models")
    config = json.loads((source / "config.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="garrison-decode-share-"))
    try:
        table = shapes(config)
        paths = {name: build(config, source, change, work / str(i)) for i, (name, change) in enumerate(table.items())}
        decoded = {t: decode(paths, args.rounds, args.tokens, int(t)) for t in args.threads.split(",") if t}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shape_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size")
    result = {"machine": {"cpus": os.cpu_count()}, "source": str(source), "tokens": args.tokens,
              "rounds": args.rounds, "source_shape": {k: config.get(k) for k in shape_keys}, "shapes": table,
              "decode": decoded}
    OUT.mkdir(exist_ok=True)
    (OUT / "decode_share.json").write_text(json.dumps(result, indent=2))
    (OUT / "decode_share.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
