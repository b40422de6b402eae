"""The model registry: formats recognised, names checked, files hashed, imports atomic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from garrison.errors import Conflict, IntegrityError, InvalidRequest
from garrison.models.names import check_model_id, check_name
from garrison.models.registry import ModelRegistry, sha256_file
from garrison.paths import StateLayout
from garrison.store.catalog import Catalog


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    layout = StateLayout(tmp_path / "state")
    layout.ensure()
    return ModelRegistry(Catalog(layout.catalog), layout)


@pytest.mark.parametrize("name", ["", "../x", "a/b", "..", ".hidden", "x" * 97, "a b", "a:b", "a\\b", "é"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_name(name)
    assert caught.value.code == "invalid_model_name"


def test_variants_in_ids() -> None:
    assert check_model_id("base:q4_k_m") == "base:q4_k_m"
    with pytest.raises(InvalidRequest):
        check_model_id("base:../x")


def test_import_hashes_every_file(registry: ModelRegistry, tiny_llama_gguf: Path, tiny_llama_dir: Path) -> None:
    gguf = registry.import_path(tiny_llama_gguf, "g")
    assert gguf.format == "gguf" and gguf.servable
    assert gguf.manifest["files"][tiny_llama_gguf.name]["sha256"] == sha256_file(tiny_llama_gguf)
    hf = registry.import_path(tiny_llama_dir, "h")
    assert hf.format == "hf" and not hf.servable
    assert set(hf.manifest["files"]) >= {"config.json", "model.safetensors", "tokenizer.model"}
    on_disk = json.loads((hf.folder / "manifest.json").read_text())
    assert on_disk["files"] == hf.manifest["files"]
    registry.verify(gguf)
    assert [r.name for r in registry.list()] == ["g", "h"]


def test_conflicts_and_unknown_formats_change_nothing(registry: ModelRegistry, tiny_llama_gguf: Path,
                                                      tmp_path: Path) -> None:
    registry.import_path(tiny_llama_gguf, "g")
    with pytest.raises(Conflict):
        registry.import_path(tiny_llama_gguf, "g")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model")
    with pytest.raises(InvalidRequest) as caught:
        registry.import_path(junk, "j")
    assert caught.value.code == "unknown_model_format"
    with pytest.raises(InvalidRequest):
        registry.import_path(tmp_path / "missing.gguf", "m")
    assert [r.name for r in registry.list()] == ["g"]
    assert sorted(p.name.split("-")[0] for p in registry.layout.models.iterdir()) == ["g"]


def test_a_crashed_import_leaves_nothing_listed(registry: ModelRegistry, tiny_llama_gguf: Path) -> None:
    def explode(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        registry.import_path(tiny_llama_gguf, "g", progress=explode)
    assert registry.list() == [] and list(registry.layout.models.iterdir()) == []
    (registry.layout.models / ".import-left-by-kill-9").mkdir()
    assert registry.reap_staging() == 1


def test_verify_and_remove(registry: ModelRegistry, tiny_llama_gguf: Path) -> None:
    record = registry.import_path(tiny_llama_gguf, "g")
    with (record.entry_path).open("r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(IntegrityError) as caught:
        registry.verify(record)
    assert caught.value.code == "artifact_hash_mismatch"
    registry.remove("g")
    assert registry.list() == [] and not record.folder.exists()
