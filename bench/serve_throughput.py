"""Side-by-side serving benchmark: Garrison vs llama.cpp's llama-server vs llama-cpp-python's server.

Not a test; run by hand (the full run takes ~10 minutes on 2 cores, plus one-time builds):

    .venv/bin/python bench/serve_throughput.py [--clients 1,4,8] [--tokens 128] [--rounds 3] [--quick]
                                               [--servers garrison,llama-server,llama-cpp-python,garrison-engine]
                                               [--interleave]

Why these three: llama-server is the continuous-batching reference (same llama.cpp revision,
built from the vendored source by bench/peers.py), llama-cpp-python's server is the
serialized baseline, and Garrison must land near the first, not the second (FACTS.md).
`garrison-engine` (opt-in) drives Garrison's LlamaEngine in process with no HTTP at all, so
the difference to `garrison` is what the daemon's HTTP/SSE layer costs.

One run does everything: builds (once, cached under ~/.cache/garrison/bench/) the 124M
stand-in model (bench/models.py) and llama-server (bench/peers.py), installs llama-cpp-python's
server dependencies if missing, then starts each server in turn on loopback with the same
GGUF, the same threads and the same context per slot, and for each concurrency level starts
that many clients at once, each streaming one completion over /v1/completions (aiohttp, SSE).
Every prompt is distinct (~32 tokens, so no server answers from a prompt cache) and decoding
is greedy. The stand-in never emits EOS and every token carries text (bench/models.py), so
each stream has exactly --tokens tokens; the script still counts what it receives.

Measured per server and level: aggregate tokens/s (all tokens received / wall time from the
first request to the last stream's end), mean and p50 time to first token, p50/p95
inter-token latency (gaps between text chunks, pooled over streams). Results go to
bench/out/serve_throughput.json and .md (git-ignored) and the table is printed.

The machines are shared: before each round the script waits for idle CPUs, measures how much
CPU other processes took during the round, and reruns a disturbed round (the JSON keeps it
under "discarded"); the table shows the median of the clean rounds. With --interleave all
servers are started first and the rounds rotate between them, so slow periods of the host
hit every server alike (only one server ever has work; idle ones use no CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import STANDIN_124M, STANDIN_QUICK, ensure_standin, parameter_count
from peers import bench_cache, ensure_llama_server

OUT = Path(__file__).resolve().parent / "out"
REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

N_PARALLEL = 8
CTX_PER_SLOT = 1024
PROMPT_TOKENS = 32  # BOS included

# llama-cpp-python[server]'s extras, pinned in pyproject.toml's `bench` extra and installed from there
# directly, so pip never touches the llama-cpp-python build that is already installed.
SERVER_REQUIREMENTS = tuple(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
                            ["bench"])
SERVER_MODULES = {"uvicorn": "uvicorn", "fastapi": "fastapi", "pydantic-settings": "pydantic_settings",
                  "sse-starlette": "sse_starlette", "starlette-context": "starlette_context", "PyYAML": "yaml"}

# FACTS.md, 124M Q4_K_M, 2 threads, 1 / 4 / 8 clients (the figures this run should reproduce).
FACTS_REFERENCE = {"llama-server": {1: 137, 4: 241, 8: 269}, "llama-cpp-python": {1: 126, 4: 83, 8: 56}}


# --- servers ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A started server process and how to talk to it."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    model: str
    headers: dict[str, str] = field(default_factory=dict)
    read_headers: dict[str, str] = field(default_factory=dict)  # a key that may read status (Garrison)
    body_extra: dict[str, Any] = field(default_factory=dict)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def peak_rss_mib(self) -> float | None:
        """VmHWM of the server process (for Python servers the model lives in that process)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def wait_ready(self, path: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log_tail()}")
            req = urllib.request.Request(self.url + path, headers=self.headers)
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL: a benchmark must never leave a server holding the CPUs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark dies, even by SIGKILL (Linux prctl)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GARRISON_", "LLAMA_ARG_")) and k not in {"NOTIFY_SOCKET", "WATCHDOG_USEC"}}
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
    env.update(extra)
    return env


def start_garrison(model: Path, work: Path, threads: int, extra_env: dict[str, str]) -> Server:
    """`garrison serve` on a fresh state folder, the model imported with N_PARALLEL slots of 1024 tokens."""
    state = work / "garrison-state"
    env = _clean_env(GARRISON_STATE_DIR=str(state), GARRISON_CONFIG="/dev/null",
                     GARRISON_INFERENCE_THREADS=str(threads), **extra_env)
    garrison = str(BIN / "garrison")

    def cli(*args: str) -> str:
        proc = subprocess.run([garrison, *args], env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"garrison {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout.strip()

    cli("models", "import", str(model), "--name", "bench", "--parallel", str(N_PARALLEL), "--ctx", str(CTX_PER_SLOT))
    key = cli("keys", "create", "--role", "infer", "--name", "bench").splitlines()[-1].strip()
    read_key = cli("keys", "create", "--role", "read", "--name", "bench-read").splitlines()[-1].strip()
    port = free_port()
    log_path = work / "garrison.log"
    proc = _spawn([garrison, "serve", "--listen", f"127.0.0.1:{port}"], env, log_path)
    server = Server("garrison", proc, f"http://127.0.0.1:{port}", log_path, "bench",
                    headers={"Authorization": f"Bearer {key}"}, read_headers={"Authorization": f"Bearer {read_key}"},
                    body_extra={"ignore_eos": True, "stream_options": {"include_usage": True}})
    server.wait_ready("/health")
    return server


def kernels(model: Path) -> tuple[bool, str]:
    """Whether Garrison serves `model` with llama.cpp's extra buffer types (the CPU weight repack) on
    this machine, by the same probe the daemon runs (cached beside the bench's other builds)."""
    from garrison.engine.cpu_kernels import RepackVerdicts

    return RepackVerdicts(bench_cache() / "cpu-kernels.json").decide("auto", model)


def start_llama_server(model: Path, work: Path, threads: int, extra_env: dict[str, str]) -> Server:
    """llama.cpp's server: N_PARALLEL slots of 1024 tokens each, continuous batching (its default).

    --no-repack wherever Garrison's runner goes without extra buffer types, so both run the same kernels.
    """
    binary = ensure_llama_server()
    port = free_port()
    log_path = work / "llama-server.log"
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-np", str(N_PARALLEL),
           "-c", str(N_PARALLEL * CTX_PER_SLOT), "-t", str(threads), "-tb", str(threads), "-cb", "-a", "bench"]
    if not kernels(model)[0]:
        cmd.append("--no-repack")
    proc = _spawn(cmd, _clean_env(**extra_env), log_path)
    server = Server("llama-server", proc, f"http://127.0.0.1:{port}", log_path, "bench",
                    body_extra={"ignore_eos": True, "stream_options": {"include_usage": True}})
    server.wait_ready("/health")
    return server


def start_llama_cpp_python(model: Path, work: Path, threads: int, extra_env: dict[str, str]) -> Server:
    """llama-cpp-python's own server: one Llama object, requests served one after the other.

    interrupt_requests is on by default there: a new request cuts the running stream short,
    which would count truncated streams as served. Off, every client gets all its tokens.
    """
    port = free_port()
    log_path = work / "llama-cpp-python.log"
    # A portable build loads its CPU backend from a variant library; llama-cpp-python's server only
    # looks beside the Python executable, so it is pointed at the variant this CPU's loader chooses.
    extra_env = {"GGML_BACKEND_PATH": best_cpu_variant(), **extra_env}
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", "bench",
           "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(CTX_PER_SLOT),
           "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(port)]
    proc = _spawn(cmd, _clean_env(**extra_env), log_path)
    server = Server("llama-cpp-python", proc, f"http://127.0.0.1:{port}", log_path, "bench")
    server.wait_ready("/v1/models")
    return server


def best_cpu_variant() -> str:
    code = ("from garrison.engine import cpu_kernels as k; import llama_cpp; k.load_backends(); "
            "llama_cpp.llama_backend_init(); print(k.llama_lib_dir() / f'libggml-cpu-{k.loaded_variant()}.so')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip().splitlines()[-1]


LAUNCHERS: dict[str, Callable[[Path, Path, int, dict[str, str]], Server]] = {
    "garrison": start_garrison,
    "llama-server": start_llama_server,
    "llama-cpp-python": start_llama_cpp_python,
}


# --- clients ----------------------------------------------------------------------------------------------


@dataclass
class StreamResult:
    start: float
    chunk_times: list[float]
    usage_tokens: int | None
    end: float
    error: str | None = None

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else len(self.chunk_times)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


async def stream_completion(session: Any, server: Server, prompt: str, max_tokens: int,
                            timeout_s: float) -> StreamResult:
    """One streamed /v1/completions; a chunk with text counts as one token's arrival."""
    import aiohttp

    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, **server.body_extra}
    start = time.perf_counter()
    times: list[float] = []
    usage: int | None = None
    try:
        async with session.post(server.url + "/v1/completions", json=body, headers=server.headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                text = await resp.text()
                return StreamResult(start, times, None, time.perf_counter(), f"HTTP {resp.status}: {text[:200]}")
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(payload)
                if "error" in chunk:
                    return StreamResult(start, times, usage, now, str(chunk["error"])[:200])
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    times.append(now)
                if chunk.get("usage"):
                    usage = int(chunk["usage"].get("completion_tokens", 0)) or None
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError) as err:
        return StreamResult(start, times, usage, time.perf_counter(), f"{type(err).__name__}: {err}")
    return StreamResult(start, times, usage, time.perf_counter())


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(results: list[StreamResult], wall: float) -> dict[str, Any]:
    tokens = sum(r.tokens for r in results if r.error is None)
    ttfts = [t for r in results if r.error is None and (t := r.ttft) is not None]
    gaps = [g for r in results if r.error is None for g in r.gaps]
    ms = 1000.0
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tok_s": tokens / wall if wall > 0 else 0.0,
        "tokens_per_stream": sorted({r.tokens for r in results}),
        "chunks_per_stream": sorted({len(r.chunk_times) for r in results}),
        "ttft_mean_ms": statistics.fmean(ttfts) * ms if ttfts else None,
        "ttft_p50_ms": (percentile(ttfts, 0.5) or 0) * ms if ttfts else None,
        "ttft_max_ms": max(ttfts) * ms if ttfts else None,
        "itl_p50_ms": (percentile(gaps, 0.5) or 0) * ms if gaps else None,
        "itl_p95_ms": (percentile(gaps, 0.95) or 0) * ms if gaps else None,
        "errors": [r.error for r in results if r.error],
    }


async def run_level(server: Server, prompts: list[str], max_tokens: int, timeout_s: float) -> dict[str, Any]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_completion(session, server, p, max_tokens, timeout_s)
                                         for p in prompts))
        wall = max(r.end for r in results) - start
    return summarize(list(results), wall)


# --- in-process engine (no HTTP) --------------------------------------------------------------------------


async def run_engine_level(engine: Any, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """The same load on Garrison's LlamaEngine directly: what the engine does without the daemon."""
    from garrison.engine.types import Finish, GenerationRequest, SamplingParams

    async def one(prompt: str) -> StreamResult:
        tokens = engine.tokenize(prompt, add_special=True, parse_special=False)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        req = GenerationRequest(prompt_tokens=tokens, params=params)
        start = time.perf_counter()
        times: list[float] = []
        usage = None
        async for item in engine.generate(req):
            now = time.perf_counter()
            if isinstance(item, Finish):
                usage = item.completion_tokens
                if item.text:
                    times.append(now)
            elif item.text:
                times.append(now)
        return StreamResult(start, times, usage, time.perf_counter())

    start = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    return summarize(list(results), max(r.end for r in results) - start)


# --- CPU accounting: did something else use the cores during a level? ------------------------------------


def _proc_cpu_s(pid: int | str) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process_tree(pid: int) -> list[int]:
    import psutil

    try:
        return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return [pid]


def _system_busy_s() -> float:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used during a level by the server, by this client and by everything else.

    The machines are shared: a level during which other processes took a core is not a
    measurement of the server, and `foreign_cpu_share` says so in the JSON.
    """

    def __init__(self, server_pid: int | None) -> None:
        self.pid = server_pid
        self.start = self._read()

    def _read(self) -> tuple[float, float, float]:
        server = 0.0
        if self.pid is not None:
            # The server and its children: Garrison's model runs in a runner process of the daemon.
            for pid in _process_tree(self.pid):
                with contextlib.suppress(OSError):
                    server += _proc_cpu_s(pid)
        return _system_busy_s(), server, _proc_cpu_s("self")

    def result(self, wall: float) -> dict[str, float]:
        end = self._read()
        busy, server, client = (b - a for a, b in zip(self.start, end, strict=True))
        foreign = max(0.0, busy - server - client)
        capacity = wall * (os.cpu_count() or 1)
        return {"server_cpu_s": server, "client_cpu_s": client, "foreign_cpu_s": foreign,
                "foreign_cpu_share": foreign / capacity if capacity else 0.0}


def wait_quiet(max_wait_s: float, threshold: float = 0.15) -> float:
    """Wait until the machine's CPUs are mostly idle (others share them); returns the last busy share.

    Gives up after max_wait_s and lets the level run anyway: the level's foreign_cpu_share
    will then say that it was measured under load.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        before = _system_busy_s()
        time.sleep(1.0)
        share = (_system_busy_s() - before) / (os.cpu_count() or 1)
        if share < threshold or time.monotonic() >= deadline:
            return share
        time.sleep(2.0)


# --- prompts, deps, environment ---------------------------------------------------------------------------


class Prompts:
    """Distinct prompts of PROMPT_TOKENS tokens (with BOS) in the model's own tokenizer."""

    def __init__(self, model: Path) -> None:
        import llama_cpp

        from garrison.corpus import corpus_lines
        from garrison.engine.cpu_kernels import load_backends

        load_backends()
        self._llm = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
        self._words = " ".join(corpus_lines()).split()
        self.lengths: list[int] = []

    def make(self, seed: int) -> str:
        rng = random.Random(seed)
        words = self._words[:]
        rng.shuffle(words)
        ids = self._llm.tokenize(" ".join(words[:64]).encode(), add_bos=False)[: PROMPT_TOKENS - 1]
        text = self._llm.detokenize(ids).decode("utf-8", errors="ignore").strip()
        self.lengths.append(len(self._llm.tokenize(text.encode(), add_bos=True)))
        return text

    def close(self) -> None:
        self._llm.close()


def ensure_server_deps() -> dict[str, str]:
    """llama-cpp-python's server extras, pip-installed by name if missing; returns installed versions."""
    missing = [dist for dist, module in SERVER_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(f"installing llama-cpp-python server dependencies ({', '.join(missing)})", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *SERVER_REQUIREMENTS],
                       check=True)
    versions = {}
    for dist in (*SERVER_MODULES, "starlette", "anyio", "pydantic"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return versions


def environment(threads: int) -> dict[str, Any]:
    import llama_cpp

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    server_version: list[str] = []
    with contextlib.suppress(Exception):
        proc = subprocess.run([str(ensure_llama_server()), "--version"], capture_output=True, text=True, timeout=30)
        server_version = (proc.stdout + proc.stderr).strip().splitlines()[-2:]
    return {
        "cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
        "llama_cpp_python": importlib.metadata.version("llama_cpp_python"),
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "llama_server_version": server_version,
        "load_avg_at_start": os.getloadavg(),
    }


# --- driver -----------------------------------------------------------------------------------------------


def parse_target(spec: str) -> tuple[str, dict[str, str]]:
    """"garrison+OMP_WAIT_POLICY=ACTIVE" -> ("garrison", {"OMP_WAIT_POLICY": "ACTIVE"}): a server variant
    with extra environment, so one run can compare settings side by side."""
    base, *pairs = spec.split("+")
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"bad environment setting {pair!r} in {spec!r} (want KEY=VALUE)")
        env[key] = value
    return base, env


class Target:
    """One thing under test: a server process over HTTP, or Garrison's engine in this process."""

    def __init__(self, name: str, model: Path, work: Path, args: argparse.Namespace) -> None:
        self.name = name
        self.args = args
        self.server: Server | None = None
        self.engine: Any = None
        base, extra_env = parse_target(name)
        work.mkdir(parents=True, exist_ok=True)
        if base == "garrison-engine":
            from garrison.engine.llama_engine import LlamaEngine

            self.engine = LlamaEngine(model, n_ctx_per_slot=CTX_PER_SLOT, n_parallel=N_PARALLEL, n_batch=512,
                                      n_threads=args.threads, use_extra_bufts=kernels(model)[0])
        else:
            self.server = LAUNCHERS[base](model, work, args.threads, extra_env)

    def once(self, prompts: list[str], max_tokens: int) -> dict[str, Any]:
        """One level: all prompts at once; the result carries the CPU accounting of the level."""
        if self.server is not None and self.server.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.server.proc.returncode}:\n{self.server.log_tail()}")
        meter = CpuMeter(self.server.proc.pid if self.server else None)  # in-process engine: all "client"
        if self.server is not None:
            level = asyncio.run(run_level(self.server, prompts, max_tokens, self.args.timeout))
        else:
            level = asyncio.run(run_engine_level(self.engine, prompts, max_tokens))
        return level | meter.result(level["wall_s"])

    def warm_up(self, prompt: str) -> None:
        """First request: loads the model where loading is lazy (Garrison), fills caches and pages."""
        level = self.once([prompt], 16)
        if level["errors"] or level["tokens"] == 0:
            tail = self.server.log_tail() if self.server else ""
            raise RuntimeError(f"{self.name}: warm-up failed: {level['errors']}\n{tail}")

    def peak_rss_mib(self) -> float | None:
        return self.server.peak_rss_mib() if self.server else None

    def runner_facts(self) -> dict[str, Any] | None:
        """Garrison only: its runner's pid, RSS, kernels and the boundary's measured cost per engine step."""
        if self.server is None or self.server.name != "garrison":
            return None
        req = urllib.request.Request(self.server.url + "/v1/garrison/runners", headers=self.server.read_headers)
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(req, timeout=10) as r:
                rows = json.loads(r.read())["data"]
            for row in rows:
                if row["model"] == self.server.model:
                    return {k: row.get(k) for k in ("pid", "memory_bytes", "variant", "extra_bufts",
                                                    "extra_bufts_reason", "steps", "ipc_us_per_step")}
        return None

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            # Keep the server's log beside the results (the work folder is temporary).
            logs = self.args.out / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)
            with contextlib.suppress(OSError):
                shutil.copyfile(self.server.log_path, logs / f"{safe}.log")
        if self.engine is not None:
            self.engine.close()


class LevelRecord:
    """The rounds of one (target, clients) level: clean ones count, disturbed ones are set aside.

    A round during which other processes took more than args.max_foreign of the CPUs is kept
    in "discarded" and run again, at most args.max_retries extra times per level.
    """

    def __init__(self, name: str, clients: int, args: argparse.Namespace) -> None:
        self.name, self.clients, self.args = name, clients, args
        self.rounds: list[dict[str, Any]] = []
        self.discarded: list[dict[str, Any]] = []

    @property
    def attempts(self) -> int:
        return len(self.rounds) + len(self.discarded)

    def wants_more(self) -> bool:
        return len(self.rounds) < self.args.rounds and len(self.discarded) <= self.args.max_retries

    def run(self, target: Target, prompts: Prompts) -> None:
        batch = [prompts.make(self.clients * 1000 + self.attempts * 100 + i) for i in range(self.clients)]
        wait_quiet(self.args.quiet_wait)
        level = target.once(batch, self.args.tokens)
        noisy = level["foreign_cpu_share"] > self.args.max_foreign
        (self.discarded if noisy else self.rounds).append(level)
        print(f"  {self.name:17} clients={self.clients} try={self.attempts}: {level['tok_s']:.1f} tok/s, other "
              f"processes {level['foreign_cpu_share']:.0%} of the CPUs{'  (discarded)' if noisy else ''}"
              f"{'  ERRORS ' + str(level['errors'][:2]) if level['errors'] else ''}", flush=True)

    def result(self) -> dict[str, Any]:
        rounds = self.rounds
        if not rounds:  # never quiet: report the least disturbed attempt, flagged by its foreign share
            rounds = [min(self.discarded, key=lambda r: r["foreign_cpu_share"])]
        return {"rounds": rounds, "discarded": self.discarded, **merge_rounds(rounds)}


def run_sequential(model: Path, tmp: Path, args: argparse.Namespace, prompts: Prompts) -> dict[str, Any]:
    """Each target alone, one after the other: started, warmed up, every level, stopped."""
    results: dict[str, Any] = {}
    for name in args.servers:
        print(f"{name}:", flush=True)
        target: Target | None = None
        try:
            target = Target(name, model, tmp / f"target{len(results)}", args)
            target.warm_up(prompts.make(10_000))
            levels = {}
            for clients in args.clients:
                record = LevelRecord(name, clients, args)
                while record.wants_more():
                    record.run(target, prompts)
                levels[str(clients)] = record.result()
            results[name] = {"levels": levels, "peak_rss_mib": target.peak_rss_mib(),
                             "runner": target.runner_facts()}
        except Exception as err:  # one failing server must not lose the others' figures
            print(f"  {name} failed: {err}", file=sys.stderr, flush=True)
            results[name] = {"error": str(err)}
        finally:
            if target is not None:
                target.close()
    return results


def run_interleaved(model: Path, tmp: Path, args: argparse.Namespace, prompts: Prompts) -> dict[str, Any]:
    """All targets started (only one ever has work), rounds rotated between them.

    On shared, noisy machines the host's state drifts over minutes; rotating the targets
    round by round pairs their measurements in time, so a slow period hits all of them.
    """
    targets: dict[str, Target] = {}
    results: dict[str, Any] = {}
    try:
        for name in args.servers:
            print(f"{name}: starting", flush=True)
            try:
                targets[name] = Target(name, model, tmp / f"target{len(targets) + len(results)}", args)
                targets[name].warm_up(prompts.make(10_000))
            except Exception as err:
                print(f"  {name} failed: {err}", file=sys.stderr, flush=True)
                results[name] = {"error": str(err)}
                if name in targets:
                    targets.pop(name).close()
        levels: dict[str, dict[str, Any]] = {name: {} for name in targets}
        for clients in args.clients:
            records = {name: LevelRecord(name, clients, args) for name in targets if name not in results}
            turn = 0
            while any(r.wants_more() for r in records.values()):
                names = list(records)
                for name in names[turn % len(names):] + names[: turn % len(names)]:
                    if name in records and records[name].wants_more():
                        try:
                            records[name].run(targets[name], prompts)
                        except Exception as err:  # a dead server: keep measuring the others
                            print(f"  {name} failed: {err}", file=sys.stderr, flush=True)
                            results[name] = {"error": str(err), "levels": levels[name]}
                            del records[name]
                turn += 1
            for name, record in records.items():
                levels[name][str(clients)] = record.result()
        for name, target in targets.items():
            results.setdefault(name, {"levels": levels[name], "peak_rss_mib": target.peak_rss_mib(),
                                      "runner": target.runner_facts()})
    finally:
        for target in targets.values():
            target.close()
    return {name: results[name] for name in args.servers if name in results}


def merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over rounds for the headline figures (one disturbed round moves a mean a lot; the
    machines are shared and noisy); every round stays in the JSON."""
    def median(key: str) -> float | None:
        values = [r[key] for r in rounds if r[key] is not None]
        return statistics.median(values) if values else None

    keys = ("tok_s", "ttft_mean_ms", "ttft_p50_ms", "itl_p50_ms", "itl_p95_ms", "server_cpu_s", "foreign_cpu_share")
    return {key: median(key) for key in keys} | {
        "tok_s_min": min(r["tok_s"] for r in rounds), "tok_s_max": max(r["tok_s"] for r in rounds),
        "errors": [e for r in rounds for e in r["errors"]],
        "tokens_per_stream": sorted({t for r in rounds for t in r["tokens_per_stream"]}),
    }


def markdown(report: dict[str, Any]) -> str:
    def fmt(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    config = report["config"]
    order = "servers interleaved round by round" if config.get("interleave") else "one server after the other"
    lines = [f"Model: {report['model']['name']} ({report['model']['parameters_m']:.0f}M params, Q4_K_M, "
             f"{report['model']['size_mb']:.0f} MB); {config['threads']} threads per server; "
             f"{config['tokens']} tokens per stream, ~{config['prompt_tokens']} prompt tokens; "
             f"median of {config['rounds']} clean rounds, {order}. \"other load\": share of the CPUs used by "
             "other processes during the level (the machines are shared; above a few % a row is suspect).", "",
             "| server | clients | tok/s aggregate (range) | TTFT mean (ms) | ITL p50 (ms) | ITL p95 (ms) | "
             "other load | FACTS.md tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, result in report["servers"].items():
        if "error" in result:
            first_line = result["error"].strip().splitlines()[0][:80] if result["error"].strip() else "?"
            lines.append(f"| {name} | - | failed: {first_line} | | | | | |")
        for clients, level in result.get("levels", {}).items():
            # FACTS.md's figures are for the 124M stand-in, 128 tokens: no reference for other runs.
            comparable = report["model"]["name"] == STANDIN_124M.name and config["tokens"] == 128
            ref = FACTS_REFERENCE.get(name, {}).get(int(clients)) if comparable else None
            errs = f" ({len(level['errors'])} errors)" if level["errors"] else ""
            spread = f" ({level['tok_s_min']:.0f}-{level['tok_s_max']:.0f})" if len(level["rounds"]) > 1 else ""
            lines.append(f"| {name} | {clients} | {fmt(level['tok_s'], 1)}{spread}{errs} | "
                         f"{fmt(level['ttft_mean_ms'])} | "
                         f"{fmt(level['itl_p50_ms'], 1)} | {fmt(level['itl_p95_ms'], 1)} | "
                         f"{fmt((level['foreign_cpu_share'] or 0) * 100)}% | {ref or '-'} |")
    kernels = report.get("kernels") or {}
    if kernels:
        lines += ["", f"CPU kernels: extra buffer types {'on' if kernels['extra_bufts'] else 'off'} "
                      f"({kernels['reason']}); llama-server gets --no-repack where they are off."]
    for name, result in report["servers"].items():
        runner = result.get("runner")
        if runner:
            lines.append(f"{name}: model in runner pid {runner['pid']} ({runner['variant']}, "
                         f"{(runner['memory_bytes'] or 0) / 2**20:.0f} MiB RSS); process boundary "
                         f"{fmt(runner['ipc_us_per_step'], 1)} µs of CPU per engine step over {runner['steps']} steps "
                         "(encode + write in the runner, read + decode + dispatch in the daemon).")
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Garrison vs llama-server vs llama-cpp-python, streamed completions")
    parser.add_argument("--clients", default="1,4,8", help="concurrency levels, comma-separated (default 1,4,8)")
    parser.add_argument("--slots", type=int, default=0,
                        help="parallel sequences per server (default: the larger of 8 and the most clients), "
                             "so that every client of a level is batched, never queued")
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per stream (default 128)")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions per level; the table shows the median")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per server (default 2)")
    parser.add_argument("--servers", default="garrison,llama-server,llama-cpp-python",
                        help="which servers, in order; add garrison-engine for the in-process engine without HTTP; "
                             "NAME+KEY=VALUE runs a variant with extra environment (garrison+OMP_WAIT_POLICY=ACTIVE)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 16 tokens: a smoke run of the plumbing")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per stream")
    parser.add_argument("--interleave", action="store_true",
                        help="start every server first and rotate rounds between them (paired in time; "
                             "idle servers use no CPU), instead of one server after the other")
    parser.add_argument("--max-foreign", type=float, default=0.10,
                        help="rerun a round when other processes used more than this share of the CPUs")
    parser.add_argument("--max-retries", type=int, default=6, help="extra rounds allowed per level for disturbed ones")
    parser.add_argument("--quiet-wait", type=float, default=300,
                        help="before each level, wait up to this many seconds for other processes to leave the "
                             "CPUs idle (0: don't wait)")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for serve_throughput.json/.md")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    try:
        specs = [parse_target(spec) for spec in args.servers]
    except ValueError as err:
        parser.error(str(err))
    unknown = {base for base, _ in specs} - {*LAUNCHERS, "garrison-engine"}
    if unknown:
        parser.error(f"unknown server(s): {', '.join(sorted(unknown))}")
    if any(base == "garrison-engine" and env for base, env in specs):
        parser.error("garrison-engine runs in this process: set its environment when starting the script")
    args.slots = args.slots or max(N_PARALLEL, *args.clients)
    if max(args.clients) > args.slots:
        parser.error(f"at most {args.slots} clients: every server has --slots {args.slots} slots")
    if args.quick and args.tokens == 128:
        args.tokens = 16
    if PROMPT_TOKENS + args.tokens > CTX_PER_SLOT:
        parser.error(f"--tokens must leave room for the prompt in {CTX_PER_SLOT} tokens per slot")
    return args


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    # SIGTERM (and SIGINT, which a shell ignores in background jobs) unwind through the finally
    # blocks, so every server is stopped; prctl in the children covers SIGKILL.
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    global N_PARALLEL
    args = parse_args()
    N_PARALLEL = args.slots  # every launcher reads it: the same slot count for every server
    spec = STANDIN_QUICK if args.quick else STANDIN_124M
    print(f"model: {spec.name} ({parameter_count(spec) / 1e6:.1f}M parameters)", flush=True)
    model = ensure_standin(spec)
    bases = {parse_target(spec)[0] for spec in args.servers}
    if "llama-server" in bases:
        print("llama-server: building once from the vendored llama.cpp if needed", flush=True)
        ensure_llama_server()
    deps = ensure_server_deps() if "llama-cpp-python" in bases else {}
    prompts = Prompts(model)
    report: dict[str, Any] = {
        "model": {"name": spec.name, "path": str(model), "parameters_m": parameter_count(spec) / 1e6,
                  "size_mb": model.stat().st_size / 1e6, "spec": asdict(spec)},
        "config": {"clients": args.clients, "tokens": args.tokens, "rounds": args.rounds, "threads": args.threads,
                   "interleave": args.interleave, "max_foreign": args.max_foreign,
                   "n_parallel": N_PARALLEL, "ctx_per_slot": CTX_PER_SLOT, "prompt_tokens": PROMPT_TOKENS},
        "environment": environment(args.threads), "server_deps": deps, "servers": {},
        "kernels": dict(zip(("extra_bufts", "reason"), kernels(model), strict=True)),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        with tempfile.TemporaryDirectory(prefix="garrison-bench-") as tmp:
            run = run_interleaved if args.interleave else run_sequential
            report["servers"] = run(model, Path(tmp), args, prompts)
    finally:
        prompts.close()
    report["config"]["prompt_tokens"] = round(statistics.fmean(prompts.lengths), 1) if prompts.lengths else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_throughput.json").write_text(json.dumps(report, indent=2, default=str))
    table = markdown(report)
    (args.out / "serve_throughput.md").write_text(table)
    print()
    print(table)


if __name__ == "__main__":
    main()
