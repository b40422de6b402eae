"""The model registry: import, list, show and remove models, the same for CLI and API.

A model is a folder under the state's `models/` with every file hashed (SHA-256) into a
manifest, plus one catalog row. Import copies into a hidden temporary folder while
hashing, fsyncs, renames into place and only then inserts the row, so a crash leaves
either no model or a whole one. The manifest is checked again when a model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from garrison.crypto.identity import ApplianceIdentity
from garrison.errors import Conflict, IntegrityError, InvalidRequest, NotFound
from garrison.models.names import check_model_id
from garrison.paths import StateLayout
from garrison.policies.audit import append_audit
from garrison.store.catalog import Catalog
from garrison.store.durable import fsync_dir

GGUF_MAGIC = b"GGUF"
_CHUNK = 4 << 20
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Detector:
    format: str
    describe: str
    matches: Callable[[Path], bool]
    entry: Callable[[Path], str]


def _is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as fh:
        return fh.read(4) == GGUF_MAGIC


def _single_gguf(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("*.gguf") if _is_gguf_file(p)) if path.is_dir() else []


def _is_onnx_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*.onnx"))


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists() and (
        any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")))


def _is_peft_dir(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").exists() and (
        any(path.glob("adapter_model*.safetensors")) or any(path.glob("adapter_model*.bin")))


def _onnx_entry(path: Path) -> str:
    for preferred in ("model.onnx", "model_quantized.onnx"):
        if (path / preferred).exists():
            return preferred
    return sorted(p.name for p in path.glob("*.onnx"))[0]


# How a path on disk is recognised, first match wins.
DETECTORS: tuple[Detector, ...] = (
    Detector("gguf", "a GGUF file", _is_gguf_file, lambda p: p.name),
    Detector("gguf", "a folder holding one GGUF file", lambda p: len(_single_gguf(p)) == 1,
             lambda p: _single_gguf(p)[0].name),
    Detector("onnx", "an ONNX folder", _is_onnx_dir, _onnx_entry),
    Detector("hf", "a Hugging Face folder (config.json + weights)", _is_hf_dir, lambda p: "config.json"),
    Detector("peft", "a peft LoRA adapter folder (adapter_config.json + weights)", _is_peft_dir,
             lambda p: "adapter_config.json"),
)

# What an adapter's base must be, by the adapter's format.
ADAPTER_BASES: dict[str, str] = {"gguf": "gguf", "peft": "hf"}

# Per-model serving settings; max_queue None means the daemon's model_queue.
# gpu None: every GPU the runner can see; N: only GPU N (its runner gets CUDA_VISIBLE_DEVICES=N).
SETTINGS_DEFAULTS: dict[str, Any] = {"n_parallel": 8, "n_ctx_per_slot": 2048, "n_gpu_layers": 0, "max_queue": None,
                                     "gpu": None}
_SETTINGS_MIN = {"n_parallel": 1, "n_ctx_per_slot": 16, "n_gpu_layers": 0, "max_queue": 0, "gpu": 0}


@dataclass
class ModelRecord:
    name: str
    format: str
    folder: Path
    entry: str
    settings: dict[str, Any]
    manifest: dict[str, Any]
    size_bytes: int
    created_at: float
    created_by: str | None

    @property
    def entry_path(self) -> Path:
        return self.folder / self.entry

    @property
    def base(self) -> str | None:
        """For a LoRA adapter: the GGUF model it attaches to."""
        base = self.settings.get("base")
        return str(base) if base else None

    @property
    def servable(self) -> bool:
        passed = self.manifest.get("parity", {}).get("passed", True)
        return self.format in ("gguf", "onnx", "lora") and passed is not False

    def to_json(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "format": self.format, "entry": self.entry,
                "settings": self.settings, "base": self.base, "size_bytes": self.size_bytes,
                "created": int(self.created_at),
                "owned_by": self.created_by or "garrison", "servable": self.servable,
                "files": self.manifest.get("files", {}), "source": self.manifest.get("source"),
                "lineage": self.manifest.get("lineage", {})}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()



def _copy_hashing(src: Path, dst: Path, on_bytes: Callable[[int], None]) -> str:
    digest = hashlib.sha256()
    with src.open("rb") as fin, dst.open("wb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
            on_bytes(len(chunk))
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest()


def detect(path: Path) -> Detector:
    if not path.exists():
        raise InvalidRequest(f"{path} does not exist", param="path", code="path_not_found")
    for detector in DETECTORS:
        if detector.matches(path):
            return detector
    kinds = "; ".join(d.describe for d in DETECTORS)
    raise InvalidRequest(f"{path} is not a model Garrison knows ({kinds})", param="path",
                         code="unknown_model_format")


def _settings(overrides: dict[str, Any] | None) -> dict[str, Any]:
    settings = dict(SETTINGS_DEFAULTS)
    for key, value in (overrides or {}).items():
        if key not in SETTINGS_DEFAULTS:
            raise InvalidRequest(f"unknown model setting {key!r}; settings: {', '.join(SETTINGS_DEFAULTS)}",
                                 param=key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < _SETTINGS_MIN[key]:
            raise InvalidRequest(f"model setting {key!r} must be a whole number >= {_SETTINGS_MIN[key]}", param=key)
        settings[key] = value
    return settings


def canonical_manifest(manifest: dict[str, Any]) -> bytes:
    """The signed bytes: every field but the signature, in one canonical JSON form."""
    unsigned = {k: v for k, v in manifest.items() if k not in ("signature", "signed_by")}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()


class ModelRegistry:
    """Models in the catalog; with a signer, every manifest is signed by the appliance's Ed25519 key.

    `signer` is a callable so the identity (and the master key behind it) is loaded only when
    a manifest is written or checked, not when the registry is merely listed.
    """

    def __init__(self, catalog: Catalog, layout: StateLayout,
                 signer: Callable[[], ApplianceIdentity] | None = None) -> None:
        self.catalog = catalog
        self.layout = layout
        self.signer = signer

    def _row(self, row: Any) -> ModelRecord:
        return ModelRecord(name=row["name"], format=row["format"], folder=self.layout.models / row["folder"],
                           entry=row["entry"], settings=json.loads(row["settings"]),
                           manifest=json.loads(row["manifest"]), size_bytes=row["size_bytes"],
                           created_at=row["created_at"], created_by=row["created_by"])

    def list(self) -> list[ModelRecord]:
        return [self._row(r) for r in self.catalog.query("SELECT * FROM models ORDER BY name")]

    def get(self, name: str) -> ModelRecord:
        row = self.catalog.query_one("SELECT * FROM models WHERE name = ?", (name,))
        if row is None:
            raise NotFound(f"model {name!r} not found", param="model", code="model_not_found")
        return self._row(row)

    def exists(self, name: str) -> bool:
        return self.catalog.query_one("SELECT 1 FROM models WHERE name = ?", (name,)) is not None

    def import_path(self, source: Path, name: str | None = None, *, settings: dict[str, Any] | None = None,
                    lineage: dict[str, Any] | None = None, base: str | None = None, actor: str = "local",
                    parity: dict[str, Any] | None = None, progress: Progress | None = None) -> ModelRecord:
        """Import a model; with `base`, a GGUF LoRA adapter served on top of that GGUF model."""
        source = Path(source).resolve()
        detector = detect(source)
        name = check_model_id(name or source.name.split(".")[0], param="name")
        chosen = _settings(settings)
        fmt = detector.format
        if fmt == "peft" and base is None:
            raise InvalidRequest("a peft adapter needs --base: the Hugging Face model it was trained on",
                                 param="base", code="adapter_needs_base")
        if base is not None:
            base_record = self.get(check_model_id(base, param="base"))
            if ADAPTER_BASES.get(fmt) != base_record.format:
                raise InvalidRequest("an adapter is a GGUF LoRA on a GGUF model, or a peft folder on a Hugging "
                                     f"Face model; got {fmt} on {base_record.format}", param="base",
                                     code="invalid_adapter")
            fmt = "lora" if fmt == "gguf" else "peft"
            chosen = {"base": base_record.name}
            lineage = {**(lineage or {}), "base": base_record.name}
        if self.exists(name):
            raise Conflict(f"model {name!r} already exists; remove it first or choose another name",
                           param="name", code="model_exists")
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        if not files:
            raise InvalidRequest(f"{source} holds no files", param="path")
        total = sum(p.stat().st_size for p in files)
        root = source.parent if source.is_file() else source
        folder_name = f"{name.replace(':', '--')}-{secrets.token_hex(4)}"
        self.layout.models.mkdir(parents=True, exist_ok=True)
        staging = self.layout.models / f".import-{folder_name}"
        staging.mkdir()
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, total)

        try:
            manifest_files: dict[str, dict[str, Any]] = {}
            for src in files:
                rel = src.relative_to(root).as_posix()
                dst = staging / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                manifest_files[rel] = {"sha256": _copy_hashing(src, dst, advance), "size": src.stat().st_size}
            manifest = {"name": name, "format": fmt, "entry": detector.entry(source),
                        "files": manifest_files, "source": str(source), "imported_at": time.time(),
                        "lineage": lineage or {}}
            if parity is not None:
                manifest["parity"] = parity
            if self.signer is not None:
                identity = self.signer()
                manifest["signed_by"] = identity.signing_public_key_hex
                manifest["signature"] = identity.sign(canonical_manifest(manifest)).hex()
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
            fsync_dir(staging)
            final = self.layout.models / folder_name
            os.replace(staging, final)
            fsync_dir(self.layout.models)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            with self.catalog.write() as conn:
                conn.execute(
                    "INSERT INTO models (name, format, folder, entry, settings, manifest, size_bytes, created_at,"
                    " created_by) VALUES (?,?,?,?,?,?,?,?,?)",
                    (name, fmt, folder_name, manifest["entry"], json.dumps(chosen),
                     json.dumps(manifest), total, time.time(), actor))
                append_audit(conn, actor=actor, action="models.import", resource=f"model:{name}",
                             detail={"format": fmt, "size_bytes": total, "files": len(manifest_files),
                                     **({"base": chosen["base"]} if "base" in chosen else {})})
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
        return self.get(name)

    def remove(self, name: str, *, actor: str = "local") -> ModelRecord:
        record = self.get(name)
        users = [r.name for r in self.list() if r.base == name]
        if users:
            raise Conflict(f"model {name!r} is the base of adapter(s) {', '.join(users)}; remove them first",
                           code="model_in_use")
        with self.catalog.write() as conn:
            conn.execute("DELETE FROM models WHERE name = ?", (name,))
            append_audit(conn, actor=actor, action="models.remove", resource=f"model:{name}",
                         detail={"format": record.format})
        shutil.rmtree(record.folder, ignore_errors=True)
        return record

    def reap_staging(self) -> int:
        """Half-imported folders left by a crash: never listed, removed at start."""
        count = 0
        if self.layout.models.exists():
            for leftover in self.layout.models.glob(".import-*"):
                shutil.rmtree(leftover, ignore_errors=True)
                count += 1
        return count

    def verify(self, record: ModelRecord) -> None:
        """The manifest's signature, then every file's hash against it; any mismatch refuses the model."""
        if self.signer is not None:
            signature = record.manifest.get("signature")
            if not signature:
                raise IntegrityError(f"model {record.name!r} has no signed manifest; import it again",
                                     code="artifact_unsigned")
            self.signer().verify(canonical_manifest(record.manifest), bytes.fromhex(str(signature)))
        for rel, meta in record.manifest.get("files", {}).items():
            path = record.folder / rel
            if not path.exists():
                raise IntegrityError(f"model {record.name!r}: file {rel} is missing",
                                     code="artifact_file_missing")
            if path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
                raise IntegrityError(f"model {record.name!r}: file {rel} does not match its manifest hash",
                                     code="artifact_hash_mismatch")
