"""Connections from clients that may be hostile: a cap, a reserve for probes, and a deadline per request head.

aiohttp drops idle keep-alive connections but gives a client as long as it likes to send a request's
head, so 1,100 connections trickling header bytes exhausted the daemon's file descriptors and /health
went silent. Here each accepted connection gets a deadline to deliver a complete request head
(`header_timeout_s`, renewed after each response); past `max_connections` a connection is accepted
only into a small reserve whose requests must be `/health` or `/ready` and arrive within a second.
When the reserve is full, the oldest reserve connection still silent is dropped for the newcomer
(a probe sends its request at once; a slow sender never does), so a flood cannot lock probes out.
The handler wraps aiohttp's own protocol (a delegating asyncio.Protocol): aiohttp parses and
serves exactly as before.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from aiohttp import web

from garrison.logs import log_event

log = logging.getLogger("garrison.connections")

#: Connections kept beyond max_connections for the probes (/health, /ready) of an operator or systemd.
RESERVE = 32
RESERVE_HEAD_TIMEOUT_S = 1.0
PROBE_PATHS = frozenset({"/health", "/ready"})


def raise_file_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard one (1024 is a common soft limit; the hard one is far higher)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft, hard
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class ConnectionGate:
    """Counts connections and owns their deadlines; `middleware` tells it when a request head arrived."""

    def __init__(self, *, max_connections: int, header_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.open = 0
        self.refused = 0
        self.timed_out = 0
        self._by_transport: dict[Any, _GatedProtocol] = {}
        self.silent_reserve: dict[_GatedProtocol, None] = {}  # reserve connections yet to send a head, oldest first
        self._last_report = 0.0

    def reconfigure(self, *, max_connections: int, header_timeout_s: float) -> None:
        """SIGHUP: connections accepted from now on count against the new cap, and every deadline armed from
        now on uses the new timeout; connections already open beyond a lowered cap finish normally."""
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s

    def wrap(self, factory: Any) -> Any:
        def make() -> _GatedProtocol:
            return _GatedProtocol(self, factory())
        return make

    def _report(self) -> None:
        """At most one log line per 10 s about refusals and timeouts, with counts, never one per event."""
        now = time.monotonic()
        if now - self._last_report >= 10.0:
            self._last_report = now
            log_event(log, "connections.shedding", level=logging.WARNING, open=self.open, refused=self.refused,
                      timed_out=self.timed_out, max_connections=self.max_connections)

    def reserve_only(self, transport: Any) -> bool:
        proto = self._by_transport.get(transport)
        return proto is not None and proto.reserve_only

    def head_arrived(self, transport: Any) -> None:
        proto = self._by_transport.get(transport)
        if proto is not None:
            proto.cancel_deadline()
            self.silent_reserve.pop(proto, None)

    def response_done(self, transport: Any) -> None:
        proto = self._by_transport.get(transport)
        if proto is not None:
            proto.arm_deadline()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        transport = request.transport
        self.head_arrived(transport)
        try:
            if self.reserve_only(transport) and request.path not in PROBE_PATHS:
                return web.json_response({"error": {"message": "too many connections; retry shortly",
                                                    "type": "server_error", "param": None,
                                                    "code": "too_many_connections"}},
                                         status=503, headers={"Retry-After": "1", "Connection": "close"})
            return await handler(request)
        finally:
            self.response_done(transport)


class _GatedProtocol(asyncio.Protocol):
    """Delegates to aiohttp's RequestHandler; adds the gate's accounting and the head deadline."""

    def __init__(self, gate: ConnectionGate, inner: Any) -> None:
        self._gate = gate
        self._inner = inner
        self._transport: Any = None
        self._deadline: asyncio.TimerHandle | None = None
        self._counted = False
        self.reserve_only = False

    def connection_made(self, transport: Any) -> None:
        gate = self._gate
        if gate.open >= gate.max_connections + RESERVE:
            gate.refused += 1
            gate._report()
            if not gate.silent_reserve:
                transport.abort()  # at once: no handler, no buffers, the descriptor back now
                return
            oldest = next(iter(gate.silent_reserve))
            oldest._expired()  # room for the newcomer (connection_lost follows, soon; count it gone now)
        gate.open += 1
        self._counted = True
        self.reserve_only = gate.open > gate.max_connections
        if self.reserve_only:
            gate.silent_reserve[self] = None
            gate._report()
        self._transport = transport
        gate._by_transport[transport] = self
        self._inner.connection_made(transport)
        self.arm_deadline()

    def arm_deadline(self) -> None:
        self.cancel_deadline()
        if self._transport is None or self._transport.is_closing():
            return
        timeout = RESERVE_HEAD_TIMEOUT_S if self.reserve_only else self._gate.header_timeout_s
        self._deadline = asyncio.get_running_loop().call_later(timeout, self._expired)

    def cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self.cancel_deadline()
        self._gate.silent_reserve.pop(self, None)
        if self._transport is not None and not self._transport.is_closing():
            self._gate.timed_out += 1
            self._gate._report()
            self._transport.abort()
            self._release()

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        result: bool | None = self._inner.eof_received()
        return result

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _release(self) -> None:
        """The slot is free from now on (abort's connection_lost comes on a later loop turn)."""
        if self._counted:
            self._counted = False
            self._gate.open -= 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_deadline()
        self._gate.silent_reserve.pop(self, None)
        if self._transport is None:
            return  # refused before aiohttp's handler ever saw it
        self._release()
        self._gate._by_transport.pop(self._transport, None)
        self._inner.connection_lost(exc)


class GatedSite(web.TCPSite):
    """aiohttp's TCPSite, serving each connection through the gate."""

    def __init__(self, runner: web.AppRunner, gate: ConnectionGate, *args: Any, **kwargs: Any) -> None:
        super().__init__(runner, *args, **kwargs)
        self._gate = gate

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._gate.wrap(server), self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port)
