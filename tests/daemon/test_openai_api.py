"""The OpenAI-compatible routes, driven by the official `openai` client against a real daemon.

One daemon per module (loading a model takes a moment): the tiny Llama as GGUF, served by
the continuous-batching llama.cpp engine over real HTTP on loopback.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from conftest import Daemon, free_port, garrison_env, run_cli

CHAT = [{"role": "user", "content": "What is Garrison?"}]


@pytest.fixture(scope="module")
def served(tiny_llama_gguf: Path, tiny_lora_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("openai")
    state = root / "state"
    env = garrison_env(state, GARRISON_MODEL_KEEP_ALIVE_S="0")
    run_cli(state, "models", "import", str(tiny_llama_gguf), "--name", "tiny", "--parallel", "4", "--ctx", "512",
            env=env)
    run_cli(state, "models", "import", str(tiny_llama_gguf), "--name", "solo", "--parallel", "1", "--ctx", "512",
            "--queue", "0", env=env)
    run_cli(state, "models", "import", str(tiny_lora_gguf), "--name", "tiny-caps", "--base", "tiny", env=env)
    daemon = Daemon(state, free_port(), env, root / "daemon.log").start()
    yield daemon
    daemon.stop()


def client(daemon: Daemon, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=key or daemon.key("infer"), max_retries=0)


def aclient(daemon: Daemon) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=daemon.url + "/v1", api_key=daemon.key("infer"), max_retries=0,
                              timeout=120)


def metric(daemon: Daemon, name: str, model: str) -> float:
    req = urllib.request.Request(daemon.url + "/metrics", headers={"Authorization": f"Bearer {daemon.key('read')}"})
    text = urllib.request.urlopen(req, timeout=5).read().decode()
    found = re.search(rf'^{name}{{model="{model}"}} ([0-9.e+-]+)$', text, re.M)
    return float(found.group(1)) if found else float("nan")


def test_models_list_and_retrieve(served: Daemon) -> None:
    c = client(served)
    ids = {m.id for m in c.models.list().data}
    assert {"tiny", "solo"} <= ids
    assert c.models.retrieve("tiny").id == "tiny"


def test_chat_completion_and_stream_agree(served: Daemon) -> None:
    c = client(served)
    full = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    text = full.choices[0].message.content
    assert text and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage and full.usage.prompt_tokens > 0 and full.usage.completion_tokens > 0
    stream = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0,  # type: ignore[arg-type]
                                       stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
    assert "".join(pieces) == text
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_completion_with_logprobs(served: Daemon) -> None:
    out = client(served).completions.create(model="tiny", prompt="The quick brown", max_tokens=8, temperature=0,
                                            logprobs=2)
    choice = out.choices[0]
    assert choice.text and out.usage and out.usage.completion_tokens == 8 and choice.finish_reason == "length"
    assert choice.logprobs is not None and choice.logprobs.token_logprobs
    assert all(lp is not None and lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert "".join(choice.logprobs.tokens or []) == choice.text


def test_json_schema_response_format_is_enforced(served: Daemon) -> None:
    # Bounded values, so the tiny model cannot ramble past max_tokens inside a string.
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                               "capital": {"type": "boolean"}},
              "required": ["city", "capital"], "additionalProperties": False}
    out = client(served).chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=120, temperature=0,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    data = json.loads(out.choices[0].message.content or "")
    assert set(data) == {"city", "capital"} and data["city"] in ("Paris", "Rome")
    assert isinstance(data["capital"], bool)


def test_errors_use_the_clients_own_exception_classes(served: Daemon) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(served, key="grs_not-a-key").models.list()
    with pytest.raises(openai.PermissionDeniedError):
        client(served, key=served.key("read")).chat.completions.create(model="tiny", messages=CHAT)  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError) as missing:
        client(served).chat.completions.create(model="no-such-model", messages=CHAT)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client(served).chat.completions.create(model="tiny", messages=CHAT, temperature=7)  # type: ignore[arg-type]
    assert bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as long:
        client(served).completions.create(model="tiny", prompt="word " * 600, max_tokens=8)
    assert long.value.code == "context_length_exceeded" and long.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as traversal:
        client(served).chat.completions.create(model="../etc/passwd", messages=CHAT)  # type: ignore[arg-type]
    assert traversal.value.code == "invalid_model_name"


def test_model_grants_limit_a_key(served: Daemon) -> None:
    key = run_cli(served.state_dir, "keys", "create", "--role", "infer", "--models", "solo",
                  env=served.env).stdout.strip()
    c = client(served, key=key)
    assert {m.id for m in c.models.list().data} == {"solo"}
    with pytest.raises(openai.PermissionDeniedError):
        c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4)  # type: ignore[arg-type]


def test_queue_overflow_gives_429_with_retry_after(served: Daemon) -> None:
    async def scenario() -> None:
        async with aclient(served) as c:
            busy = await c.completions.create(model="solo", prompt="Count", max_tokens=400, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True})
            first = await busy.__anext__()
            assert first is not None
            with pytest.raises(openai.RateLimitError) as limited:
                await c.completions.create(model="solo", prompt="Hello", max_tokens=4)
            assert int(limited.value.response.headers["retry-after"]) >= 1
            await busy.close()

    asyncio.run(scenario())


def test_sixteen_concurrent_streams_match_solo_runs(served: Daemon) -> None:
    prompts = [f"Question {i}: {topic}" for i, topic in enumerate(
        ["weather", "jobs", "keys", "the vault", "quantization", "a fox", "numbers", "days"] * 2)]

    async def one(c: openai.AsyncOpenAI, prompt: str) -> str:
        stream = await c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=24, temperature=0, stream=True)
        return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

    async def together() -> list[str]:
        async with aclient(served) as c:
            return list(await asyncio.gather(*(one(c, p) for p in prompts)))

    async def alone() -> list[str]:
        async with aclient(served) as c:
            return [await one(c, p) for p in prompts]

    concurrent = asyncio.run(together())
    solo = asyncio.run(alone())
    assert concurrent == solo
    assert len(set(solo)) > 1, "different prompts should give different answers"


def test_a_client_that_disconnects_frees_its_slot(served: Daemon) -> None:
    async def scenario() -> None:
        body = {"model": "tiny", "prompt": "Once", "max_tokens": 400, "temperature": 0, "stream": True,
                "ignore_eos": True}
        headers = {"Authorization": f"Bearer {served.key('infer')}"}
        async with aiohttp.ClientSession() as session:
            resp = await session.post(served.url + "/v1/completions", json=body, headers=headers)
            await resp.content.readline()
            assert metric(served, "garrison_model_active_slots", "tiny") == 1
            resp.close()  # drop the connection mid-stream
        deadline = time.monotonic() + 5
        while metric(served, "garrison_model_active_slots", "tiny") != 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert metric(served, "garrison_model_active_slots", "tiny") == 0
        # The runner's counters arrive with its next stats reply: a step already in flight when the
        # slot was freed may still be counted once. After that, nothing more is generated.
        await asyncio.sleep(0.3)
        generated = metric(served, "garrison_model_tokens_generated_total", "tiny")
        await asyncio.sleep(0.5)
        assert metric(served, "garrison_model_tokens_generated_total", "tiny") == generated

    asyncio.run(scenario())


def test_a_continued_chat_reuses_the_kv_cache(served: Daemon) -> None:
    c = client(served)
    system = {"role": "system", "content": "You are the appliance's helpful assistant. " * 6}
    first = c.chat.completions.create(model="solo", messages=[system, CHAT[0]], max_tokens=8, temperature=0)  # type: ignore[list-item]
    turn2: list[Any] = [system, CHAT[0], {"role": "assistant", "content": first.choices[0].message.content},
                        {"role": "user", "content": "And the vault?"}]
    second = c.chat.completions.create(model="solo", messages=turn2, max_tokens=8, temperature=0)
    assert second.usage is not None and first.usage is not None
    cached = second.usage.prompt_tokens_details.cached_tokens if second.usage.prompt_tokens_details else 0
    assert cached and cached >= first.usage.prompt_tokens - 1


def test_cli_run_streams_through_the_daemon(served: Daemon) -> None:
    env = {**served.env, "GARRISON_KEY": served.key("infer")}
    out = run_cli(served.state_dir, "run", "tiny", "Hello", "--temperature", "0", "--max-tokens", "16", env=env)
    expected = client(served).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=16, temperature=0)
    assert out.stdout.strip() == (expected.choices[0].message.content or "").strip()
    chat = run_cli(served.state_dir, "chat", "tiny", "--temperature", "0", "--max-tokens", "8", env=env,
                   input_="Hello\nWhat is a job?\n\n")
    assert chat.stdout.count("> ") >= 2
    no_key = run_cli(served.state_dir, "run", "tiny", "Hello", env=served.env, check=False)
    assert no_key.returncode == 3 and "GARRISON_KEY" in no_key.stderr


def test_a_tampered_model_is_refused(served: Daemon, tiny_llama_gguf: Path) -> None:
    run_cli(served.state_dir, "models", "import", str(tiny_llama_gguf), "--name", "tampered", env=served.env)
    record = json.loads(run_cli(served.state_dir, "models", "show", "tampered", env=served.env).stdout)
    folder = next(p for p in (served.state_dir / "models").iterdir() if p.name.startswith("tampered-"))
    target = folder / record["entry"]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(openai.InternalServerError) as refused:
        client(served).chat.completions.create(model="tampered", messages=CHAT, max_tokens=4)  # type: ignore[arg-type]
    assert refused.value.code == "artifact_hash_mismatch"
    # Through the daemon, the CLI exits as the same failure does in process (the guide's exit 8), not 1.
    env = {**served.env, "GARRISON_KEY": served.key("infer")}
    ran = run_cli(served.state_dir, "run", "tampered", "Hello", "--max-tokens", "4", env=env, check=False)
    assert ran.returncode == 8 and "[artifact_hash_mismatch]" in ran.stderr, ran.stderr


def test_lora_adapters_share_their_base(served: Daemon) -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        async with aclient(served) as c:
            async def ask(model: str, q: str) -> str:
                out = await c.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                      max_tokens=16, temperature=0)
                return out.choices[0].message.content or ""

            questions = ["Hello", "What is a job?"]
            mixed = await asyncio.gather(*(ask(m, q) for q in questions for m in ("tiny", "tiny-caps")))
            alone = [await ask(m, q) for q in questions for m in ("tiny", "tiny-caps")]
            return list(mixed), alone

    mixed, alone = asyncio.run(scenario())
    assert mixed == alone
    assert alone[0] != alone[1] and alone[2] != alone[3], "the adapter changes the answers"
    models = json.loads(run_cli(served.state_dir, "models", "list", "--json", env=served.env).stdout)
    caps = next(m for m in models if m["id"] == "tiny-caps")
    assert caps["format"] == "lora" and caps["base"] == "tiny"
    removal = run_cli(served.state_dir, "models", "rm", "tiny", env=served.env, check=False)
    assert removal.returncode == 5 and "model_in_use" in removal.stderr


def test_a_model_imported_by_the_cli_is_served_without_restart(served: Daemon, tiny_llama_gguf: Path) -> None:
    c = client(served)
    assert "fresh" not in {m.id for m in c.models.list().data}
    run_cli(served.state_dir, "models", "import", str(tiny_llama_gguf), "--name", "fresh", env=served.env)
    out = c.chat.completions.create(model="fresh", messages=CHAT, max_tokens=4, temperature=0)  # type: ignore[arg-type]
    assert out.usage is not None and out.usage.completion_tokens > 0
