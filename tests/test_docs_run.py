"""Docs that run: the `sh` blocks of README.md and docs/operator-guide.md, executed as written.

Each document's blocks run in order in one bash session (variables and a daemon started with
`garrison serve &` carry over, as for a reader at a terminal), from a scratch checkout (links to
this repository's files, so `$PWD/.venv/bin` and `garrison/data/...` resolve and what the steps
write lands in tmp_path) with a fresh state folder, home, configuration and port. The README's
session starts without `.venv/bin` on PATH: its own first line must put `garrison` there. A
command that fails, or a `garrison: error` anywhere in the output (an exit status that `$(...)`
hides), fails the test with the document's line.

Markers in a document's source, HTML comments that are not rendered, say what cannot run here:

    <!-- docs-run: skip (why) -->                        the next block is not run
    <!-- docs-run: replace "OLD" => "NEW" (why) -->      from here on, OLD is run as NEW

and a line whose comment says `not run: why` is shown, not run. Keep them few.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, free_port

DOCUMENTS = ("README.md", "docs/operator-guide.md")
_MARKER = re.compile(r"<!-- docs-run: (.*?) -->")
_SKIP = re.compile(r"skip \((.+)\)")
_REPLACE = re.compile(r'replace "(.+?)" => "(.*?)" \((.+)\)')
_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_NOT_RUN = re.compile(r"#.*\bnot run: \S")


@dataclass(frozen=True)
class Step:
    line: int  # in the document, 1-based
    command: str


def steps(document: Path) -> list[Step]:
    """The commands of the document's sh blocks, in order, as the markers say to run them."""
    text = document.read_text()
    events = sorted([*_MARKER.finditer(text), *_BLOCK.finditer(text)], key=lambda m: m.start())
    replacements: list[tuple[str, str]] = []
    skip_next = False
    found: list[Step] = []
    for event in events:
        if event.re is _MARKER:
            directive = event.group(1)
            if _SKIP.fullmatch(directive):
                skip_next = True
            elif replace := _REPLACE.fullmatch(directive):
                replacements.append((replace.group(1), replace.group(2)))
            else:
                raise AssertionError(f"{document.name}: unknown marker {event.group(0)!r}; see {__file__}")
            continue
        language, body = event.group(1), event.group(2)
        if skip_next or language not in ("sh", "bash"):
            skip_next = False
            continue
        first = text.count("\n", 0, event.start(2)) + 1
        pending: list[str] = []
        for offset, raw in enumerate(body.splitlines()):
            if not pending and (not raw.strip() or raw.lstrip().startswith("#") or _NOT_RUN.search(raw)):
                continue
            pending.append(raw)
            if raw.endswith("\\"):  # a continued command keeps its first line's number
                continue
            command = "\n".join(pending)
            for old, new in replacements:
                command = command.replace(old, new)
            found.append(Step(first + offset - len(pending) + 1, command))
            pending = []
    return found


def script(document: str, commands: list[Step]) -> str:
    lines = ["set -euo pipefail",
             # On any exit, the daemon a step started in the background goes too (it drains on SIGTERM).
             "trap 'trap - ERR; set +e; kill $(jobs -p) 2>/dev/null; wait' EXIT",
             f"trap 'echo \"docs-run: {document}:$DOCS_RUN_LINE exited $?\" >&2' ERR"]
    for step in commands:
        lines += [f"DOCS_RUN_LINE={step.line}", step.command]
    return "\n".join(lines) + "\n"


def scratch_checkout(root: Path) -> Path:
    """A folder that looks like the checkout (its entries are links), where the steps write their files."""
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name != ".git":
            (root / entry.name).symlink_to(entry)
    return root


def scratch_env(tmp_path: Path, test_model_root: Path, *, venv_on_path: bool) -> dict[str, str]:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(test_model_root)  # the session's tiny-model builds: seconds, not minutes
    venv_bin = str(REPO / ".venv" / "bin")
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != Path(venv_bin)]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GARRISON_") and k not in {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                                                          "VIRTUAL_ENV", "PYTHONPATH"}}
    env.update({"PATH": os.pathsep.join([venv_bin, *path] if venv_on_path else path),
                "HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "home" / ".config"),
                "GARRISON_STATE_DIR": str(tmp_path / "state"), "GARRISON_CONFIG": "/dev/null",
                "GARRISON_CACHE_DIR": str(cache), "GARRISON_LISTEN": f"127.0.0.1:{free_port()}",
                "GARRISON_JOB_POLL_S": "0.05", "GARRISON_JOB_HEARTBEAT_S": "0.2", "PYTHONUNBUFFERED": "1"})
    return env


def run_document(document: str, tmp_path: Path, test_model_root: Path, timeout_s: float = 600) -> str:
    commands = steps(REPO / document)
    assert commands, f"{document} has no runnable sh block"
    (tmp_path / "home").mkdir()
    cwd = scratch_checkout(tmp_path / "checkout")
    env = scratch_env(tmp_path, test_model_root, venv_on_path=document != "README.md")
    (tmp_path / "steps.sh").write_text(script(document, commands))
    log = tmp_path / "output.log"
    with log.open("wb") as out:  # a file, not a pipe: a daemon left in the background cannot hold it open
        proc = subprocess.Popen(["bash", str(tmp_path / "steps.sh")], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            with contextlib.suppress(ProcessLookupError):  # what the steps left running (this session only)
                os.killpg(proc.pid, signal.SIGTERM if code is not None else signal.SIGKILL)
            proc.wait(timeout=60)
    output = log.read_text(errors="replace")
    tail = "\n".join(line[:240] for line in output.splitlines() if "level=" not in line)[-3000:]  # no daemon logs
    failed = re.search(r"docs-run: (\S+:\d+) exited (\d+)", output)
    where = failed.group(1) if failed else document
    command = next((s.command for s in commands if f"{document}:{s.line}" == where), "")
    assert code == 0, f"{where}: `{command}` failed (exit {failed.group(2) if failed else code}):\n{tail}"
    errors = re.findall(r"^garrison: error .*$", output, re.M)
    assert not errors, f"{document}: a command reported an error that its exit status did not show: {errors}"
    return output


@pytest.mark.parametrize("document", DOCUMENTS)
def test_documented_steps_run_as_written(document: str, tmp_path: Path, test_model_root: Path,
                                         tiny_llama_dir: Path) -> None:
    if document == "README.md" and shutil.which("age") is None:
        pytest.fail("the README seals with Debian's age: install it (apt install age; ./install.sh does)")
    output = run_document(document, tmp_path, test_model_root)
    if document == "README.md":  # the steps did what their comments say
        assert re.search(r"support:1: 60 records accepted, 0 refused", output), output[-2000:]
        assert "garrison-tiny-ft-demo:lora" in output


def test_markers_are_understood() -> None:
    """Every document's markers parse, and what they skip is said and justified in the source."""
    for document in DOCUMENTS:
        text = (REPO / document).read_text()
        for marker in _MARKER.finditer(text):
            assert _SKIP.fullmatch(marker.group(1)) or _REPLACE.fullmatch(marker.group(1)), marker.group(0)
        assert steps(REPO / document)
    readme = steps(REPO / "README.md")
    assert readme[0].command.startswith('export PATH="$PWD/.venv/bin:$PATH"')
    assert not any(s.command.startswith("./install.sh") for s in readme)  # its opening block is skipped
