"""OpenAI's request and response shapes, translated to and from the engines' types.

Kept apart from the HTTP handlers so the translation is pure and testable: a request body
becomes (prompt text, SamplingParams); engine events become OpenAI objects and chunks.
Field checks name the offending field, as OpenAI's own errors do.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from garrison.engine.chat_template import check_kwargs, render
from garrison.engine.types import Finish, SamplingParams, TokenEvent
from garrison.errors import InvalidRequest

MAX_STOP = 4


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"'{name}' must be a number", param=name)
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be between {low:g} and {high:g}", param=name)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{name}' must be a whole number", param=name)
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be between {low} and {high}", param=name)
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise InvalidRequest(f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings",
                             param="stop")
    return tuple(stop)


def _grammar(body: dict[str, Any]) -> str | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidRequest("'response_format.type' must be text, json_object or json_schema",
                             param="response_format")
    if fmt["type"] == "text":
        return None
    from garrison.engine.json_grammar import json_schema_grammar

    if fmt["type"] == "json_object":
        return json_schema_grammar({"type": "object"})
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise InvalidRequest("'response_format.json_schema.schema' must be a JSON schema object",
                             param="response_format")
    return json_schema_grammar(spec["schema"])


def flag(body: dict[str, Any], name: str, default: bool = False) -> bool:
    """A true/false field; absent or null is the default (every API face reads its flags so)."""
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be true or false", param=name)
    return value


#: OpenAI's bounds: at most 128 choices, biases in [-100, 100]; entries capped so a body cannot make
#: the sampler chain huge.
MAX_CHOICES = 128
MAX_LOGIT_BIAS = 1024
MAX_GRAMMAR_BYTES = 64 * 1024


def _logit_bias(body: dict[str, Any]) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} object (llama-server's [[id, bias], ...] pairs too); ids are checked
    against the model's vocabulary by the engine."""
    raw = body.get("logit_bias")
    if raw is None:
        return ()
    pairs = list(raw.items()) if isinstance(raw, dict) else raw
    if not isinstance(pairs, list) or len(pairs) > MAX_LOGIT_BIAS:
        raise InvalidRequest(f"'logit_bias' must map at most {MAX_LOGIT_BIAS} token ids to biases",
                             param="logit_bias")
    out: dict[int, float] = {}
    for pair in pairs:
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise InvalidRequest("'logit_bias' must map token ids to biases", param="logit_bias")
        token, bias = pair
        if isinstance(token, str) and token.strip().isdigit():
            token = int(token)
        if not is_token(token):
            raise InvalidRequest(f"'logit_bias' keys must be token ids (got {str(token)[:40]!r})", param="logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise InvalidRequest(f"'logit_bias' values must be numbers from -100 to 100 (token {token})",
                                 param="logit_bias")
        out[token] = float(bias)
    return tuple(out.items())


def _body_grammar(body: dict[str, Any]) -> str | None:
    """llama-server's `grammar` extension: a GBNF grammar, parsed by llama.cpp in the model's runner."""
    grammar = body.get("grammar")
    if grammar is None:
        return None
    if not isinstance(grammar, str) or not grammar.strip() or len(grammar.encode()) > MAX_GRAMMAR_BYTES:
        raise InvalidRequest(f"'grammar' must be a GBNF grammar of at most {MAX_GRAMMAR_BYTES} bytes",
                             param="grammar")
    if body.get("response_format") is not None:
        raise InvalidRequest("give 'grammar' or 'response_format', not both", param="grammar")
    return grammar


def choice_count(body: dict[str, Any]) -> int:
    """OpenAI's `n` (and best_of, which Garrison takes only as a no-op, see openai_fields)."""
    return _integer(body, "n", 1, 1, MAX_CHOICES) or 1


def sampling_params(body: dict[str, Any], *, default_max_tokens: int | None) -> SamplingParams:
    """default_max_tokens None: a request without max_tokens generates to the end of the context."""
    logprobs = body.get("logprobs")
    top_logprobs = _integer(body, "top_logprobs", 0, 0, 20) or 0
    if isinstance(logprobs, int) and not isinstance(logprobs, bool):  # /v1/completions: an integer
        if not 0 <= logprobs <= 5:
            raise InvalidRequest("'logprobs' must be between 0 and 5", param="logprobs")
        top_logprobs, logprobs = logprobs, True
    elif logprobs is not None and not isinstance(logprobs, bool):
        raise InvalidRequest("'logprobs' must be true or false", param="logprobs")
    max_tokens = _integer(body, "max_completion_tokens", None, 1, 1 << 20)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", default_max_tokens, 1, 1 << 20)
    seed = _integer(body, "seed", None, -(1 << 63), (1 << 64) - 1)
    return SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1.0,
        top_k=int(_number(body, "top_k", 0, 0, 1 << 20)),
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        repeat_penalty=_number(body, "repeat_penalty", 1.0, 0.01, 10.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        seed=None if seed is None else seed & 0xFFFFFFFF,
        max_tokens=max_tokens,
        stop=_stop(body),
        logprobs=bool(logprobs),
        top_logprobs=top_logprobs,
        grammar=_body_grammar(body) or _grammar(body),
        ignore_eos=flag(body, "ignore_eos"),
        logit_bias=_logit_bias(body),
        penalty_last_n=_integer(body, "repeat_last_n", 64, 0, 1 << 20) or 0,
    )


# Message fields a chat template may read besides role and content (tool calls, their results,
# earlier thinking); passed through as the client sent them, as transformers passes them.
MESSAGE_FIELDS = ("name", "tool_calls", "tool_call_id", "reasoning_content")


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant",
                                                                          "tool"):
            raise InvalidRequest(f"messages[{i}] needs a role of system, user, assistant or tool",
                                 param=f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise InvalidRequest(f"messages[{i}].content: only text parts are supported",
                                     param=f"messages[{i}].content")
            content = "".join(t for t in texts if isinstance(t, str))
        calls = message.get("tool_calls")
        if calls is not None and (message["role"] != "assistant" or not isinstance(calls, list)
                                  or not all(isinstance(c, dict) for c in calls)):
            raise InvalidRequest(f"messages[{i}].tool_calls must be a list of objects on an assistant message",
                                 param=f"messages[{i}].tool_calls")
        if not isinstance(content, str) and not (content is None and calls):
            raise InvalidRequest(f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        role = "system" if message["role"] == "developer" else message["role"]
        out.append({"role": role, "content": content,
                    **{k: message[k] for k in MESSAGE_FIELDS if message.get(k) is not None}})
    return out


def chat_tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise InvalidRequest("'tools' must be a list of objects", param="tools")
    return tools or None


def template_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    """`chat_template_kwargs` (vLLM's and llama-server's field): extra variables for the template."""
    return check_kwargs(body.get("chat_template_kwargs"))


def render_chat(template: str | None, messages: list[dict[str, Any]], *, bos_token: str | None,
                eos_token: str | None, tools: list[dict[str, Any]] | None = None,
                kwargs: dict[str, Any] | None = None, add_generation_prompt: bool = True) -> str:
    """The model's own chat template, rendered as transformers renders it (garrison.engine.chat_template)."""
    return render(template, messages, special_tokens={"bos_token": bos_token, "eos_token": eos_token},
                  tools=tools, kwargs=kwargs, add_generation_prompt=add_generation_prompt)


#: Prompts in one /v1/completions request (each a string or a list of token ids).
MAX_PROMPTS = 128


def completion_prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """OpenAI's four prompt shapes: a string, a list of strings, a list of token ids, a list of such lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(is_token(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list):
        prompts = prompt
    else:
        prompts = []
    if not prompts or len(prompts) > MAX_PROMPTS or not all(
            (isinstance(p, str) and p) or (isinstance(p, list) and p and all(is_token(t) for t in p))
            for p in prompts):
        raise InvalidRequest(f"'prompt' must be a non-empty string, a list of token ids, or a list of at most "
                             f"{MAX_PROMPTS} of either", param="prompt")
    return prompts


#: llama.cpp's token ids are 32-bit: anything larger is no vocabulary's, and must not reach the wire.
MAX_TOKEN_ID = 2**31 - 1


def is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_ID


def choices_usage(prompt_finishes: list[Finish], finishes: list[Finish]) -> dict[str, Any]:
    """Usage of several choices: each prompt counted once (its first choice's), completions summed."""
    prompt = sum(f.prompt_tokens for f in prompt_finishes)
    completion = sum(f.completion_tokens for f in finishes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(f.cached_tokens for f in prompt_finishes)}}


def with_index(obj: dict[str, Any], index: int) -> dict[str, Any]:
    """A one-choice response or chunk, its choice renumbered (choice i of n, or prompt p's choice j)."""
    for choice in obj["choices"]:
        choice["index"] = index
    return obj


@dataclass
class Collected:
    text: str
    finish: Finish
    logprobs: list[TokenEvent]
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI's message.tool_calls
    finish_reason: str | None = None  # the API's own reason ("tool_calls") over the engine's


def usage(finish: Finish) -> dict[str, Any]:
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": finish.cached_tokens}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def chat_logprobs(events: list[TokenEvent]) -> dict[str, Any]:
    return {"content": [{"token": e.text, "logprob": e.logprob, "bytes": list(e.text.encode()),
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                                          for t, lp in (e.top_logprobs or [])]} for e in events]}


def completion_logprobs(events: list[TokenEvent]) -> dict[str, Any]:
    offsets, pos = [], 0
    for e in events:
        offsets.append(pos)
        pos += len(e.text)
    return {"tokens": [e.text for e in events], "token_logprobs": [e.logprob for e in events],
            "top_logprobs": [dict(e.top_logprobs or []) for e in events], "text_offset": offsets}


def chat_response(rid: str, model: str, collected: Collected, want_logprobs: bool) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": "garrison",
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                 # OpenAI's null content beside tool calls
                                                 "content": None if collected.tool_calls and not collected.text
                                                 else collected.text,
                                                 **({"reasoning_content": collected.reasoning}
                                                    if collected.reasoning is not None else {}),
                                                 **({"tool_calls": collected.tool_calls}
                                                    if collected.tool_calls else {})},
                         "logprobs": chat_logprobs(collected.logprobs) if want_logprobs else None,
                         "finish_reason": collected.finish_reason or collected.finish.finish_reason}],
            "usage": usage(collected.finish)}


def completion_response(rid: str, model: str, collected: Collected, want_logprobs: bool) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": "garrison",
            "choices": [{"index": 0, "text": collected.text,
                         "logprobs": completion_logprobs(collected.logprobs) if want_logprobs else None,
                         "finish_reason": collected.finish.finish_reason}],
            "usage": usage(collected.finish)}


ChunkMaker = Callable[[str, str, str | None, TokenEvent | None], dict[str, Any]]


def chat_chunk(rid: str, model: str, created: int, text: str | None, finish_reason: str | None,
               event: TokenEvent | None = None, *, first: bool = False, reasoning: bool = False) -> dict[str, Any]:
    """One streamed delta; `reasoning` puts the text in `delta.reasoning_content` instead of `content`."""
    delta: dict[str, Any] = {}
    if first:
        delta["role"] = "assistant"
    if text is not None:
        delta["reasoning_content" if reasoning else "content"] = text
    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    if event is not None and event.logprob is not None:
        choice["logprobs"] = chat_logprobs([event])
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "garrison", "choices": [choice]}


def tool_call_chunks(rid: str, model: str, created: int, call: dict[str, Any], position: int) -> list[dict[str, Any]]:
    """A complete tool call as OpenAI streams one: its id and name with empty arguments, then the
    arguments (`position` is the call's place among the choice's calls, OpenAI's `tool_calls[].index`)."""
    head = {"index": position, "id": call["id"], "type": "function",
            "function": {"name": call["function"]["name"], "arguments": ""}}
    tail = {"index": position, "function": {"arguments": call["function"]["arguments"]}}
    out = []
    for delta in (head, tail):
        data = chat_chunk(rid, model, created, None, None)
        data["choices"][0]["delta"]["tool_calls"] = [delta]
        out.append(data)
    return out


def completion_chunk(rid: str, model: str, created: int, text: str | None, finish_reason: str | None,
                     event: TokenEvent | None = None, *, first: bool = False,
                     reasoning: bool = False) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    if event is not None and event.logprob is not None:
        choice["logprobs"] = completion_logprobs([event])
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": "garrison", "choices": [choice]}


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
