"""Several GPUs (or CPU processes) through PyTorch's own torchrun and DistributedDataParallel.

Two halves:

* `launch()` runs in the worker: it starts ``python -m torch.distributed.run --standalone
  --nproc_per_node N -m garrison.training.ddp ...`` (torchrun picks a free rendezvous port
  itself, so concurrent jobs never collide), reads rank 0's JSON-lines events from its
  stdout, and returns the result.
* `main()` is the per-rank entry that torchrun starts: it joins the process group (NCCL on
  GPUs, gloo on the CPU), builds its records, and calls the same `train()` as a single
  process. Every rank trains on its share of each step's examples, DDP averages gradients,
  and rank 0 alone writes checkpoints, the output folder and ``result.json``.

What crosses the process boundary, and how:

* Records never touch the disk, not even in a pipe buffer file: each rank calls a factory
  named by import path (``--records package.module:function``, with JSON keyword arguments)
  that decrypts them in its own memory (the dataset glue opens the vault there).
* The checkpoint key is never on a command line (world-readable in /proc): it comes from
  ``GARRISON_CHECKPOINT_KEY_FILE`` (a 0600 file, e.g. under the unit's RuntimeDirectory) or
  ``GARRISON_CHECKPOINT_KEY`` (hex; the environment of a process is readable only by its
  user and root), and `launch()` passes it through the environment.
* Stopping: SIGTERM to torchrun is forwarded to every rank; a rank's handler (or the file
  ``workdir/STOP``) makes `should_stop()` true, the ranks agree through an all-reduce,
  and all of them stop after the same step with a checkpoint saved.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from garrison.errors import JobFailed

KEY_ENV = "GARRISON_CHECKPOINT_KEY"
KEY_FILE_ENV = "GARRISON_CHECKPOINT_KEY_FILE"
RESULT_FILE = "result.json"
STOP_FILE = "STOP"


def _resolve(spec: str) -> Callable[..., Iterable[dict[str, Any]]]:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"records factory must be 'package.module:function', not {spec!r}")
    func = getattr(importlib.import_module(module), name)
    if not callable(func):
        raise ValueError(f"{spec} is not callable")
    return func


def _read_key() -> bytes:
    path = os.environ.get(KEY_FILE_ENV)
    if path:
        return Path(path).read_bytes().strip()
    raw = os.environ.get(KEY_ENV, "")
    if not raw:
        raise SystemExit(f"no checkpoint key: set {KEY_FILE_ENV} or {KEY_ENV}")
    return bytes.fromhex(raw)


def _emit(kind: str, payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps({"event": kind, **payload}, default=str) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    """Per-rank entry (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""
    parser = argparse.ArgumentParser(prog="python -m garrison.training.ddp")
    parser.add_argument("--config", required=True, help="FinetuneConfig as a JSON file")
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--records", required=True, help="package.module:function returning training records")
    parser.add_argument("--records-kwargs", default="{}", help="JSON object of keyword arguments for --records")
    parser.add_argument("--val-records", default=None, help="package.module:function for validation records")
    parser.add_argument("--val-records-kwargs", default="{}")
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    from garrison.training.finetune import FinetuneConfig, FinetuneResult, ProgressEvent, train

    config = FinetuneConfig.from_dict(json.loads(Path(args.config).read_text()))
    use_cuda = config.devices != "cpu" and torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    stop = {"flag": False}

    def on_term(_signum: int, _frame: Any) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_term)
    stop_file = args.workdir / STOP_FILE

    def should_stop() -> bool:
        return stop["flag"] or stop_file.exists()

    def on_progress(event: ProgressEvent) -> None:
        _emit("progress", event.as_dict())

    records = _resolve(args.records)
    kwargs = json.loads(args.records_kwargs)
    val: Callable[[], Iterable[dict[str, Any]]] | None = None
    if args.val_records:
        val_factory = _resolve(args.val_records)
        val_kwargs = json.loads(args.val_records_kwargs)

        def val() -> Iterable[dict[str, Any]]:
            return val_factory(**val_kwargs)

    try:
        result: FinetuneResult = train(config, lambda: records(**kwargs), val, workdir=args.workdir,
                                       checkpoint_key=_read_key(), on_progress=on_progress,
                                       should_stop=should_stop)
        _emit("rank_done", {"rank": rank, "step": result.step, "state": result.state,
                            "weights_sha256": result.weights_sha256,
                            "rank_tokens": result.device.get("rank_tokens")})
        if rank == 0:
            out = result.as_dict()
            tmp = args.workdir / f".{RESULT_FILE}.tmp"
            tmp.write_text(json.dumps(out, default=str))
            os.replace(tmp, args.workdir / RESULT_FILE)
            _emit("result", out)
    finally:
        dist.destroy_process_group()
    return 0


def launch(config: Any, records: str, *, workdir: Path, checkpoint_key: bytes, nproc: int,
           records_kwargs: dict[str, Any] | None = None, val_records: str | None = None,
           val_records_kwargs: dict[str, Any] | None = None,
           on_event: Callable[[dict[str, Any]], None] | None = None, env: dict[str, str] | None = None,
           timeout: float | None = None) -> dict[str, Any]:
    """Run a DDP job with torchrun and return rank 0's result (a FinetuneResult as a dict).

    `config` is a FinetuneConfig. Events (progress, rank_done, result) go to `on_event` as
    they arrive. Raises `JobFailed` with the tail of torchrun's output when a rank fails.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "ddp_config.json"
    config_path.write_text(json.dumps(config.as_dict()))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", str(nproc), "-m", "garrison.training.ddp", "--config", str(config_path),
           "--workdir", str(workdir), "--records", records, "--records-kwargs", json.dumps(records_kwargs or {})]
    if val_records:
        cmd += ["--val-records", val_records, "--val-records-kwargs", json.dumps(val_records_kwargs or {})]
    child_env = dict(os.environ if env is None else env)
    child_env[KEY_ENV] = checkpoint_key.hex()
    # OpenMP threads that spin while another process holds their core collapse CPU throughput.
    child_env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    child_env.pop(KEY_FILE_ENV, None)
    (workdir / RESULT_FILE).unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env)
    result: dict[str, Any] | None = None
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "result":
                result = {k: v for k, v in event.items() if k != "event"}
            if on_event is not None:
                on_event(event)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
    stderr = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0 or result is None:
        raise JobFailed(f"distributed training exited {proc.returncode}: {stderr[-2000:]}", code="training_failed")
    return result


if __name__ == "__main__":
    raise SystemExit(main())
