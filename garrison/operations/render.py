"""A conversation rendered by a served model's chat template, and its token ids: POST /v1/garrison/render
and `garrison render MODEL`.

This is what the model is given for a chat completion, shown instead of run: the one renderer
(garrison.engine.chat_template, which equals transformers' `apply_chat_template`) and the served
artifact's own tokenizer, so a user debugging a template, or a test comparing with transformers,
sees exactly the prompt and ids that serving would decode.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import partial
from typing import Any

from garrison.errors import InvalidRequest
from garrison.models.names import check_model_id
from garrison.policies.access import authorize
from garrison.policies.keys import Principal
from garrison.serving import openai_format as fmt
from garrison.serving.manager import ModelManager
from garrison.serving.reasoning import reasoning_syntax
from garrison.serving.tool_calls import template_messages

MAX_TEMPLATE_CHARS = 256 * 1024  # the largest real templates are ~30 KB


@dataclass(frozen=True)
class RenderRequest:
    model: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    kwargs: dict[str, Any]
    chat_template: str | None
    add_generation_prompt: bool


def parse_render_request(body: dict[str, Any]) -> RenderRequest:
    """The request's fields checked, with the same checks as /v1/chat/completions."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required", param="model")
    template = body.get("chat_template")
    if template is not None and (not isinstance(template, str) or not template
                                 or len(template) > MAX_TEMPLATE_CHARS):
        raise InvalidRequest(f"'chat_template' must be a non-empty string of at most {MAX_TEMPLATE_CHARS} characters",
                             param="chat_template")
    generation_prompt = body.get("add_generation_prompt", True)
    if not isinstance(generation_prompt, bool):
        raise InvalidRequest("'add_generation_prompt' must be true or false", param="add_generation_prompt")
    return RenderRequest(model=check_model_id(model), messages=fmt.chat_messages(body), tools=fmt.chat_tools(body),
                         kwargs=fmt.template_kwargs(body), chat_template=template,
                         add_generation_prompt=generation_prompt)


async def render_prompt(manager: ModelManager, who: Principal, req: RenderRequest) -> dict[str, Any]:
    """Loads the model if it is not loaded (its tokenizer lives in its runner); generates nothing."""
    authorize(who, "infer", ("model", req.model))
    async with manager.use(req.model, "generate") as loaded:
        engine = loaded.generator
        template = req.chat_template or engine.chat_template
        text = await asyncio.to_thread(partial(
            # The history as chat completions give it to templates (tool-call arguments as objects).
            fmt.render_chat, template, template_messages(req.messages), bos_token=engine.bos_token,
            eos_token=engine.eos_token,
            tools=req.tools, kwargs=req.kwargs, add_generation_prompt=req.add_generation_prompt))
        ids = await engine.tokenize(text, add_special=False, parse_special=True)
    syntax = reasoning_syntax(template, text, {})
    return {"object": "garrison.render", "model": req.model, "prompt": text, "token_ids": list(ids),
            "tokens": len(ids), "chat_template": "request" if req.chat_template else "model",
            "reasoning": None if syntax is None else {"start": syntax.start, "end": syntax.end,
                                                      "forced_open": syntax.forced_open}}
