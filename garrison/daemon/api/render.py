"""POST /v1/garrison/render: the prompt and token ids a chat completion would give the model."""

from __future__ import annotations

from dataclasses import replace

from aiohttp import web

from garrison.daemon.http import json_response, principal, read_json
from garrison.daemon.routing import Route
from garrison.daemon.state import STATE
from garrison.operations.render import parse_render_request, render_prompt


async def render(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    req = parse_render_request(body)
    state = request.app[STATE]
    # Screened as a chat completion's messages are: the prompt shown is the one the model would see.
    messages = await state.policy.inference_privacy.screen_messages(req.messages)
    req = replace(req, messages=messages)
    return json_response(await render_prompt(state.manager, principal(request), req))


ROUTES = (
    Route("POST", "/v1/garrison/render", render, "infer",
          "Render `messages` (and optional `tools`, `chat_template_kwargs`, `add_generation_prompt`) with the "
          "model's chat template, or the request's `chat_template`, as /v1/chat/completions would, and tokenize "
          "it with the model's tokenizer: `prompt`, `token_ids`, `tokens`, and the thinking markers "
          "(`reasoning`) if the template has them. Nothing is generated.", "inference",
          body={"type": "object", "required": ["model", "messages"],
                "properties": {"model": {"type": "string"}, "messages": {"type": "array"},
                               "tools": {"type": "array"}, "chat_template_kwargs": {"type": "object"},
                               "chat_template": {"type": "string"}, "add_generation_prompt": {"type": "boolean"}}},
          responses={"200": "OK", "400": "invalid request or the template failed (chat_template_error, "
                     "chat_template_refused, no_chat_template)", "403": "scope or model grant missing",
                     "404": "model not found"}),
)
