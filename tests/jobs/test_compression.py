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


def test_prune_refusals(world: dict[str, Any]) -> None:
    state, env = world["state"], world["env"]
    for args, code in ((["--depth", "0"], "prune_nothing"), (["--depth", "x"], "invalid_request"),
                       (["--depth", "1", "--calibration", "nope"], "not_found")):
        refused = run_cli(state, "prune", "tl", *args, env=env, check=False)
        assert refused.returncode != 0 and code in refused.stderr, refused.stderr
