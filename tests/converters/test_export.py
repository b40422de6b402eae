"""Exports end to end: every GGUF type and ONNX int8 pass the parity gate, are signed, and are served."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import Daemon, free_port, garrison_env, run_cli

GGUF_TYPES = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "iq4_xs")


def _manifests(state: Path) -> dict[str, dict[str, Any]]:
    with sqlite3.connect(state / "catalog.db") as db:
        return {name: json.loads(manifest) for name, manifest in db.execute("SELECT name, manifest FROM models")}


@pytest.fixture(scope="module")
def exported(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("export")
    state = root / "state"
    env = garrison_env(state)
    run_cli(state, "models", "import", str(tiny_llama_dir), "--name", "tl", env=env)
    targets = ",".join(f"gguf:{t}" for t in GGUF_TYPES) + ",onnx:int8"
    out = run_cli(state, "export", "tl", "--to", targets, "--json", env=env, timeout=900)
    job = json.loads(out.stdout)
    assert job["state"] == "succeeded", job
    daemon = Daemon(state, free_port(), env, root / "daemon.log").start()
    yield daemon
    daemon.stop()


def test_every_artifact_passes_parity_and_is_signed(exported: Daemon) -> None:
    manifests = _manifests(exported.state_dir)
    expected = {f"tl:{t}" for t in GGUF_TYPES} | {"tl:onnx-int8", "tl:onnx-fp32"} - {"tl:onnx-fp32"}
    assert expected <= set(manifests)
    for name in expected:
        m = manifests[name]
        assert m["parity"]["passed"], (name, m["parity"])
        assert m["parity"]["tokenizer_match"] and m["parity"]["top1_agreement"] >= m["parity"]["threshold"]["min_top1"]
        assert m["lineage"]["source"] == "tl" and m["lineage"]["job"].startswith("job_")
        assert m["lineage"]["versions"]["llama-cpp-python"] == "0.3.36"
        assert m["signature"] and m["signed_by"]


def test_every_artifact_is_served(exported: Daemon) -> None:
    client = openai.OpenAI(base_url=exported.url + "/v1", api_key=exported.key("infer"), max_retries=0)
    listed = {m.id for m in client.models.list().data}
    for t in (*GGUF_TYPES, "onnx-int8"):
        model = f"tl:{t}"
        assert model in listed
        out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}],
                                             max_tokens=12, temperature=0)
        assert out.choices[0].message.content, model


def test_a_flipped_byte_or_forged_manifest_is_refused(exported: Daemon) -> None:
    client = openai.OpenAI(base_url=exported.url + "/v1", api_key=exported.key("infer"), max_retries=0)
    state = exported.state_dir
    q4 = next(p for p in (state / "models").iterdir() if p.name.startswith("tl--q4_0-"))
    gguf = next(q4.glob("*.gguf"))
    data = bytearray(gguf.read_bytes())
    data[len(data) // 3] ^= 0x10
    exported.stop()  # artifacts are checked when loaded: start afresh so nothing is in memory
    gguf.write_bytes(bytes(data))
    exported.start()
    with pytest.raises(openai.InternalServerError) as flipped:
        client.chat.completions.create(model="tl:q4_0", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert flipped.value.code == "artifact_hash_mismatch"
    # Marking a failed artifact as passed (or any manifest edit) breaks the appliance's signature.
    with sqlite3.connect(state / "catalog.db") as db:
        manifest = json.loads(db.execute("SELECT manifest FROM models WHERE name='tl:iq4_xs'").fetchone()[0])
        manifest["parity"]["top1_agreement"] = 1.0
        db.execute("UPDATE models SET manifest=? WHERE name='tl:iq4_xs'", (json.dumps(manifest),))
    with pytest.raises(openai.InternalServerError) as forged:
        client.chat.completions.create(model="tl:iq4_xs", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert forged.value.code == "signature_invalid"


def test_unknown_bpe_tokenizer_fails_the_job_with_a_clear_reason(tiny_bpe_llama_dir: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = garrison_env(state)
    run_cli(state, "models", "import", str(tiny_bpe_llama_dir), "--name", "bpe", env=env)
    out = run_cli(state, "export", "bpe", "--to", "gguf:q8_0", "--json", env=env, check=False)
    assert out.returncode == 9
    job = json.loads(out.stdout)
    assert job["state"] == "failed" and job["error"]["code"] == "unsupported_tokenizer"
    assert "pre-tokenizer" in job["error"]["message"]
    assert set(_manifests(state)) == {"bpe"}
    bad = run_cli(state, "export", "bpe", "--to", "gguf:q9_9", env=env, check=False)
    assert bad.returncode == 2 and "unknown_export_target" in bad.stderr


def test_kill_9_of_a_conversion_worker_leaves_nothing_listed(tiny_llama_dir: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = garrison_env(state)
    run_cli(state, "models", "import", str(tiny_llama_dir), "--name", "tl", env=env)
    daemon = Daemon(state, free_port(), env, tmp_path / "daemon.log").start()
    try:
        status, job = daemon.request("POST", "/v1/garrison/exports",
                                     {"model": "tl", "to": ["gguf:f16", "gguf:q8_0", "onnx:int8"]}, role="operator")
        assert status == 202, job
        deadline = time.monotonic() + 120
        pid = None
        while time.monotonic() < deadline:
            with sqlite3.connect(state / "catalog.db") as db:
                row = db.execute("SELECT worker_pid, progress_message FROM jobs WHERE id=?", (job["id"],)).fetchone()
            if row and row[0] and "q8_0" in (row[1] or ""):
                pid = row[0]
                break
            time.sleep(0.02)
        assert pid, "the export never reached its second target"
        os.kill(pid, signal.SIGKILL)
        listed = set(_manifests(state))
        assert "tl:q8_0" not in listed and "tl:onnx-int8" not in listed
        status, final = daemon.request("GET", f"/v1/garrison/jobs/{job['id']}?wait=180", timeout=200)
        assert final["state"] == "succeeded", final
        assert final["attempts"] == 2
        assert {"tl:f16", "tl:q8_0", "tl:onnx-int8"} <= set(_manifests(state))
    finally:
        daemon.stop()


def test_peft_adapter_to_gguf_lora_and_merged_model(tiny_llama_dir: Path, tiny_lora_dir: Path,
                                                    tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = garrison_env(state)
    run_cli(state, "models", "import", str(tiny_llama_dir), "--name", "tl", env=env)
    missing = run_cli(state, "models", "import", str(tiny_lora_dir), "--name", "caps", env=env, check=False)
    assert missing.returncode == 2 and "adapter_needs_base" in missing.stderr
    run_cli(state, "models", "import", str(tiny_lora_dir), "--name", "caps", "--base", "tl", env=env)
    early = json.loads(run_cli(state, "export", "caps", "--to", "gguf:lora", "--json", env=env, check=False).stdout)
    assert early["error"]["code"] == "adapter_base_missing"
    run_cli(state, "export", "tl", "--to", "gguf:f16", env=env, timeout=600)
    job = json.loads(run_cli(state, "export", "caps", "--to", "gguf:lora,hf:merged", "--json", env=env,
                             timeout=600).stdout)
    assert job["state"] == "succeeded", job
    manifests = _manifests(state)
    assert manifests["caps:lora"]["parity"]["passed"] and manifests["caps:merged"]["format"] == "hf"
    merged_export = json.loads(run_cli(state, "export", "caps:merged", "--to", "gguf:f16", "--json", env=env,
                                       timeout=600).stdout)
    assert merged_export["state"] == "succeeded", merged_export
    daemon = Daemon(state, free_port(), env, tmp_path / "daemon.log").start()
    try:
        client = openai.OpenAI(base_url=daemon.url + "/v1", api_key=daemon.key("infer"), max_retries=0)

        def first_token(model: str) -> dict[str, float]:
            """The next-token distribution after the prompt (top 10, as logprobs): what the adapter decides,
            before greedy decoding can compound a near-tie into different text."""
            out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}],
                                                 max_tokens=1, temperature=0, logprobs=True, top_logprobs=10)
            assert out.choices[0].logprobs and out.choices[0].logprobs.content
            return {t.token: t.logprob for t in out.choices[0].logprobs.content[0].top_logprobs}

        base, adapted, merged = first_token("tl:f16"), first_token("caps:lora"), first_token("caps-merged:f16")
        top = max(adapted, key=lambda t: adapted[t])
        moved = max(abs(adapted[t] - base[t]) for t in set(adapted) & set(base))
        assert top != max(base, key=lambda t: base[t]) or moved > 0.5, "the adapter must change the distribution"
        # The merged model (weights W + BA, stored in F16) computes what base + runtime LoRA (F16 activations)
        # computes, up to F16 rounding: the same most likely token, each shared top token's logprob within
        # 0.05 nats. Not generated text: a near-tie at any later step would make equal models look different.
        assert max(merged, key=lambda t: merged[t]) == top, (merged, adapted)
        shared = set(adapted) & set(merged)
        assert len(shared) >= 5
        assert all(abs(adapted[t] - merged[t]) < 0.05 for t in shared), {t: (adapted[t], merged[t]) for t in shared}
    finally:
        daemon.stop()
