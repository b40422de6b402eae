"""The daemon's side of a model runner: the process, its streams, and the engines it stands for.

`RunnerProcess` starts `python -m garrison.engine.runner` with two pipes, sends the Spec,
waits for Hello, then reads frames on the event loop: a Step frame feeds every stream it
names, a Reply resolves one call. When the pipe closes, the runner is gone: every request
in flight on it fails with `engine_crashed` (503, Retry-After) and the supervisor (the
model manager) hears how it died. Nothing here runs native model code, so nothing here
can fault the daemon.

`RunnerGenerationEngine` and `RunnerEmbeddingEngine` implement the typed engine protocols
(garrison.engine.protocols) over a runner, so the OpenAI handlers never know a process
boundary is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil

from garrison.engine import wire
from garrison.engine.protocols import EmbeddingResult
from garrison.engine.streams import QueuedStream
from garrison.engine.types import EngineStats, Finish, GenerationRequest, TokenEvent
from garrison.errors import GarrisonError, InvalidRequest

log = logging.getLogger("garrison.runners")

#: How long a model may take to load before its runner is declared stuck and killed.
LOAD_TIMEOUT_S = 600.0

_Item = TokenEvent | Finish | GarrisonError


def exit_description(returncode: int | None) -> str:
    """"SIGSEGV" or "exit 3": how a runner ended, for logs, metrics and `garrison ps`."""
    if returncode is None:
        return "unknown"
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"


@dataclass(frozen=True)
class RunnerExit:
    """How a runner ended and whether the daemon asked for it."""

    pid: int
    returncode: int | None
    expected: bool
    during_load: bool

    @property
    def how(self) -> str:
        return exit_description(self.returncode)


class RunnerStream(QueuedStream):
    """One request's items from the runner: the engine protocols' TokenStream (garrison.engine.streams);
    dropping it tells the runner to free the slot."""

    def __init__(self, runner: RunnerProcess, rid: int) -> None:
        super().__init__(asyncio.Queue())
        self._runner = runner
        self.rid = rid

    def put(self, item: _Item) -> None:
        self._queue.put_nowait(item)

    def _drop(self) -> None:
        self._runner._cancel(self.rid)

    def _on_end(self) -> None:
        self._runner._forget(self.rid)


class _FrameReader(asyncio.Protocol):
    """Length-prefixed frames from the runner's pipe, decoded and handed over synchronously as the
    bytes arrive: one callback per frame rather than two awaited reads (this is the per-token path)."""

    def __init__(self, on_message: Callable[[wire.FromRunner], None]) -> None:
        self._on_message = on_message
        self._buf = bytearray()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while len(buf) >= wire.HEADER_SIZE:
            try:
                n = wire.frame_length(bytes(buf[:wire.HEADER_SIZE]))
            except ValueError:
                self._close()
                return
            end = wire.HEADER_SIZE + n
            if len(buf) < end:
                return
            body = bytes(buf[wire.HEADER_SIZE:end])
            del buf[:end]
            try:
                msg = wire.from_runner_decoder.decode(body)
            except Exception:  # a corrupt frame: the runner cannot be trusted any more
                self._close()
                return
            self._on_message(msg)

    def _close(self) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._close()


class RunnerProcess:
    """One runner subprocess: spawn, handshake, frames both ways, death detection, stop."""

    def __init__(self, spec: wire.Spec, *, name: str, on_exit: Callable[[RunnerProcess, RunnerExit], None]) -> None:
        self.spec = spec
        self.name = name
        self._on_exit = on_exit
        self.hello: wire.Hello | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._streams: dict[int, RunnerStream] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._writer: asyncio.WriteTransport | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._stopping = False
        self.exit: RunnerExit | None = None
        self._first: asyncio.Future[wire.FromRunner] = asyncio.get_running_loop().create_future()
        self.started_at = time.time()
        self.last_stats: EngineStats | None = None
        self.steps_received = 0
        self.recv_s = 0.0  # decoding Step frames and handing their items to streams
        self.runner_send_s = 0.0  # the runner's side of the same frames, from its last stats answer
        self.runner_frames = 0

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    @property
    def alive(self) -> bool:
        return self.exit is None and self.proc is not None

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    async def start(self, timeout_s: float = LOAD_TIMEOUT_S) -> wire.Hello:
        """Spawn and load; raises the load error (or EngineCrashed if the runner died loading)."""
        loop = asyncio.get_running_loop()
        to_runner_r, to_runner_w = os.pipe()
        from_runner_r, from_runner_w = os.pipe()
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # see daemon.omp_passive
        if self.spec.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.spec.gpu)
        # Spawned from the event-loop thread on purpose: the runner's parent-death signal follows the
        # thread that forked it, and this one lives as long as the daemon.
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "garrison.engine.runner", str(to_runner_r), str(from_runner_w)],
                pass_fds=(to_runner_r, from_runner_w), env=env, stdin=subprocess.DEVNULL)
        finally:
            os.close(to_runner_r)
            os.close(from_runner_w)
        frames = _FrameReader(self._on_message)
        await loop.connect_read_pipe(lambda: frames, os.fdopen(from_runner_r, "rb", 0))
        transport, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(to_runner_w, "wb", 0))
        self._writer = transport
        self._send(self.spec)
        waiters: set[asyncio.Future[Any]] = {self._first, frames.closed}
        done, _ = await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if not self._first.done():
            returncode = await self._reap(kill=True)
            self.exit = RunnerExit(self.pid, returncode, False, True)
            self._on_exit(self, self.exit)
            why = "timed out" if not done else f"died ({self.exit.how})"
            raise wire.EngineCrashed(f"the runner for {self.name!r} {why} while loading the model",
                                     details={"pid": self.pid, "exit": self.exit.how})
        first = self._first.result()
        if isinstance(first, wire.LoadFailed):
            await self._reap(kill=False)
            self.exit = RunnerExit(self.pid, self.proc.returncode, True, True)
            raise wire.error_from_wire(first.error)
        if not isinstance(first, wire.Hello):
            await self._reap(kill=True)
            raise wire.EngineCrashed(f"the runner for {self.name!r} answered {type(first).__name__}, not Hello")
        self.hello = first
        self._reader_task = loop.create_task(self._watch(frames))
        return first

    def _on_message(self, msg: wire.FromRunner) -> None:
        """Called by the pipe's protocol for every frame, as it arrives: no coroutine per frame."""
        if isinstance(msg, wire.Step):
            started = time.thread_time()  # CPU time: what the boundary costs, not the waits
            self.steps_received += 1
            for item in msg.items:
                stream = self._streams.get(item.rid)
                if stream is not None:
                    stream.put(wire.item_from_wire(item))
            self.recv_s += time.thread_time() - started
        elif isinstance(msg, wire.Reply):
            future = self._calls.pop(msg.cid, None)
            if future is not None and not future.done():
                if msg.error is not None:
                    future.set_exception(wire.error_from_wire(msg.error))
                else:
                    future.set_result(msg.value)
        elif not self._first.done():
            self._first.set_result(msg)

    async def _watch(self, frames: _FrameReader) -> None:
        """The runner's pipe closing is how its death is noticed, whatever killed it."""
        try:
            await frames.closed
        except asyncio.CancelledError:
            return
        returncode = await self._reap(kill=True)
        self.exit = RunnerExit(self.pid, returncode, self._stopping, False)
        self._fail_all(self.exit)
        self._on_exit(self, self.exit)

    def _fail_all(self, how: RunnerExit) -> None:
        message = (f"the runner serving {self.name!r} stopped ({how.how}) during this request; "
                   "it restarts on the next request")
        for stream in list(self._streams.values()):
            stream.put(wire.EngineCrashed(message, details={"pid": how.pid, "exit": how.how}))
        self._streams.clear()
        for future in self._calls.values():
            if not future.done():
                future.set_exception(wire.EngineCrashed(message))
        self._calls.clear()

    async def _reap(self, *, kill: bool) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        for _ in range(100):
            if proc.poll() is not None:
                return proc.returncode
            await asyncio.sleep(0.02)
        if kill:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        return await asyncio.to_thread(proc.wait)

    def _send(self, msg: Any) -> None:
        if self._writer is None or self._writer.is_closing():
            raise wire.EngineCrashed(f"the runner for {self.name!r} is not running")
        self._writer.write(wire.frame(msg))

    # -- what engines use ------------------------------------------------------------------

    def open_streams(self, req: GenerationRequest) -> list[RunnerStream]:
        """One stream per choice (req.n), sent as one Generate: the runner evaluates the prompt once."""
        if not self.alive:
            raise wire.EngineCrashed(f"the runner for {self.name!r} is not running")
        rids = [next(self._ids) for _ in range(req.n)]
        streams = [RunnerStream(self, rid) for rid in rids]
        for rid, stream in zip(rids, streams, strict=True):
            self._streams[rid] = stream
        self._send(wire.request_to_wire(rids, req))
        return streams

    def _cancel(self, rid: int) -> None:
        if self._streams.pop(rid, None) is not None and self.alive:
            with contextlib.suppress(GarrisonError, RuntimeError):
                self._send(wire.Cancel(rid))

    def _forget(self, rid: int) -> None:
        self._streams.pop(rid, None)

    async def call(self, method: str, *args: Any) -> Any:
        if not self.alive:
            raise wire.EngineCrashed(f"the runner for {self.name!r} is not running")
        cid = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[cid] = future
        self._send(wire.Call(cid, method, list(args)))
        return await future

    def ipc_us_per_step(self) -> float | None:
        """CPU time the process boundary costs per engine step, both sides together (µs)."""
        if not self.steps_received or not self.runner_frames:
            return None
        return round((self.runner_send_s / self.runner_frames + self.recv_s / self.steps_received) * 1e6, 1)

    def memory_bytes(self) -> int:
        """Resident memory of the runner (the model's weights, KV cache and the engine)."""
        if not self.alive:
            return 0
        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except psutil.Error:
            return 0

    async def refresh_stats(self) -> EngineStats | None:
        with contextlib.suppress(GarrisonError, asyncio.TimeoutError):
            raw = dict(await asyncio.wait_for(self.call("stats"), 5.0))
            self.runner_send_s = float(raw.pop("ipc_send_s", 0.0))
            self.runner_frames = int(raw.pop("ipc_frames", 0))
            self.last_stats = EngineStats(**raw)
        return self.last_stats

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the runner to stop (it fails what it still holds), then make sure it is gone."""
        self._stopping = True
        if self.proc is None:
            return
        if self.alive:
            with contextlib.suppress(GarrisonError, RuntimeError):
                self._send(wire.Shutdown())
            if self._writer is not None:
                self._writer.close()
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            await asyncio.sleep(0.5)
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task


class RunnerGenerationEngine:
    """A text-generation engine served by a runner process (GenerationEngine protocol)."""

    def __init__(self, runner: RunnerProcess) -> None:
        assert runner.hello is not None
        self.runner = runner
        self.facts = runner.hello

    @property
    def n_ctx_per_slot(self) -> int:
        return self.facts.n_ctx_per_slot

    @property
    def chat_template(self) -> str | None:
        return self.facts.chat_template

    @property
    def bos_token(self) -> str:
        return self.facts.bos_token

    @property
    def eos_token(self) -> str:
        return self.facts.eos_token

    async def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return list(await self.runner.call("tokenize", text, add_special, parse_special))

    async def detokenize(self, tokens: list[int], special: bool = False) -> str:
        return str(await self.runner.call("detokenize", tokens, special))

    def generate(self, req: GenerationRequest) -> RunnerStream:
        if req.n != 1:
            raise InvalidRequest("generate() makes one choice; use generate_choices() for n > 1", param="n")
        return self.runner.open_streams(req)[0]

    def generate_choices(self, req: GenerationRequest) -> list[RunnerStream]:
        return self.runner.open_streams(req)

    def stats(self) -> EngineStats | None:
        """Slots and queue from the daemon's own count of open streams (exact, now); the cumulative
        counters from the runner's last stats answer (refreshed every few seconds)."""
        last = self.runner.last_stats
        in_flight = self.runner.in_flight
        slots = self.facts.n_parallel
        return EngineStats(
            n_parallel=slots, active_slots=min(in_flight, slots), queued_requests=max(0, in_flight - slots),
            tokens_generated=last.tokens_generated if last else 0,
            prompt_tokens_evaluated=last.prompt_tokens_evaluated if last else 0,
            prompt_tokens_reused=last.prompt_tokens_reused if last else 0,
            requests_finished=last.requests_finished if last else 0,
            decode_steps=last.decode_steps if last else 0)


def _embedding(reply: Any) -> EmbeddingResult:
    raw, shape, counts = reply
    vectors = np.frombuffer(raw, dtype="<f4").reshape(shape)
    return EmbeddingResult(vectors=vectors, token_counts=[int(c) for c in counts])


class RunnerEmbeddingEngine:
    """An embedding engine served by a runner process (EmbeddingEngine protocol)."""

    def __init__(self, runner: RunnerProcess) -> None:
        assert runner.hello is not None
        self.runner = runner
        self.facts = runner.hello

    @property
    def dimensions(self) -> int:
        return self.facts.dimensions

    async def embed(self, texts: list[str], *, truncate: bool = True) -> EmbeddingResult:
        return _embedding(await self.runner.call("embed", list(texts), truncate))

    async def embed_tokens(self, token_lists: list[list[int]], *, truncate: bool = True) -> EmbeddingResult:
        return _embedding(await self.runner.call("embed_tokens", [list(t) for t in token_lists], truncate))

    async def detokenize(self, tokens: list[int]) -> str:
        return str(await self.runner.call("detokenize", list(tokens)))

    def stats(self) -> EngineStats | None:
        return self.runner.last_stats
