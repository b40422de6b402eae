"""The peers of the serving benchmark: llama.cpp's own `llama-server`, built here from source.

Nothing can be downloaded on the appliance, and the only llama.cpp source on the machine is
the one vendored in the llama-cpp-python source distribution that install.sh caches. Building
`llama-server` from that exact tree means the peer runs the same llama.cpp revision as
Garrison's runtime, so a throughput gap is the serving layer's and not a kernel difference.
The build takes minutes on 2 cores, so it is cached under ~/.cache/garrison/bench/ keyed by
the sdist's name and the build options, and a crash mid-build leaves no half binary.

    .venv/bin/python bench/peers.py [TOOL...]    # build (or locate) llama-server (or TOOLS), print paths
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from garrison.paths import cache_dir

SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"
VENDOR_PREFIX = "vendor/llama.cpp/"

# LLAMA_CURL is deprecated (ignored) at this revision; OPENSSL off keeps the build free of TLS deps.
# The web UI would otherwise be fetched from a Hugging Face bucket at build time: off, no network.
# The CPU kernels are built as install.sh builds Garrison's (every variant, loaded at run time), so the
# peer runs the same kernels and a comparison measures the servers, not the compilers' flags.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DGGML_BACKEND_DL=ON",
    "-DGGML_CPU_ALL_VARIANTS=ON",
    "-DBUILD_SHARED_LIBS=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
)


def bench_cache() -> Path:
    """Benchmark artifacts (peer binaries, the stand-in model), built once per machine."""
    return cache_dir() / "bench"


def sdist_path() -> Path:
    """The llama-cpp-python source distribution install.sh keeps in its wheel cache."""
    override = os.environ.get("GARRISON_LLAMA_SDIST")
    path = Path(override) if override else cache_dir() / "wheels" / SDIST_NAME
    if not path.exists():
        raise FileNotFoundError(f"llama-cpp-python source distribution not found at {path}; run ./install.sh "
                                "(or set GARRISON_LLAMA_SDIST)")
    return path


def _build_key(sdist: Path) -> str:
    """Rebuild when the sdist or the options change, not when a file's mtime does."""
    digest = hashlib.sha256(f"{sdist.name}:{sdist.stat().st_size}:{' '.join(CMAKE_OPTIONS)}".encode())
    return digest.hexdigest()[:12]


def _extract_llama_cpp(sdist: Path, dest: Path) -> None:
    """Unpack only vendor/llama.cpp (the sdist also carries the Python package and its own vendor tree)."""
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            parts = member.name.split("/", 1)
            if len(parts) == 2 and parts[1].startswith(VENDOR_PREFIX):
                member.name = parts[1][len(VENDOR_PREFIX):]
                if member.name:
                    members.append(member)
        tar.extractall(dest, members=members, filter="data")


# Targets worth building from the vendored tree: the server peer, the reference decode and batched
# benchmarks (the ceiling a server can reach), and the importance-matrix tool quantize_gguf can use.
TOOLS = ("llama-server", "llama-bench", "llama-batched-bench", "llama-imatrix", "llama-quantize")


def ensure_llama_server(log: Path | None = None) -> Path:
    """Path of a `llama-server` built from the vendored llama.cpp; builds it the first time."""
    return ensure_llama_tool("llama-server", log)


def ensure_llama_tool(target: str, log: Path | None = None) -> Path:
    """Path of llama.cpp tool `target` built from the vendored source (one shared build tree)."""
    if target not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {target!r}; choose from {', '.join(TOOLS)}")
    sdist = sdist_path()
    root = bench_cache() / f"llama.cpp-{_build_key(sdist)}"
    # Used in place: the tools load their CPU variant libraries from their own folder.
    binary = root / "build" / "bin" / target
    if binary.exists():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():
            return binary
        src = root / "src"
        if not (src / "CMakeLists.txt").exists():
            shutil.rmtree(src, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=".src.", dir=root))
            _extract_llama_cpp(sdist, tmp)
            os.replace(tmp, src)
        build = root / "build"
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")
        env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": jobs}
        log_path = log or root / "build.log"
        with log_path.open("ab") as out:
            for cmd in (["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", *CMAKE_OPTIONS],
                        ["cmake", "--build", str(build), "--target", target, "-j", jobs]):
                out.write(f"$ {' '.join(cmd)}\n".encode())
                out.flush()
                proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
                if proc.returncode != 0:
                    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
                    raise RuntimeError(f"building {target} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return binary


def main() -> None:
    targets = sys.argv[1:] or ["llama-server"]
    for target in targets:
        print(ensure_llama_tool(target))


if __name__ == "__main__":
    main()
