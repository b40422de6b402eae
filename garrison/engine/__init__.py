"""Inference engines. `garrison.engine.types` is import-light; the llama engine loads llama.cpp.

Import LlamaEngine from garrison.engine.llama_engine (not re-exported here, so that code
which only needs the request types does not load the native library).
"""

from garrison.engine.types import (
    ContextLengthExceeded,
    DeadlineExceeded,
    EngineClosed,
    EngineStats,
    Finish,
    GenerationRequest,
    InvalidSamplingParams,
    SamplingParams,
    TokenEvent,
)

__all__ = [
    "ContextLengthExceeded",
    "DeadlineExceeded",
    "EngineClosed",
    "EngineStats",
    "Finish",
    "GenerationRequest",
    "InvalidSamplingParams",
    "SamplingParams",
    "TokenEvent",
]
