"""Multi-process training through torchrun (DDP) on the CPU with gloo: both ranks train, rank 0 saves."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from garrison.training.checkpoints import list_checkpoints, load_checkpoint

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
KEY = bytes(range(32))

PAIRS = [("falcon", "plums"), ("otter", "kelp"), ("badger", "honey"), ("heron", "minnows"), ("beaver", "willow"),
         ("lynx", "hares"), ("moose", "lilies"), ("raven", "acorns"), ("walrus", "clams"), ("panda", "bamboo"),
         ("koala", "leaves"), ("gecko", "crickets")]


def records(n: int = len(PAIRS)) -> list[dict[str, Any]]:
    """The factory each rank imports (--records test_ddp:records): records built in memory, never on disk."""
    return [{"messages": [{"role": "user", "content": f"What does the {a} eat?"},
                          {"role": "assistant", "content": f"The {a} eats {b}."}]} for a, b in PAIRS[:n]]


@pytest.mark.slow
def test_two_gloo_ranks_train_together_and_rank0_saves(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from garrison.training.ddp import launch
    from garrison.training.finetune import FinetuneConfig

    config = FinetuneConfig(base_model=str(tiny_llama_dir), n_epochs=4, batch_size=4, learning_rate=1e-2,
                            max_seq_len=128, lora_r=8, lora_alpha=16, lora_dropout=0.1, eval_every=0,
                            checkpoint_every=4, validation_fraction=0, devices="cpu")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(REPO)]), OMP_NUM_THREADS="1")
    events: list[dict[str, Any]] = []
    workdir = tmp_path / "job"
    result = launch(config, "test_ddp:records", records_kwargs={"n": 12}, val_records="test_ddp:records",
                    val_records_kwargs={"n": 12}, workdir=workdir, checkpoint_key=KEY, nproc=2, on_event=events.append,
                    env=env, timeout=300)

    assert result["state"] == "succeeded" and result["device"]["world_size"] == 2
    assert result["step"] == result["total_steps"] == 4 * 3  # 12 examples / batch 4 (global) x 4 epochs
    done = {e["rank"]: e for e in events if e["event"] == "rank_done"}
    assert set(done) == {0, 1}, "both ranks finish"
    assert all(d["rank_tokens"] > 0 for d in done.values()), "both ranks trained on their share"
    assert done[0]["weights_sha256"] == done[1]["weights_sha256"], "DDP keeps the replicas identical"
    assert result["eval_loss_after"] < 0.5 * result["eval_loss_before"], "loss decreases"
    losses = [loss for _, loss in result["loss_history"]]
    assert losses[-1] < losses[0]
    progress = [e for e in events if e["event"] == "progress" and e["kind"] == "step"]
    assert [e["step"] for e in progress] == list(range(1, 13)), "only rank 0 reports, once per step"

    out = workdir / "output"
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert json.loads((workdir / "result.json").read_text())["step"] == 12
    steps = [s for s, _ in list_checkpoints(workdir / "checkpoints")]
    assert steps[-1] == 12
    state = load_checkpoint(workdir / "checkpoints" / f"ckpt-{12:010d}.gck", KEY)
    assert state["world_size"] == 2 and len(state["rng"]) == 2, "every rank's random state is kept"
