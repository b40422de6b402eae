#!/usr/bin/env bash
# The GPU paths, proved in one short run on a machine with an NVIDIA GPU (install issue 12). Not a test.
#
#   bench/gpu_check.sh [--python PY] [--llama-wheel WHL | --build-llama SDIST_OR_DIR] [--out DIR] [--no-results-md]
#
# Steps, each under its own `timeout`, each reported ok / FAIL / skip:
#   1. nvidia-smi: the GPUs, the driver, the CUDA version it runs (no nvidia-smi or no GPU: says so, exit 0)
#   2. install.sh --print-plan: which llama.cpp flavour and CUDA toolkit the installer would pick here
#   3. llama.cpp: loads the installed llama-cpp-python's backends the way Garrison does
#      (ggml_backend_load_all_from_path on site-packages/llama_cpp/lib), lists them, needs a CUDA one, and runs
#      one F32 matmul on the CUDA device through ggml, checked against numpy. --llama-wheel checks a wheel
#      instead of the installed package; --build-llama first builds one here (CUDA for this GPU only and the
#      native CPU backend, all cores; minutes: give it GPU_CHECK_BUILD_TIMEOUT seconds, default 420).
#   4. serving with GPU offload: TODO, see below
#   5. torch: CUDA visible, a bf16 matmul checked against fp32 and timed
#   6. NCCL: torchrun over NCCL with an all_reduce, 2 ranks where there are 2 GPUs or more (else 1 rank)
# Figures go to bench/out/gpu_check/ (--out DIR elsewhere; at most 8 files: nvidia_smi.txt, gpu_check.log
# with every step's output, summary.json, one JSON per check) and a dated section is appended to
# bench/RESULTS.md (also left in the out folder as results_section.md). Exit 0 when no step failed.
# About a minute without --build-llama; every step is capped, the whole under 8 minutes.
set -euo pipefail

case "${BASH_SOURCE[0]}" in */*) BENCH="${BASH_SOURCE[0]%/*}" ;; *) BENCH="." ;; esac
BENCH="$(cd "$BENCH" && pwd)"
REPO="$(cd "$BENCH/.." && pwd)"
PY=""
LLAMA_WHEEL=""
BUILD_SRC=""
OUT_DIR="$BENCH/out/gpu_check"
RESULTS_MD=1
NVSMI="${GPU_CHECK_NVIDIA_SMI:-nvidia-smi}"

while [ $# -gt 0 ]; do
    case "$1" in
        --python) PY="${2:?--python needs an interpreter}"; shift ;;
        --llama-wheel) LLAMA_WHEEL="${2:?--llama-wheel needs a wheel}"; shift ;;
        --build-llama) BUILD_SRC="${2:?--build-llama needs an sdist or a source folder}"; shift ;;
        --out) OUT_DIR="${2:?--out needs a folder}"; shift ;;
        --no-results-md) RESULTS_MD=0 ;;
        -h|--help) while IFS= read -r line; do
                       case "$line" in "#!"*) ;; "#"*) line="${line#\#}"; echo "${line# }" ;; *) break ;; esac
                   done < "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_check: unknown option: $1" >&2; exit 2 ;;
    esac
    shift
done

# Before anything that needs a tool: a machine without NVIDIA's driver has nothing to check.
if ! command -v "$NVSMI" >/dev/null 2>&1; then
    echo "gpu_check: no GPU here: $NVSMI not found (no NVIDIA driver); nothing to check"
    exit 0
fi
if ! GPU_LIST="$(timeout 30 "$NVSMI" -L 2>&1)" || ! grep -q '^GPU [0-9]' <<<"$GPU_LIST"; then
    echo "gpu_check: no GPU here: $NVSMI -L lists none ($(head -n 1 <<<"$GPU_LIST"))"
    exit 0
fi
N_GPUS="$(grep -c '^GPU [0-9]' <<<"$GPU_LIST")"

if [ -z "$PY" ]; then
    if "$REPO/.venv/bin/python" -c 'pass' 2>/dev/null; then PY="$REPO/.venv/bin/python"; else PY="python3"; fi
fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
STARTED="$(date +%s)"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"

NAMES=()
declare -A STATUS NOTE
record() { NAMES+=("$1"); STATUS[$1]="$2"; NOTE[$1]="$3"; printf '== %s: %s %s\n' "$1" "$2" "${3:+($3)}"; }
run_step() {
    # run_step NAME SECONDS CMD...: runs CMD under timeout, records ok, or FAIL with the reason.
    # Every step's output also goes to $OUT_DIR/gpu_check.log; a failure's note is its last line.
    local name="$1" limit="$2" rc last
    shift 2
    echo "-- $name (at most ${limit}s): $*" | tee -a "$LOG"
    set +e
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/step.log"
    rc="${PIPESTATUS[0]}"
    set -e
    cat "$WORK/step.log" >> "$LOG"
    last="$(grep -v '^[[:space:]]*$' "$WORK/step.log" | tail -n 1 | tr '|' '/' | cut -c1-160 || true)"
    if [ "$rc" -eq 0 ]; then record "$name" ok ""
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then record "$name" FAIL "timed out after ${limit}s"
    else record "$name" FAIL "exit $rc: $last"; fi
}

# ---- 1. nvidia-smi ---------------------------------------------------------------------------------
export NVSMI OUT_DIR WORK
# shellcheck disable=SC2016
run_step nvidia-smi 60 bash -c 'set -o pipefail; "$NVSMI" | tee "$OUT_DIR/nvidia_smi.txt" && "$NVSMI" --format=csv,noheader \
    --query-gpu=index,name,memory.total,driver_version,compute_cap | tee "$WORK/gpus.csv" >> "$OUT_DIR/nvidia_smi.txt"'
DRIVER_CUDA="$(sed -n 's/.*CUDA Version: *\([0-9][0-9.]*\).*/\1/p' "$OUT_DIR/nvidia_smi.txt" 2>/dev/null | head -n 1 || true)"
COMPUTE_CAP="$(cut -d, -f5 "$WORK/gpus.csv" 2>/dev/null | head -n 1 | tr -d ' .' || true)"

# ---- 2. what install.sh would do here ----------------------------------------------------------------
run_step install-plan 60 bash "$REPO/install.sh" --print-plan

# ---- 3. llama.cpp's CUDA backend -------------------------------------------------------------------
cat > "$WORK/ggml_check.py" <<'PYEOF'
"""List llama.cpp's backends the way Garrison loads them, and run one matmul on the wanted device."""
import ctypes, glob, json, os, sys, time

lib_dir, want, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
result = {"lib_dir": lib_dir, "want": want, "preloaded": []}
# libggml-cuda.so needs libcudart/libcublas; its RPATH is $ORIGIN only. PyPI's CUDA runtime
# (site-packages/nvidia/cu13/lib) is found only when loaded first: GPU_CHECK_PRELOAD=1 does that.
if os.environ.get("GPU_CHECK_PRELOAD") == "1":
    for name in ("libcudart.so.*", "libcublasLt.so.*", "libcublas.so.*"):
        for d in sys.path:
            for f in sorted(glob.glob(os.path.join(d, "nvidia", "*", "lib", name))):
                if ".alt." not in f:
                    ctypes.CDLL(f, mode=ctypes.RTLD_GLOBAL)
                    result["preloaded"].append(f)
g = ctypes.CDLL(os.path.join(lib_dir, "libggml.so"), mode=ctypes.RTLD_GLOBAL)
vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t


def fn(name, restype, *argtypes):
    f = getattr(g, name)
    f.restype, f.argtypes = restype, list(argtypes)
    return f


fn("ggml_backend_load_all_from_path", None, cp)(lib_dir.encode())
reg_get, reg_name = fn("ggml_backend_reg_get", vp, sz), fn("ggml_backend_reg_name", cp, vp)
result["backends"] = [reg_name(reg_get(i)).decode() for i in range(fn("ggml_backend_reg_count", sz)())]
dev_get = fn("ggml_backend_dev_get", vp, sz)
dev_name, dev_desc = fn("ggml_backend_dev_name", cp, vp), fn("ggml_backend_dev_description", cp, vp)
dev_memory = fn("ggml_backend_dev_memory", None, vp, ctypes.POINTER(sz), ctypes.POINTER(sz))
devices = []
for i in range(fn("ggml_backend_dev_count", sz)()):
    free, total = sz(), sz()
    dev_memory(dev_get(i), ctypes.byref(free), ctypes.byref(total))
    devices.append({"name": dev_name(dev_get(i)).decode(), "description": dev_desc(dev_get(i)).decode(),
                    "memory_total_gib": round(total.value / 2**30, 1)})
result["devices"] = devices
print("backends:", ", ".join(result["backends"]))
for dv in devices:
    print(f"device: {dv['name']}: {dv['description']} ({dv['memory_total_gib']} GiB)")
target = next((i for i, dv in enumerate(devices) if dv["name"].upper().startswith(want.upper())), None)
result["found"] = target is not None
if target is None:
    why = "no libggml-cuda.so in the lib folder: not a CUDA build"
    if os.path.exists(os.path.join(lib_dir, "libggml-cuda.so")):
        try:  # the loader's own reason, such as a CUDA runtime library it cannot find
            ctypes.CDLL(os.path.join(lib_dir, "libggml-cuda.so"))
            why = "libggml-cuda.so loads but registers no device"
        except OSError as err:
            why = f"libggml-cuda.so does not load: {err}"
    result["why"] = why
    json.dump(result, open(out_path, "w"), indent=2)
    sys.exit(f"no {want} device among {', '.join(dv['name'] for dv in devices) or 'none'}: {why}")


class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", sz), ("mem_buffer", vp), ("no_alloc", ctypes.c_bool)]


# One F32 matmul through ggml's graph API on that device, checked against numpy, then timed.
import numpy as np

n = int(os.environ.get("GPU_CHECK_GGML_N", "2048"))
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n), dtype=np.float32)  # ggml: ne0 = K (contiguous), ne1 = M
b = rng.standard_normal((n, n), dtype=np.float32)  # ne0 = K, ne1 = N
backend = fn("ggml_backend_dev_init", vp, vp, cp)(dev_get(target), None)
if not backend:
    sys.exit(f"ggml_backend_dev_init failed for {devices[target]['name']}")
ctx = fn("ggml_init", vp, InitParams)(InitParams(fn("ggml_tensor_overhead", sz)() * 8 + fn("ggml_graph_overhead", sz)(), None, True))
new_2d = fn("ggml_new_tensor_2d", vp, vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
ta, tb = new_2d(ctx, 0, n, n), new_2d(ctx, 0, n, n)  # type 0: GGML_TYPE_F32
tc = fn("ggml_mul_mat", vp, vp, vp, vp)(ctx, ta, tb)  # c[j][i] = sum_k a[i][k] b[j][k]: c = b @ a.T
graph = fn("ggml_new_graph", vp, vp)(ctx)
fn("ggml_build_forward_expand", None, vp, vp)(graph, tc)
buf = fn("ggml_backend_alloc_ctx_tensors", vp, vp, vp)(ctx, backend)
tensor_set = fn("ggml_backend_tensor_set", None, vp, vp, sz, sz)
tensor_set(ta, a.ctypes.data, 0, a.nbytes)
tensor_set(tb, b.ctypes.data, 0, b.nbytes)
compute = fn("ggml_backend_graph_compute", ctypes.c_int, vp, vp)
status = compute(backend, graph)
c = np.empty((n, n), dtype=np.float32)
fn("ggml_backend_tensor_get", None, vp, vp, sz, sz)(tc, c.ctypes.data, 0, c.nbytes)
ref = b @ a.T
err = float(np.abs(c - ref).max() / np.abs(ref).max())
runs = 20
started = time.perf_counter()
for _ in range(runs):
    compute(backend, graph)
fn("ggml_backend_synchronize", None, vp)(backend)
seconds = (time.perf_counter() - started) / runs
fn("ggml_backend_buffer_free", None, vp)(buf)
fn("ggml_free", None, vp)(ctx)
fn("ggml_backend_free", None, vp)(backend)
result["matmul"] = {"device": devices[target]["name"], "n": n, "dtype": "f32", "status": status,
                    "max_rel_err": err, "ms": round(seconds * 1e3, 3), "tflops": round(2 * n**3 / seconds / 1e12, 2)}
print(f"ggml F32 matmul {n}^3 on {devices[target]['name']}: status {status}, max rel err {err:.1e}, "
      f"{seconds * 1e3:.2f} ms, {2 * n**3 / seconds / 1e12:.1f} TFLOP/s")
json.dump(result, open(out_path, "w"), indent=2)
if status != 0 or not err < 1e-3:
    sys.exit("the matmul's result is wrong")
PYEOF

llama_lib_dir() {
    # The llama_cpp/lib folder to check: from --llama-wheel, a --build-llama build, or the installed package.
    if [ -n "$LLAMA_WHEEL" ]; then
        "$PY" -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); z.extractall(sys.argv[2], [m for m in z.namelist() if m.startswith("llama_cpp/lib/")])' \
            "$LLAMA_WHEEL" "$WORK/wheel" && echo "$WORK/wheel/llama_cpp/lib"
    else
        "$PY" -c 'import importlib.util, os; s = importlib.util.find_spec("llama_cpp"); print(os.path.join(list(s.submodule_search_locations)[0], "lib") if s else "")' 2>/dev/null || true
    fi
}

use_cuda_toolkit() {
    # A complete CUDA toolkit (nvcc and cuBLAS) for the build, as install.sh looks for one: the nvcc on PATH,
    # /usr/local/cuda, else PyPI's toolkit in $PY's site-packages (nvidia/cu13), given the layout that nvcc and
    # CMake expect (install.sh's complete_pip_toolkit does the same).
    local nvcc root lib
    nvcc="$(command -v nvcc 2>/dev/null || true)"
    for root in "${CUDAToolkit_ROOT:-}" "${nvcc:+$(dirname "$(dirname "$(readlink -f "$nvcc")")")}" /usr/local/cuda \
                "$("$PY" -c 'import os, site; print(next((os.path.join(d, "nvidia", "cu13") for d in site.getsitepackages() if os.path.isdir(os.path.join(d, "nvidia", "cu13"))), ""))' 2>/dev/null || true)"; do
        if [ -z "$root" ] || [ ! -x "$root/bin/nvcc" ] || [ ! -f "$root/include/cublas_v2.h" ]; then continue; fi
        case "$root" in
            */nvidia/cu13)
                ln -sfn lib "$root/lib64"
                mkdir -p "$root/targets/x86_64-linux"
                ln -sfn ../../include "$root/targets/x86_64-linux/include"
                ln -sfn ../../lib "$root/targets/x86_64-linux/lib"
                for lib in "$root"/lib/lib*.so.[0-9]*; do
                    case "$lib" in *.alt.so*|*builtins*) continue ;; esac
                    [ ! -e "$lib" ] || ln -sfn "$(basename "$lib")" "$root/lib/$(basename "${lib%%.so.*}").so"
                done ;;
        esac
        if [ -e "$root/lib64/libcublas.so" ] || [ -e "$root/lib/libcublas.so" ]; then
            export CUDAToolkit_ROOT="$root" CUDACXX="$root/bin/nvcc"
            echo "gpu_check: CUDA toolkit for the build: $root"
            return 0
        fi
    done
    echo "gpu_check: no complete CUDA toolkit (nvcc with cuBLAS) found; letting CMake look for one"
}

if [ -n "$BUILD_SRC" ]; then
    # CUDA for this GPU only (sm_$COMPUTE_CAP, no PTX to JIT) and the native CPU backend: the shortest build
    # that has a real libggml-cuda.so. Needs scikit-build-core, cmake and nvcc in $PY's environment.
    # shellcheck disable=SC2016
    BUILD_ARGS='-DGGML_NATIVE=ON -DGGML_BACKEND_DL=ON -DGGML_CUDA=ON -DCMAKE_INSTALL_BINDIR=llama_cpp/lib -DCMAKE_INSTALL_RPATH=$ORIGIN -DLLAVA_BUILD=OFF'
    BUILD_ARGS="$BUILD_ARGS -DCMAKE_CUDA_ARCHITECTURES=${COMPUTE_CAP:-90}-real"
    use_cuda_toolkit
    mkdir -p "$WORK/built"
    run_step llama-build "${GPU_CHECK_BUILD_TIMEOUT:-420}" env CMAKE_ARGS="$BUILD_ARGS" \
        CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$PY" -m pip wheel -q --no-build-isolation --no-deps --no-cache-dir \
        "$BUILD_SRC" -w "$WORK/built"
    LLAMA_WHEEL="$(ls "$WORK"/built/llama_cpp_python-*.whl 2>/dev/null | head -n 1 || true)"
fi

LIB_DIR="$(llama_lib_dir)"
if [ -z "$LIB_DIR" ] || [ ! -f "$LIB_DIR/libggml.so" ]; then
    record llama-cuda-backend skip "no llama-cpp-python for $PY (install one, or give --llama-wheel / --build-llama)"
else
    # First as Garrison would load it with nothing preloaded; if no CUDA device shows, again with PyPI's
    # CUDA runtime preloaded: the difference says whether the Python side must preload it.
    run_step llama-cuda-backend 180 env GPU_CHECK_PRELOAD=0 "$PY" "$WORK/ggml_check.py" "$LIB_DIR" CUDA "$OUT_DIR/llama_cuda.json"
    if [ "${STATUS[llama-cuda-backend]}" != ok ] && [ -f "$LIB_DIR/libggml-cuda.so" ]; then
        run_step llama-cuda-backend-preloaded 180 env GPU_CHECK_PRELOAD=1 "$PY" "$WORK/ggml_check.py" "$LIB_DIR" CUDA "$OUT_DIR/llama_cuda_preloaded.json"
    fi
fi

# ---- 4. serving with GPU offload ---------------------------------------------------------------------
# TODO(gpu): bench/serving.py (and serve_throughput.py under it) has no GPU offload option yet: its servers
# run with --threads CPU threads only. When it takes one, run it here, such as:
#   "$PY" bench/serving.py --quick --clients 1,8 --rounds 1 --gpu-layers 99
record serving-gpu-offload skip "TODO: bench/serving.py has no GPU offload option yet"

# ---- 5. torch: bf16 matmul ---------------------------------------------------------------------------
cat > "$WORK/torch_check.py" <<'PYEOF'
import json, sys, torch

out = {"torch": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available()}
if not out["available"]:
    json.dump(out, open(sys.argv[1], "w"), indent=2)
    sys.exit(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
out["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
torch.manual_seed(0)
a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
b = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
ref = a.float() @ b.float()
err = ((a @ b).float() - ref).abs().max().item() / ref.abs().max().item()
n = 8192
x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    x @ y
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
runs = 10
start.record()
for _ in range(runs):
    x @ y
end.record()
torch.cuda.synchronize()
ms = start.elapsed_time(end) / runs
out["bf16_matmul"] = {"check_n": 4096, "max_rel_err_vs_fp32": err, "n": n, "ms": round(ms, 3),
                      "tflops": round(2 * n**3 / (ms / 1e3) / 1e12, 1)}
print(f"torch {torch.__version__} CUDA {torch.version.cuda} on {out['devices'][0]}: bf16 max rel err {err:.1e}; "
      f"{n}^3 bf16 matmul {ms:.2f} ms = {out['bf16_matmul']['tflops']} TFLOP/s")
json.dump(out, open(sys.argv[1], "w"), indent=2)
if not err < 2e-2:
    sys.exit("bf16 matmul disagrees with fp32")
PYEOF
if "$PY" -c 'import torch' 2>/dev/null; then
    run_step torch-bf16-matmul 180 "$PY" "$WORK/torch_check.py" "$OUT_DIR/torch_cuda.json"
else
    record torch-bf16-matmul skip "no torch for $PY"
fi

# ---- 6. NCCL all_reduce through torchrun -------------------------------------------------------------
cat > "$WORK/nccl_check.py" <<'PYEOF'
import json, os, sys, time, torch, torch.distributed as dist

dist.init_process_group("nccl")
rank, world = dist.get_rank(), dist.get_world_size()
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
t = torch.full((64 << 18,), float(rank + 1), device="cuda")  # 64 MiB of fp32
dist.all_reduce(t)
ok = bool((t == world * (world + 1) / 2).all().item())
torch.cuda.synchronize()
started = time.perf_counter()
for _ in range(10):
    dist.all_reduce(t)
torch.cuda.synchronize()
seconds = (time.perf_counter() - started) / 10
if rank == 0:
    nccl = torch.cuda.nccl.version()
    busbw = t.numel() * 4 * 2 * (world - 1) / world / seconds / 1e9
    json.dump({"world_size": world, "correct": ok, "bytes": t.numel() * 4, "ms": round(seconds * 1e3, 3),
               "bus_gb_s": round(busbw, 1), "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)},
              open(sys.argv[1], "w"), indent=2)
print(f"rank {rank}/{world}: all_reduce {'ok' if ok else 'WRONG'}, {seconds * 1e3:.2f} ms per 64 MiB")
dist.destroy_process_group()
sys.exit(0 if ok else 1)
PYEOF
if "$PY" -c 'import torch, torch.distributed as d; assert torch.cuda.is_available() and d.is_nccl_available()' 2>/dev/null; then
    RANKS=$(( N_GPUS >= 2 ? 2 : 1 ))
    run_step "nccl-all-reduce-${RANKS}rank" 180 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$RANKS" \
        "$WORK/nccl_check.py" "$OUT_DIR/nccl.json"
else
    record nccl-all-reduce skip "no CUDA torch with NCCL for $PY"
fi

# ---- summary -----------------------------------------------------------------------------------------
FAILED=0
ROWS=""
JSON_STEPS=""
for name in "${NAMES[@]}"; do
    [ "${STATUS[$name]}" != FAIL ] || FAILED=1
    ROWS+="| $name | ${STATUS[$name]} | ${NOTE[$name]} |"$'\n'
    note="${NOTE[$name]//\\/}"
    JSON_STEPS+="${JSON_STEPS:+, }\"$name\": {\"status\": \"${STATUS[$name]}\", \"note\": \"${note//\"/\'}\"}"
done
ELAPSED=$(( $(date +%s) - STARTED ))
GPU_NAME="$(head -n 1 <<<"$GPU_LIST" | sed 's/^GPU [0-9]*: //; s/ (UUID.*//')"
printf '{"date": "%s", "gpus": %s, "first_gpu": "%s", "driver_cuda": "%s", "python": "%s", "seconds": %s, "steps": {%s}}\n' \
    "$(date -u +%FT%TZ)" "$N_GPUS" "$GPU_NAME" "$DRIVER_CUDA" "$PY" "$ELAPSED" "$JSON_STEPS" > "$OUT_DIR/summary.json"

figures="$("$PY" - "$OUT_DIR" <<'PYEOF' 2>/dev/null || true
import json, os, sys
d = sys.argv[1]
def load(name):
    try:
        return json.load(open(os.path.join(d, name)))
    except (OSError, ValueError):
        return None
for name in ("llama_cuda.json", "llama_cuda_preloaded.json"):
    r = load(name)
    if r and r.get("matmul"):
        m = r["matmul"]
        pre = " (CUDA runtime preloaded)" if r.get("preloaded") else ""
        print(f"- llama.cpp backends {', '.join(r['backends'])}{pre}; ggml F32 matmul {m['n']}^3 on {m['device']}: "
              f"{m['ms']} ms, {m['tflops']} TFLOP/s, max rel err {m['max_rel_err']:.1e}")
r = load("torch_cuda.json")
if r and r.get("bf16_matmul"):
    m = r["bf16_matmul"]
    print(f"- torch {r['torch']} (CUDA {r['cuda']}): bf16 {m['n']}^3 matmul {m['ms']} ms = {m['tflops']} TFLOP/s, "
          f"max rel err vs fp32 {m['max_rel_err_vs_fp32']:.1e}")
r = load("nccl.json")
if r:
    print(f"- NCCL {r['nccl']} all_reduce, {r['world_size']} rank(s), 64 MiB: {r['ms']} ms, bus {r['bus_gb_s']} GB/s, "
          f"{'correct' if r['correct'] else 'WRONG'}")
PYEOF
)"
{
    echo
    echo "## GPU check (install issue 12), $(date -u +%F)"
    echo
    echo "\`bench/gpu_check.sh\` on $N_GPUS x $GPU_NAME (driver runs CUDA ${DRIVER_CUDA:-?}), $PY, ${ELAPSED} s."
    echo
    echo "| step | result | note |"
    echo "|---|---|---|"
    printf '%s' "$ROWS"
    if [ -n "$figures" ]; then echo; echo "$figures"; fi
} > "$OUT_DIR/results_section.md"
if [ "$RESULTS_MD" -eq 1 ]; then cat "$OUT_DIR/results_section.md" >> "$BENCH/RESULTS.md"; fi

echo
cat "$OUT_DIR/results_section.md"
echo
echo "gpu_check: figures in $OUT_DIR$([ "$RESULTS_MD" -eq 0 ] || echo "; section appended to bench/RESULTS.md")"
exit "$FAILED"
