"""Datasets over HTTP: sealed uploads become versions; list, show, delete (crypto-shredding).

    POST   /v1/garrison/datasets/{name}/versions            body: an age file (binary or armored), streamed
    GET    /v1/garrison/datasets                            datasets the key may see
    GET    /v1/garrison/datasets/{name}                     one dataset and its versions (tombstones too)
    GET    /v1/garrison/datasets/{name}/versions/{version}  one version with its ingestion report
    DELETE /v1/garrison/datasets/{name}                     shred every version
    DELETE /v1/garrison/datasets/{name}/versions/{version}  shred one version

The upload is streamed from the socket straight into the pipeline (running in a worker thread,
reading the body through `ThreadReader`), so neither the sealed bytes nor, above all, the plaintext
are ever written to a temporary file, and memory stays bounded whatever the size. The response
comes once the version is durable (201), or with the refusal (4xx, the report in
`error.details.report`); nothing is stored on refusal. Records themselves never leave through the
API: only metadata and reports do.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from garrison.daemon.http import json_response, principal
from garrison.daemon.routing import Route
from garrison.daemon.state import STATE
from garrison.errors import InvalidRequest, RequestTimeout
from garrison.ingest.datasets import validate_name
from garrison.ingest.formats import FORMATS, parse_columns
from garrison.ingest.pipeline import IngestRequest, IngestService
from garrison.operations import datasets as ops
from garrison.policies.access import authorize

_SERVICE_ATTR = "_ingest_service"
_MAX_VERSION = 2**63 - 1  # SQLite's largest integer: a larger one cannot even be looked up


def ingest_service(app: web.Application) -> IngestService:
    """The daemon's IngestService: `state.ingest` when wired, else one made on first use and kept on the state."""
    from garrison.daemon.api.identity import identity_cache

    state = app[STATE]
    service = getattr(state, "ingest", None) or state.__dict__.get(_SERVICE_ATTR)
    if isinstance(service, IngestService):
        return service
    cache = identity_cache(app)
    # The live policy, asked per ingestion: SIGHUP swaps state.policy (garrison.daemon.lifecycle).
    made = IngestService(state.config, state.catalog, identity_loader=cache.get, policy=lambda: state.policy.ingest)
    state.__dict__[_SERVICE_ATTR] = made
    return made


def max_upload_bytes(app: web.Application) -> int:
    return int(app[STATE].config.max_upload_mb * 1024 * 1024)


class ThreadReader(io.RawIOBase):
    """A blocking file object over an aiohttp body, for the pipeline's worker thread.

    Each read schedules the body's coroutine on the event loop and waits for it; the loop keeps
    serving other requests meanwhile. Bytes pass through memory only. A body that sends nothing for
    `stall_s` is abandoned (408, nothing stored): a slow sender must not hold a worker thread and a
    connection for ever.
    """

    def __init__(self, read: Callable[[int], Coroutine[Any, Any, bytes]], loop: asyncio.AbstractEventLoop,
                 stall_s: float) -> None:
        super().__init__()
        self._read = read
        self._loop = loop
        self._stall_s = stall_s
        self._pending = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if not self._pending and not self._eof:
            future = asyncio.run_coroutine_threadsafe(self._read(min(len(view), 1024 * 1024)), self._loop)
            try:
                self._pending = future.result(timeout=self._stall_s)
            except TimeoutError:
                future.cancel()
                raise RequestTimeout(f"the upload sent nothing for {self._stall_s:g} s (body_timeout_s)") from None
            except (ConnectionError, asyncio.CancelledError) as exc:
                raise InvalidRequest(f"the upload was interrupted ({type(exc).__name__})",
                                     code="upload_interrupted") from None
            if not self._pending:
                self._eof = True
        n = min(len(view), len(self._pending))
        view[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def body_reader(request: web.Request, read: Callable[[int], Coroutine[Any, Any, bytes]]) -> ThreadReader:
    """A streamed upload's reader, with the stall limit of JSON bodies (body_timeout_s, read per request)."""
    return ThreadReader(read, asyncio.get_running_loop(), request.app[STATE].config.body_timeout_s)


def request_format(request: web.Request) -> tuple[str, dict[str, str] | None]:
    fmt = request.query.get("format", "auto")
    if fmt not in FORMATS:
        raise InvalidRequest(f"unknown format {fmt[:40]!r}; formats are {', '.join(FORMATS)}", param="format",
                             code="invalid_format")
    return fmt, parse_columns(request.query.get("columns"))


def _version_number(request: web.Request) -> int:
    raw = request.match_info["version"]
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= _MAX_VERSION:
        raise InvalidRequest(f"version must be a whole number from 1 to {_MAX_VERSION}", param="version")
    return int(raw)




# -- handlers --------------------------------------------------------------------------------------


async def upload_version(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    name = validate_name(request.match_info["name"])
    authorize(who, "ingest", ("dataset", name))  # before a byte of the body is read
    fmt, columns = request_format(request)
    filename = request.query.get("filename", "")[:255]
    service = ingest_service(request.app)
    reader = body_reader(request, request.content.read)
    ingest_request = IngestRequest(dataset=name, source="upload", source_name=filename, format=fmt, columns=columns,
                                   sealed=True, max_bytes=max_upload_bytes(request.app),
                                   declared_bytes=request.content_length)
    result = await asyncio.to_thread(ops.ingest, service, who, reader, ingest_request)
    return json_response(result.to_json(), status=200 if result.duplicate else 201)


async def list_datasets(request: web.Request) -> web.StreamResponse:
    data = await asyncio.to_thread(ops.list_datasets, request.app[STATE].catalog, principal(request))
    return json_response({"object": "list", "data": data})


async def show_dataset(request: web.Request) -> web.StreamResponse:
    return json_response(await asyncio.to_thread(ops.get_dataset, request.app[STATE].catalog, principal(request),
                                                 request.match_info["name"]))


async def show_version(request: web.Request) -> web.StreamResponse:
    record = await asyncio.to_thread(ops.get_version, request.app[STATE].catalog, principal(request),
                                     request.match_info["name"], _version_number(request))
    return json_response(record.to_json())


async def delete_dataset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    shredded = await asyncio.to_thread(ops.delete_dataset, ingest_service(request.app).vault, principal(request),
                                       name)
    return json_response({"object": "garrison.dataset.deleted", "name": name, "deleted": True,
                          "versions": [r.version for r in shredded]})


async def delete_version(request: web.Request) -> web.StreamResponse:
    name, number = request.match_info["name"], _version_number(request)
    record = await asyncio.to_thread(ops.delete_version, ingest_service(request.app).vault, principal(request),
                                     name, number)
    return json_response({"object": "garrison.dataset_version.deleted", "id": record.id, "dataset": name,
                          "version": number, "deleted": True})


_V = "/v1/garrison/datasets"
ROUTES = (
    Route("POST", _V + "/{name}/versions", upload_version, "ingest",
          "Deliver a sealed (age) file as a new version of dataset {name}; streamed, decrypted, validated, redacted by "
          "policy and stored encrypted. Query: format (auto|jsonl|chat|completion|text|csv|plain), columns "
          "(CSV mapping TARGET=COLUMN,...), filename. Answers once durable.", "datasets",
          query=(("format", "string", "record format (default auto)"),
                 ("columns", "string", "CSV column mapping, e.g. prompt=question,completion=answer"),
                 ("filename", "string", "the file's name, for the report and format detection")),
          body={"type": "string", "format": "binary", "description": "an age file (binary or armored)"},
          body_type="application/octet-stream",
          responses={"201": "version created, with its report", "200": "the same bytes were already ingested",
                     "400": "refused (age_* codes, bad_lines, no_records, invalid_format); nothing stored",
                     "403": "no ingest scope or dataset grant", "413": "larger than max_upload_mb"}),
    Route("GET", _V, list_datasets, "read", "Datasets this key may see, with their ready versions.", "datasets"),
    Route("GET", _V + "/{name}", show_dataset, "read", "One dataset and all its versions (deleted ones as tombstones).",
          "datasets", responses={"200": "OK", "404": "no such dataset"}),
    Route("GET", _V + "/{name}/versions/{version}", show_version, "read",
          "One dataset version with its ingestion report (counts and line numbers, never record text).", "datasets",
          responses={"200": "OK", "404": "no such version"}),
    Route("DELETE", _V + "/{name}", delete_dataset, "ingest",
          "Delete a dataset: every version's data key is destroyed (crypto-shredding) and its files removed.",
          "datasets", responses={"200": "deleted", "404": "no such dataset"}),
    Route("DELETE", _V + "/{name}/versions/{version}", delete_version, "ingest",
          "Delete one dataset version (crypto-shredding).", "datasets",
          responses={"200": "deleted", "404": "no such version"}),
)
