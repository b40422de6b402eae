"""`garrison quickstart`: the README's first command, end to end on a scratch state folder.

It runs with the tiny base model and few steps (`--size tiny`), and checks every stage's
result in the state it leaves, not just the exit code.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import free_port, garrison_env, run_cli


def _start(tmp_path: Path, test_model_root: Path, *args: str) -> tuple[subprocess.Popen[str], dict[str, str], int]:
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    if not (cache / "models").exists():
        (cache / "models").symlink_to(test_model_root)  # the session's tiny-model build
    port = free_port()
    env = garrison_env(tmp_path / "state", GARRISON_CACHE_DIR=str(cache), GARRISON_LISTEN=f"127.0.0.1:{port}")
    proc = subprocess.Popen([sys.executable, "-m", "garrison.cli", "quickstart", "--size", "tiny", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, env, port


def _daemon_pid(state: Path) -> int:
    return int(json.loads((state / "daemon.lock").read_text())["pid"])


def _gone(pid: int, within_s: float = 60) -> bool:
    """The process has exited (a zombie nobody reaped counts: it runs nothing)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _read_until(proc: subprocess.Popen[str], marker: str, timeout_s: float = 900) -> str:
    output = ""
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while marker not in output and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        output += line
    return output


def test_quickstart_runs_every_stage_then_serves(tiny_llama_dir: Path, test_model_root: Path,
                                                 tmp_path: Path) -> None:
    proc, _env, port = _start(tmp_path, test_model_root)
    state = tmp_path / "state"
    try:
        output = _read_until(proc, "serving on")
        assert "serving on" in output, output
        for stage in ("1/5", "2/5", "3/5", "4/5", "5/5"):
            assert f"==> {stage}" in output
        assert re.search(r"60 records accepted, 0 refused; redactions: email \d+, payment_card \d+, phone \d+",
                         output), output
        answer = re.search(r"A \((\S+)\): (.*)", output)
        assert answer and answer.group(1) == "garrison-tiny-ft-quickstart-merged:q4_k_m"
        key = re.search(r"admin key \(shown once\): (grs_\S+)", output)
        assert key and "curl -s" in output and "from openai import OpenAI" in output
        with sqlite3.connect(state / "catalog.db") as db:
            models = {n: json.loads(m) for n, m in db.execute("SELECT name, manifest FROM models")}
            jobs = dict(db.execute("SELECT kind, state FROM jobs"))
        assert jobs == {"build-default-model": "succeeded", "finetune": "succeeded"}
        for name in ("garrison-tiny-ft-quickstart-merged:q4_k_m", "garrison-tiny-ft-quickstart-merged:onnx-int8"):
            assert models[name]["parity"]["passed"] and models[name]["signature"]
        assert models["garrison-tiny-ft-quickstart:lora"]["format"] == "lora"
        # The sample's card numbers and e-mail addresses never reach the state folder in clear.
        sample = (Path(__file__).parent.parent / "garrison" / "data" / "support_sample.jsonl").read_text()
        card = re.search(r"full number (\d{16})", sample)
        assert card
        for path in state.rglob("*"):
            if path.is_file():
                assert card.group(1).encode() not in path.read_bytes(), path
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models",
                                     headers={"Authorization": f"Bearer {key.group(1)}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            served = {m["id"] for m in json.loads(resp.read())["data"]}
        assert "garrison-tiny-ft-quickstart-merged:q4_k_m" in served
        # SIGTERM (a supervisor, a CI timeout) stops quickstart and the daemon it started: no orphan serves on.
        daemon_pid = _daemon_pid(state)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert _gone(daemon_pid, within_s=0), f"quickstart left its daemon (pid {daemon_pid}) running"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)


def test_a_warm_quickstart_reuses_the_results_and_revokes_the_old_key(tiny_llama_dir: Path, test_model_root: Path,
                                                                      tmp_path: Path) -> None:
    keys = []
    for _ in range(2):
        proc, env, _port = _start(tmp_path, test_model_root, "--no-serve")
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out
        found = re.search(r"admin key \(shown once\): (grs_\S+)", out)
        assert found
        keys.append(found.group(1))
    assert "already done for this dataset (reusing it)" in out and "(ingested by an earlier run)" in out
    listed = json.loads(run_cli(tmp_path / "state", "keys", "list", "--json", env=env).stdout)
    assert sorted(k["status"] for k in listed if k["name"] == "quickstart") == ["active", "revoked"]
    # Even killed outright (no handler runs), quickstart takes its daemon along (parent-death signal).
    proc, _env, _port = _start(tmp_path, test_model_root)
    try:
        output = _read_until(proc, "serving on", timeout_s=300)
        assert "serving on" in output, output
        daemon_pid = _daemon_pid(tmp_path / "state")
        proc.kill()
        proc.wait(timeout=10)
        assert _gone(daemon_pid), f"the killed quickstart's daemon (pid {daemon_pid}) still runs"
    finally:
        if proc.poll() is None:
            proc.kill()
