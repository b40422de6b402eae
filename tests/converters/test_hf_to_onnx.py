"""HF -> ONNX export of the tiny real models: valid graphs, complete folders, atomic publication.

Exports are built once per module (seconds each); the equivalence of what they compute
with the PyTorch models is proved in tests/engine/test_onnx_engine.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from garrison.converters.hf_to_gguf import ConversionError
from garrison.converters.hf_to_onnx import (
    MANIFEST,
    check_onnx_files,
    choose_task,
    export_hf_to_onnx,
    quantize_onnx_dir,
    read_manifest,
)
from garrison.errors import GarrisonError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama_onnx(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_hf_to_onnx(tiny_llama_dir, tmp_path_factory.mktemp("onnx") / "llama").path


@pytest.fixture(scope="module")
def bert_onnx(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_hf_to_onnx(tiny_bert_dir, tmp_path_factory.mktemp("onnx") / "bert").path


def graph_io(path: Path) -> tuple[list[str], list[str]]:
    model = onnx.load(str(path), load_external_data=False)
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


def test_decoder_export_has_kv_cache_and_passes_checker(llama_onnx: Path, tiny_llama_dir: Path) -> None:
    assert check_onnx_files(llama_onnx) == [llama_onnx / "model.onnx"]
    inputs, outputs = graph_io(llama_onnx / "model.onnx")
    assert {"input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.1.value"} <= set(inputs)
    assert {"logits", "present.0.key", "present.1.value"} <= set(outputs)
    manifest = read_manifest(llama_onnx)
    assert manifest["task"] == "text-generation-with-past"
    assert manifest["kind"] == "decoder"
    assert manifest["precision"] == "fp32"
    assert manifest["architecture"] == "LlamaForCausalLM"
    # The engine tokenizes and templates from the export alone: those files are copied byte for byte.
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (llama_onnx / name).read_bytes() == (tiny_llama_dir / name).read_bytes()
    template = tiny_llama_dir / "chat_template.jinja"
    if template.exists():
        assert (llama_onnx / "chat_template.jinja").read_bytes() == template.read_bytes()
    assert json.loads((llama_onnx / "config.json").read_text())["max_position_embeddings"] == 512


def test_encoder_export_carries_pooling_files(bert_onnx: Path, tiny_bert_dir: Path) -> None:
    check_onnx_files(bert_onnx)
    inputs, outputs = graph_io(bert_onnx / "model.onnx")
    assert "input_ids" in inputs and "attention_mask" in inputs
    assert outputs[0] == "last_hidden_state"
    assert read_manifest(bert_onnx)["kind"] == "encoder"
    for rel in ("modules.json", "1_Pooling/config.json", "tokenizer.json", "vocab.txt"):
        assert (bert_onnx / rel).read_bytes() == (tiny_bert_dir / rel).read_bytes(), rel


def test_int8_is_smaller_and_valid(llama_onnx: Path, tmp_path: Path) -> None:
    out = quantize_onnx_dir(llama_onnx, tmp_path / "llama-int8", "int8")
    check_onnx_files(out.path)
    fp32_size = (llama_onnx / "model.onnx").stat().st_size
    int8_size = out.model_path.stat().st_size
    assert int8_size < 0.6 * fp32_size, (int8_size, fp32_size)
    ops = {node.op_type for node in onnx.load(str(out.model_path)).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    manifest = read_manifest(out.path)
    assert (manifest["precision"], manifest["kind"]) == ("int8", "decoder")
    assert manifest["task"] == "text-generation-with-past"
    assert (out.path / "tokenizer.json").exists()
    assert not any(p.name.startswith(".llama-int8.partial-") for p in tmp_path.iterdir())


def test_fp16_export_in_one_call(tiny_bert_dir: Path, tmp_path: Path) -> None:
    out = export_hf_to_onnx(tiny_bert_dir, tmp_path / "bert-fp16", precision="fp16")
    check_onnx_files(out.path)
    graph = onnx.load(str(out.model_path)).graph
    float_types = {init.data_type for init in graph.initializer
                   if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    assert float_types == {onnx.TensorProto.FLOAT16}
    assert (out.path / "1_Pooling" / "config.json").exists()
    assert not (out.path / "fp32").exists()  # the intermediate fp32 graph is not shipped
    assert sorted(p.name for p in out.path.glob("*.onnx*")) == ["model.onnx"]


@pytest.mark.parametrize(("architectures", "task", "kind"), [
    (["LlamaForCausalLM"], "text-generation-with-past", "decoder"),
    (["GPT2LMHeadModel"], "text-generation-with-past", "decoder"),
    (["BertModel"], "feature-extraction", "encoder"),
    (["XLMRobertaModel"], "feature-extraction", "encoder"),
    (["BertForMaskedLM"], "feature-extraction", "encoder"),
])
def test_task_table(architectures: list[str], task: str, kind: str) -> None:
    assert choose_task({"architectures": architectures})[:2] == (task, kind)


@pytest.mark.parametrize("config", [
    {"architectures": ["BertForSequenceClassification"]},
    {"architectures": ["T5ForConditionalGeneration"]},
    {},
])
def test_task_table_refusals(config: dict[str, object]) -> None:
    with pytest.raises(ConversionError) as info:
        choose_task(config)
    assert info.value.code == "unsupported_architecture"
    assert isinstance(info.value, GarrisonError)


def test_model_type_optimum_cannot_export_is_refused_early(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "model_type": "foo"}))
    with pytest.raises(ConversionError) as info:
        export_hf_to_onnx(src, tmp_path / "out")
    assert info.value.code == "unsupported_architecture"
    assert "foo" in info.value.message
    assert not (tmp_path / "out").exists()


def test_failed_export_leaves_nothing(tiny_llama_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "no-weights"
    src.mkdir()
    (src / "config.json").write_bytes((tiny_llama_dir / "config.json").read_bytes())
    with pytest.raises(ConversionError) as info:
        export_hf_to_onnx(src, tmp_path / "out", validate=False)
    assert info.value.code == "export_failed"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith("-lock")) == ["no-weights"]


def test_bad_arguments_have_codes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError) as info:
        export_hf_to_onnx(tiny_llama_dir, tmp_path / "out", precision="int4")
    assert info.value.code == "invalid_precision"
    with pytest.raises(ConversionError) as info:
        export_hf_to_onnx(tmp_path, tmp_path / "out")
    assert info.value.code == "invalid_model"
    with pytest.raises(ConversionError) as info:
        export_hf_to_onnx(tiny_llama_dir, tmp_path / "out", task="image-classification")
    assert info.value.code == "unsupported_task"


def test_existing_output_needs_overwrite(llama_onnx: Path, tmp_path: Path) -> None:
    target = tmp_path / "q"
    quantize_onnx_dir(llama_onnx, target, "int8")
    with pytest.raises(ConversionError) as info:
        quantize_onnx_dir(llama_onnx, target, "int8")
    assert info.value.code == "output_exists"
    (target / "marker").write_text("old")
    quantize_onnx_dir(llama_onnx, target, "fp16", overwrite=True)
    assert read_manifest(target)["precision"] == "fp16"
    assert not (target / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith("-lock")) == ["q"]
    with pytest.raises(ConversionError) as info:
        quantize_onnx_dir(target, tmp_path / "again", "int8")
    assert info.value.code == "invalid_precision"  # quantizing an already-quantized export


KILL_SCRIPT = """
import sys, time
from pathlib import Path
import garrison.converters.hf_to_onnx as mod
real = mod._run_optimum
def slow(*args, **kwargs):
    real(*args, **kwargs)
    Path(sys.argv[3]).write_text("exported")
    time.sleep(120)
mod._run_optimum = slow
mod.export_hf_to_onnx(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def test_killed_export_publishes_nothing_and_next_export_cleans_up(tiny_bert_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bert"
    marker = tmp_path / "marker"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tiny_bert_dir), str(out), str(marker)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the export never got past optimum"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # Killed after the graph was written: it exists only in the partial folder.
    partials = list(tmp_path.glob(".bert.partial-*"))
    assert len(partials) == 1 and (partials[0] / "model.onnx").exists()
    assert not out.exists()
    export_hf_to_onnx(tiny_bert_dir, out)
    check_onnx_files(out)
    assert (out / MANIFEST).exists()
    assert not list(tmp_path.glob(".bert.partial-*"))
