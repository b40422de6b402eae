"""The fine-tuning loop: LoRA (default) or full, resumable from encrypted checkpoints, on CPU, one GPU or DDP.

`train()` is what a worker subprocess calls with records it decrypted in memory. It plans
devices (refusing a job that will not fit, see gpus.py), tokenizes with the base model's
chat template and assistant-only labels (data.py), trains with AdamW and a linear
warmup/decay schedule, evaluates, stops early, and writes encrypted checkpoints every
``checkpoint_every`` steps (checkpoints.py). Calling `train()` again with the same
workdir, config, data and key resumes from the newest checkpoint: the step count, the
loss curve, the data order and the random state continue, so a resumed run follows the
uninterrupted one step for step on the CPU.

Why a hand-written loop rather than transformers' `Trainer`: checkpoints must be encrypted
streams (Trainer writes plaintext folders), resume must restore the exact data position
without the data ever touching disk, and the loop is also the DDP worker (ddp.py) with
one token-weighted loss across ranks and micro-batches. It is also faster on chat data
(bench/finetune.py): each step's examples are packed into rows without padding.

Batch semantics follow OpenAI's: ``batch_size`` examples per optimizer step, whatever the
number of GPUs (each DDP rank takes its share) and whatever ``micro_batch_size`` (gradient
accumulation, for memory only). The loss is the mean over all target (assistant) tokens
of the step, so packing, micro-batching and DDP do not change what is optimized.

Learning rate: OpenAI's ``learning_rate_multiplier`` maps to
``learning_rate = multiplier * 2e-4`` for LoRA and ``multiplier * 2e-5`` for full
fine-tuning (typical good defaults for each); an explicit ``learning_rate`` wins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from garrison.errors import IntegrityError, InvalidRequest
from garrison.paths import CHECKPOINTS
from garrison.store.durable import fsync_dir
from garrison.training import checkpoints as ckpt
from garrison.training import data as td

log = logging.getLogger("garrison.training")

BASE_LR = {"lora": 2e-4, "full": 2e-5}
CHECKPOINT_DIR = CHECKPOINTS
OUTPUT_DIR = "output"
METADATA_FILE = "garrison_training.json"
_STATE_VERSION = 1


@dataclass
class FinetuneConfig:
    """One fine-tuning job's settings. JSON-safe through `as_dict` / `from_dict` (DDP ranks, checkpoints)."""

    base_model: str
    method: Literal["lora", "full"] = "lora"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str | list[str] = "all-linear"
    n_epochs: int = 3
    batch_size: int = 8
    micro_batch_size: int | None = None  # examples per forward pass; None = batch_size
    learning_rate: float | None = None  # None: learning_rate_multiplier * BASE_LR[method]
    learning_rate_multiplier: float = 1.0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_len: int = 2048
    packing: bool = True
    validation_fraction: float = 0.1  # held out of the training set when no validation set is given
    eval_every: int = 50  # steps; 0 = only before and after training
    early_stopping_patience: int = 0  # evaluations without improvement; 0 = off
    early_stopping_min_delta: float = 0.0
    seed: int = 42
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    max_steps: int | None = None
    devices: Literal["auto", "cpu"] | list[int] = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # CPU training threads (None: torch's default, one per core). On a box shared with the serving
    # engine, fewer threads avoid oversubscription; start workers with OMP_WAIT_POLICY=PASSIVE too:
    # spinning OpenMP threads that lose their core made a step 40x slower on the 2-core dev machine.
    cpu_threads: int | None = None

    def effective_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return float(self.learning_rate_multiplier) * BASE_LR[self.method]

    def validate(self) -> None:
        def bad(param: str, why: str) -> InvalidRequest:
            return InvalidRequest(f"{param}: {why}", code="invalid_hyperparameters", param=param)

        if self.method not in BASE_LR:
            raise bad("method", "must be 'lora' or 'full'")
        for name in ("n_epochs", "batch_size", "max_seq_len", "checkpoint_every", "lora_r", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "must be at least 1")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise bad("micro_batch_size", "must be at least 1")
        if not 0 <= self.validation_fraction < 1:
            raise bad("validation_fraction", "must be in [0, 1)")
        if self.effective_learning_rate() <= 0:
            raise bad("learning_rate", "must be positive")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise bad("precision", "must be auto, bf16, fp16 or fp32")
        if not (Path(self.base_model) / "config.json").is_file():
            raise InvalidRequest(f"base model folder {self.base_model} has no config.json", code="model_not_found",
                                 param="model")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise InvalidRequest(f"unknown fine-tuning settings: {', '.join(sorted(unknown))}",
                                 code="invalid_hyperparameters")
        return cls(**raw)

    @classmethod
    def from_openai(cls, base_model: str, hyperparameters: dict[str, Any] | None, n_train_examples: int,
                    **overrides: Any) -> FinetuneConfig:
        """OpenAI's hyperparameters ("auto" or a number) mapped onto a config.

        n_epochs "auto": 3, raised for small sets so about 100 examples are seen (at most 25
        epochs) and lowered for big ones to about 25,000 (OpenAI's published heuristic).
        batch_size "auto": about 0.2% of the training examples, between 1 and 256 (OpenAI's
        documented default). learning_rate_multiplier "auto": 1.0 (see BASE_LR).
        """
        hp = dict(hyperparameters or {})
        n = max(1, n_train_examples)
        epochs = hp.get("n_epochs", "auto")
        if epochs == "auto":
            epochs = 3
            if n * epochs < 100:
                epochs = min(25, math.ceil(100 / n))
            elif n * epochs > 25000:
                epochs = max(1, 25000 // n)
        batch = hp.get("batch_size", "auto")
        if batch == "auto":
            batch = max(1, min(256, round(0.002 * n)))
        mult = hp.get("learning_rate_multiplier", "auto")
        mult = 1.0 if mult == "auto" else float(mult)
        return cls(base_model=str(base_model), n_epochs=int(epochs), batch_size=int(batch),
                   learning_rate_multiplier=mult, **overrides)

    def fingerprint(self) -> str:
        """What must not change across a resume (devices, precision and checkpoint cadence may)."""
        free = {"devices", "precision", "checkpoint_every", "keep_checkpoints", "micro_batch_size", "base_model",
                "cpu_threads"}
        keep = {k: v for k, v in self.as_dict().items() if k not in free}
        base = Path(self.base_model)
        keep["base_config"] = hashlib.sha256((base / "config.json").read_bytes()).hexdigest()
        keep["base_weights"] = sorted((p.name, p.stat().st_size) for p in base.glob("*.safetensors"))
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class ProgressEvent:
    step: int
    total_steps: int
    epoch: float
    loss: float | None
    eval_loss: float | None
    tokens_per_s: float
    eta_s: float | None
    learning_rate: float
    kind: str = "step"  # "step" | "eval" | "checkpoint" | "resumed"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FinetuneResult:
    state: Literal["succeeded", "stopped"]
    step: int
    total_steps: int
    output_dir: str | None
    checkpoint: str | None
    resumed_from_step: int | None
    early_stopped: bool
    eval_loss_before: float | None
    eval_loss_after: float | None
    best_eval_loss: float | None
    loss_history: list[tuple[int, float]]
    eval_history: list[tuple[int, float]]
    train_tokens: int
    train_seconds: float
    tokens_per_s: float
    peak_memory_bytes: int
    memory_kind: str  # "cuda_max_allocated" | "cpu_max_rss"
    device: dict[str, Any]
    data: dict[str, Any]
    weights_sha256: str | None = None  # of the trained (LoRA) parameters: lineage, and DDP replicas must agree
    config: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _peak_memory(device_kind: str, device: Any) -> tuple[int, str]:
    if device_kind == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    # VmHWM: this process's own peak since exec (Linux carries ru_maxrss over from the forked parent).
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "cpu_max_rss"
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_max_rss"


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


def _replace_dir(staging: Path, final: Path) -> None:
    """Swap a fully written, fsynced folder into place; a crash leaves the old output or the new."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


class _Dist:
    """The few collective operations the loop needs; no-ops in a single process."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        self._dist = dist

    def sum(self, values: list[float], device: Any) -> list[float]:
        if not self.on:
            return values
        import torch

        t = torch.tensor(values, dtype=torch.float64, device=device)
        self._dist.all_reduce(t)
        return [float(v) for v in t.tolist()]

    def any(self, flag: bool, device: Any) -> bool:
        return self.sum([1.0 if flag else 0.0], device)[0] > 0 if self.on else flag

    def gather(self, obj: Any) -> list[Any]:
        if not self.on:
            return [obj]
        out: list[Any] = [None] * self.world
        self._dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.on:
            self._dist.barrier()


def _rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Trainer:
    """State of one run; `train()` below is the public entry."""

    def __init__(self, config: FinetuneConfig, workdir: Path, key: bytes,
                 on_progress: Callable[[ProgressEvent], None], should_stop: Callable[[], bool]) -> None:
        import torch

        self.torch = torch
        self.config = config
        self.workdir = workdir
        self.key = key
        self.on_progress = on_progress
        self.should_stop = should_stop
        self.dist = _Dist()
        self.ckpt_dir = workdir / CHECKPOINT_DIR
        self.loss_history: list[tuple[int, float]] = []
        self.eval_history: list[tuple[int, float]] = []
        self.eval_before: float | None = None
        self.best_eval: float | None = None
        self.best_step = 0
        self.bad_evals = 0
        self.best_trainable: dict[str, Any] = {}
        self.early_stopped = False
        self.step = 0
        self.train_tokens = 0
        self.train_seconds = 0.0
        self.run_tokens = 0
        self.run_seconds = 0.0
        self.run_steps = 0
        self.rank_tokens = 0  # this rank's own share in this run (DDP: every rank must have trained)
        self.computed_tokens = 0  # this rank's tokens including padding in this run: what packing saves
        self.resumed_from: int | None = None
        self.last_checkpoint: Path | None = None

    # -- setup ------------------------------------------------------------------------------------------
    def plan(self) -> None:
        from garrison.training.gpus import DevicePlan, plan_devices

        torch = self.torch
        if self.dist.on:
            # Launched by torchrun: the launcher planned; each rank takes its own device.
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if self.config.devices != "cpu" and torch.cuda.is_available():
                devices = self.config.devices if isinstance(self.config.devices, list) else None
                index = devices[local] if devices else local
                torch.cuda.set_device(index)
                precision = self.config.precision
                if precision == "auto":
                    precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
                self.plan_ = DevicePlan("cuda", [index], precision, self.micro, 0, 0)
            else:
                precision = "fp32" if self.config.precision == "auto" else self.config.precision
                self.plan_ = DevicePlan("cpu", [], precision, self.micro, 0, 0)
        else:
            self.plan_ = plan_devices(self.config, data=getattr(self, "data_shape", None))
        kind = self.plan_.kind
        self.device = torch.device(f"cuda:{self.plan_.devices[0]}" if kind == "cuda" else "cpu")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.plan_.precision)

    @property
    def micro(self) -> int:
        return self.config.micro_batch_size or self.config.batch_size

    def load_data(self, train_records: Callable[[], Iterable[dict[str, Any]]],
                  val_records: Callable[[], Iterable[dict[str, Any]]] | None) -> None:
        """After the plan: the data tokenized (by `tokenize_data`, before the plan); subclasses add what needs
        the device (distillation's teacher targets)."""
        if not hasattr(self, "train_examples"):
            self.tokenize_data(train_records, val_records)

    def tokenize_data(self, train_records: Callable[[], Iterable[dict[str, Any]]],
                      val_records: Callable[[], Iterable[dict[str, Any]]] | None) -> None:
        from transformers import AutoTokenizer

        cfg = self.config
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest(f"base model {cfg.base_model} has no chat template", code="no_chat_template")
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
        train, self.train_stats = td.tokenize_records(self.tokenizer, train_records(), cfg.max_seq_len)
        td.require_examples(train, self.train_stats, "training")
        self.val_stats: td.TokenizeStats | None = None
        if val_records is not None:
            val, self.val_stats = td.tokenize_records(self.tokenizer, val_records(), cfg.max_seq_len)
        else:
            train, val = td.split_validation(train, cfg.validation_fraction, cfg.seed)
        self.train_examples, self.val_examples = train, val
        self.steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        total = self.steps_per_epoch * cfg.n_epochs
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        rows = [*td.as_rows(train), td.Row([], [], []), *td.as_rows(val)]
        self.data_fingerprint = td.fingerprint(rows)
        self.data_shape = _data_shape([*train, *val], self.micro, cfg.packing)

    def build_model(self) -> None:
        from transformers import AutoModelForCausalLM

        torch, cfg = self.torch, self.config
        load_dtype = torch.float32
        if cfg.method == "lora" and self.plan_.kind == "cuda" and self.amp_dtype is not None:
            load_dtype = self.amp_dtype  # the frozen base in half precision; adapters stay fp32 (peft autocast)
        torch.manual_seed(cfg.seed)  # LoRA init identical on every rank and every resume
        model: Any = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=load_dtype)
        model.config.use_cache = False
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.method == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=cfg.lora_target_modules, bias="none", task_type="CAUSAL_LM")
            model = get_peft_model(model, lora)
        model.to(self.device)
        self.model = model
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for _, p in self.trainable)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.forward_model: Any = model
        if self.dist.on:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DistributedDataParallel(model, device_ids=ids)
        params = [p for _, p in self.trainable]
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(params, lr=cfg.effective_learning_rate(), weight_decay=cfg.weight_decay,
                                           fused=fused)
        warmup = max(0, round(self.total_steps * cfg.warmup_ratio))
        total = self.total_steps

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

    def autocast(self) -> AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return nullcontext()
        return self.torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- data order ---------------------------------------------------------------------------------------
    def step_examples(self, step: int) -> list[td.Example]:
        """This rank's share of global step `step` (0-based): the epoch's seeded permutation, then a slice."""
        epoch, within = divmod(step, self.steps_per_epoch)
        if getattr(self, "_perm_epoch", None) != epoch:
            gen = self.torch.Generator().manual_seed(self.config.seed * 100003 + epoch)
            self._perm = self.torch.randperm(len(self.train_examples), generator=gen).tolist()
            self._perm_epoch = epoch
        bs = self.config.batch_size
        chosen = self._perm[within * bs:(within + 1) * bs]
        return [self.train_examples[i] for i in chosen[self.dist.rank::self.dist.world]]

    def micro_batches(self, examples: list[td.Example]) -> Iterator[dict[str, Any]]:
        for i in range(0, len(examples), self.micro):
            part = examples[i:i + self.micro]
            # Packed to the step's longest example: never wider than padding would be, and far fewer pad tokens.
            rows = td.pack(part, max(len(e) for e in part)) if self.config.packing else td.as_rows(part)
            yield td.collate(rows, self.pad_id, packed=self.config.packing)

    # -- one step -----------------------------------------------------------------------------------------
    def _forward_sum(self, model: Any, batch: dict[str, Any]) -> Any:
        """Summed token loss of a batch (num_items_in_batch=1 makes transformers return the sum)."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self.autocast():
            out = model(**batch, use_cache=False, num_items_in_batch=1)
        return out.loss

    def train_step(self) -> float:
        torch = self.torch
        started = time.perf_counter()
        examples = self.step_examples(self.step)
        batches = list(self.micro_batches(examples))
        local_targets = sum(int((b["labels"] != td.IGNORE_INDEX).sum()) for b in batches)
        local_tokens = sum(len(e) for e in examples)
        self.computed_tokens += sum(int(b["input_ids"].numel()) for b in batches)
        global_targets, global_tokens = self.dist.sum([float(local_targets), float(local_tokens)], self.device)
        self.model.train()
        # DDP averages gradients over ranks, so each rank scales by world/global to get the global token mean.
        scale = self.dist.world / max(1.0, global_targets)
        loss_sum: Any = torch.zeros((), device=self.device, dtype=torch.float64)
        for k, batch in enumerate(batches):
            sync = k == len(batches) - 1
            ctx = self.forward_model.no_sync() if (self.dist.on and not sync) else nullcontext()
            with ctx:
                loss = self._forward_sum(self.forward_model, batch)
                scaled = loss * scale
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            loss_sum += loss.detach().double()
        if not batches and self.dist.on:  # a rank without examples still joins the gradient all-reduce
            zero: Any = sum(p.sum() for _, p in self.trainable) * 0.0
            zero.backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable], self.config.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = self.dist.sum([float(loss_sum)], self.device)[0]
        self.step += 1
        elapsed = time.perf_counter() - started
        self.run_seconds += elapsed
        self.run_tokens += int(global_tokens)
        self.rank_tokens += local_tokens
        self.run_steps += 1
        self.train_seconds += elapsed
        self.train_tokens += int(global_tokens)
        loss_value = total_loss / max(1.0, global_targets)
        self.loss_history.append((self.step, loss_value))
        return loss_value

    def evaluate(self) -> float | None:
        if not self.val_examples:
            return None
        torch = self.torch
        share = self.val_examples[self.dist.rank::self.dist.world]
        total = 0.0
        targets = 0
        self.model.eval()
        with torch.no_grad():
            for batch in self.micro_batches(share):
                total += float(self._forward_sum(self.model, batch))
                targets += int((batch["labels"] != td.IGNORE_INDEX).sum())
        total, all_targets = self.dist.sum([total, float(targets)], self.device)
        return total / max(1.0, all_targets)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self, finished: bool) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION, "step": self.step, "finished": finished,
            "total_steps": self.total_steps, "world_size": self.dist.world,
            "config_fingerprint": self.config.fingerprint(), "data_fingerprint": self.data_fingerprint,
            "trainable": {n: p.detach().to("cpu") for n, p in self.trainable},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "rng": self.dist.gather(_rng_state()),
            "loss_history": [[s, v] for s, v in self.loss_history],
            "eval_history": [[s, v] for s, v in self.eval_history],
            "eval_before": self.eval_before, "best_eval": self.best_eval, "best_step": self.best_step,
            "bad_evals": self.bad_evals, "best_trainable": self.best_trainable,
            "early_stopped": self.early_stopped,
            "train_tokens": self.train_tokens, "train_seconds": self.train_seconds,
        }

    def save_checkpoint(self, finished: bool = False) -> None:
        if self.last_checkpoint is not None and ckpt.checkpoint_name(self.step) == self.last_checkpoint.name \
                and not finished:
            return
        state = self.state_dict(finished)  # collective (RNG gather): every rank builds it
        if self.dist.rank == 0:
            path = ckpt.save_checkpoint(self.ckpt_dir, self.step, state, self.key)
            ckpt.prune_checkpoints(self.ckpt_dir, self.config.keep_checkpoints)
        else:
            path = self.ckpt_dir / ckpt.checkpoint_name(self.step)
        self.last_checkpoint = path
        self.dist.barrier()

    def resume(self) -> dict[str, Any] | None:
        """Restore the newest checkpoint that authenticates; None for a fresh start."""
        found: dict[str, Any] | None = None
        errors: list[str] = []
        for path, loaded in ckpt.iter_latest(self.ckpt_dir, self.key):
            if isinstance(loaded, IntegrityError):
                errors.append(f"{path.name}: {loaded.message}")
                log.warning("checkpoint %s unreadable (%s); trying an older one", path.name, loaded.message)
                continue
            found = loaded
            self.last_checkpoint = path
            break
        if found is None:
            if errors:
                raise IntegrityError("no checkpoint in this job's folder authenticates under the given key: "
                                     + "; ".join(errors[:3]), code="checkpoint_unreadable")
            return None
        if found.get("version") != _STATE_VERSION:
            raise InvalidRequest("checkpoint format is from another version", code="checkpoint_mismatch")
        if found["config_fingerprint"] != self.config.fingerprint():
            raise InvalidRequest("the checkpoint was made with other hyperparameters or another base model; "
                                 "resume with the same settings or start a new job", code="checkpoint_mismatch")
        if found["data_fingerprint"] != self.data_fingerprint:
            raise InvalidRequest("the checkpoint was made on other training or validation data",
                                 code="checkpoint_mismatch")
        torch = self.torch
        with torch.no_grad():
            named = dict(self.trainable)
            for name, value in found["trainable"].items():
                named[name].copy_(value.to(named[name].device))
        self.optimizer.load_state_dict(found["optimizer"])
        self.scheduler.load_state_dict(found["scheduler"])
        if self.scaler is not None and found["scaler"]:
            self.scaler.load_state_dict(found["scaler"])
        rngs = found["rng"]
        if len(rngs) == self.dist.world:
            _set_rng_state(rngs[self.dist.rank])
        else:  # another world size: data order is unchanged, only dropout draws differ
            torch.manual_seed(self.config.seed + 7919 * self.dist.rank + found["step"])
        self.step = int(found["step"])
        self.loss_history = [(int(s), float(v)) for s, v in found["loss_history"]]
        self.eval_history = [(int(s), float(v)) for s, v in found["eval_history"]]
        self.eval_before = found["eval_before"]
        self.best_eval = found["best_eval"]
        self.best_step = int(found["best_step"])
        self.bad_evals = int(found["bad_evals"])
        self.best_trainable = found["best_trainable"]
        self.early_stopped = bool(found["early_stopped"])
        self.train_tokens = int(found["train_tokens"])
        self.train_seconds = float(found["train_seconds"])
        self.resumed_from = self.step
        return found

    # -- results ---------------------------------------------------------------------------------------------
    def weights_digest(self) -> str | None:
        if self.config.method != "lora" and not self.dist.on:
            return None  # hashing a full model's weights costs minutes; the output folder has its own hashes
        digest = hashlib.sha256()
        for name, param in self.trainable:
            digest.update(name.encode())
            digest.update(param.detach().to("cpu", self.torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    def restore_best(self) -> None:
        if self.best_trainable and self.config.method == "lora" and self.best_step != self.step:
            with self.torch.no_grad():
                named = dict(self.trainable)
                for name, value in self.best_trainable.items():
                    named[name].copy_(value.to(named[name].device))

    def save_output(self, metadata: dict[str, Any]) -> Path:
        final = self.workdir / OUTPUT_DIR
        staging = self.workdir / f".{OUTPUT_DIR}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        if self.config.method == "lora":
            self.model.save_pretrained(str(staging))  # adapter_config.json + adapter_model.safetensors
        else:
            self.model.save_pretrained(str(staging), safe_serialization=True)
            self.tokenizer.save_pretrained(str(staging))
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))
        _fsync_tree(staging)
        _replace_dir(staging, final)
        return final

    def progress(self, kind: str, loss: float | None, eval_loss: float | None) -> None:
        if self.dist.rank != 0:
            return
        rate = self.run_tokens / self.run_seconds if self.run_seconds > 0 else 0.0
        per_step = self.run_seconds / self.run_steps if self.run_steps else None
        eta = per_step * (self.total_steps - self.step) if per_step is not None else None
        self.on_progress(ProgressEvent(
            step=self.step, total_steps=self.total_steps, epoch=self.step / self.steps_per_epoch, loss=loss,
            eval_loss=eval_loss, tokens_per_s=rate, eta_s=eta,
            learning_rate=float(self.scheduler.get_last_lr()[0]), kind=kind))

    def record_eval(self, value: float | None) -> None:
        """Eval history and early stopping (best state kept in memory, and in checkpoints, for LoRA)."""
        if value is None:
            return
        self.eval_history.append((self.step, value))
        if self.best_eval is None or value < self.best_eval - self.config.early_stopping_min_delta:
            self.best_eval, self.best_step, self.bad_evals = value, self.step, 0
            if self.config.early_stopping_patience and self.config.method == "lora":
                self.best_trainable = {n: p.detach().to("cpu").clone() for n, p in self.trainable}
        else:
            self.bad_evals += 1
            if self.config.early_stopping_patience and self.bad_evals >= self.config.early_stopping_patience:
                self.early_stopped = True
        self.progress("eval", None, value)


def _data_shape(examples: list[td.Example], micro: int, packed: bool) -> Any:
    from garrison.training.gpus import DataShape

    rows, width = td.widest_pass(examples, micro, packed=packed)
    return DataShape(rows, width) if rows else None


def data_shape(config: FinetuneConfig, records: Callable[[], Iterable[dict[str, Any]]]) -> Any:
    """The widest forward pass on these records (tokenized as training will), for a plan made before training."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    examples, _ = td.tokenize_records(tokenizer, records(), config.max_seq_len)
    return _data_shape(examples, config.micro_batch_size or config.batch_size, config.packing)


def train(config: FinetuneConfig, train_records: Callable[[], Iterable[dict[str, Any]]],
          val_records: Callable[[], Iterable[dict[str, Any]]] | None, *, workdir: Path, checkpoint_key: bytes,
          on_progress: Callable[[ProgressEvent], None], should_stop: Callable[[], bool],
          trainer: type[_Trainer] | None = None) -> FinetuneResult:
    """Fine-tune `config.base_model` on chat records; resume from workdir's newest checkpoint if there is one.

    `train_records` / `val_records` are called (once each) to iterate the decrypted records;
    `val_records=None` holds out `config.validation_fraction` of the training set.
    `should_stop()` is polled after every step: when it returns True a checkpoint is saved and
    the result's state is "stopped" (call again to continue). On success the LoRA adapter
    (peft folder) or the full model (HF folder) is in ``workdir/output``. Under torchrun
    (ddp.py) every rank calls this; rank 0 writes checkpoints and output.
    """
    config.validate()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tr = (trainer or _Trainer)(config, workdir, checkpoint_key, on_progress, should_stop)  # distill.py subclasses it
    tr.tokenize_data(train_records, val_records)  # first: the memory estimate is made from the real examples
    tr.plan()
    if tr.plan_.kind == "cpu" and config.cpu_threads:
        tr.torch.set_num_threads(config.cpu_threads)
    random.seed(config.seed + tr.dist.rank)
    if tr.plan_.kind == "cuda":
        tr.torch.cuda.reset_peak_memory_stats(tr.device)
    tr.load_data(train_records, val_records)
    tr.build_model()
    loaded = tr.resume()
    if loaded is None:  # dropout draws differ per rank; a resumed run restored its own
        tr.torch.manual_seed(config.seed + 7919 * tr.dist.rank)
    finished = bool(loaded and loaded["finished"])
    if loaded is None:
        tr.eval_before = tr.evaluate()
        tr.record_eval(tr.eval_before)
    else:
        tr.progress("resumed", tr.loss_history[-1][1] if tr.loss_history else None,
                    tr.eval_history[-1][1] if tr.eval_history else None)
    stopped = False
    while not finished and tr.step < tr.total_steps and not tr.early_stopped:
        if tr.dist.any(should_stop(), tr.device):
            stopped = True
            break
        loss = tr.train_step()
        tr.progress("step", loss, None)
        if config.eval_every and tr.step % config.eval_every == 0 and tr.step < tr.total_steps:
            tr.record_eval(tr.evaluate())
        if tr.step % config.checkpoint_every == 0:
            tr.save_checkpoint()
            tr.progress("checkpoint", loss, None)
    if stopped:
        tr.save_checkpoint()
        eval_after = tr.eval_history[-1][1] if tr.eval_history else None
    else:
        if not finished:
            if not tr.eval_history or tr.eval_history[-1][0] != tr.step:
                tr.record_eval(tr.evaluate())
            tr.restore_best()
            tr.save_checkpoint(finished=True)
        eval_after = tr.best_eval if tr.early_stopped else (tr.eval_history[-1][1] if tr.eval_history else None)
    peak, kind = _peak_memory(tr.plan_.kind, tr.device)
    result = FinetuneResult(
        state="stopped" if stopped else "succeeded", step=tr.step, total_steps=tr.total_steps, output_dir=None,
        checkpoint=str(tr.last_checkpoint) if tr.last_checkpoint else None, resumed_from_step=tr.resumed_from,
        early_stopped=tr.early_stopped, eval_loss_before=tr.eval_before, eval_loss_after=eval_after,
        best_eval_loss=tr.best_eval, loss_history=tr.loss_history, eval_history=tr.eval_history,
        train_tokens=tr.train_tokens, train_seconds=tr.train_seconds,
        tokens_per_s=tr.train_tokens / tr.train_seconds if tr.train_seconds > 0 else 0.0,
        peak_memory_bytes=peak, memory_kind=kind,
        device=tr.plan_.as_dict() | {"world_size": tr.dist.world, "rank": tr.dist.rank, "n_params": tr.n_params,
                                     "n_trainable": tr.n_trainable, "rank_tokens": tr.rank_tokens,
                                     "rank_computed_tokens": tr.computed_tokens},
        weights_sha256=tr.weights_digest(),
        data={"train": tr.train_stats.as_dict(), "validation": tr.val_stats.as_dict() if tr.val_stats else None,
              "train_examples": len(tr.train_examples), "validation_examples": len(tr.val_examples),
              "steps_per_epoch": tr.steps_per_epoch},
        config=config.as_dict() | {"effective_learning_rate": config.effective_learning_rate()})
    if not stopped:
        if tr.dist.rank == 0:
            meta = {k: v for k, v in result.as_dict().items() if k not in {"output_dir", "checkpoint"}}
            result.output_dir = str(tr.save_output(meta))
        else:
            result.output_dir = str(workdir / OUTPUT_DIR)
        tr.dist.barrier()
    return result
