"""Per-request sampling on llama.cpp's C sampler chain, plus the pieces around it.

Sampling stays in C (one chain per request) because a Python sampler over a 32k-150k
vocabulary would cost more per token than the decode of a small model. Python only
computes log-probabilities, and only for requests that ask for them.
"""

from __future__ import annotations

import codecs
import ctypes
import secrets
from collections.abc import Sequence
from typing import Any

import llama_cpp
import numpy as np

from garrison.engine.json_grammar import InvalidGrammar
from garrison.engine.types import BANNED_LOGIT, SamplingParams


def tokenize(vocab: Any, text: str, add_special: bool, parse_special: bool) -> list[int]:
    """Text to token ids with llama.cpp's tokenizer (it reads only the vocabulary: safe beside decoding)."""
    raw = text.encode("utf-8")
    cap = len(raw) + 8
    while True:
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(vocab, raw, len(raw), buf, cap, add_special, parse_special)
        if n >= 0:
            return list(buf[:n])
        cap = -n  # llama.cpp says how many it needs


def model_meta(model: Any, key: str) -> str | None:
    """A GGUF metadata string (the chat template, ...), or None; grows the buffer for long values."""
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    if n < 0:
        return None
    if n >= len(buf):
        buf = ctypes.create_string_buffer(n + 1)
        n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return bytes(buf.raw[:n]).decode("utf-8", errors="replace")


def end_of_generation_ids(vocab: Any, n_vocab: int) -> list[int]:
    """Every token that ends generation (EOS, EOT, ...), as llama.cpp's vocabulary marks them."""
    return [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]


#: OpenAI documents a bias of -100 as a ban; added to a logit it may not be one, so it becomes BANNED_LOGIT.
BAN_BIAS = -100.0


def logit_biases(params: SamplingParams, vocab: Any, n_vocab: int,
                 eog_ids: Sequence[int] | None) -> list[tuple[int, float]]:
    """(token, bias) pairs for llama.cpp's logit-bias sampler: the request's, then ignore_eos' bans.

    ignore_eos bans end-of-generation tokens, so generation runs to max_tokens (benchmarks,
    load tests). The engine passes the ids it found once at load: scanning 32k tokens here costs
    ~10 ms a request.
    """
    out = [(token, BANNED_LOGIT if bias <= BAN_BIAS else float(bias)) for token, bias in params.logit_bias]
    if params.ignore_eos:
        eog = list(eog_ids) if eog_ids is not None else end_of_generation_ids(vocab, n_vocab)
        out.extend((t, BANNED_LOGIT) for t in eog)
    return out


class SamplerChain:
    """Owns one llama_sampler chain; built per request, freed when the request ends.

    Creating it needs only the vocabulary (not the context), so the engine builds it on
    the caller's thread and a bad grammar is rejected before the request is queued.
    """

    def __init__(self, vocab: Any, n_vocab: int, params: SamplingParams, prompt_tokens: Sequence[int],
                 eog_ids: Sequence[int] | None = None) -> None:
        self._ptr: Any = None
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        chain = llama_cpp.llama_sampler_chain_init(chain_params)
        if not chain:
            raise MemoryError("llama_sampler_chain_init failed")
        self._ptr = chain
        # Biases first (the client's logit_bias and ignore_eos' bans, in one llama.cpp logit-bias
        # sampler), as llama.cpp's common sampler orders them: every later sampler sees biased logits.
        biases = logit_biases(params, vocab, n_vocab, eog_ids)
        if biases:
            array = (llama_cpp.llama_logit_bias * len(biases))(*[llama_cpp.llama_logit_bias(t, b)
                                                                 for t, b in biases])
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(biases),
                                                                                             array))
        # Grammar next: every later sampler then works on allowed tokens only, so top_k /
        # top_p cannot leave the grammar with nothing to pick.
        if params.grammar is not None:
            grammar = llama_cpp.llama_sampler_init_grammar(vocab, params.grammar.encode(), b"root")
            if not grammar:
                self.free()
                raise InvalidGrammar("llama.cpp could not parse the grammar", param="grammar")
            llama_cpp.llama_sampler_chain_add(chain, grammar)
        if params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            penalties = llama_cpp.llama_sampler_init_penalties(
                n_vocab, params.penalty_last_n, params.repeat_penalty, params.frequency_penalty,
                params.presence_penalty)
            # The penalty window covers the prompt tail too, as in llama.cpp's server, so a
            # repeat penalty also discourages echoing the prompt. Fed before joining the
            # chain: accepting on the chain would also advance the grammar.
            if params.penalty_last_n:
                for tok in prompt_tokens[-params.penalty_last_n:]:
                    llama_cpp.llama_sampler_accept(penalties, tok)
            llama_cpp.llama_sampler_chain_add(chain, penalties)
        if params.temperature == 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return
        if params.top_k > 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        if params.temperature != 1.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        # llama.cpp treats 0xFFFFFFFF as "pick a random seed"; keep explicit seeds below it.
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed % 0xFFFFFFFF))

    def sample(self, ctx: Any, idx: int) -> int:
        """Pick the token for output row idx of the last decode; the chain accepts it itself."""
        return int(llama_cpp.llama_sampler_sample(self._ptr, ctx, idx))

    def free(self) -> None:
        """Release the C chain (and the samplers it owns); safe to call twice."""
        if self._ptr:
            llama_cpp.llama_sampler_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        self.free()


def log_softmax_row(logits_ptr: Any, n_vocab: int) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Log-probabilities of the model's raw distribution for one output row.

    Taken before penalties/temperature: OpenAI's logprobs describe the model, not the
    sampler settings. float64 so that tiny probabilities do not round to -inf.
    """
    row = np.ctypeslib.as_array(ctypes.cast(logits_ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))
    x = row.astype(np.float64)
    x -= x.max()
    x -= np.log(np.exp(x).sum())
    return x


def top_k_indices(logprobs: np.ndarray[Any, np.dtype[np.float64]], k: int) -> list[int]:
    """The k most likely token ids, most likely first (argpartition: O(n), not a full sort)."""
    if k <= 0:
        return []
    k = min(k, logprobs.shape[0])
    part = np.argpartition(-logprobs, k - 1)[:k]
    return [int(i) for i in part[np.argsort(-logprobs[part], kind="stable")]]


class TextAssembler:
    """Turns token pieces into releasable text: whole UTF-8 characters, never stop-string text.

    Byte-fallback tokens split one character over several tokens, so bytes go through an
    incremental UTF-8 decoder. Text that could be the start of a stop string is held
    back until the next pieces prove it is not, so a stop string never leaks to a client
    even when it spans token boundaries.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(stop)
        self._held = ""

    def push(self, piece: bytes) -> tuple[str, bool]:
        """Add one token's bytes; return (text now safe to emit, whether a stop string matched).

        On a match, the returned text is everything before the stop string and the rest
        is dropped.
        """
        self._held += self._decoder.decode(piece)
        if not self._stop:
            out, self._held = self._held, ""
            return out, False
        hits = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        if hits:
            out = self._held[:min(hits)]
            self._held = ""
            return out, True
        keep = self._partial_suffix(self._held)
        cut = len(self._held) - keep
        out, self._held = self._held[:cut], self._held[cut:]
        return out, False

    def flush(self) -> str:
        """The held-back text at the end of generation (it did not turn into a stop string)."""
        out = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return out

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
