"""HF folder -> ONNX through optimum-onnx, then optional int8 / fp16 quantization.

Runs in worker processes (it imports torch through optimum); the daemon only ever loads
the result with onnxruntime (garrison.engine.onnx_engine).

Why the pieces are shaped this way:

* The export task comes from the model's declared architectures through TASK_RULES, a
  small table, rather than optimum's own inference: optimum guesses from the Hub (no
  network here) and would pick "sentence_transformers" as the library for folders with
  modules.json, which needs a package we do not ship. Decoders get KV-cache inputs
  ("text-generation-with-past"), because generating without a cache re-runs the whole
  prefix for every token.
* Everything is written into a partial folder beside the target and renamed into place
  with os.replace, so a killed export never leaves a half-written model where the engine
  would load it. A lock file serializes exports of one target, which makes it safe to
  delete partial folders that killed exports left behind.
* Every .onnx file that reaches the target passed onnx.checker, path-based, because the
  in-memory checker refuses models over 2 GB (their weights live in external data files).
* The output is self-contained: tokenizer files, chat template and the
  sentence-transformers pooling files are copied, since the engine reads them and must
  not need the source folder (or transformers) at serving time.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from garrison.converters.hf_to_gguf import ConversionError
from garrison.store.durable import fsync_dir

Kind = Literal["decoder", "encoder"]

PRECISIONS = ("fp32", "fp16", "int8")
MODEL_FILE = "model.onnx"
# Written last into every export: what it is, so the engine and the catalog need not guess.
MANIFEST = "garrison_onnx.json"
MANIFEST_FORMAT = 1
# Protobuf cannot hold more than 2 GiB; above a margin below that, weights go to external data.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass(frozen=True)
class TaskRule:
    """Maps an architecture class name (regex, searched) to an optimum task and an engine kind."""

    pattern: str
    task: str
    kind: Kind


# First match wins; order from specific to general. Heads we cannot serve (classification,
# QA, seq2seq) match nothing and are refused with unsupported_architecture.
TASK_RULES: tuple[TaskRule, ...] = (
    TaskRule(r"(ForCausalLM|LMHeadModel)$", "text-generation-with-past", "decoder"),
    TaskRule(r"(ForMaskedLM|^[A-Za-z0-9]+Model)$", "feature-extraction", "encoder"),
)

TASK_KINDS: dict[str, Kind] = {
    "text-generation-with-past": "decoder",
    "text-generation": "decoder",
    "feature-extraction": "encoder",
}

# Files the engine reads besides the graph; copied byte for byte from the source folder,
# so the tokenizer the engine sees is the one the model was trained with.
SIDECAR_FILES: tuple[str, ...] = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
)
# Written by optimum to describe the exported graph (e.g. use_cache); copied only when optimum did not.
CONFIG_FILES: tuple[str, ...] = ("config.json", "generation_config.json")


@dataclass(frozen=True)
class OnnxExport:
    """What an export produced: the folder, its graph file and how it was made."""

    path: Path
    model_file: str
    task: str
    kind: Kind
    precision: str
    architecture: str | None
    seconds: float

    @property
    def model_path(self) -> Path:
        return self.path / self.model_file


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json of an HF folder; a folder without one is not a model we can export."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{model_dir} is not a Hugging Face model folder (no config.json)",
                              code="invalid_model")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConversionError(f"cannot read {path}: {err}", code="invalid_model") from err
    if not isinstance(data, dict):
        raise ConversionError(f"{path} is not a JSON object", code="invalid_model")
    return data


def choose_task(config: dict[str, Any]) -> tuple[str, Kind, str]:
    """(optimum task, engine kind, architecture) for a config, from TASK_RULES."""
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if not architectures:
        raise ConversionError("config.json names no architectures; pass the task explicitly "
                              f"({', '.join(TASK_KINDS)})", code="unsupported_architecture")
    for arch in architectures:
        for rule in TASK_RULES:
            if re.search(rule.pattern, arch):
                return rule.task, rule.kind, arch
    raise ConversionError(f"cannot export {', '.join(architectures)} to ONNX: only causal language models "
                          "(…ForCausalLM) and encoders for embeddings (…Model, …ForMaskedLM) are served",
                          code="unsupported_architecture", details={"architectures": architectures})


def _check_optimum_support(model_type: str | None, task: str) -> None:
    """Refuse before loading weights when optimum has no ONNX config for this model type/task."""
    try:
        import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
        from optimum.exporters.tasks import TasksManager
    except ImportError as err:
        raise ConversionError(f"ONNX export needs the 'onnx' extra (optimum-onnx, torch): {err}",
                              code="converter_missing") from err

    if not model_type:
        raise ConversionError("config.json has no model_type", code="invalid_model")
    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
    except KeyError as err:
        raise ConversionError(f"optimum-onnx cannot export model type {model_type!r} to ONNX",
                              code="unsupported_architecture", details={"model_type": model_type}) from err
    if task not in tasks:
        raise ConversionError(f"optimum-onnx cannot export a {model_type!r} model for {task!r} "
                              f"(it supports: {', '.join(sorted(tasks))})", code="unsupported_architecture",
                              details={"model_type": model_type, "task": task})


def check_onnx_files(folder: Path) -> list[Path]:
    """onnx.checker on every .onnx in folder, by path (works for models with external data)."""
    import onnx

    files = sorted(Path(folder).glob("*.onnx"))
    if not files:
        raise ConversionError(f"no .onnx file in {folder}", code="onnx_check_failed")
    for path in files:
        try:
            onnx.checker.check_model(str(path), full_check=False)
        except (onnx.checker.ValidationError, OSError, ValueError) as err:
            raise ConversionError(f"{path.name} fails onnx.checker: {err}", code="onnx_check_failed") from err
    return files


def _graph_bytes(model_path: Path) -> int:
    """Size of the graph plus its external data files (what the quantizer will have to hold)."""
    folder = model_path.parent
    stem = model_path.name
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.startswith(stem))


def _quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 (weights int8, activations quantized at run time): no calibration data needed.

    QInt8 weights with MatMulInteger is what ONNX Runtime's CPU kernels are fastest at on
    x86 with VNNI and on ARM; per-tensor keeps the file loadable by every provider.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(model_input=src, model_output=dst, weight_type=QuantType.QInt8, per_channel=False,
                     use_external_data_format=_graph_bytes(src) > _EXTERNAL_DATA_THRESHOLD)


def _convert_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and fp16 inputs/outputs (the KV cache halves too), for GPU serving.

    keep_io_types=False on purpose: with True, onnxruntime's converter appends the input
    casts after their consumers and the graph fails onnx.checker's topological-order rule.
    The engine reads each input's element type, so fp16 past_key_values are fed as such.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    large = _graph_bytes(src) > _EXTERNAL_DATA_THRESHOLD
    model = onnx.load(str(src), load_external_data=True)
    # Shape inference serializes the model, which fails above 2 GB; the converter then works without it.
    model16 = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=large)
    onnx.save_model(model16, str(dst), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=f"{dst.name}_data" if large else None)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder, so the rename that publishes them cannot land before their bytes."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))



@contextmanager
def _staging(out_dir: Path, overwrite: bool) -> Iterator[Path]:
    """A partial folder beside out_dir, published with os.replace on success, removed on failure."""
    out_dir = Path(out_dir)
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    name = out_dir.name
    with open(parent / f".{name}.onnx-lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise ConversionError(f"another export into {out_dir} is running", code="export_in_progress") from err
        if out_dir.exists() and not overwrite:
            raise ConversionError(f"{out_dir} already exists", code="output_exists")
        # We hold the lock, so partial folders of this target belong to exports that died.
        for stale in parent.glob(f".{name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent))
        try:
            yield work
            _fsync_tree(work)
            if out_dir.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent))
                os.replace(out_dir, old / name)
                os.replace(work, out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(work, out_dir)
            fsync_dir(parent)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _pooling_paths(model_dir: Path) -> list[str]:
    """Folders named by modules.json (1_Pooling, 2_Normalize, ...): the engine's pooling recipe."""
    modules = model_dir / "modules.json"
    if not modules.is_file():
        return []
    try:
        entries = json.loads(modules.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ConversionError(f"cannot read {modules}: {err}", code="invalid_model") from err
    return [str(e["path"]) for e in entries if isinstance(e, dict) and e.get("path")]


def copy_sidecars(model_dir: Path, dest: Path) -> list[str]:
    """Copy tokenizer, chat template and pooling files; returns the relative paths copied."""
    copied: list[str] = []
    for name in SIDECAR_FILES:
        src = model_dir / name
        if src.is_file():
            shutil.copy2(src, dest / name)
            copied.append(name)
    for name in CONFIG_FILES:
        if (model_dir / name).is_file() and not (dest / name).exists():
            shutil.copy2(model_dir / name, dest / name)
            copied.append(name)
    for rel in _pooling_paths(model_dir):
        src_dir = (model_dir / rel).resolve()
        if model_dir.resolve() not in src_dir.parents or not src_dir.is_dir():
            continue  # a path outside the model folder is not ours to copy
        for src in src_dir.rglob("*"):
            if src.is_file() and src.suffix in {".json", ".txt"}:
                target = dest / src.relative_to(model_dir.resolve())
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
                copied.append(str(target.relative_to(dest)))
        (dest / rel).mkdir(parents=True, exist_ok=True)  # Normalize folders are empty but named
    return copied


def _quantize_into(src_model: Path, dest: Path, precision: str) -> None:
    """Write dest/model.onnx at precision from an fp32 graph; dest must not hold a model.onnx yet."""
    target = dest / MODEL_FILE
    try:
        if precision == "int8":
            _quantize_int8(src_model, target)
        elif precision == "fp16":
            _convert_fp16(src_model, target)
        else:
            raise ConversionError(f"unknown precision {precision!r}", code="invalid_precision")
    except ConversionError:
        raise
    except Exception as err:
        raise ConversionError(f"{precision} quantization failed: {type(err).__name__}: {err}",
                              code="quantization_failed") from err


def _write_manifest(dest: Path, export: OnnxExport, source: str) -> None:
    import onnxruntime

    manifest = {
        "format": MANIFEST_FORMAT, "model_file": export.model_file, "task": export.task, "kind": export.kind,
        "precision": export.precision, "architecture": export.architecture, "source": source,
        "onnxruntime": onnxruntime.__version__,
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def read_manifest(onnx_dir: Path) -> dict[str, Any]:
    """The export's manifest, or {} for a folder exported by something else."""
    path = Path(onnx_dir) / MANIFEST
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _validate_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConversionError(f"unknown ONNX precision {precision!r}; choose from {', '.join(PRECISIONS)}",
                              code="invalid_precision")


def export_hf_to_onnx(model_dir: Path, out_dir: Path, *, precision: str = "fp32", task: str | None = None,
                      opset: int | None = None, validate: bool = True, overwrite: bool = False) -> OnnxExport:
    """Export an HF folder to out_dir (model.onnx + tokenizer + pooling files + manifest).

    task overrides TASK_RULES (an optimum task name); validate makes optimum compare the
    ONNX outputs with PyTorch's on dummy inputs (it warns, not fails, on small drifts; the
    parity gate is the real check). Raises ConversionError with a stable code.
    """
    _validate_precision(precision)
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    architectures = config.get("architectures") or []
    arch: str | None = architectures[0] if architectures and isinstance(architectures[0], str) else None
    if task is None:
        task, kind, arch = choose_task(config)
    elif task in TASK_KINDS:
        kind = TASK_KINDS[task]
    else:
        raise ConversionError(f"unsupported ONNX task {task!r}; choose from {', '.join(TASK_KINDS)}",
                              code="unsupported_task")
    _check_optimum_support(config.get("model_type"), task)

    started = time.monotonic()
    with _staging(Path(out_dir), overwrite) as work:
        raw = work / "fp32" if precision != "fp32" else work
        _run_optimum(model_dir, raw, task, opset, validate)
        check_onnx_files(raw)
        if precision != "fp32":
            _quantize_into(raw / MODEL_FILE, work, precision)
            for extra in raw.iterdir():  # optimum's config.json / generation_config.json describe the graph
                if extra.is_file() and not extra.name.startswith(MODEL_FILE) and not (work / extra.name).exists():
                    shutil.copy2(extra, work / extra.name)
            shutil.rmtree(raw)
        copy_sidecars(model_dir, work)
        check_onnx_files(work)
        export = OnnxExport(path=Path(out_dir), model_file=MODEL_FILE, task=task, kind=kind, precision=precision,
                            architecture=arch, seconds=0.0)
        _write_manifest(work, export, source=str(model_dir))
    return OnnxExport(path=Path(out_dir), model_file=MODEL_FILE, task=task, kind=kind, precision=precision,
                      architecture=arch, seconds=time.monotonic() - started)


def quantize_onnx_dir(src_dir: Path, out_dir: Path, precision: str, *, overwrite: bool = False) -> OnnxExport:
    """A new export folder at precision from an fp32 export, without running PyTorch again.

    One fp32 export can then feed several artifacts (int8 for CPU, fp16 for GPU).
    """
    _validate_precision(precision)
    src_dir = Path(src_dir)
    manifest = read_manifest(src_dir)
    if manifest.get("precision", "fp32") != "fp32":
        raise ConversionError(f"{src_dir} is already {manifest['precision']}; quantize from an fp32 export",
                              code="invalid_precision")
    src_model = src_dir / str(manifest.get("model_file", MODEL_FILE))
    if not src_model.is_file():
        raise ConversionError(f"no {src_model.name} in {src_dir}", code="invalid_model")
    started = time.monotonic()
    with _staging(Path(out_dir), overwrite) as work:
        if precision == "fp32":
            shutil.copytree(src_dir, work, dirs_exist_ok=True)
        else:
            _quantize_into(src_model, work, precision)
            for item in src_dir.iterdir():
                if item.name.startswith(src_model.name) or item.name == MANIFEST:
                    continue  # the graph and its external data were replaced
                if item.is_dir():
                    shutil.copytree(item, work / item.name)
                else:
                    shutil.copy2(item, work / item.name)
        check_onnx_files(work)
        task = str(manifest.get("task", "")) or "unknown"
        kind: Kind = "decoder" if manifest.get("kind") == "decoder" else "encoder"
        export = OnnxExport(path=Path(out_dir), model_file=MODEL_FILE, task=task, kind=kind, precision=precision,
                            architecture=manifest.get("architecture"), seconds=0.0)
        _write_manifest(work, export, source=str(manifest.get("source", src_dir)))
    return OnnxExport(path=Path(out_dir), model_file=MODEL_FILE, task=task, kind=kind, precision=precision,
                      architecture=export.architecture, seconds=time.monotonic() - started)


def _run_optimum(model_dir: Path, out: Path, task: str, opset: int | None, validate: bool) -> None:
    """optimum's main_export, offline, library fixed to transformers; its failures become ConversionError."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
        from optimum.exporters.onnx import main_export
    except ImportError as err:
        raise ConversionError(f"ONNX export needs the 'onnx' extra (optimum-onnx, torch): {err}",
                              code="converter_missing") from err
    try:
        with warnings.catch_warnings():
            # The tracer warns about every Python branch on tensor shapes, and torch about optimum's use of
            # its legacy exporter: expected, and nothing an operator can act on.
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            # Llama's graph indexes with non-negative indices only; the parity tests hold it to PyTorch.
            warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
            main_export(str(model_dir), out, task=task, opset=opset, device="cpu", local_files_only=True,
                        library_name="transformers", do_validation=validate, framework="pt")
    except ConversionError:
        raise
    except Exception as err:
        message = str(err).strip().splitlines()
        raise ConversionError(f"optimum-onnx export failed: {type(err).__name__}: "
                              f"{message[0] if message else ''}", code="export_failed") from err
