"""install.sh: the appliance install into a scratch root, idempotence, uninstall that keeps data."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

INSTALL = REPO / "install.sh"


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GARRISON_", "VIRTUAL_ENV"))}
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=timeout, env=env)


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
