"""Every position's logits of a GGUF model for whole token sequences (the parity gate's measurement).

The serving engine samples from the last position only; a parity check needs the logits of
every position of a sequence, in float64, for the same token ids the source model saw. This
uses llama.cpp's low-level API rather than llama-cpp-python's `Llama` object because the
parity gate must choose the CPU kernels: extra buffer types (the weight repack) stay off, so
the measurement cannot fault on a CPU whose repack kernels do (see cpu_kernels) and measures
the model's arithmetic, not a kernel choice. Run in worker processes, never in the daemon.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt

from garrison.engine.cpu_kernels import load_backends
from garrison.engine.llama_sampling import model_meta, tokenize
from garrison.errors import ConfigError


class SequenceScorer:
    """One loaded GGUF (and optional LoRA) with a context long enough for the longest sequence."""

    def __init__(self, path: Path, *, n_ctx: int, lora: Path | None = None, n_threads: int = 2) -> None:
        load_backends()
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.use_extra_bufts = False
        self._model: Any = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise ConfigError(f"llama.cpp could not load {path}")
        self._ctx: Any = None
        self._adapter: Any = None
        self._batch: Any = None
        try:
            self._vocab = llama_cpp.llama_model_get_vocab(self._model)
            self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = n_ctx
            cparams.n_batch = cparams.n_ubatch = n_ctx
            cparams.n_threads = cparams.n_threads_batch = n_threads
            self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
            if not self._ctx:
                raise ConfigError(f"llama.cpp could not create a context for {path}")
            if lora is not None:
                self._adapter = llama_cpp.llama_adapter_lora_init(self._model, str(lora).encode())
                if not self._adapter:
                    raise ConfigError(f"llama.cpp could not load the LoRA adapter {lora}")
                arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapter)
                scales = (ctypes.c_float * 1)(1.0)
                llama_cpp.llama_set_adapters_lora(self._ctx, arr, 1, scales)
            self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
            self.n_ctx = n_ctx
        except BaseException:
            self.close()
            raise

    def logits(self, ids: Sequence[int]) -> npt.NDArray[np.float64]:
        """[len(ids), n_vocab] logits, each row predicting the token after that position."""
        if len(ids) > self.n_ctx:
            raise ValueError(f"sequence of {len(ids)} tokens is longer than the context ({self.n_ctx})")
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        batch = self._batch
        for i, tok in enumerate(ids):
            batch.token[i] = tok
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        batch.n_tokens = len(ids)
        if llama_cpp.llama_decode(self._ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        rows = [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, i), shape=(self.n_vocab,))
                for i in range(len(ids))]
        return np.array(rows, dtype=np.float64)

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return tokenize(self._vocab, text, add_special, parse_special)

    # What serving renders a chat prompt with (as LlamaEngine reads them), for the gate's prompt check.
    @property
    def chat_template(self) -> str | None:
        return self._meta("tokenizer.chat_template")

    @property
    def bos_token(self) -> str:
        """"" when the GGUF declares no BOS, as the serving engine gives it to templates."""
        if self._meta("tokenizer.ggml.bos_token_id") is None:
            return ""
        return self._token_text(int(llama_cpp.llama_vocab_bos(self._vocab)))

    @property
    def eos_token(self) -> str:
        return self._token_text(int(llama_cpp.llama_vocab_eos(self._vocab)))

    def _meta(self, key: str) -> str | None:
        return model_meta(self._model, key)

    def _token_text(self, token: int) -> str:
        raw = llama_cpp.llama_vocab_get_text(self._vocab, token) if token >= 0 else b""
        return raw.decode("utf-8", errors="replace") if raw else ""

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._adapter:
            llama_cpp.llama_adapter_lora_free(self._adapter)
            self._adapter = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> SequenceScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
