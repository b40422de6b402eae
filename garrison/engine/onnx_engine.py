"""ONNX Runtime engines for exports of garrison.converters.hf_to_onnx: text generation and embeddings.

They run inside the daemon, so this module imports only onnxruntime, numpy and the
`tokenizers` library (tokenizer.json): never torch or transformers, which the serving
process must not load (memory, start-up time, MemoryDenyWriteExecute).

Generation mirrors LlamaEngine's protocol, so the HTTP layer serves both the same way:
`generate(GenerationRequest)` validates at once (context length, sampling values) and
returns an async iterator of TokenEvent items, then one Finish. Each request keeps its own
KV cache (the exported graph's past_key_values.* inputs, fed back from its present.*
outputs); there is no cross-request batching here, since the exported graph pads every
sequence of a batch to the same past length. Every ONNX Runtime call runs on a worker
thread, so the event loop never waits on a forward pass; `max_concurrency` bounds how
many sequences hold a KV cache at once.

Sampling is numpy over one logits row: greedy at temperature 0, else penalties,
temperature, top-k, top-p and min-p, drawn with a per-request numpy Generator (seeded
when the request gives a seed, so a seeded request is reproducible).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

from garrison.engine.pooling import PoolingConfig, l2_normalize, pool
from garrison.engine.protocols import EmbeddingResult
from garrison.engine.types import (
    BANNED_LOGIT,
    ContextLengthExceeded,
    DeadlineExceeded,
    EngineClosed,
    Finish,
    GenerationRequest,
    InvalidSamplingParams,
    SamplingParams,
    TokenEvent,
)
from garrison.errors import ConfigError, InvalidRequest, NotFound, RateLimited

log = logging.getLogger(__name__)

MANIFEST = "garrison_onnx.json"  # written by garrison.converters.hf_to_onnx (not imported: it pulls optimum)
DEFAULT_MODEL_FILE = "model.onnx"
# Tokens of the prompt's tail that seed the incremental detokenizer, so the first generated
# token keeps its leading space (SentencePiece decoders strip a space at the start of a text).
_DETOK_CONTEXT = 4
# Tokenizer configs use a huge number to mean "no limit"; anything above this is that.
_NO_LIMIT = 1_000_000

_NP_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}

# ---------------------------------------------------------------------------------------------
# Loading: providers, sessions, the model folder's JSON files.


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, CPU always (as fallback for ops CUDA lacks)."""
    available = ort.get_available_providers()
    preferred = [p for p in ("CUDAExecutionProvider",) if p in available]
    return [*preferred, "CPUExecutionProvider"]


def _resolve_providers(requested: Sequence[str] | None) -> list[str]:
    if requested is None:
        return default_providers()
    available = set(ort.get_available_providers())
    missing = [p for p in requested if p not in available]
    if missing:
        raise ConfigError(f"ONNX Runtime providers not available in this build: {', '.join(missing)} "
                          f"(available: {', '.join(sorted(available))})")
    return list(requested)


def _read_json(path: Path) -> Any:
    """A JSON file of the model folder, or None when absent; unreadable files are a ConfigError."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from err


def _token_content(value: Any) -> str | None:
    """Token strings are saved either plainly or as serialized AddedToken objects."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


class _OnnxModel:
    """What both engines share: the folder, its configs, tokenizer and one InferenceSession."""

    def __init__(self, model_dir: str | Path, *, providers: Sequence[str] | None, model_file: str | None,
                 intra_op_threads: int | None) -> None:
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise NotFound(f"model folder not found: {self.model_dir}", param="model")
        self.manifest: dict[str, Any] = _read_json(self.model_dir / MANIFEST) or {}
        self.config: dict[str, Any] = _read_json(self.model_dir / "config.json") or {}
        self.tokenizer_config: dict[str, Any] = _read_json(self.model_dir / "tokenizer_config.json") or {}
        self.special_tokens: dict[str, Any] = _read_json(self.model_dir / "special_tokens_map.json") or {}
        name = model_file or str(self.manifest.get("model_file") or DEFAULT_MODEL_FILE)
        self.model_path = self.model_dir / name
        if not self.model_path.is_file():
            raise NotFound(f"no ONNX graph {name} in {self.model_dir}", param="model")
        tokenizer_file = self.model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ConfigError(f"{self.model_dir} has no tokenizer.json; the ONNX engine tokenizes with the "
                              "`tokenizers` library only (export with a fast tokenizer)")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.requested_providers = _resolve_providers(providers)
        try:
            self.session = ort.InferenceSession(str(self.model_path), sess_options=options,
                                                providers=self.requested_providers)
        except Exception as err:  # onnxruntime raises its own exception types from C++
            raise ConfigError(f"ONNX Runtime cannot load {self.model_path}: {err}") from err
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def providers(self) -> list[str]:
        """Providers the session really uses (CUDA silently drops out when its libraries are missing)."""
        return list(self.session.get_providers())

    def special_token(self, name: str) -> str | None:
        return _token_content(self.tokenizer_config.get(name)) or _token_content(self.special_tokens.get(name))

    def input_dtype(self, name: str) -> type[np.generic]:
        kind = self.inputs[name].type
        if kind not in _NP_TYPES:
            raise ConfigError(f"input {name} of {self.model_path.name} has type {kind}, which numpy cannot feed")
        return _NP_TYPES[kind]


# ---------------------------------------------------------------------------------------------
# Generation.


def _config_ints(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class _IncrementalDetokenizer:
    """Token ids in, newly final text out, for tokenizers whose pieces are not plain strings.

    Decoding a token alone is wrong for SentencePiece (leading-space rules) and for
    byte-fallback tokens (one character over several tokens), so each step decodes a short
    window ending at the new token and emits only what grew past the window's previous text,
    holding back while the text ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int]) -> None:
        self._tok = tokenizer
        self._ids = list(context)
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def push(self, token: int) -> str:
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd") and now.startswith(before):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held (an incomplete character at the end becomes U+FFFD)."""
        before = self._decode(self._ids[self._prefix:self._read])
        now = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return now[len(before):] if now.startswith(before) else ""


class _StopFilter:
    """Holds back text that might be the start of a stop string, so a stop string never leaks."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string matched); on a match the stop string and after are dropped."""
        self._held += text
        if not self._stop:
            out, self._held = self._held, ""
            return out, False
        hits = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        if hits:
            out, self._held = self._held[:min(hits)], ""
            return out, True
        keep = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._held)), keep, -1):
                if self._held.endswith(s[:n]):
                    keep = n
                    break
        cut = len(self._held) - keep
        out, self._held = self._held[:cut], self._held[cut:]
        return out, False

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out


def _log_softmax(logits: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    shifted = logits - logits.max()
    result: npt.NDArray[np.float64] = shifted - np.log(np.exp(shifted).sum())
    return result


def _apply_penalties(logits: npt.NDArray[np.float64], history: Sequence[int], params: SamplingParams) -> None:
    """llama.cpp's semantics: repeat penalty divides positive / multiplies negative logits of seen tokens;
    frequency and presence penalties subtract per occurrence / once, all over the last penalty_last_n tokens."""
    if not params.penalty_last_n or not history:
        return
    if params.repeat_penalty == 1.0 and not params.frequency_penalty and not params.presence_penalty:
        return
    window = np.asarray(history[-params.penalty_last_n:], dtype=np.int64)
    tokens, counts = np.unique(window, return_counts=True)
    seen = logits[tokens]
    if params.repeat_penalty != 1.0:
        seen = np.where(seen > 0, seen / params.repeat_penalty, seen * params.repeat_penalty)
    seen = seen - counts * params.frequency_penalty - params.presence_penalty
    logits[tokens] = seen


def sample_token(logits: npt.NDArray[np.float64], params: SamplingParams, rng: np.random.Generator,
                 history: Sequence[int] = ()) -> int:
    """One token from one row of logits (a fresh float64 copy: it is modified in place)."""
    _apply_penalties(logits, history, params)
    if params.temperature == 0:
        return int(np.argmax(logits))
    logits /= params.temperature
    if 0 < params.top_k < logits.shape[0]:
        kth = np.partition(logits, -params.top_k)[-params.top_k]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # Keep the smallest head whose mass reaches top_p (always at least the first token).
        cut = int(np.searchsorted(cumulative, params.top_p)) + 1
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[:cut]] = True
        probs = np.where(mask, probs, 0.0)
    if params.min_p > 0:
        probs = np.where(probs >= params.min_p * probs.max(), probs, 0.0)
    probs /= probs.sum()
    return int(rng.choice(probs.shape[0], p=probs))


@dataclass(eq=False)
class _Sequence:
    """One request's decoding state; touched only by the step running on the worker thread."""

    past: dict[str, npt.NDArray[Any]]
    past_len: int = 0


class OnnxDecoderEngine:
    """Text generation with a KV-cache decoder exported by optimum ("text-generation-with-past").

    The graph's input names are read from the session, not assumed: past_key_values.N.key /
    .value (fed back from present.N.*), optional position_ids, attention_mask and
    use_cache_branch (older merged exports). An empty past has sequence length 0.
    """

    def __init__(self, model_dir: str | Path, *, providers: Sequence[str] | None = None,
                 model_file: str | None = None, intra_op_threads: int | None = None,
                 max_concurrency: int = 2, max_queue: int = 64, prefill_chunk: int = 512) -> None:
        self._model = _OnnxModel(model_dir, providers=providers, model_file=model_file,
                                 intra_op_threads=intra_op_threads)
        m = self._model
        self.model_dir = m.model_dir
        self.tokenizer = m.tokenizer
        if "input_ids" not in m.inputs or "logits" not in m.output_names:
            raise ConfigError(f"{m.model_path} is not a causal LM graph (needs input_ids in, logits out)")
        self._past_inputs = [n for n in m.inputs if n.startswith("past_key_values")]
        # present.N.key -> past_key_values.N.key: the cache this step wrote is the next step's input.
        self._present_to_past: dict[str, str] = {}
        for out in m.output_names:
            if out.startswith("present"):
                name = "past_key_values" + out[len("present"):].removeprefix("_key_values")
                if name in m.inputs:
                    self._present_to_past[out] = name
        unfed = set(self._past_inputs) - set(self._present_to_past.values())
        if unfed:
            raise ConfigError(f"{m.model_path.name}: no present.* output feeds {', '.join(sorted(unfed))}")
        self._run_outputs = ["logits", *self._present_to_past]
        self.n_ctx = self._context_length()
        vocab_dim = m.session.get_outputs()[m.output_names.index("logits")].shape[-1]
        self.n_vocab = (vocab_dim if isinstance(vocab_dim, int)
                        else self.tokenizer.get_vocab_size(with_added_tokens=True))
        self.eos_token_ids = self._eos_ids()
        self.max_concurrency = max(1, max_concurrency)
        self.max_queue = max_queue
        self.prefill_chunk = max(1, prefill_chunk)
        self._pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="onnx-decode")
        self._slots: asyncio.Semaphore | None = None
        self._slots_loop: asyncio.AbstractEventLoop | None = None
        self._waiting = 0
        self._closed = False
        self.tokens_generated = 0
        self.requests_finished = 0

    # -- model facts -----------------------------------------------------------------------

    def _context_length(self) -> int:
        cfg = self._model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = cfg.get(key)
            if isinstance(value, int) and value > 0:
                return value
        limit = self._model.tokenizer_config.get("model_max_length")
        if isinstance(limit, int) and 0 < limit < _NO_LIMIT:
            return limit
        raise ConfigError(f"{self.model_dir}/config.json does not say the model's context length "
                          "(max_position_embeddings)")

    def _eos_ids(self) -> frozenset[int]:
        ids = set(_config_ints(self._model.config.get("eos_token_id")))
        generation = _read_json(self.model_dir / "generation_config.json") or {}
        ids.update(_config_ints(generation.get("eos_token_id")))
        eos = self._model.special_token("eos_token")
        if eos is not None and (tid := self.tokenizer.token_to_id(eos)) is not None:
            ids.add(int(tid))
        if not ids:
            raise ConfigError(f"{self.model_dir}: no EOS token in config.json, generation_config.json or the tokenizer")
        return frozenset(ids)

    @property
    def providers(self) -> list[str]:
        return self._model.providers

    @property
    def chat_template(self) -> str | None:
        """The template from tokenizer_config.json, chat_template.jinja or chat_template.json (first found)."""
        value = self._model.tokenizer_config.get("chat_template")
        if isinstance(value, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            value = named.get("default") or next(iter(named.values()), None)
        if isinstance(value, str) and value:
            return value
        jinja = self.model_dir / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        data = _read_json(self.model_dir / "chat_template.json") or {}
        template = data.get("chat_template") if isinstance(data, dict) else None
        return template if isinstance(template, str) else None

    @property
    def bos_token(self) -> str:
        return self._model.special_token("bos_token") or ""

    @property
    def eos_token(self) -> str:
        return self._model.special_token("eos_token") or ""

    @property
    def bos_token_id(self) -> int | None:
        ids = _config_ints(self._model.config.get("bos_token_id"))
        if ids:
            return ids[0]
        tid = self.tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        return None if tid is None else int(tid)

    @property
    def eos_token_id(self) -> int:
        ids = _config_ints(self._model.config.get("eos_token_id"))
        return ids[0] if ids else min(self.eos_token_ids)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids as the model's tokenizer.json makes them; add_special adds BOS etc. per its post-processor.

        parse_special is accepted for the engines' common interface: `tokenizers` always
        recognises the special tokens it lists as added tokens, which is what chat templates need.
        """
        del parse_special
        return list(self.tokenizer.encode(text, add_special_tokens=add_special).ids)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        if any(not 0 <= t < self.n_vocab for t in tokens):
            raise InvalidRequest(f"token ids must be in [0, {self.n_vocab})", param="prompt")
        return str(self.tokenizer.decode(list(tokens), skip_special_tokens=not special))

    # -- generation ------------------------------------------------------------------------

    def generate(self, req: GenerationRequest) -> AsyncGenerator[TokenEvent | Finish, None]:
        """Validate now and return the request's stream: TokenEvent items, then one Finish.

        Raises at once, before any token: ContextLengthExceeded, InvalidSamplingParams,
        InvalidRequest (bad token ids, grammar or LoRA, which this engine does not support),
        EngineClosed. Later errors (DeadlineExceeded, EngineClosed) come from iteration.
        Stopping early (break, aclose, cancellation) frees the request's slot.
        """
        if self._closed:
            raise EngineClosed("the engine is closed")
        params = req.params
        params.validate()
        if params.grammar is not None:
            raise InvalidSamplingParams("grammars (response_format) are not supported by the ONNX engine; "
                                        "serve a GGUF model for constrained output", param="response_format")
        if req.lora_path is not None and req.lora_scale != 0:
            raise InvalidRequest("LoRA adapters are not supported by the ONNX engine; merge the adapter before "
                                 "exporting", code="unsupported_parameter", param="model")
        prompt = req.checked_prompt(self.n_vocab, self.n_ctx)
        if req.n != 1:
            # Several choices would cost n evaluations of the prompt here (no shared cache): refused, not hidden.
            raise InvalidRequest("n > 1 is not supported by the ONNX engine; serve a GGUF model for several "
                                 "choices of one prompt", code="unsupported_parameter", param="n")
        if self._waiting >= self.max_queue:
            raise RateLimited(f"the generation queue is full ({self.max_queue} waiting); retry shortly")
        return self._stream(req, prompt)

    async def _stream(self, req: GenerationRequest, prompt: list[int]) -> AsyncGenerator[TokenEvent | Finish, None]:
        params = req.params
        slots = self._semaphore()
        self._waiting += 1
        try:
            await self._wait_slot(slots, req.deadline)
        finally:
            self._waiting -= 1
        try:
            seq = _Sequence(past=self._empty_past())
            rng = np.random.default_rng(params.seed)
            detok = _IncrementalDetokenizer(self.tokenizer, prompt[-_DETOK_CONTEXT:])
            stops = _StopFilter(params.stop)
            history = list(prompt)
            limit = req.max_new_tokens(self.n_ctx)
            bias = self._bias(params)
            logits = await self._call(self._prefill, seq, prompt)
            n_generated = 0
            while True:
                self._check_deadline(req.deadline)
                lp = _log_softmax(logits) if params.logprobs or params.top_logprobs else None
                candidates = logits.copy()
                if bias is not None:
                    candidates[bias[0]] += bias[1]
                token = sample_token(candidates, params, rng, history)
                if token in self.eos_token_ids:
                    tail, _ = self._drain(detok, stops)
                    yield self._finish("stop", prompt, n_generated, tail)
                    return
                n_generated += 1
                self.tokens_generated += 1
                history.append(token)
                logprob, top = self._logprobs(lp, token, params.top_logprobs)
                text, stopped = stops.push(detok.push(token))
                if stopped:
                    yield TokenEvent(text, token, logprob, top)
                    yield self._finish("stop", prompt, n_generated, "")
                    return
                if n_generated >= limit:
                    tail, stopped = self._drain(detok, stops)
                    yield TokenEvent(text + tail, token, logprob, top)
                    yield self._finish("stop" if stopped else "length", prompt, n_generated, "")
                    return
                yield TokenEvent(text, token, logprob, top)
                logits = await self._call(self._forward, seq, [token])
        finally:
            slots.release()

    def _bias(self, params: SamplingParams) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]] | None:
        """(token ids, biases) added to every step's logits: logit_bias as the llama engine applies it
        (-100 bans), and ignore_eos' bans."""
        pairs = [(t, BANNED_LOGIT if b <= -100 else float(b)) for t, b in params.logit_bias]
        if params.ignore_eos:
            pairs.extend((t, BANNED_LOGIT) for t in self.eos_token_ids)
        if not pairs:
            return None
        merged: dict[int, float] = {}
        for token, value in pairs:  # fancy-index += would apply a repeated id once
            merged[token] = merged.get(token, 0.0) + value
        return (np.fromiter(merged, dtype=np.int64, count=len(merged)),
                np.fromiter(merged.values(), dtype=np.float64, count=len(merged)))

    @staticmethod
    def _drain(detok: _IncrementalDetokenizer, stops: _StopFilter) -> tuple[str, bool]:
        """At the end: the detokenizer's held bytes through the stop filter, then the filter's held text."""
        text, stopped = stops.push(detok.flush())
        return (text, True) if stopped else (text + stops.flush(), False)

    def _semaphore(self) -> asyncio.Semaphore:
        """One semaphore per event loop (asyncio primitives are bound to the loop that first waits)."""
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots_loop is not loop:
            self._slots = asyncio.Semaphore(self.max_concurrency)
            self._slots_loop = loop
        return self._slots

    async def _wait_slot(self, slots: asyncio.Semaphore, deadline: float | None) -> None:
        if deadline is None:
            await slots.acquire()
            return
        try:
            await asyncio.wait_for(slots.acquire(), timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError as err:
            raise DeadlineExceeded("the request's deadline passed while it waited for a free slot") from err

    def _check_deadline(self, deadline: float | None) -> None:
        if self._closed:
            raise EngineClosed("the engine was closed during generation")
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded("the request's deadline passed during generation")

    async def _call(self, fn: Any, *args: Any) -> npt.NDArray[np.float64]:
        if self._closed:
            raise EngineClosed("the engine is closed")
        loop = asyncio.get_running_loop()
        try:
            result: npt.NDArray[np.float64] = await loop.run_in_executor(self._pool, partial(fn, *args))
        except RuntimeError as err:
            if self._closed:  # the executor was shut down under us
                raise EngineClosed("the engine was closed during generation") from err
            raise
        return result

    def _finish(self, reason: str, prompt: list[int], n_generated: int, tail: str) -> Finish:
        self.requests_finished += 1
        return Finish(finish_reason="stop" if reason == "stop" else "length", prompt_tokens=len(prompt),
                      completion_tokens=n_generated, cached_tokens=0, text=tail)

    def _logprobs(self, lp: npt.NDArray[np.float64] | None, token: int,
                  top_n: int) -> tuple[float | None, list[tuple[str, float]] | None]:
        if lp is None:
            return None, None
        top: list[tuple[str, float]] | None = None
        if top_n:
            idx = np.argpartition(-lp, top_n - 1)[:top_n]
            idx = idx[np.argsort(-lp[idx], kind="stable")]
            top = [(self.detokenize([int(i)], special=True), float(lp[i])) for i in idx]
        return float(lp[token]), top

    # -- the graph (worker threads) ----------------------------------------------------------

    def _empty_past(self) -> dict[str, npt.NDArray[Any]]:
        """Zero-length past for each past input: batch 1, sequence 0, other dims from the graph or config."""
        cfg = self._model.config
        heads = cfg.get("num_key_value_heads") or cfg.get("num_attention_heads")
        head_dim = cfg.get("head_dim") or (
            cfg["hidden_size"] // cfg["num_attention_heads"]
            if cfg.get("hidden_size") and cfg.get("num_attention_heads") else None)
        past: dict[str, npt.NDArray[Any]] = {}
        for name in self._past_inputs:
            shape: list[int] = []
            for pos, dim in enumerate(self._model.inputs[name].shape):
                if isinstance(dim, int):
                    shape.append(dim)
                elif isinstance(dim, str) and "batch" in dim:
                    shape.append(1)
                elif isinstance(dim, str) and ("sequence" in dim or "past" in dim):
                    shape.append(0)
                elif pos == 1 and heads:
                    shape.append(int(heads))
                elif pos == 3 and head_dim:
                    shape.append(int(head_dim))
                else:
                    raise ConfigError(f"cannot size the empty cache for {name}: dimension {pos} is {dim!r}")
            past[name] = np.zeros(shape, dtype=self._model.input_dtype(name))
        return past

    def _prefill(self, seq: _Sequence, tokens: list[int]) -> npt.NDArray[np.float64]:
        """The prompt in chunks: logits are [chunk, vocab], so a long prompt never holds [prompt, vocab]."""
        logits: npt.NDArray[np.float64] | None = None
        for start in range(0, len(tokens), self.prefill_chunk):
            logits = self._forward(seq, tokens[start:start + self.prefill_chunk])
        assert logits is not None
        return logits

    def _forward(self, seq: _Sequence, tokens: list[int]) -> npt.NDArray[np.float64]:
        """One session.run over new tokens after seq's cache; returns the last position's logits (float64)."""
        m = self._model
        n = len(tokens)
        total = seq.past_len + n
        feeds: dict[str, Any] = {"input_ids": np.asarray([tokens], dtype=m.input_dtype("input_ids"))}
        if "attention_mask" in m.inputs:
            feeds["attention_mask"] = np.ones((1, total), dtype=m.input_dtype("attention_mask"))
        if "position_ids" in m.inputs:
            feeds["position_ids"] = np.arange(seq.past_len, total, dtype=m.input_dtype("position_ids"))[None, :]
        if "use_cache_branch" in m.inputs:
            feeds["use_cache_branch"] = np.asarray([seq.past_len > 0], dtype=np.bool_)
        feeds.update(seq.past)
        outputs = m.session.run(self._run_outputs, feeds)
        seq.past = {self._present_to_past[name]: value
                    for name, value in zip(self._run_outputs[1:], outputs[1:], strict=True)}
        seq.past_len = total
        row: npt.NDArray[np.float64] = np.asarray(outputs[0][0, -1], dtype=np.float64)
        return row

    def sequence_logits(self, tokens: Sequence[int]) -> npt.NDArray[np.float64]:
        """Logits at every position of `tokens` from an empty cache: what the parity gate compares."""
        m = self._model
        seq = _Sequence(past=self._empty_past())
        n = len(tokens)
        feeds: dict[str, Any] = {"input_ids": np.asarray([list(tokens)], dtype=m.input_dtype("input_ids"))}
        if "attention_mask" in m.inputs:
            feeds["attention_mask"] = np.ones((1, n), dtype=m.input_dtype("attention_mask"))
        if "position_ids" in m.inputs:
            feeds["position_ids"] = np.arange(0, n, dtype=m.input_dtype("position_ids"))[None, :]
        if "use_cache_branch" in m.inputs:
            feeds["use_cache_branch"] = np.asarray([False], dtype=np.bool_)
        feeds.update(seq.past)
        logits = m.session.run(self._run_outputs[:1], feeds)[0]
        out: npt.NDArray[np.float64] = np.asarray(logits[0], dtype=np.float64)
        return out

    # -- life cycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Refuse new work; streams in flight end with EngineClosed at their next step."""
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        self.close()

    def __enter__(self) -> OnnxDecoderEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Embeddings.


class OnnxEmbeddingEngine:
    """Sentence embeddings from an encoder exported for "feature-extraction".

    Texts are padded per batch and truncated at the model's maximum length, as
    sentence-transformers does; `truncate=False` turns an over-long text into
    ContextLengthExceeded instead, for callers that must not embed a cut text.
    """

    def __init__(self, model_dir: str | Path, *, providers: Sequence[str] | None = None,
                 model_file: str | None = None, intra_op_threads: int | None = None, max_batch: int = 32) -> None:
        self._model = _OnnxModel(model_dir, providers=providers, model_file=model_file,
                                 intra_op_threads=intra_op_threads)
        m = self._model
        self.model_dir = m.model_dir
        self.max_batch = max(1, max_batch)
        self.pooling = PoolingConfig.from_model_dir(self.model_dir)
        self.max_length = self._max_length()
        self._tokenizer = m.tokenizer
        pad_token = m.special_token("pad_token")
        pad_id = self._tokenizer.token_to_id(pad_token) if pad_token else None
        if pad_id is None:
            pad_id, pad_token = 0, self._tokenizer.id_to_token(0) or "[PAD]"
        self._pad_id = int(pad_id)
        self._tokenizer.enable_padding(direction="right", pad_id=int(pad_id), pad_token=str(pad_token))
        self._tokenizer.enable_truncation(max_length=self.max_length)
        # Sizing the untruncated length needs a second tokenizer without truncation: the
        # configured one is shared with concurrent embed calls and must not be toggled.
        self._counter = Tokenizer.from_str(self._tokenizer.to_str())
        self._counter.no_truncation()
        self._counter.no_padding()
        self._output = "sentence_embedding" if "sentence_embedding" in m.output_names else (
            "last_hidden_state" if "last_hidden_state" in m.output_names else m.output_names[0])
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx-embed")
        self._closed = False

    def _max_length(self) -> int:
        """The smallest limit the folder states: sentence-transformers', the tokenizer's, the position table's."""
        limits: list[int] = []
        sbert = _read_json(self.model_dir / "sentence_bert_config.json") or {}
        if isinstance(sbert.get("max_seq_length"), int):
            limits.append(int(sbert["max_seq_length"]))
        tok_limit = self._model.tokenizer_config.get("model_max_length")
        if isinstance(tok_limit, int) and 0 < tok_limit < _NO_LIMIT:
            limits.append(tok_limit)
        positions = self._model.config.get("max_position_embeddings")
        if isinstance(positions, int) and positions > 0:
            # RoBERTa-family models offset positions past the padding index, losing two slots.
            offset = 2 if self._model.config.get("model_type") in {"roberta", "xlm-roberta", "camembert"} else 0
            limits.append(positions - offset)
        return min(limits) if limits else 512

    @property
    def dimensions(self) -> int:
        shape = self._model.session.get_outputs()[self._model.output_names.index(self._output)].shape
        width = shape[-1] if isinstance(shape[-1], int) else int(self._model.config.get("hidden_size", 0))
        return width * (1 if self._output == "sentence_embedding" else len(self.pooling.modes))

    @property
    def providers(self) -> list[str]:
        return self._model.providers

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Untruncated token counts (with special tokens), for limits and billing before any work."""
        return [len(e.ids) for e in self._counter.encode_batch(list(texts))]

    def embed_sync(self, texts: Sequence[str], *, truncate: bool = True) -> EmbeddingResult:
        """Blocking: tokenize, run the encoder batch by batch, pool, normalize."""
        texts = list(texts)
        if not texts:
            raise InvalidRequest("no input to embed", param="input")
        if not all(isinstance(t, str) for t in texts):
            raise InvalidRequest("inputs must be strings", param="input")
        if not truncate:
            counts = self.count_tokens(texts)
            longest = max(counts)
            if longest > self.max_length:
                raise ContextLengthExceeded(
                    f"an input has {longest} tokens; this model embeds at most {self.max_length}",
                    param="input", details={"max_length": self.max_length, "tokens": longest})
        vectors: list[npt.NDArray[np.float32]] = []
        token_counts: list[int] = []
        for start in range(0, len(texts), self.max_batch):
            batch_vectors, batch_counts = self._embed_batch(texts[start:start + self.max_batch])
            vectors.append(batch_vectors)
            token_counts.extend(batch_counts)
        return EmbeddingResult(vectors=np.concatenate(vectors, axis=0), token_counts=token_counts)

    async def embed(self, texts: Sequence[str], *, truncate: bool = True) -> EmbeddingResult:
        """embed_sync on the engine's worker thread, so the event loop stays free."""
        if self._closed:
            raise EngineClosed("the engine is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, partial(self.embed_sync, list(texts), truncate=truncate))

    def embed_tokens_sync(self, token_lists: Sequence[Sequence[int]], *, truncate: bool = True) -> EmbeddingResult:
        """Token ids as given (OpenAI's token-array input): no special tokens are added, so a client that
        wants [CLS] ... [SEP] sends them; over-long lists are cut at the model's limit or refused."""
        lists = [list(t) for t in token_lists]
        vocab = self._tokenizer.get_vocab_size(with_added_tokens=True)
        if not lists or not all(lists) or any(not 0 <= t < vocab for ids in lists for t in ids):
            raise InvalidRequest(f"token inputs must be non-empty lists of ids in [0, {vocab})", param="input")
        longest = max(map(len, lists))
        if longest > self.max_length and not truncate:
            raise ContextLengthExceeded(
                f"an input has {longest} tokens; this model embeds at most {self.max_length}",
                param="input", details={"max_length": self.max_length, "tokens": longest})
        lists = [ids[:self.max_length] for ids in lists]
        vectors: list[npt.NDArray[np.float32]] = []
        token_counts: list[int] = []
        for start in range(0, len(lists), self.max_batch):
            batch = lists[start:start + self.max_batch]
            width = max(map(len, batch))
            ids = [row + [self._pad_id] * (width - len(row)) for row in batch]
            mask = [[1] * len(row) + [0] * (width - len(row)) for row in batch]
            batch_vectors, batch_counts = self._embed_ids(ids, mask, [[0] * width for _ in batch])
            vectors.append(batch_vectors)
            token_counts.extend(batch_counts)
        return EmbeddingResult(vectors=np.concatenate(vectors, axis=0), token_counts=token_counts)

    async def embed_tokens(self, token_lists: Sequence[Sequence[int]], *, truncate: bool = True) -> EmbeddingResult:
        """embed_tokens_sync on the engine's worker thread."""
        if self._closed:
            raise EngineClosed("the engine is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, partial(self.embed_tokens_sync, [list(t) for t in token_lists],
                                                              truncate=truncate))

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Token ids back to text (the privacy screen reads token inputs as text)."""
        vocab = self._tokenizer.get_vocab_size(with_added_tokens=True)
        if any(not 0 <= t < vocab for t in tokens):
            raise InvalidRequest(f"token ids must be in [0, {vocab})", param="input")
        return str(self._counter.decode(list(tokens), skip_special_tokens=True))

    def _embed_batch(self, texts: list[str]) -> tuple[npt.NDArray[np.float32], list[int]]:
        encodings = self._tokenizer.encode_batch(texts)
        return self._embed_ids([e.ids for e in encodings], [e.attention_mask for e in encodings],
                               [e.type_ids for e in encodings])

    def _embed_ids(self, ids: list[list[int]], attention: list[list[int]],
                   type_ids: list[list[int]]) -> tuple[npt.NDArray[np.float32], list[int]]:
        m = self._model
        mask = np.asarray(attention, dtype=np.int64)
        columns = {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": type_ids,
            "position_ids": [list(range(len(row))) for row in ids],
        }
        feeds = {name: np.asarray(columns[name], dtype=m.input_dtype(name)) for name in m.inputs if name in columns}
        missing = set(m.inputs) - set(feeds)
        if missing:
            raise ConfigError(f"{m.model_path.name} needs inputs this engine does not make: {', '.join(missing)}")
        (hidden,) = m.session.run([self._output], feeds)
        if self._output == "sentence_embedding":
            vectors = np.asarray(hidden, dtype=np.float32)
        else:
            vectors = pool(hidden, mask, self.pooling.modes)
        if self.pooling.normalize:
            vectors = l2_normalize(vectors)
        return vectors, [int(row.sum()) for row in mask]

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> OnnxEmbeddingEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

