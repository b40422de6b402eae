"""Training checkpoints: encrypted at rest (AES-256-GCM, chunked), written atomically, loaded by random access.

A checkpoint holds what the model learned from sealed data (adapter or full weights, and
the optimizer's moments), so it is protected like that data: never a plaintext byte on
disk. The state dict is streamed by `torch.save` through an encrypting writer into a
temporary file, fsynced, renamed into place and the folder fsynced, so a `kill -9` or a
power cut at any instant leaves the previous checkpoint or the new one, never half of one.

File format (``ckpt-<step>.gck``)::

    header  = MAGIC (8) | chunk_size u32 | step u64 | salt (32)
    body    = AES-256-GCM(chunk_0) | ... | AES-256-GCM(chunk_n)   (each ciphertext + 16-byte tag)

* The file key is HKDF-SHA256(checkpoint_key, salt, info) with a fresh random salt per file,
  so the per-chunk nonce can simply be the chunk index without ever repeating under one key.
* Each chunk's associated data is ``header | index u64 | final u8``: chunks cannot be
  reordered, swapped between files or truncated (the last one must authenticate as final),
  and the plaintext step number in the header cannot be edited unnoticed.
* Chunks let the writer stream (memory stays at one chunk however large the model) and let
  the reader serve `torch.load`'s seeks by decrypting only the chunk it needs.

A wrong key, a tampered byte or a truncated file raises `IntegrityError` (code
``checkpoint_unreadable``); the caller decides whether an older checkpoint will do.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from garrison.errors import IntegrityError, InvalidRequest
from garrison.store.durable import fsync_dir

MAGIC = b"GRCKPT01"
_HEADER = struct.Struct(">8sIQ32s")
_TAG = 16
_INFO = b"garrison training checkpoint v1"
CHUNK_SIZE = 1 << 20
_NAME = re.compile(r"^ckpt-(\d{10})\.gck$")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:010d}.gck"


def _file_key(key: bytes, salt: bytes) -> AESGCM:
    if len(key) != 32:
        raise InvalidRequest("the checkpoint key must be 32 bytes (AES-256)", code="invalid_checkpoint_key")
    return AESGCM(HKDF(hashes.SHA256(), 32, salt, _INFO).derive(key))


def _nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


def _aad(header: bytes, index: int, final: bool) -> bytes:
    return header + struct.pack(">QB", index, int(final))



class _EncryptingWriter(io.RawIOBase):
    """A write-only file object for `torch.save` that emits authenticated chunks to `raw`."""

    def __init__(self, raw: BinaryIO, key: bytes, step: int, chunk_size: int = CHUNK_SIZE) -> None:
        super().__init__()
        salt = secrets.token_bytes(32)
        self._header = _HEADER.pack(MAGIC, chunk_size, step, salt)
        self._aead = _file_key(key, salt)
        self._raw = raw
        self._chunk = chunk_size
        self._buf = bytearray()
        self._index = 0
        self._done = False
        raw.write(self._header)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._buf += view
        # Keep at least one byte back: the last chunk must be written with the final flag.
        while len(self._buf) > self._chunk:
            self._emit(bytes(self._buf[: self._chunk]), final=False)
            del self._buf[: self._chunk]
        return len(view)

    def _emit(self, plain: bytes, *, final: bool) -> None:
        self._raw.write(self._aead.encrypt(_nonce(self._index), plain, _aad(self._header, self._index, final)))
        self._index += 1

    def finish(self) -> None:
        if not self._done:
            self._emit(bytes(self._buf), final=True)
            self._buf.clear()
            self._done = True


class _DecryptingReader(io.RawIOBase):
    """A seekable, read-only view of a checkpoint's plaintext; decrypts one chunk at a time.

    Opening it authenticates the header and the final chunk, so a truncated file or a wrong
    key fails before `torch.load` reads anything.
    """

    def __init__(self, path: Path, key: bytes) -> None:
        super().__init__()
        self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        try:
            header = self._file.read(_HEADER.size)
            if len(header) != _HEADER.size:
                raise IntegrityError(f"checkpoint {path.name} is truncated", code="checkpoint_unreadable")
            magic, chunk, step, salt = _HEADER.unpack(header)
            if magic != MAGIC or chunk <= 0:
                raise IntegrityError(f"{path.name} is not a Garrison checkpoint", code="checkpoint_unreadable")
            self.step = int(step)
            self._header = header
            self._chunk = int(chunk)
            self._aead = _file_key(key, salt)
            body = os.fstat(self._file.fileno()).st_size - _HEADER.size
            stride = self._chunk + _TAG
            self._count = max(1, -(-body // stride))
            last_len = body - (self._count - 1) * stride
            if last_len < _TAG:
                raise IntegrityError(f"checkpoint {path.name} is truncated", code="checkpoint_unreadable")
            self._size = (self._count - 1) * self._chunk + last_len - _TAG
            self._pos = 0
            self._cached: tuple[int, bytes] | None = None
            self._block(self._count - 1)  # authenticates key, header and the end of the file
        except BaseException:
            self._file.close()
            raise

    def _block(self, index: int) -> bytes:
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        stride = self._chunk + _TAG
        final = index == self._count - 1
        self._file.seek(_HEADER.size + index * stride)
        blob = self._file.read(stride)
        try:
            plain = self._aead.decrypt(_nonce(index), blob, _aad(self._header, index, final))
        except InvalidTag:
            raise IntegrityError("checkpoint does not authenticate: wrong key, or the file was altered",
                                 code="checkpoint_unreadable") from None
        self._cached = (index, plain)
        return plain

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        done = 0
        while done < len(out) and self._pos < self._size:
            index, within = divmod(self._pos, self._chunk)
            block = self._block(index)
            n = min(len(out) - done, len(block) - within)
            out[done:done + n] = block[within:within + n]
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        self._file.close()
        self._cached = None
        super().close()


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], key: bytes) -> Path:
    """Encrypt `state` (anything `torch.save` takes) to ``directory/ckpt-<step>.gck`` atomically."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(step)
    tmp = directory / f".{final.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=CHUNK_SIZE) as raw:
            writer = _EncryptingWriter(raw, key, step)
            torch.save(state, cast(BinaryIO, writer))
            writer.finish()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(directory)
    return final


def load_checkpoint(path: Path, key: bytes) -> dict[str, Any]:
    """Decrypt and load one checkpoint; `IntegrityError` if it does not authenticate under `key`."""
    import torch

    reader = _DecryptingReader(path, key)
    try:
        state = torch.load(io.BufferedReader(reader, CHUNK_SIZE), map_location="cpu", weights_only=True)
    finally:
        reader.close()
    if not isinstance(state, dict):
        raise IntegrityError(f"checkpoint {path.name} holds no training state", code="checkpoint_unreadable")
    return state


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint file, oldest first (temporaries are never listed)."""
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry))
    return sorted(found)


def iter_latest(directory: Path, key: bytes) -> Iterator[tuple[Path, dict[str, Any] | IntegrityError]]:
    """Newest first: each checkpoint with its state, or the error that stopped it loading."""
    for _step, path in reversed(list_checkpoints(directory)):
        try:
            yield path, load_checkpoint(path, key)
        except IntegrityError as err:
            yield path, err


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (called only after a newer one is durable)."""
    for _step, path in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        path.unlink(missing_ok=True)
    for stale in directory.glob(".ckpt-*.tmp"):
        stale.unlink(missing_ok=True)  # left by a writer killed mid-write; never a valid checkpoint
