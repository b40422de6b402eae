"""Ollama's API (/api/*), driven by the official `ollama` Python client against a real daemon.

One daemon for the module: the tiny Llama as GGUF (and a LoRA on it), a tiny BERT exported to ONNX
for embeddings, keys made before the start so the policy file can limit two of them. The same
generation path as the OpenAI routes: greedy answers agree across the two faces.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ollama
import openai
import pytest
from conftest import Daemon, free_port, garrison_env, run_cli

CHAT = [{"role": "user", "content": "What is Garrison?"}]
GREEDY = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 24}
LIMITED = {"requests": "requests_per_minute = 2", "tokens": "tokens_per_minute = 30"}
CARD = "4111 1111 1111 1111"
PRIVACY = '[inference_privacy.prompts]\npayment_card = "deny"\n'  # responses unscreened: streams stay per token


@dataclass
class Served:
    daemon: Daemon
    keys: dict[str, str]  # name -> secret
    ids: dict[str, str]  # name -> key id


@pytest.fixture(scope="module")
def served(tiny_llama_gguf: Path, tiny_lora_gguf: Path, tiny_bert_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from garrison.converters.hf_to_onnx import export_hf_to_onnx

    root = tmp_path_factory.mktemp("ollama")
    state = root / "state"
    policy = root / "policy.toml"
    env = garrison_env(state, GARRISON_MODEL_KEEP_ALIVE_S="0", GARRISON_POLICY_FILE=str(policy))
    bert = export_hf_to_onnx(tiny_bert_dir, root / "bert-onnx").path
    run_cli(state, "models", "import", str(tiny_llama_gguf), "--name", "tiny", "--parallel", "4", "--ctx", "512",
            env=env)
    run_cli(state, "models", "import", str(tiny_llama_gguf), "--name", "solo", "--parallel", "1", "--ctx", "512",
            env=env)
    run_cli(state, "models", "import", str(tiny_lora_gguf), "--name", "tiny-caps", "--base", "tiny", env=env)
    run_cli(state, "models", "import", str(bert), "--name", "embed", env=env)
    keys, ids, lines = {}, {}, []
    for name, limit in LIMITED.items():
        made = json.loads(run_cli(state, "keys", "create", "--role", "infer", "--name", name, "--json",
                                  env=env).stdout)
        keys[name], ids[name] = made["key"], made["id"]
        lines += [f"[rate_limits.keys.{made['id']}]", limit]
    policy.write_text(PRIVACY + "\n".join(lines) + "\n")
    daemon = Daemon(state, free_port(), env, root / "daemon.log").start()
    yield Served(daemon, keys, ids)
    daemon.stop()


def client(served: Served, key: str | None = None) -> ollama.Client:
    secret = key or served.daemon.key("infer")
    return ollama.Client(host=served.daemon.url, headers={"Authorization": f"Bearer {secret}"}, timeout=120)


def test_chat_streamed_token_by_token_agrees_with_the_whole_answer(served: Served) -> None:
    c = client(served)
    full = c.chat(model="tiny", messages=CHAT, options=GREEDY)
    assert full.done and full.done_reason in ("stop", "length")
    assert full.message.role == "assistant" and full.message.content
    assert full.prompt_eval_count and full.prompt_eval_count > 0
    assert full.eval_count and full.eval_count > 0
    assert full.total_duration and full.eval_duration and full.prompt_eval_duration is not None
    assert full.total_duration >= full.eval_duration  # nanoseconds, as Ollama gives them
    chunks = list(c.chat(model="tiny", messages=CHAT, options=GREEDY, stream=True))
    assert [chunk.done for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    pieces = [chunk.message.content or "" for chunk in chunks]
    assert "".join(pieces) == full.message.content
    assert len([p for p in pieces if p]) > 1  # a piece per token, not one blob
    last = chunks[-1]
    assert last.eval_count == full.eval_count and last.prompt_eval_count == full.prompt_eval_count
    assert last.done_reason == full.done_reason and last.message.content == ""


def test_greedy_answers_agree_with_the_openai_route(served: Served) -> None:
    ours = client(served).chat(model="tiny", messages=CHAT, options=GREEDY)
    theirs = openai.OpenAI(base_url=served.daemon.url + "/v1", api_key=served.daemon.key("infer"), max_retries=0) \
        .chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    assert ours.message.content == theirs.choices[0].message.content
    assert ours.eval_count == theirs.usage.completion_tokens  # type: ignore[union-attr]
    # /api/generate renders its prompt (and system) through the same chat template.
    generated = client(served).generate(model="tiny", prompt=CHAT[0]["content"], options=GREEDY)
    assert generated.response == ours.message.content and generated.done


def test_generate_streams_raw_and_lora_models(served: Served) -> None:
    c = client(served)
    parts = list(c.generate(model="tiny", prompt="The vault", raw=True, options={**GREEDY, "num_predict": 8},
                            stream=True))
    assert parts[-1].done and parts[-1].eval_count == 8 and parts[-1].done_reason == "length"
    assert "".join(p.response for p in parts[:-1])
    caps = c.generate(model="tiny-caps:latest", prompt="hello", options=GREEDY)  # NAME:latest is NAME
    assert caps.response and caps.model == "tiny-caps"
    stopped = c.generate(model="tiny", prompt="The vault", raw=True, options={**GREEDY, "num_predict": 48,
                                                                             "stop": ["e"]})
    assert "e" not in stopped.response and stopped.done_reason == "stop"


def test_format_json_schema_is_enforced(served: Served) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                               "capital": {"type": "boolean"}},
              "required": ["city", "capital"], "additionalProperties": False}
    out = client(served).chat(model="tiny", messages=CHAT, format=schema, options={**GREEDY, "num_predict": 120})
    data = json.loads(out.message.content or "")
    assert set(data) == {"city", "capital"} and data["city"] in ("Paris", "Rome")


def test_embed_agrees_with_the_openai_route(served: Served) -> None:
    c = client(served)
    out = c.embed(model="embed", input=["the vault is sealed", "a second text"])
    assert len(out.embeddings) == 2 and out.prompt_eval_count and out.prompt_eval_count > 0
    theirs = openai.OpenAI(base_url=served.daemon.url + "/v1", api_key=served.daemon.key("infer"),
                           max_retries=0).embeddings.create(model="embed", input=["the vault is sealed",
                                                                                  "a second text"])
    assert np.allclose(out.embeddings, [d.embedding for d in theirs.data], atol=1e-6)
    one = c.embed(model="embed", input="the vault is sealed")
    assert np.allclose(one.embeddings[0], out.embeddings[0], atol=1e-6)
    legacy = c.embeddings(model="embed", prompt="the vault is sealed")
    assert np.allclose(legacy.embedding, out.embeddings[0], atol=1e-6)
    with pytest.raises(ollama.ResponseError) as wrong:
        c.embed(model="tiny", input="x")
    assert wrong.value.status_code == 400 and "embeddings" in wrong.value.error


def test_list_show_ps_and_version(served: Served) -> None:
    c = client(served)
    models = {m.model: m for m in c.list().models}
    assert {"tiny", "solo", "tiny-caps", "embed"} <= set(models)
    tiny = models["tiny"]
    assert tiny.details and tiny.details.format == "gguf" and tiny.details.family == "llama"
    assert tiny.size and tiny.size > 0 and tiny.digest and len(tiny.digest) == 64 and tiny.modified_at
    assert models["tiny-caps"].details.parent_model == "tiny"  # type: ignore[union-attr]
    shown = c.show("tiny")
    assert shown.template and "message" in shown.template  # the model's own chat template
    assert shown.details and shown.details.quantization_level == "F16"
    assert shown.modelinfo and shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.context_length"] == 512 and shown.capabilities == ["completion"]
    # Reading GGUF headers brought no tokenizer library (native code) into the daemon.
    assert served.daemon.request("GET", "/v1/garrison/system")[1]["heavy_modules_loaded"] == []
    c.chat(model="tiny", messages=CHAT, options={"num_predict": 1})
    running = {m.model: m for m in c.ps().models}
    assert "tiny" in running and running["tiny"].size == tiny.size and running["tiny"].expires_at
    assert running["tiny"].context_length == 512
    status, version = served.daemon.request("GET", "/api/version", role="infer")
    assert status == 200 and re.fullmatch(r"\d+\.\d+\.\d+", version["version"])
    # An empty conversation loads the model, as in Ollama.
    loaded = c.chat(model="solo", messages=[])
    assert loaded.done and loaded.done_reason == "load"


def test_keys_and_grants_apply_with_ollamas_error_shape(served: Served) -> None:
    daemon = served.daemon
    only_solo = run_cli(daemon.state_dir, "keys", "create", "--role", "infer", "--models", "solo",
                        env=daemon.env).stdout.strip()
    c = client(served, only_solo)
    assert [m.model for m in c.list().models] == ["solo"]
    with pytest.raises(ollama.ResponseError) as denied:
        c.chat(model="tiny", messages=CHAT)
    assert denied.value.status_code == 403 and "grant" in denied.value.error
    with pytest.raises(ollama.ResponseError) as shown:
        c.show("tiny")
    assert shown.value.status_code == 403
    status, body = daemon.request("POST", "/api/chat", {"model": "tiny", "messages": CHAT}, role=None)
    assert status == 401 and isinstance(body["error"], str) and body["code"] == "missing_api_key"
    status, body = daemon.request("POST", "/api/chat", {"model": "tiny", "messages": CHAT}, role="read")
    assert status == 403 and body["code"] == "insufficient_scope"
    status, body = daemon.request("POST", "/api/chat", {"model": "nope", "messages": CHAT}, role="infer")
    assert status == 404 and "nope" in body["error"]
    status, body = daemon.request("POST", "/api/nothing", {}, role="infer")
    assert status == 404 and body["code"] == "not_found"


def test_request_fields_are_checked(served: Served) -> None:
    daemon = served.daemon
    status, body = daemon.request("POST", "/api/chat", {"model": "tiny", "messages": CHAT, "stream": False,
                                                        "optoins": {}}, role="infer")
    assert status == 400 and body["code"] == "unknown_parameter" and "optoins" in body["error"]
    status, body = daemon.request("POST", "/api/generate", {"model": "tiny", "prompt": "x", "stream": False,
                                                            "options": {"num_predikt": 3}}, role="infer")
    assert status == 400 and "num_predikt" in body["error"]
    status, body = daemon.request("POST", "/api/generate", {"model": "tiny", "prompt": "x", "stream": False,
                                                            "options": {"temperature": 9}}, role="infer")
    assert status == 400 and "options.temperature" in body["error"]
    status, body = daemon.request("POST", "/api/generate", {"model": "tiny", "prompt": "x", "stream": False,
                                                            "options": {"mirostat": 2}}, role="infer")
    assert status == 400 and body["code"] == "unsupported_parameter"
    # Load-time options are accepted without effect (the operator's import settings decide them).
    status, body = daemon.request("POST", "/api/generate", {
        "model": "tiny", "prompt": "x", "stream": False, "keep_alive": "5m",
        "options": {"num_ctx": 4096, "num_gpu": 1, "num_thread": 2, "num_predict": 2}}, role="infer")
    assert status == 200 and body["eval_count"] == 2


def test_pull_push_and_model_management_say_how_models_arrive(served: Served) -> None:
    c = client(served)
    for call in (lambda: c.pull("llama3.2"), lambda: c.push("me/tiny"), lambda: c.delete("tiny"),
                 lambda: c.copy("tiny", "tiny2")):
        with pytest.raises(ollama.ResponseError) as refused:
            call()
        assert refused.value.status_code == 400 and "garrison models" in refused.value.error
    status, body = served.daemon.request("POST", "/api/pull", {"model": "llama3.2"}, role="infer")
    assert status == 400 and body["code"] == "offline_appliance"
    assert {m.model for m in c.list().models} >= {"tiny"}  # nothing was removed


def _metric(daemon: Daemon, name: str, **labels: str) -> float:
    req = urllib.request.Request(daemon.url + "/metrics", headers={"Authorization": f"Bearer {daemon.key('read')}"})
    text = urllib.request.urlopen(req, timeout=5).read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{name}{{{re.escape(wanted)}}} ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_rate_limits_and_usage_apply(served: Served) -> None:
    c = client(served, served.keys["requests"])
    c.list()
    c.list()
    with pytest.raises(ollama.ResponseError) as limited:
        c.list()
    assert limited.value.status_code == 429 and "rate" in limited.value.error.lower()
    # A stream is charged when it ends: prompt and generated tokens, as its closing object counts them.
    tokens = client(served, served.keys["tokens"])
    parts = list(tokens.chat(model="tiny", messages=CHAT, stream=True, options={**GREEDY, "num_predict": 40}))
    last = parts[-1]
    assert last.done and last.eval_count and last.prompt_eval_count
    key = served.ids["tokens"]
    assert _metric(served.daemon, "garrison_key_tokens_total", key=key, kind="completion") == last.eval_count
    assert _metric(served.daemon, "garrison_key_tokens_total", key=key, kind="prompt") == last.prompt_eval_count
    with pytest.raises(ollama.ResponseError) as spent:
        tokens.generate(model="tiny", prompt="again", options={"num_predict": 2})
    assert spent.value.status_code == 429


def test_the_privacy_policy_screens_prompts_and_streamed_responses(served: Served, tiny_llama_gguf: Path,
                                                                  tmp_path: Path) -> None:
    c = client(served)
    for call in (lambda: c.chat(model="tiny", messages=[{"role": "user", "content": f"Bill {CARD}"}]),
                 lambda: c.generate(model="tiny", prompt="Pay", system=f"card {CARD}")):
        with pytest.raises(ollama.ResponseError) as denied:
            call()
        assert denied.value.status_code == 400 and "payment_card" in denied.value.error
    # A response that holds a card (forced digit by digit by a schema) is redacted, streamed too: on a
    # daemon of its own, since screening responses holds text back from every stream.
    state, policy = tmp_path / "state", tmp_path / "policy.toml"
    policy.write_text('[inference_privacy.responses]\npayment_card = "redact"\n')
    env = garrison_env(state, GARRISON_POLICY_FILE=str(policy))
    run_cli(state, "models", "import", str(tiny_llama_gguf), "--name", "tiny", "--ctx", "512", env=env)
    daemon = Daemon(state, free_port(), env, tmp_path / "daemon.log").start()
    try:
        screened = ollama.Client(host=daemon.url, headers={"Authorization": f"Bearer {daemon.key('infer')}"})
        schema = {"type": "object", "properties": {"card": {"type": "string", "enum": [CARD]}},
                  "required": ["card"], "additionalProperties": False}
        parts = list(screened.chat(model="tiny", messages=CHAT, format=schema, stream=True,
                                   options={**GREEDY, "num_predict": 120}))
        assert json.loads("".join(p.message.content or "" for p in parts)) == {"card": "[PAYMENT_CARD]"}
        whole = screened.generate(model="tiny", prompt="card?", format=schema, options={**GREEDY, "num_predict": 120})
        assert json.loads(whole.response) == {"card": "[PAYMENT_CARD]"}
    finally:
        daemon.stop()
