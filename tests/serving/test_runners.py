"""Model runners under supervision, through a real daemon: a native fault costs one model's requests only.

Each loaded model runs in its own process. These tests kill runners the way a native fault
or the OOM killer would (SIGSEGV, SIGKILL), force a runner that always crashes, and check
what clients, `/health`, `garrison ps` and `/metrics` see.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from conftest import Daemon, free_port, garrison_env, run_cli

pytestmark = pytest.mark.slow

LONG = {"prompt": "Once upon a time", "max_tokens": 3000, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def quantized(tiny_llama_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Llama as Q8_0 and Q4_K_M: the weight types whose CPU repack faults on some machines."""
    from garrison.converters.quantize import quantize_gguf

    out = tmp_path_factory.mktemp("runner-models")
    return {q: quantize_gguf(tiny_llama_gguf, out / f"tiny-{q}.gguf", q, nthread=1) for q in ("q8_0", "q4_k_m")}


def start_daemon(root: Path, models: dict[str, tuple[Path, int]], **env_extra: str) -> Daemon:
    state = root / "state"
    env = garrison_env(state, GARRISON_MODEL_KEEP_ALIVE_S="0", **env_extra)
    for name, (path, parallel) in models.items():
        run_cli(state, "models", "import", str(path), "--name", name, "--parallel", str(parallel), "--ctx", "4096",
                env=env)
    return Daemon(state, free_port(), env, root / "daemon.log").start()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


def runners(daemon: Daemon) -> dict[str, dict[str, Any]]:
    status, body = daemon.request("GET", "/v1/garrison/runners", role="read")
    assert status == 200, body
    return {row["model"]: row for row in body["data"]}


def metrics_text(daemon: Daemon) -> str:
    req = urllib.request.Request(daemon.url + "/metrics", headers={"Authorization": f"Bearer {daemon.key('read')}"})
    return str(urllib.request.urlopen(req, timeout=10).read().decode())


class HealthWatch:
    """Polls /health every 20 ms in a thread; records every answer that was not a 200."""

    def __init__(self, daemon: Daemon) -> None:
        self.url = daemon.url + "/health"
        self.failures: list[str] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status != 200:
                        self.failures.append(str(r.status))
            except OSError as exc:
                self.failures.append(repr(exc))
            self.polls += 1
            time.sleep(0.02)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def read_stream(resp: aiohttp.ClientResponse, started: asyncio.Event | None = None) -> tuple[int, str | None]:
    """Tokens received and the error code of an SSE error event (None if the stream ended normally)."""
    tokens = 0
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            return tokens, chunk["error"]["code"]
        tokens += 1
        if started is not None and tokens >= 2:
            started.set()
    return tokens, None


def test_sigsegv_of_a_runner_mid_streams_fails_only_its_requests(tiny_llama_gguf: Path, tmp_path: Path,
                                                                daemons: list[Daemon]) -> None:
    daemon = start_daemon(tmp_path, {"big": (tiny_llama_gguf, 8), "other": (tiny_llama_gguf, 2)})
    daemons.append(daemon)
    headers = {"Authorization": f"Bearer {daemon.key('infer')}"}

    async def scenario() -> dict[str, Any]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            # Load both models first, so the kill lands mid-generation rather than mid-load.
            for model in ("big", "other"):
                async with session.post(daemon.url + "/v1/completions", headers=headers,
                                        json={"model": model, "prompt": "Hi", "max_tokens": 2}) as r:
                    assert r.status == 200
            pid = runners(daemon)["big"]["pid"]
            other_pid = runners(daemon)["other"]["pid"]
            started = [asyncio.Event() for _ in range(6)]

            async def streaming(i: int) -> tuple[int, str | None]:
                async with session.post(daemon.url + "/v1/completions", headers=headers,
                                        json={"model": "big", "stream": True, **LONG}) as r:
                    assert r.status == 200
                    return await read_stream(r, started[i])

            async def whole() -> tuple[int, Any, str | None]:
                async with session.post(daemon.url + "/v1/completions", headers=headers,
                                        json={"model": "big", **LONG}) as r:
                    return r.status, await r.json(), r.headers.get("Retry-After")

            async def other_model() -> list[int]:
                statuses = []
                for _ in range(6):
                    async with session.post(daemon.url + "/v1/completions", headers=headers,
                                            json={"model": "other", "prompt": "Hello", "max_tokens": 40,
                                                  "temperature": 0}) as r:
                        statuses.append(r.status)
                        await r.read()
                    await asyncio.sleep(0.05)
                return statuses

            streams = [asyncio.create_task(streaming(i)) for i in range(6)]
            wholes = [asyncio.create_task(whole()) for _ in range(2)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
            assert runners(daemon)["big"]["in_flight"] == 8
            other = asyncio.create_task(other_model())
            os.kill(pid, signal.SIGSEGV)
            stream_results = await asyncio.gather(*streams)
            whole_results = await asyncio.gather(*wholes)
            other_statuses = await other
            # The next request on the crashed model restarts its runner and succeeds.
            async with session.post(daemon.url + "/v1/completions", headers=headers,
                                    json={"model": "big", "prompt": "Hello", "max_tokens": 8}) as r:
                after = r.status, await r.json()
            return {"pid": pid, "other_pid": other_pid, "streams": stream_results, "wholes": whole_results,
                    "other": other_statuses, "after": after}

    with HealthWatch(daemon) as health:
        result = asyncio.run(scenario())
    assert health.polls > 10 and health.failures == []
    assert all(code == "engine_crashed" and tokens >= 2 for tokens, code in result["streams"]), result["streams"]
    for status, body, retry_after in result["wholes"]:
        assert status == 503 and body["error"]["code"] == "engine_crashed" and retry_after is not None
    assert result["other"] == [200] * 6
    status, body = result["after"]
    assert status == 200 and body["usage"]["completion_tokens"] > 0
    rows = runners(daemon)
    assert rows["big"]["pid"] != result["pid"] and rows["big"]["state"] == "ready"
    assert rows["big"]["last_crash"].startswith("SIGSEGV") and rows["big"]["crashes_total"] == 1
    assert rows["other"]["pid"] == result["other_pid"]  # untouched
    assert 'garrison_runner_crashes_total{how="SIGSEGV",model="big"} 1.0' in metrics_text(daemon)
    assert daemon.log().count("event=runner.crashed ") == 1


def test_a_runner_that_always_crashes_ends_failed_and_others_serve(tiny_llama_gguf: Path, tmp_path: Path,
                                                                   daemons: list[Daemon]) -> None:
    daemon = start_daemon(tmp_path, {"bad": (tiny_llama_gguf, 2), "good": (tiny_llama_gguf, 2)},
                          GARRISON_RUNNER_FAULT="bad:SIGSEGV", GARRISON_RUNNER_MAX_CRASHES="3")
    daemons.append(daemon)
    codes = []
    for _ in range(6):
        status, body = daemon.request("POST", "/v1/completions", {"model": "bad", "prompt": "Hi", "max_tokens": 4},
                                      role="infer")
        assert status == 503
        codes.append(body["error"]["code"])
        if codes[-1] == "model_failed":
            break
        ok, _ = daemon.request("POST", "/v1/completions", {"model": "good", "prompt": "Hi", "max_tokens": 4},
                               role="infer")
        assert ok == 200
    assert codes == ["engine_crashed"] * 3 + ["model_failed"]
    row = runners(daemon)["bad"]
    assert row["state"] == "failed" and "3 times in a row" in row["failed_reason"]
    assert "SIGSEGV" in row["failed_reason"]
    assert runners(daemon)["good"]["state"] == "ready"
    ps = run_cli(daemon.state_dir, "ps", "--key", daemon.key("read"), env=daemon.env).stdout
    assert "failed: its runner crashed 3 times in a row" in ps and "good" in ps
    # `garrison stop` clears the failed state: the model is tried again (and crashes again, here).
    run_cli(daemon.state_dir, "stop", "bad", "--key", daemon.key("admin"), env=daemon.env)
    assert "bad" not in runners(daemon)
    status, body = daemon.request("POST", "/v1/completions", {"model": "bad", "prompt": "Hi", "max_tokens": 4},
                                  role="infer")
    assert status == 503 and body["error"]["code"] == "engine_crashed"
    status, _ = daemon.request("GET", "/health", role=None)
    assert status == 200


def test_unloading_ends_the_runner_and_its_memory(tiny_llama_gguf: Path, tmp_path: Path,
                                                  daemons: list[Daemon]) -> None:
    daemon = start_daemon(tmp_path, {"m": (tiny_llama_gguf, 2)})
    daemons.append(daemon)
    status, _ = daemon.request("POST", "/v1/completions", {"model": "m", "prompt": "Hi", "max_tokens": 4},
                               role="infer")
    assert status == 200
    row = runners(daemon)["m"]
    assert row["memory_bytes"] > 0 and row["backend"] == "llama.cpp" and row["device"] == "cpu"
    pid = row["pid"]
    assert psutil.Process(pid).ppid() == daemon.proc.pid  # type: ignore[union-attr]
    status, body = daemon.request("DELETE", "/v1/garrison/runners/m")
    assert status == 200 and body["stopped"] is True
    stops = [e for e in daemon.request("GET", "/v1/garrison/audit")[1]["data"] if e["action"] == "runners.stop"]
    assert [(e["resource"], e["detail"]) for e in stops] == [("model:m", {"stopped": True, "via": "api"})]
    assert daemon.request("DELETE", "/v1/garrison/runners/m")[0] == 404  # nothing loaded: nothing audited
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert runners(daemon) == {}
    # The daemon itself never loaded llama.cpp or ONNX Runtime.
    maps = Path(f"/proc/{daemon.proc.pid}/maps").read_text()  # type: ignore[union-attr]
    assert "libllama" not in maps and "libggml" not in maps and "onnxruntime" not in maps


def test_quantized_models_answer_with_probed_kernels(quantized: dict[str, Path], tmp_path: Path,
                                                     daemons: list[Daemon]) -> None:
    """cpu_repack = auto: Q8_0 and Q4_K_M answer on any CPU, the repack used only where its probe passed."""
    from garrison.engine.cpu_kernels import RepackVerdicts

    daemon = start_daemon(tmp_path, {"q8": (quantized["q8_0"], 2), "q4km": (quantized["q4_k_m"], 2)})
    daemons.append(daemon)
    for model in ("q8", "q4km"):
        status, body = daemon.request("POST", "/v1/completions",
                                      {"model": model, "prompt": "Hello", "max_tokens": 8, "ignore_eos": True},
                                      role="infer")
        assert status == 200 and body["usage"]["completion_tokens"] == 8, body
    status, ps = daemon.request("GET", "/v1/garrison/runners", role="read")
    kernels = ps["cpu_kernels"]
    verdicts = {v["type"]: v for v in kernels["verdicts"]}
    assert "Q8_0" in verdicts and kernels["cpu_repack"] == "auto"
    rows = {r["model"]: r for r in ps["data"]}
    assert rows["q8"]["extra_bufts"] == verdicts["Q8_0"]["extra_bufts"]
    cache = RepackVerdicts(daemon.state_dir / "cache" / "cpu-kernels.json")
    assert cache.cached("Q8_0") is not None  # probed once, kept for this CPU and build
    assert "event=cpu_kernels.probe " in daemon.log()


def test_forced_repack_on_a_cpu_that_faults_costs_the_model_not_the_daemon(
        quantized: dict[str, Path], tmp_path: Path, daemons: list[Daemon], repack_verdicts: Any) -> None:
    """cpu_repack = on skips the probe. Where the probe finds the repack faults (some AMX machines),
    the runner's crash is what the client and `garrison ps` see, and the daemon stays up; where it
    does not, the model simply answers."""
    faults = not repack_verdicts.verdict("Q8_0").extra_bufts
    daemon = start_daemon(tmp_path, {"q8": (quantized["q8_0"], 2)}, GARRISON_CPU_REPACK="on")
    daemons.append(daemon)
    status, body = daemon.request("POST", "/v1/completions",
                                  {"model": "q8", "prompt": "Hello", "max_tokens": 8, "ignore_eos": True},
                                  role="infer")
    if faults:
        assert status == 503 and body["error"]["code"] == "engine_crashed"
        row = runners(daemon)["q8"]
        assert row["state"] == "restarting" and row["last_crash"]
        assert daemon.request("GET", "/health", role=None)[0] == 200
    else:
        assert status == 200 and runners(daemon)["q8"]["extra_bufts"] is True


def test_the_backend_registry_loads_the_cpu_backend_from_a_variant_library() -> None:
    """One wheel for every CPU: the best CPU variant library is chosen at load, in a fresh process."""
    code = ("from garrison.engine import cpu_kernels as k; import llama_cpp, json; k.load_backends(); "
            "llama_cpp.llama_backend_init(); print(json.dumps({'registry': k.backend_registry(), "
            "'variant': k.loaded_variant(), 'libs': [p.name for p in k.variant_libraries()]}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert "CPU" in info["registry"]
    assert len(info["libs"]) >= 2, "the portable build carries several CPU variants"
    assert f"libggml-cpu-{info['variant']}.so" in info["libs"]


VARIANT_DECODE = r'''
import ctypes, json, sys
from garrison.engine import cpu_kernels as k
from garrison.engine.llama_logits import SequenceScorer
if sys.argv[2] != "best":
    lib = k.llama_lib_dir() / f"libggml-cpu-{sys.argv[2]}.so"
    ggml = k._libggml()
    ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    assert ggml.ggml_backend_load(str(lib).encode()), lib
    k._loaded = True  # this variant, not the best one: an older CPU generation's kernels
with SequenceScorer(__import__("pathlib").Path(sys.argv[1]), n_ctx=64) as s:
    ids = s.tokenize("Once upon a time there was")
    rows = s.logits(ids)
print(json.dumps({"variant": k.loaded_variant(), "argmax": rows.argmax(axis=1).tolist()}))
'''


def test_older_cpu_generations_kernels_from_the_same_build_compute_the_same(tiny_llama_gguf: Path) -> None:
    """What a bundle meets on another machine: the baseline x86-64 and AVX2 variants load and compute
    what the variant this CPU picks computes (next-token argmax at every position)."""
    from garrison.engine.cpu_kernels import variant_libraries

    names = {p.name.removeprefix("libggml-cpu-").removesuffix(".so") for p in variant_libraries()}
    wanted = ["best", *(v for v in ("x64", "sse42", "haswell", "armv8.0_1", "armv8.2_1") if v in names)]
    assert len(wanted) > 1, f"no generic variants in {names}"
    results = {}
    for variant in wanted:
        out = subprocess.run([sys.executable, "-c", VARIANT_DECODE, str(tiny_llama_gguf), variant],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        info = json.loads(out.stdout.strip().splitlines()[-1])
        assert info["variant"] == variant or variant == "best"
        results[variant] = info["argmax"]
    first = results[wanted[0]]
    for variant, argmax in results.items():
        agree = sum(a == b for a, b in zip(first, argmax, strict=True)) / len(first)
        assert agree >= 0.85, (variant, agree)
