"""The conversation every chat-template comparison renders, and llama.cpp's 70 real templates.

A system message, two user turns, an assistant tool call, its tool result and an answer, with
text that exercises `tojson` (non-ASCII, `<>&'`). The tool call id is nine alphanumerics,
which Mistral's templates demand. The templates come from the llama-cpp-python source
distribution install.sh keeps in its wheelhouse (vendor/llama.cpp/models/templates), read from
the tarball at run time; without it the tests that need them skip.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse. Café <b>&</b> 'quoted'"},
    {"role": "user", "content": "What's the weather in Zürich?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call12345", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
    {"role": "tool", "tool_call_id": "call12345", "name": "get_weather",
     "content": "{\"temp\": 21, \"sky\": \"<sunny> & 'dry'\"}"},
    {"role": "assistant", "content": "It is 21 °C and sunny."},
    {"role": "user", "content": "Thanks! And tomorrow?"},
]
TOOLS: list[dict[str, Any]] = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city (°C)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def llama_cpp_sdist() -> Path | None:
    wheelhouse = Path(os.environ.get("GARRISON_WHEELHOUSE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "garrison" / "wheels")
    found = sorted(wheelhouse.glob("llama_cpp_python-*.tar.gz")) + sorted(wheelhouse.glob("llama-cpp-python-*.tar.gz"))
    return found[-1] if found else None


def llama_cpp_templates() -> dict[str, str]:
    """name -> template text, for every models/templates/*.jinja in the sdist ({} without one)."""
    sdist = llama_cpp_sdist()
    if sdist is None:
        return {}
    out: dict[str, str] = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if member.isfile() and parts[-2:-1] == ["templates"] and "models" in parts and \
                    member.name.endswith(".jinja"):
                data = tar.extractfile(member)
                assert data is not None
                out[parts[-1].removesuffix(".jinja")] = data.read().decode("utf-8")
    return dict(sorted(out.items()))
