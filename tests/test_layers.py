"""The layers of ARCHITECTURE.md hold: import-linter's contracts in pyproject.toml, run as a test."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_import_contracts_hold() -> None:
    lint = REPO / ".venv" / "bin" / "lint-imports"
    command = [str(lint)] if lint.exists() else [sys.executable, "-m", "importlinter.cli"]
    result = subprocess.run([*command, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_converters_and_training_do_not_import_each_other() -> None:
    """The cycle the review found (export <-> fine-tune job code) stays gone, lazy imports included."""
    import grimp

    graph = grimp.build_graph("garrison")
    for source, target in (("garrison.converters", "garrison.training"), ("garrison.training", "garrison.converters")):
        assert not graph.chain_exists(importer=source, imported=target, as_packages=True), f"{source} imports {target}"
