"""The one stream type both sides of the runner boundary hand out (the engine protocols' TokenStream).

Items arrive on an asyncio.Queue (from the llama engine's compute thread in process, from the
runner's pipe in the daemon): TokenEvent items, then one Finish, or an exception raised from
iteration. Stopping early is always safe: `break`, `aclose()`, cancelling the consuming task or
dropping the stream all drop the request, so a client that leaves never keeps a slot busy.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Self

from garrison.engine.types import Finish, TokenEvent

StreamItem = TokenEvent | Finish | BaseException


class QueuedStream:
    """Subclasses say how to drop their request (`_drop`, and `_drop_on_gc` where a lock must be
    avoided) and what to forget once it ended (`_on_end`)."""

    def __init__(self, queue: asyncio.Queue[StreamItem]) -> None:
        self._queue = queue
        self._ended = False
        self.finish: Finish | None = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> TokenEvent | Finish:
        if self._ended:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self.cancel()
            raise
        if isinstance(item, TokenEvent):
            return item
        self._ended = True
        self._on_end()
        if isinstance(item, Finish):
            self.finish = item
            return item
        raise item

    def cancel(self) -> None:
        """Drop the request; idempotent and safe at any time."""
        if not self._ended:
            self._ended = True
            self._drop()

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.cancel()

    def __del__(self) -> None:
        # A consumer that just drops the stream (client disconnected, handler returned) must not keep
        # a slot busy until max_tokens.
        if not self._ended:
            with contextlib.suppress(Exception):
                self._drop_on_gc()

    def _drop(self) -> None:
        raise NotImplementedError

    def _drop_on_gc(self) -> None:
        self._drop()

    def _on_end(self) -> None:
        return None
