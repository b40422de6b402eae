"""A model runner: the process that holds one loaded model, started and supervised by the daemon.

`python -m garrison.engine.runner IN_FD OUT_FD`: reads a Spec, loads the model, answers
Hello (the model's facts), then serves Generate / Cancel / Call frames until Shutdown or
until the daemon's end of the pipe closes. Why a process: a native fault in llama.cpp or
ONNX Runtime (measured: the AMX repack's SIGSEGV) must cost the requests on this model,
never the daemon; and unloading a model must give its memory back to the OS, which only a
process exit does reliably.

Tokens cross the pipe once per engine step for all sequences: the llama engine's compute
thread hands each step's items to `_WireSink`, which writes them as one Step frame just
before the next llama_decode (which releases the GIL, so the write overlaps compute). The
ONNX engine's streams are collected per event-loop turn into one frame the same way.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from garrison.engine import wire
from garrison.engine.types import EngineStats, Finish, TokenEvent
from garrison.errors import GarrisonError, InvalidRequest

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """If the daemon is killed (kill -9 included), its runners go with it instead of holding the model."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(0)


class _Host(Protocol):
    """One loaded engine behind the wire: what the serve loop dispatches to."""

    def hello(self) -> wire.Hello: ...
    def generate(self, msg: wire.Generate) -> None: ...
    def cancel(self, rid: int) -> None: ...
    def calls(self) -> dict[str, Callable[..., Any]]: ...
    def close(self) -> None: ...


class _WireSink:
    """The llama engine's StepSink: one Step frame per engine step."""

    def __init__(self, writer: wire.FrameWriter, live: dict[int, Any]) -> None:
        self._writer = writer
        self._live = live
        self.frames = 0
        self.send_s = 0.0  # the boundary's cost on this side: converting, encoding and writing frames

    def deliver(self, items: list[tuple[Any, TokenEvent | Finish | BaseException]]) -> None:
        started = time.thread_time()
        out = []
        for state, item in items:
            if not isinstance(item, TokenEvent):
                self._live.pop(state.tag, None)
            out.append(wire.item_to_wire(state.tag, item))
        self._writer.send(wire.Step(out))
        self.frames += 1
        self.send_s += time.thread_time() - started


class _LlamaHost:
    def __init__(self, spec: wire.Spec, writer: wire.FrameWriter) -> None:
        from garrison.engine.llama_engine import LlamaEngine

        started = time.monotonic()
        self.spec = spec
        self.engine = LlamaEngine(spec.path, n_ctx_per_slot=spec.n_ctx_per_slot, n_parallel=spec.n_parallel,
                                  n_batch=spec.n_batch, n_threads=spec.n_threads, n_gpu_layers=spec.n_gpu_layers,
                                  max_queue=spec.max_queue, use_extra_bufts=spec.use_extra_bufts)
        self.load_seconds = time.monotonic() - started
        self.live: dict[int, Any] = {}
        self.sink = _WireSink(writer, self.live)
        self.writer = writer

    def hello(self) -> wire.Hello:
        from garrison.engine import cpu_kernels

        e = self.engine
        gpu = cpu_kernels.loaded_gpu_backend() if self.spec.n_gpu_layers else None
        device = "cpu" if gpu is None else f"{gpu.lower()}:{self.spec.gpu if self.spec.gpu is not None else 'all'}"
        return wire.Hello(pid=os.getpid(), capability="generate", backend="llama.cpp",
                          variant=cpu_kernels.loaded_variant(), device=device,
                          extra_bufts=self.spec.use_extra_bufts, n_parallel=e.n_parallel,
                          n_ctx_per_slot=e.n_ctx_per_slot, n_vocab=e.n_vocab, chat_template=e.chat_template,
                          bos_token=e.bos_token, eos_token=e.eos_token, bos_token_id=e.bos_token_id,
                          eos_token_id=e.eos_token_id, load_seconds=round(self.load_seconds, 3))

    def generate(self, msg: wire.Generate) -> None:
        rids = wire.request_rids(msg)
        try:
            states = self.engine.submit_choices(wire.request_from_wire(msg), self.sink, tags=rids)
        except GarrisonError as exc:
            error = wire.error_to_wire(exc)
            self.writer.send(wire.Step([wire.Fail(rid, error) for rid in rids]))
            return
        for rid, state in zip(rids, states, strict=True):
            self.live[rid] = state

    def cancel(self, rid: int) -> None:
        state = self.live.pop(rid, None)
        if state is not None:
            self.engine.cancel(state)

    def calls(self) -> dict[str, Callable[..., Any]]:
        e = self.engine
        def stats() -> dict[str, Any]:
            return {**e.stats().as_dict(), "ipc_frames": self.sink.frames, "ipc_send_s": self.sink.send_s}

        return {"tokenize": e.tokenize, "detokenize": e.detokenize, "stats": stats}

    def close(self) -> None:
        self.engine.close()


class _OnnxDecoderHost:
    def __init__(self, spec: wire.Spec, writer: wire.FrameWriter) -> None:
        from garrison.engine.onnx_engine import OnnxDecoderEngine

        started = time.monotonic()
        self.engine = OnnxDecoderEngine(spec.path, model_file=spec.model_file, intra_op_threads=spec.n_threads,
                                        max_concurrency=spec.n_parallel, max_queue=spec.max_queue)
        self.load_seconds = time.monotonic() - started
        self.writer = writer
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self._outbox: list[wire.Tok | wire.Fin | wire.Fail] = []

    def hello(self) -> wire.Hello:
        e = self.engine
        provider = e.providers[0] if e.providers else "CPUExecutionProvider"
        return wire.Hello(pid=os.getpid(), capability="generate", backend="onnxruntime", variant=provider,
                          device="cuda" if "CUDA" in provider else "cpu", extra_bufts=False,
                          n_parallel=e.max_concurrency, n_ctx_per_slot=e.n_ctx, n_vocab=e.n_vocab,
                          chat_template=e.chat_template, bos_token=e.bos_token, eos_token=e.eos_token,
                          bos_token_id=e.bos_token_id, eos_token_id=e.eos_token_id,
                          load_seconds=round(self.load_seconds, 3))

    def _put(self, item: wire.Tok | wire.Fin | wire.Fail) -> None:
        # Every stream that got an item in this turn of the loop goes out in one frame.
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(item)

    def _flush(self) -> None:
        items, self._outbox = self._outbox, []
        if items:
            self.writer.send(wire.Step(items))

    def generate(self, msg: wire.Generate) -> None:
        try:
            stream = self.engine.generate(wire.request_from_wire(msg))
        except GarrisonError as exc:
            error = wire.error_to_wire(exc)
            for rid in wire.request_rids(msg):
                self._put(wire.Fail(rid, error))
            return

        async def forward() -> None:
            try:
                async for item in stream:
                    self._put(wire.item_to_wire(msg.rid, item))
            except asyncio.CancelledError:
                await stream.aclose()
                raise
            except Exception as exc:
                self._put(wire.Fail(msg.rid, wire.error_to_wire(exc)))
            finally:
                self.tasks.pop(msg.rid, None)

        self.tasks[msg.rid] = asyncio.get_running_loop().create_task(forward())

    def cancel(self, rid: int) -> None:
        task = self.tasks.pop(rid, None)
        if task is not None:
            task.cancel()

    def calls(self) -> dict[str, Callable[..., Any]]:
        e = self.engine

        def stats() -> dict[str, Any]:
            return EngineStats(n_parallel=e.max_concurrency, active_slots=len(self.tasks), queued_requests=0,
                               tokens_generated=e.tokens_generated, prompt_tokens_evaluated=0,
                               prompt_tokens_reused=0, requests_finished=e.requests_finished,
                               decode_steps=0).as_dict()

        return {"tokenize": e.tokenize, "detokenize": e.detokenize, "stats": stats}

    def close(self) -> None:
        self.engine.close()


class _OnnxEmbeddingHost:
    def __init__(self, spec: wire.Spec, writer: wire.FrameWriter) -> None:
        from garrison.engine.onnx_engine import OnnxEmbeddingEngine

        started = time.monotonic()
        self.engine = OnnxEmbeddingEngine(spec.path, model_file=spec.model_file, intra_op_threads=spec.n_threads)
        self.load_seconds = time.monotonic() - started
        self.requests = 0

    def hello(self) -> wire.Hello:
        e = self.engine
        provider = e.providers[0] if e.providers else "CPUExecutionProvider"
        return wire.Hello(pid=os.getpid(), capability="embed", backend="onnxruntime", variant=provider,
                          device="cuda" if "CUDA" in provider else "cpu", extra_bufts=False,
                          n_ctx_per_slot=e.max_length, dimensions=e.dimensions,
                          load_seconds=round(self.load_seconds, 3))

    def generate(self, msg: wire.Generate) -> None:
        raise InvalidRequest("this model makes embeddings, not text", code="model_capability_mismatch")

    def cancel(self, rid: int) -> None:
        return None

    def calls(self) -> dict[str, Callable[..., Any]]:
        e = self.engine

        def reply(result: Any) -> list[Any]:
            vectors = result.vectors
            return [vectors.astype("<f4").tobytes(), list(vectors.shape), result.token_counts]

        async def embed(texts: list[str], truncate: bool = True) -> list[Any]:
            self.requests += 1
            return reply(await e.embed(texts, truncate=truncate))

        async def embed_tokens(token_lists: list[list[int]], truncate: bool = True) -> list[Any]:
            self.requests += 1
            return reply(await e.embed_tokens(token_lists, truncate=truncate))

        def stats() -> dict[str, Any]:
            return EngineStats(n_parallel=1, active_slots=0, queued_requests=0, tokens_generated=0,
                               prompt_tokens_evaluated=0, prompt_tokens_reused=0, requests_finished=self.requests,
                               decode_steps=0).as_dict()

        return {"embed": embed, "embed_tokens": embed_tokens, "detokenize": e.detokenize,
                "count_tokens": e.count_tokens, "stats": stats}

    def close(self) -> None:
        self.engine.close()


def _make_host(spec: wire.Spec, writer: wire.FrameWriter) -> _Host:
    if spec.format == "gguf":
        return _LlamaHost(spec, writer)
    if spec.capability == "embed":
        return _OnnxEmbeddingHost(spec, writer)
    return _OnnxDecoderHost(spec, writer)


async def _serve(host: _Host, fd_in: int, writer: wire.FrameWriter) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=wire.MAX_FRAME)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd_in, "rb", 0))
    calls = host.calls()
    pending: set[asyncio.Task[None]] = set()

    async def answer(msg: wire.Call) -> None:
        try:
            fn = calls.get(msg.method)
            if fn is None:
                raise InvalidRequest(f"the runner has no call {msg.method!r}")
            value = fn(*msg.args)
            if isinstance(value, Awaitable):
                value = await value
            writer.send(wire.Reply(msg.cid, value))
        except Exception as exc:
            writer.send(wire.Reply(msg.cid, None, wire.error_to_wire(exc)))

    while True:
        try:
            header = await reader.readexactly(wire.HEADER_SIZE)
            body = await reader.readexactly(wire.frame_length(header))
        except asyncio.IncompleteReadError:
            return  # the daemon closed its end (it is gone, or unloading): stop
        msg = wire.to_runner_decoder.decode(body)
        if isinstance(msg, wire.Generate):
            host.generate(msg)
        elif isinstance(msg, wire.Cancel):
            host.cancel(msg.rid)
        elif isinstance(msg, wire.Call):
            task = loop.create_task(answer(msg))
            pending.add(task)
            task.add_done_callback(pending.discard)
        elif isinstance(msg, wire.Shutdown):
            return


def main(fd_in: int, fd_out: int) -> int:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the daemon's to handle; it stops us
    writer = wire.FrameWriter(fd_out)
    body = wire.read_frame_blocking(fd_in)
    if body is None:
        return 0
    spec = wire.to_runner_decoder.decode(body)
    if not isinstance(spec, wire.Spec):
        return 2
    try:
        host = _make_host(spec, writer)
    except Exception as exc:
        writer.send(wire.LoadFailed(wire.error_to_wire(exc)))
        return 1
    writer.send(host.hello())
    if spec.crash_after_load:
        os.kill(os.getpid(), spec.crash_after_load)
    try:
        asyncio.run(_serve(host, fd_in, writer))
    finally:
        host.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))

