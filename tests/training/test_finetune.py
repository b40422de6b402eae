"""The fine-tuning loop on the tiny Llama: what it learns, what it masks, how it survives kill -9.

Every test trains the real tiny model (hidden 64, 2 layers) for a few dozen steps on the CPU;
the shared training run is module-scoped so its seconds are paid once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from garrison.errors import IntegrityError, InvalidRequest
from garrison.training import data as td
from garrison.training.checkpoints import list_checkpoints, load_checkpoint, save_checkpoint
from garrison.training.finetune import FinetuneConfig, FinetuneResult, ProgressEvent, train

KEY = bytes(range(32))
PAIRS = [("falcon", "plums"), ("otter", "kelp"), ("badger", "honey"), ("heron", "minnows"), ("beaver", "willow"),
         ("lynx", "hares"), ("moose", "lilies"), ("raven", "acorns"), ("walrus", "clams"), ("panda", "bamboo"),
         ("koala", "leaves"), ("gecko", "crickets"), ("bison", "clover"), ("camel", "dates"), ("llama", "hay"),
         ("puffin", "sprats"), ("tapir", "figs"), ("yak", "moss"), ("zebra", "grass"), ("mole", "grubs")]


def records() -> list[dict[str, Any]]:
    """20 question/answer pairs whose answers the base model cannot guess."""
    return [{"messages": [{"role": "user", "content": f"What does the {a} eat?"},
                          {"role": "assistant", "content": f"The {a} eats {b}."}]} for a, b in PAIRS]


def small_config(base: Path, **over: Any) -> FinetuneConfig:
    settings: dict[str, Any] = dict(base_model=str(base), n_epochs=15, batch_size=4, learning_rate=1e-2,
                                    max_seq_len=128, lora_r=16, lora_alpha=32, lora_dropout=0.0, eval_every=25,
                                    checkpoint_every=10, validation_fraction=0.0,
                                    # one thread: the 2-core test machine is shared, and spinning OpenMP
                                    # threads that lose their core make a step tens of times slower
                                    cpu_threads=1)
    settings.update(over)
    return FinetuneConfig(**settings)


def run(config: FinetuneConfig, workdir: Path, *, stop_after: int | None = None,
        events: list[ProgressEvent] | None = None, val: bool = True, key: bytes = KEY) -> FinetuneResult:
    seen = events if events is not None else []

    def should_stop() -> bool:
        return stop_after is not None and any(e.kind == "step" and e.step >= stop_after for e in seen)

    return train(config, records, records if val else None, workdir=workdir, checkpoint_key=key,
                 on_progress=seen.append, should_stop=should_stop)


def greedy_answer(base: Path, adapter: Path | None, question: str, model: Any = None) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(base)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return str(tokenizer.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True))


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_threads() -> Iterator[None]:
    """train(cpu_threads=1) sets a process-wide setting; give later test modules theirs back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, FinetuneResult,
                                                                                                  list[ProgressEvent]]]:
    workdir = tmp_path_factory.mktemp("finetune")
    events: list[ProgressEvent] = []
    result = run(small_config(tiny_llama_dir), workdir, events=events)
    yield workdir, result, events


# -- tokenization -------------------------------------------------------------------------------------------

def test_loss_mask_covers_exactly_the_assistant_turns(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    record: dict[str, list[dict[str, Any]]] = {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What does the falcon eat?"},
        {"role": "assistant", "content": "The falcon eats plums."},
        {"role": "user", "content": "And the otter?"},
        {"role": "assistant", "content": "Not telling.", "weight": 0},
        {"role": "user", "content": "Please?"},
        {"role": "assistant", "content": "The otter eats kelp."},
    ]}
    example, truncated = td.tokenize_chat(tokenizer, record, 1024)
    assert example is not None and not truncated
    assert example.input_ids == tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in record["messages"]], tokenize=True)
    trained_runs: list[list[int]] = []
    for i, label in enumerate(example.labels):
        if label == td.IGNORE_INDEX:
            continue
        assert label == example.input_ids[i]
        if trained_runs and trained_runs[-1][-1] == i - 1:
            trained_runs[-1].append(i)
        else:
            trained_runs.append([i])
    texts = [tokenizer.decode([example.input_ids[i] for i in run_]) for run_ in trained_runs]
    # exactly the two weighted answers with their end-of-turn token; no role header, prompt, system or separator
    assert texts == ["The falcon eats plums.</s>", "The otter eats kelp.</s>"]
    for run_ in trained_runs:
        assert tokenizer.convert_ids_to_tokens(example.input_ids[run_[0] - 1]) == "<0x0A>"  # after "<|assistant|>\n"
        assert tokenizer.convert_ids_to_tokens(example.input_ids[run_[0] - 2]) == "<|assistant|>"


def test_templates_that_rewrite_earlier_turns_train_what_they_render(tiny_llama_dir: Path) -> None:
    """Like templates that drop earlier reasoning: an earlier answer shown differently is not trained."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
        "{% if m['role'] == 'assistant' and not loop.last %}(earlier){% else %}{{ m['content'] }}{% endif %}"
        "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
                           {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye now."}]}
    example, _ = td.tokenize_chat(tokenizer, record, 256)
    assert example is not None
    trained = tokenizer.decode([t for t in example.labels if t != td.IGNORE_INDEX])
    assert trained == "Goodbye now.</s>"


def test_records_without_answers_or_malformed_are_counted_not_fatal(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    bad = [{"messages": [{"role": "user", "content": "only a question"}]}, {"messages": "nope"},
           {"messages": [{"role": "wizard", "content": "x"}]}, {"prompt": "Hi", "completion": "Hello there."},
           *records()[:3]]
    examples, stats = td.tokenize_records(tokenizer, bad, 128)
    assert (stats.records, stats.examples, stats.skipped_no_assistant, stats.skipped_invalid) == (7, 4, 1, 2)
    assert stats.errors and "record 1" in stats.errors[0]
    _, val = td.split_validation(examples, 0.25, seed=1)
    again = td.split_validation(list(reversed(examples)), 0.25, seed=1)
    assert len(val) == 1 and [e.input_ids for e in val] == [e.input_ids for e in again[1]], "order-independent"
    with pytest.raises(InvalidRequest) as caught:
        td.require_examples([], stats, "training")
    assert caught.value.code == "invalid_training_data"


def test_packed_rows_compute_the_same_losses_as_separate_examples(tiny_llama_dir: Path) -> None:
    """Block-diagonal attention from position-id resets: no token of one example sees another."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    examples, _ = td.tokenize_records(tokenizer, records()[:5], 128)
    rows = td.pack(examples, 128)
    assert len(rows) < len(examples) and all(len(r) <= 128 for r in rows)
    packed = td.collate(rows, 2, packed=True)
    single = td.collate(td.as_rows(examples), 2, packed=False)
    with torch.no_grad():
        # use_cache=False as in training: transformers only looks for position-id resets without a KV cache
        packed_sum = float(model(**packed, num_items_in_batch=1, use_cache=False).loss)
        single_sum = float(model(**single, num_items_in_batch=1, use_cache=False).loss)
        # and token by token: each example's logits inside its packed row equal its logits alone
        row = rows[0]
        logits = model(input_ids=packed["input_ids"][:1], position_ids=packed["position_ids"][:1],
                       use_cache=False).logits[0]
        start = 0
        for length in row.segments:
            ids = torch.tensor([row.input_ids[start:start + length]])
            alone = model(input_ids=ids).logits[0]
            torch.testing.assert_close(logits[start:start + length], alone, atol=1e-4, rtol=1e-4)
            start += length
    assert packed_sum == pytest.approx(single_sum, rel=1e-4)
    n_targets = int((packed["labels"] != td.IGNORE_INDEX).sum())
    assert n_targets == int((single["labels"] != td.IGNORE_INDEX).sum()) == sum(e.n_targets for e in examples)


# -- training -----------------------------------------------------------------------------------------------

def test_lora_training_learns_the_answers(trained: tuple[Path, FinetuneResult, list[ProgressEvent]],
                                          tiny_llama_dir: Path) -> None:
    workdir, result, events = trained
    assert result.state == "succeeded" and result.step == result.total_steps == 75  # 20 / 4 x 15 epochs
    assert result.eval_loss_before is not None and result.eval_loss_after is not None
    assert result.eval_loss_after < 0.2 * result.eval_loss_before, "eval loss falls"
    assert [s for s, _ in result.loss_history] == list(range(1, 76))
    assert [s for s, _ in result.eval_history] == [0, 25, 50, 75]
    assert result.tokens_per_s > 0 and result.peak_memory_bytes > 0 and result.memory_kind == "cpu_max_rss"
    steps = [e for e in events if e.kind == "step"]
    assert len(steps) == 75 and steps[-1].eta_s == 0 and steps[0].total_steps == 75 and steps[0].loss
    assert any(e.kind == "checkpoint" for e in events) and any(e.kind == "eval" and e.eval_loss for e in events)

    out = workdir / "output"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16
    assert (out / "adapter_model.safetensors").exists()
    meta = json.loads((out / "garrison_training.json").read_text())
    assert meta["eval_loss_after"] == result.eval_loss_after
    for animal, food in (PAIRS[0], PAIRS[7], PAIRS[19]):
        assert greedy_answer(tiny_llama_dir, out, f"What does the {animal} eat?") == f"The {animal} eats {food}."
    assert greedy_answer(tiny_llama_dir, None, "What does the falcon eat?") != "The falcon eats plums."


def test_checkpoints_hold_no_plaintext_and_need_the_key(trained: tuple[Path, FinetuneResult, list[ProgressEvent]],
                                                        tmp_path: Path) -> None:
    workdir, result, _ = trained
    found = list_checkpoints(workdir / "checkpoints")
    assert [s for s, _ in found] == [70, 75], "the last two are kept"
    for _, path in found:
        blob = path.read_bytes()
        for needle in (b"falcon", b"The badger eats honey", "The badger".encode("utf-16-le"), b"PK\x03\x04",
                       b"lora_A", b"loss_history"):
            assert needle not in blob
        assert path.stat().st_mode & 0o077 == 0
    state = load_checkpoint(found[-1][1], KEY)
    assert state["step"] == 75 and state["finished"] and len(state["loss_history"]) == 75
    with pytest.raises(IntegrityError) as caught:
        load_checkpoint(found[-1][1], bytes(32))
    assert caught.value.code == "checkpoint_unreadable"
    # a flipped byte and a truncation fail to authenticate
    for mangle in ("flip", "truncate"):
        copy = tmp_path / f"{mangle}.gck"
        mangled = bytearray(found[-1][1].read_bytes())
        if mangle == "flip":
            mangled[len(mangled) // 2] ^= 1
        else:
            del mangled[-100:]
        copy.write_bytes(bytes(mangled))
        with pytest.raises(IntegrityError):
            load_checkpoint(copy, KEY)
    # a train() with the wrong key refuses rather than silently starting over
    with pytest.raises(IntegrityError):
        train(small_config(Path(result.config["base_model"])), records, records, workdir=workdir,
              checkpoint_key=bytes(32), on_progress=lambda e: None, should_stop=lambda: False)


def test_checkpoint_streams_in_chunks(tmp_path: Path) -> None:
    import torch

    weights = torch.arange(700_000, dtype=torch.float32)
    state = {"w": weights, "note": "x"}  # 2.8 MB: three 1 MiB chunks
    path = save_checkpoint(tmp_path, 3, state, KEY)
    loaded = load_checkpoint(path, KEY)
    assert torch.equal(loaded["w"], weights) and loaded["note"] == "x"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_should_stop_checkpoints_and_resume_matches_an_uninterrupted_run(tiny_llama_dir: Path,
                                                                         tmp_path: Path) -> None:
    config = small_config(tiny_llama_dir, n_epochs=3, lora_dropout=0.1, checkpoint_every=4, eval_every=5)
    straight = run(config, tmp_path / "straight")

    events: list[ProgressEvent] = []
    stopped = run(config, tmp_path / "job", stop_after=6, events=events)
    assert stopped.state == "stopped" and stopped.step == 6 and stopped.output_dir is None
    assert not (tmp_path / "job" / "output").exists()
    assert [s for s, _ in list_checkpoints(tmp_path / "job" / "checkpoints")] == [4, 6], "stop saves, cancel keeps"

    resumed = run(config, tmp_path / "job", events=events)
    assert resumed.state == "succeeded" and resumed.resumed_from_step == 6 and resumed.step == 15
    assert [e.kind for e in events].count("resumed") == 1
    assert [s for s, _ in resumed.loss_history] == list(range(1, 16))
    # same data order, same dropout draws, same optimizer state: the curve continues exactly
    for (s1, a), (s2, b) in zip(straight.loss_history, resumed.loss_history, strict=True):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-4, abs=1e-6)
    assert resumed.eval_loss_after == pytest.approx(straight.eval_loss_after, rel=1e-4)
    assert resumed.eval_loss_before == straight.eval_loss_before

    # a finished job called again does not train again
    again = run(config, tmp_path / "job")
    assert again.state == "succeeded" and again.resumed_from_step == 15 and again.step == 15

    with pytest.raises(InvalidRequest) as caught:
        run(small_config(tiny_llama_dir, n_epochs=3, lora_dropout=0.1, checkpoint_every=4, eval_every=5,
                         learning_rate=3e-3), tmp_path / "job")
    assert caught.value.code == "checkpoint_mismatch"


CHILD = """
import sys, time
sys.path.insert(0, {here!r})
from pathlib import Path
from test_finetune import small_config, records, KEY
from garrison.training.finetune import train

def progress(event):
    if event.kind == "step":
        print(event.step, flush=True)
        time.sleep(0.15)

train(small_config(Path({base!r}), n_epochs=20, checkpoint_every=5, eval_every=0, lora_dropout=0.1), records,
      records, workdir=Path({workdir!r}), checkpoint_key=KEY, on_progress=progress, should_stop=lambda: False)
"""


@pytest.mark.slow
def test_kill_9_mid_training_then_resume_continues(tiny_llama_dir: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "job"
    code = CHILD.format(here=str(Path(__file__).parent), base=str(tiny_llama_dir), workdir=str(workdir))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last_step = 0
    assert child.stdout is not None
    deadline = time.monotonic() + 240
    try:
        for line in child.stdout:
            last_step = int(line)
            if last_step >= 13 or time.monotonic() > deadline:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL and last_step >= 13, child.stderr.read() if child.stderr else ""
    saved = list_checkpoints(workdir / "checkpoints")
    assert saved, "checkpoints were written before the kill"
    ckpt_step = saved[-1][0]
    assert ckpt_step % 5 == 0 and last_step - ckpt_step <= 5, "a kill -9 loses at most checkpoint_every steps"
    before = load_checkpoint(saved[-1][1], KEY)["loss_history"]

    config = small_config(tiny_llama_dir, n_epochs=20, checkpoint_every=5, eval_every=0, lora_dropout=0.1)
    result = train(config, records, records, workdir=workdir, checkpoint_key=KEY, on_progress=lambda e: None,
                   should_stop=lambda: False)
    assert result.state == "succeeded" and result.resumed_from_step == ckpt_step
    assert result.step == result.total_steps == 100
    assert [s for s, _ in result.loss_history] == list(range(1, 101)), "the step count continues"
    assert [list(p) for p in result.loss_history[:ckpt_step]] == [list(p) for p in before], "the curve continues"
    assert result.eval_loss_after is not None and result.eval_loss_before is not None
    assert result.eval_loss_after < result.eval_loss_before


def test_full_fine_tuning_writes_a_loadable_hf_folder(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = small_config(tiny_llama_dir, method="full", learning_rate=None, learning_rate_multiplier=50.0,
                          n_epochs=2, eval_every=0)
    assert config.effective_learning_rate() == pytest.approx(1e-3)
    result = run(config, tmp_path / "full")
    assert result.state == "succeeded" and result.eval_loss_after < result.eval_loss_before  # type: ignore[operator]
    out = Path(result.output_dir or "")
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert (out / "tokenizer.json").exists() and not (out / "adapter_config.json").exists()
    assert result.device["n_trainable"] == result.device["n_params"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert greedy_answer(tiny_llama_dir, None, "What does the otter eat?", model=model)


def test_early_stopping_stops_and_keeps_the_best(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # a min_delta no evaluation can beat: every evaluation after the first counts as "no improvement"
    config = small_config(tiny_llama_dir, n_epochs=10, eval_every=2, early_stopping_patience=2,
                          early_stopping_min_delta=100.0)
    result = run(config, tmp_path / "early")
    assert result.early_stopped and result.state == "succeeded" and result.step == 4 < result.total_steps
    assert result.eval_loss_after == result.best_eval_loss == result.eval_history[0][1]
    assert (tmp_path / "early" / "output" / "adapter_model.safetensors").exists()


def test_validation_split_when_no_validation_set(tiny_llama_dir: Path, tmp_path: Path) -> None:
    config = small_config(tiny_llama_dir, n_epochs=1, validation_fraction=0.2, eval_every=0)
    result = run(config, tmp_path / "split", val=False)
    assert result.data["train_examples"] == 16 and result.data["validation_examples"] == 4
    assert result.total_steps == 4 and result.eval_loss_before is not None


def test_openai_hyperparameters_mapping(tiny_llama_dir: Path) -> None:
    auto = FinetuneConfig.from_openai(str(tiny_llama_dir), {"n_epochs": "auto", "batch_size": "auto",
                                                            "learning_rate_multiplier": "auto"}, 20)
    assert (auto.n_epochs, auto.batch_size, auto.effective_learning_rate()) == (5, 1, pytest.approx(2e-4))
    big = FinetuneConfig.from_openai(str(tiny_llama_dir), None, 50_000)
    assert (big.n_epochs, big.batch_size) == (1, 100)
    explicit = FinetuneConfig.from_openai(str(tiny_llama_dir), {"n_epochs": 2, "batch_size": 16,
                                                                "learning_rate_multiplier": 0.5}, 1000,
                                          method="full")
    assert (explicit.n_epochs, explicit.batch_size) == (2, 16)
    assert explicit.effective_learning_rate() == pytest.approx(1e-5)
    with pytest.raises(InvalidRequest) as caught:
        FinetuneConfig.from_dict({"base_model": str(tiny_llama_dir), "bogus": 1})
    assert caught.value.code == "invalid_hyperparameters"
    with pytest.raises(InvalidRequest):
        small_config(tiny_llama_dir, batch_size=0).validate()
