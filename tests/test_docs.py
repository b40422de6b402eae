"""Docs kept true by tests: the README's two commands, .ci/run, and the generated
references (API from /openapi.json, CLI from --help, configuration from the settings)."""

from __future__ import annotations

import re

import pytest
from conftest import REPO, run_cli


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.match(r"(?:<!--.*?-->\n)*```(?:sh|bash)?\n(.*?)\n```", text, re.S)  # markers are not rendered
    assert block, "README must open with a code block holding the two commands"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_starts_with_the_two_commands() -> None:
    commands = _readme_commands()
    assert len(commands) == 2
    assert "garrison quickstart" in commands[0] and "pytest" in commands[1]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert _readme_commands()[1] in ci


@pytest.mark.parametrize(("topic", "path"), [("api", "docs/api.md"), ("cli", "docs/cli.md"),
                                             ("config", "docs/configuration.md")])
def test_generated_reference_is_current(topic: str, path: str, tmp_path: object) -> None:
    generated = run_cli(REPO, "docs", topic).stdout
    current = (REPO / path).read_text()
    assert generated.strip() == current.strip(), f"{path} is stale: run `garrison docs {topic} > {path}`"


def test_exit_code_table_is_current() -> None:
    from garrison.exit_codes import BEGIN, END

    guide = (REPO / "docs" / "operator-guide.md").read_text()
    embedded = re.search(re.escape(BEGIN) + r".*?" + re.escape(END), guide, re.S)
    generated = run_cli(REPO, "docs", "exit-codes").stdout
    assert embedded, "docs/operator-guide.md lost its exit-code markers"
    assert embedded.group(0).strip() == generated.strip(), \
        "the exit codes in docs/operator-guide.md are stale: paste `garrison docs exit-codes` between the markers"
    for code in (6, 8, 10, 130):  # those the issue found missing, and the one a tampered model gives
        assert f"\n| {code} | " in generated
