"""A fine-tune answers as it was trained when served: train/serve parity of prompt tokens, end to end.

The tiny SentencePiece Llama's template ends its generation prompt with `assistant: `. Before
garrison.engine.prompt_tokens, training tokenized the whole conversation (the space and the answer's
first word one token, '▁The') while serving tokenized the rendered prompt (a lone '▁' at its end):
the served fine-tune answered with a fragment. Now one rule holds on both sides and the served model,
asked greedily, gives its one trained completion exactly, as a GGUF LoRA and as a merged GGUF.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from conftest import Daemon, free_port, garrison_env, run_cli

# The answer's words are ones the tiny base has seen often enough: a LoRA cannot lift the output rows of
# tokens the base never learned (its lm_head is frozen), whatever the tokenization.
QUESTION, ANSWER = "Where is the model stored?", "The model is stored on the appliance."


@pytest.fixture(scope="module")
def daemon(tiny_spaced_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("finetune-parity")
    state = root / "state"
    env = garrison_env(state)
    run_cli(state, "models", "import", str(tiny_spaced_llama_dir), "--name", "spaced", env=env)
    d = Daemon(state, free_port(), env, root / "daemon.log").start()
    yield d
    d.stop()


def test_one_row_fine_tune_answers_its_trained_completion_exactly_lora_and_merged(daemon: Daemon) -> None:
    admin = openai.OpenAI(base_url=daemon.url + "/v1", api_key=daemon.key("admin"), max_retries=0)
    row = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}
    upload = admin.files.create(file=("one.jsonl", io.BytesIO((json.dumps(row) + "\n").encode())),
                                purpose="fine-tune")
    job = admin.fine_tuning.jobs.create(model="spaced", training_file=upload.id, suffix="store",
                                        hyperparameters={"n_epochs": 100, "batch_size": 1,
                                                         "learning_rate_multiplier": 10},
                                        extra_body={"extra": {"lora_r": 16, "export": "gguf:f16"}})
    deadline = time.monotonic() + 900
    while (job := admin.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, "the fine-tune did not finish"
        time.sleep(0.5)
    assert job.status == "succeeded", job.error
    result = json.loads(run_cli(daemon.state_dir, "jobs", "show", job.id, env=daemon.env).stdout)["result"]
    assert job.fine_tuned_model == "spaced-ft-store:lora"
    assert result["exports"] == ["spaced-ft-store-merged:f16"]
    for model in (job.fine_tuned_model, *result["exports"]):
        out = admin.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=24, temperature=0)
        assert out.choices[0].message.content == ANSWER, model
        assert out.choices[0].finish_reason == "stop"
