"""OpenAI-compatible inference routes: /v1/models, chat and text completions, embeddings.

The handlers only translate (garrison.serving.openai_format) and hold a model for the
request (garrison.serving.manager); batching, sampling and KV reuse live in the engine.
A client that goes away mid-stream cancels its generation, which frees the engine slot
at the next decode step.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncGenerator
from functools import partial
from typing import Any

import numpy as np
from aiohttp import web

from garrison.daemon.http import json_response, principal, read_json
from garrison.daemon.routing import Route
from garrison.daemon.state import STATE
from garrison.daemon.usage import usage_of
from garrison.engine.protocols import GenerationEngine
from garrison.engine.types import ContextLengthExceeded, Finish, GenerationRequest, SamplingParams, TokenEvent
from garrison.errors import GarrisonError, InvalidRequest
from garrison.models.names import check_model_id
from garrison.operations.inference_privacy import ResponseFilter, filtered_events
from garrison.policies.access import allowed, authorize
from garrison.serving import openai_format as fmt
from garrison.serving.reasoning import ReasoningSplitter, ReasoningSyntax, reasoning_syntax, split_text

DEFAULT_MAX_TOKENS = 256
MAX_EMBED_INPUTS = 2048


def _model_id(body: dict[str, Any], request: web.Request) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required", param="model")
    check_model_id(model)
    authorize(principal(request), "infer", ("model", model))
    usage_of(request).model = model
    return model


def _deadline(request: web.Request) -> float:
    return time.monotonic() + request.app[STATE].config.request_timeout_s


def _disconnected(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def list_models(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    records = await asyncio.to_thread(request.app[STATE].models.list)
    data = [{"id": r.name, "object": "model", "created": int(r.created_at), "owned_by": "garrison"}
            for r in records if r.servable and allowed(who, "infer", ("model", r.name))]
    return json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.StreamResponse:
    name = request.match_info["model"]
    check_model_id(name)
    authorize(principal(request), "infer", ("model", name))
    record = await asyncio.to_thread(request.app[STATE].models.get, name)
    return json_response({"id": record.name, "object": "model", "created": int(record.created_at),
                          "owned_by": "garrison"})


async def _events(engine: GenerationEngine, req: GenerationRequest,
                  request: web.Request) -> AsyncGenerator[TokenEvent | Finish, None]:
    stream = engine.generate(req)
    generated = 0  # the tokens of a generation cut short, which never reaches its Finish
    try:
        async for item in stream:
            if isinstance(item, Finish):
                usage_of(request).add(item.prompt_tokens, item.completion_tokens)
                generated = -1
            elif generated >= 0:
                generated += 1
            yield item
            if _disconnected(request):
                stream.cancel()
                return
    finally:
        if generated > 0:
            usage_of(request).add(len(req.prompt_tokens), generated)
        await stream.aclose()


def _screened(events: AsyncGenerator[TokenEvent | Finish, None], screen: ResponseFilter | None,
              req: GenerationRequest) -> AsyncGenerator[TokenEvent | Finish, None]:
    return events if screen is None else filtered_events(events, screen, len(req.prompt_tokens))


async def _collect(engine: GenerationEngine, req: GenerationRequest, request: web.Request,
                   screen: ResponseFilter | None) -> fmt.Collected:
    parts: list[str] = []
    events: list[TokenEvent] = []
    finish: Finish | None = None
    async for item in _screened(_events(engine, req, request), screen, req):
        if isinstance(item, Finish):
            finish = item
            parts.append(item.text)
        else:
            parts.append(item.text)
            events.append(item)
    if finish is None:
        raise ConnectionResetError("the client disconnected")  # nobody reads this response
    return fmt.Collected(text="".join(parts), finish=finish, logprobs=events)


async def _stream(request: web.Request, engine: GenerationEngine, req: GenerationRequest, model: str, kind: str,
                  include_usage: bool, screen: ResponseFilter | None,
                  syntax: ReasoningSyntax | None = None) -> web.StreamResponse:
    rid = fmt.new_id("chatcmpl" if kind == "chat" else "cmpl")
    created = int(time.time())
    chunk = fmt.chat_chunk if kind == "chat" else fmt.completion_chunk
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    events = _screened(_events(engine, req, request), screen, req)
    splitter = None if syntax is None else ReasoningSplitter(syntax)
    first_item = await events.__anext__()  # errors before the first token still get a proper status
    await response.prepare(request)
    try:
        if kind == "chat":
            await response.write(fmt.sse(chunk(rid, model, created, "", None, first=True)))
        item: TokenEvent | Finish = first_item
        while True:
            if isinstance(item, Finish):
                parts = [("content", item.text)] if splitter is None else splitter.feed(item.text) + splitter.finish()
                for part_kind, part in parts:
                    if part:
                        await response.write(fmt.sse(chunk(rid, model, created, part, None,
                                                           reasoning=part_kind == "reasoning")))
                final = chunk(rid, model, created, None if kind == "chat" else "", item.finish_reason)
                await response.write(fmt.sse(final))
                if include_usage:
                    await response.write(fmt.sse({"id": rid, "object": final["object"], "created": created,
                                                  "model": model, "choices": [], "usage": fmt.usage(item)}))
                await response.write(fmt.sse("[DONE]"))
                break
            if splitter is None:
                if item.text or item.logprob is not None:
                    await response.write(fmt.sse(chunk(rid, model, created, item.text, None, item)))
            else:  # thinking apart: a marker's tokens and a held tail send no text (their logprobs still go)
                parts = splitter.feed(item.text) or [("content", "")] * (item.logprob is not None)
                for n, (part_kind, part) in enumerate(parts):
                    await response.write(fmt.sse(chunk(rid, model, created, part, None, None if n else item,
                                                       reasoning=part_kind == "reasoning")))
            item = await events.__anext__()
    except GarrisonError as exc:
        with contextlib.suppress(ConnectionError):
            await response.write(fmt.sse(exc.to_openai()))
    except (ConnectionError, StopAsyncIteration):
        pass  # the client left; _events already cancelled the generation
    finally:
        await events.aclose()
    return response


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    body = await read_json(request)
    model = _model_id(body, request)
    # Off the event loop: a response_format schema becomes a grammar here (CPU-bound, up to MAX_SCHEMA_BYTES).
    params: SamplingParams = await asyncio.to_thread(fmt.sampling_params, body,
                                                     default_max_tokens=DEFAULT_MAX_TOKENS)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    state = request.app[STATE]
    privacy = state.policy.inference_privacy
    if params.logprobs and privacy.responses.active:
        raise InvalidRequest("logprobs would show the response's tokens before the privacy policy screens them "
                             "([inference_privacy.responses])", code="logprobs_unavailable", param="logprobs")
    # Screened before the model is touched: a denied prompt costs no load, and a redacted one is all it sees.
    if kind == "chat":
        messages = await privacy.screen_messages(fmt.chat_messages(body))
        tools, template_kwargs = fmt.chat_tools(body), fmt.template_kwargs(body)
    else:
        prompt = (await privacy.screen_prompts([fmt.completion_prompt(body)], ["prompt"]))[0]
    async with state.manager.use(model, "generate") as loaded:
        engine = loaded.generator
        if kind == "chat":
            text = await asyncio.to_thread(partial(fmt.render_chat, engine.chat_template, messages,
                                                   bos_token=engine.bos_token, eos_token=engine.eos_token,
                                                   tools=tools, kwargs=template_kwargs))
            syntax = reasoning_syntax(engine.chat_template, text, body)
            tokens = await engine.tokenize(text, add_special=False, parse_special=True)
        else:
            tokens = await engine.tokenize(prompt, add_special=True, parse_special=False)
            syntax = None
        req = GenerationRequest(prompt_tokens=tokens, params=params, deadline=_deadline(request),
                                lora_path=loaded.lora_path)
        try:
            if stream:
                return await _stream(request, engine, req, model, kind, include_usage,
                                     await privacy.response_filter(), syntax)
            collected = await _collect(engine, req, request, await privacy.response_filter())
            if syntax is not None:
                collected.reasoning, collected.text = split_text(syntax, collected.text)
        except ContextLengthExceeded as exc:
            exc.param = "messages" if kind == "chat" else "prompt"  # name the field the client sent
            raise
    rid = fmt.new_id("chatcmpl" if kind == "chat" else "cmpl")
    make = fmt.chat_response if kind == "chat" else fmt.completion_response
    return json_response(make(rid, model, collected, params.logprobs))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


def _embedding_inputs(body: dict[str, Any]) -> list[str]:
    raw = body.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) and t for t in inputs):
        raise InvalidRequest("'input' must be a non-empty string or list of non-empty strings", param="input")
    if len(inputs) > MAX_EMBED_INPUTS:
        raise InvalidRequest(f"at most {MAX_EMBED_INPUTS} inputs per request", param="input")
    return inputs


async def embeddings(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model = _model_id(body, request)
    inputs = _embedding_inputs(body)
    fields = [f"input[{i}]" for i in range(len(inputs))] if isinstance(body["input"], list) else ["input"]
    inputs = await request.app[STATE].policy.inference_privacy.screen_prompts(inputs, fields)
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be float or base64", param="encoding_format")
    async with request.app[STATE].manager.use(model, "embed") as loaded:
        result = await loaded.embedder.embed(inputs)
    vectors, tokens = result.vectors, result.total_tokens
    usage_of(request).add(int(tokens), 0)
    data = []
    for i, vector in enumerate(np.asarray(vectors, dtype=np.float32)):
        value: Any = (base64.b64encode(vector.tobytes()).decode() if encoding == "base64"
                      else [float(x) for x in vector])
        data.append({"object": "embedding", "index": i, "embedding": value})
    return json_response({"object": "list", "data": data, "model": model,
                          "usage": {"prompt_tokens": int(tokens), "total_tokens": int(tokens)}})


def _between(kind: str, low: float, high: float) -> dict[str, Any]:
    return {"type": kind, "minimum": low, "maximum": high}


# The bounds openai_format.sampling_params enforces; anything outside them is a 400.
_MODEL = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*(:[a-z0-9][a-z0-9._-]*)?$", "maxLength": 129}
_TEXT = {"type": "string", "minLength": 1}
_GEN_BODY: dict[str, Any] = {
    "type": "object", "required": ["model"],
    "properties": {"model": _MODEL, "stream": {"type": "boolean"},
                   "max_tokens": _between("integer", 1, 1 << 20),
                   "max_completion_tokens": _between("integer", 1, 1 << 20),
                   "n": {"type": "integer", "enum": [1]}, "temperature": _between("number", 0, 2),
                   "top_p": _between("number", 0, 1), "top_k": _between("integer", 0, 1 << 20),
                   "min_p": _between("number", 0, 1), "frequency_penalty": _between("number", -2, 2),
                   "presence_penalty": _between("number", -2, 2), "repeat_penalty": _between("number", 0.01, 10),
                   "seed": _between("integer", -(1 << 63), (1 << 64) - 1),
                   "stop": {"oneOf": [_TEXT, {"type": "array", "items": _TEXT, "maxItems": fmt.MAX_STOP}]},
                   "logprobs": {"oneOf": [{"type": "boolean"}, _between("integer", 0, 5)]},
                   "top_logprobs": _between("integer", 0, 20),
                   "ignore_eos": {"type": "boolean", "description": "generate max_tokens tokens (llama.cpp's "
                                                                   "server extension; load tests)"}}}
_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
    "content": {"oneOf": [{"type": "string"}, {"type": "null"}, {"type": "array", "items": {
        "type": "object", "required": ["type", "text"],
        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}}]},
    "tool_calls": {"type": "array", "items": {"type": "object"}, "description": "assistant messages only"}}}
_RESPONSE_FORMAT = {"type": "object", "required": ["type"], "properties": {
    "type": {"type": "string", "enum": ["text", "json_object", "json_schema"]},
    "json_schema": {"type": "object", "required": ["schema"],
                    "properties": {"name": {"type": "string"}, "schema": {"type": "object"}}}}}

_ERRORS = {"400": "invalid request (OpenAI error shape)", "401": "missing or unknown key",
           "403": "scope or model grant missing", "404": "model not found",
           "429": "the model's queue is full (Retry-After)",
           "503": "the model's runner crashed (engine_crashed, Retry-After) or the model is failed (model_failed)",
           "504": "request deadline passed"}

ROUTES = (
    Route("GET", "/v1/models", list_models, "infer", "Servable models this key may use (OpenAI).", "inference"),
    Route("GET", "/v1/models/{model}", get_model, "infer", "One model (OpenAI).", "inference",
          responses={"200": "OK", "404": "model not found"}),
    Route("POST", "/v1/chat/completions", chat_completions, "infer",
          "Chat completion with the model's chat template; `stream` for server-sent events; "
          "`response_format` json_object/json_schema enforced by a grammar; `chat_template_kwargs` are variables "
          "for the template (`enable_thinking`); `tools` are shown to the template. A template that marks thinking "
          "(`<think>`) gives it in `reasoning_content` (streamed: `delta.reasoning_content`) unless "
          "`reasoning_format` is `none`.", "inference",
          body={**_GEN_BODY, "required": ["model", "messages"],
                "properties": {**_GEN_BODY["properties"], "messages": {"type": "array", "minItems": 1,
                                                                          "items": _MESSAGE},
                               "response_format": _RESPONSE_FORMAT, "stream_options": {"type": "object"},
                               "tools": {"type": "array"}, "chat_template_kwargs": {"type": "object"},
                               "reasoning_format": {"type": "string", "enum": ["auto", "deepseek", "none"]}}},
          responses={"200": "OK", **_ERRORS}, streaming=True),
    Route("POST", "/v1/completions", completions, "infer", "Text completion; `stream` for server-sent events.",
          "inference", body={**_GEN_BODY, "required": ["model", "prompt"],
                             "properties": {**_GEN_BODY["properties"], "prompt": {"oneOf": [
                                 _TEXT, {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": 1}]}}},
          responses={"200": "OK", **_ERRORS}, streaming=True),
    Route("POST", "/v1/embeddings", embeddings, "infer", "Embeddings from an encoder model (pooling and "
          "normalization from the model's configuration).", "inference",
          body={"type": "object", "required": ["model", "input"],
                "properties": {"model": _MODEL, "input": {"oneOf": [_TEXT, {
                                   "type": "array", "items": _TEXT, "minItems": 1, "maxItems": MAX_EMBED_INPUTS}]},
                               "encoding_format": {"type": "string", "enum": ["float", "base64"]}}},
          responses={"200": "OK", **_ERRORS}),
)
