"""Which request fields each OpenAI route takes: one table, read by the handlers and the docs' test.

OpenAI answers an unknown field with 400 naming it; a silently dropped field hides a typo
(`max_token`) or a feature the client believes it got. So every field OpenAI defines for a route
is accepted (real clients send `user`, `store`, `metadata`, ... as a matter of course), those
Garrison cannot honour by doing nothing are refused unless they ask for nothing, and every other
field is refused unless the operator sets `allow_unknown_fields`. Garrison's own extensions
(llama-server's names) are accepted beside OpenAI's.

A new field is one row. `docs/operator-guide.md` lists the ignored ones (tests/serving keeps it so).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from garrison.errors import InvalidRequest

Handling = Literal["used", "ignored", "no-op only"]


@dataclass(frozen=True)
class Field:
    """How a route treats one request field.

    "ignored": accepted and without effect, harmlessly (metadata, a cache hint, a billing tag).
    "no-op only": accepted while it asks for nothing Garrison lacks (`accepts` says which values).
    """

    name: str
    handling: Handling = "used"
    why: str = ""
    accepts: Callable[[Any], bool] | None = None


def _null_or(*values: Any) -> Callable[[Any], bool]:
    return lambda value: value is None or value in values


def _fields(*rows: Field | str) -> dict[str, Field]:
    out = {}
    for row in rows:
        field = Field(row) if isinstance(row, str) else row
        out[field.name] = field
    return out


# Sampling extensions llama-server accepts under these names; Garrison implements each.
_SAMPLING_EXTENSIONS = ("top_k", "min_p", "repeat_penalty", "repeat_last_n", "ignore_eos", "grammar")
_CACHE_PROMPT = Field("cache_prompt", "ignored", "llama-server's switch; Garrison always reuses the KV cache")
_USER = Field("user", "ignored", "an end-user tag for OpenAI's abuse monitoring; keys identify callers here")

CHAT_FIELDS: dict[str, Field] = _fields(
    "model", "messages", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs",
    "max_tokens", "max_completion_tokens", "n", "response_format", "seed", "stop", "stream", "stream_options",
    "temperature", "top_p", "tools",
    _USER,
    Field("metadata", "ignored", "tags for OpenAI's stored completions; nothing is stored"),
    Field("store", "ignored", "OpenAI's stored completions; Garrison stores no completion"),
    Field("service_tier", "ignored", "OpenAI's processing tiers; one tier here"),
    Field("prediction", "ignored", "predicted output is a latency hint; the answer is the same without it"),
    Field("reasoning_effort", "ignored", "OpenAI's reasoning models; a chat template's own switch goes in "
                                         "chat_template_kwargs"),
    Field("verbosity", "ignored", "OpenAI's reasoning models"),
    Field("prompt_cache_key", "ignored", "a routing hint for OpenAI's cache; the KV cache is reused by prefix"),
    Field("prompt_cache_retention", "ignored", "OpenAI's cache retention; the KV cache is kept per slot"),
    Field("safety_identifier", "ignored", "an end-user tag for OpenAI's abuse monitoring"),
    "tool_choice", "parallel_tool_calls",
    Field("functions", "ignored", "the deprecated form of tools"),
    Field("function_call", "ignored", "the deprecated form of tool_choice"),
    Field("modalities", "no-op only", "text only", lambda v: v is None or v == ["text"]),
    Field("audio", "no-op only", "no audio output", _null_or()),
    Field("web_search_options", "no-op only", "the appliance never goes online", _null_or()),
    *_SAMPLING_EXTENSIONS, _CACHE_PROMPT, "chat_template_kwargs", "reasoning_format",
)

COMPLETION_FIELDS: dict[str, Field] = _fields(
    "model", "prompt", "echo", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "max_tokens",
    "n", "seed", "stop", "stream", "stream_options", "temperature", "top_p",
    _USER,
    Field("best_of", "no-op only", "server-side best-of is not implemented: ask for n choices and pick",
          lambda v: v is None or v == 1),
    Field("suffix", "no-op only", "insertion (fill in the middle) is not implemented", _null_or("")),
    *_SAMPLING_EXTENSIONS, _CACHE_PROMPT, "response_format",
    "max_completion_tokens", "top_logprobs",  # the chat route's names, taken here too (as llama-server does)
)

EMBEDDING_FIELDS: dict[str, Field] = _fields(
    "model", "input", "encoding_format", "dimensions", _USER,
    "truncate",  # Garrison's: cut an over-long input at the model's limit instead of refusing it
)

# The Responses API (garrison.daemon.api.responses): OpenAI's create fields, and the chat route's extensions.
RESPONSES_FIELDS: dict[str, Field] = _fields(
    "model", "input", "instructions", "stream", "store", "previous_response_id", "max_output_tokens",
    "temperature", "top_p", "tools", "tool_choice", "parallel_tool_calls", "text", "metadata",
    _USER,
    Field("include", "ignored", "extra output data: reasoning is given in the clear and nothing else is held back"),
    Field("reasoning", "ignored", "OpenAI's reasoning models; a chat template's own switch goes in "
                                  "chat_template_kwargs"),
    Field("service_tier", "ignored", "OpenAI's processing tiers; one tier here"),
    Field("prompt_cache_key", "ignored", "a routing hint for OpenAI's cache; the KV cache is reused by prefix"),
    Field("prompt_cache_retention", "ignored", "OpenAI's cache retention; the KV cache is kept per slot"),
    Field("safety_identifier", "ignored", "an end-user tag for OpenAI's abuse monitoring"),
    Field("stream_options", "ignored", "obfuscation padding of OpenAI's stream; the appliance sends none"),
    Field("max_tool_calls", "ignored", "a limit on built-in tool calls; the appliance hosts no built-in tools"),
    Field("background", "no-op only", "background responses are not implemented", _null_or(False)),
    Field("conversation", "no-op only", "the Conversations API is not implemented: use previous_response_id",
          _null_or()),
    Field("prompt", "no-op only", "OpenAI's stored prompt templates are not implemented", _null_or()),
    Field("truncation", "no-op only", "an over-long input is refused (context_length_exceeded), never cut",
          _null_or("disabled")),
    Field("top_logprobs", "no-op only", "no logprobs in Responses output yet; chat completions give them",
          _null_or(0)),
    *_SAMPLING_EXTENSIONS, "seed", "presence_penalty", "frequency_penalty", "logit_bias", "stop",
    "chat_template_kwargs", "reasoning_format",
)

# Ollama's API (garrison.daemon.api.ollama): its documented fields, by the same rules.
_KEEP_ALIVE = Field("keep_alive", "ignored", "how long a model stays loaded is the operator's model_keep_alive_s")
_OLLAMA_GENERATION = (
    "model", "stream", "format", "options", "think", _KEEP_ALIVE,
    Field("truncate", "no-op only", "an over-long prompt is refused (context_length_exceeded), never cut",
          _null_or(False)),
    Field("shift", "no-op only", "the context is not shifted: generation ends at the context's end", _null_or(False)),
    Field("logprobs", "no-op only", "Ollama's API gives none; the OpenAI routes do", _null_or(False)),
    Field("top_logprobs", "no-op only", "as logprobs", _null_or(0)),
)
OLLAMA_CHAT_FIELDS: dict[str, Field] = _fields(*_OLLAMA_GENERATION, "messages", "tools")
OLLAMA_GENERATE_FIELDS: dict[str, Field] = _fields(
    *_OLLAMA_GENERATION, "prompt", "system", "raw",
    Field("suffix", "no-op only", "insertion (fill in the middle) is not implemented", _null_or("")),
    Field("template", "no-op only", "the model's own chat template renders the prompt (Ollama's Go templates "
                                    "are not read)", _null_or("")),
    Field("context", "no-op only", "the deprecated conversation memory: send the conversation to /api/chat",
          lambda v: v is None or v == []),
    Field("images", "no-op only", "the served models read text only", lambda v: v is None or v == []),
    *(Field(name, "no-op only", "image generation", _null_or()) for name in ("width", "height", "steps")),
)
OLLAMA_EMBED_FIELDS: dict[str, Field] = _fields("model", "input", "truncate", "dimensions", "options", _KEEP_ALIVE)
OLLAMA_EMBEDDINGS_FIELDS: dict[str, Field] = _fields("model", "prompt", "options", _KEEP_ALIVE)
_LOAD_TIME = "a load-time setting: the model's import settings and the daemon's configuration decide it"
OLLAMA_OPTIONS: dict[str, Field] = _fields(
    "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
    "frequency_penalty", "seed", "stop", "num_predict",
    Field("num_ctx", "ignored", "the context length is the model's import setting (--ctx)"),
    *(Field(name, "ignored", _LOAD_TIME) for name in (
        "num_batch", "num_gpu", "main_gpu", "low_vram", "numa", "use_mmap", "use_mlock", "num_thread",
        "vocab_only", "embedding_only", "logits_all", "f16_kv")),
    Field("num_keep", "ignored", "the context is never shifted, so no tokens are kept through a shift"),
    Field("penalize_newline", "ignored", "Ollama's own runner ignores it too"),
    Field("mirostat", "no-op only", "Mirostat sampling is not implemented", _null_or(0)),
    Field("mirostat_tau", "ignored", "used only by Mirostat, which is off"),
    Field("mirostat_eta", "ignored", "used only by Mirostat, which is off"),
    Field("tfs_z", "no-op only", "tail-free sampling is not implemented (llama.cpp dropped it)", _null_or(1, 1.0)),
    Field("typical_p", "no-op only", "locally typical sampling is not implemented", _null_or(1, 1.0)),
)

ROUTE_FIELDS: Mapping[str, dict[str, Field]] = {"chat": CHAT_FIELDS, "completion": COMPLETION_FIELDS,
                                                "embedding": EMBEDDING_FIELDS, "responses": RESPONSES_FIELDS,
                                                "ollama_chat": OLLAMA_CHAT_FIELDS,
                                                "ollama_generate": OLLAMA_GENERATE_FIELDS,
                                                "ollama_embed": OLLAMA_EMBED_FIELDS,
                                                "ollama_embeddings": OLLAMA_EMBEDDINGS_FIELDS,
                                                "ollama_options": OLLAMA_OPTIONS}


def check_fields(body: Mapping[str, Any], route: str, *, allow_unknown: bool) -> None:
    """400 naming the first field the route does not take (unknown_parameter) or cannot honour
    (unsupported_parameter); `allow_unknown` (the allow_unknown_fields setting) lets unknown ones pass."""
    table = ROUTE_FIELDS[route]
    unknown = sorted(name for name in body if name not in table)
    if unknown and not allow_unknown:
        names = ", ".join(repr(n) for n in unknown)
        raise InvalidRequest(f"Unrecognized request argument{'s' if len(unknown) > 1 else ''} supplied: {names} "
                             "(the operator's allow_unknown_fields setting lets unknown fields pass)",
                             code="unknown_parameter", param=unknown[0])
    for name, value in body.items():
        field = table.get(name)
        if field is not None and field.accepts is not None and not field.accepts(value):
            raise InvalidRequest(f"'{name}' is not supported with this value: {field.why}",
                                 code="unsupported_parameter", param=name)


def ignored_fields() -> dict[str, list[Field]]:
    """Per route, the fields accepted without effect (the operator guide lists them)."""
    return {route: [f for f in table.values() if f.handling != "used"] for route, table in ROUTE_FIELDS.items()}
