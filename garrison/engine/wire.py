"""The runner boundary's wire format: length-prefixed msgpack frames of typed messages.

The daemon and a model's runner process talk over two pipes, one each way. Why msgpack
through msgspec: a frame per engine step carries every sequence's new token, so encoding
must cost microseconds, and typed Structs turn a malformed frame into a decode error
instead of a KeyError deep in the daemon. Messages are array-like (no field names on the
wire) and tagged, so one decoder reads the union of what may arrive.

Errors cross as their stable code, HTTP status and message and become the same Garrison
exception class again on the other side (`error_from_wire`), so a client sees the same
`context_length_exceeded` or `rate_limit_exceeded` whether the engine ran in process or not.
"""

from __future__ import annotations

import os
import struct
import threading
from typing import Any

import msgspec

from garrison.engine.types import (
    ContextLengthExceeded,
    DeadlineExceeded,
    EngineClosed,
    Finish,
    FinishReason,
    GenerationRequest,
    InvalidSamplingParams,
    SamplingParams,
    TokenEvent,
)
from garrison.errors import (
    ConfigError,
    GarrisonError,
    IntegrityError,
    InvalidRequest,
    NotFound,
    RateLimited,
    Unavailable,
)

#: Frames larger than this are refused: a runner never has a reason to send one, a corrupt
#: length prefix would otherwise make the reader allocate gigabytes.
MAX_FRAME = 256 << 20
_HEADER = struct.Struct("<I")


class WireError(msgspec.Struct, array_like=True, tag="err"):
    code: str
    status: int
    message: str
    param: str | None = None
    details: dict[str, Any] = {}
    retry_after_s: float | None = None


# -- daemon -> runner -------------------------------------------------------------------------

class Spec(msgspec.Struct, array_like=True, tag="spec"):
    """What to load: the first frame a runner reads."""

    format: str  # "gguf" or "onnx"
    path: str  # the GGUF file, or the ONNX model folder
    model_file: str | None = None
    capability: str = "generate"
    n_ctx_per_slot: int = 2048
    n_parallel: int = 4
    n_batch: int = 512
    n_threads: int | None = None
    n_gpu_layers: int = 0
    max_queue: int = 64
    use_extra_bufts: bool = True
    #: The one GPU this runner may use (CUDA_VISIBLE_DEVICES), or None for every GPU.
    gpu: int | None = None
    #: A test hook: the runner kills itself with this signal after loading (always-crashing model).
    crash_after_load: int | None = None


class Generate(msgspec.Struct, array_like=True, tag="gen"):
    rid: int
    prompt: list[int]
    params: SamplingParams
    lora_path: str | None
    lora_scale: float
    deadline: float | None  # time.monotonic(): CLOCK_MONOTONIC is one clock for every process
    #: The ids of choices 1..n-1 when the request asks for n choices of one prompt evaluation.
    more_rids: list[int] = []


class Cancel(msgspec.Struct, array_like=True, tag="cancel"):
    rid: int


class Call(msgspec.Struct, array_like=True, tag="call"):
    """A request-response call: tokenize, detokenize, stats, embed, count_tokens."""

    cid: int
    method: str
    args: list[Any]


class Shutdown(msgspec.Struct, array_like=True, tag="bye"):
    pass


ToRunner = Spec | Generate | Cancel | Call | Shutdown


# -- runner -> daemon -------------------------------------------------------------------------

class Hello(msgspec.Struct, array_like=True, tag="hello"):
    """The loaded model's facts; the daemon formats prompts and answers `garrison ps` from them."""

    pid: int
    capability: str
    backend: str
    variant: str
    device: str
    extra_bufts: bool
    n_parallel: int = 1
    n_ctx_per_slot: int = 0
    n_vocab: int = 0
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    dimensions: int = 0
    load_seconds: float = 0.0


class LoadFailed(msgspec.Struct, array_like=True, tag="loadfail"):
    error: WireError


class Tok(msgspec.Struct, array_like=True, tag="t"):
    rid: int
    text: str
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[str, float]] | None = None


class Fin(msgspec.Struct, array_like=True, tag="f"):
    rid: int
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    text: str = ""


class Fail(msgspec.Struct, array_like=True, tag="x"):
    rid: int
    error: WireError


class Step(msgspec.Struct, array_like=True, tag="step"):
    """Everything one engine step produced, for every sequence: one frame, not one per token."""

    items: list[Tok | Fin | Fail]


class Reply(msgspec.Struct, array_like=True, tag="reply"):
    cid: int
    value: Any = None
    error: WireError | None = None


FromRunner = Hello | LoadFailed | Step | Reply


# -- errors -----------------------------------------------------------------------------------

class EngineCrashed(Unavailable):
    """The model's runner process died (a native fault, the OOM killer, a signal) mid-request.

    Only the requests on that model fail; the runner is restarted on the next request.
    """

    code = "engine_crashed"
    retry_after_s = 1.0


class ModelFailed(Unavailable):
    """The model's runner crashed too many times in a row; it is not restarted until reloaded."""

    code = "model_failed"
    retry_after_s = 30.0


# Classes whose code or constructor matters to callers; anything else comes back as the base
# class of its HTTP status with its code kept.
_BY_CODE: dict[str, type[GarrisonError]] = {cls.code: cls for cls in (
    ContextLengthExceeded, DeadlineExceeded, EngineClosed, InvalidSamplingParams, EngineCrashed, ModelFailed)}
_BY_STATUS: dict[int, type[GarrisonError]] = {400: InvalidRequest, 404: NotFound, 429: RateLimited,
                                              500: ConfigError, 503: Unavailable, 504: DeadlineExceeded}


def error_to_wire(exc: BaseException) -> WireError:
    if isinstance(exc, GarrisonError):
        return WireError(exc.code, exc.http_status, exc.message, exc.param, dict(exc.details), exc.retry_after_s)
    return WireError(Unavailable.code, Unavailable.http_status, f"the engine failed: {type(exc).__name__}: {exc}")


def error_from_wire(err: WireError) -> GarrisonError:
    cls = _BY_CODE.get(err.code) or _BY_STATUS.get(err.status) or (
        IntegrityError if err.code == IntegrityError.code else GarrisonError)
    exc: GarrisonError
    if cls is RateLimited:
        exc = RateLimited(err.message, retry_after_s=err.retry_after_s or 1.0, code=err.code, param=err.param,
                          details=err.details)
    else:
        exc = cls(err.message, code=err.code, param=err.param, details=err.details)
        if err.retry_after_s is not None:
            exc.retry_after_s = err.retry_after_s
    return exc


# -- items ------------------------------------------------------------------------------------

def item_to_wire(rid: int, item: TokenEvent | Finish | BaseException) -> Tok | Fin | Fail:
    if isinstance(item, TokenEvent):
        return Tok(rid, item.text, item.token_id, item.logprob, item.top_logprobs)
    if isinstance(item, Finish):
        return Fin(rid, item.finish_reason, item.prompt_tokens, item.completion_tokens, item.cached_tokens,
                   item.text)
    return Fail(rid, error_to_wire(item))


def item_from_wire(item: Tok | Fin | Fail) -> TokenEvent | Finish | GarrisonError:
    if isinstance(item, Tok):
        return TokenEvent(item.text, item.token_id, item.logprob, item.top_logprobs)
    if isinstance(item, Fin):
        reason: FinishReason = "stop" if item.finish_reason == "stop" else "length"
        return Finish(reason, item.prompt_tokens, item.completion_tokens, item.cached_tokens, item.text)
    return error_from_wire(item.error)


def request_to_wire(rids: list[int], req: GenerationRequest) -> Generate:
    """rids: one id per choice (req.n of them); the first names the request."""
    return Generate(rids[0], list(req.prompt_tokens), req.params, str(req.lora_path) if req.lora_path else None,
                    req.lora_scale, req.deadline, list(rids[1:]))


def request_from_wire(msg: Generate) -> GenerationRequest:
    from pathlib import Path

    return GenerationRequest(prompt_tokens=msg.prompt, params=msg.params,
                             lora_path=Path(msg.lora_path) if msg.lora_path else None,
                             lora_scale=msg.lora_scale, deadline=msg.deadline, n=1 + len(msg.more_rids))


def request_rids(msg: Generate) -> list[int]:
    """Every choice's id, in choice order."""
    return [msg.rid, *msg.more_rids]


# -- framing ----------------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
to_runner_decoder = msgspec.msgpack.Decoder(ToRunner)
from_runner_decoder = msgspec.msgpack.Decoder(FromRunner)


def frame(msg: msgspec.Struct) -> bytes:
    body = _encoder.encode(msg)
    return _HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    (n,) = _HEADER.unpack(header)
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes is over the {MAX_FRAME} limit")
    return n


HEADER_SIZE = _HEADER.size


class FrameWriter:
    """Blocking, thread-safe frame writes to a pipe: the runner writes from its compute thread and
    from its event loop, and a frame must never interleave with another."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, msg: msgspec.Struct) -> None:
        data = memoryview(frame(msg))
        with self._lock:
            while data:
                n = os.write(self._fd, data)
                data = data[n:]


def read_frame_blocking(fd: int) -> bytes | None:
    """One frame from a blocking fd, or None at end of file."""
    header = _read_exactly(fd, HEADER_SIZE)
    if header is None:
        return None
    body = _read_exactly(fd, frame_length(header))
    if body is None:
        raise EOFError("the pipe closed in the middle of a frame")
    return body


def _read_exactly(fd: int, n: int) -> bytes | None:
    parts: list[bytes] = []
    left = n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            if left == n:
                return None
            raise EOFError("the pipe closed in the middle of a frame")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)
