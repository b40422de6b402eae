"""A chat answer's text as OpenAI gives it back: reasoning, content and tool calls apart.

The two splitters run in a chain on the same pieces of text: thinking is taken out first
(garrison.serving.reasoning), then what is left is read for tool calls (garrison.serving.tool_calls),
since a thinking model thinks before it calls. Streamed and whole answers go through the same
chain, so a stream carries exactly the parts the whole answer has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from garrison.serving.reasoning import ReasoningSplitter, ReasoningSyntax
from garrison.serving.tool_calls import ToolCall, ToolCallSplitter, ToolFormat

PartKind = Literal["reasoning", "content", "tool_call"]
Part = tuple[PartKind, "str | ToolCall"]


@dataclass
class ChatOutput:
    """One choice's output, piece by piece: `feed` each generated piece, then `finish`."""

    reasoning: ReasoningSplitter | None = None
    tools: ToolCallSplitter | None = None
    _parts: list[Part] = field(default_factory=list)

    @classmethod
    def of(cls, syntax: ReasoningSyntax | None, tool_format: ToolFormat | None, parallel: bool = True) -> ChatOutput:
        return cls(None if syntax is None else ReasoningSplitter(syntax),
                   None if tool_format is None else ToolCallSplitter(tool_format, parallel))

    @property
    def calls(self) -> list[ToolCall]:
        return [] if self.tools is None else self.tools.calls

    def _content(self, text: str, final: bool) -> list[Part]:
        if self.tools is None:
            return [("content", text)] if text else []
        pieces = self.tools.feed(text) + (self.tools.finish() if final else [])
        return [("content", p) if isinstance(p, str) else ("tool_call", p) for p in pieces]

    def _split(self, text: str, final: bool) -> list[Part]:
        if self.reasoning is None:
            return self._content(text, final)
        out: list[Part] = []
        parts = self.reasoning.feed(text) + (self.reasoning.finish() if final else [])
        for kind, piece in parts:
            if kind == "reasoning":
                out.append(("reasoning", piece))
            else:
                out += self._content(piece, False)
        if final:
            out += self._content("", True)
        return out

    def feed(self, text: str) -> list[Part]:
        return self._split(text, False)

    def finish(self, text: str = "") -> list[Part]:
        return self._split(text, True)

    def finish_reason(self, engine_reason: str) -> str:
        """OpenAI's "tool_calls" when the answer ended on its own after calling tools."""
        return "tool_calls" if self.calls and engine_reason == "stop" else engine_reason


def whole(output: ChatOutput, text: str) -> tuple[str | None, str, list[ToolCall]]:
    """A whole answer as (reasoning_content or None, content, tool calls)."""
    parts = output.finish(text)
    reasoning = "".join(p for k, p in parts if k == "reasoning" and isinstance(p, str))
    content = "".join(p for k, p in parts if k == "content" and isinstance(p, str))
    return (reasoning or None) if output.reasoning is not None else None, content, output.calls
