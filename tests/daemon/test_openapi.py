"""/openapi.json is built from the route table and matches the router exactly."""

from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from garrison.config import load_config
from garrison.daemon.app import create_app
from garrison.daemon.state import STATE


async def test_openapi_matches_router(tmp_path: Path) -> None:
    config = load_config("/dev/null", env={"GARRISON_STATE_DIR": str(tmp_path), "GARRISON_RUN_JOBS": "0"})
    app = create_app(config)
    async with TestClient(TestServer(app)) as client:
        _, secret = app[STATE].keys.create("read")
        response = await client.get("/openapi.json", headers={"Authorization": f"Bearer {secret}"})
        assert response.status == 200
        spec = await response.json()
    assert spec["openapi"].startswith("3.1")
    documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    # The web console's pages are HTML, not API (docs/operator-guide.md "Web console"): not in the spec.
    routed = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.resource is not None and not r.resource.canonical.startswith("/console")}
    assert documented == routed
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert op["summary"], (method, path)
            if path == "/health":
                assert op["security"] == []
            else:
                assert op["x-garrison-scope"] and "401" in op["responses"] and "403" in op["responses"]
            for name in [p[1:-1] for p in path.split("/") if p.startswith("{")]:
                assert any(p["name"] == name and p["in"] == "path" for p in op["parameters"])
