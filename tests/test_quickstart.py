"""`garrison quickstart`: the README's first command, end to end on a scratch state folder."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import free_port, garrison_env


def test_quickstart_builds_the_default_model_and_serves(tiny_llama_gguf: Path, test_model_root: Path,
                                                         tmp_path: Path) -> None:
    # Reuse the session's tiny-model build: quickstart builds into $GARRISON_CACHE_DIR/models.
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(test_model_root)
    port = free_port()
    env = garrison_env(tmp_path / "state", GARRISON_CACHE_DIR=str(cache), GARRISON_LISTEN=f"127.0.0.1:{port}",
                       HOME=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "garrison.cli", "quickstart"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output = ""
        deadline = time.monotonic() + 300
        assert proc.stdout is not None
        while "serving on" not in output and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            output += line
        assert "serving on" in output, output
        key = re.search(r"admin key \(shown once\): (grs_\S+)", output)
        assert key, output
        assert "llama.cpp says:" in output
        assert (tmp_path / "state" / "models" / "garrison-tiny.f16.gguf").exists()
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        req = urllib.request.Request(url + "/v1/garrison/jobs", headers={"Authorization": f"Bearer {key.group(1)}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            jobs = json.loads(resp.read())
        kinds = {j["kind"]: j["state"] for j in jobs["data"]}
        assert kinds == {"build-default-model": "succeeded", "selftest": "succeeded"}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_quickstart_again_revokes_the_old_key_and_reuses_the_build(tiny_llama_gguf: Path, test_model_root: Path,
                                                                    tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(test_model_root)
    env = garrison_env(tmp_path / "state", GARRISON_CACHE_DIR=str(cache), HOME=str(tmp_path))
    keys = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "garrison.cli", "quickstart", "--no-serve"], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        found = re.search(r"admin key \(shown once\): (grs_\S+)", proc.stdout)
        assert found
        keys.append(found.group(1))
    listed = subprocess.run([sys.executable, "-m", "garrison.cli", "keys", "list", "--json"], env=env,
                            capture_output=True, text=True, check=True)
    states = sorted(k["status"] for k in json.loads(listed.stdout) if k["name"] == "quickstart")
    assert states == ["active", "revoked"]
