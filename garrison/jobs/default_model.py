"""The `build-default-model` job kind: the small model Garrison builds for itself.

Nothing is downloaded, ever, so the first model an appliance serves is made here from
the built-in corpus: a tiny Llama (SentencePiece tokenizer, chat template), converted to
GGUF by llama.cpp's reference converter, then asked one question through llama.cpp to
prove the whole chain on this machine. Builds are cached, so a second run takes seconds.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from garrison.jobs.context import JobContext
from garrison.paths import cache_dir

DEFAULT_MODEL_NAME = "garrison-tiny"


def _smoke_test(gguf: Path) -> str:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=256, n_threads=2, verbose=False, seed=0)
    try:
        out: Any = llm.create_chat_completion(messages=[{"role": "user", "content": "Hello"}],
                                              max_tokens=24, temperature=0.0)
        return str(out["choices"][0]["message"]["content"])
    finally:
        llm.close()


def run(ctx: JobContext) -> dict[str, Any]:
    from garrison.training.tiny_models import BUILDER_VERSION, ensure_gguf, ensure_model

    started = time.monotonic()
    ctx.progress(0, 4, "building the tiny Llama from the built-in corpus", force=True)
    model_dir = ensure_model("tiny-llama", cache_dir() / "models")
    ctx.check()
    ctx.progress(1, 4, "converting to GGUF with llama.cpp's reference converter", force=True)
    gguf = ensure_gguf(model_dir, "f16")
    ctx.check()
    ctx.progress(2, 4, "installing into the state folder", force=True)
    target = ctx.layout.models / f"{DEFAULT_MODEL_NAME}.f16.gguf"
    if not target.exists() or target.stat().st_size != gguf.stat().st_size:
        partial = target.with_name(f".{target.name}.partial")
        shutil.copyfile(gguf, partial)
        partial.replace(target)
    ctx.progress(3, 4, "asking the model one question through llama.cpp", force=True)
    answer = _smoke_test(target)
    ctx.progress(4, 4, "done", force=True)
    return {"model": DEFAULT_MODEL_NAME, "gguf": str(target), "hf_folder": str(model_dir),
            "builder_version": BUILDER_VERSION, "size_bytes": target.stat().st_size,
            "smoke_test": {"prompt": "Hello", "answer": answer}, "seconds": round(time.monotonic() - started, 2)}
