"""Importance matrices computed on the appliance, read back as llama.cpp reads them, used by exports."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import garrison_env, run_cli

from garrison.converters.imatrix import builtin_calibration, compute_imatrix
from garrison.converters.quantize import load_imatrix


def test_imatrix_covers_every_matrix_with_gguf_names(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = compute_imatrix(tiny_llama_dir, builtin_calibration(50_000), tmp_path / "m.imatrix.gguf", max_chunks=4)
    data = load_imatrix(out)
    assert data.chunks == 4 and data.datasets == ["builtin"]
    expected = {f"blk.{i}.{t}.weight" for i in range(2)
                for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert expected | {"output.weight"} == set(data.entries)
    assert all(v.shape == (64,) or v.shape == (128,) for v in data.entries.values())
    assert all(float(v.min()) >= 0 for v in data.entries.values())


def test_export_with_an_imatrix_from_an_ingested_dataset(tiny_llama_dir: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = garrison_env(state)
    sample = Path(__file__).parents[2] / "garrison" / "data" / "support_sample.jsonl"
    run_cli(state, "ingest", str(sample), "--dataset", "calib", env=env)
    run_cli(state, "models", "import", str(tiny_llama_dir), "--name", "tl", env=env)
    job = json.loads(run_cli(state, "export", "tl", "--to", "gguf:q4_k_m", "--imatrix", "dataset:calib", "--json",
                             env=env, timeout=600).stdout)
    assert job["state"] == "succeeded", job
    artifact = job["result"]["artifacts"][0]
    assert artifact["parity"]["passed"]
    manifest = json.loads(run_cli(state, "models", "show", "tl:q4_k_m", env=env).stdout)
    assert manifest["lineage"]["quantization"]["imatrix"] == "dataset:calib"
    bad = run_cli(state, "export", "tl", "--to", "gguf:q4_k_m", "--imatrix", "/nonexistent", "--json", env=env,
                  check=False)
    assert bad.returncode == 2 and "imatrix_invalid" in bad.stderr, bad  # refused at submission: no job queued
