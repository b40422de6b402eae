"""Canary: records carrying a unique string are ingested through every delivery path (inbox drop of a
file sealed by Debian's age, the sealed HTTP upload, OpenAI's /v1/files); then a raw byte search of
the whole state folder and of the temporary folder finds the string nowhere, nor in the logs, while
the vault still gives it back to a reader. Refusals of files carrying it leave no trace of it either."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient, TestServer

from garrison.config import load_config
from garrison.daemon.api import datasets as datasets_api
from garrison.daemon.api import files as files_api
from garrison.daemon.app import create_app
from garrison.daemon.middleware import ROUTE_TABLE
from garrison.daemon.state import STATE
from garrison.ingest.inbox import InboxWatcher

pytestmark = pytest.mark.skipif(shutil.which("age") is None, reason="Debian's age (apt install age) is needed")

CANARY = f"CANARY-{uuid.uuid4().hex}"


@pytest.fixture
def folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """State, temporary and producer folders kept apart: only the producer's may hold plaintext."""
    paths = {name: tmp_path / name for name in ("state", "tmp", "producer", "home")}
    for path in paths.values():
        path.mkdir()
    for name in list(os.environ):
        if name.startswith("GARRISON_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)
    for name, value in {"GARRISON_CONFIG": "/dev/null", "GARRISON_STATE_DIR": str(paths["state"]),
                        "GARRISON_RUN_JOBS": "false", "HOME": str(paths["home"]),
                        "XDG_CONFIG_HOME": str(paths["home"] / ".config"), "TMPDIR": str(paths["tmp"])}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    assert tempfile.gettempdir() == str(paths["tmp"])
    return paths


@pytest.fixture
async def client(folders: dict[str, Path]) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(load_config())
    table = app[ROUTE_TABLE]
    for route in (*datasets_api.ROUTES, *files_api.ROUTES):
        if route.key not in table:
            app.router.add_route(route.method, route.path, route.handler)
            table[route.key] = route
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        yield c


def records(where: str, n: int = 300) -> str:
    """Enough records for several vault chunks; the canary in user text, assistant text and a long line."""
    return "\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"{where} ticket {i}: the code word is {CANARY} (mail eve{i}@example.com)"},
        {"role": "assistant", "content": f"Understood, {CANARY}. " + "Filler text. " * (i % 40)}]})
        for i in range(n)) + "\n"


def raw_hits(root: Path, needle: bytes) -> list[str]:
    """Every file under root (hidden ones, SQLite's WAL and shm included) that holds the bytes."""
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
            hits.append(str(path))
    return hits


async def test_canary_is_nowhere_on_disk(client: TestClient[Any, Any], folders: dict[str, Path],
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    service = datasets_api.ingest_service(client.app)
    service.vault.chunk_size = 16 * 1024  # several chunks per version (the default is 1 MiB)
    recipient = service.identity().recipient
    producer = folders["producer"]
    _, admin = client.app[STATE].keys.create("admin")
    headers = {"Authorization": f"Bearer {admin}"}

    # 1. The inbox: `age -r RECIPIENT -o inbox/x.age data.jsonl`, plus a refused file carrying the canary.
    (producer / "inbox.jsonl").write_text(records("inbox"))
    subprocess.run(["age", "-r", recipient, "-o", str(service.layout.inbox / "drop.age"),
                    str(producer / "inbox.jsonl")], check=True)
    (producer / "bad.jsonl").write_text(records("bad", 3) + '{"text": "' + CANARY + '" oops}\n')
    subprocess.run(["age", "-r", recipient, "-o", str(service.layout.inbox / "refused.age"),
                    str(producer / "bad.jsonl")], check=True)
    watcher = InboxWatcher(service, settle_s=0.0)
    watcher.recover()
    outcomes = watcher.poll_once() + watcher.poll_once()
    assert sorted((o.name, o.status) for o in outcomes) == [("drop.age", "ingested"), ("refused.age", "rejected")]

    # 2. The sealed upload, streamed.
    sealed = subprocess.run(["age", "-r", recipient], input=records("upload").encode(), capture_output=True,
                            check=True).stdout
    r = await client.post("/v1/garrison/datasets/uploaded/versions", data=sealed, headers=headers)
    assert r.status == 201, await r.text()

    # 3. OpenAI's /v1/files, plaintext multipart over loopback; and a refused one carrying the canary.
    form = FormData()
    form.add_field("purpose", "fine-tune")
    form.add_field("file", records("files").encode(), filename="train.jsonl", content_type="application/jsonl")
    r = await client.post("/v1/files", data=form, headers=headers)
    file_id = (await r.json())["id"]
    assert r.status == 200
    form = FormData()
    form.add_field("purpose", "fine-tune")
    form.add_field("file", (producer / "bad.jsonl").read_bytes(), filename="bad.jsonl")
    r = await client.post("/v1/files", data=form, headers=headers)
    assert r.status == 400 and CANARY not in await r.text()

    # Every path produced a readable version holding the canary...
    for name in ("drop", "uploaded", file_id):
        texts = [m["content"] for rec in service.vault.open(name).records() for m in rec["messages"]]
        assert len(texts) == 600 and all(CANARY in t for t in texts)
        assert service.vault.store.version(name).chunk_count > 1
    # ...and the canary is on no disk the appliance writes, in no log line, in no report.
    needle = CANARY.encode()
    assert raw_hits(folders["state"], needle) == []
    assert raw_hits(folders["tmp"], needle) == []
    assert CANARY not in caplog.text
    assert raw_hits(producer, needle)  # the search itself works: the producer's own files hold it
    for encoded in (CANARY.encode("utf-16-le"), CANARY.encode().hex().encode()):
        assert raw_hits(folders["state"], encoded) == []
    # The delivered sealed files left the inbox; the refused one is kept sealed with its reason.
    assert sorted(p.name for p in service.layout.inbox.rglob("*") if p.is_file()) == [
        "refused.age", "refused.age.reason.json"]
