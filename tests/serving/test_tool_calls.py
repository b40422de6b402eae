"""Tool-call formats: the row chosen from real templates, each row's output read whole and streamed at
every split, the grammars llama.cpp parses, and the request's tool fields checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from chat_conversation import llama_cpp_templates

from garrison.errors import InvalidRequest
from garrison.serving.chat_output import ChatOutput, whole
from garrison.serving.reasoning import ReasoningSyntax
from garrison.serving.tool_calls import (
    FORMATS,
    FORMATS_BY_NAME,
    ToolCall,
    ToolCallSplitter,
    ToolRequest,
    prompt_messages,
    split_calls,
    template_messages,
    tool_format,
    tool_grammar,
    tool_request,
)

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"]}}}

# (format, model output, content, [(name, arguments)])
OUTPUTS: list[tuple[str, str, str, list[tuple[str, dict[str, Any]]]]] = [
    ("hermes", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bern", "days": 2}}\n</tool_call>',
     "Let me look.", [("get_weather", {"city": "Zürich"}), ("get_weather", {"city": "Bern", "days": 2})]),
    ("hermes", "A plain <b>answer</b> with a < sign", "A plain <b>answer</b> with a < sign", []),
    ("hermes", "<tool_call>\n{not json}\n</tool_call>", "<tool_call>\n{not json}\n</tool_call>", []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Bern"}}]', "",
     [("get_weather", {"city": "Bern"})]),
    # The detokenizer drops the control token: a leading list of calls is the same.
    ("mistral", ' [{"name": "get_weather", "arguments": {"city": "Bern"}, "id": "abcdefghi"}]', "",
     [("get_weather", {"city": "Bern"})]),
    ("mistral", "[1, 2] are numbers", "[1, 2] are numbers", []),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}', "",
     [("get_weather", {"city": "Oslo"})]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Oslo"}}', "", [("get_weather", {"city": "Oslo"})]),
    ("llama3", '{"answer": 4} is JSON, not a call', '{"answer": 4} is JSON, not a call', []),
    ("generic", '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}]}', "",
     [("get_weather", {"city": "Rome"})]),
    ("generic", '{"tool_call": {"name": "get_weather", "arguments": {"city": "Rome"}}}', "",
     [("get_weather", {"city": "Rome"})]),
    ("generic", '{"response": "It is sunny."}', "It is sunny.", []),
    ("generic", "Plain text {", "Plain text {", []),
]


def _streamed(fmt: str, text: str, cut: list[int]) -> tuple[str, list[ToolCall]]:
    splitter = ToolCallSplitter(FORMATS_BY_NAME[fmt])
    pieces = []
    for start, end in zip([0, *cut], [*cut, len(text)], strict=True):
        pieces += splitter.feed(text[start:end])
    pieces += splitter.finish()
    content = "".join(p for p in pieces if isinstance(p, str))
    assert [p for p in pieces if isinstance(p, ToolCall)] == splitter.calls
    return content, splitter.calls


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), OUTPUTS)
def test_each_format_reads_its_calls_whole_and_streamed_at_every_split(
        fmt: str, text: str, content: str, calls: list[tuple[str, dict[str, Any]]]) -> None:
    got_content, got = split_calls(FORMATS_BY_NAME[fmt], text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    for n in range(1, len(text)):
        streamed_content, streamed = _streamed(fmt, text, [n])
        assert streamed_content == content, n
        assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in got], n
    one_by_one, _ = _streamed(fmt, text, list(range(1, len(text))))
    assert one_by_one == content


def test_a_stream_holds_back_only_what_could_become_a_marker() -> None:
    splitter = ToolCallSplitter(FORMATS_BY_NAME["hermes"])
    assert splitter.feed("Checking ") == ["Checking"]
    assert splitter.feed("<tool") == []  # maybe a marker
    assert splitter.feed("s> are") == [" <tools> are"]


def test_call_ids_and_parallel_calls() -> None:
    text = OUTPUTS[0][1]
    _, calls = split_calls(FORMATS_BY_NAME["hermes"], text)
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    _, one = split_calls(FORMATS_BY_NAME["hermes"], text, parallel=False)
    assert [json.loads(c.arguments) for c in one] == [{"city": "Zürich"}]
    _, mistral = split_calls(FORMATS_BY_NAME["mistral"], OUTPUTS[3][1])
    assert len(mistral[0].id) == 9 and mistral[0].id.isalnum()  # Mistral's templates refuse other ids


def test_thinking_then_a_call() -> None:
    output = ChatOutput.of(ReasoningSyntax("<think>", "</think>", False), FORMATS_BY_NAME["hermes"])
    reasoning, content, calls = whole(output, '<think>\nI should look it up.\n</think>\n\n<tool_call>\n'
                                               '{"name": "get_weather", "arguments": {"city": "Bern"}}\n</tool_call>')
    assert (reasoning, content) == ("I should look it up.", "")
    assert [c.name for c in calls] == ["get_weather"] and output.finish_reason("stop") == "tool_calls"
    assert output.finish_reason("length") == "length"


def test_the_format_is_chosen_from_the_template() -> None:
    templates = llama_cpp_templates()
    if not templates:
        pytest.skip("no llama-cpp-python source distribution in the wheelhouse (install.sh keeps one)")
    expected = {"Qwen-Qwen3-0.6B": "hermes", "Qwen-Qwen2.5-7B-Instruct": "hermes",
                "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": "hermes",
                "meta-llama-Llama-3.1-8B-Instruct": "llama3", "meta-llama-Llama-3.3-70B-Instruct": "llama3",
                "mistralai-Mistral-Nemo-Instruct-2407": "mistral",
                "google-gemma-2-2b-it": "generic",
                "CohereForAI-c4ai-command-r-plus-tool_use": "json"}  # its own syntax, not Llama's
    found = {name: tool_format(templates[name]).name for name in expected if name in templates}
    assert found == {name: row for name, row in expected.items() if name in templates}
    assert len(found) >= 5, sorted(templates)
    assert tool_format(None).name == "generic"
    assert FORMATS_BY_NAME["generic"].describes_tools and not FORMATS_BY_NAME["json"].describes_tools


def test_a_template_without_tools_gets_them_in_the_system_message() -> None:
    request = ToolRequest([TOOL], "auto")
    generic = FORMATS_BY_NAME["generic"]
    shown = prompt_messages([{"role": "user", "content": "Weather?"}], generic, request)
    assert shown[0]["role"] == "system" and '"get_weather"' in shown[0]["content"]
    merged = prompt_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                             generic, request)
    assert merged[0]["content"].startswith("Be brief.\n\n") and len(merged) == 2
    assert prompt_messages([{"role": "user", "content": "Hi"}], FORMATS_BY_NAME["hermes"], request) == [
        {"role": "user", "content": "Hi"}]


def test_history_is_given_to_templates_as_transformers_expects() -> None:
    messages = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "not json"}}]}]
    fixed = template_messages(messages)[0]
    assert fixed["content"] == ""
    assert [c["function"]["arguments"] for c in fixed["tool_calls"]] == [{"a": 1}, "not json"]
    assert messages[0]["content"] is None  # the caller's list is untouched


def test_tool_fields_are_checked() -> None:
    assert tool_request({}) is None
    assert tool_request({"tools": [TOOL], "tool_choice": "none"}) is None
    auto = tool_request({"tools": [TOOL]})
    assert auto is not None and not auto.forced and auto.parallel
    named = tool_request({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                          "parallel_tool_calls": False})
    assert named is not None and named.choice == "get_weather" and named.forced and not named.parallel
    bad: list[tuple[dict[str, Any], str]] = [
        ({"tools": [{"type": "function"}]}, "tools[0]"),
        ({"tools": "get_weather"}, "tools"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": "always"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [TOOL], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
         "tools[0].function.parameters"),
    ]
    for body, param in bad:
        with pytest.raises(InvalidRequest) as err:
            tool_request(body)
        assert err.value.param == param, body


def test_every_format_has_a_grammar_llama_cpp_parses(tiny_llama_gguf: Path) -> None:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(tiny_llama_gguf), vocab_only=True, verbose=False)._model.vocab

    def parses(grammar: str) -> bool:
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
        return bool(sampler)

    assert not parses('root ::= "<tool_call>" (')  # the check can fail
    other = {"type": "function", "function": {"name": "noop"}}
    for fmt in FORMATS:
        for request in (ToolRequest([TOOL, other], "required"), ToolRequest([TOOL, other], "get_weather", False)):
            for think in (None, ("<think>", "</think>", False), ("<think>", "</think>", True)):
                grammar = tool_grammar(request, fmt, think)
                assert parses(grammar), (fmt.name, grammar)
                assert ('"\\"noop\\""' in grammar) == (request.choice == "required")
