"""Compression benchmark: pruning and distillation beside quantization, on held-out data, in one table.

Not a test. In one run, through the `garrison` command as an operator would:

1. the quickstart `garrison-base` model, fine-tuned (LoRA, merged) on the sample support dataset and
   exported to GGUF Q4_K_M and ONNX int8 (as `garrison quickstart` does);
2. a depth-pruned (-25% of decoder blocks), a width-pruned (-25% of MLP channels), a Minitron-width
   (-25% of MLP channels and -25% of embedding channels) and an MLP-and-heads (-25% of MLP channels, one
   query head of each key/value group: -50% of query heads) variant of the fine-tuned model, each healed by
   distillation from it, every variant exported to Q4_K_M; and a control: the unpruned fine-tuned model
   given the same distillation steps, so that "recovered" can also be read against a model trained as long;
3. one evaluation of every model on the dataset's held-out records (the fine-tune's split):
   perplexity on assistant turns and exact match of greedy answers;
4. decode tokens/s of the Q4_K_M artifacts through llama.cpp, side by side, at each --threads count: each
   round measures every model once, in a fresh process each, alternating, so machine noise hits all alike
   (median, min, max). A speed-up counts only when the rounds do not overlap; otherwise it is "level".

Goals (issue 16): the healed variants recover at least half of the perplexity lost to pruning, and
decode at least 1.2x faster than the unpruned model at the same quantization.

    .venv/bin/python bench/compression.py [--ft-steps 200] [--heal-steps 150] [--rounds 5] [--threads 1,2]
                                          [--state DIR] [--decode-only]

Writes bench/out/compression.json and bench/out/compression.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
REPO = HERE.parent
SAMPLE = REPO / "garrison" / "data" / "support_sample.jsonl"
BASE = "garrison-base"
FT = f"{BASE}-ft-b"
MERGED = f"{FT}:merged"
MERGED_ID = f"{FT}-merged"
DEPTH = f"{MERGED_ID}-pruned-depth"
WIDTH = f"{MERGED_ID}-pruned-width"
MINITRON = f"{MERGED_ID}-pruned-minitron"
MLP_HEADS = f"{MERGED_ID}-pruned-mlpheads"
CONTROL = f"{MERGED_ID}-distilled-heal"
# Each pruned variant: its suffix and the `garrison prune` flags that make it.
VARIANTS: dict[str, tuple[str, ...]] = {
    DEPTH: ("--depth", "25%"),
    WIDTH: ("--width", "25%"),
    MINITRON: ("--width", "25%", "--hidden", "25%"),
    MLP_HEADS: ("--width", "25%", "--heads", "50%"),
}


def healed(name: str) -> str:
    return f"{name}-distilled-heal"

DECODE_SCRIPT = r"""
import json, sys, time
import numpy as np
from garrison.engine.cpu_kernels import load_backends
load_backends()
import llama_cpp
threads = int(sys.argv[3])
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=1024, n_batch=1024, n_threads=threads,
                      n_threads_batch=threads, verbose=False)
prompt = llm.tokenize(b"The appliance keeps every dataset encrypted, and", add_bos=True)
llm.eval(prompt)
n = int(sys.argv[2])
start = time.perf_counter()
for _ in range(n):
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    llm.eval([token])
print(json.dumps({"tokens": n, "seconds": time.perf_counter() - start}))
"""


def garrison(state: Path, *args: str, timeout: float = 7200) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GARRISON_")}
    env.update({"GARRISON_STATE_DIR": str(state), "GARRISON_CONFIG": "/dev/null",
                "XDG_CONFIG_HOME": str(state.parent / "xdg-config"), "OMP_WAIT_POLICY": "PASSIVE"})
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "garrison.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"garrison {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"  garrison {' '.join(args[:3])}...: {time.monotonic() - started:.0f}s", file=sys.stderr)
    try:
        out: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        out = {"stdout": proc.stdout}
    return out


def _models(state: Path) -> dict[str, dict[str, Any]]:
    listed = garrison(state, "models", "list", "--json")
    data = listed.get("data", listed) if isinstance(listed, dict) else listed
    return {m["id"]: m for m in data}


def decode_speed(state: Path, names: list[str], rounds: int, tokens: int, threads: int) -> dict[str, Any]:
    models = _models(state)
    paths = {n: Path(models[n]["path"]) if "path" in models[n] else None for n in names}
    for name in names:
        if paths[name] is None or not paths[name].is_file():  # type: ignore[union-attr]
            folder = next((state / "models").glob(f"{name.replace(':', '--')}-*"))
            paths[name] = next(folder.glob("*.gguf"))
    runs = decode_rounds({n: p for n, p in paths.items() if p is not None}, rounds, tokens, threads)
    return {n: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v} for n, v in runs.items()}


def decode_rounds(paths: dict[str, Path], rounds: int, tokens: int, threads: int) -> dict[str, list[float]]:
    """Decode tokens/s of each GGUF file, every round measuring each once in a fresh process, alternating."""
    runs: dict[str, list[float]] = {n: [] for n in paths}
    for _ in range(rounds):
        for name, path in paths.items():
            out = subprocess.run([sys.executable, "-c", DECODE_SCRIPT, str(path), str(tokens), str(threads)],
                                 capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            runs[name].append(result["tokens"] / result["seconds"])
    return runs


def run(args: argparse.Namespace) -> dict[str, Any]:
    state = Path(args.state) if args.state else Path(tempfile.mkdtemp(prefix="garrison-compression-")) / "state"
    started = time.monotonic()
    garrison(state, "jobs", "submit", "build-default-model", "-p", "size=base", "--json")
    garrison(state, "ingest", str(SAMPLE), "--dataset", "support", "--json")
    if FT not in _models(state):
        garrison(state, "finetune", BASE, "support", "--suffix", "b", "--max-steps", str(args.ft_steps),
                 "--max-seq-len", "512", "--epochs", "30", "--batch-size", "8", "--lr-mult", "20",
                 "--export", "gguf:q4_k_m,onnx:int8", "--json")
    jobs: dict[str, Any] = {}
    have = _models(state)
    for name, flags in VARIANTS.items():
        if name not in have:
            jobs[f"prune-{name}"] = garrison(state, "prune", MERGED, *flags, "--calibration", "support", "--suffix",
                                             name.rsplit("-", 1)[1], "--export", "gguf:q4_k_m", "--json")["result"]
    for student in (*VARIANTS, MERGED):
        if healed(student.replace(":", "-")) not in have:
            jobs[f"heal-{student}"] = garrison(
                state, "distill", MERGED, student, "support", "--suffix", "heal", "--max-steps",
                str(args.heal_steps), "--max-seq-len", "512", "--epochs", "30", "--batch-size", "8", "--lr-mult",
                str(args.heal_lr_mult), "--checkpoint-every", "50", "--export", "gguf:q4_k_m", "--json")["result"]
    compared = [BASE, MERGED, f"{MERGED_ID}:q4_k_m", f"{MERGED_ID}:onnx-int8", CONTROL]
    for name in VARIANTS:
        compared += [name, f"{name}:q4_k_m", healed(name), f"{healed(name)}:q4_k_m"]
    evaluation = garrison(state, "eval", *compared, "--dataset", "support", "--max-new-tokens",
                          str(args.max_new_tokens), "--json")
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    result: dict[str, Any] = {"machine": machine, "state": str(state), "settings": vars(args),
                              "evaluation": evaluation, "jobs": jobs}
    _measure_speed(result, state, args)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def _measure_speed(result: dict[str, Any], state: Path, args: argparse.Namespace) -> None:
    quantized = [f"{MERGED_ID}:q4_k_m"] + [f"{n}:q4_k_m" for name in VARIANTS for n in (name, healed(name))]
    result["decode_tokens_per_s"] = {str(t): decode_speed(state, quantized, args.rounds, args.decode_tokens, t)
                                     for t in _threads(args.threads)}
    result["settings"] |= {"rounds": args.rounds, "decode_tokens": args.decode_tokens, "threads": args.threads}
    _goals(result)


def _threads(spec: str) -> list[int]:
    return [int(t) for t in str(spec).split(",") if t.strip()]


def _goals(result: dict[str, Any]) -> None:
    rows = {r["model"]: r for r in result["evaluation"]["rows"]}
    ppl = {m: rows[m]["metrics"]["perplexity"] for m in rows}
    reference = f"{MERGED_ID}:q4_k_m"
    goals: dict[str, Any] = {}
    for pruned in VARIANTS:
        name = healed(pruned)
        lost = ppl[pruned] - ppl[MERGED]
        recovered = (ppl[pruned] - ppl[name]) / lost if lost > 0 else None
        control_gap = ppl[pruned] - ppl[CONTROL]
        speed: dict[str, Any] = {}
        for threads, runs in result["decode_tokens_per_s"].items():
            ours, base = runs[f"{name}:q4_k_m"], runs[reference]
            ratio = ours["median"] / base["median"]
            speed[threads] = {"decode_speedup_q4_k_m": ratio, "rounds_overlap": ours["min"] <= base["max"],
                              "speed_goal_met": ratio >= 1.2 and ours["min"] > base["max"]}
        goals[name] = {"perplexity_lost": lost, "fraction_recovered": recovered,
                       "recovery_goal_met": recovered is not None and recovered >= 0.5,
                       "fraction_of_control_gap_recovered":
                           (ppl[pruned] - ppl[name]) / control_gap if control_gap > 0 else None,
                       "speed": speed}
    result["goals"] = goals


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def markdown(result: dict[str, Any]) -> str:
    speed = result["decode_tokens_per_s"]
    threads = list(speed)
    lines = [f"# Compression benchmark ({result['machine']['cpus']} CPUs)", "",
             f"Held-out split: {result['evaluation']['split']['held_out']} records of "
             f"{result['evaluation']['dataset']} ({result['evaluation']['split']['method']}).", "",
             "| model | format | MB | held-out ppl | exact match | F1 | "
             + " | ".join(f"decode tok/s, {t} thread(s) (median, min-max)" for t in threads) + " |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(threads)]
    for row in result["evaluation"]["rows"]:
        m = row["metrics"]
        cells = []
        for t in threads:
            tps = speed[t].get(row["model"])
            cells.append(f"{tps['median']:.0f} ({tps['min']:.0f}-{tps['max']:.0f})" if tps else "")
        lines.append(f"| {row['model']} | {row['format']} | {(row['size_bytes'] or 0) / 1e6:.1f} | "
                     f"{m['perplexity']:.3f} | {m.get('exact_match', 0):.3f} | {m.get('f1', 0):.3f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| healed variant | ppl lost to pruning | fraction recovered (goal >= 0.5) | of the gap to the "
              "control | " + " | ".join(f"Q4_K_M decode speed-up, {t} thread(s) (goal >= 1.2x)" for t in threads)
              + " |", "|---|---:|---|---:|" + "---|" * len(threads)]
    for name, g in result["goals"].items():
        cells = []
        for t in threads:
            s = g["speed"][t]
            verdict = "met" if s["speed_goal_met"] else ("level (rounds overlap)" if s["rounds_overlap"] else "NOT met")
            cells.append(f"{s['decode_speedup_q4_k_m']:.2f}x {verdict}")
        lines.append(f"| {name} | {g['perplexity_lost']:.3f} | {_fraction(g['fraction_recovered'])} "
                     f"{'met' if g['recovery_goal_met'] else 'NOT met'} | "
                     f"{_fraction(g['fraction_of_control_gap_recovered'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ft-steps", type=int, default=200)
    parser.add_argument("--heal-steps", type=int, default=150)
    parser.add_argument("--heal-lr-mult", type=float, default=10.0, help="x 2e-5 (full distillation)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=768)
    parser.add_argument("--threads", default="1,2", help="llama.cpp threads, one speed table per count")
    parser.add_argument("--decode-only", action="store_true",
                        help="re-measure decode speed on --state and the last bench/out/compression.json")
    parser.add_argument("--state", default="", help="reuse this state folder (a finished fine-tune is kept)")
    args = parser.parse_args()
    if args.decode_only:
        result = json.loads((OUT / "compression.json").read_text())
        _measure_speed(result, Path(args.state or result["state"]), args)
    else:
        result = run(args)
    OUT.mkdir(exist_ok=True)
    (OUT / "compression.json").write_text(json.dumps(result, indent=2, default=str))
    (OUT / "compression.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
