"""Fine-tuning throughput and peak memory: Garrison's train() against a plain Hugging Face Trainer + peft.

Not a test: figures for the issue note. In one run, each contender trains in its own fresh
subprocess (so peak RSS is its own) on the same model, the same tokenized examples (same
assistant-only labels), the same batch size, LoRA settings, learning rate, schedule,
epochs and seed:

* ``garrison``: `garrison.training.finetune.train` with packing (the default);
* ``garrison-nopack``: the same loop with packing off (padding per batch, like the peer);
* ``hf-trainer``: `transformers.Trainer` on a `peft` model with `DataCollatorForSeq2Seq`
  (dynamic padding to the batch's longest), no evaluation, no saving.

Training tokens/s counts real (non-padding) tokens over the time spent in training steps:
our loop's own step timer, and for the Trainer the sum of on_step_begin -> on_step_end
(its data loading and collation are *not* counted, which favours the peer slightly); the
Trainer's whole `train_runtime` is reported beside it. Workers run with
OMP_WAIT_POLICY=PASSIVE (both alike; see run_worker). Peak memory: max RSS of the
process on the CPU, `torch.cuda.max_memory_allocated` on a GPU (bf16 autocast for both).

The model: a random-init Llama ("small": hidden 256, 4 layers, 3.2M parameters; "124m":
FACTS.md's 124M shape, for a GPU; "tiny": the test model's shape), with the tiny Llama's
SentencePiece tokenizer, built in a temporary folder; throughput does not depend
on trained weights. ``--model PATH`` uses any HF folder with a chat template instead.
Data: chat records with answer lengths spread from a few to a few hundred tokens, as
real support data is, so padding waste is what it would be.

    .venv/bin/python bench/finetune.py [--model small|124m|tiny|PATH] [--records 96] [--batch-size 8]
        [--max-seq-len 512] [--repeats 3]

Writes bench/out/finetune.json and bench/out/finetune.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "out"
CONTENDERS = ("hf-trainer", "garrison", "garrison-nopack")
SHAPES = {
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 704},
    "124m": {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
             "intermediate_size": 1536},
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128},
}


def build_model(kind: str, out: Path) -> Path:
    """A random-init Llama of the given shape with the tiny Llama's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from garrison.training.tiny_models import ensure_model

    root = Path(os.environ.get("GARRISON_TEST_CACHE") or Path.home() / ".cache" / "garrison" / "test-models")
    tok_dir = ensure_model("tiny-llama", root)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, **SHAPES[kind])
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def make_records(n: int, seed: int) -> list[dict[str, Any]]:
    """Chat records from the built-in corpus; answer lengths spread log-uniformly (skewed short, long tail)."""
    from garrison.corpus import PARAGRAPHS, corpus_lines

    rng = random.Random(seed)
    lines = corpus_lines()
    text = " ".join(PARAGRAPHS)
    records = []
    for _ in range(n):
        question = rng.choice(lines)[:120]
        length = int(10 ** rng.uniform(1.0, 2.7))  # ~10 to ~500 characters
        start = rng.randrange(0, max(1, len(text) - length))
        records.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": text[start:start + length]}]})
    return records


def _peak(cuda: bool) -> int:
    if cuda:
        import torch

        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def worker(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One contender, in its own process."""
    import torch

    cuda = torch.cuda.is_available()
    records = make_records(spec["records"], spec["seed"])
    lora = {"r": spec["lora_r"], "lora_alpha": spec["lora_alpha"], "lora_dropout": spec["lora_dropout"],
            "target_modules": spec["target_modules"]}
    if name.startswith("garrison"):
        from garrison.training.finetune import FinetuneConfig, train

        config = FinetuneConfig(
            base_model=spec["model"], n_epochs=spec["epochs"], batch_size=spec["batch_size"],
            learning_rate=spec["lr"], max_seq_len=spec["max_seq_len"], packing=name == "garrison",
            lora_r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=lora["lora_dropout"],
            lora_target_modules=lora["target_modules"], validation_fraction=0.0, eval_every=0,
            checkpoint_every=10**9, seed=spec["seed"], warmup_ratio=0.03)
        work = Path(tempfile.mkdtemp(prefix="bench-ft-"))
        try:
            result = train(config, lambda: records, None, workdir=work, checkpoint_key=os.urandom(32),
                           on_progress=lambda e: None, should_stop=lambda: False)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return {"tokens": result.train_tokens, "step_seconds": result.train_seconds, "steps": result.step,
                "tokens_per_s": result.tokens_per_s, "peak_bytes": _peak(cuda),
                "final_loss": result.loss_history[-1][1], "computed_tokens": result.device["rank_computed_tokens"]}

    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from garrison.training import data as td

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    examples, _ = td.tokenize_records(tokenizer, records, spec["max_seq_len"])
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    torch.manual_seed(spec["seed"])
    base: Any = AutoModelForCausalLM.from_pretrained(spec["model"])
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", bias="none", **lora))

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds = 0.0
            self.started = 0.0
            self.steps = 0

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.started = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - self.started
            self.steps += 1

    timer = StepTimer()
    seq2seq = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    computed = [0]

    def collate(features: list[dict[str, Any]]) -> Any:
        batch = seq2seq(features)
        computed[0] += int(batch["input_ids"].numel())  # tokens the model computes, padding included
        return batch

    with tempfile.TemporaryDirectory(prefix="bench-hf-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=spec["batch_size"], num_train_epochs=spec["epochs"],
            learning_rate=spec["lr"], lr_scheduler_type="linear", warmup_ratio=0.03, weight_decay=0.0,
            max_grad_norm=1.0, logging_steps=10**9, save_strategy="no", eval_strategy="no", report_to=[],
            seed=spec["seed"], use_cpu=not cuda, bf16=cuda, dataloader_num_workers=0, disable_tqdm=True,
            remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=dataset,
                          data_collator=collate,
                          callbacks=[timer])
        metrics = trainer.train().metrics
    tokens = sum(len(e) for e in examples) * spec["epochs"]
    return {"tokens": tokens, "step_seconds": timer.seconds, "steps": timer.steps,
            "tokens_per_s": tokens / timer.seconds, "train_runtime": metrics["train_runtime"],
            "tokens_per_s_runtime": tokens / metrics["train_runtime"], "peak_bytes": _peak(cuda),
            "final_loss": None, "computed_tokens": computed[0]}


def run_worker(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    # Passive OpenMP waiting for every contender alike: on a shared machine, spinning threads that lose
    # their core turn a run tens of times slower at random, which would measure the neighbours.
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    proc = subprocess.run([sys.executable, __file__, "--worker", name, "--spec", json.dumps(spec)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def markdown(result: dict[str, Any]) -> str:
    spec = result["spec"]
    mem = "peak CUDA allocated" if result["cuda"] else "peak RSS"
    lines = [
        f"Model {spec['model_kind']} ({result['n_params'] / 1e6:.1f}M params), {spec['records']} chat records, "
        f"batch {spec['batch_size']}, max_seq_len {spec['max_seq_len']}, LoRA r={spec['lora_r']} "
        f"alpha={spec['lora_alpha']} on {spec['target_modules']}, {spec['epochs']} epoch(s), "
        f"{'GPU bf16' if result['cuda'] else 'CPU fp32'}; best of {spec['repeats']}.", "",
        f"| contender | train tokens/s | vs HF Trainer | {mem} | vs HF Trainer | step seconds | computed tokens |",
        "|---|---|---|---|---|---|---|"]
    hf = result["contenders"]["hf-trainer"]
    for name in CONTENDERS:
        r = result["contenders"][name]
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / hf['tokens_per_s']:.2f}x | "
                     f"{r['peak_bytes'] / 2**20:.0f} MiB | {r['peak_bytes'] / hf['peak_bytes']:.2f}x | "
                     f"{r['step_seconds']:.1f} | {r['computed_tokens']} |")
    lines += ["", f"Real (non-padding) tokens trained: {hf['tokens']} for every contender; computed tokens include "
              f"padding. HF Trainer's whole train_runtime: {hf['train_runtime']:.1f} s "
              f"({hf['tokens_per_s_runtime']:.0f} tokens/s). Runs of each (tokens/s): "
              + "; ".join(f"{n} {', '.join(f'{v:.0f}' for v in result['contenders'][n]['all_tokens_per_s'])}"
                          for n in CONTENDERS) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", help="small | 124m | tiny | path to an HF folder with a chat template")
    ap.add_argument("--records", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="runs per contender, interleaved; the best is kept")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.spec))))
        return 0

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="bench-ft-model-"))
    try:
        model = Path(args.model) if args.model not in SHAPES else build_model(args.model, tmp / args.model)
        from garrison.training.gpus import model_shape

        spec = {"model": str(model), "model_kind": args.model, "records": args.records, "seed": args.seed,
                "batch_size": args.batch_size, "max_seq_len": args.max_seq_len, "epochs": args.epochs, "lr": 2e-4,
                "lora_r": args.lora_r, "lora_alpha": 2 * args.lora_r, "lora_dropout": 0.05,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "repeats": args.repeats}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}
        for _ in range(args.repeats):
            for name in CONTENDERS:
                runs[name].append(run_worker(name, spec))
                print(f"{name}: {runs[name][-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
        best = {name: max(rs, key=lambda r: r["tokens_per_s"]) | {"all_tokens_per_s": [r["tokens_per_s"] for r in rs]}
                for name, rs in runs.items()}
        result = {"date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0], "torch": torch.__version__,
                  "machine": platform.machine(), "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(),
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "n_params": model_shape(model).n_params, "spec": spec, "contenders": best}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "finetune.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (OUT / "finetune.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
