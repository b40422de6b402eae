"""The inference issue's serving benchmark: throughput beside llama.cpp's server, and prompt-prefix reuse.

Not a test. Two parts, one run:

1. Aggregate tokens/s, time to first token and inter-token latency at 1, 4, 8 and 16 clients
   for Garrison, llama.cpp's `llama-server` (built from the vendored llama.cpp, cached outside
   the repository) and llama-cpp-python's `llama_cpp.server`: `serve_throughput.py` with the
   issue's concurrency levels (its flags pass through).
2. Time to first token for a request repeating a ~1,000-token prefix, against the same
   request with a prefix never seen: Garrison and llama-server, same model and threads.

    .venv/bin/python bench/serving.py [--prefix-only] [serve_throughput.py flags]

Writes bench/out/serve_throughput.{json,md} and bench/out/serving_prefix.{json,md}.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import serve_throughput as st  # noqa: E402

PREFIX = " ".join(f"rule {i}: keep the vault closed and log every access." for i in range(47))
REPEATS = 3


def ttft(server: Any, prompt: str) -> tuple[float, int]:
    """Seconds to the first streamed text, and the prompt's token count (from usage when given)."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True,
            **server.body_extra}
    req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={**server.headers, "Content-Type": "application/json"})
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    with urllib.request.urlopen(req, timeout=300) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if first is None and chunk.get("choices"):
                first = time.perf_counter() - started
            tokens = (chunk.get("usage") or {}).get("prompt_tokens", tokens)
    return (first if first is not None else float("nan")), tokens


def prefix_reuse(model: Path, threads: int) -> dict[str, Any]:
    starters = {"garrison": st.start_garrison, "llama-server": st.start_llama_server}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="garrison-bench-prefix-") as tmp:
        for name, start in starters.items():
            work = Path(tmp) / name
            work.mkdir()
            server = start(model, work, threads, {})
            try:
                ttft(server, "warm up: load the model")
                cold, warm, n_tokens = [], [], 0
                for i in range(REPEATS):
                    c, n_tokens = ttft(server, f"variant {i} {PREFIX}\nQuestion: what now?")  # a prefix never seen
                    w, _ = ttft(server, f"variant {i} {PREFIX}\nQuestion: and then?")  # the same prefix again
                    cold.append(c)
                    warm.append(w)
                results[name] = {"cold_s": cold, "warm_s": warm, "prompt_tokens": n_tokens,
                                 "speedup": statistics.median(cold) / statistics.median(warm)}
            finally:
                server.stop()
    return results


def prefix_markdown(results: dict[str, Any]) -> str:
    lines = ["| server | prompt tokens | TTFT cold (ms, median) | TTFT repeated prefix (ms, median) | speedup |",
             "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['prompt_tokens']} | {statistics.median(r['cold_s']) * 1000:.0f} | "
                     f"{statistics.median(r['warm_s']) * 1000:.0f} | {r['speedup']:.0f}x |")
    return "\n".join(lines) + "\n\nGoal: the repeated prefix at least 5x faster than cold.\n"


def main() -> None:
    argv = sys.argv[1:]
    prefix_only = "--prefix-only" in argv
    argv = [a for a in argv if a != "--prefix-only"]
    if "--clients" not in argv:
        argv = ["--clients", "1,4,8,16", *argv]
    if not prefix_only:
        sys.argv = [sys.argv[0], *argv]
        st.main()
    model = st.ensure_standin(st.STANDIN_124M)
    results = prefix_reuse(model, threads=2)
    st.OUT.mkdir(parents=True, exist_ok=True)
    (st.OUT / "serving_prefix.json").write_text(json.dumps(results, indent=2))
    table = prefix_markdown(results)
    (st.OUT / "serving_prefix.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
