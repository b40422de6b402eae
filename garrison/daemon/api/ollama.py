"""Ollama's API on the daemon's port: /api/chat, /api/generate, /api/embed, /api/tags, /api/show, /api/ps.

For the tools that speak Ollama rather than OpenAI (Open WebUI, Continue, LangChain's ChatOllama, the
`ollama` clients). Same keys, scopes and grants as the OpenAI routes (a Bearer header), the same
generation path (garrison.daemon.api.generation: grants, privacy screening, usage for the rate
limiter, deadlines, a client that leaves frees its slot), Ollama's shapes (garrison.serving.ollama_format)
and Ollama's error object (the error middleware picks it for /api/ paths). The appliance never goes
online and models arrive by `garrison models import`, so pull, push, create, copy and delete answer
with an error that says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from aiohttp import web

from garrison import __version__
from garrison.daemon.api.generation import (
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
from garrison.engine.types import ContextLengthExceeded, Finish, GenerationRequest, SamplingParams
from garrison.errors import GarrisonError, InvalidRequest
from garrison.models.gguf_info import GgufInfo, gguf_info
from garrison.models.registry import ModelRecord
from garrison.policies.access import allowed
from garrison.serving import ollama_format as ofmt
from garrison.serving import openai_format as fmt
from garrison.serving import tool_calls
from garrison.serving.chat_output import ChatOutput, Part, whole
from garrison.serving.openai_fields import check_fields
from garrison.serving.tool_calls import ToolCall

NDJSON = "application/x-ndjson"


def _body_model(body: dict[str, Any], request: web.Request) -> str:
    """The model the body names (Ollama's `NAME:latest` is NAME), checked and granted as on /v1."""
    return model_id({"model": ofmt.model_name(body)}, request)


async def _prompt(engine: GenerationEngine, kind: str, body: dict[str, Any], messages: list[dict[str, Any]],
                  raw_prompt: str | None, thinking: bool | None, params: SamplingParams
                  ) -> tuple[list[int], SamplingParams, Callable[[], ChatOutput] | None]:
    """The prompt's tokens, and how the answer splits into thinking, content and tool calls: the chat path
    the OpenAI routes take (the model's template, rendered off the loop, showing /api/chat's tools), unless
    /api/generate is `raw`."""
    if raw_prompt is not None:
        return await engine.tokenize(raw_prompt, add_special=True, parse_special=True), params, None
    tools = fmt.chat_tools(body) if kind == "chat" else None
    tool_use = tool_calls.tool_request({"tools": tools}) if tools else None
    reasoning = {"reasoning_format": "none" if thinking is False else "auto"}
    return await chat_prompt(engine, reasoning, messages, tool_use, ofmt.template_kwargs(thinking), params)


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    started = time.monotonic()
    body = await read_json(request)
    state = request.app[STATE]
    allow_unknown = state.config.allow_unknown_fields
    check_fields(body, f"ollama_{kind}", allow_unknown=allow_unknown)
    model = _body_model(body, request)
    params = await asyncio.to_thread(partial(ofmt.sampling_params, body, allow_unknown=allow_unknown))
    stream = ofmt.stream_flag(body)
    thinking = ofmt.think(body)
    privacy = state.policy.inference_privacy
    raw_prompt: str | None = None
    if kind == "chat":
        messages = await privacy.screen_messages(ofmt.chat_messages(body))
        empty = not messages
    else:
        prompt, system = ofmt.generate_messages(body)
        empty = not prompt
        if not empty:
            texts = [prompt] if system is None else [prompt, system]
            screened = await privacy.screen_prompts(texts, ["prompt", "system"][:len(texts)])
            prompt, system = screened[0], (screened[1] if system is not None else None)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        raw_prompt = prompt if ofmt.raw_flag(body) else None
    loading = time.monotonic()
    async with state.manager.use(model, "generate") as loaded:
        load_s = time.monotonic() - loading
        if empty:  # Ollama's way to load a model ahead of use: no messages, no prompt
            return json_response({**ofmt.answer(kind, model, "", None), "done": True, "done_reason": "load"})
        engine = loaded.generator
        tokens, params, outputs = await _prompt(engine, kind, body, messages, raw_prompt, thinking, params)
        req = GenerationRequest(prompt_tokens=tokens, params=params, deadline=deadline(request),
                                lora_path=loaded.lora_path)
        evaluating = time.monotonic()
        try:
            choices = await open_choices(engine, [req], [""], request, privacy)
            if stream:
                return await _stream(request, choices[0], kind, model, outputs, started, load_s, evaluating)
            first_at: list[float] = []
            choices[0].events = _timed(choices[0].events, first_at)
            collected = (await collect_all(choices))[0]
        except ContextLengthExceeded as exc:
            exc.param = "messages" if kind == "chat" else "prompt"
            raise
    done = time.monotonic()
    reasoning, text, calls = whole(outputs(), collected.text) if outputs is not None else (None, collected.text, [])
    first = first_at[0] if first_at else done
    return json_response({**ofmt.answer(kind, model, text, reasoning, calls),
                          **ofmt.final_fields(collected.finish, total_s=done - started, load_s=load_s,
                                              prompt_s=first - evaluating, eval_s=done - first)})


async def _timed(events: Any, first_at: list[float]) -> Any:
    """The events, noting when the first arrived (the end of the prompt's evaluation)."""
    async for item in events:
        if not first_at:
            first_at.append(time.monotonic())
        yield item


async def _stream(request: web.Request, choice: Any, kind: str, model: str,
                  outputs: Callable[[], ChatOutput] | None, started: float, load_s: float,
                  evaluating: float) -> web.StreamResponse:
    """NDJSON: one object per piece of text (a tool call as one object once it is whole), then the closing one
    with `done: true` and the statistics. An error after the head is sent as `{"error": ...}`, which Ollama's
    clients raise."""
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    splitter = outputs() if outputs is not None else None
    try:
        item = await anext(choice.events)  # an error before the first token still gets its status
        first = time.monotonic()
        await response.prepare(request)
        while True:
            final = isinstance(item, Finish)
            parts: list[Part] = [("content", item.text)] if splitter is None else \
                splitter.finish(item.text) if final else splitter.feed(item.text)
            for part_kind, part in parts:
                if isinstance(part, ToolCall):
                    await response.write(ofmt.ndjson(ofmt.call_piece(model, part)))
                elif part:
                    await response.write(ofmt.ndjson(ofmt.piece(kind, model, part,
                                                                thinking=part_kind == "reasoning")))
            if isinstance(item, Finish):
                done = time.monotonic()
                await response.write(ofmt.ndjson({**ofmt.answer(kind, model, "", None),
                                                  **ofmt.final_fields(item, total_s=done - started, load_s=load_s,
                                                                      prompt_s=first - evaluating,
                                                                      eval_s=done - first)}))
                break
            item = await anext(choice.events)
    except GarrisonError as exc:
        if not response.prepared:
            raise
        with contextlib.suppress(ConnectionError):
            await response.write(ofmt.ndjson(ofmt.error_body(exc.to_openai())))
    except (ConnectionError, StopAsyncIteration):
        pass  # the client left; choice_events already cancelled the generation
    finally:
        await close_choices([choice])
    return response


async def chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def generate(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "generate")


async def _embed_route(request: web.Request, kind: str) -> tuple[str, list[list[float]], int, float]:
    started = time.monotonic()
    body = await read_json(request)
    state = request.app[STATE]
    check_fields(body, f"ollama_{kind}", allow_unknown=state.config.allow_unknown_fields)
    model = _body_model(body, request)
    field = "input" if kind == "embed" else "prompt"
    inputs = ofmt.embed_inputs(body, field)
    ofmt.sampling_params({"options": body.get("options")}, allow_unknown=state.config.allow_unknown_fields)
    fields = [f"input[{i}]" for i in range(len(inputs))] if isinstance(body[field], list) else [field]
    truncate = ofmt.truncate_flag(body) if kind == "embed" else True
    dimensions = body.get("dimensions")
    privacy = state.policy.inference_privacy
    texts: list[str | list[int]] = list(await privacy.screen_prompts(inputs, fields))
    async with state.manager.use(model, "embed") as loaded:
        embedder = loaded.embedder
        if dimensions is not None and dimensions != embedder.dimensions:
            raise InvalidRequest(f"this model's embeddings have {embedder.dimensions} dimensions; it cannot "
                                 "shorten them", code="unsupported_parameter", param="dimensions")
        result = await embed(embedder, texts, fields, truncate, privacy)
    tokens = int(result.total_tokens)
    usage_of(request).add(tokens, 0)
    vectors = [[float(x) for x in row] for row in result.vectors]
    return ofmt.model_name(body), vectors, tokens, time.monotonic() - started


async def embed_route(request: web.Request) -> web.StreamResponse:
    model, vectors, tokens, took = await _embed_route(request, "embed")
    return json_response({"model": model, "embeddings": vectors, "total_duration": ofmt.ns(took),
                          "load_duration": 0, "prompt_eval_count": tokens})


async def embeddings_route(request: web.Request) -> web.StreamResponse:
    _, vectors, _, _ = await _embed_route(request, "embeddings")
    return json_response({"embedding": vectors[0]})


def _info(record: ModelRecord, base: ModelRecord | None) -> GgufInfo:
    """The GGUF header of the model (a LoRA's base: the adapter's own header says little), else nothing."""
    source = base if base is not None else record
    if source.format != "gguf":
        return GgufInfo()
    return gguf_info(source.entry_path)


def _details(record: ModelRecord, info: GgufInfo) -> dict[str, Any]:
    return {"parent_model": record.base or "", "format": "gguf" if record.format == "lora" else record.format,
            "family": info.architecture, "families": [info.architecture] if info.architecture else None,
            "parameter_size": info.parameter_size if info.parameter_count else "",
            "quantization_level": info.file_type}


def _digest(record: ModelRecord) -> str:
    files = record.manifest.get("files", {})
    entry = files.get(record.entry) or (next(iter(files.values())) if files else {})
    return str(entry.get("sha256", ""))


def _granted_records(request: web.Request) -> list[ModelRecord]:
    who = principal(request)
    return [r for r in request.app[STATE].models.list() if r.servable and allowed(who, "infer", ("model", r.name))]


def _tags(records: list[ModelRecord]) -> list[dict[str, Any]]:
    by_name = {r.name: r for r in records}
    rows = []
    for record in records:
        info = _info(record, by_name.get(record.base) if record.base else None)
        rows.append({"name": record.name, "model": record.name, "modified_at": ofmt.timestamp(record.created_at),
                     "size": record.size_bytes, "digest": _digest(record), "details": _details(record, info)})
    return rows


async def tags(request: web.Request) -> web.StreamResponse:
    """Like /v1/models: the servable models this key may use (an `infer` key is all an Ollama client has)."""
    records = await asyncio.to_thread(_granted_records, request)
    return json_response({"models": await asyncio.to_thread(_tags, records)})


def _show(request: web.Request, name: str) -> dict[str, Any]:
    registry = request.app[STATE].models
    record = registry.get(name)
    base = registry.get(record.base) if record.base else None
    info = _info(record, base)
    capabilities = ["embedding"] if record.format == "onnx" and _is_encoder(record) else ["completion"]
    if "tools" in info.chat_template:
        capabilities.append("tools")
    if "<think>" in info.chat_template or "enable_thinking" in info.chat_template:
        capabilities.append("thinking")
    context = int(record.settings.get("n_ctx_per_slot") or info.context_length or 0)  # what one request gets
    return {"modelfile": f"# Garrison serves {record.name}; models arrive by `garrison models import`\n"
                         f"FROM {record.name}\n",
            "parameters": "\n".join(f"{k:<30} {v}" for k, v in sorted(record.settings.items()) if v is not None),
            "template": info.chat_template, "details": _details(record, info),
            "model_info": {**info.metadata, **({f"{info.architecture}.context_length": context} if context else {})},
            "capabilities": capabilities, "modified_at": ofmt.timestamp(record.created_at)}


def _is_encoder(record: ModelRecord) -> bool:
    from garrison.serving.manager import _onnx_capability

    return _onnx_capability(record) == "embed"


async def show(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    name = _body_model(body, request)
    return json_response(await asyncio.to_thread(_show, request, name))


async def ps(request: web.Request) -> web.StreamResponse:
    """The loaded models (the model manager's runners) this key may use."""
    who = principal(request)
    manager = request.app[STATE].manager
    keep = manager.settings.keep_alive_s
    now = time.monotonic()
    rows = []
    for name, model in sorted(manager.loaded.items()):
        if not allowed(who, "infer", ("model", name)):
            continue
        info = await asyncio.to_thread(_info, model.record, None)
        idle = 0.0 if model.users else now - model.last_used
        expires = time.time() + (max(0.0, keep - idle) if keep > 0 else 365 * 86400.0)
        hello = model.runner.hello
        on_gpu = hello is not None and hello.device not in ("", "cpu", "CPU")
        context = model.engine.n_ctx_per_slot if isinstance(model.engine, GenerationEngine) else 0
        rows.append({"name": name, "model": name, "size": model.size_bytes, "digest": _digest(model.record),
                     "details": _details(model.record, info), "expires_at": ofmt.timestamp(expires),
                     "size_vram": model.size_bytes if on_gpu else 0,
                     **({"context_length": context} if context else {})})
    return json_response({"models": rows})


async def version(request: web.Request) -> web.StreamResponse:
    return json_response({"version": ofmt.OLLAMA_API_VERSION, "garrison": __version__})


# Model management belongs to the operator's `garrison` command: the appliance never goes online.
_OFFLINE = {
    "pull": ("offline_appliance", "the appliance never goes online, so it cannot pull models; bring a model in with "
                                  "`garrison models import PATH --name NAME` on the appliance"),
    "push": ("offline_appliance", "the appliance never goes online, so it cannot push models; models arrive by "
                                  "`garrison models import` and leave as files by `garrison export`"),
    "create": ("not_supported", "models are not created from Modelfiles here; bring a model in with "
                                "`garrison models import PATH --name NAME`"),
    "copy": ("not_supported", "models are not copied here; import the file again under another name with "
                              "`garrison models import`"),
    "delete": ("not_supported", "models are removed by the operator with `garrison models rm NAME` (they arrive "
                                "by `garrison models import`)"),
    "blobs": ("not_supported", "blobs are not uploaded here; bring a model in with `garrison models import`"),
}


def _refuse(what: str) -> Any:
    code, message = _OFFLINE[what]

    async def handler(request: web.Request) -> web.StreamResponse:
        raise InvalidRequest(message, code=code)
    return handler


def _between(kind: str, low: float, high: float) -> dict[str, Any]:
    return {"type": kind, "minimum": low, "maximum": high}


_MODEL = {"type": "string", "minLength": 1, "maxLength": 137}
_OPTIONS = {"type": "object", "description": "Ollama's options; see the operator guide for the ones honoured",
            "properties": {"temperature": _between("number", 0, 2), "top_p": _between("number", 0, 1),
                           "top_k": _between("integer", 0, 1 << 20), "min_p": _between("number", 0, 1),
                           "repeat_penalty": _between("number", 0.01, 10),
                           "repeat_last_n": _between("integer", 0, 1 << 20),
                           "presence_penalty": _between("number", -2, 2),
                           "frequency_penalty": _between("number", -2, 2),
                           "seed": {"type": "integer"}, "num_predict": {"type": "integer"},
                           "stop": {"type": "array", "items": {"type": "string", "minLength": 1},
                                    "maxItems": fmt.MAX_STOP},
                           "num_ctx": {"type": "integer"}}}
_FORMAT = {"oneOf": [{"type": "string", "enum": ["", "json"]}, {"type": "object"}]}
_COMMON = {"model": _MODEL, "stream": {"type": "boolean"}, "format": _FORMAT, "options": _OPTIONS,
           "keep_alive": {"oneOf": [{"type": "string"}, {"type": "number"}]},
           "think": {"oneOf": [{"type": "boolean"}, {"type": "string", "enum": ["low", "medium", "high"]}]}}
_MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]}, "content": {"type": "string"},
    "thinking": {"type": "string"}, "tool_name": {"type": "string"},
    "tool_calls": {"type": "array", "items": {"type": "object", "required": ["function"],
                                              "properties": {"function": {"type": "object"}}}}}}
# Errors on /api/ are Ollama's object, {"error": "<message>", "code": "<code>"}.
_ERRORS = {"400": "invalid request", "401": "missing or unknown key",
           "403": "scope or model grant missing", "404": "model not found",
           "429": "rate limit or the model's queue is full (Retry-After)", "503": "the model's runner crashed",
           "504": "request deadline passed"}
_REFUSED = {"400": "offline_appliance or not_supported: models arrive by `garrison models import`",
            "401": _ERRORS["401"], "403": _ERRORS["403"]}

ROUTES = (
    Route("POST", "/api/chat", chat, "infer",
          "Ollama's chat: the model's chat template, `options` for sampling, `format` json or a JSON schema, "
          "`think` for reasoning apart, `tools` with the model's calls read back in `message.tool_calls`; NDJSON "
          "stream unless `stream` is false.", "ollama",
          body={"type": "object", "required": ["model"],
                "properties": {**_COMMON, "messages": {"type": "array", "items": _MESSAGE},
                               "tools": {"type": "array", "items": {"type": "object"}}}},
          responses={"200": "OK: one object, or with `stream` (the default) NDJSON (application/x-ndjson)",
                     **_ERRORS}),
    Route("POST", "/api/generate", generate, "infer",
          "Ollama's completion: `prompt` (and `system`) in the model's chat template, or as given with `raw`; "
          "NDJSON stream unless `stream` is false.", "ollama",
          body={"type": "object", "required": ["model"],
                "properties": {**_COMMON, "prompt": {"type": "string"}, "system": {"type": "string"},
                               "raw": {"type": "boolean"}}},
          responses={"200": "OK: one object, or with `stream` (the default) NDJSON (application/x-ndjson)",
                     **_ERRORS}),
    Route("POST", "/api/embed", embed_route, "infer",
          "Ollama's embeddings: `input` a string or a list of strings; an over-long input is cut unless "
          "`truncate` is false (then a 400).", "ollama",
          body={"type": "object", "required": ["model", "input"],
                "properties": {"model": _MODEL, "input": {"oneOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 2048}]},
                    "truncate": {"type": "boolean"}, "dimensions": {"type": "integer"}, "options": _OPTIONS,
                    "keep_alive": _COMMON["keep_alive"]}},
          responses={"200": "OK", **_ERRORS}),
    Route("POST", "/api/embeddings", embeddings_route, "infer", "Ollama's older embeddings: one `prompt`.",
          "ollama", body={"type": "object", "required": ["model", "prompt"],
                          "properties": {"model": _MODEL, "prompt": {"type": "string", "minLength": 1},
                                         "options": _OPTIONS, "keep_alive": _COMMON["keep_alive"]}},
          responses={"200": "OK", **_ERRORS}),
    Route("GET", "/api/tags", tags, "infer", "Ollama's model list: the servable models this key may use.", "ollama",
          responses={"200": "OK", **_ERRORS}),
    Route("POST", "/api/show", show, "infer",
          "One model: details, chat template, GGUF header (`model_info`), capabilities.", "ollama",
          body={"type": "object", "properties": {"model": _MODEL, "name": _MODEL, "verbose": {"type": "boolean"}}},
          responses={"200": "OK", **_ERRORS}),
    Route("GET", "/api/ps", ps, "infer", "Ollama's loaded models: the model manager's runners this key may use.",
          "ollama", responses={"200": "OK", **_ERRORS}),
    Route("GET", "/api/version", version, "infer", "The Ollama API version this face follows, and Garrison's.",
          "ollama", responses={"200": "OK", **_ERRORS}),
    *(Route(method, path, _refuse(what), "infer", f"Refused: {_OFFLINE[what][1]}.", "ollama", responses=_REFUSED)
      for method, path, what in (("POST", "/api/pull", "pull"), ("POST", "/api/push", "push"),
                                 ("POST", "/api/create", "create"), ("POST", "/api/copy", "copy"),
                                 ("DELETE", "/api/delete", "delete"), ("POST", "/api/blobs/{digest}", "blobs"))),
)
