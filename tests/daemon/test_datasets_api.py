"""Datasets and files over real HTTP (aiohttp TestServer on loopback): sealed uploads streamed into the
pipeline, scopes and per-dataset grants, refusals that store nothing, OpenAI's /v1/files with the
official client, plaintext refused off loopback, crypto-shredding deletes."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from conftest import pool_blocks

from garrison.config import load_config
from garrison.daemon.api import datasets as datasets_api
from garrison.daemon.api import files as files_api
from garrison.daemon.app import create_app
from garrison.daemon.state import STATE
from garrison.ingest.datasets import DatasetStore

needs_age = pytest.mark.skipif(shutil.which("age") is None, reason="Debian's age (apt install age) is needed")


@pytest.fixture
def env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The shared developer-install env, with the daemon's job runner off (these tests drive the API only)."""
    monkeypatch.setenv("GARRISON_RUN_JOBS", "false")
    return {**env, "GARRISON_RUN_JOBS": "false"}


@pytest.fixture
async def client(env: dict[str, str]) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_app(load_config())
    async with TestClient(TestServer(app, host="127.0.0.1")) as c:
        yield c


def key(client: TestClient[Any, Any], role: str = "admin", datasets: list[str] | None = None) -> dict[str, str]:
    _, secret = client.app[STATE].keys.create(role, datasets=datasets)
    return {"Authorization": f"Bearer {secret}"}


def recipient(client: TestClient[Any, Any]) -> str:
    return datasets_api.ingest_service(client.app).identity().recipient


def chat(user: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "ok"}]})


def seal(data: bytes, to: str) -> bytes:
    return subprocess.run(["age", "-r", to], input=data, capture_output=True, check=True).stdout


def versions(client: TestClient[Any, Any]) -> list[Any]:
    return client.app[STATE].catalog.query("SELECT * FROM dataset_versions")


@needs_age
async def test_sealed_upload_list_show_delete(client: TestClient[Any, Any]) -> None:
    body = seal(("\n".join([chat("reach me at dan@example.com"), chat("hello")]) + "\n").encode(), recipient(client))

    async def chunks() -> AsyncIterator[bytes]:  # a streamed (chunked) request body
        for i in range(0, len(body), 100):
            yield body[i:i + 100]

    ingest = key(client, "ingest")
    r = await client.post("/v1/garrison/datasets/support/versions?filename=chats.jsonl.age", data=chunks(),
                          headers=ingest)
    created = await r.json()
    assert r.status == 201, created
    assert (created["dataset"], created["version"], created["records"]) == ("support", 1, 2)
    assert created["report"]["redactions"] == {"email": 1} and created["report"]["bytes_in"] == len(body)
    assert created["source"] == "upload" and created["source_name"] == "chats.jsonl.age"

    again = await client.post("/v1/garrison/datasets/support/versions", data=body, headers=ingest)
    assert again.status == 200 and (await again.json())["duplicate"] is True

    reader = key(client, "read")
    listed = await (await client.get("/v1/garrison/datasets", headers=reader)).json()
    assert [(d["name"], d["versions"], d["records"]) for d in listed["data"]] == [("support", 1, 2)]
    shown = await (await client.get("/v1/garrison/datasets/support", headers=reader)).json()
    assert [v["version"] for v in shown["data"]] == [1] and "report" not in shown["data"][0]
    one = await (await client.get("/v1/garrison/datasets/support/versions/1", headers=reader)).json()
    assert one["report"]["records_accepted"] == 2
    assert (await client.get("/v1/garrison/datasets/support/versions/9", headers=reader)).status == 404
    assert (await client.get("/v1/garrison/datasets/nope", headers=reader)).status == 404

    assert (await client.delete("/v1/garrison/datasets/support/versions/1", headers=reader)).status == 403
    gone = await client.delete("/v1/garrison/datasets/support/versions/1", headers=ingest)
    assert gone.status == 200 and (await gone.json())["deleted"] is True
    state = await (await client.get("/v1/garrison/datasets/support/versions/1", headers=reader)).json()
    assert state["state"] == "deleted"
    assert DatasetStore(client.app[STATE].catalog).wrapped_key(state["id"]) is None
    r = await client.post("/v1/garrison/datasets/support/versions", data=body, headers=ingest)
    assert r.status == 201 and (await r.json())["version"] == 2
    assert (await client.delete("/v1/garrison/datasets/support", headers=ingest)).status == 200
    assert (await (await client.get("/v1/garrison/datasets", headers=reader)).json())["data"] == []


@needs_age
async def test_upload_refusals_store_nothing(client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    headers = key(client, "ingest")
    to = recipient(client)
    r = await client.post("/v1/garrison/datasets/d/versions", data=b'{"text": "plain"}\n', headers=headers)
    body = await r.json()
    assert r.status == 400 and body["error"]["code"] == "age_not_age"
    r = await client.post("/v1/garrison/datasets/d/versions", data=seal(b'{"text": "a"}\n{bad\n', to),
                          headers=headers)
    body = await r.json()
    assert r.status == 400 and body["error"]["code"] == "bad_lines"
    assert body["error"]["details"]["report"]["records_refused"][0]["line"] == 2
    r = await client.post("/v1/garrison/datasets/d/versions?format=xml", data=b"", headers=headers)
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_format"
    r = await client.post("/v1/garrison/datasets/bad%20name/versions", data=b"", headers=headers)
    assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_dataset_name"
    state = client.app[STATE]
    monkeypatch.setattr(state, "config", dataclasses.replace(state.config, max_upload_mb=1 / 1024))  # 1 KiB
    big = seal(("\n".join(chat(f"m{i}") for i in range(100)) + "\n").encode(), to)
    r = await client.post("/v1/garrison/datasets/d/versions", data=big, headers=headers)
    assert r.status == 413 and (await r.json())["error"]["code"] == "upload_too_large"
    assert versions(client) == []
    assert list(datasets_api.ingest_service(client.app).layout.vault.iterdir()) == []


@needs_age
async def test_scopes_and_dataset_grants(client: TestClient[Any, Any]) -> None:
    body = seal((chat("hi") + "\n").encode(), recipient(client))
    r = await client.post("/v1/garrison/datasets/a/versions", data=body)
    assert r.status == 401
    r = await client.post("/v1/garrison/datasets/a/versions", data=body, headers=key(client, "read"))
    assert r.status == 403 and (await r.json())["error"]["code"] == "insufficient_scope"
    only_a = key(client, "ingest", datasets=["a"])
    r = await client.post("/v1/garrison/datasets/b/versions", data=body, headers=only_a)
    assert r.status == 403 and (await r.json())["error"]["code"] == "resource_not_granted"
    assert (await client.post("/v1/garrison/datasets/a/versions", data=body, headers=only_a)).status == 201
    assert (await client.post("/v1/garrison/datasets/b/versions", data=body, headers=key(client))).status == 201
    listed = await (await client.get("/v1/garrison/datasets", headers=only_a)).json()
    assert [d["name"] for d in listed["data"]] == ["a"]
    assert (await client.get("/v1/garrison/datasets/b", headers=only_a)).status == 403


async def test_openai_files_with_the_official_client(client: TestClient[Any, Any], tmp_path: Path) -> None:
    import openai

    secret = key(client, "operator")["Authorization"].split()[1]
    api = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key=secret, max_retries=0)
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([chat("my number is +44 20 7946 0958"), chat("thanks")]) + "\n")
    created = await api.files.create(file=path.open("rb"), purpose="fine-tune")
    assert created.id.startswith("file-") and created.purpose == "fine-tune" and created.status == "processed"
    assert created.filename == "train.jsonl" and created.bytes == path.stat().st_size
    extra = created.model_extra or {}
    assert extra["dataset"] == created.id and extra["version"] == 1
    assert extra["report"]["redactions"] == {"phone": 1}
    service = datasets_api.ingest_service(client.app)
    assert [r["messages"][0]["content"] for r in service.vault.open(created.id).records()] == [
        "my number is [PHONE]", "thanks"]

    listed = await api.files.list()
    assert [f.id for f in listed.data] == [created.id]
    assert (await api.files.retrieve(created.id)).id == created.id
    with pytest.raises(openai.PermissionDeniedError):
        await api.files.content(created.id)
    with pytest.raises(openai.BadRequestError) as info:
        await api.files.create(file=("bad.jsonl", b"{nope\n"), purpose="fine-tune")
    assert "bad_lines" in str(info.value)
    with pytest.raises(openai.BadRequestError):
        await api.files.create(file=("x.jsonl", b"{}"), purpose="assistants")
    named = await api.files.create(file=("more.jsonl", (chat("x") + "\n").encode()), purpose="fine-tune",
                                   extra_body={"dataset": "support"})
    assert (named.model_extra or {})["dataset"] == "support"

    deleted = await api.files.delete(created.id)
    assert deleted.deleted and deleted.id == created.id
    with pytest.raises(openai.NotFoundError):
        await api.files.retrieve(created.id)
    assert [f.id for f in (await api.files.list()).data] == [named.id]
    row = client.app[STATE].catalog.query_one("SELECT state, wrapped_key FROM dataset_versions v JOIN datasets d"
                                              " ON d.id = v.dataset_id WHERE d.name = ?", (created.id,))
    assert row is not None and row["state"] == "deleted" and row["wrapped_key"] is None
    await api.close()


def _request_from(peer: Any, ssl: bool = False) -> web.Request:
    transport = mock.Mock()
    extra = {"peername": peer, "sslcontext": object() if ssl else None, "socket": None}
    transport.get_extra_info.side_effect = lambda name, default=None: extra.get(name, default)
    return make_mocked_request("POST", "/v1/files", transport=transport)


@pytest.mark.parametrize(("peer", "ssl", "ok"), [
    (("127.0.0.1", 5000), False, True), (("::1", 5000, 0, 0), False, True),
    (("::ffff:127.0.0.1", 1, 0, 0), False, True), (("10.1.2.3", 5000), False, False),
    (("192.168.1.9", 5000), False, False), (("fe80::1%eth0", 1, 0, 2), False, False),
    (("10.1.2.3", 5000), True, True), (None, False, False),
])
def test_plaintext_only_over_loopback_or_tls(peer: Any, ssl: bool, ok: bool) -> None:
    assert files_api.private_transport(_request_from(peer, ssl)) is ok


async def test_files_upload_refused_off_loopback(client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files_api, "private_transport", lambda _request: False)
    form = FormData()
    form.add_field("purpose", "fine-tune")
    form.add_field("file", b"{}", filename="x.jsonl")
    r = await client.post("/v1/files", data=form, headers=key(client))
    body = await r.json()
    assert r.status == 403 and body["error"]["code"] == "plaintext_over_insecure_transport"
    assert "seal" in body["error"]["message"]


def _form(*parts: tuple[str, str | bytes]) -> FormData:
    """A multipart body with its parts in this order (the file part named "file")."""
    form = FormData()
    for name, value in parts:
        form.add_field(name, value, **({"filename": "train.jsonl"} if name == "file" else {}))
    return form


async def test_files_fields_must_come_before_the_file(client: TestClient[Any, Any]) -> None:
    """The file is streamed into the vault as it arrives, so a field after it cannot apply: the upload
    is refused, stored nowhere, instead of landing silently in another dataset."""
    line = (chat("hello") + "\n").encode()
    for late in ("dataset", "format", "purpose"):
        value = {"dataset": "support", "format": "jsonl", "purpose": "fine-tune"}[late]
        early = [("purpose", "fine-tune")] if late != "purpose" else []
        r = await client.post("/v1/files", data=_form(*early, ("file", line), (late, value)), headers=key(client))
        body = await r.json()
        if late == "purpose":  # no purpose before the file: refused before a byte of it is read
            assert r.status == 400 and body["error"]["param"] == "purpose", body
            continue
        assert r.status == 400 and body["error"]["code"] == "invalid_upload", body
        assert body["error"]["param"] == late and "before the file" in body["error"]["message"]
    assert versions(client) == []
    assert client.app[STATE].catalog.query("SELECT * FROM files") == []
    r = await client.post("/v1/files", data=_form(("purpose", "fine-tune"), ("file", line), ("file", line)),
                          headers=key(client))
    assert r.status == 400 and (await r.json())["error"]["message"] == "one file per upload"
    assert versions(client) == []
    r = await client.post("/v1/files", data=_form(("purpose", "fine-tune"), ("dataset", "support"), ("file", line),
                                                  ("note", "an unknown field is ignored, before or after")),
                          headers=key(client))
    created = await r.json()
    assert r.status == 200 and created["dataset"] == "support", created


@needs_age
async def test_large_upload_with_content_length_is_redacted_by_the_pool(client: TestClient[Any, Any],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from garrison.ingest import parallel

    lines = [chat(f"reach me at u{i}@example.com") for i in range(3000)]
    body = seal(("\n".join(lines) + "\n").encode(), recipient(client))
    monkeypatch.setattr(parallel, "PARALLEL_MIN_BYTES", len(body) // 2)
    monkeypatch.setattr(parallel, "BLOCK_BYTES", 32 * 1024)
    submitted = pool_blocks(monkeypatch)
    r = await client.post("/v1/garrison/datasets/big/versions?filename=big.jsonl.age", data=body,
                          headers=key(client, "ingest"))  # bytes: aiohttp sends a Content-Length
    created = await r.json()
    assert r.status == 201, created
    assert created["records"] == 3000 and created["report"]["redactions"] == {"email": 3000}
    assert len(submitted) > 3
