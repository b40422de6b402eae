"""Evaluation jobs end to end: the CLI and the API score models on a dataset's held-out records, the rows equal
a plain reference computation, and records a compared model trained on are never scored as held-out."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, free_port, garrison_env, run_cli

from garrison.training.evaluation import label_metrics, token_f1, validation_indices

COLOURS = ("blue", "green", "red", "yellow", "white")


def _records(numbers: range = range(40)) -> list[dict[str, Any]]:
    """Chat records with nothing the ingest policy redacts (the vault keeps what is scored)."""
    return [{"messages": [{"role": "system", "content": "You answer questions about the shop's stock."},
                          {"role": "user", "content": f"Which colour is item number {i} of the catalogue?"},
                          {"role": "assistant", "content": f"Item {i} is {COLOURS[i % 5]} and ships in a box."}]}
            for i in numbers]


@pytest.fixture(scope="module")
def world(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("evals")
    state = root / "state"
    env = garrison_env(state)
    run_cli(state, "models", "import", str(tiny_llama_dir), "--name", "tl", env=env)
    sample = root / "support.jsonl"
    sample.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    run_cli(state, "ingest", str(sample), "--dataset", "support", env=env)
    run_cli(state, "export", "tl", "--to", "gguf:q8_0", env=env, timeout=600)
    yield {"state": state, "env": env, "root": root}


def _reference_perplexity(model_dir: Path, records: list[Any], indices: list[int]) -> float:
    """Plain transformers: the model's own shifted cross-entropy over the assistant labels."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from garrison.training.data import tokenize_chat

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in indices:
            example, _ = tokenize_chat(tokenizer, records[i], 2048)
            assert example is not None
            labels = torch.tensor([example.labels])
            n = int((labels[0, 1:] != -100).sum())
            loss = model(torch.tensor([example.input_ids]), labels=labels).loss
            total += float(loss) * n
            count += n
    return math.exp(total / count)


def test_eval_rows_equal_a_plain_reference_computation(world: dict[str, Any], tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    out = run_cli(world["state"], "eval", "tl", "tl:q8_0", "--dataset", "support", "--max-new-tokens", "6",
                  "--json", env=world["env"], timeout=600)
    evaluation = json.loads(out.stdout)
    records = _records()
    # No fine-tune used the dataset: the fine-tune's default split (seed 42, 10%), recorded with the result.
    _, held = validation_indices(AutoTokenizer.from_pretrained(tiny_llama_dir), records, fraction=0.1, seed=42,
                                 max_seq_len=2048)
    split = evaluation["split"]
    assert split["indices"] == sorted(held) and split["held_out"] == 4 and split["dataset"] == "support:1"
    rows = {row["model"]: row for row in evaluation["rows"]}
    assert list(rows) == ["tl", "tl:q8_0"]
    expected = _reference_perplexity(tiny_llama_dir, records, split["indices"])
    assert rows["tl"]["metrics"]["perplexity"] == pytest.approx(expected, rel=1e-4)
    # The GGUF is scored on the same token ids; q8_0 stays within its parity bound of the source.
    assert rows["tl:q8_0"]["metrics"]["perplexity"] == pytest.approx(expected, rel=0.03)
    for row in rows.values():
        assert 0 <= row["metrics"]["exact_match"] <= 1 and 0 <= row["metrics"]["f1"] <= 1
        assert row["metrics"]["records"] == 4
    assert rows["tl:q8_0"]["lineage"]["source"] == "tl"
    assert "tl:q8_0" in evaluation["table"] and "ppl" in evaluation["table"]
    # Stored: listed and shown again, as JSON and as the table.
    listed = json.loads(run_cli(world["state"], "evals", "list", "--json", env=world["env"]).stdout)["data"]
    assert evaluation["id"] in {e["id"] for e in listed}
    table = run_cli(world["state"], "evals", "show", evaluation["id"], env=world["env"]).stdout
    assert table.splitlines()[1].split()[:2] == ["model", "format"] and "tl:q8_0" in table


def test_eval_through_the_api_and_grants(world: dict[str, Any]) -> None:
    d = Daemon(world["state"], free_port(), world["env"], world["root"] / "daemon.log").start()
    try:
        status, job = d.request("POST", "/v1/garrison/evals",
                                {"models": ["tl"], "dataset": "support", "max_new_tokens": 0, "max_records": 2})
        assert status == 202, job
        status, done = d.request("GET", f"/v1/garrison/jobs/{job['id']}?wait=280", timeout=300)
        assert done["state"] == "succeeded", done
        status, evaluation = d.request("GET", f"/v1/garrison/evals/{done['result']['evaluation']}")
        assert status == 200 and evaluation["rows"][0]["metrics"]["records"] == 2
        assert "exact_match" not in evaluation["rows"][0]["metrics"]
        # A key not granted the model sees neither the table nor the job's start.
        status, body = d.request("POST", "/v1/garrison/keys", {"role": "operator", "models": ["other"]})
        key = body["key"]
        status, body = d.request("GET", f"/v1/garrison/evals/{evaluation['id']}", key=key)
        assert status == 403 and body["error"]["code"] == "resource_not_granted"
        status, body = d.request("GET", "/v1/garrison/evals", key=key)
        assert status == 200 and body["data"] == []
        status, body = d.request("POST", "/v1/garrison/evals", {"models": ["tl"], "dataset": "support"}, key=key)
        assert status == 403
        status, body = d.request("POST", "/v1/garrison/evals", {"models": ["nope"], "dataset": "support"})
        assert status == 404
    finally:
        d.stop()


def test_records_a_model_trained_on_are_not_scored(world: dict[str, Any], tmp_path: Path) -> None:
    """A fine-tune on the whole dataset (its validation set given separately) leaves nothing held out of it; its
    validation dataset is held out, except the copies it holds of records the model trained on."""
    state, env = world["state"], world["env"]
    copies = [dict(r, note="copied") for r in _records(range(2))]  # same conversations, another key order
    val = _records(range(40, 48)) + copies
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    run_cli(state, "ingest", str(tmp_path / "val.jsonl"), "--dataset", "val", env=env)
    run_cli(state, "finetune", "tl", "support", "--validation", "val", "--max-steps", "1", "--suffix", "all",
            "--lora-r", "4", env=env, timeout=900)
    refused = run_cli(state, "eval", "tl", "tl-ft-all:lora", "--dataset", "support", env=env, check=False)
    assert refused.returncode != 0 and "eval_no_held_out_records" in refused.stderr
    out = run_cli(state, "eval", "tl-ft-all", "tl-ft-all:lora", "--dataset", "val", "--max-new-tokens", "4",
                  "--json", env=env, timeout=600)
    evaluation = json.loads(out.stdout)
    assert evaluation["split"]["held_out"] == 8 and evaluation["split"]["excluded_as_learned"] == 2
    assert evaluation["split"]["compared_with_training_data_of"] == ["support:1"]
    assert {u["role"] for u in evaluation["split"]["training_uses"]} == {"validation"}
    rows = {r["model"]: r["metrics"] for r in evaluation["rows"]}
    # The peft adapter (merged in the worker) and its GGUF LoRA on the base's GGUF compute the same model.
    assert rows["tl-ft-all:lora"]["perplexity"] == pytest.approx(rows["tl-ft-all"]["perplexity"], rel=0.03)
    # A key not granted the training dataset cannot probe it through the comparison: it is listed, not opened.
    d = Daemon(state, free_port(), env, world["root"] / "daemon-learned.log").start()
    try:
        status, body = d.request("POST", "/v1/garrison/keys", {"role": "operator", "models": ["tl-ft-all", "tl"],
                                                                 "datasets": ["val"]})
        assert status == 201, body
        status, job = d.request("POST", "/v1/garrison/evals", {"models": ["tl-ft-all"], "dataset": "val",
                                                                "max_new_tokens": 0}, key=body["key"])
        assert status == 202, job
        status, done = d.request("GET", f"/v1/garrison/jobs/{job['id']}?wait=280", key=body["key"], timeout=300)
        assert done["state"] == "succeeded", done
        status, shown = d.request("GET", f"/v1/garrison/evals/{done['result']['evaluation']}", key=body["key"])
        assert shown["split"]["not_compared_with"] == ["support:1"] and shown["split"]["held_out"] == 10
    finally:
        d.stop()


def test_label_and_answer_metrics() -> None:
    assert token_f1("The router restarts.", "router restarts") == 1.0
    assert token_f1("reset the password", "password reset link") == pytest.approx(0.8)
    metrics = label_metrics(["spam", "ham", "spam", "ham"], ["spam", "spam", "Spam.", "ham"])
    assert metrics["accuracy"] == 0.75
    assert metrics["per_label"]["spam"] == {"precision": pytest.approx(2 / 3, abs=1e-6), "recall": 1.0,
                                            "f1": pytest.approx(0.8), "support": 2}
    assert metrics["per_label"]["ham"]["recall"] == 0.5
