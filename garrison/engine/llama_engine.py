"""Continuous-batching generation for GGUF models on llama-cpp-python's low-level API.

Why not the high-level `Llama` object: it evaluates one sequence at a time, so N clients
share one stream of decodes and aggregate throughput falls as clients are added (see
FACTS.md: 126 -> 56 tok/s from 1 to 8 clients). Here up to n_parallel sequences advance
together in every llama_decode, which is how llama.cpp's own server gains ~2x.

Design, in the order a request meets it:

* `generate()` runs on the caller's event loop. It validates (context length, sampling
  values, grammar), builds the request's C sampler chain and appends to a bounded wait
  queue; a full queue raises RateLimited at once instead of growing latency without bound.
* ONE thread owns the llama context (contexts are not thread-safe) and runs the loop:
  admit queued requests into free slots, build one batch, llama_decode, sample, hand
  tokens to asyncio with loop.call_soon_threadsafe into the request's asyncio.Queue. The
  thread never waits on a consumer, so one slow client cannot stall the others; the
  per-request queue is unbounded, and max_tokens bounds it.
* That thread is the same for every engine of the process (`_ComputeThread`), which
  takes one step of each engine with work in turn. Why not a thread per engine: ggml's
  CPU backend is built with OpenMP, whose barriers (one per graph node) spin only while
  libgomp believes it has a CPU per thread. Every thread that ever ran a decode keeps
  its own OpenMP team, so two engines on two threads count twice the threads, libgomp
  throttles its spinning to ~100 iterations and each barrier becomes a futex sleep:
  measured on 2 cores, a second decoding thread halved tokens/s (360 -> 185) even with
  the first one idle. Models on one CPU share its cores anyway; taking turns costs
  nothing that running side by side would have gained.
* A slot is a llama.cpp sequence id with its own KV stream (kv_unified=False): n_ctx is
  n_ctx_per_slot * n_parallel and one long request cannot starve the others of cache.
  Each slot remembers the tokens its cache holds. A new request goes to the free slot
  with the longest common prefix; only the diverging tail is removed
  (llama_memory_seq_rm from p) and evaluated, and at least the last prompt token is
  always evaluated again, because its logits are what the first sample needs.
* Batches follow sequence ids. With a KV stream per sequence, llama.cpp splits a batch
  into micro-batches that each hold a run of consecutive sequence ids in batch order
  (llama_batch_allocr::split_equal, sequential), and every micro-batch is a full pass
  over the weights. So the batch is built in sequence-id order and a request goes to the
  free slot that keeps busy ids in one run where prefix reuse does not decide otherwise.
  Measured at 16 streams: batches in admission order (slots reused out of order after
  the first wave of requests) made each step 2x slower.
* Each step spends at most n_batch tokens: first one token for every running decode, then
  prompt chunks of newcomers with what is left, so a long prompt joining never freezes
  the streams already flowing.
* LoRA: llama_set_adapters_lora applies to the whole context, not per sequence. So a step
  only includes sequences that share one adapter (or none), and steps rotate round-robin
  between adapter groups. Trade-off: with k groups active each group advances on 1/k of
  the steps and batches are smaller, and switching makes llama.cpp re-plan its graph;
  mixing adapters in one decode would need per-sequence adapters in llama.cpp itself. A
  slot's cached prefix is only reused by a request with the same adapter, since the
  cache holds activations computed with that adapter. An adapter loads on first use, in
  the loop thread (other streams pause for that load), and stays loaded until close().
* Several choices of one prompt (OpenAI's `n`): a group of n requests admitted together into n
  slots. The first evaluates the prompt; the others wait with an empty cache. On the step that
  evaluates the last prompt token, llama_memory_seq_cp copies the first sequence's KV cells to
  the others (across KV streams llama.cpp copies the stream's buffer at the start of the next
  decode, before that decode writes anything), and each samples its first token from the same
  logits row with its own sampler chain (seed + i when the request gives a seed). So the prompt
  is evaluated once, whatever n; each slot then remembers the whole prompt for prefix reuse. If
  the evaluating request leaves before its prompt is done, the next member takes over.
* Cancellation: a stream whose consumer stops (break, aclose, task cancelled, garbage
  collected) sets a flag; the loop frees the slot before its next decode. A deadline
  (time.monotonic) is checked at the same point, queued or running.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import count
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import llama_cpp

from garrison.engine.cpu_kernels import load_backends
from garrison.engine.llama_sampling import (
    SamplerChain,
    TextAssembler,
    end_of_generation_ids,
    log_softmax_row,
    model_meta,
    tokenize,
    top_k_indices,
)
from garrison.engine.streams import QueuedStream
from garrison.engine.types import (
    DeadlineExceeded,
    EngineClosed,
    EngineStats,
    Finish,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from garrison.errors import ConfigError, InvalidRequest, NotFound, RateLimited, Unavailable

log = logging.getLogger(__name__)

_backend_lock = threading.Lock()
_backend_ready = False

# What a stream's queue carries: events, then exactly one Finish or one exception.
_Item = TokenEvent | Finish | BaseException

#: A cached prefix at least this long decides a request's slot on its own; a shorter one only
#: breaks ties, because a slot out of line with the busy ones costs a pass per step.
MIN_PREFIX_REUSE = 64


_native_log = logging.getLogger("garrison.llama_cpp")
_native_verbose = False
_last_native_level = logging.DEBUG
# ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous line).
_GGML_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """Route llama.cpp's log into Python logging with the right levels.

    llama-cpp-python's own callback maps ggml's levels off by one (warnings print as
    errors, errors are hidden) and writes straight to stderr; a daemon wants real levels
    in its own log. INFO/DEBUG chatter (hundreds of lines per model load) is dropped
    early unless verbose, since each line is a C-to-Python call.
    """
    global _last_native_level
    py_level = _last_native_level if level == 5 else _GGML_LEVELS.get(level, logging.INFO)
    _last_native_level = py_level
    if py_level < logging.WARNING and not _native_verbose:
        return
    message = text.decode("utf-8", errors="replace").rstrip()
    if message:
        _native_log.log(py_level, "%s", message)


def _init_backend(verbose: bool) -> None:
    """llama_backend_init and our log callback, once per process (both are process-global)."""
    global _backend_ready, _native_verbose
    _native_verbose = _native_verbose or verbose
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            load_backends()
            llama_cpp.llama_backend_init()
            _backend_ready = True


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(eq=False)
class _Slot:
    """One sequence id of the context and the tokens its KV cache holds, in order."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    adapter_key: tuple[str, float] | None = None
    last_used: int = 0
    request: _Request | None = None


@dataclass(eq=False)
class _Request:
    """Engine-side state of one request; touched by the loop thread only, except `cancelled`."""

    rid: int
    req: GenerationRequest
    chain: SamplerChain
    sink: StepSink
    adapter_key: tuple[str, float] | None
    assembler: TextAssembler
    cancelled: bool = False
    done: bool = False
    holds_slot: bool = False
    slot: _Slot | None = None
    to_eval: list[int] = field(default_factory=list)
    next_token: int | None = None
    out_idx: int = -1
    n_generated: int = 0
    cached: int = 0
    tag: int = 0  # the caller's id for this request (the runner's wire id)
    queue: asyncio.Queue[_Item] | None = None  # in-process streams only
    max_tokens: int = 0  # the effective limit (the request's, or what is left of the context)
    #: Members of this request's group still waiting for its prompt evaluation (n > 1 only).
    waiters: list[_Request] = field(default_factory=list)


@dataclass(eq=False)
class _Group:
    """Requests admitted together: one choice, or the n choices of one prompt evaluation."""

    members: list[_Request]


class StepSink(Protocol):
    """Where a request's items go; `deliver` runs on the compute thread once per engine step with
    every item of that step for this sink's requests, so a sink can hand them over in one piece
    (one event-loop wake-up in process, one frame across a runner's pipe)."""

    def deliver(self, items: list[tuple[_Request, _Item]]) -> None: ...


class _LoopSink:
    """Hands a step's items to one asyncio event loop's per-request queues."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def deliver(self, items: list[tuple[_Request, _Item]]) -> None:
        try:
            self.loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:
            # The consumers' event loop is closed: nobody will read these streams again.
            for state, _ in items:
                state.cancelled = True


class GenerationStream(QueuedStream):
    """One request's stream in process (see garrison.engine.streams); `request_id` names it."""

    def __init__(self, engine: LlamaEngine, state: _Request) -> None:
        assert state.queue is not None
        super().__init__(state.queue)
        self._engine = engine
        self._state = state

    @property
    def request_id(self) -> int:
        return self._state.rid

    def _drop(self) -> None:
        self._engine.cancel(self._state)

    def _drop_on_gc(self) -> None:
        self._state.cancelled = True  # no lock from a finalizer: the loop sees the flag before its next step


class LlamaEngine:
    """Serves one GGUF model to many concurrent requests; see the module docstring.

    n_ctx_per_slot is rounded up by llama.cpp to a multiple of 256; the property gives the
    effective value. n_gpu_layers=0 keeps everything on the CPU (and is what a CPU-only
    build does whatever the value). Call close() to stop the loop thread and free memory.
    """

    def __init__(self, model_path: str | Path, *, n_ctx_per_slot: int = 2048, n_parallel: int = 4,
                 n_batch: int = 512, n_threads: int | None = None, n_gpu_layers: int = 0,
                 max_queue: int = 64, verbose: bool = False, use_extra_bufts: bool = True) -> None:
        if n_parallel < 1 or n_ctx_per_slot < 16 or max_queue < 0:
            raise ConfigError("n_parallel >= 1, n_ctx_per_slot >= 16 and max_queue >= 0 are required")
        if n_batch < n_parallel:
            # Every running sequence must fit one step, or decodes would starve each other.
            raise ConfigError(f"n_batch ({n_batch}) must be >= n_parallel ({n_parallel})")
        path = Path(model_path)
        if not path.is_file():
            raise NotFound(f"model file not found: {path}")
        _init_backend(verbose)
        self.model_path = path
        self.n_parallel = n_parallel
        self.n_batch = n_batch
        self.max_queue = max_queue

        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        # Extra buffer types are llama.cpp's CPU weight repacks (AMX, AArch64 layouts); some machines
        # advertise the instructions and fault in them, see garrison.engine.cpu_kernels.
        mparams.use_extra_bufts = use_extra_bufts
        self.use_extra_bufts = use_extra_bufts
        self._model: Any = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise ConfigError(f"llama.cpp could not load {path} (not a GGUF model, or an unsupported architecture)")
        self._ctx: Any = None
        self._batch: Any = None
        try:
            self._vocab: Any = llama_cpp.llama_model_get_vocab(self._model)
            self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = n_ctx_per_slot * n_parallel
            cparams.n_batch = n_batch
            cparams.n_ubatch = n_batch
            cparams.n_seq_max = n_parallel
            cparams.kv_unified = False
            threads = n_threads or max(1, min(8, _cpu_count()))
            cparams.n_threads = threads
            cparams.n_threads_batch = threads
            cparams.no_perf = True
            self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
            if not self._ctx:
                raise ConfigError(f"llama.cpp could not create a context for {path} "
                                  f"(n_ctx={cparams.n_ctx}: not enough memory?)")
            self._n_ctx_slot = int(llama_cpp.llama_n_ctx_seq(self._ctx))
            self._mem: Any = llama_cpp.llama_get_memory(self._ctx)
            self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        except BaseException:
            self._free_native()
            raise
        self._chat_template = self._meta("tokenizer.chat_template")
        self._bos_id = int(llama_cpp.llama_vocab_bos(self._vocab))
        self._eos_id = int(llama_cpp.llama_vocab_eos(self._vocab))
        self._eog_ids = end_of_generation_ids(self._vocab, self.n_vocab)
        self._eog_set = frozenset(self._eog_ids)
        # Token id -> bytes, filled on first use: the loop needs one piece per generated token,
        # and a ctypes call (which drops and retakes the GIL) per token is what the loop
        # thread must avoid; see _ComputeThread.flush.
        self._pieces: dict[int, bytes] = {}

        self._slots = [_Slot(seq_id=i) for i in range(n_parallel)]
        self._adapters: dict[str, Any] = {}
        self._current_adapter: tuple[str, float] | None = None
        self._rr = 0
        self._ids = count(1)
        self._loop_sinks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopSink] = \
            weakref.WeakKeyDictionary()
        self._compute = _compute_thread()
        self._cond = self._compute.cond
        self._stopped = threading.Event()
        self._pending: collections.deque[_Group] = collections.deque()
        self._active: list[_Request] = []
        self._n_busy = 0  # slots taken, counted under _cond from the moment of admission
        self._closed = False
        self._tokens_generated = 0
        self._prompt_evaluated = 0
        self._prompt_reused = 0
        self._finished = 0
        self._steps = 0
        self._compute.add(self)

    # -- model facts -------------------------------------------------------------------

    @property
    def n_ctx_per_slot(self) -> int:
        return self._n_ctx_slot

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template from the GGUF metadata, if the model ships one."""
        return self._chat_template

    @property
    def bos_token(self) -> str:
        """"" when the GGUF declares no BOS (Qwen): llama.cpp then falls back to a default id whose text is
        no BOS at all, and a chat template must see `bos_token` undefined, as transformers shows it."""
        if self._meta("tokenizer.ggml.bos_token_id") is None:
            return ""
        return self._token_text(self._bos_id)

    @property
    def eos_token(self) -> str:
        return self._token_text(self._eos_id)

    @property
    def bos_token_id(self) -> int:
        return self._bos_id

    @property
    def eos_token_id(self) -> int:
        return self._eos_id

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Text to token ids (llama_tokenize reads only the vocabulary: safe beside the loop)."""
        self._check_open()
        return tokenize(self._vocab, text, add_special, parse_special)

    def token_piece(self, token: int, special: bool = False) -> bytes:
        """The raw bytes of one token (a byte-fallback token may be half a character)."""
        self._check_open()
        if not special:
            piece = self._pieces.get(token)
            if piece is None:
                piece = self._pieces[token] = self._native_piece(token, False)
            return piece
        return self._native_piece(token, True)

    def _native_piece(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return bytes(buf.raw[:n])

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        """Token ids to text; control tokens are left out unless special. Ids come from clients (token
        prompts): one outside the vocabulary would read past llama.cpp's tables, so it is refused."""
        if any(not 0 <= t < self.n_vocab for t in tokens):
            raise InvalidRequest(f"token ids must be in [0, {self.n_vocab})", param="prompt")
        return b"".join(self.token_piece(t, special) for t in tokens).decode("utf-8", errors="replace")

    # -- requests ----------------------------------------------------------------------

    def generate(self, req: GenerationRequest) -> GenerationStream:
        """Queue one request and return its stream; must be called on the event loop that reads it.

        Raises at once, before any token: ContextLengthExceeded, InvalidRequest (bad
        tokens, sampling values or grammar), NotFound (LoRA file), RateLimited (queue full),
        EngineClosed.
        """
        if req.n != 1:
            raise InvalidRequest("generate() makes one choice; use generate_choices() for n > 1", param="n")
        return self.generate_choices(req)[0]

    def generate_choices(self, req: GenerationRequest) -> list[GenerationStream]:
        """req.n streams, one per choice, from one evaluation of the prompt; raises like generate()."""
        loop = asyncio.get_running_loop()
        sink = self._loop_sinks.get(loop)
        if sink is None:
            sink = self._loop_sinks[loop] = _LoopSink(loop)
        states = self.submit_choices(req, sink, tags=list(range(req.n)),
                                     queues=[asyncio.Queue() for _ in range(req.n)])
        return [GenerationStream(self, state) for state in states]

    def submit(self, req: GenerationRequest, sink: StepSink, *, tag: int = 0,
               queue: asyncio.Queue[_Item] | None = None) -> _Request:
        """Queue one request whose items go to `sink` (no event loop needed); `cancel(state)` drops it."""
        return self.submit_choices(req, sink, tags=[tag], queues=[queue])[0]

    def submit_choices(self, req: GenerationRequest, sink: StepSink, *, tags: Sequence[int],
                       queues: Sequence[asyncio.Queue[_Item] | None] | None = None) -> list[_Request]:
        """Queue req.n choices (tags: the caller's id of each); the runner's entry point.

        Raises at once, like generate(). All n choices are admitted together, so n may not
        exceed the engine's parallel slots.
        """
        params = req.params
        prompt = req.checked_prompt(self.n_vocab, self._n_ctx_slot)
        if len(tags) != req.n:
            raise ValueError("one tag per choice is needed")
        if req.n > self.n_parallel:
            raise InvalidRequest(f"n is {req.n}, but this model serves at most {self.n_parallel} sequences at "
                                 f"once (its parallel slots); ask for fewer choices", param="n")
        adapter_key: tuple[str, float] | None = None
        if req.lora_path is not None and req.lora_scale != 0:
            lora = Path(req.lora_path)
            if not lora.is_file():
                raise NotFound(f"LoRA adapter not found: {lora}", param="model")
            adapter_key = (str(lora.resolve()), float(req.lora_scale))
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            # Admit when the slots are free or the queue has room; max_queue=0 means "never wait".
            if (self._n_busy + self._pending_width_locked() + req.n > self.n_parallel
                    and self._waiting_locked() >= self.max_queue):
                raise RateLimited(f"the generation queue is full ({self.max_queue} waiting); retry shortly",
                                  retry_after_s=self._retry_after_locked())
        limit = req.max_new_tokens(self._n_ctx_slot)
        states: list[_Request] = []
        try:
            for i, tag in enumerate(tags):
                chain = SamplerChain(self._vocab, self.n_vocab, _choice_params(params, i), prompt, self._eog_ids)
                states.append(_Request(rid=next(self._ids), req=req, chain=chain, sink=sink,
                                       adapter_key=adapter_key, assembler=TextAssembler(params.stop),
                                       to_eval=list(prompt), tag=tag,
                                       queue=queues[i] if queues else None, max_tokens=limit))
        except BaseException:
            for state in states:
                state.chain.free()
            raise
        with self._cond:
            if self._closed:
                for state in states:
                    state.chain.free()
                raise EngineClosed("the engine is closed")
            self._pending.append(_Group(states))
            self._cond.notify()
        return states

    def stats(self) -> EngineStats:
        """A consistent-enough snapshot for metrics (counters are written by the loop thread only)."""
        with self._cond:
            queued = self._pending_width_locked()
            busy = self._n_busy
        return EngineStats(
            n_parallel=self.n_parallel,
            active_slots=busy,
            queued_requests=queued,
            tokens_generated=self._tokens_generated,
            prompt_tokens_evaluated=self._prompt_evaluated,
            prompt_tokens_reused=self._prompt_reused,
            requests_finished=self._finished,
            decode_steps=self._steps,
        )

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the loop (pending and running requests get EngineClosed) and free native memory."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._compute.is_current():
            self._shutdown()  # closed from inside a step (a consumer's callback): stop now
        if self._stopped.wait(timeout):
            self._free_native()

    async def aclose(self) -> None:
        """close() without blocking the event loop while the current decode step finishes."""
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def __enter__(self) -> LlamaEngine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- caller-side helpers -----------------------------------------------------------

    def cancel(self, state: _Request) -> None:
        """Drop a submitted request; its slot is free before the next decode. Safe from any thread."""
        state.cancelled = True
        with self._cond:
            self._cond.notify()

    def _pending_width_locked(self) -> int:
        """Slots the queued requests will take (a request for n choices takes n)."""
        return sum(len(group.members) for group in self._pending)

    def _waiting_locked(self) -> int:
        """Requests that will not find a free slot at the next admission: the real queue."""
        return max(0, self._n_busy + self._pending_width_locked() - self.n_parallel)

    def _retry_after_locked(self) -> float:
        # A rough hint: the queue drains about n_parallel requests per request duration.
        return float(max(1, round(self._pending_width_locked() / self.n_parallel)))

    def _check_open(self) -> None:
        # The vocabulary lives in the model: after close() a native call would crash.
        if self._model is None:
            raise EngineClosed("the engine is closed")

    def _meta(self, key: str) -> str | None:
        return model_meta(self._model, key)

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        raw = llama_cpp.llama_vocab_get_text(self._vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    # -- the loop thread ---------------------------------------------------------------

    def _has_work_locked(self) -> bool:
        return self._closed or bool(self._pending) or bool(self._active)

    def _pass(self) -> None:
        """One turn of this engine on the compute thread: admit, reap, one decode step, hand over."""
        with self._cond:
            admitted = None if self._closed else self._take_pending_locked()
        if admitted is None:
            self._shutdown()
            return
        try:
            for group in admitted:
                self._admit(group)
            self._reap_active()
            if self._active:
                self._step()
        except Exception as err:  # a bug or a native failure: fail what is running, keep serving
            log.exception("llama engine step failed")
            for state in [*(m for group in admitted for m in group.members), *self._active]:
                self._fail(state, Unavailable(f"generation failed: {err}"), reset_slot=True)

    def _shutdown(self) -> None:
        """Fail what is pending or running, leave the compute thread; close() frees native memory after."""
        if self._stopped.is_set():
            return
        with self._cond:
            self._closed = True
            leftovers = [m for group in self._pending for m in group.members] + list(self._active)
            self._pending.clear()
        for state in leftovers:
            self._fail(state, EngineClosed("the engine was closed"), reset_slot=False)
        self._compute.flush()
        self._compute.remove(self)
        self._stopped.set()

    def _take_pending_locked(self) -> list[_Group]:
        """Drop cancelled / expired queued requests; pop groups, in order, while their slots are free."""
        now = time.monotonic()
        keep: collections.deque[_Group] = collections.deque()
        for group in self._pending:
            live = []
            for state in group.members:
                if state.cancelled:
                    self._release(state)
                elif state.req.deadline is not None and now >= state.req.deadline:
                    self._fail(state, DeadlineExceeded("the request's deadline passed while it was queued"),
                               reset_slot=False)
                else:
                    live.append(state)
            if live:
                group.members = live
                keep.append(group)
        self._pending = keep
        taken: list[_Group] = []
        # In order: a group of n waits for n free slots, and what queued after it waits behind it.
        while self._pending and len(self._pending[0].members) <= self.n_parallel - self._n_busy:
            group = self._pending.popleft()
            for state in group.members:
                state.holds_slot = True
            self._n_busy += len(group.members)
            taken.append(group)
        return taken

    def _admit(self, group: _Group) -> None:
        """The group's first request to the best slot for its prompt; the others to free slots, to wait
        for that prompt's evaluation (see "Several choices" in the module docstring)."""
        first, *others = group.members
        if first.adapter_key is not None:
            try:
                self._load_adapter(first.adapter_key[0])
            except InvalidRequest as err:
                for state in group.members:
                    self._fail(state, err, reset_slot=False)
                return
        self._admit_first(first)
        for state in others:
            busy = {slot.seq_id for slot in self._slots if slot.request is not None}
            # Their caches are dropped, so the least valuable ones: keep busy ids in few runs, then LRU.
            slot = max((s for s in self._slots if s.request is None),
                       key=lambda s: (-_runs(busy | {s.seq_id}), -s.last_used))
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            slot.tokens.clear()
            slot.adapter_key = state.adapter_key
            slot.request = state
            state.slot = slot
            state.to_eval = []
            first.waiters.append(state)
            self._active.append(state)

    def _admit_first(self, state: _Request) -> None:
        """Bind a request to the free slot sharing the longest prefix; trim that slot's cache."""
        prompt = state.to_eval
        busy = {slot.seq_id for slot in self._slots if slot.request is not None}
        best: _Slot | None = None
        best_rank: tuple[int, int, int, int] | None = None
        best_common = 0
        for slot in self._slots:
            if slot.request is not None:
                continue
            common = _common_prefix(slot.tokens, prompt) if slot.adapter_key == state.adapter_key else 0
            # A long cached prefix first; then the slot that keeps the busy sequence ids in the
            # fewest runs (each run is one more pass over the weights per step, see the module
            # docstring: worth more than a few prompt tokens saved); then any prefix; then the
            # least recently used, keeping fresher caches for later.
            rank = (common if common >= MIN_PREFIX_REUSE else 0, -_runs(busy | {slot.seq_id}), common,
                    -slot.last_used)
            if best_rank is None or rank > best_rank:
                best, best_rank, best_common = slot, rank, common
        assert best is not None, "admitted without a free slot"
        slot = best
        # The last prompt token is always evaluated again: its logits feed the first sample.
        common = min(best_common, len(prompt) - 1)
        if slot.adapter_key != state.adapter_key:
            common = 0
        if not llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, common, -1):
            # Some memories (recurrent models) cannot drop a tail: start the slot over.
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            common = 0
        del slot.tokens[common:]
        slot.adapter_key = state.adapter_key
        slot.request = state
        state.slot = slot
        state.to_eval = prompt[common:]
        state.cached = common
        self._prompt_reused += common
        self._active.append(state)

    def _reap_active(self) -> None:
        now = time.monotonic()
        for state in list(self._active):
            if state.cancelled:
                self._release(state)
            elif state.req.deadline is not None and now >= state.req.deadline:
                self._fail(state, DeadlineExceeded("the request's deadline passed during generation"),
                           reset_slot=False)

    def _pick_group(self) -> list[_Request]:
        """The requests of one adapter group, rotating between groups step by step."""
        groups: dict[tuple[str, float] | None, list[_Request]] = {}
        for state in self._active:
            groups.setdefault(state.adapter_key, []).append(state)
        keys = list(groups)
        key = keys[self._rr % len(keys)]
        self._rr += 1
        if key != self._current_adapter:
            self._apply_adapter(key)
        return groups[key]

    def _step(self) -> None:
        # In sequence-id order: see "Batches follow sequence ids" in the module docstring.
        group = sorted(self._pick_group(), key=_seq_id)
        batch = self._batch
        n = 0
        budget = self.n_batch
        chunks: list[tuple[_Request, int]] = []
        for state in group:
            state.out_idx = -1
            if state.next_token is not None:
                slot = state.slot
                assert slot is not None
                self._batch_put(n, state.next_token, len(slot.tokens), slot.seq_id, True)
                state.out_idx = n
                n += 1
        for state in group:
            if state.next_token is not None or not state.to_eval or n >= budget:
                continue
            slot = state.slot
            assert slot is not None
            take = min(len(state.to_eval), budget - n)
            last = take == len(state.to_eval)
            base = len(slot.tokens)
            for j in range(take):
                self._batch_put(n, state.to_eval[j], base + j, slot.seq_id, last and j == take - 1)
                n += 1
            if last:
                state.out_idx = n - 1
            chunks.append((state, take))
        if n == 0:
            return
        batch.n_tokens = n
        self._compute.flush()  # the last step's tokens go out while this decode runs without the GIL
        rc = llama_cpp.llama_decode(self._ctx, batch)
        self._steps += 1
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        for state in group:
            slot = state.slot
            assert slot is not None
            if state.next_token is not None and state.out_idx >= 0:
                slot.tokens.append(state.next_token)
                state.next_token = None
        for state, take in chunks:
            slot = state.slot
            assert slot is not None
            slot.tokens.extend(state.to_eval[:take])
            del state.to_eval[:take]
            self._prompt_evaluated += take
        for state in group:
            if state.out_idx >= 0 and not state.done:
                if state.waiters and not state.to_eval:
                    self._share_prompt(state)
                self._sample(state, state.out_idx)

    def _share_prompt(self, first: _Request) -> None:
        """first's prompt is evaluated: copy its cache to the members waiting for it, who sample their
        first token from the same logits row (see "Several choices" in the module docstring)."""
        src = first.slot
        assert src is not None
        waiting = [state for state in first.waiters if not state.done]
        first.waiters = []
        for state in waiting:
            dst = state.slot
            assert dst is not None
            llama_cpp.llama_memory_seq_rm(self._mem, dst.seq_id, -1, -1)
            llama_cpp.llama_memory_seq_cp(self._mem, src.seq_id, dst.seq_id, -1, -1)
            dst.tokens = list(src.tokens)
            state.cached = len(dst.tokens)
            self._prompt_reused += len(dst.tokens)
        for state in waiting:
            self._sample(state, first.out_idx)

    def _batch_put(self, i: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        batch = self._batch
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq_id
        batch.logits[i] = 1 if logits else 0

    def _sample(self, state: _Request, idx: int) -> None:
        params = state.req.params
        logprob: float | None = None
        top: list[tuple[str, float]] | None = None
        lp = None
        if params.logprobs or params.top_logprobs:
            # Read the raw logits before sampling: the chain rewrites its own copy, not these.
            lp = log_softmax_row(llama_cpp.llama_get_logits_ith(self._ctx, idx), self.n_vocab)
        token = state.chain.sample(self._ctx, idx)
        slot = state.slot
        assert slot is not None
        slot.last_used = self._steps
        if token in self._eog_set:
            self._finish(state, "stop")
            return
        state.n_generated += 1
        self._tokens_generated += 1
        if lp is not None:
            logprob = float(lp[token])
            if params.top_logprobs:
                top = [(self.token_piece(t).decode("utf-8", errors="replace"), float(lp[t]))
                       for t in top_k_indices(lp, params.top_logprobs)]
        text, stopped = state.assembler.push(self.token_piece(token))
        if stopped:
            self._emit(state, TokenEvent(text, token, logprob, top))
            self._finish(state, "stop", flush=False)
            return
        if state.n_generated >= state.max_tokens:
            text += state.assembler.flush()
            self._emit(state, TokenEvent(text, token, logprob, top))
            self._finish(state, "length")
            return
        self._emit(state, TokenEvent(text, token, logprob, top))
        state.next_token = token

    def _emit(self, state: _Request, item: _Item) -> None:
        self._compute.emit(state, item)

    def _finish(self, state: _Request, reason: str, flush: bool = True) -> None:
        tail = state.assembler.flush() if flush else ""
        prompt_len = len(state.req.prompt_tokens)
        # Counters and the slot first: a consumer that sees Finish sees them settled.
        self._finished += 1
        self._release(state)
        self._emit(state, Finish(finish_reason="stop" if reason == "stop" else "length", prompt_tokens=prompt_len,
                                 completion_tokens=state.n_generated, cached_tokens=state.cached, text=tail))

    def _fail(self, state: _Request, err: BaseException, *, reset_slot: bool) -> None:
        if state.done:
            return
        if reset_slot and state.slot is not None:
            # After a failed decode the cache contents are uncertain: forget this slot's history.
            llama_cpp.llama_memory_seq_rm(self._mem, state.slot.seq_id, -1, -1)
            state.slot.tokens.clear()
        self._release(state)
        self._emit(state, err)

    def _release(self, state: _Request) -> None:
        """Free the slot (its cache stays, for prefix reuse) and the sampler chain."""
        if state.done:
            return
        state.done = True
        state.chain.free()
        if state.waiters:
            self._hand_over_prompt(state)
        if state.holds_slot:
            state.holds_slot = False
            with self._cond:
                self._n_busy -= 1
        if state.slot is not None:
            state.slot.request = None
            state.slot = None
        if state in self._active:
            self._active.remove(state)

    def _hand_over_prompt(self, state: _Request) -> None:
        """state leaves before its prompt is evaluated: the next waiting member evaluates it instead
        (its slot is empty), and the others wait for that one."""
        waiting = [m for m in state.waiters if not m.done]
        state.waiters = []
        if waiting:
            heir, *rest = waiting
            heir.to_eval = list(heir.req.prompt_tokens)
            heir.waiters = rest

    def _load_adapter(self, path: str) -> Any:
        adapter = self._adapters.get(path)
        if adapter is None:
            adapter = llama_cpp.llama_adapter_lora_init(self._model, path.encode())
            if not adapter:
                raise InvalidRequest(f"llama.cpp could not load the LoRA adapter {path} "
                                     "(not a GGUF LoRA, or made for another base model)", code="invalid_lora")
            self._adapters[path] = adapter
        return adapter

    def _apply_adapter(self, key: tuple[str, float] | None) -> None:
        if key is None:
            llama_cpp.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapters[key[0]])
            scales = (ctypes.c_float * 1)(key[1])
            llama_cpp.llama_set_adapters_lora(self._ctx, arr, 1, scales)
        self._current_adapter = key

    def _free_native(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        for adapter in getattr(self, "_adapters", {}).values():
            llama_cpp.llama_adapter_lora_free(adapter)
        if hasattr(self, "_adapters"):
            self._adapters.clear()
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def iter_slots(self) -> Iterator[tuple[int, int, bool]]:
        """(seq_id, cached tokens, busy) per slot, for debugging and tests."""
        for slot in self._slots:
            yield slot.seq_id, len(slot.tokens), slot.request is not None


class _ComputeThread:
    """The one thread that runs every LlamaEngine's steps in this process; see the module docstring.

    Engines share its condition variable, so a request queued on any engine wakes it. It
    starts with the first engine and stays (idle, waiting) for the life of the process.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self._engines: list[LlamaEngine] = []
        self._thread: threading.Thread | None = None
        # Items produced since the last hand-over, per consumer event loop (see flush).
        self._outbox: dict[StepSink, list[tuple[_Request, _Item]]] = {}

    def add(self, engine: LlamaEngine) -> None:
        with self.cond:
            self._engines.append(engine)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llama-compute", daemon=True)
                self._thread.start()
            self.cond.notify_all()

    def remove(self, engine: LlamaEngine) -> None:
        with self.cond:
            if engine in self._engines:
                self._engines.remove(engine)

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def emit(self, state: _Request, item: _Item) -> None:
        self._outbox.setdefault(state.sink, []).append((state, item))

    def flush(self) -> None:
        """Hand every waiting item to its event loop: one wake-up per loop, not one per token.

        Called just before each llama_decode and before going idle. Why then: the event-loop
        thread that wakes up formats and writes every stream's chunk, and it needs the GIL to
        do so. Woken while this thread is still sampling or building the next batch (Python,
        holding the GIL between ctypes calls), the two take turns on the GIL and the next
        decode starts late, by up to the interpreter's 5 ms switch interval; woken just as
        the decode starts (llama_decode releases the GIL for its whole duration), it finishes
        its writes long before the decode returns. Measured at 16 streams: a hand-over after
        sampling made each step ~30% slower than llama-server's.
        """
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        for sink, items in outbox.items():
            try:
                sink.deliver(items)
            except Exception:  # a sink that cannot deliver (its pipe closed): nobody reads these streams
                log.exception("could not deliver generated tokens; cancelling their requests")
                for state, _ in items:
                    state.cancelled = True

    def _run(self) -> None:
        while True:
            with self.cond:
                ready = [e for e in self._engines if e._has_work_locked()]
                while not ready:
                    self.flush()
                    self.cond.wait()
                    ready = [e for e in self._engines if e._has_work_locked()]
            for engine in ready:
                try:
                    engine._pass()
                except Exception:  # never let one engine's bug stop every model of the process
                    log.exception("llama engine pass failed; closing that engine")
                    engine._shutdown()


_compute_lock = threading.Lock()
_compute: _ComputeThread | None = None


def _compute_thread() -> _ComputeThread:
    global _compute
    with _compute_lock:
        if _compute is None:
            _compute = _ComputeThread()
        return _compute


def _choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice i of a seeded request samples with seed + i: reproducible, yet not n copies of one choice."""
    if index == 0 or params.seed is None:
        return params
    return replace(params, seed=(params.seed + index) % 0xFFFFFFFF)


def _seq_id(state: _Request) -> int:
    assert state.slot is not None
    return state.slot.seq_id


def _runs(ids: set[int]) -> int:
    """How many maximal runs of consecutive integers `ids` holds ({0, 1, 2, 5} -> 2)."""
    return sum(1 for i in ids if i - 1 not in ids)


def _deliver(items: list[tuple[_Request, _Item]]) -> None:
    for state, item in items:
        if state.queue is not None:
            state.queue.put_nowait(item)


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
