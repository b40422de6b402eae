"""GGUF quantization through llama.cpp: every listed type loads and generates, failures leave nothing.

The tiny Llama has rows of 64 (and 128) columns, below the 256-column blocks of K- and
IQ-quants: llama.cpp falls back per tensor to a compatible type, so these tests prove the
whole menu works on such models, not the bit widths of the big ones.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest

from garrison.converters.hf_to_gguf import ConversionError
from garrison.converters.quantize import QUANT_TYPES, Imatrix, gguf_py, load_imatrix, quant_type, quantize_gguf
from garrison.errors import GarrisonError

pytestmark = pytest.mark.slow


def weight_shapes(gguf_file: Path) -> dict[str, int]:
    """Matrix tensors of a GGUF and their row length (ggml ne[0]), what an imatrix entry covers."""
    reader = gguf_py().GGUFReader(str(gguf_file))
    return {str(t.name): int(t.shape[0]) for t in reader.tensors if len(t.shape) == 2}


def column_weights(ncols: int, skew: bool) -> np.ndarray:
    """Mean squared activation per input column: uniform, or the first half 100x more important."""
    weights = np.ones(ncols, dtype=np.float32)
    if skew:
        weights[: ncols // 2] = 100.0
    return weights


def write_imatrix_gguf(path: Path, shapes: dict[str, int], *, skew: bool = False, calls: int = 4) -> Path:
    """llama-imatrix's GGUF layout: <tensor>.in_sum2 (sum of squares) and <tensor>.counts, plus metadata."""
    gguf = gguf_py()
    writer = gguf.GGUFWriter(str(path), arch="imatrix")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", ["test-corpus.txt"])
    writer.add_uint32("imatrix.chunk_count", 3)
    writer.add_uint32("imatrix.chunk_size", 512)
    for name, ncols in shapes.items():
        writer.add_tensor(f"{name}.in_sum2", column_weights(ncols, skew) * calls)
        writer.add_tensor(f"{name}.counts", np.array([calls], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_imatrix_legacy(path: Path, shapes: dict[str, int], *, skew: bool = False, calls: int = 2) -> Path:
    """The legacy .dat: count, then (name length, name, ncall, nval, values) per entry, chunks, dataset."""
    out = [struct.pack("<i", len(shapes))]
    for name, ncols in shapes.items():
        raw = name.encode()
        out.append(struct.pack(f"<i{len(raw)}sii", len(raw), raw, calls, ncols))
        out.append((column_weights(ncols, skew) * calls).astype("<f4").tobytes())
    dataset = b"legacy-corpus.txt"
    out.append(struct.pack(f"<ii{len(dataset)}s", 5, len(dataset), dataset))
    path.write_bytes(b"".join(out))
    return path


@pytest.fixture(scope="module")
def uniform_imatrix(tiny_llama_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imatrix_gguf(tmp_path_factory.mktemp("imatrix") / "uniform.imatrix.gguf",
                              weight_shapes(tiny_llama_gguf))


@pytest.fixture(scope="module")
def quantized(tiny_llama_gguf: Path, uniform_imatrix: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Every listed type, quantized once for the module (milliseconds each on the tiny model)."""
    out = tmp_path_factory.mktemp("quantized")
    files = {}
    for name, row in QUANT_TYPES.items():
        imatrix = uniform_imatrix if row.imatrix is Imatrix.REQUIRED else None
        files[name] = quantize_gguf(tiny_llama_gguf, out / f"tiny-{name}.gguf", name, nthread=1, imatrix=imatrix)
    yield files


def complete(path: Path, verdicts: Any, prompt: str = "Hello") -> tuple[dict[str, Any], dict[str, str]]:
    """Greedy 8 tokens with end-of-sequence banned (quantization may turn the argmax into EOS at once),
    in a runner process as the daemon would serve the model; and the file's GGUF metadata."""
    from conftest import gguf_runner

    from garrison.engine.types import Finish, GenerationRequest, SamplingParams

    async def run() -> dict[str, Any]:
        async with gguf_runner(path, verdicts) as engine:
            tokens = await engine.tokenize(prompt, add_special=True, parse_special=False)
            req = GenerationRequest(tokens, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
            parts, finish = [], None
            async for item in engine.generate(req):
                parts.append(item.text)
                if isinstance(item, Finish):
                    finish = item
            assert finish is not None
            return {"text": "".join(parts), "completion_tokens": finish.completion_tokens}

    reader = gguf_py().GGUFReader(str(path))
    metadata = {name: str(field.contents()) for name, field in reader.fields.items()
                if not name.startswith("tokenizer.ggml.")}
    return asyncio.run(run()), metadata


@pytest.mark.parametrize("qtype", list(QUANT_TYPES))
def test_each_type_writes_a_gguf_that_loads_and_generates(quantized: dict[str, Path], tiny_llama_gguf: Path,
                                                           qtype: str, repack_verdicts: Any) -> None:
    out = quantized[qtype]
    assert out.is_file() and out.read_bytes()[:4] == b"GGUF"
    assert not list(out.parent.glob(".*partial"))
    result, metadata = complete(out, repack_verdicts)
    assert result["completion_tokens"] == 8
    assert result["text"].strip()
    # llama.cpp records the preset it was asked for, whatever per-tensor fallbacks it took.
    assert int(metadata["general.file_type"]) == QUANT_TYPES[qtype].ftype
    if qtype not in {"f16", "bf16"}:
        assert out.stat().st_size < tiny_llama_gguf.stat().st_size


def test_k_quants_fall_back_per_tensor_on_narrow_rows(quantized: dict[str, Path]) -> None:
    """Rows of 64 cannot hold 256-blocks: Q4_K_M's matrices become Q5_0/Q8_0, never a failure."""
    reader = gguf_py().GGUFReader(str(quantized["q4_k_m"]))
    types = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    assert "Q4_K" not in types
    assert types <= {"Q5_0", "Q5_1", "Q8_0", "F16"}


def test_names_are_case_insensitive_and_the_table_is_complete() -> None:
    assert quant_type("Q4_K_M") is QUANT_TYPES["q4_k_m"]
    for required in ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "iq4_xs"):
        assert required in QUANT_TYPES
    for name, row in QUANT_TYPES.items():
        assert name == row.name == name.lower()
        assert row.description and isinstance(row.imatrix, Imatrix)


def test_unknown_type_is_a_clear_error(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError) as info:
        quantize_gguf(tiny_llama_gguf, tmp_path / "out.gguf", "q3_xl")
    assert isinstance(info.value, GarrisonError)
    assert info.value.code == "unknown_quant_type"
    assert "q4_k_m" in info.value.message
    assert list(tmp_path.iterdir()) == []


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ConversionError) as info:
        quantize_gguf(tmp_path / "absent.gguf", tmp_path / "out.gguf", "q8_0")
    assert info.value.code == "source_missing"


def test_not_a_gguf_fails_with_llama_cpps_reason_and_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src" / "model.gguf"
    src.parent.mkdir()
    src.write_bytes(b"not a gguf at all" * 100)
    out_dir = tmp_path / "out"
    with pytest.raises(ConversionError) as info:
        quantize_gguf(src, out_dir / "out.gguf", "q8_0", nthread=1)
    assert info.value.code == "quantize_failed"
    assert "q8_0" in info.value.message and len(info.value.message) > len("llama.cpp could not quantize to q8_0: ")
    assert list(out_dir.iterdir()) == []


def test_required_imatrix_is_refused_before_work(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError) as info:
        quantize_gguf(tiny_llama_gguf, tmp_path / "out.gguf", "iq3_xxs")
    assert info.value.code == "imatrix_required"
    assert list(tmp_path.iterdir()) == []


def test_requantizing_fails_and_leaves_nothing(quantized: dict[str, Path], tmp_path: Path) -> None:
    dst = tmp_path / "twice.gguf"
    with pytest.raises(ConversionError) as info:
        quantize_gguf(quantized["q8_0"], dst, "q4_0", nthread=1)
    assert info.value.code == "already_quantized"
    assert list(tmp_path.iterdir()) == []


def test_mismatched_imatrix_fails_and_leaves_nothing(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    shapes = {name: ncols - 1 for name, ncols in weight_shapes(tiny_llama_gguf).items()}
    bad = write_imatrix_gguf(tmp_path / "bad.imatrix.gguf", shapes)
    out_dir = tmp_path / "out"
    with pytest.raises(ConversionError) as info:
        quantize_gguf(tiny_llama_gguf, out_dir / "out.gguf", "q4_0", nthread=1, imatrix=bad)
    assert info.value.code == "imatrix_mismatch"
    assert list(out_dir.iterdir()) == []


def test_interrupted_quantization_leaves_nothing_visible(tiny_llama_gguf: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception mid-write (Ctrl-C in a worker) removes the partial file; dst never appears."""
    def dies_halfway(fname_inp: bytes, fname_out: bytes, params: Any) -> int:
        Path(fname_out.decode()).write_bytes(b"GGUF half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        quantize_gguf(tiny_llama_gguf, tmp_path / "out.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []


def test_leftover_partial_of_a_killed_run_is_replaced(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    (tmp_path / ".out.gguf.partial").write_bytes(b"left by a SIGKILL")
    out = quantize_gguf(tiny_llama_gguf, tmp_path / "out.gguf", "q8_0", nthread=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("fmt", ["gguf", "legacy"])
def test_precomputed_imatrix_is_used_and_recorded(tiny_llama_gguf: Path, tmp_path: Path, fmt: str,
                                                  repack_verdicts: Any) -> None:
    shapes = weight_shapes(tiny_llama_gguf)
    # Non-uniform weights (first half of every row 100x more important), so the rounding must change.
    path = (write_imatrix_gguf(tmp_path / "m.imatrix.gguf", shapes, skew=True) if fmt == "gguf"
            else write_imatrix_legacy(tmp_path / "m.imatrix.dat", shapes, skew=True))
    data = load_imatrix(path)
    assert set(data.entries) == set(shapes)
    for name, values in data.entries.items():  # sums / counts, as llama-quantize computes them
        np.testing.assert_allclose(values, column_weights(shapes[name], skew=True))
    assert data.datasets == (["test-corpus.txt"] if fmt == "gguf" else ["legacy-corpus.txt"])

    plain = quantize_gguf(tiny_llama_gguf, tmp_path / "plain.gguf", "q4_0", nthread=1)
    weighted = quantize_gguf(tiny_llama_gguf, tmp_path / "weighted.gguf", "q4_0", nthread=1, imatrix=path)
    result, metadata = complete(weighted, repack_verdicts)
    assert result["completion_tokens"] > 0
    assert metadata["quantize.imatrix.file"] == path.name
    assert int(metadata["quantize.imatrix.entries_count"]) == len(shapes)
    assert metadata["quantize.imatrix.dataset"] == data.datasets[0]
    assert plain.read_bytes() != weighted.read_bytes()


def test_unreadable_imatrix_is_a_clear_error(tiny_llama_gguf: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x01\x00\x00\x00\xff\xff\xff\x7f")
    with pytest.raises(ConversionError) as info:
        quantize_gguf(tiny_llama_gguf, tmp_path / "out.gguf", "q4_0", imatrix=junk)
    assert info.value.code == "imatrix_invalid"
    assert not (tmp_path / "out.gguf").exists()
