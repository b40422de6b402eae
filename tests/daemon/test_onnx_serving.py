"""ONNX artifacts served by the daemon: embeddings from an encoder, chat from a decoder with KV cache."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from conftest import Daemon, free_port, garrison_env, run_cli


@pytest.fixture(scope="module")
def served(tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    from garrison.converters.hf_to_onnx import export_hf_to_onnx

    root = tmp_path_factory.mktemp("onnx-serving")
    bert = export_hf_to_onnx(tiny_bert_dir, root / "bert-onnx").path
    bert_int8 = export_hf_to_onnx(tiny_bert_dir, root / "bert-onnx-int8", precision="int8").path
    llama = export_hf_to_onnx(tiny_llama_dir, root / "llama-onnx").path
    state = root / "state"
    env = garrison_env(state)
    for path, name in ((bert, "embed"), (bert_int8, "embed-int8"), (llama, "chat-onnx")):
        run_cli(state, "models", "import", str(path), "--name", name, env=env)
    daemon = Daemon(state, free_port(), env, root / "daemon.log").start()
    yield daemon
    daemon.stop()


def _client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=daemon.key("infer"), max_retries=0)


def test_embeddings_are_normalized_and_deterministic(served: Daemon) -> None:
    c = _client(served)
    texts = ["the quick brown fox", "hello, how can I help you today?", "the quick brown fox"]
    out = c.embeddings.create(model="embed", input=texts)
    vectors = np.array([d.embedding for d in out.data])
    assert vectors.shape == (3, 64)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(vectors[0], vectors[2], atol=1e-6)
    assert out.usage.prompt_tokens > 0
    quantized = np.array([d.embedding for d in c.embeddings.create(model="embed-int8", input=texts).data])
    cosine = (vectors * quantized).sum(axis=1)
    assert (cosine > 0.99).all()
    b64 = c.embeddings.create(model="embed", input="hello", encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype=np.float32)  # type: ignore[arg-type]
    assert np.allclose(decoded, c.embeddings.create(model="embed", input="hello").data[0].embedding)


def test_wrong_capability_is_a_clear_400(served: Daemon) -> None:
    c = _client(served)
    with pytest.raises(openai.BadRequestError) as caught:
        c.chat.completions.create(model="embed", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_capability_mismatch"
    with pytest.raises(openai.BadRequestError):
        c.embeddings.create(model="embed", input=[])


def test_onnx_decoder_chats_and_streams(served: Daemon) -> None:
    c = _client(served)
    messages = [{"role": "user", "content": "Hello"}]
    full = c.chat.completions.create(model="chat-onnx", messages=messages, max_tokens=16, temperature=0)  # type: ignore[arg-type]
    assert full.choices[0].message.content and full.usage and full.usage.completion_tokens > 0
    stream = c.chat.completions.create(model="chat-onnx", messages=messages, max_tokens=16, temperature=0,  # type: ignore[arg-type]
                                       stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == full.choices[0].message.content


def test_a_client_leaving_an_onnx_stream_frees_it_and_the_runner_serves_on(served: Daemon) -> None:
    """The ONNX engine's stream is cancellable like the llama one (it runs in a runner too)."""
    import asyncio
    import time

    import aiohttp

    headers = {"Authorization": f"Bearer {served.key('infer')}"}
    body = {"model": "chat-onnx", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 400,
            "temperature": 0, "stream": True, "ignore_eos": True}

    async def leave_early() -> None:
        async with aiohttp.ClientSession() as session:
            resp = await session.post(served.url + "/v1/chat/completions", json=body, headers=headers)
            assert resp.status == 200
            await resp.content.readline()
            resp.close()  # gone mid-stream

    asyncio.run(leave_early())
    status, ps = served.request("GET", "/v1/garrison/runners", role="read")
    assert status == 200
    row = next(r for r in ps["data"] if r["model"] == "chat-onnx")
    assert row["backend"] == "onnxruntime" and row["pid"]
    deadline = time.monotonic() + 10
    while row["in_flight"] and time.monotonic() < deadline:
        row = next(r for r in served.request("GET", "/v1/garrison/runners", role="read")[1]["data"]
                   if r["model"] == "chat-onnx")
    assert row["in_flight"] == 0
    assert "AttributeError" not in served.log()
    c = _client(served)
    again = c.chat.completions.create(model="chat-onnx", messages=[{"role": "user", "content": "Hi"}],  # type: ignore[list-item]
                                      max_tokens=4, temperature=0)
    assert again.usage and again.usage.completion_tokens > 0
