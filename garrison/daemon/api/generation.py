"""The generation pipeline both inference faces share (OpenAI's /v1 and Ollama's /api).

Model lookup with its grant, the request's deadline, one choice's token stream with its usage noted
for the rate limiter and its response screened by the privacy policy, and collecting choices to
their end: kept here so a second API cannot drift from the first in what it charges, screens or
frees when a client leaves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np
from aiohttp import web

from garrison.daemon.http import principal
from garrison.daemon.state import STATE
from garrison.daemon.usage import usage_of
from garrison.engine.protocols import EmbeddingEngine, EmbeddingResult, GenerationEngine, TokenStream
from garrison.engine.types import Finish, GenerationRequest, SamplingParams, TokenEvent
from garrison.errors import InvalidRequest
from garrison.models.names import check_model_id
from garrison.operations.inference_privacy import InferencePrivacyPolicy, ResponseFilter, filtered_events
from garrison.policies.access import authorize
from garrison.serving import openai_format as fmt
from garrison.serving import tool_calls
from garrison.serving.chat_output import ChatOutput
from garrison.serving.reasoning import reasoning_syntax


def model_id(body: dict[str, Any], request: web.Request) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required", param="model")
    check_model_id(model)
    authorize(principal(request), "infer", ("model", model))
    usage_of(request).model = model
    return model


def deadline(request: web.Request) -> float:
    return time.monotonic() + request.app[STATE].config.request_timeout_s


def disconnected(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def choice_events(stream: TokenStream, req: GenerationRequest, request: web.Request, *,
                        counts_prompt: bool = True) -> AsyncGenerator[TokenEvent | Finish, None]:
    """One choice's items; its usage is noted as it ends (a request's prompt once, by its first choice)."""
    prompt = len(req.prompt_tokens) if counts_prompt else 0
    generated = 0  # the tokens of a generation cut short, which never reaches its Finish
    try:
        async for item in stream:
            if isinstance(item, Finish):
                usage_of(request).add(item.prompt_tokens if counts_prompt else 0, item.completion_tokens)
                generated = -1
            elif generated >= 0:
                generated += 1
            yield item
            if disconnected(request):
                stream.cancel()
                return
    finally:
        if generated > 0:
            usage_of(request).add(prompt, generated)
        await stream.aclose()


def screened_events(events: AsyncGenerator[TokenEvent | Finish, None], screen: ResponseFilter | None,
                    req: GenerationRequest) -> AsyncGenerator[TokenEvent | Finish, None]:
    return events if screen is None else filtered_events(events, screen, len(req.prompt_tokens))


async def chat_prompt(engine: GenerationEngine, body: dict[str, Any], messages: list[dict[str, Any]],
                      tool_use: tool_calls.ToolRequest | None, template_kwargs: dict[str, Any],
                      params: SamplingParams) -> tuple[list[int], SamplingParams, Callable[[], ChatOutput] | None]:
    """A chat's prompt tokens (the model's template, rendered off the loop, showing the tools), its sampling
    (a forced tool call's grammar added) and how its output splits into reasoning, content and calls: one
    place, so chat completions and the Responses API prompt and parse alike."""
    tool_format = None if tool_use is None else tool_calls.tool_format(engine.chat_template)
    shown = tool_calls.prompt_messages(messages, tool_format, tool_use)
    text = await asyncio.to_thread(partial(fmt.render_chat, engine.chat_template, shown,
                                           bos_token=engine.bos_token, eos_token=engine.eos_token,
                                           tools=None if tool_use is None else tool_use.tools,
                                           kwargs=template_kwargs))
    syntax = reasoning_syntax(engine.chat_template, text, body)
    if tool_use is not None and tool_format is not None and tool_use.forced:
        think = None if syntax is None else (syntax.start, syntax.end, syntax.forced_open)
        grammar = await asyncio.to_thread(tool_calls.tool_grammar, tool_use, tool_format, think)
        params = replace(params, grammar=grammar)
    outputs: Callable[[], ChatOutput] | None = None
    if syntax is not None or tool_format is not None:
        outputs = partial(ChatOutput.of, syntax, tool_format, tool_use.parallel if tool_use else True)
    return await engine.tokenize(text, add_special=False, parse_special=True), params, outputs


@dataclass
class Choice:
    """One choice of a response: prompt p's choice j is index p * n + j, as OpenAI numbers them."""

    index: int
    prompt: int  # which prompt (of a /v1/completions list) it answers
    stream: TokenStream
    events: AsyncGenerator[TokenEvent | Finish, None]
    echo: str = ""  # the prompt's text, when the request asks for echo


async def open_choices(engine: GenerationEngine, reqs: list[GenerationRequest], echoes: list[str],
                       request: web.Request, privacy: InferencePrivacyPolicy) -> list[Choice]:
    """Every prompt's n choices, each from one evaluation of its prompt (the engine's generate_choices)."""
    choices: list[Choice] = []
    try:
        for p, req in enumerate(reqs):
            for j, stream in enumerate(engine.generate_choices(req)):
                events = screened_events(choice_events(stream, req, request, counts_prompt=j == 0),
                                         await privacy.response_filter(), req)
                choices.append(Choice(p * req.n + j, p, stream, events, echoes[p]))
    except BaseException:
        await close_choices(choices)
        raise
    return choices


async def close_choices(choices: list[Choice]) -> None:
    for choice in choices:
        choice.stream.cancel()
        await choice.events.aclose()


async def collect(choice: Choice) -> fmt.Collected:
    parts: list[str] = []
    events: list[TokenEvent] = []
    finish: Finish | None = None
    async for item in choice.events:
        if isinstance(item, Finish):
            finish = item
            parts.append(item.text)
        else:
            parts.append(item.text)
            events.append(item)
    if finish is None:
        raise ConnectionResetError("the client disconnected")  # nobody reads this response
    return fmt.Collected(text="".join(parts), finish=finish, logprobs=events)


async def collect_all(choices: list[Choice]) -> list[fmt.Collected]:
    """Every choice to its end, concurrently; one failing ends the others (their slots freed)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(collect(choice)) for choice in choices]
    except BaseExceptionGroup as errors:
        raise errors.exceptions[0] from None
    finally:
        await close_choices(choices)
    return [task.result() for task in tasks]


async def embed(embedder: EmbeddingEngine, inputs: list[str | list[int]], fields: list[str],
                truncate: bool, privacy: InferencePrivacyPolicy) -> EmbeddingResult:
    """Texts (already screened) and token-id inputs, each kind in one call, rows back in input order.
    Token ids are screened as text; if the policy redacts one, its redacted text is embedded instead."""
    texts = {i: x for i, x in enumerate(inputs) if isinstance(x, str)}
    tokens = {i: x for i, x in enumerate(inputs) if isinstance(x, list)}
    if tokens and privacy.prompts.active:
        decoded = [await embedder.detokenize(t) for t in tokens.values()]
        screened = await privacy.screen_prompts(decoded, [fields[i] for i in tokens])
        for i, before, after in zip(list(tokens), decoded, screened, strict=True):
            if after != before:
                del tokens[i]
                texts[i] = after
    parts = []
    if texts:
        parts.append((list(texts), await embedder.embed(list(texts.values()), truncate=truncate)))
    if tokens:
        parts.append((list(tokens), await embedder.embed_tokens(list(tokens.values()), truncate=truncate)))
    if len(parts) == 1:
        return parts[0][1]
    order = np.argsort(np.asarray(parts[0][0] + parts[1][0]))
    vectors = np.concatenate([parts[0][1].vectors, parts[1][1].vectors])[order]
    counts = [(parts[0][1].token_counts + parts[1][1].token_counts)[i] for i in order]
    return EmbeddingResult(vectors=vectors, token_counts=counts)
