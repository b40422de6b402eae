"""Thinking split from the answer: `reasoning_content` beside `content`, as llama-server and vLLM give it.

A model whose chat template marks thinking (`<think>...</think>`) writes its reasoning first and
its answer after the closing marker. Clients built for OpenAI-compatible servers expect the two
apart: the reasoning in `message.reasoning_content` (streamed as `delta.reasoning_content`), the
answer alone in `content`, so the next turn does not feed the thinking back. `reasoning_format:
"none"` keeps it inline, as llama-server's option of that name does.

The split works on text as it streams: a marker may arrive cut across tokens, so the tail that
could still become a marker is held back until the next piece decides it. Whitespace around the
markers is trimmed, as llama-server trims it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from garrison.errors import InvalidRequest

# (opening, closing) markers, first match wins: the closing marker must appear in the template.
MARKERS: tuple[tuple[str, str], ...] = (
    ("<seed:think>", "</seed:think>"),
    ("<think>", "</think>"),
)
# reasoning_format values (llama-server's names): whether to split.
FORMATS: dict[str, bool] = {"auto": True, "deepseek": True, "none": False}

Kind = Literal["reasoning", "content"]


@dataclass(frozen=True)
class ReasoningSyntax:
    start: str
    end: str
    forced_open: bool  # the prompt ends inside an opened thinking block: the output starts thinking


def reasoning_syntax(template: str | None, prompt: str, body: dict[str, Any]) -> ReasoningSyntax | None:
    """How to split this request's output, or None to leave it inline."""
    fmt = body.get("reasoning_format", "auto")
    if fmt not in FORMATS:
        raise InvalidRequest(f"'reasoning_format' must be one of {', '.join(FORMATS)}", param="reasoning_format")
    if not FORMATS[fmt] or not template:
        return None
    for start, end in MARKERS:
        if end in template:
            return ReasoningSyntax(start, end, forced_open=prompt.rfind(start) > prompt.rfind(end))
    return None


def _held_tail(text: str, marker: str) -> int:
    """Length of text's tail that could be the start of marker (held until the next piece)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


@dataclass
class ReasoningSplitter:
    syntax: ReasoningSyntax
    _mode: Literal["undecided", "reasoning", "content"] = "undecided"
    _buffer: str = ""
    _strip_leading: bool = False
    _out: list[tuple[Kind, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.syntax.forced_open:
            self._mode, self._strip_leading = "reasoning", True

    def _emit(self, kind: Kind, text: str) -> None:
        if self._strip_leading:
            text = text.lstrip()
            if not text:
                return
            self._strip_leading = False
        if self._out and self._out[-1][0] == kind:
            self._out[-1] = (kind, self._out[-1][1] + text)
        elif text:
            self._out.append((kind, text))

    def feed(self, text: str) -> list[tuple[Kind, str]]:
        self._buffer += text
        while self._step():
            pass
        out, self._out = self._out, []
        return out

    def _step(self) -> bool:
        """One decision on the buffer; True when another may follow at once."""
        buf, start, end = self._buffer, self.syntax.start, self.syntax.end
        if self._mode == "undecided":
            head = buf.lstrip()
            if head.startswith(start):
                self._mode, self._strip_leading = "reasoning", True
                self._buffer = head[len(start):]
                return True
            if start.startswith(head):
                return False  # could still be the opening marker
            self._mode = "content"
            return True
        if self._mode == "reasoning":
            idx = buf.find(end)
            if idx >= 0:
                self._emit("reasoning", buf[:idx].rstrip())
                self._mode, self._strip_leading = "content", True
                self._buffer = buf[idx + len(end):]
                return True
            cut = len(buf) - _held_tail(buf, end)
            cut = len(buf[:cut].rstrip())  # trailing whitespace may precede the closing marker
            self._emit("reasoning", buf[:cut])
            self._buffer = buf[cut:]
            return False
        self._emit("content", buf)
        self._buffer = ""
        return False

    def finish(self) -> list[tuple[Kind, str]]:
        """The held tail once the output has ended."""
        if self._mode == "reasoning":
            self._emit("reasoning", self._buffer.rstrip())
        else:
            self._emit("content", self._buffer)
        self._buffer = ""
        out, self._out = self._out, []
        return out


def split_text(syntax: ReasoningSyntax, text: str) -> tuple[str | None, str]:
    """A whole answer as (reasoning_content or None, content)."""
    splitter = ReasoningSplitter(syntax)
    parts = splitter.feed(text) + splitter.finish()
    reasoning = "".join(t for k, t in parts if k == "reasoning")
    content = "".join(t for k, t in parts if k == "content")
    return (reasoning or None), content
