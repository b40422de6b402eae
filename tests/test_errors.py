"""The error hierarchy's one mapping to exit codes holds over HTTP too: an error body received
by the CLI's client becomes an error with the exit code the same failure has in process."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

from garrison.errors import ConfigError, GarrisonError, IntegrityError, InvalidRequest, exit_code_for, from_http
from garrison.exit_codes import error_classes


def _raise_sites() -> list[tuple[str, type[GarrisonError], str]]:
    """(where, class, code) for every error built with a literal code in the package."""
    classes = {cls.__name__: cls for cls in error_classes()}
    sites = []
    for path in sorted((REPO / "garrison").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in classes:
                code = next((k.value for k in node.keywords if k.arg == "code"), None)
                if isinstance(code, ast.Constant) and isinstance(code.value, str):
                    where = f"{Path(path).relative_to(REPO)}:{node.lineno}"
                    sites.append((where, classes[node.func.id], code.value))
    return sites


def test_every_server_error_code_comes_back_with_its_exit_code() -> None:
    """500 is shared by configuration, catalog, integrity and job errors: their codes decide."""
    sites = [s for s in _raise_sites() if s[1].http_status == 500]
    assert len(sites) > 30
    wrong = [f"{where}: {cls.__name__}(code={code!r}) would exit {exit_code_for(received)}, not {cls.exit_code}"
             for where, cls, code in sites
             if exit_code_for(received := from_http(500, {"error": {"message": "m", "code": code}})) != cls.exit_code]
    assert not wrong, ("add these codes to CODES_SHARING_A_STATUS in garrison/errors.py (a code that two classes "
                       "raise cannot be told apart: give one of them its own code):\n" + "\n".join(wrong))


@pytest.mark.parametrize(("status", "code", "cls", "exit_code"), [
    (500, "artifact_hash_mismatch", IntegrityError, 8),
    (500, "signature_invalid", IntegrityError, 8),
    (500, "llama_cpp_missing", ConfigError, 2),
    (400, "master_key_invalid", InvalidRequest, 2),  # the same code at another status keeps the status's class
    (500, "something_new", GarrisonError, 1),
    (429, "rate_limit_exceeded", None, 6),
    (503, "engine_crashed", None, 10),
])
def test_from_http(status: int, code: str, cls: type[GarrisonError] | None, exit_code: int) -> None:
    error = from_http(status, {"error": {"message": "m", "code": code, "param": None}})
    assert error.code == code and exit_code_for(error) == exit_code
    if cls is not None:
        assert type(error) is cls


def test_every_class_status_maps_back() -> None:
    """Apart from 500 (decided by code) and 422 (conversions, which never reach a client: they are
    job failures), each class's HTTP status is known to the client."""
    for cls in error_classes():
        if cls.http_status not in (500, 422):
            assert exit_code_for(from_http(cls.http_status, {"error": {"code": cls.code}})) == cls.exit_code, cls
