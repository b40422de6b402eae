"""The Responses API through a real daemon with the official `openai` client.

The model is the tiny Qwen3 taught one tool-calling conversation (see test_tool_calls_api.py): asked
where the parcel is, it calls lookup_order; shown the tool's result after that call, it answers. So a
continuation by `previous_response_id` is proven by the answer itself: the model gives it only when the
stored first turn is in its prompt.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import Daemon, run_cli, serve_model

from garrison.training.tiny_models import TOOL_CALLER_CHAT, TOOL_CALLER_TOOLS

QUESTION = TOOL_CALLER_CHAT[0]["content"]
RESULT = TOOL_CALLER_CHAT[2]["content"]
ANSWER = TOOL_CALLER_CHAT[3]["content"]
ARGUMENTS = {"email": "ana@example.com"}
# The Responses API's flat function tools.
TOOLS: list[Any] = [{"type": "function", **t["function"]} for t in TOOL_CALLER_TOOLS]
SECRET_WORD = "Quaxolotlberry"


@pytest.fixture(scope="module")
def served(tiny_tool_caller_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = serve_model(tmp_path_factory.mktemp("responses"), tiny_tool_caller_gguf, "caller")
    yield daemon
    daemon.stop()


def _client(daemon: Daemon, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=key or daemon.key("infer"), max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def client(served: Daemon) -> openai.OpenAI:
    return _client(served)


def _call(response: Any) -> Any:
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1, response.output
    return calls[0]


def test_create_whole_then_continue_with_the_tool_result(client: openai.OpenAI) -> None:
    first = client.responses.create(model="caller", input=QUESTION, tools=TOOLS, temperature=0,
                                    max_output_tokens=64)
    assert first.id.startswith("resp_") and first.object == "response" and first.status == "completed"
    call = _call(first)
    assert call.name == "lookup_order" and json.loads(call.arguments) == ARGUMENTS
    assert call.call_id.startswith("call_") and call.id and call.id.startswith("fc_")
    assert first.usage is not None and first.usage.input_tokens > 20
    assert [t.name for t in first.tools] == ["lookup_order"]  # type: ignore[union-attr]

    # The tool's result alone, continuing the stored conversation: the taught answer.
    second = client.responses.create(model="caller", previous_response_id=first.id, tools=TOOLS, temperature=0,
                                     max_output_tokens=64, input=[{"type": "function_call_output",
                                                                   "call_id": call.call_id, "output": RESULT}])
    assert second.output_text == ANSWER, second.output
    assert second.previous_response_id == first.id
    message = second.output[-1]
    assert message.type == "message" and message.id.startswith("msg_") and message.role == "assistant"
    # The first turn (its prompt and its call) is in the second prompt.
    assert second.usage is not None
    assert second.usage.input_tokens >= first.usage.input_tokens + first.usage.output_tokens

    # The same continuation sent whole (store off): the same answer, the same prompt.
    whole = client.responses.create(model="caller", tools=TOOLS, temperature=0, max_output_tokens=64, store=False,
                                    input=[{"role": "user", "content": QUESTION},
                                           {"type": "function_call", "call_id": call.call_id, "name": call.name,
                                            "arguments": call.arguments},
                                           {"type": "function_call_output", "call_id": call.call_id,
                                            "output": RESULT}])
    assert whole.output_text == ANSWER
    assert whole.usage is not None and whole.usage.input_tokens == second.usage.input_tokens
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(whole.id)  # not stored


def test_streamed_events_as_openai_sends_them(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="caller", input=QUESTION, tools=TOOLS, temperature=0,
                                          max_output_tokens=64, stream=True))
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"], kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created, done = events[0], events[-1]
    assert created.response.status == "in_progress" and created.response.output == []  # type: ignore[union-attr]
    final = done.response  # type: ignore[union-attr]
    assert final.id == created.response.id and final.status == "completed"  # type: ignore[union-attr]
    assert json.loads(_call(final).arguments) == ARGUMENTS

    # Text: message item, content part, deltas whose sum is the final text; the client's own accumulator.
    call = _call(final)
    with client.responses.stream(model="caller", previous_response_id=final.id, tools=TOOLS, temperature=0,
                                 max_output_tokens=64, input=[{"type": "function_call_output",
                                                               "call_id": call.call_id, "output": RESULT}]) as stream:
        text_events = list(stream)
        answer = stream.get_final_response()
    kinds = [e.type for e in text_events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"], kinds
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"], kinds
    deltas = [e.delta for e in text_events if e.type == "response.output_text.delta"]
    item_ids = {e.item_id for e in text_events if hasattr(e, "item_id")}
    assert "".join(deltas) == ANSWER == answer.output_text
    assert item_ids == {answer.output[0].id} and answer.output[0].id.startswith("msg_")


def test_instructions_and_message_input(client: openai.OpenAI) -> None:
    plain = client.responses.create(model="caller", input="Hello there", max_output_tokens=4, temperature=0)
    parts = client.responses.create(model="caller", max_output_tokens=4, temperature=0, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Hello "}, {"type": "input_text",
                                                                             "text": "there"}]}])
    assert plain.usage is not None and parts.usage is not None
    assert parts.usage.input_tokens == plain.usage.input_tokens
    told = client.responses.create(model="caller", input="Hello there", max_output_tokens=4, temperature=0,
                                   instructions="Answer in French, in one short sentence.")
    assert told.instructions == "Answer in French, in one short sentence."
    assert told.usage is not None and told.usage.input_tokens >= plain.usage.input_tokens + 8
    developer = client.responses.create(model="caller", max_output_tokens=4, temperature=0, input=[
        {"role": "developer", "content": "Answer in French, in one short sentence."},
        {"role": "user", "content": "Hello there"}])
    assert developer.usage is not None and developer.usage.input_tokens == told.usage.input_tokens
    # A short max_output_tokens ends the response incomplete, as OpenAI's does.
    assert plain.status == "incomplete" and plain.incomplete_details is not None
    assert plain.incomplete_details.reason == "max_output_tokens"
    assert plain.usage.output_tokens == 4


def test_text_format_json_schema_is_enforced(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
              "required": ["unit"], "additionalProperties": False}
    response = client.responses.create(model="caller", input=QUESTION, temperature=0, max_output_tokens=96,
                                       text={"format": {"type": "json_schema", "name": "unit", "schema": schema,
                                                        "strict": True}})
    assert json.loads(response.output_text)["unit"] in ("celsius", "fahrenheit"), response.output_text
    assert response.text is not None and response.text.format.type == "json_schema"


def test_retrieve_list_items_delete_and_other_keys(served: Daemon, client: openai.OpenAI) -> None:
    made = client.responses.create(model="caller", input=f"Remember the word {SECRET_WORD}.", max_output_tokens=4,
                                   temperature=0, instructions="Be brief.", metadata={"ticket": "42"})
    got = client.responses.retrieve(made.id)
    assert got.id == made.id and got.output_text == made.output_text and got.metadata == {"ticket": "42"}
    items = client.responses.input_items.list(made.id)
    assert [(i.type, i.role) for i in items.data] == [("message", "user")]  # type: ignore[union-attr]
    assert items.data[0].content[0].text == f"Remember the word {SECRET_WORD}."  # type: ignore[union-attr]

    other = _client(served, run_cli(served.state_dir, "keys", "create", "--role", "infer",
                                    env=served.env).stdout.strip())
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError) as refused:
        other.responses.create(model="caller", input="Go on.", previous_response_id=made.id, max_output_tokens=2)
    assert refused.value.body["param"] == "previous_response_id"  # type: ignore[index]

    # On disk: the body is ciphertext under a key of its own, wrapped by the master key.
    catalog = served.state_dir / "catalog.db"
    files = [p for p in catalog.parent.glob("catalog.db*") if p.is_file()]
    assert files and not any(SECRET_WORD.encode() in p.read_bytes() for p in files)
    with sqlite3.connect(f"file:{catalog}?mode=ro", uri=True) as db:
        assert db.execute("SELECT count(*) FROM wrapped_keys WHERE purpose = 'response' AND id = ?",
                          (made.id,)).fetchone() == (1,)

    client.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)
    with sqlite3.connect(f"file:{catalog}?mode=ro", uri=True) as db:  # the key is destroyed with the row
        assert db.execute("SELECT count(*) FROM wrapped_keys WHERE id = ?", (made.id,)).fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM responses WHERE id = ?", (made.id,)).fetchone() == (0,)


def test_refusals_name_their_field(served: Daemon) -> None:
    def post(body: dict[str, Any]) -> tuple[int, Any]:
        return served.request("POST", "/v1/responses", {"model": "caller", **body}, role="infer")

    cases = [({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
             ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
              "input[0].content"),
             ({"input": "hi", "background": True}, "background"),
             ({"input": "hi", "previous_response_id": "resp_nope"}, "previous_response_id"),
             ({"input": "hi", "max_output_tokenz": 3}, "max_output_tokenz"),
             ({"input": []}, "input")]
    for body, param in cases:
        status, answer = post(body)
        assert status in (400, 404) and answer["error"]["param"] == param, (body, answer)


def test_prompts_are_screened_before_they_are_stored(tiny_tool_caller_gguf: Path,
                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    daemon = serve_model(tmp_path_factory.mktemp("responses-private"), tiny_tool_caller_gguf, "caller",
                        '[inference_privacy.prompts]\nemail = "redact"\n')
    try:
        client = _client(daemon)
        made = client.responses.create(model="caller", input=QUESTION, max_output_tokens=2, temperature=0)
        items = client.responses.input_items.list(made.id)
        text = items.data[0].content[0].text  # type: ignore[union-attr]
        assert "ana@example.com" not in text and "[EMAIL]" in text
    finally:
        daemon.stop()
