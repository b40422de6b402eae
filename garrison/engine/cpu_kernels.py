"""Which llama.cpp CPU kernels this machine runs, chosen at run time and proven before use.

llama.cpp is built the way its release builds are (install.sh): GGML_BACKEND_DL with every
CPU variant as its own library (libggml-cpu-haswell.so, -skylakex, -sapphirerapids, ...).
`load_backends` loads the best variant for this CPU from the package's lib folder, as
llama-server does from its own folder; without it a DL build has no backend at all.

A CPU can advertise what it cannot run: on some virtual machines the AMX weight repack
("extra buffer types") faults inside llama_decode with SIGSEGV. So before a weight type is
first served with extra buffer types on, a probe in a throw-away process builds a tiny model
of that type, loads it with them and decodes; a probe that dies turns them off for that type
on this machine. The verdict is cached in the state folder, keyed by the CPU (model name and
flags) and the llama.cpp build, so a new CPU or a new build is probed again.

This module imports llama_cpp only inside the probe process: the daemon asks for verdicts
without loading native code.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from garrison.errors import ConfigError
from garrison.logs import log_event

log = logging.getLogger("garrison.cpu_kernels")

#: `cpu_repack` setting values.
REPACK_MODES = ("auto", "on", "off")
PROBE_TIMEOUT_S = 180.0

# Tensor type (ggml's name) -> a llama_ftype whose default type it is (llama.h's enum). The probe
# quantizes with `pure` set, so every matrix of its model is exactly that type. Why per tensor type
# and not per file type: a model's tensors may fall back to other types (a Q2_K file whose narrow rows
# became Q8_0 and Q5_0), and the repack that faults is chosen per tensor.
PROBE_FTYPES: dict[str, int] = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
                                "Q2_K": 10, "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "IQ4_NL": 25,
                                "IQ4_XS": 30, "BF16": 32}


def llama_lib_dir() -> Path:
    """site-packages/llama_cpp/lib, found without importing llama_cpp (which loads the native library)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("llama-cpp-python is not installed; run ./install.sh", code="llama_cpp_missing")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def variant_libraries(lib_dir: Path | None = None) -> list[Path]:
    """The CPU backend libraries of a dynamically loaded build (empty for a monolithic build)."""
    folder = lib_dir or llama_lib_dir()
    return sorted(p for p in folder.glob("libggml-cpu*.so") if p.is_file())


def build_id() -> str:
    """Changes whenever the installed llama.cpp libraries change (a rebuild, another flavour)."""
    folder = llama_lib_dir()
    h = hashlib.sha256()
    for lib in sorted(folder.glob("*.so")):
        st = lib.stat()
        h.update(f"{lib.name}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


def cpu_id() -> str:
    """The CPU as kernels see it: model name and feature flags (VMs of one kind differ in both)."""
    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "CPU part") and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = " ".join(sorted(value.split()))
            if model and flags:
                break
    except OSError:
        pass
    return hashlib.sha256(f"{os.uname().machine}|{model}|{flags}".encode()).hexdigest()[:16]


def cpu_has_amx() -> bool:
    try:
        return " amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# -- in a process that runs llama.cpp (runner, probe, worker) ------------------------------------

_loaded = False


def load_backends() -> None:
    """Load the best CPU variant (and a GPU backend where one is built) before llama_backend_init.

    llama_backend_init would look next to the Python executable and in the working folder,
    where a wheel's libraries never are. A monolithic build has its CPU backend linked in:
    then nothing is loaded here.
    """
    global _loaded
    if _loaded:
        return
    _loaded = True
    folder = llama_lib_dir()
    if not variant_libraries(folder) and not list(folder.glob("libggml-cuda*.so")):
        return
    _preload_cuda_runtime(folder)
    ggml = _libggml()
    ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_load_all_from_path.restype = None
    ggml.ggml_backend_load_all_from_path(str(folder).encode())


def _preload_cuda_runtime(folder: Path) -> None:
    """A CUDA build links libcudart/libcublas, which install.sh may take from PyPI (site-packages/nvidia/
    cu13/lib); the backend's RPATH is its own folder, so they are loaded first, globally, by path."""
    if not list(folder.glob("libggml-cuda*.so")):
        return
    for site_dir in {folder.parent.parent, *map(Path, sys.path)}:
        lib = site_dir / "nvidia" / "cu13" / "lib"
        if lib.is_dir():
            for name in ("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13"):
                if (lib / name).exists():
                    ctypes.CDLL(str(lib / name), mode=ctypes.RTLD_GLOBAL)
            return


def _libggml() -> ctypes.CDLL:
    """The libggml that libllama links (its soname file): a wheel stores symlinks as copies, and
    libggml.so beside it would be a second library with a second, empty backend registry."""
    folder = llama_lib_dir()
    candidates = sorted(folder.glob("libggml.so.[0-9]*"), key=lambda p: len(p.name)) or [folder / "libggml.so"]
    return ctypes.CDLL(str(candidates[0]))


def backend_registry() -> list[str]:
    """Names of the registered ggml backends ("CPU", "CUDA", ...), after load_backends."""
    ggml = _libggml()
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    ggml.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_reg_get.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_name.restype = ctypes.c_char_p
    return [ggml.ggml_backend_reg_name(ggml.ggml_backend_reg_get(i)).decode()
            for i in range(ggml.ggml_backend_reg_count())]


def loaded_variant() -> str:
    """Which CPU variant library this process mapped ("sapphirerapids"), or "builtin" for a monolithic build."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for line in maps.splitlines():
        name = line.rsplit("/", 1)[-1]
        if name.startswith("libggml-cpu") and name.endswith(".so"):
            return name[len("libggml-cpu"):-3].lstrip("-") or "cpu"
    return "builtin"


def loaded_gpu_backend() -> str | None:
    for name in backend_registry():
        if name.upper() not in ("CPU", "BLAS", "RPC"):
            return name
    return None


# -- verdicts --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """Whether extra buffer types may be used for one weight type on this machine and build."""

    tensor_type: str
    extra_bufts: bool
    reason: str
    probed_at: float
    variant: str


def gguf_tensor_types(path: Path) -> list[str]:
    """The types of a GGUF's weight matrices ("Q8_0", "F16", ...), read from its header."""
    reader = _gguf().GGUFReader(str(path))
    return sorted({t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2})


def _gguf() -> Any:
    from garrison.paths import import_gguf_py

    return import_gguf_py()


class RepackVerdicts:
    """The verdict cache (a JSON file in the state folder's cache) and the probes that fill it."""

    def __init__(self, cache_file: Path) -> None:
        self.cache_file = cache_file

    def _key(self) -> str:
        return f"{cpu_id()}-{build_id()}"

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.cache_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def cached(self, tensor_type: str) -> Verdict | None:
        row = self._read().get(self._key(), {}).get(tensor_type)
        if not isinstance(row, dict):
            return None
        try:
            return Verdict(**row)
        except TypeError:
            return None

    def all_cached(self) -> list[Verdict]:
        rows = self._read().get(self._key(), {})
        out = []
        for row in rows.values():
            try:
                out.append(Verdict(**row))
            except TypeError:
                continue
        return out

    def _store(self, verdict: Verdict) -> None:
        from garrison.store.durable import atomic_write_text

        data = self._read()
        data.setdefault(self._key(), {})[verdict.tensor_type] = asdict(verdict)
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.cache_file, json.dumps(data, indent=1, sort_keys=True))

    def verdict(self, tensor_type: str) -> Verdict:
        """The cached verdict, or a new probe's (blocking: a second, once per type, CPU and build)."""
        cached = self.cached(tensor_type)
        if cached is not None:
            return cached
        verdict = run_probe(tensor_type)
        self._store(verdict)
        log_event(log, "cpu_kernels.probe", level=logging.INFO if verdict.extra_bufts else logging.WARNING,
                  tensor_type=tensor_type, extra_bufts=verdict.extra_bufts, variant=verdict.variant,
                  reason=verdict.reason)
        return verdict

    def decide(self, mode: str, model_path: Path) -> tuple[bool, str]:
        """(use extra buffer types?, why) for serving `model_path` under the cpu_repack setting.

        auto: on only if every weight type of the model passed its probe on this CPU and build.
        """
        if mode == "on":
            return True, "cpu_repack = on (forced; not probed)"
        if mode == "off":
            return False, "cpu_repack = off"
        verdicts = [self.verdict(t) for t in gguf_tensor_types(model_path)]
        bad = [v for v in verdicts if not v.extra_bufts]
        if bad:
            return False, "; ".join(f"{v.tensor_type}: {v.reason}" for v in bad)
        types = ", ".join(v.tensor_type for v in verdicts) or "no matrices"
        variant = verdicts[0].variant if verdicts else loaded_variant()
        return True, f"probes passed on this CPU ({variant}) for {types}"


def run_probe(tensor_type: str, *, timeout_s: float = PROBE_TIMEOUT_S) -> Verdict:
    """Build, load and decode a tiny model of `tensor_type` with extra buffer types on, in a throw-away process."""
    started = time.time()
    ftype = PROBE_FTYPES.get(tensor_type)
    if ftype is None:
        return Verdict(tensor_type, False, "no probe for this type; serving without extra buffer types", started,
                       "unknown")
    with tempfile.TemporaryDirectory(prefix="garrison-probe-") as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        try:
            proc = subprocess.run([sys.executable, "-m", "garrison.engine.cpu_kernels", str(ftype), tmp],
                                  capture_output=True, text=True, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            return Verdict(tensor_type, False, f"probe timed out after {timeout_s:.0f} s", started, "unknown")
        info: dict[str, Any] = {}
        if out.exists():
            info = json.loads(out.read_text())
    name = tensor_type
    variant = str(info.get("variant", "unknown"))
    if proc.returncode == 0 and info.get("decoded"):
        return Verdict(name, True, f"decoded with extra buffer types in {time.time() - started:.1f} s",
                       started, variant)
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        return Verdict(name, False, f"the probe died with {sig} decoding with extra buffer types; "
                       "serving without them", started, variant)
    if info.get("built") is False:
        # Could not even make the probe model (no gguf-py, an unsupported type): do not guess.
        return Verdict(name, False, f"probe model could not be built: {info.get('error', '?')}",
                       started, variant)
    tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
    return Verdict(name, False, f"the probe exited {proc.returncode}: {tail[0][:200]}", started, variant)


# -- the probe process ---------------------------------------------------------------------------

def _write_tiny_gguf(path: Path) -> None:
    """A random-weight one-layer Llama whose matrices every quantization type can hold (rows of 256)."""
    import numpy as np

    gguf = _gguf()
    n_embd, n_ff, n_vocab, n_head = 256, 512, 512, 2
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)
    w.add_tokenizer_model("llama")
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    tokens += [f"t{i}".encode() for i in range(n_vocab - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259)
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def mat(rows: int, cols: int) -> Any:
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(n_vocab, n_embd))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("output.weight", mat(n_vocab, n_embd))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        w.add_tensor(f"blk.0.{name}.weight", mat(n_embd, n_embd))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
    w.add_tensor("blk.0.ffn_gate.weight", mat(n_ff, n_embd))
    w.add_tensor("blk.0.ffn_up.weight", mat(n_ff, n_embd))
    w.add_tensor("blk.0.ffn_down.weight", mat(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _probe_main(ftype: int, folder: Path) -> int:
    """Quantize the tiny model to `ftype`, load it with extra buffer types, decode a batch and some steps.

    Writes what it got to before each risky step, so a fault still leaves the variant name behind.
    """
    result: dict[str, Any] = {"built": False}
    out = folder / "result.json"

    def save() -> None:
        out.write_text(json.dumps(result))

    try:
        src = folder / "tiny-f32.gguf"
        _write_tiny_gguf(src)
        import llama_cpp

        load_backends()
        llama_cpp.llama_backend_init()
        model_file = src
        if ftype != 0:
            model_file = folder / "tiny-probe.gguf"
            qparams = llama_cpp.llama_model_quantize_default_params()
            qparams.ftype = ftype
            qparams.nthread = 1
            qparams.pure = True
            if llama_cpp.llama_model_quantize(str(src).encode(), str(model_file).encode(), ctypes.byref(qparams)):
                raise RuntimeError(f"llama_model_quantize to type {ftype} failed")
        result.update(built=True, variant=loaded_variant())
        save()
    except Exception as exc:  # the probe reports, the daemon decides
        result.update(error=f"{type(exc).__name__}: {exc}")
        save()
        return 3
    mparams = llama_cpp.llama_model_default_params()
    mparams.use_extra_bufts = True
    model = llama_cpp.llama_model_load_from_file(str(model_file).encode(), mparams)
    if not model:
        result.update(error="llama.cpp could not load the probe model")
        save()
        return 4
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = 128
    cparams.n_batch = 32
    cparams.n_threads = cparams.n_threads_batch = max(1, min(4, os.cpu_count() or 1))
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    batch = llama_cpp.llama_batch_init(32, 0, 1)
    tokens = [1, *range(300, 331)]
    for step in range(4):
        chunk = tokens if step == 0 else [400 + step]
        base = 0 if step == 0 else len(tokens) + step - 1
        for i, tok in enumerate(chunk):
            batch.token[i] = tok
            batch.pos[i] = base + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if i == len(chunk) - 1 else 0
        batch.n_tokens = len(chunk)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            result.update(error="llama_decode failed")
            save()
            return 5
    result.update(decoded=True)
    save()
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return 0


if __name__ == "__main__":
    sys.exit(_probe_main(int(sys.argv[1]), Path(sys.argv[2])))
