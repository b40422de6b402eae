"""Per-request token usage and rate-limit state, shared by the inference handlers and the middleware.

The inference handlers note what a request used (`usage_of(request)`); the rate-limit middleware
(garrison.daemon.middleware) admits the request before the handler and, when the handler returns
(for a stream: when the stream has ended), charges the key's token bucket with that usage and
hands it to the usage recorder. The x-ratelimit-* headers are added as the response is prepared,
so a stream carries them too (its headers leave before the first token).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from garrison.operations.usage import UsageRecorder
from garrison.policies.rate_limits import Limits, RateLimiter, Refusal
from garrison.store.catalog import Catalog


@dataclass
class RequestUsage:
    """What one request used; `model` is set once the handler knows which model it asked for."""

    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    noted: bool = False

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.noted = True

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Admitted:
    """The key and limits a request was admitted (or refused) under, for its response headers."""

    key_id: str
    limits: Limits
    refusal: Refusal | None = None


USAGE = web.RequestKey("usage", RequestUsage)
ADMITTED = web.RequestKey("rate_limit", Admitted)
LIMITER = web.AppKey("rate_limiter", RateLimiter)
RECORDER = web.AppKey("usage_recorder", UsageRecorder)


def usage_of(request: web.Request) -> RequestUsage:
    """The request's usage record (a throw-away one where no middleware set it up)."""
    found = request.get(USAGE)
    if found is None:
        found = request[USAGE] = RequestUsage()
    return found


async def _rate_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    admitted = request.get(ADMITTED)
    if admitted is None:
        return
    response.headers.update(request.app[LIMITER].headers(admitted.key_id, admitted.limits))
    if admitted.refusal is not None:
        # The openai client prefers this to Retry-After (whole seconds) when it decides how long to wait.
        response.headers["retry-after-ms"] = str(math.ceil(admitted.refusal.retry_after_s * 1000))


async def _flusher(app: web.Application) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(app[RECORDER].run(stop))
    yield
    stop.set()  # after the in-flight requests drained: their usage is in the last batch
    await task


def install(app: web.Application, catalog: Catalog) -> None:
    """A limiter, a usage recorder flushed in the background and at shutdown, and the header hook."""
    app[LIMITER] = RateLimiter()
    app[RECORDER] = UsageRecorder(catalog)
    app.on_response_prepare.append(_rate_limit_headers)
    app.cleanup_ctx.append(_flusher)
