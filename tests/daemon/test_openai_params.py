"""OpenAI request parameters real clients use, through the official `openai` client against a real daemon:
n (one prompt evaluation, counted in /metrics), logit_bias, echo, list and token-id prompts, token-id and
over-long embedding inputs, max_tokens left out, and unknown fields refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from conftest import Daemon, free_port, garrison_env, run_cli

from garrison.errors import InvalidRequest
from garrison.serving.openai_fields import check_fields

CHAT = [{"role": "user", "content": "What is Garrison?"}]
CTX = 256


@pytest.fixture(scope="module")
def served(tiny_llama_gguf: Path, tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    from garrison.converters.hf_to_onnx import export_hf_to_onnx

    root = tmp_path_factory.mktemp("params")
    state = root / "state"
    env = garrison_env(state)
    run_cli(state, "models", "import", str(tiny_llama_gguf), "--name", "tiny", "--parallel", "4", "--ctx", str(CTX),
            env=env)
    bert = export_hf_to_onnx(tiny_bert_dir, root / "bert-onnx").path
    run_cli(state, "models", "import", str(bert), "--name", "embed", env=env)
    daemon = Daemon(state, free_port(), env, root / "daemon.log").start()
    yield daemon
    daemon.stop()


def client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=daemon.key("infer"), max_retries=0, timeout=120)


def evaluated(daemon: Daemon) -> float:
    """The engine's own count of prompt tokens evaluated (the runner's counter, through /metrics)."""
    status, text = daemon.request("GET", "/metrics", role="read")
    assert status == 200
    name = 'garrison_model_prompt_tokens_evaluated_total{model="tiny"}'
    line = next(x for x in text.splitlines() if x.startswith(name))
    return float(line.rsplit(" ", 1)[1])


def token_ids(daemon: Daemon, text: str, *, bos: bool = True) -> list[int]:
    """llama.cpp's own tokenization of text, from the daemon's render route (a template that is just the text)."""
    template = ("{{ bos_token }}" if bos else "") + "{{ messages[0]['content'] }}"
    status, out = daemon.request("POST", "/v1/garrison/render", {
        "model": "tiny", "messages": [{"role": "user", "content": text}], "chat_template": template,
        "add_generation_prompt": False}, role="infer")
    assert status == 200, out
    return list(out["token_ids"])


def test_n_choices_come_from_one_prompt_evaluation(served: Daemon) -> None:
    c = client(served)
    c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "warm up"}], max_tokens=1)  # type: ignore[arg-type]
    before = evaluated(served)
    messages = [{"role": "user", "content": "Tell me about the vault and the catalog of the appliance, please."}]
    out = c.chat.completions.create(model="tiny", messages=messages, n=3, max_tokens=12, temperature=1.0,  # type: ignore[arg-type]
                                    seed=11)
    assert [ch.index for ch in out.choices] == [0, 1, 2]
    assert len({ch.message.content for ch in out.choices}) > 1, "each choice samples on its own"
    assert out.usage is not None and out.usage.prompt_tokens_details is not None
    cached = out.usage.prompt_tokens_details.cached_tokens or 0
    # The prompt once, not three times: what the engine evaluated is the prompt less its cached prefix.
    assert evaluated(served) - before == out.usage.prompt_tokens - cached
    greedy = c.chat.completions.create(model="tiny", messages=messages, n=2, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    solo = c.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    assert [ch.message.content for ch in greedy.choices] == [solo.choices[0].message.content] * 2
    assert greedy.usage and solo.usage and greedy.usage.prompt_tokens == solo.usage.prompt_tokens
    assert greedy.usage.completion_tokens == 2 * solo.usage.completion_tokens


def test_n_choices_stream_interleaved_by_index(served: Daemon) -> None:
    c = client(served)
    solo = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0)  # type: ignore[arg-type]
    stream = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, temperature=0, n=2,  # type: ignore[arg-type]
                                       stream=True, stream_options={"include_usage": True})
    texts: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, str] = {}
    usage = None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {0: solo.choices[0].message.content, 1: solo.choices[0].message.content}
    assert set(finishes) == {0, 1}
    assert usage is not None and solo.usage is not None
    assert usage.prompt_tokens == solo.usage.prompt_tokens  # counted once
    assert usage.completion_tokens == 2 * solo.usage.completion_tokens


def test_logit_bias_forbidding_the_greedy_tokens_changes_the_output(served: Daemon, tiny_llama_dir: Path) -> None:
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json")).get_vocab()
    c = client(served)
    greedy = c.completions.create(model="tiny", prompt="The quick brown", max_tokens=8, temperature=0, logprobs=1)
    pieces = greedy.choices[0].logprobs.tokens if greedy.choices[0].logprobs else None
    assert pieces
    ids = {vocab[p.replace(" ", "\u2581")] for p in pieces if p.replace(" ", "\u2581") in vocab}
    assert ids, pieces
    banned = c.completions.create(model="tiny", prompt="The quick brown", max_tokens=8, temperature=0, logprobs=1,
                                  logit_bias={str(i): -100 for i in ids})
    assert banned.choices[0].text != greedy.choices[0].text
    assert banned.choices[0].logprobs and not set(banned.choices[0].logprobs.tokens or []) & set(pieces)
    with pytest.raises(openai.BadRequestError) as bad:
        c.completions.create(model="tiny", prompt="Hi", max_tokens=2, logit_bias={"5": 101})
    assert bad.value.param == "logit_bias"
    with pytest.raises(openai.BadRequestError) as out_of_vocab:
        c.completions.create(model="tiny", prompt="Hi", max_tokens=2, logit_bias={"999999": 1})
    assert out_of_vocab.value.param == "logit_bias"


def test_list_and_token_id_prompts_and_echo(served: Daemon) -> None:
    c = client(served)
    prompts = ["The quick brown", "Once upon a time"]
    alone = [c.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text
             for p in prompts]
    many = c.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=6, temperature=0)
    assert [ch.index for ch in many.choices] == [0, 1, 2, 3]
    assert [ch.text for ch in many.choices] == [alone[0], alone[0], alone[1], alone[1]]
    ids = token_ids(served, prompts[0])
    by_ids = c.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == alone[0]
    assert by_ids.usage and by_ids.usage.prompt_tokens == len(ids)
    lists = c.completions.create(model="tiny", prompt=[ids, token_ids(served, prompts[1])], max_tokens=6,
                                 temperature=0)
    assert [ch.text for ch in lists.choices] == alone
    echoed = c.completions.create(model="tiny", prompt=prompts[0], max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == prompts[0] + alone[0]
    streamed = c.completions.create(model="tiny", prompt=prompts[0], max_tokens=6, temperature=0, echo=True,
                                    stream=True)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == prompts[0] + alone[0]
    with pytest.raises(openai.BadRequestError) as bad:
        c.completions.create(model="tiny", prompt=[1, 2, 99999], max_tokens=2)
    assert bad.value.param == "prompt"


def test_max_tokens_left_out_generates_to_the_end_of_the_context(served: Daemon) -> None:
    c = client(served)
    prompt = "The catalog keeps every job and every model. " * 16
    out = c.completions.create(model="tiny", prompt=prompt, temperature=0, extra_body={"ignore_eos": True})
    assert out.usage is not None and out.choices[0].finish_reason == "length"
    assert CTX - 64 < out.usage.prompt_tokens < CTX, "a prompt the old default of 256 would not have fitted"
    assert out.usage.prompt_tokens + out.usage.completion_tokens == CTX
    with pytest.raises(openai.BadRequestError) as full:
        c.completions.create(model="tiny", prompt="word " * 400)
    assert full.value.code == "context_length_exceeded"


def test_unknown_fields_are_refused_and_openai_fields_accepted(served: Daemon) -> None:
    c = client(served)
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, extra_body={"max_token": 5})  # type: ignore[arg-type]
    assert bad.value.code == "unknown_parameter" and bad.value.param == "max_token"
    assert "max_token" in str(bad.value)
    out = c.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=2, user="u-1", metadata={"k": "v"}, store=False,  # type: ignore[arg-type]
        service_tier="auto", parallel_tool_calls=True, seed=1, top_logprobs=None, modalities=["text"],
        stream_options=None, reasoning_effort="low", prediction={"type": "content", "content": "x"},
        extra_body={"top_k": 5, "min_p": 0.05, "repeat_penalty": 1.1, "cache_prompt": True})
    assert out.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as audio:
        c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, modalities=["text", "audio"])  # type: ignore[arg-type]
    assert audio.value.code == "unsupported_parameter" and audio.value.param == "modalities"
    with pytest.raises(openai.BadRequestError) as unknown_embed:
        c.embeddings.create(model="embed", input="hi", extra_body={"pooling": "cls"})
    assert unknown_embed.value.param == "pooling"


def test_unknown_fields_pass_when_the_setting_allows_them() -> None:
    check_fields({"model": "m", "messages": [], "max_token": 1}, "chat", allow_unknown=True)
    with pytest.raises(InvalidRequest) as err:
        check_fields({"model": "m", "prompt": "x", "messages": []}, "completion", allow_unknown=False)
    assert err.value.param == "messages" and err.value.code == "unknown_parameter"
    with pytest.raises(InvalidRequest):  # a value Garrison cannot honour stays refused
        check_fields({"model": "m", "prompt": "x", "best_of": 3}, "completion", allow_unknown=True)


def test_embedding_token_inputs_and_over_long_inputs(served: Daemon, tiny_bert_dir: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_bert_dir / "tokenizer.json"))
    c = client(served)
    texts = ["the quick brown fox", "hello there"]
    by_text = np.array([d.embedding for d in c.embeddings.create(model="embed", input=texts).data])
    ids = [tokenizer.encode(t).ids for t in texts]
    by_ids = np.array([d.embedding for d in c.embeddings.create(model="embed", input=ids).data])
    assert np.allclose(by_text, by_ids, atol=1e-5)
    status, mixed = served.request("POST", "/v1/embeddings", {"model": "embed", "input": [ids[0], texts[1]]},
                                   role="infer")  # llama-server takes a mix of texts and token lists
    assert status == 200, mixed
    assert np.allclose(np.array([d["embedding"] for d in mixed["data"]]), by_text, atol=1e-5)
    one = c.embeddings.create(model="embed", input=ids[0])
    assert np.allclose(one.data[0].embedding, by_text[0], atol=1e-5) and one.usage.prompt_tokens == len(ids[0])
    long_text = "word " * 2000
    with pytest.raises(openai.BadRequestError) as long:
        c.embeddings.create(model="embed", input=long_text)
    assert long.value.code == "context_length_exceeded" and long.value.param == "input"
    cut = c.embeddings.create(model="embed", input=long_text, extra_body={"truncate": True})
    assert len(cut.data) == 1 and cut.usage.prompt_tokens < 2000
    with pytest.raises(openai.BadRequestError) as dims:
        c.embeddings.create(model="embed", input="hi", dimensions=8)
    assert dims.value.param == "dimensions"
    status, body = served.request("POST", "/v1/embeddings", {"model": "embed", "input": [[1, 2, 10**9]]},
                                  role="infer")
    assert status == 400 and body["error"]["param"] == "input", json.dumps(body)
