"""Tool calling on chat completions: the request's tools, the model's calls parsed out of its text.

A model calls a tool by writing the call in the form its chat template taught it. The template
shows the tools (rendered as transformers renders them); what the model writes back is one of a
few families, one row each in FORMATS, chosen by what the template itself contains:

- hermes   (Qwen 2.5/3, Hermes, many fine-tunes): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
- mistral  (Mistral, Mixtral, Ministral): `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`; the marker is a
  control token that the detokenizer drops, so a bare leading `[` opens the calls too
- llama3   (Llama 3.1-3.3): `{"name": ..., "parameters": {...}}` as the whole answer (after `<|python_tag|>`)
- generic  (a template that does not know tools): Garrison describes the tools in a system message and
  asks for `{"tool_calls": [{"name": ..., "arguments": {...}}]}` (llama-server's generic format)
- json     (a template that shows tools in a syntax none of these rows reads): that JSON is read back

The splitter works on text as it streams, like the reasoning splitter: text that could still
become a marker is held back until the next piece decides it, and a call is delivered once it
is complete (its JSON parses), so a stream carries each call whole, in OpenAI's delta shape.
`tool_choice` "required" or a named function constrains the output with a grammar built from
the tools' JSON schemas (garrison.engine.json_grammar), in the row's own form.

Response screening (garrison.operations.inference_privacy) runs on the generated text before
it reaches this module, so arguments are screened like any response text: a redacted value's
tag keeps the JSON valid, a denied one ends the output and no call is parsed from it.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from garrison.errors import InvalidRequest

_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI's `function.arguments`
    id: str

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


Piece = str | ToolCall  # what the splitter gives: content text, or a complete call


# ------------------------------------------------------------------------------------ request

@dataclass(frozen=True)
class ToolRequest:
    """The request's tools and how they may be used (`tool_choice`, `parallel_tool_calls`)."""

    tools: list[dict[str, Any]]
    choice: Literal["auto", "required"] | str  # or the one function's name that must be called
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.choice != "auto"

    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]


def _tools(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise InvalidRequest("'tools' must be a list of function tools", param="tools")
    out = []
    for i, tool in enumerate(raw):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequest(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                                 param=f"tools[{i}]")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON schema object",
                                 param=f"tools[{i}].function.parameters")
        out.append(tool)
    return out


def tool_request(body: Mapping[str, Any]) -> ToolRequest | None:
    """The request's tool use, or None when there is none (no tools, or tool_choice "none")."""
    raw, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise InvalidRequest("'parallel_tool_calls' must be true or false", param="parallel_tool_calls")
    tools = _tools(raw) if raw is not None else []
    if choice is None or choice == "auto":
        return ToolRequest(tools, "auto", parallel) if tools else None
    if choice == "none":
        return None
    if choice == "required":
        name = "required"
    elif isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        named = fn.get("name") if isinstance(fn, dict) else choice.get("name")  # chat's form, or the Responses API's
        if not isinstance(named, str) or named not in [t["function"]["name"] for t in tools]:
            raise InvalidRequest(f"'tool_choice' names {named!r}, which is not one of the request's tools",
                                 param="tool_choice")
        name = named
    else:
        raise InvalidRequest("'tool_choice' must be none, auto, required or {\"type\": \"function\", \"function\": "
                             "{\"name\": ...}}", param="tool_choice")
    if not tools:
        raise InvalidRequest("'tool_choice' needs 'tools'", param="tool_choice")
    return ToolRequest(tools, name, parallel)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them (templates are written for transformers): a tool call's
    arguments as an object, not OpenAI's JSON text, and an assistant turn of calls alone with empty
    content, not null (Qwen3's template looks inside it). vLLM passes them the same way."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if not calls:
            out.append(message)
            continue
        fixed = []
        for call in calls:
            fn = call.get("function")
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                try:
                    args = json.loads(fn["arguments"])
                except ValueError:
                    args = None
                if isinstance(args, dict):
                    call = {**call, "function": {**fn, "arguments": args}}
            fixed.append(call)
        out.append({**message, "tool_calls": fixed, "content": message.get("content") or ""})
    return out


# ------------------------------------------------------------------------------------ formats

def _openai_id() -> str:
    return "call_" + secrets.token_hex(12)


_ALNUM = string.ascii_letters + string.digits


def _mistral_id() -> str:
    """Mistral's templates refuse any other id: nine letters and digits."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


def _call(obj: Any, key: str) -> tuple[str, str] | None:
    """(name, arguments JSON) from one call object, or None when it is not one."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):  # {"type": "function", "function": {...}}
        obj = obj["function"]
    name = obj.get("name")
    args = obj.get(key, obj.get("arguments", obj.get("parameters", {})))
    if not isinstance(name, str) or not name:
        return None
    if isinstance(args, str):
        return name, args
    return name, json.dumps(args, ensure_ascii=False)


Taken = tuple[list[tuple[str, str] | str], int] | None
"""What a format's reader found at the start of the call region: the calls (and, for the generic
format's `response`, content) and how many characters they used; ([], 0) when it needs more text;
None when the text is not calls after all (it is then content)."""


def _decode(text: str, pos: int) -> tuple[Any, int] | None:
    try:
        return _DECODER.raw_decode(text, pos)
    except ValueError:
        return None


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _could_grow(text: str, pos: int, final: bool) -> Taken:
    """Undecodable JSON at pos: more may complete it, or (at the end) it is not a call."""
    return None if final else ([], 0)


def _take_hermes(text: str, final: bool) -> Taken:
    opening, closing = "<tool_call>", "</tool_call>"
    pos = _skip_ws(text, 0)
    if not text.startswith(opening, pos):
        return None if final or not opening.startswith(text[pos:]) else ([], 0)
    end = text.find(closing, pos)
    body_end = end if end >= 0 else len(text)
    if end < 0 and not final:
        return [], 0
    decoded = _decode(text[:body_end], _skip_ws(text, pos + len(opening)))
    call = _call(decoded[0], "arguments") if decoded else None
    if call is None or _skip_ws(text[:body_end], decoded[1] if decoded else 0) != body_end:
        return None
    return [call], (end + len(closing) if end >= 0 else len(text))


def _take_json_calls(key: str, prefix: str) -> Callable[[str, bool], Taken]:
    """A reader for calls written as JSON: one object, or a list of them, after an optional marker."""
    def take(text: str, final: bool) -> Taken:
        pos = _skip_ws(text, 0)
        if text.startswith(prefix, pos):
            pos = _skip_ws(text, pos + len(prefix))
        elif prefix.startswith(text[pos:]) and not final and text[pos:]:
            return [], 0
        decoded = _decode(text, pos)
        if decoded is None:
            return _could_grow(text, pos, final)
        value, end = decoded
        items = value if isinstance(value, list) else [value]
        calls = [_call(item, key) for item in items]
        if not items or any(c is None for c in calls):
            return None
        return [c for c in calls if c is not None], end
    return take


def _take_generic(text: str, final: bool) -> Taken:
    pos = _skip_ws(text, 0)
    decoded = _decode(text, pos)
    if decoded is None:
        return _could_grow(text, pos, final)
    value, end = decoded
    if isinstance(value, dict) and isinstance(value.get("response"), str) and len(value) == 1:
        return [value["response"]], end
    if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
        items = value["tool_calls"]
    elif isinstance(value, dict) and isinstance(value.get("tool_call"), dict):
        items = [value["tool_call"]]
    else:
        items = [value]
    calls = [_call(item, "arguments") for item in items]
    if not items or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None], end


def _grammar_hermes(call: str, parallel: bool) -> str:
    one = f'"<tool_call>\\n" {call} "\\n</tool_call>"'
    return f'{one} ("\\n" {one})*' if parallel else one


def _grammar_list(call: str, parallel: bool) -> str:
    return f'"[" {call} ("," " "? {call})* "]"' if parallel else f'"[" {call} "]"'


def _grammar_one(call: str, parallel: bool) -> str:
    return call


def _grammar_generic(call: str, parallel: bool) -> str:
    more = f' ("," " "? {call})*' if parallel else ""
    return f'"{{\\"tool_calls\\": [" {call}{more} "]}}"'


@dataclass(frozen=True)
class ToolFormat:
    """One family of tool-call syntax: how to recognise it in a template, read it, and force it."""

    name: str
    detect: Callable[[str], bool]  # the chat template's text uses this family
    markers: tuple[str, ...]  # any of these in the output opens the calls
    leading: str  # a first character of the output that opens the calls ("" for none)
    take: Callable[[str, bool], Taken]
    arguments_key: str  # the call object's key for the arguments (what the grammar writes)
    grammar: Callable[[str, bool], str]  # GBNF for the calls, given the one-call rule's name and parallelism
    new_id: Callable[[], str] = _openai_id
    describes_tools: bool = False  # Garrison puts the tools in a system message (the template does not)


FORMATS: tuple[ToolFormat, ...] = (
    ToolFormat("hermes", lambda t: "<tool_call>" in t, ("<tool_call>",), "", _take_hermes, "arguments",
               _grammar_hermes),
    ToolFormat("mistral", lambda t: "[TOOL_CALLS]" in t, ("[TOOL_CALLS]",), "[",
               _take_json_calls("arguments", "[TOOL_CALLS]"), "arguments", _grammar_list, _mistral_id),
    ToolFormat("llama3", lambda t: "<|start_header_id|>" in t and ("<|python_tag|>" in t or '"parameters"' in t),
               ("<|python_tag|>",), "{",
               _take_json_calls("parameters", "<|python_tag|>"), "parameters", _grammar_one),
    # A template that shows tools in a syntax of its own: the tools stay as it shows them, and a call
    # written as generic JSON is read (a call in the model's own syntax stays content).
    ToolFormat("json", lambda t: "tools" in t, (), "{", _take_generic, "arguments", _grammar_generic),
    ToolFormat("generic", lambda t: True, (), "{", _take_generic, "arguments", _grammar_generic,
               describes_tools=True),
)
FORMATS_BY_NAME = {f.name: f for f in FORMATS}


def tool_format(template: str | None) -> ToolFormat:
    """The first row whose detector matches the template; a template that never reads `tools` gets the
    generic row, whatever else it contains."""
    text = template or ""
    if "tools" not in text:
        return FORMATS_BY_NAME["generic"]
    return next(f for f in FORMATS if f.detect(text))


GENERIC_INSTRUCTIONS = (
    "You can call these tools (JSON schemas of their arguments):\n{tools}\n\n"
    "To call tools, answer with only a JSON object: "
    '{{"tool_calls": [{{"name": "<tool name>", "arguments": {{<arguments>}}}}]}}. '
    'To answer without a tool, answer with {{"response": "<your answer>"}} or with plain text.'
)


def prompt_messages(messages: list[dict[str, Any]], fmt: ToolFormat | None,
                    request: ToolRequest | None) -> list[dict[str, Any]]:
    """The messages the template renders: for a template that does not show tools, the tools are
    described in the system message (llama-server does the same)."""
    messages = template_messages(messages)
    if request is None or fmt is None or not fmt.describes_tools:
        return messages
    text = GENERIC_INSTRUCTIONS.format(tools="\n".join(json.dumps(t.get("function", t), ensure_ascii=False)
                                                        for t in request.tools))
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


# ------------------------------------------------------------------------------------ grammar

def call_schema(request: ToolRequest, fmt: ToolFormat) -> dict[str, Any]:
    """One call, as a JSON schema: the name fixed to a tool's, its arguments that tool's schema."""
    tools = [t for t in request.tools if request.choice in ("required", "auto") or
             t["function"]["name"] == request.choice]
    options = [{"type": "object", "properties": {
        "name": {"const": t["function"]["name"]},
        fmt.arguments_key: t["function"].get("parameters") or {"type": "object"}},
        "required": ["name", fmt.arguments_key], "additionalProperties": False} for t in tools]
    return options[0] if len(options) == 1 else {"anyOf": options}


def tool_grammar(request: ToolRequest, fmt: ToolFormat, think: tuple[str, str, bool] | None = None) -> str:
    """GBNF that admits only calls of the request's tools, in the format's form. `think` (start, end,
    forced_open) lets a thinking model think first. CPU-bound (cached): run it off the event loop."""
    from garrison.engine.json_grammar import schema_grammar

    root = fmt.grammar("garrison-call", request.parallel)
    if think is not None:
        start, end, forced_open = think
        # A few blank characters after the thinking, not any number: a model kept from answering in
        # text would otherwise write newlines until max_tokens.
        body = f'([^<] | "<" [^/])* {json.dumps(end)} [ \\n]{{0,2}}'
        root = f"{body} {root}" if forced_open else f"({json.dumps(start)} {body})? {root}"
    return schema_grammar(call_schema(request, fmt), "garrison-call", root, param="tools")


# ------------------------------------------------------------------------------------ parsing

def _held_tail(text: str, markers: Sequence[str]) -> int:
    """Length of text's tail that could be the start of a marker."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), best, -1):
            if marker.startswith(text[-n:]):
                best = n
                break
    return best


@dataclass
class ToolCallSplitter:
    """One choice's output as content and complete tool calls, piece by piece (`feed`, then `finish`)."""

    fmt: ToolFormat
    parallel: bool = True
    calls: list[ToolCall] = field(default_factory=list)
    _buffer: str = ""
    _in_calls: bool = False
    _started: bool = False  # some non-space content has been given out: a leading character no longer counts

    def feed(self, text: str) -> list[Piece]:
        self._buffer += text
        return self._run(final=False)

    def finish(self) -> list[Piece]:
        return self._run(final=True)

    def _add(self, out: list[Piece], found: list[tuple[str, str] | str]) -> None:
        for item in found:
            if isinstance(item, str):
                if item:
                    out.append(item)
                    self._started = True
            elif self.parallel or not self.calls:
                call = ToolCall(item[0], item[1], self.fmt.new_id())
                self.calls.append(call)
                out.append(call)

    def _content(self, out: list[Piece], text: str) -> None:
        if self.calls and not text.strip():
            return  # whitespace between or after calls
        if text:
            out.append(text)
            self._started = self._started or bool(text.strip())

    def _run(self, *, final: bool) -> list[Piece]:
        out: list[Piece] = []
        while True:
            buf = self._buffer
            if self._in_calls:
                taken = self.fmt.take(buf, final)
                if taken is None:  # not calls after all: content, and no longer a leading character
                    self._in_calls, self._started = False, True
                    self._content(out, buf[:1])
                    self._buffer = buf[1:]
                    continue
                found, used = taken
                if used == 0:
                    return out
                self._add(out, found)
                self._buffer, self._in_calls = buf[used:], False
                continue
            head = buf.lstrip()
            if not self._started and self.fmt.leading and head.startswith(self.fmt.leading):
                self._buffer, self._in_calls = head, True
                continue
            found_at = min((i for i in (buf.find(m) for m in self.fmt.markers) if i >= 0), default=-1)
            if found_at >= 0:
                self._content(out, buf[:found_at].rstrip() if found_at else "")
                self._buffer, self._in_calls = buf[found_at:], True
                continue
            if final:
                self._content(out, buf.rstrip() if self.calls else buf)
                self._buffer = ""
                return out
            if not self._started and not head:
                return out  # only whitespace so far: a leading character may follow
            keep = _held_tail(buf, self.fmt.markers)
            keep = len(buf) - len(buf[:len(buf) - keep].rstrip())  # and the whitespace before it
            self._content(out, buf[:len(buf) - keep])
            self._buffer = buf[len(buf) - keep:]
            return out


def split_calls(fmt: ToolFormat, text: str, parallel: bool = True) -> tuple[str, list[ToolCall]]:
    """A whole answer as (content, calls)."""
    splitter = ToolCallSplitter(fmt, parallel)
    pieces = splitter.feed(text) + splitter.finish()
    return "".join(p for p in pieces if isinstance(p, str)), splitter.calls
