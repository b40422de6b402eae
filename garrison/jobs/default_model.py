"""The `build-default-model` job kind: the base model Garrison builds for itself.

Nothing is downloaded, ever, so the first model an appliance has is made here: a small
Llama with a SentencePiece tokenizer, pre-trained for a few minutes on text every machine
has (licence texts, Python's own documentation), registered as a Hugging Face model with a
signed manifest. Builds are cached outside the state folder, so a second appliance (or a
second quickstart) on the same machine takes seconds.
"""

from __future__ import annotations

import time
from typing import Any

from garrison.errors import InvalidRequest
from garrison.jobs.context import JobContext
from garrison.paths import cache_dir

# Which builder each size uses: "base" for people, "tiny" for tests and smoke runs.
SIZES: dict[str, tuple[str, str]] = {
    "base": ("garrison-base", "garrison-base"),
    "tiny": ("tiny-llama", "garrison-tiny"),
}


def run(ctx: JobContext) -> dict[str, Any]:
    from garrison.models.registry import ModelRegistry
    from garrison.training.tiny_models import BUILDER_VERSION, ensure_model

    if ctx.params["size"] not in SIZES:
        raise InvalidRequest(f"size must be one of {', '.join(SIZES)}", param="size")
    builder, name = SIZES[ctx.params["size"]]
    started = time.monotonic()
    registry = ModelRegistry(ctx.store.catalog, ctx.layout, signer=ctx.identity)
    ctx.progress(0, 2, f"building {name} (cached after the first run)", force=True)
    folder = ensure_model(builder, cache_dir() / "models")
    ctx.check()
    ctx.progress(1, 2, "registering it", force=True)
    if not registry.exists(name):
        registry.import_path(folder, name, lineage={"builder": builder, "builder_version": BUILDER_VERSION},
                             actor=ctx.principal.actor)
        ctx.own(name)
    ctx.progress(2, 2, "done", force=True)
    return {"model": name, "hf_folder": str(folder), "builder_version": BUILDER_VERSION,
            "seconds": round(time.monotonic() - started, 2)}
