"""Chat records to training tensors: chat-template tokenization, assistant-only labels, packing.

Everything here stays in memory: records arrive decrypted from the vault and leave as token
ids; nothing is written to disk.

Loss mask. A record is rendered with the base model's own chat template
(garrison.engine.chat_template, which equals `tokenizer.apply_chat_template`), exactly as
serving will render it. The characters an
assistant turn contributes are found by rendering the conversation turn by turn: the turn
starts where ``render(messages[:i], add_generation_prompt=True)`` ends and stops where
``render(messages[:i + 1])`` ends (trailing whitespace dropped), so the assistant's content
and its end-of-turn marker (``</s>``, ``<|im_end|>``, ``<|eot_id|>``...) are learned and
the role header, the prompt, system text and the template's separators are not. Templates
that rewrite earlier turns when more follow (the prefix is not a prefix of the full text)
fall back to locating each assistant content in order, and a turn the template does not
reproduce is not trained.
OpenAI's per-message ``"weight": 0`` excludes an assistant turn from the loss.

Token ids. garrison.engine.prompt_tokens holds the rule serving shares: the text up to the
first assistant turn is tokenized as a whole, as a served prompt is, and no token crosses
the start of an assistant turn (the generation-prompt boundary) or the end of a trained one;
a token that would is re-segmented there (a template ending in ``assistant: `` gives
``':' '▁'`` then the answer's ``'Your'``, which is what serving's prompt ends with). Labels
are then the ids between each trained turn's cuts. A tokenizer that cannot be re-segmented
(a slow one) falls back to tokenizing the whole text and labelling by the fast tokenizer's
offset mapping (a token is trained if it overlaps a turn) or by token counts of prefixes;
such records are counted (``cut_fallback``).

Packing. Examples are placed whole into rows (best-fit decreasing), never split across
rows. The training loop packs each micro-batch's examples into rows as wide as its longest
example: never wider than padding would make them, with far fewer pad tokens, and a step
still holds exactly ``batch_size`` examples (OpenAI's meaning of batch size). Each example
keeps its own position ids starting at 0, and the model is called with
``attention_mask=None`` and ``use_cache=False`` (with a KV cache transformers skips the
check): transformers (4.53+) then derives a block-diagonal causal mask from the
position-id resets (sdpa and eager build it, flash attention 2 uses the resets natively),
so no token attends to another example and RoPE sees the same positions as unpacked
training: a packed row computes the same per-token losses as its examples one by one
(tests/training/test_finetune.py checks this). Each segment's first label is ignored (in a
packed row the previous example's last token would predict it), and padding at the end of
a row is its own segment with label -100.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from garrison.engine.chat_template import chosen_template, render
from garrison.engine.prompt_tokens import BoundaryError, cut_ids
from garrison.errors import InvalidRequest

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One tokenized conversation: ids and labels (IGNORE_INDEX outside assistant turns)."""

    input_ids: list[int]
    labels: list[int]
    cut_fallback: bool = False  # tokenized whole: a token may straddle a generation-prompt boundary

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class Row:
    """One row of a batch: a single example, or several packed examples (`segments` lengths)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    segments: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class TokenizeStats:
    records: int = 0
    examples: int = 0
    truncated: int = 0
    skipped_no_assistant: int = 0
    skipped_invalid: int = 0
    tokens: int = 0
    target_tokens: int = 0
    cut_fallback: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "errors"} | {"errors": self.errors[:10]}


def normalize_record(record: Any) -> list[dict[str, Any]]:
    """The record's messages, checked; prompt/completion records become one user and one assistant turn."""
    if not isinstance(record, dict):
        raise ValueError("a record must be a JSON object")
    if "messages" not in record and isinstance(record.get("prompt"), str) and isinstance(
            record.get("completion"), str):
        return [{"role": "user", "content": record["prompt"], "weight": 1},
                {"role": "assistant", "content": record["completion"], "weight": 1}]
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("a chat record needs a non-empty 'messages' list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"message {i}: role must be one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {i}: content must be a string")
        weight = message.get("weight", 1)
        if weight not in (0, 1):
            raise ValueError(f"message {i}: weight must be 0 or 1")
        out.append({"role": message["role"], "content": message["content"], "weight": weight})
    return out


def _render(tokenizer: Any, messages: list[dict[str, Any]], *, generation_prompt: bool = False) -> str:
    """Garrison's renderer (not `apply_chat_template`): serving renders with the same code, so the two
    cannot drift apart (a date from `strftime_now`, `tojson`'s escaping), and it equals transformers'."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return render(chosen_template(tokenizer.chat_template), plain, special_tokens=tokenizer.special_tokens_map,
                  add_generation_prompt=generation_prompt)


def assistant_turns(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int, bool]]]:
    """The rendered conversation and each assistant turn it shows: [start, end) characters, and whether the
    loss covers it (its weight)."""
    full = _render(tokenizer, messages)
    eos = getattr(tokenizer, "eos_token", None) or ""
    turns: list[tuple[int, int, bool]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        span: tuple[int, int] | None = None
        try:
            prefix = _render(tokenizer, messages[:i], generation_prompt=True)
            upto = _render(tokenizer, messages[: i + 1]).rstrip()
            if len(upto) > len(prefix) >= cursor and full.startswith(prefix) and full.startswith(upto):
                span = (len(prefix), len(upto))
        except Exception:  # a template that cannot render a prefix (e.g. no user turn yet)
            span = None
        if span is None:  # the template rewrites earlier turns: find the content itself, in order
            start = full.find(message["content"], cursor)
            if start < 0:  # the template drops or rewrites this turn (e.g. earlier reasoning): nothing to learn
                continue
            end = start + len(message["content"])
            if eos and full.startswith(eos, end):
                end += len(eos)
            span = (start, end)
        cursor = span[1]
        turns.append((span[0], span[1], bool(message.get("weight", 1))))
    return full, turns


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans the loss covers."""
    full, turns = assistant_turns(tokenizer, messages)
    return full, [(start, end) for start, end, trained in turns if trained]


def _labels_from_offsets(ids: list[int], offsets: Sequence[tuple[int, int]],
                         spans: list[tuple[int, int]]) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    starts = [s for s, _ in spans]
    for t, (a, b) in enumerate(offsets):
        k = bisect.bisect_right(starts, max(a, b - 1)) - 1
        if k >= 0 and b > spans[k][0] and a < spans[k][1]:
            labels[t] = ids[t]
    return labels


def tokenize_chat(tokenizer: Any, record: Any, max_seq_len: int) -> tuple[Example | None, bool]:
    """One record to an Example (None when no assistant token survives); also whether it was truncated."""
    messages = normalize_record(record)
    if not any(m["role"] == "assistant" and m["weight"] for m in messages):
        return None, False
    text, turns = assistant_turns(tokenizer, messages)
    spans = [(start, end) for start, end, trained in turns if trained]
    cuts = [c for start, end, trained in turns for c in ((start, end) if trained else (start,))]
    fallback = False
    try:
        ids, marks = cut_ids(tokenizer, text, cuts)
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            labels[marks[start]:marks[end]] = ids[marks[start]:marks[end]]
    except BoundaryError:
        fallback = True
        ids, labels = _whole_text_labels(tokenizer, text, spans)
    truncated = len(ids) > max_seq_len
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None, truncated
    return Example(ids, labels, fallback), truncated


def _whole_text_labels(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """The text tokenized at once, labels from character offsets (tokens may straddle a turn's boundary)."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = [(int(o[0]), int(o[1])) for o in enc["offset_mapping"]]
        if all(b > a for a, b in offsets):
            labels = _labels_from_offsets(ids, offsets, spans)
        else:
            labels = _labels_from_counts(tokenizer, text, ids, spans)
    else:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        labels = _labels_from_counts(tokenizer, text, ids, spans)
    return ids, labels


def _labels_from_counts(tokenizer: Any, text: str, ids: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """Token spans from the token counts of text prefixes: for tokenizers without offset mappings."""
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        a = len(tokenizer(text[:start], add_special_tokens=False)["input_ids"])
        b = len(tokenizer(text[:end], add_special_tokens=False)["input_ids"])
        for t in range(a, min(b, len(ids))):
            labels[t] = ids[t]
    return labels


def tokenize_records(tokenizer: Any, records: Iterable[Any], max_seq_len: int) -> tuple[list[Example], TokenizeStats]:
    """Tokenize every record; bad records are counted (with a reason) and skipped, not fatal."""
    stats = TokenizeStats()
    examples: list[Example] = []
    for n, record in enumerate(records):
        stats.records += 1
        try:
            example, truncated = tokenize_chat(tokenizer, record, max_seq_len)
        except ValueError as err:
            stats.skipped_invalid += 1
            if len(stats.errors) < 10:
                stats.errors.append(f"record {n}: {err}")
            continue
        stats.truncated += int(truncated)
        if example is not None and example.cut_fallback:
            stats.cut_fallback += 1
        if example is None:
            stats.skipped_no_assistant += 1
            continue
        examples.append(example)
        stats.tokens += len(example)
        stats.target_tokens += example.n_targets
    stats.examples = len(examples)
    return examples, stats


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A held-out split chosen by a seeded hash of each example's ids, so it is independent of record order
    and the same split comes back on resume."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    n_val = min(len(examples) - 1, max(1, round(len(examples) * fraction)))

    def key(item: tuple[int, Example]) -> bytes:
        return hashlib.sha256(f"{seed}:{item[1].input_ids}".encode()).digest() + item[0].to_bytes(8, "big")

    ranked = sorted(enumerate(examples), key=key)
    val_idx = {i for i, _ in ranked[:n_val]}
    return ([e for i, e in enumerate(examples) if i not in val_idx],
            [e for i, e in enumerate(examples) if i in val_idx])


def _segment_labels(example: Example) -> list[int]:
    """Labels with the first one ignored: nothing inside the segment predicts it (in a packed row the
    previous example's last token would), so it can never count as a target."""
    return [IGNORE_INDEX, *example.labels[1:]] if example.labels else []


def as_rows(examples: list[Example]) -> list[Row]:
    """Unpacked: one example per row (padded per batch at collation)."""
    return [Row(e.input_ids, _segment_labels(e), list(range(len(e))), [len(e)]) for e in examples]


def pack(examples: list[Example], max_seq_len: int) -> list[Row]:
    """Best-fit decreasing: each example goes whole into the fullest row it fits, else a new row.

    Deterministic for a given example list. Position ids restart at 0 for each example, which
    is what keeps packed examples apart (see the module docstring).
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in order:
        size = len(examples[i])
        k = bisect.bisect_left(free, (size, -1))
        if k < len(free):
            space, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (space - size, b))
        else:
            bins.append([i])
            bisect.insort(free, (max_seq_len - size, len(bins) - 1))
    rows = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in members:
            ids += examples[i].input_ids
            labels += _segment_labels(examples[i])
            positions += range(len(examples[i]))
        rows.append(Row(ids, labels, positions, [len(examples[i]) for i in members]))
    return rows


def widest_pass(examples: Sequence[Example], micro: int, *, packed: bool) -> tuple[int, int]:
    """Rows and width of the widest forward pass the loop can build from these examples: the `micro` longest
    in one micro-batch (any other choice is no wider and has no longer example). The memory estimate's input."""
    top = sorted(examples, key=len, reverse=True)[:max(1, micro)]
    if not top:
        return 0, 0
    width = len(top[0])
    return (len(pack(list(top), width)) if packed else len(top)), width


def collate(rows: Sequence[Row], pad_id: int, *, packed: bool) -> dict[str, Any]:
    """Tensors for one (micro-)batch, padded to its longest row.

    Packed rows pass position ids and no attention mask (block-diagonal causal attention,
    padding as its own segment); unpacked rows pass the usual 2-D padding mask.
    """
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    batch: dict[str, Any] = {"input_ids": ids, "labels": labels}
    if packed:
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            n = len(row)
            ids[r, :n] = torch.tensor(row.input_ids)
            labels[r, :n] = torch.tensor(row.labels)
            positions[r, :n] = torch.tensor(row.position_ids)
            positions[r, n:] = torch.arange(width - n)
        batch["position_ids"] = positions
    else:
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            n = len(row)
            ids[r, :n] = torch.tensor(row.input_ids)
            labels[r, :n] = torch.tensor(row.labels)
            mask[r, :n] = 1
        batch["attention_mask"] = mask
    return batch


def fingerprint(rows: Sequence[Row]) -> str:
    """A digest of the training rows, stored in checkpoints: resuming on different data is refused."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row.input_ids, row.labels]).encode())
    return digest.hexdigest()


def require_examples(examples: list[Example], stats: TokenizeStats, what: str) -> None:
    if not examples:
        reason = "; ".join(stats.errors[:3]) or "no record has an assistant turn that fits max_seq_len"
        raise InvalidRequest(f"the {what} set has no usable example ({stats.records} records): {reason}",
                             code="invalid_training_data")
