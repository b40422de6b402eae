"""Pruning and distillation jobs end to end: prune, export, serve; distill with a kill -9 mid-run; lineage and
the evaluation each job produces; a teacher whose tokenizer differs is refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import Daemon, free_port, garrison_env, run_cli

COLOURS = ("blue", "green", "red", "yellow", "white")


def _records() -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": f"Which colour is item number {i} of the catalogue?"},
                          {"role": "assistant", "content": f"Item {i} is {COLOURS[i % 5]} and ships in a box."}]}
            for i in range(40)]


def _manifest(state: Path, name: str) -> dict[str, Any]:
    import sqlite3

    with sqlite3.connect(state / "catalog.db") as db:
        return dict(json.loads(db.execute("SELECT manifest FROM models WHERE name=?", (name,)).fetchone()[0]))


@pytest.fixture(scope="module")
def world(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("compression")
    state = root / "state"
    env = garrison_env(state)
    run_cli(state, "models", "import", str(tiny_llama_dir), "--name", "tl", env=env)
    sample = root / "shop.jsonl"
    sample.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    run_cli(state, "ingest", str(sample), "--dataset", "shop", env=env)
    yield {"state": state, "env": env, "root": root}


def test_prune_then_export_then_serve(world: dict[str, Any]) -> None:
    state, env = world["state"], world["env"]
    out = run_cli(state, "prune", "tl", "--depth", "50%", "--width", "25%", "--calibration", "shop", "--suffix", "s",
                  "--export", "gguf:q8_0", "--json", env=env, timeout=900)
    job = json.loads(out.stdout)
    assert job["state"] == "succeeded", job
    result = job["result"]
    assert result["model"] == "tl-pruned-s" and result["exports"] == ["tl-pruned-s:q8_0"]
    assert result["size_bytes"] < result["source_size_bytes"]
    config = json.loads(next((state / "models").glob("tl-pruned-s-*/config.json")).read_text())
    assert config["num_hidden_layers"] == 1 and config["intermediate_size"] == 96
    lineage = _manifest(state, "tl-pruned-s")["lineage"]
    assert lineage["source"] == "tl" and lineage["calibration"] == "shop:1"
    assert lineage["pruning"]["removed_layers"] and lineage["pruning"]["intermediate_size"] == 96
    assert lineage["training_uses"][0]["role"] == "split"
    assert _manifest(state, "tl-pruned-s")["signature"]
    # The evaluation made at the end: source, pruned model and its export, on the calibration's held-out split.
    rows = {r["model"]: r["metrics"] for r in result["rows"]}
    assert list(rows) == ["tl", "tl-pruned-s", "tl-pruned-s:q8_0"]
    assert all(m["perplexity"] > 1 and m["records"] == 4 for m in rows.values())
    shown = json.loads(run_cli(state, "evals", "show", result["evaluation"], "--json", env=env).stdout)
    assert shown["split"]["training_uses"][0]["job"] == job["id"]
    d = Daemon(state, free_port(), env, world["root"] / "daemon.log").start()
    try:
        client = openai.OpenAI(base_url=d.url + "/v1", api_key=d.key("infer"), max_retries=0)
        answer = client.chat.completions.create(model="tl-pruned-s:q8_0", max_tokens=8, temperature=0,
                                                messages=[{"role": "user", "content": "Which colour is item 3?"}])
        assert answer.choices[0].finish_reason in ("stop", "length")
    finally:
        d.stop()


def test_heads_and_embedding_channels_pruned_then_exported_to_both_formats_and_served(world: dict[str, Any]) -> None:
    """The Minitron width axes beyond MLP channels: fewer query heads and a smaller hidden size (which no longer
    equals heads x head_dim) still make a model that llama.cpp and ONNX Runtime run as transformers does."""
    state, env = world["state"], world["env"]
    out = run_cli(state, "prune", "tl", "--width", "25%", "--heads", "50%", "--hidden", "25%", "--calibration",
                  "shop", "--suffix", "h", "--export", "gguf:q8_0,onnx:fp32", "--json", env=env, timeout=900)
    job = json.loads(out.stdout)
    assert job["state"] == "succeeded", job
    result = job["result"]
    assert result["exports"] == ["tl-pruned-h:q8_0", "tl-pruned-h:onnx-fp32"]
    config = json.loads(next((state / "models").glob("tl-pruned-h-*/config.json")).read_text())
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"],
            config["head_dim"], config["intermediate_size"]) == (48, 2, 2, 16, 96)
    plan = _manifest(state, "tl-pruned-h")["lineage"]["pruning"]
    assert plan["head_strategy"] == "per_group" and plan["hidden_fraction"] == 0.25
    assert [m["model"] for m in result["rows"]] == ["tl", "tl-pruned-h", *result["exports"]]
    d = Daemon(state, free_port(), env, world["root"] / "daemon-h.log").start()
    try:
        client = openai.OpenAI(base_url=d.url + "/v1", api_key=d.key("infer"), max_retries=0)
        for model in result["exports"]:
            answer = client.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                                    messages=[{"role": "user", "content": "Which colour is item 3?"}])
            assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens > 0
    finally:
        d.stop()


def test_prune_refusals(world: dict[str, Any]) -> None:
    state, env = world["state"], world["env"]
    for args, code in ((["--depth", "0"], "prune_nothing"), (["--depth", "x"], "invalid_request"),
                       (["--heads", "1"], "prune_heads_uneven"), (["--hidden", "100%"], "invalid_request"),
                       (["--depth", "1", "--calibration", "nope"], "not_found")):
        refused = run_cli(state, "prune", "tl", *args, env=env, check=False)
        assert refused.returncode != 0 and code in refused.stderr, refused.stderr


def test_distill_heals_and_resumes_after_kill_9(world: dict[str, Any]) -> None:
    import signal
    import sqlite3
    import time

    state, env = world["state"], world["env"]
    run_cli(state, "prune", "tl", "--width", "50%", "--calibration", "shop", "--suffix", "w", env=env, timeout=600)
    d = Daemon(state, free_port(), env, world["root"] / "daemon-distill.log").start()
    try:
        params = {"teacher": "tl", "student": "tl-pruned-w", "dataset": "shop", "max_steps": 40,
                  "checkpoint_every": 5, "suffix": "h", "eval_max_new_tokens": 4,
                  "hyperparameters": json.dumps({"n_epochs": 30, "batch_size": 2, "learning_rate_multiplier": 50})}
        status, job = d.request("POST", "/v1/garrison/jobs", {"kind": "distill", "params": params})
        assert status == 201, job
        deadline = time.monotonic() + 300
        step = 0
        while time.monotonic() < deadline and step < 12:
            with sqlite3.connect(state / "catalog.db") as db:
                step = int(db.execute("SELECT progress_done FROM jobs WHERE id=?", (job["id"],)).fetchone()[0] or 0)
            time.sleep(0.1)
        assert step >= 12, "distillation did not get past its second checkpoint"
        d.stop(signal.SIGKILL)  # the worker dies with it
        d.start()
        status, final = d.request("GET", f"/v1/garrison/jobs/{job['id']}?wait=280", timeout=300)
    finally:
        d.stop()
    assert final["state"] == "succeeded", final
    result = final["result"]
    assert result["resumed_from_step"] is not None and step - 5 <= result["resumed_from_step"] < 40
    assert result["steps"] == 40 and result["teacher_cache_reused"]  # the teacher ran once, before the kill
    steps = [s for s, _ in result["loss_history"]]
    assert steps == sorted(steps) and steps[-1] == 40 and len(set(steps)) == len(steps)
    # Healing: the student's held-out perplexity comes down towards the teacher's.
    rows = {r["model"]: r["metrics"]["perplexity"] for r in result["rows"]}
    assert list(rows) == ["tl", "tl-pruned-w", "tl-pruned-w-distilled-h"]
    assert rows["tl-pruned-w-distilled-h"] < rows["tl-pruned-w"]
    lineage = _manifest(state, "tl-pruned-w-distilled-h")["lineage"]
    assert lineage["teacher"] == "tl" and lineage["student"] == "tl-pruned-w"
    assert lineage["pruning"]["intermediate_size"] == 64 and lineage["calibration"] == "shop:1"
    assert lineage["distillation"]["top_k"] == 16
    # The teacher's targets are cached encrypted: no record text in the cache file.
    cache = next((state / "cache" / "distill").glob("*/teacher-top-k.gck")).read_bytes()
    assert b"catalogue" not in cache and b"top_k" not in cache


def test_a_teacher_with_another_tokenizer_is_refused(world: dict[str, Any], tiny_bpe_llama_dir: Path) -> None:
    state, env = world["state"], world["env"]
    run_cli(state, "models", "import", str(tiny_bpe_llama_dir), "--name", "bpe", env=env)
    refused = run_cli(state, "distill", "bpe", "tl", "shop", env=env, check=False)
    assert refused.returncode != 0 and "distill_tokenizer_mismatch" in refused.stderr, refused.stderr
    jobs = json.loads(run_cli(state, "jobs", "list", "--kind", "distill", "--json", env=env).stdout)
    assert all(j["params"]["teacher"] != "bpe" for j in (jobs if isinstance(jobs, list) else jobs["data"]))


def test_a_restricted_key_owns_what_its_jobs_make(world: dict[str, Any]) -> None:
    """A key granted only `tl` and `shop` prunes `tl`: the job evaluates and exports its result (which needs
    the grant), and the key, and no other, can use it afterwards; the grant is audited."""
    state, env = world["state"], world["env"]
    d = Daemon(state, free_port(), env, world["root"] / "daemon-own.log").start()
    try:
        keys = {}
        for name in ("maker", "other"):
            status, body = d.request("POST", "/v1/garrison/keys", {"role": "operator", "name": name,
                                                                     "models": ["tl"], "datasets": ["shop"]})
            assert status == 201, body
            keys[name] = body
        status, job = d.request("POST", "/v1/garrison/jobs", key=keys["maker"]["key"], body={
            "kind": "prune", "params": {"model": "tl", "depth": "1", "calibration": "shop", "suffix": "own",
                                        "export": "gguf:q8_0"}})
        assert status == 201, job
        status, done = d.request("GET", f"/v1/garrison/jobs/{job['id']}?wait=280", key=keys["maker"]["key"],
                                 timeout=300)
        assert done["state"] == "succeeded", done
        assert [r["model"] for r in done["result"]["rows"]] == ["tl", "tl-pruned-own", "tl-pruned-own:q8_0"]
        seen = {name: {m["id"] for m in d.request("GET", "/v1/garrison/models", key=keys[name]["key"])[1]["data"]}
                for name in keys}
        assert {"tl-pruned-own", "tl-pruned-own:q8_0"} <= seen["maker"]
        assert not any(m.startswith("tl-pruned-own") for m in seen["other"])
        client = openai.OpenAI(base_url=d.url + "/v1", api_key=keys["maker"]["key"], max_retries=0)
        answer = client.chat.completions.create(model="tl-pruned-own:q8_0", max_tokens=4, temperature=0,
                                                messages=[{"role": "user", "content": "Which colour is item 3?"}])
        assert answer.choices[0].message.content is not None
        grants = [e for e in d.request("GET", "/v1/garrison/audit?limit=1000")[1]["data"]
                  if e["action"] == "keys.grant"]
        assert [(e["resource"], e["detail"]["models"], e["detail"]["job"]) for e in grants] == \
            [(keys["maker"]["id"], ["tl-pruned-own"], job["id"])]
    finally:
        d.stop()
