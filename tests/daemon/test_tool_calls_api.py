"""Tool calling through a real daemon: the official `openai` client and `openai-agents` run a tool loop.

The model is a tiny Qwen3 with the real Qwen3 tokenizer and chat template, taught one conversation
(garrison.training.tiny_models.TOOL_CALLER_CHAT): shown the lookup_order tool, it calls it with the
customer's e-mail address in Qwen's `<tool_call>` syntax, and after the tool's result it answers.
So every turn of the loop is the real engine's greedy output, parsed by the daemon.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import Daemon, serve_model

from garrison.training.tiny_models import TOOL_CALLER_CHAT, TOOL_CALLER_TOOLS

QUESTION = [TOOL_CALLER_CHAT[0]]
TOOLS: list[Any] = [dict(t) for t in TOOL_CALLER_TOOLS]
RESULT = TOOL_CALLER_CHAT[2]["content"]
ANSWER = TOOL_CALLER_CHAT[3]["content"]
ARGUMENTS = {"email": "ana@example.com"}
UNIT_TOOL = {"type": "function", "function": {"name": "get_unit", "parameters": {
    "type": "object", "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["unit"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def served(tiny_tool_caller_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = serve_model(tmp_path_factory.mktemp("tools"), tiny_tool_caller_gguf, "caller")
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def chat(served: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key=served.key("infer"), max_retries=0, timeout=180)


def test_a_tool_loop_with_the_openai_client(chat: openai.OpenAI) -> None:
    first = chat.chat.completions.create(model="caller", messages=QUESTION, tools=TOOLS,  # type: ignore[arg-type]
                                         max_tokens=64, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].type == "function"
    call = calls[0].function  # type: ignore[union-attr]
    assert call.name == "lookup_order" and json.loads(call.arguments) == ARGUMENTS
    assert calls[0].id.startswith("call_")

    # The assistant turn goes back as the client gives it (arguments as JSON text, content null).
    history = [*QUESTION, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": calls[0].id, "content": RESULT}]
    second = chat.chat.completions.create(model="caller", messages=history, tools=TOOLS,  # type: ignore[arg-type]
                                          max_tokens=64, temperature=0)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == ANSWER
    assert not second.choices[0].message.tool_calls


def test_tool_calls_stream_as_deltas(chat: openai.OpenAI) -> None:
    deltas: list[Any] = []
    content, finish = [], None
    for chunk in chat.chat.completions.create(model="caller", messages=QUESTION, tools=TOOLS,  # type: ignore[call-overload]
                                              max_tokens=64, temperature=0, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content.append(delta.content or "")
        deltas += delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and "".join(content) == ""
    assert deltas[0].id and deltas[0].function.name == "lookup_order" and deltas[0].function.arguments == ""
    assert {d.index for d in deltas} == {0}
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == ARGUMENTS

    # Tokens held back while a call is read still send their logprobs (in empty content deltas).
    logprobs, usage = 0, None
    for chunk in chat.chat.completions.create(model="caller", messages=QUESTION, tools=TOOLS,  # type: ignore[call-overload]
                                              max_tokens=64, temperature=0, stream=True, logprobs=True,
                                              stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        if chunk.choices and chunk.choices[0].logprobs:
            logprobs += len(chunk.choices[0].logprobs.content or [])
    assert usage is not None and logprobs > 10 and logprobs in (usage.completion_tokens, usage.completion_tokens - 1)

    # The client's own accumulator rebuilds the same call from the stream.
    with chat.chat.completions.stream(model="caller", messages=QUESTION, tools=TOOLS,  # type: ignore[arg-type]
                                      max_tokens=64, temperature=0) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [  # type: ignore[union-attr]
        ("lookup_order", ARGUMENTS)]


def test_tool_choice_forces_a_call_with_a_grammar(chat: openai.OpenAI, served: Daemon) -> None:
    # The model was taught to call lookup_order; a named tool_choice makes it call get_unit instead,
    # with arguments its schema allows.
    forced = chat.chat.completions.create(
        model="caller", messages=QUESTION, tools=[*TOOLS, UNIT_TOOL], max_tokens=64, temperature=0,  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_unit"}}, parallel_tool_calls=False)
    calls = forced.choices[0].message.tool_calls or []
    assert forced.choices[0].finish_reason == "tool_calls", forced
    assert len(calls) == 1 and calls[0].function.name == "get_unit"  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments)["unit"] in ("celsius", "fahrenheit")  # type: ignore[union-attr]

    # "required" on a turn where the model would answer in text: it must call a tool.
    call = {"id": "call_1", "type": "function",
            "function": {"name": "lookup_order", "arguments": json.dumps(ARGUMENTS)}}
    history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": RESULT}]
    required = chat.chat.completions.create(model="caller", messages=history, tools=[UNIT_TOOL],  # type: ignore[arg-type]
                                            tool_choice="required", parallel_tool_calls=False, max_tokens=64,
                                            temperature=0)
    assert required.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in required.choices[0].message.tool_calls or []] == ["get_unit"]  # type: ignore[union-attr]

    # "none": tools neither shown nor read.
    none = chat.chat.completions.create(model="caller", messages=QUESTION, tools=TOOLS, tool_choice="none",  # type: ignore[arg-type]
                                        max_tokens=8, temperature=0)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason != "tool_calls"

    bad_name = served.request("POST", "/v1/chat/completions", {
        "model": "caller", "messages": QUESTION, "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "launch"}}}, role="infer")
    assert bad_name[0] == 400 and bad_name[1]["error"]["param"] == "tool_choice"
    both = served.request("POST", "/v1/chat/completions", {
        "model": "caller", "messages": QUESTION, "tools": TOOLS, "tool_choice": "required",
        "response_format": {"type": "json_object"}}, role="infer")
    assert both[0] == 400 and both[1]["error"]["param"] == "tool_choice"
    bad_tool = served.request("POST", "/v1/chat/completions", {
        "model": "caller", "messages": QUESTION, "tools": [{"type": "function"}]}, role="infer")
    assert bad_tool[0] == 400 and bad_tool[1]["error"]["param"] == "tools[0]"


def test_openai_agents_runs_the_tool_loop_to_completion(served: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
    from agents import Agent, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # no trace export: nothing leaves the machine
    looked_up: list[str] = []

    @function_tool
    def lookup_order(email: str) -> str:
        """Find the customer's latest order by e-mail address."""
        looked_up.append(email)
        return RESULT

    async def run() -> Any:
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=served.key("infer"), max_retries=0,
                                    timeout=180)
        model = OpenAIChatCompletionsModel(model="caller", openai_client=client)
        agent = Agent(name="support", tools=[lookup_order], model=model)
        from agents import ModelSettings

        agent.model_settings = ModelSettings(temperature=0, max_tokens=64)
        try:
            return await Runner.run(agent, QUESTION[0]["content"], max_turns=4)
        finally:
            await client.close()

    result = asyncio.run(run())
    assert looked_up == [ARGUMENTS["email"]]
    assert result.final_output == ANSWER


def test_tool_call_arguments_are_screened_as_response_text(tiny_tool_caller_gguf: Path,
                                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    daemon = serve_model(tmp_path_factory.mktemp("tools-private"), tiny_tool_caller_gguf, "caller",
                        '[inference_privacy.responses]\nemail = "redact"\n')
    try:
        client = openai.OpenAI(base_url=daemon.url + "/v1", api_key=daemon.key("infer"), max_retries=0, timeout=180)
        whole = client.chat.completions.create(model="caller", messages=QUESTION, tools=TOOLS,  # type: ignore[arg-type]
                                               max_tokens=64, temperature=0)
        calls = whole.choices[0].message.tool_calls or []
        assert whole.choices[0].finish_reason == "tool_calls"
        assert [json.loads(c.function.arguments) for c in calls] == [{"email": "[EMAIL]"}]  # type: ignore[union-attr]
        streamed = [d.function.arguments or "" for chunk in client.chat.completions.create(  # type: ignore[call-overload]
            model="caller", messages=QUESTION, tools=TOOLS, max_tokens=64, temperature=0, stream=True)
            if chunk.choices for d in chunk.choices[0].delta.tool_calls or []]
        assert json.loads("".join(streamed)) == {"email": "[EMAIL]"}
    finally:
        daemon.stop()


def test_ollama_chat_gives_calls_in_ollamas_shape_and_finishes_the_loop(served: Daemon) -> None:
    """/api/chat parses calls as the OpenAI route does and gives them in Ollama's shape (arguments an object),
    whole or streamed, as the `ollama` client's own response model reads them; the call and the tool's result
    go back in Ollama's form. (Raw HTTP, not `ollama.Client`: the client rewrites tool schemas, dropping
    `title` and `additionalProperties`, and the tiny model knows only the exact prompt it was taught.)"""
    import httpx
    import ollama

    headers = {"Authorization": f"Bearer {served.key('infer')}"}
    options = {"temperature": 0, "num_predict": 64}

    def chat(messages: list[Any], stream: bool = False, tools: list[Any] | None = TOOLS) -> list[ollama.ChatResponse]:
        body = {"model": "caller", "messages": messages, "options": options, "stream": stream,
                **({"tools": tools} if tools else {})}
        reply = httpx.post(served.url + "/api/chat", json=body, headers=headers, timeout=180)
        assert reply.status_code == 200, reply.text
        return [ollama.ChatResponse.model_validate_json(line) for line in reply.text.splitlines() if line]

    first = chat(QUESTION)[0]
    calls = first.message.tool_calls or []
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [("lookup_order", ARGUMENTS)]
    assert not first.message.content and first.done and first.done_reason == "stop"
    chunks = chat(QUESTION, stream=True)
    streamed = [c for chunk in chunks for c in (chunk.message.tool_calls or [])]
    assert [(c.function.name, dict(c.function.arguments)) for c in streamed] == [("lookup_order", ARGUMENTS)]
    assert "".join(chunk.message.content or "" for chunk in chunks) == "" and chunks[-1].done
    history = [*QUESTION, first.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_name": "lookup_order", "content": RESULT}]
    second = chat(history)[0]
    assert second.message.content == ANSWER and not second.message.tool_calls
    # Without tools nothing is parsed out of the answer, whatever it holds.
    assert not chat(QUESTION, tools=None)[0].message.tool_calls
