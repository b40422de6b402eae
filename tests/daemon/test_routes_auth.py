"""Every route, read from the app's own router, refuses a missing key (401) and a key
without the route's scope (403); so routes added later are covered without edits."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from garrison.config import load_config
from garrison.daemon.app import create_app
from garrison.daemon.console.pages import PUBLIC_PATHS as CONSOLE_PUBLIC
from garrison.daemon.middleware import ROUTE_TABLE
from garrison.policies.scopes import ROLES


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    config = load_config("/dev/null", env={"GARRISON_STATE_DIR": str(tmp_path / "state"),
                                           "GARRISON_RUN_JOBS": "false"})
    app = create_app(config)
    async with TestClient(TestServer(app)) as c:
        yield c


def _routes(client: TestClient) -> list[tuple[str, str]]:
    found = []
    for route in client.app.router.routes():
        resource = route.resource
        assert resource is not None
        path = re.sub(r"{[^}]+}", "x_probe", resource.canonical)
        found.append((route.method, path))
    return found


def _code(path: str, body: dict[str, Any]) -> str:
    """The error's code: OpenAI's object, or Ollama's under /api/ (the message under "error", the code beside)."""
    return str(body["code"] if path.startswith("/api/") else body["error"]["code"])


def _role_without(scope: str) -> str:
    return next(role for role, scopes in ROLES.items() if scope not in scopes)


async def test_every_route_but_health_needs_a_key(client: TestClient) -> None:
    routes = _routes(client)
    assert len(routes) >= 10
    for method, path in routes:
        response = await client.request(method, path, allow_redirects=False)
        if path == "/health":
            assert response.status == 200
            continue
        if re.sub("x_probe", "{name}", path) in CONSOLE_PUBLIC:
            # The sign-in page and its files: no key, and nothing but signing in (tests/daemon/test_console.py).
            assert response.status in (200, 303, 401, 404), (method, path)
            continue
        body = await response.json()
        assert response.status == 401, (method, path, body)
        assert _code(path, body) == "missing_api_key"
        bad = await client.request(method, path, headers={"Authorization": "Bearer grs_wrong"})
        assert bad.status == 401, (method, path)
        assert _code(path, await bad.json()) == "invalid_api_key"


async def test_every_route_refuses_a_key_lacking_its_scope(client: TestClient) -> None:
    from garrison.daemon.state import STATE

    store = client.app[STATE].keys
    table = client.app[ROUTE_TABLE]
    checked = 0
    for route in client.app.router.routes():
        resource = route.resource
        assert resource is not None
        spec = table[(route.method, resource.canonical)]
        if spec.scope is None:
            assert resource.canonical == "/health" or resource.canonical in CONSOLE_PUBLIC
            continue
        _, secret = store.create(_role_without(spec.scope))
        path = re.sub(r"{[^}]+}", "x_probe", resource.canonical)
        response = await client.request(route.method, path, headers={"Authorization": f"Bearer {secret}"})
        body = await response.json()
        assert response.status == 403, (route.method, path, body)
        assert _code(path, body) == "insufficient_scope"
        assert path.startswith("/api/") or body["error"]["type"] == "invalid_request_error"
        checked += 1
    assert checked == len(table) - sum(1 for r in table.values() if r.scope is None)


async def test_unknown_routes_need_a_key_then_404(client: TestClient) -> None:
    from garrison.daemon.state import STATE

    _, secret = client.app[STATE].keys.create("read")
    assert (await client.get("/v1/nothing")).status == 401
    response = await client.get("/v1/nothing", headers={"Authorization": f"Bearer {secret}"})
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"
    wrong_method = await client.delete("/health", headers={"Authorization": f"Bearer {secret}"})
    assert wrong_method.status == 405
