"""Every route of /openapi.json fuzzed by schemathesis against a real daemon serving a real model:
no 5xx, no crash, and the daemon healthy afterwards.

The fuzzer runs as `st run` in a subprocess (its own event loop and threads, as a client would),
with a key of its own and a time budget that keeps this test near two minutes on two cores.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, free_port, garrison_env, run_cli

ST = Path(sys.executable).with_name("st")
pytestmark = pytest.mark.skipif(not ST.exists() and shutil.which("st") is None,
                                reason="schemathesis is in the dev extra (./install.sh installs it)")

BUDGET_S = 90  # the whole fuzz run: examples, coverage, fuzzing and stateful phases

# Left out, each with its reason; everything else is fuzzed, DELETEs included.
EXCLUDED = {
    ("DELETE", "/v1/garrison/keys/{key_id}"): "the stateful phase finds key ids in GET /v1/garrison/keys and "
                                              "would revoke the fuzzer's own key",
    ("DELETE", "/v1/garrison/models/{name}"): "would delete the model the inference routes are fuzzed against",
    ("POST", "/v1/garrison/models"): "an admin import reads any host path it is given (/dev/zero, /proc): "
                                     "administration of this machine, not input to harden",
}


@pytest.fixture(scope="module")
def served(tiny_llama_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("fuzz")
    state = root / "state"
    env = garrison_env(state, GARRISON_RUN_JOBS="false")  # jobs the fuzzer queues stay queued
    run_cli(state, "models", "import", str(tiny_llama_gguf), "--name", "tiny", "--parallel", "2", "--ctx", "256",
            env=env)
    daemon = Daemon(state, free_port(), env, root / "daemon.log").start()
    yield daemon
    daemon.stop()


def _schema_for_the_fuzz(spec: dict[str, Any]) -> dict[str, Any]:
    """The daemon's document with the served model as the only valid `model` of the inference bodies,
    so that valid cases reach the engine (a random name is a 404 before any work)."""
    for path, ops in list(spec["paths"].items()):
        for method in list(ops):
            if (method.upper(), path) in EXCLUDED:
                del ops[method]
        if not ops:
            del spec["paths"][path]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        body["properties"]["model"] = {"type": "string", "enum": ["tiny"]}
    return spec


def test_schemathesis_finds_no_server_error(served: Daemon, tmp_path: Path) -> None:
    key = served.key("admin")  # the fuzzer's own key (the fixture's CLI-made admin key)
    status, spec = served.request("GET", "/openapi.json", key=key)
    assert status == 200
    schema = tmp_path / "openapi.json"
    schema.write_text(json.dumps(_schema_for_the_fuzz(spec)))
    proc = subprocess.run(
        [str(ST) if ST.exists() else "st", "run", str(schema), "--url", served.url,
         "-H", f"Authorization: Bearer {key}", "--checks", "not_a_server_error", "--max-examples", "30",
         "--max-time", str(BUDGET_S), "--workers", "1", "--request-timeout", "30", "--no-color",
         "--generation-database", "none", "--suppress-health-check", "all", "--max-failures", "20"],
        capture_output=True, text=True, timeout=BUDGET_S + 120, cwd=tmp_path)
    failures = proc.stdout.partition("= FAILURES =")[2].partition("= WARNINGS =")[0]
    report = (failures or proc.stdout)[:12000] + proc.stderr[-2000:]
    assert "Server error" not in proc.stdout, report
    assert proc.returncode == 0, report
    assert served.proc is not None and served.proc.poll() is None, "the daemon died"
    assert served.request("GET", "/health", role=None)[0] == 200
    assert served.request("GET", "/v1/models", key=key)[0] == 200
    log = served.log()
    assert "http.unhandled_error" not in log and "Traceback" not in log, log[-4000:]
