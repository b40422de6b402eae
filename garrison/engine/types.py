"""Plain data the engine takes and gives, and the errors it raises.

Kept free of llama.cpp imports so the HTTP layer and tests can build requests and match
errors without loading the native library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from garrison.errors import InvalidRequest, Unavailable

# "content_filter" is never an engine's: the inference privacy filter ends a response with it.
FinishReason = Literal["stop", "length", "content_filter"]


#: What a banned token's logit becomes (a logit_bias of -100, ignore_eos' end tokens): far below any real
#: logit, but finite. A grammar that allows only banned tokens (a finished JSON object under ignore_eos,
#: or a ban on the one token a schema allows) then picks among them instead of leaving llama.cpp no
#: candidate at all, which aborts the runner.
BANNED_LOGIT = -1.0e20


class ContextLengthExceeded(InvalidRequest):
    """The prompt plus max_tokens does not fit one slot's context.

    Raised before any work is done: the engine never truncates a prompt silently, because
    a truncated prompt gives a confident answer to a question nobody asked.
    """

    code = "context_length_exceeded"


class InvalidSamplingParams(InvalidRequest):
    """A sampling value is out of range (negative temperature, top_p above 1, ...)."""


class DeadlineExceeded(Unavailable):
    """The request's deadline passed, queued or mid-stream; its slot is already free.

    A 504 rather than a 503: the server was up, the answer just took longer than the caller
    allowed. Raised from the stream, so tokens received before it are still valid text.
    """

    code = "deadline_exceeded"
    http_status = 504


class EngineClosed(Unavailable):
    """The engine was closed (model unloaded or daemon stopping) before the request ended."""

    code = "engine_closed"


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its tokens; every field maps to a llama.cpp sampler.

    temperature 0 means greedy (argmax), which is what makes outputs reproducible across
    batch compositions. seed None draws a random seed per request. max_tokens None means
    "to the end of the context" (what OpenAI and llama-server do when a client omits it).
    logit_bias pairs (token id, bias) are added to the logits; a bias of -100 bans the
    token outright (OpenAI documents -100 as a ban, and an added -100 does not always ban).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None
    max_tokens: int | None = 256
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    grammar: str | None = None
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()

    def validate(self) -> None:
        """Reject values llama.cpp would accept but misbehave on, with the offending field named."""
        checks: list[tuple[bool, str, str]] = [
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 disables it)"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty", "must be > 0"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (self.penalty_last_n >= 0, "penalty_last_n", "must be >= 0"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (0 <= self.top_logprobs <= 20, "top_logprobs", "must be in [0, 20]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
            (len(self.stop) <= 4, "stop", "at most 4 stop strings"),
            (all(-100 <= bias <= 100 for _, bias in self.logit_bias), "logit_bias",
             "values must be in [-100, 100]"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise InvalidSamplingParams(f"{name} {why} (got {getattr(self, name)!r})", param=name)


@dataclass(frozen=True)
class GenerationRequest:
    """One completion: prompt already tokenized (chat templating happens above the engine).

    deadline is a time.monotonic() value; the request ends with DeadlineExceeded past it.
    lora_path names a GGUF LoRA adapter, loaded once and cached by path.
    """

    prompt_tokens: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    lora_path: Path | None = None
    lora_scale: float = 1.0
    deadline: float | None = None
    #: Choices sampled from one evaluation of the prompt (OpenAI's `n`): one stream per choice.
    n: int = 1

    def checked_prompt(self, n_vocab: int, n_ctx: int) -> list[int]:
        """Every engine's admission check: valid sampling, token ids in range, prompt + max_tokens in context."""
        self.params.validate()
        if self.n < 1:
            raise InvalidSamplingParams(f"n must be >= 1 (got {self.n})", param="n")
        prompt = list(self.prompt_tokens)
        if not prompt:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if min(prompt) < 0 or max(prompt) >= n_vocab:
            raise InvalidRequest(f"prompt token ids must be in [0, {n_vocab})", param="prompt")
        if any(not 0 <= token < n_vocab for token, _ in self.params.logit_bias):
            raise InvalidSamplingParams(f"logit_bias token ids must be in [0, {n_vocab})", param="logit_bias")
        wanted = self.params.max_tokens
        needed = len(prompt) + (wanted or 1)
        if needed > n_ctx:
            asked = f"max_tokens is {wanted} ({needed} in all)" if wanted else "no room is left to generate"
            raise ContextLengthExceeded(
                f"this model's context per request is {n_ctx} tokens; the prompt has {len(prompt)} tokens and "
                f"{asked}. Shorten the prompt or lower max_tokens.",
                param="messages", details={"context_per_request": n_ctx, "prompt_tokens": len(prompt),
                                           "max_tokens": wanted})
        return prompt

    def max_new_tokens(self, n_ctx: int) -> int:
        """The generation limit: max_tokens, or what is left of the context when the request gave none."""
        wanted = self.params.max_tokens
        return wanted if wanted is not None else n_ctx - len(self.prompt_tokens)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token.

    text is the text this token makes final, which is not always its own piece: bytes of a
    multi-byte character wait for the rest of the character, and text that could be the
    start of a stop string waits until it is known not to be. Concatenating every event's
    text, then Finish.text, gives exactly the completion.
    """

    text: str
    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[str, float]] | None = None


@dataclass(frozen=True)
class Finish:
    """How a request ended; the last item a stream yields.

    text is output held back until the end (a possible stop-string prefix that never
    completed, or an incomplete UTF-8 tail): append it after the events' text.
    cached_tokens counts prompt tokens whose KV cache was reused instead of evaluated.
    """

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    text: str = ""


@dataclass(frozen=True)
class EngineStats:
    """Counters for metrics; the cumulative ones only grow for the life of the engine."""

    n_parallel: int
    active_slots: int
    queued_requests: int
    tokens_generated: int
    prompt_tokens_evaluated: int
    prompt_tokens_reused: int
    requests_finished: int
    decode_steps: int

    def as_dict(self) -> dict[str, Any]:
        """For JSON status endpoints."""
        return dict(self.__dict__)
