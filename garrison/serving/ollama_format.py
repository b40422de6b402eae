"""Ollama's request and response shapes, translated to and from the engines' types.

Ollama's clients (the `ollama` Python and JavaScript clients, Open WebUI, Continue, LangChain's
ChatOllama) speak a second dialect of the same operations: sampling in an `options` object with
llama.cpp's names, `format` for JSON output, durations in nanoseconds, NDJSON streams and errors as
`{"error": "..."}`. The translation goes through OpenAI's (garrison.serving.openai_format), so both
faces share one set of checks, bounds and grammars.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from garrison.engine.types import Finish, SamplingParams
from garrison.errors import InvalidRequest
from garrison.serving import openai_format as fmt
from garrison.serving.openai_fields import check_fields
from garrison.serving.tool_calls import ToolCall

#: The version of Ollama's API this face follows (`/api/version`); clients compare it to decide on
#: features (`think` arrived in 0.9).
OLLAMA_API_VERSION = "0.9.0"

#: Ollama's own defaults where a request leaves a sampling option out (a Modelfile's PARAMETERs would
#: change them there; Garrison has none), so a client sees the behaviour it was written against.
DEFAULT_OPTIONS: Mapping[str, Any] = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1}

#: Ollama's option -> the OpenAI-face field that does the same (checked and bounded there).
OPTION_TARGETS: Mapping[str, str] = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "seed": "seed", "stop": "stop", "num_predict": "max_tokens",
}

#: Ollama's `done_reason` for an engine's finish reason (the rest pass as they are).
DONE_REASONS: Mapping[str, str] = {"stop": "stop", "length": "length"}


def model_name(body: dict[str, Any]) -> str:
    """Ollama's names default their tag to `latest` (`llama3` is `llama3:latest`); Garrison's have no tag, so
    `NAME:latest` is NAME. Older clients send `name` instead of `model`."""
    model = body.get("model", body.get("name"))
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required", param="model")
    return model.removesuffix(":latest") or model


def _options(body: dict[str, Any], *, allow_unknown: bool) -> dict[str, Any]:
    options = body.get("options")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InvalidRequest("'options' must be an object", param="options")
    try:
        check_fields(options, "ollama_options", allow_unknown=allow_unknown)
    except InvalidRequest as exc:
        exc.param = f"options.{exc.param}"
        raise
    return options


def _format(value: Any) -> dict[str, Any] | None:
    """`format`: "json" or a JSON schema, as OpenAI's response_format (one grammar builder for both)."""
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": value}}
    raise InvalidRequest("'format' must be \"json\" or a JSON schema object", param="format")


def sampling_params(body: dict[str, Any], *, allow_unknown: bool) -> SamplingParams:
    """An Ollama request's sampling, checked by the OpenAI face's rules; errors name Ollama's field.
    CPU-bound when `format` is a schema (the grammar is built here): call it off the event loop."""
    options = _options(body, allow_unknown=allow_unknown)
    openai_body: dict[str, Any] = {OPTION_TARGETS[k]: v for k, v in DEFAULT_OPTIONS.items()}
    names = {}
    for option, value in options.items():
        target = OPTION_TARGETS.get(option)
        if target is None or value is None:
            continue
        if option == "num_predict" and isinstance(value, int) and not isinstance(value, bool) and value < 0:
            value = None  # -1: no limit, -2: fill the context; both are "to the end of the context" here
        if option == "seed" and isinstance(value, int) and not isinstance(value, bool) and value < 0:
            value = None  # -1: a random seed per request
        openai_body[target] = value
        names[target] = f"options.{option}"
    response_format = _format(body.get("format"))
    if response_format is not None:
        openai_body["response_format"] = response_format
        names["response_format"] = "format"
    try:
        return fmt.sampling_params(openai_body, default_max_tokens=None)
    except InvalidRequest as exc:
        if exc.param in names:
            exc.message = exc.message.replace(f"'{exc.param}'", f"'{names[exc.param]}'")
            exc.args = (exc.message,)
            exc.param = names[exc.param]
        raise


def stream_flag(body: dict[str, Any]) -> bool:
    """Ollama streams unless told not to."""
    return fmt.flag(body, "stream", True)


def think(body: dict[str, Any]) -> bool | None:
    """`think`: true (or a level, "low" to "high"), false, or left out (the model's own default)."""
    value = body.get("think")
    if value is None or isinstance(value, bool):
        return value
    if value in ("low", "medium", "high"):
        return True
    raise InvalidRequest("'think' must be true, false, \"low\", \"medium\" or \"high\"", param="think")


def template_kwargs(thinking: bool | None) -> dict[str, Any]:
    """`think: false` switches thinking off in templates that can (Qwen3's `enable_thinking`)."""
    return {} if thinking is None else {"enable_thinking": thinking}


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """Ollama's calls ({"function": {"name", "arguments": {...}}}) in OpenAI's form, arguments kept an object
    (what chat templates iterate over)."""
    if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                              for c in calls):
        raise InvalidRequest(f"{where}.tool_calls must be a list of {{\"function\": {{...}}}} objects",
                             param=f"{where}.tool_calls")
    return [{"type": "function", "function": c["function"]} for c in calls]


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Ollama's messages as the OpenAI face's (checked there): `thinking` is an earlier turn's reasoning,
    `tool_name` names the tool a result comes from. Images are refused: the served models read text."""
    messages = body.get("messages")
    if messages is None:
        return []
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise InvalidRequest("'messages' must be a list of message objects", param="messages")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if message.get("images"):
            raise InvalidRequest(f"messages[{i}].images: the served models read text only",
                                 code="unsupported_parameter", param=f"messages[{i}].images")
        converted = {k: v for k, v in message.items() if k in ("role", "content")}
        if message.get("thinking") is not None:
            converted["reasoning_content"] = message["thinking"]
        if message.get("tool_name") is not None:
            converted["name"] = message["tool_name"]
        if message.get("tool_calls"):
            converted["tool_calls"] = _tool_calls(message["tool_calls"], f"messages[{i}]")
            converted.setdefault("content", "")
        out.append(converted)
    return fmt.chat_messages({"messages": out}) if out else []


def generate_messages(body: dict[str, Any]) -> tuple[str, str | None]:
    """/api/generate's prompt and system text (either may be empty)."""
    prompt, system = body.get("prompt", ""), body.get("system")
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise InvalidRequest("'prompt' must be a string", param="prompt")
    if system is not None and not isinstance(system, str):
        raise InvalidRequest("'system' must be a string", param="system")
    return prompt, system or None


def raw_flag(body: dict[str, Any]) -> bool:
    return fmt.flag(body, "raw", False)


def embed_inputs(body: dict[str, Any], field: str) -> list[str]:
    """/api/embed's `input` (a string or a list of strings) or /api/embeddings' `prompt` (one string)."""
    raw = body.get(field)
    inputs = [raw] if isinstance(raw, str) else raw if field == "input" and isinstance(raw, list) else None
    if not inputs or not all(isinstance(t, str) and t for t in inputs):
        what = "a non-empty string or a list of them" if field == "input" else "a non-empty string"
        raise InvalidRequest(f"'{field}' must be {what}", param=field)
    return inputs


def truncate_flag(body: dict[str, Any]) -> bool:
    """Ollama cuts an over-long embedding input at the model's limit unless told not to."""
    return fmt.flag(body, "truncate", True)


def timestamp(when: float | None = None) -> str:
    """RFC 3339 in UTC, as Ollama's `created_at` and `modified_at`."""
    moment = datetime.now(UTC) if when is None else datetime.fromtimestamp(when, UTC)
    return moment.isoformat().replace("+00:00", "Z")


def ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


def final_fields(finish: Finish, *, total_s: float, load_s: float, prompt_s: float, eval_s: float) -> dict[str, Any]:
    """The closing object's statistics (durations in nanoseconds, as Ollama gives them)."""
    return {"done": True, "done_reason": DONE_REASONS.get(finish.finish_reason, finish.finish_reason),
            "total_duration": ns(total_s), "load_duration": ns(load_s),
            "prompt_eval_count": finish.prompt_tokens, "prompt_eval_duration": ns(prompt_s),
            "eval_count": finish.completion_tokens, "eval_duration": ns(eval_s)}


def piece(kind: str, model: str, text: str, *, thinking: bool = False) -> dict[str, Any]:
    """One streamed object before the last: chat's `message` or generate's `response`."""
    out: dict[str, Any] = {"model": model, "created_at": timestamp()}
    if kind == "chat":
        out["message"] = {"role": "assistant", "content": "", "thinking": text} if thinking \
            else {"role": "assistant", "content": text}
    else:
        out.update({"response": "", "thinking": text} if thinking else {"response": text})
    out["done"] = False
    return out


def tool_call(call: ToolCall) -> dict[str, Any]:
    """A parsed call as Ollama gives it: the arguments an object, not OpenAI's JSON text."""
    try:
        arguments = json.loads(call.arguments)
    except ValueError:
        arguments = {}
    return {"function": {"name": call.name, "arguments": arguments if isinstance(arguments, dict) else {}}}


def call_piece(model: str, call: ToolCall) -> dict[str, Any]:
    """A streamed /api/chat object carrying one whole tool call (Ollama streams calls whole, not in pieces)."""
    return {"model": model, "created_at": timestamp(),
            "message": {"role": "assistant", "content": "", "tool_calls": [tool_call(call)]}, "done": False}


def answer(kind: str, model: str, text: str, thinking: str | None,
           calls: Sequence[ToolCall] = ()) -> dict[str, Any]:
    """The last object (the whole answer when not streamed, empty text when it was)."""
    out: dict[str, Any] = {"model": model, "created_at": timestamp()}
    if kind == "chat":
        out["message"] = {"role": "assistant", "content": text,
                          **({"thinking": thinking} if thinking else {}),
                          **({"tool_calls": [tool_call(c) for c in calls]} if calls else {})}
    else:
        out["response"] = text
        if thinking:
            out["thinking"] = thinking
    return out


def error_body(openai_body: dict[str, Any]) -> dict[str, Any]:
    """Ollama's error object: the message under `error` (what its clients raise), Garrison's stable code beside."""
    error = openai_body.get("error", {})
    return {"error": error.get("message", ""), "code": error.get("code")}


def ndjson(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, separators=(",", ":")) + "\n").encode()
