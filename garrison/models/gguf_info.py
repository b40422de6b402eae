"""What a GGUF file says about itself: architecture, size, quantization, its header's key/values.

Read from the header only (gguf-py maps the file, no weights are loaded, and no tokenizer library comes
in); `ollama show` and the `/api/tags` details show it. Artifacts are addressed by content and never
change in place, so one read per file is cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from garrison.paths import import_gguf_py


@dataclass(frozen=True)
class GgufInfo:
    architecture: str = ""
    parameter_count: int = 0
    file_type: str = ""  # "Q4_K_M", "F16", ...
    chat_template: str = ""
    context_length: int = 0
    #: Every scalar key/value of the header; arrays (the vocabulary, merges) as [] as Ollama shows them.
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def parameter_size(self) -> str:
        """As Ollama writes it: 8.0B, 494.0M, 140K."""
        for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
            if self.parameter_count >= scale:
                return f"{self.parameter_count / scale:.1f}{unit}" if unit != "K" \
                    else f"{round(self.parameter_count / scale)}{unit}"
        return str(self.parameter_count)


def gguf_info(path: Path) -> GgufInfo:
    return _read(str(path))


@functools.lru_cache(maxsize=64)
def _read(path: str) -> GgufInfo:
    gguf = import_gguf_py()
    reader = gguf.GGUFReader(path)
    metadata: dict[str, Any] = {}
    for name, item in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        metadata[name] = [] if item.types and item.types[0] == gguf.GGUFValueType.ARRAY else item.contents()
    arch = str(metadata.get("general.architecture", ""))
    file_type = metadata.get("general.file_type")
    try:
        type_name = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else ""
    except ValueError:
        type_name = str(file_type)
    count = sum(int(t.n_elements) for t in reader.tensors)
    metadata["general.parameter_count"] = count
    return GgufInfo(architecture=arch, parameter_count=count, file_type=type_name,
                    chat_template=str(metadata.get("tokenizer.chat_template", "")),
                    context_length=int(metadata.get(f"{arch}.context_length", 0) or 0), metadata=metadata)
