"""Conversion benchmark: Garrison's HF -> F16 GGUF -> Q4_K_M beside llama.cpp's own tools, and a quality table.

Not a test. In one run:

1. **Speed and memory** on FACTS.md's 124M-parameter Llama: Garrison's chain (the reference
   converter through `convert_hf_to_gguf`, then `quantize_gguf` on `llama_model_quantize`)
   against running llama.cpp's `convert_hf_to_gguf.py` and `llama-quantize` (built from the
   vendored source) directly. Each side runs in a fresh process; wall time and peak RSS of
   it and its children. Goal: Garrison at most 1.1x llama.cpp's time.
2. **Quality** of each quantization type on a small model trained for a few minutes on local
   text (hidden 256, so K-quant blocks fit every row): perplexity on held-out text, mean KL
   divergence and top-1 agreement against its own F16 GGUF, beside the perplexity deltas
   llama.cpp publishes for those types (read from the vendored `quantize.cpp`).

    .venv/bin/python bench/convert.py [--train-s 180] [--runs 2]

Writes bench/out/convert.json and bench/out/convert.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE))

QUALITY_TYPES = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "iq4_xs")
HELD_OUT_MODULES = ("xml.etree.ElementTree", "http.server", "urllib.request", "email.mime.text", "json.decoder",
                    "concurrent.futures", "multiprocessing.pool", "importlib.metadata", "statistics")


def _run_measured(argv: list[str]) -> dict[str, float]:
    """Run one side in a fresh process; its wall time and the peak RSS of it and every child."""
    code = ("import json, resource, subprocess, sys, time; t = time.monotonic(); "
            "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
            "s = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "c = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
            "print(json.dumps({'seconds': time.monotonic() - t, 'peak_rss_mib': max(s, c) / 1024}))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _ours_script(hf: Path, work: Path) -> list[str]:
    code = ("import sys; from pathlib import Path; "
            "from garrison.converters.hf_to_gguf import convert_hf_to_gguf; "
            "from garrison.converters.quantize import quantize_gguf; "
            "w = Path(sys.argv[2]); f16 = convert_hf_to_gguf(Path(sys.argv[1]), w / 'ours.f16.gguf', 'f16'); "
            "quantize_gguf(f16, w / 'ours.q4_k_m.gguf', 'q4_k_m', nthread=2)")
    return [sys.executable, "-c", code, str(hf), str(work)]


def _peer_script(hf: Path, work: Path, quantize_bin: Path) -> list[str]:
    from garrison.paths import converter_dir

    script = converter_dir() / "convert_hf_to_gguf.py"
    shell = (f"{sys.executable} {script} {hf} --outfile {work}/peer.f16.gguf --outtype f16 && "
             f"{quantize_bin} {work}/peer.f16.gguf {work}/peer.q4_k_m.gguf Q4_K_M 2")
    return ["bash", "-c", shell]


def speed(runs: int) -> dict[str, Any]:
    from models import STANDIN_124M, build_hf, models_root, parameter_count
    from peers import ensure_llama_tool

    quantize_bin = ensure_llama_tool("llama-quantize")
    hf = models_root() / "llama-124m-hf"
    if not (hf / "config.json").exists():
        build_hf(STANDIN_124M, hf)
    rows: dict[str, list[dict[str, float]]] = {"garrison": [], "llama.cpp": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for _ in range(runs):  # alternate, so machine noise hits both sides alike
            rows["garrison"].append(_run_measured(_ours_script(hf, work)))
            rows["llama.cpp"].append(_run_measured(_peer_script(hf, work, quantize_bin)))
            sizes = {p.name: p.stat().st_size for p in work.glob("*.gguf")}
            for p in work.glob("*.gguf"):
                p.unlink()
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in rows.items()}
    return {"model": "llama-124m", "parameters": parameter_count(STANDIN_124M), "runs": rows, "best": best,
            "ratio": best["garrison"]["seconds"] / best["llama.cpp"]["seconds"], "sizes": sizes}


def _published() -> dict[str, str]:
    """llama.cpp's own words for each type (sizes and ppl deltas @ Llama-3-8B), from quantize.cpp."""
    from peers import sdist_path

    with tarfile.open(sdist_path()) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("tools/quantize/quantize.cpp"))
        fh = tar.extractfile(member)
        text = fh.read().decode() if fh else ""
    return {m.group(1).lower(): m.group(2).strip() for m in re.finditer(r'\{\s*"(\w+)",\s*LLAMA_FTYPE_\w+,\s*"([^"]*)"',
                                                                          text)}


def _held_out_text() -> str:
    import importlib
    import inspect

    docs = []
    for name in HELD_OUT_MODULES:
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isfunction(obj)) else None
            if doc and len(doc) > 200:
                docs.append(doc)
    return "\n\n".join(docs)[:40_000]


def _logits(llm: Any, ids: list[int]) -> np.ndarray[Any, Any]:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float64)


def _log_softmax(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    x = x - x.max(axis=-1, keepdims=True)
    out: np.ndarray[Any, Any] = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return out


def quality(train_s: float) -> dict[str, Any]:
    from llama_cpp import Llama

    from garrison.converters.hf_to_gguf import convert_hf_to_gguf
    from garrison.converters.quantize import quantize_gguf
    from garrison.corpus import machine_corpus
    from garrison.training.tiny_models import TinySpec, build_tiny_llama

    spec = TinySpec(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, context=1024, vocab=4000,
                    train_steps=1_000_000)
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "garrison" / "bench" / \
        f"quality-h256-{int(train_s)}s"
    hf = root / "hf"
    if not (hf / "config.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        build_tiny_llama(hf, spec, corpus=machine_corpus(), train_seconds=train_s)
    f16 = root / "model.f16.gguf"
    if not f16.exists():
        convert_hf_to_gguf(hf, f16, "f16")
    text = _held_out_text()
    ref_llm = Llama(model_path=str(f16), n_ctx=512, logits_all=True, n_threads=2, verbose=False)
    ids = ref_llm.tokenize(text.encode(), add_bos=False)
    windows = [[ref_llm.token_bos(), *ids[i:i + 255]] for i in range(0, min(len(ids), 255 * 16), 255)]
    reference = [_logits(ref_llm, w) for w in windows]
    ref_llm.close()

    def ppl(logits: list[np.ndarray[Any, Any]]) -> float:
        nll, n = 0.0, 0
        for lg, w in zip(logits, windows, strict=True):
            lp = _log_softmax(lg[:-1])
            nll -= float(lp[np.arange(len(w) - 1), np.asarray(w[1:])].sum())
            n += len(w) - 1
        return float(np.exp(nll / n))

    published = _published()
    rows = [{"type": "f16", "size_mib": f16.stat().st_size / 2**20, "ppl": ppl(reference), "kl": 0.0, "top1": 1.0,
             "published": published.get("f16", "")}]
    for qtype in QUALITY_TYPES:
        path = root / f"model.{qtype}.gguf"
        if not path.exists():
            quantize_gguf(f16, path, qtype, nthread=2)
        llm = Llama(model_path=str(path), n_ctx=512, logits_all=True, n_threads=2, verbose=False)
        cand = [_logits(llm, w) for w in windows]
        llm.close()
        kl, agree, n = 0.0, 0, 0
        for r, c in zip(reference, cand, strict=True):
            lr, lc = _log_softmax(r), _log_softmax(c)
            kl += float((np.exp(lr) * (lr - lc)).sum())
            agree += int((r.argmax(-1) == c.argmax(-1)).sum())
            n += r.shape[0]
        rows.append({"type": qtype, "size_mib": path.stat().st_size / 2**20, "ppl": ppl(cand), "kl": kl / n,
                     "top1": agree / n, "published": published.get(qtype, "")})
    build = json.loads((hf / "garrison_build.json").read_text()) if (hf / "garrison_build.json").exists() else {}
    return {"model": {"hidden": spec.hidden, "layers": spec.layers, "vocab": spec.vocab, "train_s": train_s,
                      "build": build}, "held_out_tokens": sum(len(w) for w in windows), "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    s = result["speed"]
    lines = [f"### HF -> F16 GGUF -> Q4_K_M, {s['model']} ({s['parameters'] / 1e6:.0f}M parameters), "
             f"best of {len(s['runs']['garrison'])}", "",
             "| chain | wall time (s) | peak RSS (MiB) |", "|---|---:|---:|"]
    for side in ("garrison", "llama.cpp"):
        b = s["best"][side]
        lines.append(f"| {side} | {b['seconds']:.1f} | {b['peak_rss_mib']:.0f} |")
    lines += ["", f"Garrison / llama.cpp time: **{s['ratio']:.2f}x** (goal <= 1.1x).", ""]
    q = result["quality"]
    lines += [f"### Quantization quality: hidden {q['model']['hidden']}, {q['model']['layers']} layers, trained "
              f"{q['model']['train_s']:.0f} s on local text; {q['held_out_tokens']} held-out tokens; vs its F16",
              "", "| type | size (MiB) | PPL | ΔPPL | mean KL | top-1 | llama.cpp publishes |",
              "|---|---:|---:|---:|---:|---:|---|"]
    base = q["rows"][0]["ppl"]
    for r in q["rows"]:
        lines.append(f"| {r['type']} | {r['size_mib']:.2f} | {r['ppl']:.3f} | {r['ppl'] - base:+.3f} | "
                     f"{r['kl']:.5f} | {r['top1']:.3f} | {r['published']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--train-s", type=float, default=180.0)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    started = time.monotonic()
    result = {"speed": speed(args.runs), "quality": quality(args.train_s),
              "load_average": os.getloadavg(), "max_rss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
              / 1024}
    result["seconds"] = time.monotonic() - started
    OUT.mkdir(exist_ok=True)
    (OUT / "convert.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (OUT / "convert.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
