"""The typed seams between the OpenAI layer and the engines, wherever the engines run.

The daemon types its handlers against these, not against a concrete engine: the engines
themselves live in runner processes (garrison.engine.runner), and what the daemon holds
are proxies (garrison.serving.runners) that satisfy the same protocols. One protocol for
generation, one for embeddings, one stream type that can always be cancelled.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from garrison.engine.types import EngineStats, Finish, GenerationRequest, TokenEvent


@dataclass(frozen=True)
class EmbeddingResult:
    """vectors: [n_texts, dim] float32 (unit length when the model normalizes); tokens per text after truncation."""

    vectors: npt.NDArray[np.float32]
    token_counts: list[int]

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)


@runtime_checkable
class TokenStream(Protocol):
    """TokenEvent items, then one Finish; errors raise from iteration.

    `cancel()` frees the request's slot (idempotent, safe at any time); `finish` holds the
    Finish once it has been yielded.
    """

    finish: Finish | None

    def __aiter__(self) -> AsyncIterator[TokenEvent | Finish]: ...
    async def __anext__(self) -> TokenEvent | Finish: ...
    def cancel(self) -> None: ...
    async def aclose(self) -> None: ...


@runtime_checkable
class GenerationEngine(Protocol):
    """A loaded text-generation model: its facts for prompt formatting, tokenization and streams."""

    @property
    def n_ctx_per_slot(self) -> int: ...
    @property
    def chat_template(self) -> str | None: ...
    @property
    def bos_token(self) -> str: ...
    @property
    def eos_token(self) -> str: ...

    async def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]: ...
    async def detokenize(self, tokens: list[int], special: bool = False) -> str: ...
    def generate(self, req: GenerationRequest) -> TokenStream: ...
    def generate_choices(self, req: GenerationRequest) -> Sequence[TokenStream]:
        """req.n streams (choice i is index i) from one evaluation of the prompt."""
        ...
    def stats(self) -> EngineStats | None: ...


@runtime_checkable
class EmbeddingEngine(Protocol):
    """A loaded encoder: texts in, one vector per text out."""

    @property
    def dimensions(self) -> int: ...

    async def embed(self, texts: list[str], *, truncate: bool = True) -> EmbeddingResult: ...
    async def embed_tokens(self, token_lists: list[list[int]], *, truncate: bool = True) -> EmbeddingResult: ...
    async def detokenize(self, tokens: list[int]) -> str: ...
    def stats(self) -> EngineStats | None: ...
