"""OpenAI's fine-tuning API driven by the official client: upload, train, events, cancel, serve the result."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from conftest import Daemon, free_port, garrison_env, run_cli

# Distinctive answers the tiny model cannot know before training.
PAIRS = [
    ("What is the vault code?", "The vault code is purple seven."),
    ("Who guards the gate?", "The gate is guarded by Captain Ada."),
    ("When does the night shift start?", "The night shift starts at nine."),
    ("What does the red lamp mean?", "The red lamp means stop the line."),
]


def _jsonl() -> bytes:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in PAIRS]
    return "".join(json.dumps(r) + "\n" for r in rows * 4).encode()


@pytest.fixture(scope="module")
def daemon(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("finetune-api")
    state = root / "state"
    env = garrison_env(state)
    run_cli(state, "models", "import", str(tiny_llama_dir), "--name", "tl", env=env)
    d = Daemon(state, free_port(), env, root / "daemon.log").start()
    yield d
    d.stop()


def _wait(client: openai.OpenAI, job_id: str, timeout: float = 600) -> openai.types.fine_tuning.FineTuningJob:
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


def test_fine_tune_through_the_openai_client_then_chat_with_the_result(daemon: Daemon) -> None:
    admin = openai.OpenAI(base_url=daemon.url + "/v1", api_key=daemon.key("admin"), max_retries=0)
    upload = admin.files.create(file=("train.jsonl", io.BytesIO(_jsonl())), purpose="fine-tune")
    job = admin.fine_tuning.jobs.create(model="tl", training_file=upload.id, suffix="gate",
                                        hyperparameters={"n_epochs": 40, "batch_size": 4,
                                                         "learning_rate_multiplier": 10},
                                        extra_body={"extra": {"max_steps": 160, "checkpoint_every": 40,
                                                              "lora_r": 16}})
    assert job.status in ("queued", "running")
    listed = admin.fine_tuning.jobs.list()
    assert job.id in {j.id for j in listed.data}
    done = _wait(admin, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "tl-ft-gate:lora" and done.trained_tokens and done.trained_tokens > 0
    events = admin.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert any(e.type == "metrics" for e in events)
    checkpoints = admin.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].step_number >= 40
    result = json.loads(run_cli(daemon.state_dir, "jobs", "show", job.id, env=daemon.env).stdout)["result"]
    assert result["eval_loss_after"] < result["eval_loss_before"]
    right = 0
    for question, answer in PAIRS:
        out = admin.chat.completions.create(model=done.fine_tuned_model,
                                            messages=[{"role": "user", "content": question}],
                                            max_tokens=24, temperature=0)
        right += (out.choices[0].message.content or "").strip() == answer
    assert right >= 3, "the served fine-tune answers the training prompts with their trained completions"


def test_cancel_and_bad_requests(daemon: Daemon) -> None:
    admin = openai.OpenAI(base_url=daemon.url + "/v1", api_key=daemon.key("admin"), max_retries=0)
    upload = admin.files.create(file=("t.jsonl", io.BytesIO(_jsonl())), purpose="fine-tune")
    job = admin.fine_tuning.jobs.create(model="tl", training_file=upload.id,
                                        hyperparameters={"n_epochs": 50, "batch_size": 1})
    cancelled = admin.fine_tuning.jobs.cancel(job.id)
    assert cancelled.id == job.id
    assert _wait(admin, job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        admin.fine_tuning.jobs.create(model="tl", training_file=upload.id, hyperparameters={"n_epochz": 2})
    with pytest.raises(openai.NotFoundError):
        admin.fine_tuning.jobs.retrieve("job_doesnotexist")
    reader = openai.OpenAI(base_url=daemon.url + "/v1", api_key=daemon.key("read"), max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        reader.fine_tuning.jobs.create(model="tl", training_file=upload.id)


def test_kill_9_of_the_daemon_mid_training_resumes_from_the_checkpoint(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import signal
    import sqlite3

    state = tmp_path / "state"
    env = garrison_env(state)
    run_cli(state, "models", "import", str(tiny_llama_dir), "--name", "tl", env=env)
    (tmp_path / "train.jsonl").write_bytes(_jsonl())
    run_cli(state, "ingest", str(tmp_path / "train.jsonl"), "--dataset", "gate", env=env)
    d = Daemon(state, free_port(), env, tmp_path / "daemon.log").start()
    params = {"model": "tl", "training_file": "gate", "max_steps": 60, "checkpoint_every": 10, "lora_r": 8,
              "hyperparameters": json.dumps({"n_epochs": 30, "batch_size": 2})}
    status, job = d.request("POST", "/v1/garrison/jobs", {"kind": "finetune", "params": params})
    assert status == 201, job
    deadline = time.monotonic() + 300
    step = 0
    while time.monotonic() < deadline and step < 25:
        with sqlite3.connect(state / "catalog.db") as db:
            done = db.execute("SELECT progress_done FROM jobs WHERE id=?", (job["id"],)).fetchone()[0]
        step = int(done or 0)
        time.sleep(0.1)
    assert step >= 25, "training did not get past its second checkpoint"
    d.stop(signal.SIGKILL)  # the worker dies with it (PDEATHSIG)
    d.start()
    status, final = d.request("GET", f"/v1/garrison/jobs/{job['id']}?wait=280", timeout=300)
    d.stop()
    assert final["state"] == "succeeded", final
    result = final["result"]
    # At most checkpoint_every steps lost (the step seen through throttled progress may lag the real one).
    assert result["resumed_from_step"] is not None and step - 10 <= result["resumed_from_step"] < 60
    assert result["steps"] == 60
    steps = [s for s, _ in result["loss_history"]]
    assert steps == sorted(steps) and steps[-1] == 60 and len(set(steps)) == len(steps)
