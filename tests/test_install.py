"""install.sh: the llama.cpp build flavour it plans, the appliance install into a scratch root,
idempotence, uninstall that keeps data; bench/gpu_check.sh's syntax and its answer where there is no GPU."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

INSTALL = REPO / "install.sh"
GPU_CHECK = REPO / "bench" / "gpu_check.sh"
LLAMA_WHEEL_NAME = "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
LLAMA_SDIST_NAME = "llama_cpp_python-0.3.36.tar.gz"
# What the flavours must hand to cmake, $ORIGIN literally (cmake writes it into the libraries' RPATH).
CPU_ARGS = ("-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DCMAKE_INSTALL_BINDIR=llama_cpp/lib "
            "-DCMAKE_INSTALL_RPATH=$ORIGIN -DLLAVA_BUILD=OFF")
NATIVE_ARGS = ("-DGGML_NATIVE=ON -DGGML_BACKEND_DL=ON -DCMAKE_INSTALL_BINDIR=llama_cpp/lib "
               "-DCMAKE_INSTALL_RPATH=$ORIGIN -DLLAVA_BUILD=OFF")


def _run(*args: str, timeout: float = 900, env: dict[str, str] | None = None,
         path_first: Path | None = None) -> subprocess.CompletedProcess[str]:
    """install.sh ARGS with none of the caller's GARRISON_* settings; env adds some, path_first leads PATH."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GARRISON_", "VIRTUAL_ENV"))}
    clean.update(env or {})
    if path_first is not None:
        clean["PATH"] = f"{path_first}{os.pathsep}{clean.get('PATH', '')}"
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=timeout, env=clean)


def _fake_nvidia_smi(folder: Path, *, gpu: bool) -> Path:
    """A folder holding an nvidia-smi that lists an H200, or one that fails as it does without a driver."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    if gpu:
        script.write_text('#!/bin/sh\necho "GPU 0: NVIDIA H200 (UUID: GPU-x)"\n')
    else:
        script.write_text("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the "
                          "NVIDIA driver.\" >&2\nexit 9\n")
    script.chmod(0o755)
    return folder


def _plan(*args: str, env: dict[str, str] | None = None, gpu: bool = False, tmp: Path) -> dict[str, str]:
    bin_dir = _fake_nvidia_smi(tmp / ("gpu-bin" if gpu else "no-gpu-bin"), gpu=gpu)
    env = {"GARRISON_WHEELHOUSE": str(tmp / "wheels"), **(env or {})}
    proc = _run("--print-plan", *args, env=env, path_first=bin_dir, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines())


def test_plan_defaults_to_the_portable_cpu_build(tmp_path: Path) -> None:
    plan = _plan(tmp=tmp_path)
    assert plan["flavour"] == "cpu"
    assert plan["cmake_args"] == CPU_ARGS
    assert "GGML_CUDA" not in plan["cmake_args"]
    assert plan["wheel_cache"] == str(tmp_path / "wheels" / "llama-cpu")
    assert plan["llama_build"] == "build"
    assert plan["torch_requirement"] == "torch==2.13.0"
    assert not (tmp_path / "wheels").exists()  # a plan installs nothing, creates nothing


def test_plan_picks_cuda_where_nvidia_smi_lists_a_gpu(tmp_path: Path) -> None:
    plan = _plan(tmp=tmp_path, gpu=True)
    assert plan["flavour"] == "cuda"
    assert "NVIDIA H200" in plan["flavour_reason"]
    assert plan["cmake_args"] == CPU_ARGS + " -DGGML_CUDA=ON"
    assert plan["wheel_cache"] == str(tmp_path / "wheels" / "llama-cuda")
    # === refuses a local +cpu build of the same version: the index's CUDA wheel.
    assert plan["torch_requirement"] == "torch===2.13.0"
    assert plan["cuda_toolkit"]


def test_cpu_only_and_native_override_the_gpu(tmp_path: Path) -> None:
    plan = _plan("--cpu-only", tmp=tmp_path, gpu=True)
    assert plan["flavour"] == "cpu" and plan["cmake_args"] == CPU_ARGS
    plan = _plan("--native", tmp=tmp_path)
    assert plan["flavour"] == "native" and plan["cmake_args"] == NATIVE_ARGS
    assert plan["wheel_cache"] == str(tmp_path / "wheels" / "llama-native")


def test_flavour_from_the_environment(tmp_path: Path) -> None:
    assert _plan(env={"GARRISON_LLAMA_FLAVOUR": "native"}, tmp=tmp_path)["flavour"] == "native"
    assert _plan(env={"GARRISON_LLAMA_FLAVOUR": "cuda"}, tmp=tmp_path)["flavour"] == "cuda"
    assert _plan("--cpu-only", env={"GARRISON_LLAMA_FLAVOUR": "cuda"}, tmp=tmp_path, gpu=True)["flavour"] == "cpu"
    proc = _run("--print-plan", env={"GARRISON_LLAMA_FLAVOUR": "gpu"}, timeout=60)
    assert proc.returncode != 0
    assert "GARRISON_LLAMA_FLAVOUR must be cpu, native or cuda" in proc.stderr


def test_each_flavour_has_its_own_wheel_cache(tmp_path: Path) -> None:
    caches = {_plan(tmp=tmp_path)["wheel_cache"], _plan("--native", tmp=tmp_path)["wheel_cache"],
              _plan(tmp=tmp_path, gpu=True)["wheel_cache"]}
    assert len(caches) == 3


def test_a_wheel_from_before_the_flavours_is_not_reused(tmp_path: Path) -> None:
    # install.sh used to keep its (-march=native) wheel beside the sdist: the portable flavour must build anew.
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / LLAMA_WHEEL_NAME).write_bytes(b"native build")
    plan = _plan(tmp=tmp_path)
    assert plan["llama_wheel"] == "" and plan["llama_build"] == "build"
    (wheels / "llama-cpu").mkdir()
    (wheels / "llama-cpu" / LLAMA_WHEEL_NAME).write_bytes(b"portable build")
    plan = _plan(tmp=tmp_path)
    assert plan["llama_wheel"] == str(wheels / "llama-cpu" / LLAMA_WHEEL_NAME) and plan["llama_build"] == "reuse"
    assert _plan("--native", tmp=tmp_path)["llama_build"] == "build"


def test_offline_finds_the_flavour_in_the_bundle_layout(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "llama-cpu").mkdir(parents=True)
    (bundle / LLAMA_SDIST_NAME).write_bytes(b"sdist")
    (bundle / "llama-cpu" / LLAMA_WHEEL_NAME).write_bytes(b"portable build")
    plan = _plan("--offline", str(bundle), tmp=tmp_path)
    assert plan["flavour"] == "cpu" and plan["llama_build"] == "reuse"
    assert plan["llama_wheel"] == str(bundle / "llama-cpu" / LLAMA_WHEEL_NAME)
    # A GPU beside a bundle made without CUDA: the portable CPU build rather than a stop.
    plan = _plan("--offline", str(bundle), tmp=tmp_path, gpu=True)
    assert plan["flavour"] == "cpu" and "bundle holds only the cpu flavour" in plan["flavour_reason"]
    # Asked for explicitly, a flavour the bundle lacks is reported missing.
    plan = _plan("--offline", str(bundle), env={"GARRISON_LLAMA_FLAVOUR": "cuda"}, tmp=tmp_path)
    assert plan["flavour"] == "cuda" and plan["llama_build"] == "missing from the bundle"


def test_scripts_parse() -> None:
    for script in (INSTALL, GPU_CHECK):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_gpu_check_says_no_gpu_without_nvidia_smi(tmp_path: Path) -> None:
    bash = shutil.which("bash")
    assert bash
    empty = tmp_path / "bin"
    empty.mkdir()  # PATH with no nvidia-smi at all (nor anything else)
    proc = subprocess.run([bash, str(GPU_CHECK), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=60, env={"PATH": str(empty), "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "no GPU" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_help_and_unknown_option() -> None:
    assert _run("--help").returncode == 0
    proc = _run("--frobnicate")
    assert proc.returncode != 0
    assert "unknown option: --frobnicate" in proc.stderr


def test_offline_refuses_a_folder_that_is_not_a_bundle(tmp_path: Path) -> None:
    proc = _run("--offline", str(tmp_path))
    assert proc.returncode != 0
    assert "is not a Garrison bundle" in proc.stderr


@pytest.fixture(scope="module")
def system_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    proc = _run("--system", "--root", str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def test_system_install_lays_out_the_appliance(system_root: Path) -> None:
    opt, etc, units = system_root / "opt/garrison", system_root / "etc/garrison", system_root / "etc/systemd/system"
    version = subprocess.run([str(opt / "bin/garrison"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and "garrison" in version.stdout
    assert (opt / "share/garrison/llama.cpp/convert_hf_to_gguf.py").exists()
    assert (opt / "share/garrison/llama.cpp/gguf-py").is_dir()
    key = etc / "master.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(bytes.fromhex(key.read_text().strip())) == 32
    assert (etc / "garrison.toml").exists()
    assert (etc / "tls.crt").read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert stat.S_IMODE((etc / "tls.key").stat().st_mode) == 0o600  # 0640 group garrison on a real install
    for unit in ("garrison.service", "garrison-worker.service"):
        assert (units / unit).read_text() == (REPO / "systemd" / unit).read_text()
        assert (units / "multi-user.target.wants" / unit).is_symlink()
    assert stat.S_IMODE((system_root / "var/lib/garrison").stat().st_mode) == 0o700
    # The appliance's venv carries the serving set only: no torch beside the daemon.
    check = subprocess.run([str(opt / "bin/python"), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
                           capture_output=True, text=True)
    assert check.stdout.strip() == "None"


def test_system_install_is_idempotent_and_keeps_the_master_key(system_root: Path) -> None:
    key = (system_root / "etc/garrison/master.key").read_text()
    (system_root / "etc/garrison/garrison.toml").write_text('log_level = "debug"\n')
    proc = _run("--system", "--root", str(system_root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (system_root / "etc/garrison/master.key").read_text() == key
    assert (system_root / "etc/garrison/garrison.toml").read_text() == 'log_level = "debug"\n'
    assert "reusing cached wheel" in proc.stderr


def test_uninstall_keeps_data_unless_purged(system_root: Path) -> None:
    marker = system_root / "var/lib/garrison/catalog.db"
    marker.write_text("data")
    proc = _run("--system", "--uninstall", "--root", str(system_root))
    assert proc.returncode == 0, proc.stderr
    assert not (system_root / "opt/garrison").exists()
    assert not (system_root / "etc/systemd/system/garrison.service").exists()
    assert marker.exists() and (system_root / "etc/garrison/master.key").exists()
    proc = _run("--system", "--uninstall", "--purge", "--root", str(system_root))
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists() and not (system_root / "etc/garrison").exists()
