"""Chat templates rendered exactly as Hugging Face transformers renders them, without transformers.

A model's chat template is written for transformers' `apply_chat_template`: its Jinja environment
decides what the template may use (`{% break %}`, `{% generation %}`, `strftime_now`,
`raise_exception`) and how `tojson` writes (non-ASCII and `<>&'` as they are). Training renders
with that environment inside torch workers; serving, the render endpoint and the parity gate run
in the daemon, which never imports transformers or torch. Any difference between the two is
train/serve skew: the model is asked in a form it never saw. So this module rebuilds the same
environment on jinja2 alone and every layer renders through it.

Written by hand after transformers 4.57 `utils/chat_template_utils.py` (`_compile_jinja_template`,
`render_jinja_template`) and `tokenization_utils_base.apply_chat_template`:
- `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with jinja2's loop
  controls and a `generation` block tag (transformers' AssistantTracker: the block's body renders
  unchanged; we do not track assistant spans, training finds them itself);
- `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)` as `json.dumps`,
  replacing Jinja's HTML-escaping filter;
- `raise_exception(message)` raises a TemplateError; `strftime_now(fmt)` is the local time now;
- the variables: the tokenizer's special tokens (those that are set), then the caller's template
  keyword arguments over them, then `messages`, `tools`, `documents`, `add_generation_prompt`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from garrison.errors import InvalidRequest

# The names transformers itself passes; a template keyword argument may not replace them.
RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt"})
# Hugging Face's special-token attributes, in the order of `special_tokens_map`.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token", "additional_special_tokens")


class TemplateRefusal(TemplateError):
    """`raise_exception` in a template: the template refuses these messages (a client error)."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks the assistant's tokens; renders its body unchanged."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 declares it a plain set attribute)

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise TemplateRefusal(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compiled once per template text: a large template takes milliseconds to parse."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def chosen_template(template: str | Mapping[str, str] | None, tools: Sequence[Any] | None = None) -> str | None:
    """One template text from a tokenizer's `chat_template`, which older tokenizers keep as named
    templates: "tool_use" when tools are given and it exists, else "default" (transformers' choice)."""
    if template is None or isinstance(template, str):
        return template
    if tools and "tool_use" in template:
        return template["tool_use"]
    return template.get("default")


def special_tokens_map(tokens: Mapping[str, Any]) -> dict[str, Any]:
    """The tokens a template sees, as transformers' `special_tokens_map`: unset ones are left out."""
    return {name: tokens[name] for name in SPECIAL_TOKEN_NAMES if tokens.get(name) not in (None, "", [])}


def check_kwargs(kwargs: Any, param: str = "chat_template_kwargs") -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise InvalidRequest(f"'{param}' must be an object whose keys are names", param=param)
    clash = sorted(RESERVED & set(kwargs))
    if clash:
        raise InvalidRequest(f"'{param}' may not set {', '.join(clash)}: they are request fields", param=param)
    return kwargs


def render(template: str | None, messages: Sequence[Mapping[str, Any]], *,
           special_tokens: Mapping[str, Any] | None = None, tools: Sequence[Any] | None = None,
           documents: Sequence[Any] | None = None, add_generation_prompt: bool = True,
           kwargs: Mapping[str, Any] | None = None) -> str:
    """The template applied to one conversation, or InvalidRequest naming why it cannot be.

    A template is data from a model file, not code we trust: the sandbox keeps it from reaching
    anything but the values passed here, and any error it raises is the request's, not ours.
    """
    if not template:
        raise InvalidRequest("this model has no chat template; use /v1/completions with a plain prompt",
                             param="model", code="no_chat_template")
    variables: dict[str, Any] = {**special_tokens_map(special_tokens or {}), **check_kwargs(kwargs)}
    try:
        compiled = compile_template(template)
        return compiled.render(messages=messages, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **variables)
    except TemplateRefusal as exc:
        raise InvalidRequest(f"the model's chat template refused the messages: {exc}", param="messages",
                             code="chat_template_refused") from None
    except TemplateError as exc:
        raise InvalidRequest(f"the model's chat template failed: {exc}", param="model",
                             code="chat_template_error") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as exc:
        # A template's own arithmetic on the messages (content None + str, a missing key): the
        # messages do not fit what the template expects.
        raise InvalidRequest(f"the model's chat template failed on these messages: {type(exc).__name__}: {exc}",
                             param="messages", code="chat_template_error") from None
    except RecursionError:
        raise InvalidRequest("the model's chat template recursed too deeply", param="model",
                             code="chat_template_error") from None
