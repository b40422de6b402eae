"""`garrison quickstart`: the main job end to end on the embedded default, offline, on a CPU.

Stages, each a real operation of the appliance (the same code the API and the other
commands use): build the default base model; seal the shipped sample support dataset to
the appliance's own recipient and ingest it (redaction report); fine-tune a LoRA on it and
export the merged model to GGUF Q4_K_M and ONNX int8 through the parity gate; serve the
result and ask it a question from the dataset through the OpenAI-compatible API. A warm
run reuses what is already there (same dataset bytes, same fine-tune) and takes seconds.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import click

from garrison.config import Config
from garrison.errors import Unavailable
from garrison.store.catalog import Catalog

SAMPLE = "support_sample.jsonl"
DATASET = "support-sample"
SUFFIX = "quickstart"
_PR_SET_PDEATHSIG = 1


@dataclass
class Stages:
    """Prints each stage with its duration, so the operator sees where the time goes."""

    timings: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        click.echo(f"==> {name}", err=True)
        started = time.monotonic()
        value = fn()
        self.timings[name] = round(time.monotonic() - started, 1)
        click.echo(f"    done in {self.timings[name]:.1f} s", err=True)
        return value


def sample_records() -> list[dict[str, Any]]:
    text = resources.files("garrison.data").joinpath(SAMPLE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def seal_and_ingest(config: Config, catalog: Catalog) -> dict[str, Any]:
    """The data producer's side (age, to the appliance's recipient), then the appliance's ingestion."""
    from garrison.crypto.age import encrypt_stream
    from garrison.errors import NotFound
    from garrison.ingest.datasets import DatasetStore
    from garrison.ingest.pipeline import IngestRequest, IngestService

    service = IngestService(config, catalog)
    plain = resources.files("garrison.data").joinpath(SAMPLE).read_bytes()
    try:  # sealing is randomized, so "the same delivery" is judged by the dataset, not the sealed bytes
        existing = DatasetStore(catalog).version(DATASET)
    except NotFound:
        existing = None
    if existing is not None:
        report = existing.report
        version, duplicate = existing.version, True
    else:
        sealed = io.BytesIO()
        encrypt_stream(io.BytesIO(plain), sealed, [service.identity().recipient])
        sealed.seek(0)
        result = service.ingest(sealed, IngestRequest(dataset=DATASET, source="cli", source_name=f"{SAMPLE}.age",
                                                      format="chat", sealed=True, actor="quickstart"))
        report, version, duplicate = result.report, result.version.version, result.duplicate
    redactions = ", ".join(f"{k} {v}" for k, v in sorted(report.get("redactions", {}).items())) or "none"
    recipient = service.identity().recipient
    click.echo(f"    sealed {len(plain)} bytes of sample support chats to the appliance ({recipient[:16]}...); "
               f"{report['records_accepted']} records accepted, {report['records_refused_count']} refused; "
               f"redactions: {redactions}{' (ingested by an earlier run)' if duplicate else ''}", err=True)
    return {"dataset": f"{DATASET}:{version}", "report": report, "duplicate": duplicate}


def _http(url: str, key: str, body: dict[str, Any] | None = None, timeout: float = 120) -> Any:
    """Loopback only: `url` is the daemon this command started (config.base_url); the network guard refuses more."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Authorization": f"Bearer {key}",
                                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def stop_on_sigterm() -> None:
    """SIGTERM (kill, a CI timeout, a supervisor) ends quickstart as Ctrl-C does: the job it follows
    keeps its checkpoint and the daemon it started is stopped with it, never left behind."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _die_with(parent: int) -> Callable[[], None]:
    """For the child, between fork and exec: SIGTERM (a graceful drain) when quickstart dies, even by
    SIGKILL, which no handler of ours sees. libc is looked up here, in the parent: the child only calls."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def prepare() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # quickstart died before prctl took effect
            os._exit(0)
    return prepare


def start_daemon(config: Config, log: Path) -> subprocess.Popen[bytes]:
    """The daemon in a child process: the question goes through real HTTP, like any client's."""
    env = {**os.environ, "GARRISON_STATE_DIR": str(config.state_path), "GARRISON_LISTEN": config.listen}
    handle = log.open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "garrison.cli", "serve"], env=env, stdout=handle, stderr=handle,
                            preexec_fn=_die_with(os.getpid()))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Unavailable(f"the daemon exited {proc.returncode}; see {log}", code="daemon_failed")
        try:
            with urllib.request.urlopen(f"{config.base_url}/health", timeout=1):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise Unavailable(f"the daemon did not answer within 60 s; see {log}", code="daemon_failed")


def stop_daemon(proc: subprocess.Popen[bytes]) -> int:
    """Stop the daemon this command started (it drains: SIGTERM) and wait for it."""
    if proc.poll() is None:
        proc.terminate()
    return proc.wait(timeout=60)


def ask(config: Config, key: str, model: str, question: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 48,
            "temperature": 0}
    try:
        out = _http(f"{config.base_url}/v1/chat/completions", key, body)
    except urllib.error.HTTPError as err:
        raise Unavailable(f"the daemon refused the question: {err.read().decode()[:300]}",
                          code="quickstart_ask_failed") from None
    return str(out["choices"][0]["message"]["content"])


def snippets(config: Config, key: str, model: str) -> str:
    url = config.base_url
    return f"""
Try it:
  export GARRISON_KEY={key}
  curl -s {url}/v1/chat/completions -H "Authorization: Bearer $GARRISON_KEY" \\
       -H 'Content-Type: application/json' \\
       -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Where is my order?"}}]}}'

  python - <<'EOF'
  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="{key}")
  out = client.chat.completions.create(model="{model}",
                                       messages=[{{"role": "user", "content": "Where is my order?"}}])
  print(out.choices[0].message.content)
  EOF

  garrison chat {model}
"""
