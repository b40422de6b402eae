"""Refusals that name their cause: an incomplete tokenizer at export, a parity-failed artifact when served or
used as an adapter's base. Each answer carries the cause (the missing file, the gate's report), not advice
that fails again ("export it first")."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from conftest import Daemon, free_port, garrison_env, run_cli


@pytest.fixture(scope="module")
def daemon(tiny_prefixed_llama_dir: Path, tiny_real_dir: Callable[[str], Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("refusals")
    state = root / "state"
    env = garrison_env(state)
    llama2 = tiny_real_dir("llama2")
    assert not (llama2 / "tokenizer.model").exists() and (llama2 / "tokenizer.json").exists()
    run_cli(state, "models", "import", str(llama2), "--name", "llama2", env=env)
    run_cli(state, "models", "import", str(tiny_prefixed_llama_dir), "--name", "prefixed", env=env)
    d = Daemon(state, free_port(), env, root / "daemon.log").start()
    yield d
    d.stop()


def test_a_sentencepiece_folder_without_tokenizer_model_is_refused_at_export_naming_the_file(daemon: Daemon) -> None:
    status, body = daemon.request("POST", "/v1/garrison/jobs",
                                  {"kind": "export", "params": {"model": "llama2", "to": "gguf:f16"}})
    assert status == 422, body
    assert body["error"]["code"] == "tokenizer_incomplete"
    assert "`tokenizer.model` is missing" in body["error"]["message"]
    # a LoRA fine-tune would need that export to serve its adapter: refused at submission the same way
    status, body = daemon.request("POST", "/v1/garrison/jobs", {"kind": "finetune", "params": {
        "model": "llama2", "training_file": "none"}})
    assert status == 422 and body["error"]["code"] == "tokenizer_incomplete", body
    # ONNX export reads tokenizer.json itself: not refused for this reason
    status, body = daemon.request("POST", "/v1/garrison/jobs",
                                  {"kind": "export", "params": {"model": "llama2", "to": "onnx:fp32"}})
    assert status == 201, body
    daemon.request("POST", f"/v1/garrison/jobs/{body['id']}/cancel")


def test_a_parity_failed_artifact_answers_with_its_parity_report(daemon: Daemon) -> None:
    status, job = daemon.request("POST", "/v1/garrison/jobs",
                                 {"kind": "export", "params": {"model": "prefixed", "to": "gguf:f16"}})
    assert status == 201, job
    status, done = daemon.request("GET", f"/v1/garrison/jobs/{job['id']}?wait=280", timeout=300)
    assert done["state"] == "failed" and done["error"]["code"] == "tokenizer_mismatch", done
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key=daemon.key("admin"), max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="prefixed:f16", messages=[{"role": "user", "content": "Hi"}])
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "model_failed_parity", error
    assert "failed its parity gate" in error["message"] and "tokenizer_mismatch" in error["message"]
    assert "served prompt's token ids differ" in error["message"] and "export it" not in error["message"]
    # basing an adapter on it: refused at submission with the same report, not "run garrison export first"
    status, body = daemon.request("POST", "/v1/garrison/jobs", {"kind": "finetune", "params": {
        "model": "prefixed", "training_file": "none"}})
    assert status == 400 and body["error"]["code"] == "base_parity_failed", body
    assert "prefixed:f16: tokenizer_mismatch" in body["error"]["message"]
