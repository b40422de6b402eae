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
from collections.abc import AsyncGenerator, Callable
from typing import Any

import numpy as np
from aiohttp import web

from garrison.daemon.api.generation import (
    Choice,
    chat_prompt,
    close_choices,
    collect_all,
    deadline,
    embed,
    model_id,
    open_choices,
)
from garrison.daemon.http import json_response, principal, read_json
from garrison.daemon.routing import Route
from garrison.daemon.state import STATE
from garrison.daemon.usage import usage_of
from garrison.engine.protocols import GenerationEngine
from garrison.engine.types import ContextLengthExceeded, Finish, GenerationRequest, SamplingParams, TokenEvent
from garrison.errors import GarrisonError, InvalidRequest
from garrison.models.names import check_model_id
from garrison.operations.inference_privacy import InferencePrivacyPolicy
from garrison.policies.access import allowed, authorize
from garrison.serving import openai_format as fmt
from garrison.serving import tool_calls
from garrison.serving.chat_output import ChatOutput, Part, whole
from garrison.serving.openai_fields import CHAT_FIELDS, check_fields

MAX_EMBED_INPUTS = 2048


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


def _usage(choices: list[Choice], finishes: dict[int, Finish]) -> dict[str, Any]:
    firsts: dict[int, Finish] = {}
    for choice in choices:
        if choice.index in finishes:
            firsts.setdefault(choice.prompt, finishes[choice.index])
    return fmt.choices_usage(list(firsts.values()), list(finishes.values()))


async def _merged(choices: list[Choice], firsts: list[TokenEvent | Finish]
                  ) -> AsyncGenerator[tuple[Choice, TokenEvent | Finish], None]:
    """The choices' items as they come (OpenAI interleaves choices in one stream), each choice's first
    item (already read) first."""
    live: dict[asyncio.Future[TokenEvent | Finish], Choice] = {}
    try:
        for choice, item in zip(choices, firsts, strict=True):
            yield choice, item
            if not isinstance(item, Finish):
                live[asyncio.ensure_future(anext(choice.events))] = choice
        while live:
            done, _ = await asyncio.wait(live, return_when=asyncio.FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: live[f].index):
                choice = live.pop(future)
                try:
                    item = future.result()
                except StopAsyncIteration:
                    continue
                yield choice, item
                if not isinstance(item, Finish):
                    live[asyncio.ensure_future(anext(choice.events))] = choice
    finally:
        for future in live:
            future.cancel()
        await asyncio.gather(*live, return_exceptions=True)


def merged_choices(choices: list[Choice], firsts: list[TokenEvent | Finish]
                   ) -> contextlib.aclosing[AsyncGenerator[tuple[Choice, TokenEvent | Finish], None]]:
    """`_merged`, closed when the block ends however it ends: its pending reads are cancelled there, before the
    choices themselves are closed (closing a choice while a read of it is pending is a RuntimeError)."""
    return contextlib.aclosing(_merged(choices, firsts))


def _part_chunks(rid: str, model: str, created: int, parts: list[Part], output: ChatOutput,
                 event: TokenEvent | None) -> list[dict[str, Any]]:
    """Chunks for a chat answer's parts; the token's logprobs ride on the first text part."""
    out: list[dict[str, Any]] = []
    for kind, part in parts:
        if isinstance(part, tool_calls.ToolCall):
            out += fmt.tool_call_chunks(rid, model, created, part.openai(), output.calls.index(part))
        elif part or (event is not None and kind == "content"):
            out.append(fmt.chat_chunk(rid, model, created, part, None, event, reasoning=kind == "reasoning"))
            event = None
    if event is not None:  # a held token (a marker's, a call's) still sends its logprobs
        out.append(fmt.chat_chunk(rid, model, created, "", None, event))
    return out


async def _stream(request: web.Request, choices: list[Choice], model: str, kind: str, include_usage: bool,
                  outputs: Callable[[], ChatOutput] | None = None) -> web.StreamResponse:
    rid = fmt.new_id("chatcmpl" if kind == "chat" else "cmpl")
    created = int(time.time())
    chunk = fmt.chat_chunk if kind == "chat" else fmt.completion_chunk
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    splitters = {c.index: None if outputs is None else outputs() for c in choices}
    finishes: dict[int, Finish] = {}
    try:
        # Errors before the first token still get a proper status: every choice's first item before the head.
        firsts = [await anext(choice.events) for choice in choices]
        await response.prepare(request)
        for choice in choices:
            if kind == "chat":
                await response.write(fmt.sse(fmt.with_index(chunk(rid, model, created, "", None, first=True),
                                                            choice.index)))
            elif choice.echo:
                await response.write(fmt.sse(fmt.with_index(chunk(rid, model, created, choice.echo, None),
                                                            choice.index)))
        async with merged_choices(choices, firsts) as merged:
            async for choice, item in merged:
                splitter = splitters[choice.index]
                out: list[dict[str, Any]] = []
                if isinstance(item, Finish):
                    finishes[choice.index] = item
                    reason: str = item.finish_reason
                    if splitter is None:
                        out += [chunk(rid, model, created, item.text, None)] if item.text else []
                    else:
                        out += _part_chunks(rid, model, created, splitter.finish(item.text), splitter, None)
                        reason = splitter.finish_reason(item.finish_reason)
                    out.append(chunk(rid, model, created, None if kind == "chat" else "", reason))
                elif splitter is None:
                    if item.text or item.logprob is not None:
                        out.append(chunk(rid, model, created, item.text, None, item))
                else:  # thinking and tool calls apart: a marker's tokens and a held tail send no text (logprobs go)
                    out += _part_chunks(rid, model, created, splitter.feed(item.text), splitter,
                                        item if item.logprob is not None else None)
                for data in out:
                    await response.write(fmt.sse(fmt.with_index(data, choice.index)))
        if include_usage:
            await response.write(fmt.sse({"id": rid, "object": chunk(rid, model, created, "", None)["object"],
                                          "created": created, "model": model, "choices": [],
                                          "usage": _usage(choices, finishes)}))
        await response.write(fmt.sse("[DONE]"))
    except GarrisonError as exc:
        if not response.prepared:
            raise
        with contextlib.suppress(ConnectionError):
            await response.write(fmt.sse(exc.to_openai()))
    except (ConnectionError, StopAsyncIteration):
        pass  # the client left; choice_events already cancelled the generation
    finally:
        await close_choices(choices)
    return response


async def _prompt_tokens(engine: GenerationEngine, prompt: str | list[int], field: str, echo: bool,
                         privacy: InferencePrivacyPolicy) -> tuple[list[int], str]:
    """A /v1/completions prompt as token ids, and its text for echo. Token ids are screened too: as
    text, and a redacted prompt is tokenized again from the redacted text."""
    if isinstance(prompt, str):
        return await engine.tokenize(prompt, add_special=True, parse_special=False), prompt
    tokens = list(prompt)
    if not (echo or privacy.prompts.active):
        return tokens, ""
    text = await engine.detokenize(tokens)
    screened = (await privacy.screen_prompts([text], [field]))[0]
    if screened != text:
        return await engine.tokenize(screened, add_special=True, parse_special=False), screened
    return tokens, text


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    body = await read_json(request)
    state = request.app[STATE]
    check_fields(body, kind, allow_unknown=state.config.allow_unknown_fields)
    model = model_id(body, request)
    # Off the event loop: a response_format schema becomes a grammar here (CPU-bound, up to MAX_SCHEMA_BYTES).
    # No max_tokens: to the end of the context, as OpenAI and llama-server do.
    params: SamplingParams = await asyncio.to_thread(fmt.sampling_params, body, default_max_tokens=None)
    n = fmt.choice_count(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be true or false", param="stream")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise InvalidRequest("'echo' must be true or false", param="echo")
    if echo and params.logprobs:
        raise InvalidRequest("echo with logprobs (the prompt's own logprobs) is not supported",
                             code="unsupported_parameter", param="echo")
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    privacy = state.policy.inference_privacy
    if params.logprobs and privacy.responses.active:
        raise InvalidRequest("logprobs would show the response's tokens before the privacy policy screens them "
                             "([inference_privacy.responses])", code="logprobs_unavailable", param="logprobs")
    # Screened before the model is touched: a denied prompt costs no load, and a redacted one is all it sees.
    if kind == "chat":
        messages = await privacy.screen_messages(fmt.chat_messages(body))
        tool_use, template_kwargs = tool_calls.tool_request(body), fmt.template_kwargs(body)
        if tool_use is not None and tool_use.forced and params.grammar is not None:
            raise InvalidRequest("tool_choice required or a named function sets the grammar itself: give it "
                                 "without response_format or grammar", param="tool_choice")
    else:
        prompts = fmt.completion_prompts(body)
        if len(prompts) * n > fmt.MAX_CHOICES:
            raise InvalidRequest(f"{len(prompts)} prompts of {n} choices each: at most {fmt.MAX_CHOICES} choices "
                                 "per request", param="n")
        fields = ["prompt"] if len(prompts) == 1 else [f"prompt[{i}]" for i in range(len(prompts))]
        texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        screened = await privacy.screen_prompts([str(prompts[i]) for i in texts], [fields[i] for i in texts])
        for i, text in zip(texts, screened, strict=True):
            prompts[i] = text
    async with state.manager.use(model, "generate") as loaded:
        engine = loaded.generator
        outputs: Callable[[], ChatOutput] | None = None
        if kind == "chat":
            tokens, params, outputs = await chat_prompt(engine, body, messages, tool_use, template_kwargs, params)
            token_lists = [tokens]
            echoes = [""]
        else:
            pairs = [await _prompt_tokens(engine, p, f, echo, privacy) for p, f in zip(prompts, fields, strict=True)]
            token_lists = [tokens for tokens, _ in pairs]
            echoes = [text if echo else "" for _, text in pairs]
        reqs = [GenerationRequest(prompt_tokens=tokens, params=params, deadline=deadline(request),
                                  lora_path=loaded.lora_path, n=n) for tokens in token_lists]
        try:
            choices = await open_choices(engine, reqs, echoes, request, privacy)
            if stream:
                return await _stream(request, choices, model, kind, include_usage, outputs)
            collected = await collect_all(choices)
        except ContextLengthExceeded as exc:
            exc.param = "messages" if kind == "chat" else "prompt"  # name the field the client sent
            raise
    rid = fmt.new_id("chatcmpl" if kind == "chat" else "cmpl")
    make = fmt.chat_response if kind == "chat" else fmt.completion_response
    answers = []
    for choice, one in zip(choices, collected, strict=True):
        if outputs is not None:
            output = outputs()
            one.reasoning, one.text, calls = whole(output, one.text)
            one.tool_calls = [call.openai() for call in calls] or None
            one.finish_reason = output.finish_reason(one.finish.finish_reason)
        one.text = choice.echo + one.text
        answers.append(fmt.with_index(make(rid, model, one, params.logprobs), choice.index))
    response = answers[0]
    response["choices"] = [answer["choices"][0] for answer in answers]
    response["usage"] = _usage(choices, {c.index: one.finish for c, one in zip(choices, collected, strict=True)})
    return json_response(response)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


def _embedding_inputs(body: dict[str, Any]) -> list[str | list[int]]:
    """OpenAI's four input shapes: a string, a list of strings, a list of token ids, a list of such lists
    (and, as llama-server takes them, a list mixing strings and token lists)."""
    raw = body.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(fmt.is_token(t) for t in raw)):
        inputs: list[Any] = [raw]
    else:
        inputs = raw if isinstance(raw, list) else []
    if not inputs or not all((isinstance(t, str) and t) or (isinstance(t, list) and t and all(
            fmt.is_token(i) for i in t)) for t in inputs):
        raise InvalidRequest("'input' must be a non-empty string, a list of token ids, or a list of either",
                             param="input")
    if len(inputs) > MAX_EMBED_INPUTS:
        raise InvalidRequest(f"at most {MAX_EMBED_INPUTS} inputs per request", param="input")
    return inputs


async def embeddings(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    state = request.app[STATE]
    check_fields(body, "embedding", allow_unknown=state.config.allow_unknown_fields)
    model = model_id(body, request)
    inputs = _embedding_inputs(body)
    fields = [f"input[{i}]" for i in range(len(inputs))] if isinstance(body["input"], list) else ["input"]
    privacy = state.policy.inference_privacy
    text_at = [i for i, x in enumerate(inputs) if isinstance(x, str)]
    screened = await privacy.screen_prompts([str(inputs[i]) for i in text_at], [fields[i] for i in text_at])
    for i, text in zip(text_at, screened, strict=True):
        inputs[i] = text
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise InvalidRequest("'encoding_format' must be float or base64", param="encoding_format")
    # An over-long input is refused (400 context_length_exceeded), as OpenAI does, unless the request asks
    # for it to be cut at the model's limit (Garrison's `truncate`).
    truncate = body.get("truncate", False)
    if not isinstance(truncate, bool):
        raise InvalidRequest("'truncate' must be true or false", param="truncate")
    dimensions = body.get("dimensions")
    async with state.manager.use(model, "embed") as loaded:
        embedder = loaded.embedder
        if dimensions is not None and dimensions != embedder.dimensions:
            raise InvalidRequest(f"this model's embeddings have {embedder.dimensions} dimensions; it cannot "
                                 "shorten them", code="unsupported_parameter", param="dimensions")
        result = await embed(embedder, inputs, fields, truncate, privacy)
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
                   "n": _between("integer", 1, fmt.MAX_CHOICES), "temperature": _between("number", 0, 2),
                   "top_p": _between("number", 0, 1), "top_k": _between("integer", 0, 1 << 20),
                   "min_p": _between("number", 0, 1), "frequency_penalty": _between("number", -2, 2),
                   "presence_penalty": _between("number", -2, 2), "repeat_penalty": _between("number", 0.01, 10),
                   "seed": _between("integer", -(1 << 63), (1 << 64) - 1),
                   "stop": {"oneOf": [_TEXT, {"type": "array", "items": _TEXT, "maxItems": fmt.MAX_STOP}]},
                   "logprobs": {"oneOf": [{"type": "boolean"}, _between("integer", 0, 5)]},
                   "top_logprobs": _between("integer", 0, 20),
                   "logit_bias": {"type": "object", "maxProperties": fmt.MAX_LOGIT_BIAS,
                                  "propertyNames": {"pattern": "^[0-9]{1,9}$"},
                                  "additionalProperties": _between("number", -100, 100),
                                  "description": "token id -> bias added to its logit; -100 bans the token"},
                   "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
                   "user": {"type": "string", "description": "accepted and ignored"},
                   "repeat_last_n": _between("integer", 0, 1 << 20),
                   "grammar": {"type": "string", "minLength": 1, "maxLength": fmt.MAX_GRAMMAR_BYTES,
                               "description": "a GBNF grammar (llama-server's extension)"},
                   "cache_prompt": {"type": "boolean", "description": "accepted and ignored (always cached)"},
                   "ignore_eos": {"type": "boolean", "description": "generate max_tokens tokens (llama.cpp's "
                                                                   "server extension; load tests)"}},
    "additionalProperties": False}
_TOKENS = {"type": "array", "items": _between("integer", 0, (1 << 31) - 1), "minItems": 1}
_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
    "content": {"oneOf": [{"type": "string"}, {"type": "null"}, {"type": "array", "items": {
        "type": "object", "required": ["type", "text"],
        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}}]},
    "tool_calls": {"type": "array", "items": {"type": "object"}, "description": "assistant messages only"}}}
_TOOL = {"type": "object", "required": ["function"], "properties": {
    "type": {"type": "string", "enum": ["function"]},
    "function": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "minLength": 1}, "description": {"type": "string"},
        "parameters": {"type": "object"}, "strict": {"type": "boolean"}}}}}
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
          "for the template (`enable_thinking`); `tools` are shown to the template and the model's calls come back "
          "as `tool_calls` (Hermes/Qwen, Mistral, Llama 3 and a generic JSON form, chosen from the template; "
          "streamed as `delta.tool_calls`); `tool_choice` `required` or a named function forces calls with a "
          "grammar from the tools' schemas; `parallel_tool_calls` false keeps one call. A template that marks thinking "
          "(`<think>`) gives it in `reasoning_content` (streamed: `delta.reasoning_content`) unless "
          "`reasoning_format` is `none`.", "inference",
          body={**_GEN_BODY, "required": ["model", "messages"],
                "properties": {**_GEN_BODY["properties"], "messages": {"type": "array", "minItems": 1,
                                                                          "items": _MESSAGE},
                               "response_format": _RESPONSE_FORMAT, "tools": {"type": "array", "items": _TOOL},
                               "tool_choice": {"oneOf": [
                                   {"type": "string", "enum": ["none", "auto", "required"]},
                                   {"type": "object", "required": ["type", "function"], "properties": {
                                       "type": {"type": "string", "enum": ["function"]},
                                       "function": {"type": "object", "required": ["name"],
                                                    "properties": {"name": {"type": "string"}}}}}]},
                               "parallel_tool_calls": {"type": "boolean"},
                               **{f.name: {"description": f"accepted; {f.handling}: {f.why}"}
                                  for f in CHAT_FIELDS.values()
                                  if f.handling != "used" and f.name not in _GEN_BODY["properties"]},
                               "chat_template_kwargs": {"type": "object"},
                               "reasoning_format": {"type": "string", "enum": ["auto", "deepseek", "none"]}}},
          responses={"200": "OK", **_ERRORS}, streaming=True),
    Route("POST", "/v1/completions", completions, "infer", "Text completion; `stream` for server-sent events; "
          "`prompt` a string, token ids, or a list of either (choice index = prompt * n + choice); `echo` puts "
          "the prompt before each choice's text.",
          "inference", body={**_GEN_BODY, "required": ["model", "prompt"],
                             "properties": {**_GEN_BODY["properties"], "prompt": {"oneOf": [
                                 _TEXT, _TOKENS,
                                 {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": fmt.MAX_PROMPTS},
                                 {"type": "array", "items": _TOKENS, "minItems": 1, "maxItems": fmt.MAX_PROMPTS}]},
                                            "echo": {"type": "boolean"}, "response_format": _RESPONSE_FORMAT,
                                            "best_of": {"type": "integer", "enum": [1]},
                                            "suffix": {"type": "string", "enum": [""]}}},
          responses={"200": "OK", **_ERRORS}, streaming=True),
    Route("POST", "/v1/embeddings", embeddings, "infer", "Embeddings from an encoder model (pooling and "
          "normalization from the model's configuration). `input`: a string, token ids (used as given, no "
          "special tokens added), or a list of either; an input longer than the model's limit is a 400 "
          "`context_length_exceeded` unless `truncate` is true.", "inference",
          body={"type": "object", "required": ["model", "input"], "additionalProperties": False,
                "properties": {"model": _MODEL, "input": {"oneOf": [
                                   _TEXT, _TOKENS,
                                   {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": MAX_EMBED_INPUTS},
                                   {"type": "array", "items": _TOKENS, "minItems": 1, "maxItems": MAX_EMBED_INPUTS}]},
                               "encoding_format": {"type": "string", "enum": ["float", "base64"]},
                               "dimensions": {"type": "integer", "description": "only the model's own"},
                               "user": {"type": "string", "description": "accepted and ignored"},
                               "truncate": {"type": "boolean", "description": "cut an over-long input at the "
                                                                              "model's limit (Garrison's)"}}},
          responses={"200": "OK", **_ERRORS}),
)
