"""GGUF -> quantized GGUF through llama.cpp's own `llama_model_quantize`, in process.

Why llama.cpp's quantizer and not ours: the quantized block formats and the per-tensor
type mix of each preset (which tensors of a Q4_K_M get Q6_K, ...) are defined by the
runtime's llama.cpp revision; calling its library keeps the file and the runtime in step.

What the caller can rely on:

* `QUANT_TYPES` is the whole menu: a name (lowercase, as `llama-quantize` spells it), the
  llama_ftype, one line for humans, and whether an importance matrix is optional,
  recommended or required. Adding a type is one row.
* Rows that are not a multiple of a type's block size (256 for K- and IQ-quants) are not an
  error: llama.cpp falls back per tensor (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS ->
  IQ4_NL, Q2_K/Q3_K -> Q4_0, else F16) and logs it. Small models (hidden 64) therefore quantize
  to every listed type, only less compactly; the fallback count is logged as a warning.
* The output is written under a hidden partial name in the destination folder and renamed
  into place, so a failed or killed quantization never leaves a file under `dst`.
* Importance matrix: `llama_model_quantize_params.imatrix` takes per-tensor weights. This
  module reads a precomputed matrix (llama.cpp's GGUF imatrix format, or the legacy .dat) and
  hands it over. Computing one needs activation statistics collected during inference:
  llama.cpp does that in its `llama-imatrix` tool through the eval callback and the raw
  `ggml_tensor` layout, for which llama.h has no API and llama-cpp-python has no binding,
  so it is not done here (build `llama-imatrix` from the same vendored source instead).
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from garrison.converters.hf_to_gguf import ConversionError
from garrison.engine.cpu_kernels import load_backends
from garrison.errors import ConfigError
from garrison.paths import import_gguf_py

log = logging.getLogger(__name__)


class Imatrix(StrEnum):
    """How much a type depends on an importance matrix (llama.cpp's own guidance)."""

    OPTIONAL = "optional"        # 8/6-bit and float: the matrix changes (almost) nothing
    RECOMMENDED = "recommended"  # 4/5-bit and below: measurably better with one
    REQUIRED = "required"        # llama.cpp refuses without one ("the result will be garbage")


@dataclass(frozen=True)
class QuantType:
    name: str
    ftype: int
    description: str
    imatrix: Imatrix


def _row(name: str, ftype: int, description: str, imatrix: Imatrix) -> tuple[str, QuantType]:
    return name, QuantType(name, ftype, description, imatrix)


# Sizes are llama.cpp's bits per weight on a 7B Llama (tools/quantize); smaller models pay more for
# the tensors kept in higher precision.
QUANT_TYPES: dict[str, QuantType] = dict((
    _row("f16", llama_cpp.LLAMA_FTYPE_MOSTLY_F16, "16-bit float, lossless from an F16 source", Imatrix.OPTIONAL),
    _row("bf16", llama_cpp.LLAMA_FTYPE_MOSTLY_BF16, "bfloat16, lossless from a BF16 source", Imatrix.OPTIONAL),
    _row("q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "8.5 bpw, practically lossless", Imatrix.OPTIONAL),
    _row("q6_k", llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K, "6.6 bpw, near lossless", Imatrix.OPTIONAL),
    _row("q5_k_m", llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M, "5.7 bpw K-quant mix, very low loss", Imatrix.RECOMMENDED),
    _row("q5_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0, "5.5 bpw legacy block quant", Imatrix.RECOMMENDED),
    _row("q4_k_m", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "4.9 bpw K-quant mix, the usual default",
         Imatrix.RECOMMENDED),
    _row("q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "4.5 bpw legacy block quant, fast on CPU (runtime repack)",
         Imatrix.RECOMMENDED),
    _row("iq4_xs", llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_XS, "4.3 bpw non-linear quant", Imatrix.RECOMMENDED),
    _row("q3_k_m", llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M, "3.9 bpw K-quant mix, noticeable loss", Imatrix.RECOMMENDED),
    _row("q2_k", llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K, "3.0 bpw K-quant mix, large loss", Imatrix.RECOMMENDED),
    _row("iq3_xxs", llama_cpp.LLAMA_FTYPE_MOSTLY_IQ3_XXS, "3.1 bpw, needs an importance matrix", Imatrix.REQUIRED),
))

_IMATRIX_KV = {
    "file": "quantize.imatrix.file",
    "dataset": "quantize.imatrix.dataset",
    "entries": "quantize.imatrix.entries_count",
    "chunks": "quantize.imatrix.chunks_count",
}

# llama.cpp's log is process-global; one quantization at a time owns it.
_quantize_lock = threading.Lock()

# ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous line).
_LOG_WARN, _LOG_ERROR, _LOG_CONT = 3, 4, 5


def quant_type(name: str) -> QuantType:
    """The table row for `name` (case-insensitive), or a ConversionError listing the menu."""
    row = QUANT_TYPES.get(name.strip().lower())
    if row is None:
        raise ConversionError(f"unknown quantization type {name!r}; choose from {', '.join(QUANT_TYPES)}",
                              code="unknown_quant_type", param="qtype")
    return row


# --- importance matrix files ------------------------------------------------------------------------------


@dataclass
class ImatrixData:
    """Per-tensor importance weights (mean squared activation per input column), as llama.cpp wants them."""

    entries: dict[str, Any]  # tensor name -> contiguous float32 numpy array
    datasets: list[str]
    chunks: int


def load_imatrix(path: Path) -> ImatrixData:
    """Read llama-imatrix output: the GGUF format (current) or the legacy .dat; same maths as llama-quantize."""
    if not path.is_file():
        raise ConversionError(f"importance matrix not found: {path}", code="imatrix_invalid", param="imatrix")
    with path.open("rb") as fh:
        magic = fh.read(4)
    try:
        data = _load_imatrix_gguf(path) if magic == b"GGUF" else _load_imatrix_legacy(path)
    except ConversionError:
        raise
    except (OSError, ValueError, KeyError, IndexError, struct.error) as err:
        raise ConversionError(f"cannot read importance matrix {path.name}: {err}", code="imatrix_invalid",
                              param="imatrix") from err
    if not data.entries:
        raise ConversionError(f"importance matrix {path.name} has no entries", code="imatrix_invalid",
                              param="imatrix")
    for name, values in data.entries.items():
        if not bool(np.isfinite(values).all()):
            raise ConversionError(f"importance matrix {path.name} has non-finite values for {name}",
                                  code="imatrix_invalid", param="imatrix")
    return data


def gguf_py() -> Any:
    """gguf-py at the runtime's revision; a missing one is a conversion error here."""
    try:
        return import_gguf_py()
    except ConfigError as exc:
        raise ConversionError(exc.message, code="converter_missing") from None


def _load_imatrix_gguf(path: Path) -> ImatrixData:
    reader = gguf_py().GGUFReader(str(path))
    sums: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    for tensor in reader.tensors:
        name = str(tensor.name)
        if name.endswith(".in_sum2"):
            sums[name[: -len(".in_sum2")]] = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        elif name.endswith(".counts"):
            counts[name[: -len(".counts")]] = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    if set(sums) != set(counts):
        odd = sorted(set(sums) ^ set(counts))[0]
        raise ConversionError(f"importance matrix {path.name}: sums and counts do not pair up for {odd}",
                              code="imatrix_invalid", param="imatrix")
    entries: dict[str, Any] = {}
    for name, s in sums.items():
        c = np.rint(counts[name])
        per_expert = s.reshape(len(c), -1)
        # A column never seen (count 0) weighs 1, as in llama-quantize.
        safe = np.where(c > 0, c, 1.0)[:, None]
        entries[name] = np.ascontiguousarray(np.where(c[:, None] > 0, per_expert / safe, 1.0).reshape(-1),
                                             dtype=np.float32)
    fields = reader.fields
    datasets = [str(v) for v in fields["imatrix.datasets"].contents()] if "imatrix.datasets" in fields else []
    chunks = int(fields["imatrix.chunk_count"].contents()) if "imatrix.chunk_count" in fields else 0
    return ImatrixData(entries, datasets, chunks)


def _load_imatrix_legacy(path: Path) -> ImatrixData:
    """The .dat layout: n, then n x (len, name, ncall, nval, nval floats), then optional chunks and dataset."""
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        values = struct.unpack_from(fmt, raw, pos)
        pos += struct.calcsize(fmt)
        return values

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise ValueError("no entries (not an imatrix file?)")
    entries: dict[str, Any] = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length <= 4096:
            raise ValueError("bad entry name length (not an imatrix file?)")
        name = raw[pos: pos + length].decode("utf-8")
        pos += length
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(raw):
            raise ValueError(f"truncated data for {name}")
        values = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        # Legacy sums are (sum/count)*ncall: divide by ncall to get the mean.
        entries[name] = np.ascontiguousarray(values / ncall if ncall > 0 else values)
    chunks, datasets = 0, []
    if pos + 4 <= len(raw):
        (chunks,) = take("<i")
        if pos + 4 <= len(raw):
            (length,) = take("<i")
            if length > 0:
                datasets.append(raw[pos: pos + length].decode("utf-8", errors="replace"))
    return ImatrixData(entries, datasets, chunks)


# --- quantization -----------------------------------------------------------------------------------------


@dataclass
class _Capture:
    """What llama.cpp said during one quantization: warnings, errors, fallback count."""

    lines: list[str]
    last_level: int = 0

    def add(self, level: int, text: str) -> None:
        level = self.last_level if level == _LOG_CONT else level
        self.last_level = level
        if level >= _LOG_WARN:
            self.lines.append(text)

    @property
    def text(self) -> str:
        return "".join(self.lines)


@contextmanager
def _captured_llama_log() -> Iterator[_Capture]:
    """Route llama.cpp's log to us for the duration, then give the previous callback back.

    The log callback is process-global: while a quantization runs, other llama.cpp users in
    the same process (an engine) log here too, and only their warnings survive. Quantization
    belongs in a job worker process, where nothing else runs.
    """
    capture = _Capture([])

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        capture.add(level, text.decode("utf-8", errors="replace"))

    previous = llama_cpp.llama_log_callback()
    previous_data = ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(previous_data))
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield capture
    finally:
        llama_cpp.llama_log_set(previous, previous_data)


def _kv_override(key: str, value: int | str) -> Any:
    kv = llama_cpp.llama_model_kv_override()
    kv.key = key.encode()
    union: Any = kv.value  # the binding's type hint calls this field a plain value; it is the C union
    if isinstance(value, int):
        kv.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
        union.val_i64 = value
    else:
        kv.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
        union.val_str = value.encode()[:127]
    return kv


def _attach_imatrix(params: Any, data: ImatrixData, source: Path) -> list[Any]:
    """Fill params.imatrix and the provenance keys llama-quantize writes; returns what must stay alive."""
    names = [name.encode() for name in data.entries]
    arrays = list(data.entries.values())
    table = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()  # zeroed last row terminates
    for i, (name, values) in enumerate(zip(names, arrays, strict=True)):
        table[i].name = name
        table[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        table[i].size = values.size
    params.imatrix = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    # The file's name, not its path: a model card should not reveal the operator's folders.
    overrides = [_kv_override(_IMATRIX_KV["file"], source.name),
                 _kv_override(_IMATRIX_KV["entries"], len(names))]
    if data.datasets:
        overrides.append(_kv_override(_IMATRIX_KV["dataset"], data.datasets[0]))
    if data.chunks > 0:
        overrides.append(_kv_override(_IMATRIX_KV["chunks"], data.chunks))
    kv_table = (llama_cpp.llama_model_kv_override * (len(overrides) + 1))(*overrides)  # empty key terminates
    params.kv_overrides = ctypes.cast(kv_table, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    return [names, arrays, table, kv_table]


def _failure(capture: _Capture, qtype: str) -> ConversionError:
    said = capture.text
    if "requantizing from type" in said:
        return ConversionError("the source GGUF is already quantized; quantize from an F32/F16/BF16 GGUF",
                               code="already_quantized")
    if "requires an imatrix" in said or "Missing importance matrix" in said:
        return ConversionError(f"{qtype} needs an importance matrix (pass imatrix=, made by llama-imatrix)",
                               code="imatrix_required", param="imatrix")
    if "imatrix size" in said:
        detail = next((line.strip() for line in said.splitlines() if "imatrix size" in line), "")
        return ConversionError(f"the importance matrix does not match this model: {detail}",
                               code="imatrix_mismatch", param="imatrix")
    detail = next((line.split("failed to quantize:", 1)[1].strip() for line in said.splitlines()
                   if "failed to quantize:" in line), "") or said.strip()[-300:] or "no detail from llama.cpp"
    return ConversionError(f"llama.cpp could not quantize to {qtype}: {detail}", code="quantize_failed")


def quantize_gguf(src: Path, dst: Path, qtype: str, *, nthread: int = 0, imatrix: Path | None = None) -> Path:
    """Quantize the GGUF `src` to `dst` as `qtype`; returns dst.

    nthread <= 0 lets llama.cpp use every hardware thread. Blocks the calling thread for the
    whole run (seconds for small models, minutes for 7B): call it from a worker, not an event loop.
    Raises ConversionError: unknown_quant_type, source_missing, imatrix_required, imatrix_invalid,
    imatrix_mismatch, already_quantized, quantize_failed.
    """
    row = quant_type(qtype)
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ConversionError(f"source GGUF not found: {src}", code="source_missing", param="src")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ConversionError("the destination is the source; write the quantized model elsewhere",
                              code="invalid_destination", param="dst")
    if row.imatrix is Imatrix.REQUIRED and imatrix is None:
        raise ConversionError(f"{row.name} needs an importance matrix (pass imatrix=, made by llama-imatrix)",
                              code="imatrix_required", param="imatrix")
    matrix = load_imatrix(Path(imatrix)) if imatrix is not None else None

    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(f".{dst.name}.partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = row.ftype
    params.nthread = nthread
    # The C struct points into these arrays: they must outlive the call (llama.cpp copies them).
    keep_alive = _attach_imatrix(params, matrix, Path(imatrix)) if matrix is not None and imatrix else []

    with _quantize_lock, _captured_llama_log() as capture:
        load_backends()
        llama_cpp.llama_backend_init()
        partial.unlink(missing_ok=True)  # a leftover of a killed run
        try:
            rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(partial), ctypes.byref(params))
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    del keep_alive
    if rc != 0 or not partial.exists():
        partial.unlink(missing_ok=True)
        raise _failure(capture, row.name)
    fallbacks = capture.text.count("falling back to")
    if fallbacks:
        log.warning("%s: %d tensor(s) have rows that do not fit %s blocks and use a fallback type",
                    dst.name, fallbacks, row.name)
    with partial.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(partial, dst)
    return dst
