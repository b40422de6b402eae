"""OpenAI's Files API (`/v1/files`, purpose `fine-tune`): plaintext JSONL uploads become dataset versions.

The official client's `client.files.create(file=..., purpose="fine-tune")` works unchanged. Each
upload goes through the same pipeline as sealed deliveries (validate, redact by policy, encrypt)
and becomes version 1 of a dataset named after the file id (or of the dataset named in an optional
`dataset` form field), so a fine-tuning job can name either.

Plaintext on the wire is accepted only where the wire is private: from a loopback peer (the CLI, a
local reverse proxy) or over TLS. Anything else is refused before a byte of the body is read:
remote producers seal their files (POST /v1/garrison/datasets/{name}/versions). The multipart body
is streamed part by part into the pipeline (`request.multipart()`, never `request.post()`, which
would spool large files to a temporary file in plaintext). So the form fields must come before the
file part, as OpenAI's client sends them; a field after it refuses the upload (400, nothing stored)
rather than being silently ignored.

File content never leaves the appliance: GET /v1/files/{id}/content is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Iterator
from typing import Any

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import BadHttpMessage

from garrison.daemon.api.datasets import body_reader, ingest_service, max_upload_bytes
from garrison.daemon.http import json_response, principal
from garrison.daemon.routing import Route
from garrison.daemon.state import STATE
from garrison.errors import Conflict, InvalidRequest, PermissionDenied, RequestTimeout
from garrison.ingest.datasets import DatasetStore, VersionRecord, new_file_id, validate_name
from garrison.ingest.formats import FORMATS
from garrison.ingest.pipeline import IngestRequest
from garrison.operations import datasets as ops
from garrison.policies.access import authorize

PURPOSES = ("fine-tune",)
FIELDS = ("purpose", "dataset", "format")
_FIELD_LIMIT = 1024


def private_transport(request: web.Request) -> bool:
    """True for TLS, a loopback peer or a Unix socket: where plaintext cannot be read on the way."""
    transport = request.transport
    if transport is None:
        return False
    if transport.get_extra_info("sslcontext") is not None:
        return True
    sock = transport.get_extra_info("socket")
    if sock is not None and getattr(sock, "family", None) == getattr(socket, "AF_UNIX", object()):
        return True
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple | list) or not peer:
        return False
    try:
        address = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


@contextlib.contextmanager
def _well_formed() -> Iterator[None]:
    """aiohttp's multipart reader raises ValueError for a body that breaks the format (no boundary, no
    opening delimiter, a part cut short) and BadHttpMessage for a part header it cannot parse (control
    characters in a name): the client's fault, a 400 and nothing stored, never a 500."""
    try:
        yield
    except (ValueError, BadHttpMessage) as exc:
        raise InvalidRequest(f"malformed multipart body ({str(exc)[:80]})", code="invalid_upload") from None


def _stall_s(request: web.Request) -> float:
    return request.app[STATE].config.body_timeout_s


async def _in_time(read: Awaitable[Any], stall_s: float) -> Any:
    """Every read of the body, fields and part headers too, sends something within body_timeout_s or
    the upload is dropped (408), as a stalled JSON body is."""
    with _well_formed():
        try:
            async with asyncio.timeout(stall_s):
                return await read
        except TimeoutError:
            raise RequestTimeout(f"the upload sent nothing for {stall_s:g} s (body_timeout_s)") from None


async def _next_part(reader: MultipartReader, stall_s: float) -> Any:
    return await _in_time(reader.next(), stall_s)


async def _read_chunk(part: BodyPartReader, size: int, stall_s: float) -> bytes:
    chunk: bytes = await _in_time(part.read_chunk(size), stall_s)
    return chunk


async def _field(part: BodyPartReader, stall_s: float) -> str:
    data = b""
    while chunk := await _read_chunk(part, _FIELD_LIMIT, stall_s):
        data += chunk
        if len(data) > _FIELD_LIMIT:
            raise InvalidRequest(f"form field {part.name!r} is longer than {_FIELD_LIMIT} bytes", param=part.name)
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise InvalidRequest(f"form field {part.name!r} is not UTF-8", param=part.name) from None


async def _refuse_fields_after_the_file(reader: MultipartReader, stall_s: float) -> None:
    """Read what follows the file part before the upload is stored. The file is streamed into the
    pipeline as it arrives (never buffered), so a field after it comes too late to apply: it refuses
    the upload instead of being ignored. OpenAI's own client sends its fields first."""
    while (part := await _next_part(reader, stall_s)) is not None:
        if not isinstance(part, BodyPartReader):
            raise InvalidRequest("nested multipart bodies are not accepted", code="invalid_upload")
        if part.name == "file":
            raise InvalidRequest("one file per upload", code="invalid_upload", param="file")
        if part.name in FIELDS:
            raise InvalidRequest(f"the {part.name!r} field came after the 'file' part: send the form fields before "
                                 "the file, which is streamed into the vault as it arrives; nothing was stored",
                                 code="invalid_upload", param=part.name)
        await _in_time(part.release(), stall_s)


async def create_file(request: web.Request) -> web.StreamResponse:
    if not private_transport(request):
        raise PermissionDenied("plaintext uploads to /v1/files are accepted only over TLS or from this machine "
                               "(loopback); seal the file for the appliance (`garrison seal` or age -r) and POST it "
                               "to /v1/garrison/datasets/{name}/versions", code="plaintext_over_insecure_transport")
    who = principal(request)
    if not request.content_type.startswith("multipart/"):
        raise InvalidRequest("expected a multipart/form-data body with 'purpose' and 'file'", code="invalid_upload")
    with _well_formed():
        reader = await request.multipart()
    stall_s = _stall_s(request)
    fields: dict[str, str] = {}
    created: dict[str, Any] = {}
    while (part := await _next_part(reader, stall_s)) is not None:
        if not isinstance(part, BodyPartReader):
            raise InvalidRequest("nested multipart bodies are not accepted", code="invalid_upload")
        if part.name != "file":
            if part.name in FIELDS:
                fields[part.name] = await _field(part, stall_s)
            else:
                await _in_time(part.release(), stall_s)
            continue
        if created:
            raise InvalidRequest("one file per upload", code="invalid_upload", param="file")
        purpose = fields.get("purpose")
        if purpose is None:
            raise InvalidRequest("send the 'purpose' field before the 'file' part", code="invalid_upload",
                                 param="purpose")
        if purpose not in PURPOSES:
            raise InvalidRequest(f"purpose {purpose[:40]!r} is not supported here; use {', '.join(PURPOSES)}",
                                 code="unsupported_purpose", param="purpose")
        fmt = fields.get("format", "jsonl")
        if fmt not in FORMATS:
            raise InvalidRequest(f"unknown format; formats are {', '.join(FORMATS)}", param="format",
                                 code="invalid_format")
        file_id = new_file_id()
        dataset = validate_name(fields.get("dataset") or file_id)
        authorize(who, "ingest", ("dataset", dataset))
        filename = (part.filename or "upload.jsonl")[:255]

        def on_publish(conn: Any, version: VersionRecord, file_id: str = file_id, filename: str = filename,
                       purpose: str = purpose) -> None:
            DatasetStore.insert_file(conn, file_id=file_id, filename=filename, purpose=purpose,
                                     size=int(version.report.get("bytes_in", 0)), version_id=version.id,
                                     created_by=who.actor)

        async def read_file(size: int, part: BodyPartReader = part) -> bytes:
            chunk = await _read_chunk(part, size, stall_s)
            if not chunk:  # the file's end: what follows must be no field, before anything is stored
                await _refuse_fields_after_the_file(reader, stall_s)
            return chunk

        service = ingest_service(request.app)
        ingest_request = IngestRequest(dataset=dataset, source="files", source_name=filename, format=fmt,
                                       sealed=False, max_bytes=max_upload_bytes(request.app),
                                       on_publish=on_publish,
                                       declared_bytes=request.content_length)  # the part and a few headers
        result = await asyncio.to_thread(ops.ingest, service, who, body_reader(request, read_file),
                                         ingest_request)
        created["file_id"] = file_id
        created["result"] = result
    if not created:
        raise InvalidRequest("the upload has no 'file' part", code="invalid_upload", param="file")
    store = DatasetStore(request.app[STATE].catalog)
    if created["result"].duplicate:
        raise Conflict(f"this file was already uploaded as dataset version {created['result'].version.reference}",
                       code="duplicate_file")
    record = await asyncio.to_thread(store.file, created["file_id"])
    return json_response({**record.to_openai(), "report": created["result"].report})


async def list_files(request: web.Request) -> web.StreamResponse:
    files = await asyncio.to_thread(ops.list_files, request.app[STATE].catalog, principal(request),
                                    request.query.get("purpose") or None)
    return json_response({"object": "list", "data": [f.to_openai() for f in files], "has_more": False})


async def get_file(request: web.Request) -> web.StreamResponse:
    record = await asyncio.to_thread(ops.get_file, request.app[STATE].catalog, principal(request),
                                     request.match_info["file_id"])
    return json_response(record.to_openai())


async def delete_file(request: web.Request) -> web.StreamResponse:
    record = await asyncio.to_thread(ops.delete_file, ingest_service(request.app).vault, principal(request),
                                     request.match_info["file_id"])
    return json_response({"id": record.id, "object": "file", "deleted": True})


async def file_content(request: web.Request) -> web.StreamResponse:
    await asyncio.to_thread(ops.get_file, request.app[STATE].catalog, principal(request),
                            request.match_info["file_id"])
    raise PermissionDenied("file content never leaves the appliance: it is kept encrypted and read only by "
                           "fine-tuning workers", code="content_not_exportable")


ROUTES = (
    Route("POST", "/v1/files", create_file, "ingest",
          "Upload a plaintext JSONL file (multipart: the fields purpose=fine-tune and optional dataset, format, "
          "then the file part, as OpenAI's client sends them; a field after the file is refused); only over TLS "
          "or loopback. It becomes a dataset version (redacted, encrypted).", "files",
          body={"type": "object", "required": ["purpose", "file"], "properties": {
              "purpose": {"type": "string", "enum": list(PURPOSES)},
              "dataset": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$", "maxLength": 128},
              "format": {"type": "string", "enum": list(FORMATS)},
              "file": {"type": "string", "format": "binary"}}},
          body_type="multipart/form-data",
          responses={"200": "the OpenAI file object, with dataset, version and report",
                     "400": "refused (bad_lines, no_records, unsupported_purpose, invalid_upload); nothing stored",
                     "403": "not over TLS or loopback, or no ingest scope", "413": "larger than max_upload_mb"}),
    Route("GET", "/v1/files", list_files, "read", "Uploaded files (OpenAI's list shape).", "files",
          query=(("purpose", "string", "only files of this purpose"),)),
    Route("GET", "/v1/files/{file_id}", get_file, "read", "One uploaded file.", "files",
          responses={"200": "OK", "404": "no such file"}),
    Route("DELETE", "/v1/files/{file_id}", delete_file, "ingest",
          "Delete a file: its dataset version's key is destroyed (crypto-shredding).", "files",
          responses={"200": "deleted", "404": "no such file"}),
    Route("GET", "/v1/files/{file_id}/content", file_content, "read",
          "Refused by design: uploaded data never leaves the appliance.", "files",
          responses={"403": "content_not_exportable", "404": "no such file"}),
)
