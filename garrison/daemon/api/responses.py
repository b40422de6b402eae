"""OpenAI's Responses API: POST /v1/responses (streamed or whole), GET and DELETE /v1/responses/{id},
GET /v1/responses/{id}/input_items.

A translation over the chat path (garrison.daemon.api.generation), as Ollama's face is: input items
become chat messages, `instructions` a system message, flat function tools chat's nested ones,
`text.format` a `response_format`; the model's template renders them, the same splitter takes
reasoning and tool calls out of the answer, and the grants, deadline, privacy screening and usage are
the chat route's. The answer comes back as output items (reasoning, message, function_call), whole or
as OpenAI's typed stream events. With `store` (OpenAI's default) the conversation so far is kept
sealed on the appliance (garrison.operations.stored_responses), so `previous_response_id` continues it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from garrison.daemon.api.generation import (
    Choice,
    chat_prompt,
    close_choices,
    collect_all,
    deadline,
    model_id,
    open_choices,
)
from garrison.daemon.http import json_response, principal, read_json
from garrison.daemon.routing import Route
from garrison.daemon.state import STATE
from garrison.engine.types import ContextLengthExceeded, Finish, GenerationRequest
from garrison.errors import GarrisonError, InvalidRequest, NotFound
from garrison.operations.stored_responses import ResponseStore, StoredResponse
from garrison.serving import openai_format as fmt
from garrison.serving import tool_calls
from garrison.serving.chat_output import ChatOutput, Part
from garrison.serving.openai_fields import check_fields

_ID = re.compile(r"^resp_[0-9a-f]{48}$")
_STORE_ATTR = "_response_store"


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def response_store(app: web.Application) -> ResponseStore:
    """The daemon's ResponseStore, made on first use over the ingest service's vault (its master key)."""
    from garrison.daemon.api.datasets import ingest_service

    state = app[STATE]
    found = state.__dict__.get(_STORE_ATTR)
    if isinstance(found, ResponseStore):
        return found
    made = ResponseStore(state.catalog, ingest_service(app).vault,
                         lambda: state.config.responses_retention_days)  # the live setting (SIGHUP swaps config)
    state.__dict__[_STORE_ATTR] = made
    return made


# ------------------------------------------------------------------------------------------ request

def _content_text(content: Any, where: str) -> str:
    """A message's content: a string, or text parts (input_text, output_text); other parts are refused."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content
                 if isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text")]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "".join(str(t) for t in texts)
    raise InvalidRequest(f"{where}.content must be a string or text parts (input_text, output_text); the "
                         "served models read text only", code="unsupported_parameter", param=f"{where}.content")


def input_messages(raw: Any) -> list[dict[str, Any]]:
    """The request's input as chat messages: a string is one user message; items are messages, function
    calls (joined onto the assistant turn they belong to) and function call outputs (tool messages)."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("'input' must be a string or a non-empty list of input items", param="input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequest(f"{where}.role must be user, assistant, system or developer",
                                     param=f"{where}.role")
            out.append({"role": "system" if role == "developer" else role,
                        "content": _content_text(item.get("content"), where)})
        elif kind == "function_call":
            name, arguments, call_id = item.get("name"), item.get("arguments"), item.get("call_id")
            if not all(isinstance(v, str) and v for v in (name, call_id)) or not isinstance(arguments, str):
                raise InvalidRequest(f"{where}: a function_call needs call_id, name and arguments (JSON text)",
                                     param=where)
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidRequest(f"{where}.call_id is required", param=f"{where}.call_id")
            out.append({"role": "tool", "tool_call_id": call_id, "content": _content_text(output, where)
                        if not isinstance(output, str) else output})
        elif kind == "reasoning":
            continue  # earlier thinking: templates drop it from past turns, as chat's reasoning_content
        else:
            raise InvalidRequest(f"{where}: input items of type {kind!r} are not supported (message, function_call, "
                                 "function_call_output)", code="unsupported_parameter", param=f"{where}.type")
    return out


def _chat_tools(raw: Any) -> list[dict[str, Any]] | None:
    """The Responses API's flat function tools as chat's nested ones; built-in tools are refused."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidRequest("'tools' must be a list of function tools", param="tools")
    out = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise InvalidRequest(f"tools[{i}]: only function tools are supported (got {kind!r}; the appliance "
                                 "hosts no built-in tools)", code="unsupported_parameter", param=f"tools[{i}].type")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out or None


def _response_format(body: dict[str, Any]) -> dict[str, Any] | None:
    """`text.format` as chat's `response_format` (json_schema's name, schema and strict sit flat here)."""
    text = body.get("text")
    if text is None:
        return None
    if not isinstance(text, dict) or not isinstance(text.get("format", {}), dict):
        raise InvalidRequest("'text' must be an object with a 'format' object", param="text")
    form = text.get("format")
    if form is None or form.get("type") == "text":
        return None
    if form.get("type") == "json_object":
        return {"type": "json_object"}
    if form.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: form[k] for k in ("name", "schema", "strict", "description")
                                                       if k in form}}
    raise InvalidRequest("'text.format.type' must be text, json_object or json_schema", param="text.format.type")


def _tool_choice(raw: Any) -> Any:
    if isinstance(raw, dict) and raw.get("type") == "function":
        return {"type": "function", "function": {"name": raw.get("name")}}
    if isinstance(raw, dict):
        raise InvalidRequest("'tool_choice' must be none, auto, required or {\"type\": \"function\", \"name\": ...}",
                             code="unsupported_parameter", param="tool_choice")
    return raw


# Garrison's sampling extensions (llama-server's names) pass through to the chat path unchanged.
_PASSED = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
           "frequency_penalty", "seed", "parallel_tool_calls", "chat_template_kwargs", "reasoning_format",
           "logit_bias", "stop", "ignore_eos", "grammar")


def chat_body(body: dict[str, Any], messages: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: body[k] for k in _PASSED if body.get(k) is not None}
    out["messages"] = messages
    if body.get("max_output_tokens") is not None:
        out["max_completion_tokens"] = body["max_output_tokens"]
    tools = _chat_tools(body.get("tools"))
    if tools is not None:
        out["tools"] = tools
    if body.get("tool_choice") is not None:
        out["tool_choice"] = _tool_choice(body["tool_choice"])
    form = _response_format(body)
    if form is not None:
        out["response_format"] = form
    return out


# ----------------------------------------------------------------------------------------- response

def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [_text_part(text)] if status == "completed" else []}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}] if status == "completed" else []}


def _call_item(call: tool_calls.ToolCall, status: str = "completed") -> dict[str, Any]:
    return {"id": _new_id("fc"), "type": "function_call", "status": status, "call_id": call.id,
            "name": call.name, "arguments": call.arguments if status == "completed" else ""}


def _usage(finish: Finish | None) -> dict[str, Any] | None:
    if finish is None:
        return None
    return {"input_tokens": finish.prompt_tokens,
            "input_tokens_details": {"cached_tokens": finish.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": finish.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": finish.prompt_tokens + finish.completion_tokens}


class _Answer:
    """What a response says back: its id and request echo, then its output items and end."""

    def __init__(self, rid: str, model: str, body: dict[str, Any], chat: dict[str, Any]) -> None:
        self.rid, self.model, self.body = rid, model, body
        self.created = int(time.time())
        self.tools = chat.get("tools") or []
        self.output: list[dict[str, Any]] = []
        self.finish: Finish | None = None
        self.status = "in_progress"

    def object(self) -> dict[str, Any]:
        b = self.body
        text = b.get("text") if isinstance(b.get("text"), dict) else None
        incomplete = {"reason": "max_output_tokens"} if self.status == "incomplete" else None
        return {"id": self.rid, "object": "response", "created_at": self.created, "status": self.status,
                "completed_at": int(time.time()) if self.status in ("completed", "incomplete") else None,
                "error": None, "incomplete_details": incomplete, "instructions": b.get("instructions"),
                "max_output_tokens": b.get("max_output_tokens"), "model": self.model, "output": self.output,
                "parallel_tool_calls": b.get("parallel_tool_calls", True),
                "previous_response_id": b.get("previous_response_id"), "reasoning": {"effort": None, "summary": None},
                "store": fmt.flag(b, "store", True), "temperature": b.get("temperature", 1.0),
                "text": text or {"format": {"type": "text"}}, "tool_choice": b.get("tool_choice") or "auto",
                "tools": [{"type": "function", **t["function"]} for t in self.tools],
                "top_p": b.get("top_p", 1.0), "truncation": "disabled", "usage": _usage(self.finish),
                "user": b.get("user"), "metadata": b.get("metadata") or {}}

    def end(self, finish: Finish, output: ChatOutput) -> None:
        self.finish = finish
        self.status = "incomplete" if finish.finish_reason == "length" and not output.calls else "completed"

    def assistant_message(self) -> dict[str, Any]:
        """The answer as the chat message a continuation shows the template."""
        text = "".join(p["text"] for item in self.output if item["type"] == "message" for p in item["content"])
        calls = [{"id": i["call_id"], "type": "function", "function": {"name": i["name"], "arguments": i["arguments"]}}
                 for i in self.output if i["type"] == "function_call"]
        return {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}


def _input_items(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages as the Responses API lists input items."""
    items: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "tool":
            items.append({"id": _new_id("fco"), "type": "function_call_output", "call_id": m.get("tool_call_id"),
                          "output": m.get("content") or "", "status": "completed"})
            continue
        part = "output_text" if m["role"] == "assistant" else "input_text"
        if m.get("content") or not m.get("tool_calls"):
            items.append({"id": _new_id("msg"), "type": "message", "role": m["role"], "status": "completed",
                          "content": [{"type": part, "text": m.get("content") or ""}]})
        for call in m.get("tool_calls") or []:
            fn = call.get("function", {})
            items.append({"id": _new_id("fc"), "type": "function_call", "call_id": call.get("id"),
                          "name": fn.get("name"), "arguments": fn.get("arguments"), "status": "completed"})
    return items


# ------------------------------------------------------------------------------------------- stream

class _Events:
    """OpenAI's server-sent events for a response: `event: TYPE`, `data: {type, sequence_number, ...}`;
    output items opened and closed as the answer's parts change kind."""

    def __init__(self, response: web.StreamResponse, answer: _Answer) -> None:
        self.response, self.answer = response, answer
        self.sequence = 0
        self.open: dict[str, Any] | None = None  # the message or reasoning item being written
        self.text: list[str] = []

    async def send(self, kind: str, **fields: Any) -> None:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        await self.response.write(f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode())

    def _where(self) -> dict[str, Any]:
        assert self.open is not None
        return {"item_id": self.open["id"], "output_index": len(self.answer.output), "content_index": 0}

    async def start(self, kind: str) -> None:
        item = (_message_item(_new_id("msg"), "", "in_progress") if kind == "content"
                else _reasoning_item(_new_id("rs"), "", "in_progress"))
        self.open, self.text = item, []
        await self.send("response.output_item.added", output_index=len(self.answer.output), item=item)
        part = _text_part("") if kind == "content" else {"type": "reasoning_text", "text": ""}
        await self.send("response.content_part.added", **self._where(), part=part)

    async def close(self) -> None:
        if self.open is None:
            return
        text = "".join(self.text)
        where = self._where()
        if self.open["type"] == "message":
            await self.send("response.output_text.done", **where, text=text, logprobs=[])
            await self.send("response.content_part.done", **where, part=_text_part(text))
            item = _message_item(self.open["id"], text)
        else:
            await self.send("response.reasoning_text.done", **where, text=text)
            await self.send("response.content_part.done", **where, part={"type": "reasoning_text", "text": text})
            item = _reasoning_item(self.open["id"], text)
        await self.send("response.output_item.done", output_index=where["output_index"], item=item)
        self.answer.output.append(item)
        self.open = None

    async def parts(self, parts: list[Part]) -> None:
        for kind, part in parts:
            if isinstance(part, tool_calls.ToolCall):
                await self.close()
                index = len(self.answer.output)
                item = _call_item(part, "in_progress")
                await self.send("response.output_item.added", output_index=index, item=item)
                await self.send("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                delta=part.arguments)
                await self.send("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                name=part.name, arguments=part.arguments)
                done = {**item, "status": "completed", "arguments": part.arguments}
                await self.send("response.output_item.done", output_index=index, item=done)
                self.answer.output.append(done)
                continue
            if not part:
                continue
            wanted = "message" if kind == "content" else "reasoning"
            if self.open is None or self.open["type"] != wanted:
                await self.close()
                await self.start(kind)
            self.text.append(part)
            delta = "response.output_text.delta" if kind == "content" else "response.reasoning_text.delta"
            extra: dict[str, Any] = {"logprobs": []} if kind == "content" else {}
            await self.send(delta, **self._where(), delta=part, **extra)


async def _stream(request: web.Request, choice: Choice, answer: _Answer, output: ChatOutput,
                  keep: Callable[[], Any]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    events = _Events(response, answer)
    try:
        item = await anext(choice.events)  # an error before the first token still gets its status
        await response.prepare(request)
        await events.send("response.created", response=answer.object())
        await events.send("response.in_progress", response=answer.object())
        while not isinstance(item, Finish):
            await events.parts(output.feed(item.text))
            item = await anext(choice.events)
        await events.parts(output.finish(item.text))
        if events.open is None and not output.calls and not any(o["type"] == "message" for o in answer.output):
            await events.start("content")  # an empty answer is still one (empty) message
        await events.close()
        answer.end(item, output)
        await keep()
        await events.send("response.completed" if answer.status == "completed" else "response.incomplete",
                          response=answer.object())
    except GarrisonError as exc:
        if not response.prepared:
            raise
        with contextlib.suppress(ConnectionError):
            error = exc.to_openai()["error"]
            await events.send("error", code=error["code"], message=error["message"], param=error["param"])
    except (ConnectionError, StopAsyncIteration):
        pass  # the client left; choice_events already cancelled the generation
    finally:
        await close_choices([choice])
    return response


# ------------------------------------------------------------------------------------------- routes

async def create_response(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    state = request.app[STATE]
    check_fields(body, "responses", allow_unknown=state.config.allow_unknown_fields)
    model = model_id(body, request)
    who = principal(request)
    store, stream = fmt.flag(body, "store", True), fmt.flag(body, "stream", False)
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidRequest("'instructions' must be a string", param="instructions")
    previous_id = body.get("previous_response_id")
    if previous_id is not None and not isinstance(previous_id, str):
        raise InvalidRequest("'previous_response_id' must be a response id", param="previous_response_id")
    responses = response_store(request.app)
    history: list[dict[str, Any]] = []
    if previous_id is not None:
        if not _ID.match(previous_id):
            raise NotFound(f"no response with id {previous_id!r}", code="response_not_found",
                           param="previous_response_id")
        try:
            history = (await asyncio.to_thread(responses.load, previous_id, who.key_id)).messages
        except NotFound as exc:
            exc.param = "previous_response_id"
            raise
    system = [{"role": "system", "content": instructions}] if instructions else []
    new = fmt.chat_messages({"messages": input_messages(body.get("input"))})
    chat = chat_body(body, [*system, *history, *new])
    params = await asyncio.to_thread(fmt.sampling_params, chat, default_max_tokens=None)
    tool_use, template_kwargs = tool_calls.tool_request(chat), fmt.template_kwargs(chat)
    if tool_use is not None and tool_use.forced and params.grammar is not None:
        raise InvalidRequest("tool_choice required or a named function sets the grammar itself: give it "
                             "without text.format", param="tool_choice")
    privacy = state.policy.inference_privacy
    # Screened before the model is touched; history was screened when it was stored.
    screened = await privacy.screen_messages([*system, *new])
    system, new = screened[:len(system)], screened[len(system):]
    messages = [*system, *history, *new]
    answer = _Answer(_new_id("resp"), model, body, chat)

    async def keep() -> None:
        if store:
            record = StoredResponse(answer.rid, who.key_id, model, float(answer.created), answer.object(),
                                    [*history, *new, answer.assistant_message()], _input_items(new))
            await asyncio.to_thread(responses.save, record)
            await asyncio.to_thread(responses.sweep_if_due)

    async with state.manager.use(model, "generate") as loaded:
        engine = loaded.generator
        tokens, params, outputs = await chat_prompt(engine, chat, messages, tool_use, template_kwargs, params)
        output = outputs() if outputs is not None else ChatOutput()
        req = GenerationRequest(prompt_tokens=tokens, params=params, deadline=deadline(request),
                                lora_path=loaded.lora_path)
        try:
            choices = await open_choices(engine, [req], [""], request, privacy)
            if stream:
                return await _stream(request, choices[0], answer, output, keep)
            collected = (await collect_all(choices))[0]
        except ContextLengthExceeded as exc:
            exc.param = "input"
            raise
    parts = output.finish(collected.text)
    reasoning = "".join(p for k, p in parts if k == "reasoning" and isinstance(p, str))
    content = "".join(p for k, p in parts if k == "content" and isinstance(p, str))
    if reasoning:
        answer.output.append(_reasoning_item(_new_id("rs"), reasoning))
    if content or not output.calls:
        answer.output.append(_message_item(_new_id("msg"), content))
    answer.output += [_call_item(call) for call in output.calls]
    answer.end(collected.finish, output)
    await keep()
    return json_response(answer.object())


def _path_id(request: web.Request) -> str:
    rid = request.match_info["response_id"]
    if not _ID.match(rid):
        raise NotFound(f"no response with id {rid!r}", code="response_not_found")
    return rid


async def get_response(request: web.Request) -> web.StreamResponse:
    rid = _path_id(request)
    record = await asyncio.to_thread(response_store(request.app).load, rid, principal(request).key_id)
    return json_response(record.response)


async def delete_response(request: web.Request) -> web.StreamResponse:
    rid = _path_id(request)
    await asyncio.to_thread(response_store(request.app).delete, rid, principal(request).key_id)
    return json_response({"id": rid, "object": "response", "deleted": True})


async def list_input_items(request: web.Request) -> web.StreamResponse:
    rid = _path_id(request)
    record = await asyncio.to_thread(response_store(request.app).load, rid, principal(request).key_id)
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("'order' must be asc or desc", param="order")
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        limit = -1
    if not 1 <= limit <= 100:
        raise InvalidRequest("'limit' must be an integer from 1 to 100", param="limit")
    items = record.input_items if order == "asc" else list(reversed(record.input_items))
    after = request.query.get("after")
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                          "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})


_TEXT_PART = {"type": "object", "required": ["type", "text"], "properties": {
    "type": {"type": "string", "enum": ["input_text", "output_text"]}, "text": {"type": "string"}}}
_ITEM = {"type": "object", "properties": {
    "type": {"type": "string", "enum": ["message", "function_call", "function_call_output", "reasoning"]},
    "role": {"type": "string", "enum": ["user", "assistant", "system", "developer"]},
    "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]},
    "call_id": {"type": "string"}, "name": {"type": "string"}, "arguments": {"type": "string"},
    "output": {"type": "string"}}}
_BODY = {"type": "object", "required": ["model", "input"], "properties": {
    "model": {"type": "string"}, "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": _ITEM}]},
    "instructions": {"type": "string"}, "stream": {"type": "boolean"},
    "store": {"type": "boolean", "description": "keep the response (sealed) for previous_response_id; default true"},
    "previous_response_id": {"type": "string"}, "max_output_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2}, "top_p": {"type": "number", "minimum": 0,
                                                                             "maximum": 1},
    "tools": {"type": "array", "items": {"type": "object", "required": ["type", "name"], "properties": {
        "type": {"type": "string", "enum": ["function"]}, "name": {"type": "string"},
        "description": {"type": "string"}, "parameters": {"type": "object"}, "strict": {"type": "boolean"}}}},
    "tool_choice": {"oneOf": [{"type": "string", "enum": ["none", "auto", "required"]},
                              {"type": "object", "required": ["type", "name"]}]},
    "parallel_tool_calls": {"type": "boolean"},
    "text": {"type": "object", "properties": {"format": {"type": "object", "required": ["type"], "properties": {
        "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]}, "name": {"type": "string"},
        "schema": {"type": "object"}, "strict": {"type": "boolean"}}}}},
    "metadata": {"type": "object"}}}
_ERRORS = {"400": "invalid request (OpenAI error shape)", "401": "missing or unknown key",
           "403": "scope or model grant missing",
           "404": "model not found, or previous_response_id unknown to this key (response_not_found)",
           "429": "the model's queue is full (Retry-After)", "503": "the model's runner crashed",
           "504": "request deadline passed"}
_NOT_FOUND = {"200": "OK", "401": "missing or unknown key",
              "404": "no such response for this key (response_not_found): another key's responses do not exist to it"}

ROUTES = (
    Route("POST", "/v1/responses", create_response, "infer",
          "OpenAI's Responses API over the chat path: `input` a string or items (messages, function_call, "
          "function_call_output), `instructions`, function `tools` and `tool_choice`, `text.format` json_schema or "
          "json_object enforced by a grammar; output items reasoning, message and function_call; `stream` for "
          "OpenAI's typed events (response.created ... response.completed). `store` (default true) keeps the "
          "conversation sealed on the appliance for `previous_response_id` (responses_retention_days).",
          "inference", body=_BODY, responses={"200": "OK", **_ERRORS}, streaming=True),
    Route("GET", "/v1/responses/{response_id}", get_response, "infer", "A stored response (its key's only).",
          "inference", responses=_NOT_FOUND),
    Route("DELETE", "/v1/responses/{response_id}", delete_response, "infer",
          "Delete a stored response: its key is destroyed (crypto-shredding).", "inference", responses=_NOT_FOUND),
    Route("GET", "/v1/responses/{response_id}/input_items", list_input_items, "infer",
          "A stored response's input items (as screened), newest first unless `order=asc`.", "inference",
          query=(("order", "string", "asc or desc (default)"), ("limit", "integer", "1 to 100 (default 20)"),
                 ("after", "string", "an item id: the page after it")),
          responses=_NOT_FOUND),
)
