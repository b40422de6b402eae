"""Redaction of records in batches, in this process or in a small pool of worker processes.

The pipeline consumes *segments* in file order: a `BadLine`, or a `Segment` (consecutive
records already redacted and serialized for the vault, with their counts). CSV and plain text
come from a parser's items (`segments`); JSONL comes a block of whole lines at a time (about
1 MiB, cut at newlines, with their first line number: `jsonl_segments`), parsed, validated,
redacted and serialized in this process or, for large files, by the worker processes of a
`RedactionPool`, whose results are given back in order while the main process only decrypts,
cuts and encrypts. A block of plain chat records goes through `RecordRedactor.chat_segment`
(decoded and encoded in C); any other block, line by line.

Workers are started with `spawn` (never `fork` from a threaded daemon), receive plaintext only
over pipes (memory), hold nothing on disk, and die with their parent (PR_SET_PDEATHSIG), so a
`kill -9` of the daemon leaves no worker behind; the pool is shut down when the ingestion ends,
however it ends.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import multiprocessing
import os
import signal
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from garrison.ingest import formats
from garrison.ingest.formats import BadLine, Item, Record, block_lines, jsonl_items, raw_blocks
from garrison.ingest.pii import RedactionResult, Redactor, map_strings
from garrison.ingest.pii_prefilter import Prefilter
from garrison.ingest.policy import RedactionPolicy
from garrison.ingest.records import ChatRecord, decode_chat_block, encode_chat_records, encode_record

__all__ = ["PARALLEL_MIN_BYTES", "REFUSING", "RecordRedactor", "RedactionPool", "Segment", "jsonl_segments", "segments",
           "worker_count"]

REDACT_BATCH = 512  # records per prefilter scan: large enough to amortise the call, small enough for memory
BLOCK_BYTES = 1024 * 1024
#: Inputs smaller than this stay in-process: starting workers costs about a second of CPU.
PARALLEL_MIN_BYTES = 48 * 1024 * 1024
MAX_WORKERS = 4
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Segment:
    """Consecutive records: `data` holds the `count` kept ones as vault lines; `dropped` were withdrawn."""

    data: bytes
    count: int
    dropped: int
    counts: dict[str, int]


class RecordRedactor:
    """Applies the redactor to the text of a record, never to its schema (roles stay roles).

    Records go through in batches: every string of a batch is found with one prefilter scan
    (`Redactor.redact_many`), and a record in which nothing was found is serialized as it
    came, without being copied. `counts` sums the redactions of every record seen.
    """

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self.counts: Counter[str] = Counter()

    def encode_batch(self, records: Sequence[dict[str, Any]]) -> list[bytes | None]:
        """Each record redacted and serialized for the vault (`encode_record`), or None if dropped."""
        texts: list[str] = []
        bounds = [0]
        # Per record: True for the plain chat shape (`_chat_contents`), else whether it holds a float.
        chat: list[bool] = []
        floats: list[bool] = []
        for record in records:
            if _chat_contents(record, texts):
                chat.append(True)
                floats.append(False)
            else:
                chat.append(False)
                floats.append(_collect_record(record, texts))
            bounds.append(len(texts))
        results = self.redactor.redact_many(texts)
        out: list[bytes | None] = []
        for i, record in enumerate(records):
            found = results[bounds[i]:bounds[i + 1]]
            if chat[i]:
                value = self._rebuild_chat(record, found)
                out.append(None if value is None else encode_record(value, has_float=False))
                continue
            value = record if not any(found) and _canonical(record) else self._rebuild(record, iter(found))
            out.append(None if value is None else encode_record(value, has_float=floats[i]))
        return out

    def chat_segment(self, data: bytes) -> Segment | None:
        """A block of whole lines as one segment when every line is a plain chat record (decoded,
        checked and encoded in C by `records`; only the texts in which something was found are
        touched here), else None: the block then goes through the general path.

        Counted as `_rebuild_chat` counts: message by message, and nothing after the message that
        drops its record.
        """
        records = decode_chat_block(data)
        if records is None:
            return None
        messages = [m for r in records for m in r.messages]
        changed = self.redactor.redact_changed([m.content for m in messages])
        counts: dict[str, int] = {}
        owner: list[int] | None = None  # record index of each message, worked out at the first drop
        dropped: set[int] = set()
        for i, result in changed:
            if result.dropped or dropped:
                if owner is None:
                    owner = [k for k, r in enumerate(records) for _ in r.messages]
                if owner[i] in dropped:
                    continue
                if result.dropped:
                    dropped.add(owner[i])
            for entity, n in result.counts.items():
                counts[entity] = counts.get(entity, 0) + n
            messages[i].content = result.text
        kept: list[ChatRecord] = (records if not dropped
                                  else [r for k, r in enumerate(records) if k not in dropped])
        self.counts.update(counts)
        return Segment(encode_chat_records(kept), len(kept), len(dropped), counts)

    def segment(self, records: Sequence[dict[str, Any]]) -> Segment:
        before = self.counts
        self.counts = Counter()
        try:
            lines = [line for line in self.encode_batch(records) if line is not None]
            counts = dict(self.counts)
        finally:
            before.update(self.counts)
            self.counts = before
        return Segment(b"".join(lines), len(lines), len(records) - len(lines), counts)

    def _rebuild_chat(self, record: dict[str, Any],
                      found: list[RedactionResult | None]) -> dict[str, Any] | None:
        """`_rebuild` for the plain chat shape (one text per message, nothing beside `messages`): only
        the messages that change are copied, and the record itself comes back when none does."""
        messages = record["messages"]
        copied: list[Any] | None = None
        counts = self.counts
        for i, r in enumerate(found):
            message = messages[i]
            if r is None:
                if next(iter(message)) == "role":
                    continue
                text = message["content"]  # rebuilt only to put the role first, as `_rebuild` does
            else:
                for t, n in r.counts.items():
                    counts[t] += n
                if r.dropped:
                    return None
                text = r.text
            if copied is None:
                copied = list(messages)
            copied[i] = {"role": message["role"], "content": text}
        return record if copied is None else {"messages": copied}

    def _rebuild(self, record: dict[str, Any], results: Iterator[RedactionResult | None]) -> dict[str, Any] | None:
        """The record with its strings replaced, in `_collect_record`'s order; counted as `redact_record`
        does: a whole message at a time, and nothing after the message that drops the record."""
        counts: dict[str, int] = {}
        state = [False]  # dropped

        def one(text: str) -> str:
            r = next(results)
            if r is None:
                return text
            for t, n in r.counts.items():
                counts[t] = counts.get(t, 0) + n
            if r.dropped:
                state[0] = True
            return r.text

        def part(value: dict[str, Any]) -> dict[str, Any] | None:
            counts.clear()
            state[0] = False
            out = map_strings(value, one)
            for t, n in counts.items():
                self.counts[t] += n
            return None if state[0] else out

        if "messages" in record and isinstance(record["messages"], list):
            messages = []
            for message in record["messages"]:
                rest = part({k: v for k, v in message.items() if k != "role"})
                if rest is None:
                    return None
                messages.append({"role": message["role"], **rest})
            others = {k: v for k, v in record.items() if k != "messages"}
            extra = part(others) if others else {}
            if extra is None:
                return None
            return {"messages": messages, **extra}
        return part(record)


def _collect(v: Any, out: list[str]) -> bool:
    """Append the strings inside `v` in walk order; True if it holds a float (see encode_record)."""
    if isinstance(v, str):
        out.append(v)
        return False
    if isinstance(v, dict):
        v = v.values()
    elif not isinstance(v, list | tuple):
        return isinstance(v, float)
    has_float = False
    for x in v:
        if type(x) is str:
            out.append(x)
        elif _collect(x, out):
            has_float = True
    return has_float


def _chat_contents(record: dict[str, Any], out: list[str]) -> bool:
    """For the plain chat shape, `{"messages": [{"role": str, "content": str}, ...]}` and nothing else,
    append each content (what `_collect_record` would) and say True; else append nothing and say False.

    Nearly every record has this shape; knowing it spares the generic walk, the float search and
    the key-order check (`RecordRedactor._rebuild_chat`).
    """
    if len(record) != 1:
        return False
    messages = record.get("messages")
    if type(messages) is not list:
        return False
    start = len(out)
    append = out.append
    for message in messages:
        if type(message) is not dict or len(message) != 2:
            break
        content = message.get("content")
        if type(content) is not str or type(message.get("role")) is not str:
            break
        append(content)
    else:
        return True
    del out[start:]
    return False


def _collect_record(record: dict[str, Any], out: list[str]) -> bool:
    """The strings `RecordRedactor` redacts, in its order: each message but its role, then the other keys."""
    messages = record.get("messages")
    if not isinstance(messages, list):
        return _collect(record, out)
    has_float = False
    for message in messages:
        for k, v in message.items():
            if k != "role" and _collect(v, out):
                has_float = True
    for k, v in record.items():
        if k != "messages" and _collect(v, out):
            has_float = True
    return has_float


def _canonical(record: dict[str, Any]) -> bool:
    """True if rebuilding would give the same key order (messages first, each role first)."""
    messages = record.get("messages")
    if not isinstance(messages, list):
        return True
    if next(iter(record)) != "messages":
        return False
    return all(next(iter(m), None) == "role" for m in messages)


# -------------------------------------------------------------------------- sources of segments

def segments(items: Iterable[Item], redact: RecordRedactor) -> Iterator[Segment | BadLine]:
    """A parser's items as segments, in order: records are redacted REDACT_BATCH at a time."""
    pending: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, Record):
            pending.append(item.value)
            if len(pending) >= REDACT_BATCH:
                yield redact.segment(pending)
                pending = []
            continue
        if pending:
            yield redact.segment(pending)
            pending = []
        yield item
    if pending:
        yield redact.segment(pending)


#: Set in a parse state by the pipeline once the file will be refused (a bad line under the "refuse"
#: policy): from then on blocks are only checked, for the report's list of bad lines, not redacted.
REFUSING = "refusing"


def _block_segments(first: int, data: bytes, kind: str | None, redact: RecordRedactor,
                    state: dict[str, str]) -> list[Segment | BadLine]:
    if state.get(REFUSING):
        if kind == "chat" and len(data) <= formats.MAX_RECORD_BYTES and decode_chat_block(data) is not None:
            return []
        lines, long_numbers = block_lines(first, data)
        return [item for item in jsonl_items(lines, long_numbers, kind, state) if isinstance(item, BadLine)]
    if kind in ("chat", None) and len(data) <= formats.MAX_RECORD_BYTES:
        segment = redact.chat_segment(data)
        if segment is not None:  # every line a chat record: for `jsonl`, the first one decides "chat"
            state.setdefault("format", "chat")
            return [segment]
    lines, long_numbers = block_lines(first, data)
    return list(segments(jsonl_items(lines, long_numbers, kind, state), redact))


_WORKER: tuple[Any, RecordRedactor] | None = None  # (prefilter key, redactor), built at the first block
_INIT: tuple[RedactionPolicy, bytes] | None = None


def _init_worker(policy: RedactionPolicy, hmac_key: bytes) -> None:
    """Runs in each worker: die with the parent, ignore the terminal's ^C, keep what the redactor needs."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the pipe closing still ends the worker
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _INIT
    _INIT = (policy, hmac_key)


def _started() -> None:
    """A no-op task: submitting one per worker starts them all at once."""


def _work(first: int, data: bytes, kind: str, prefilter: Any, refusing: bool) -> list[Segment | BadLine]:
    global _WORKER
    if _WORKER is None or _WORKER[0] != prefilter[0]:
        assert _INIT is not None
        Prefilter.preload(prefilter)  # the parent's compiled database: no translation, no compilation here
        _WORKER = (prefilter[0], RecordRedactor(Redactor(*_INIT)))
    return _block_segments(first, data, kind, _WORKER[1], {REFUSING: "1"} if refusing else {})


def worker_count() -> int:
    """Workers for this machine: one per core the process may use, the main process included."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(0, min(MAX_WORKERS, cores))


class RedactionPool:
    """Worker processes for one ingestion, started as soon as the ingestion knows it will use them.

    Starting a worker (an interpreter and its imports) costs a fifth of a second of CPU; asking
    for them before the parent builds its redactor (a Hyperscan compilation, unless one is saved)
    lets the two overlap. The workers get the policy and key now, and the parent's compiled
    prefilter (about 150 KB) with each block, so they never compile it themselves. (Not in the
    start-up arguments: spawn writes those into a pipe the parent keeps open, and a worker that
    died before reading them all would leave that write, and the ingestion, blocked for good.)
    """

    def __init__(self, workers: int, policy: RedactionPolicy, hmac_key: bytes) -> None:
        self.workers = workers
        context = multiprocessing.get_context("spawn")
        self._executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=_init_worker, initargs=(policy, hmac_key))
        for _ in range(workers):
            self._executor.submit(_started)

    def submit(self, first: int, data: bytes, kind: str, prefilter: Any,
               refusing: bool = False) -> concurrent.futures.Future[list[Segment | BadLine]]:
        return self._executor.submit(_work, first, data, kind, prefilter, refusing)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def jsonl_segments(stream: Any, kind: str | None, state: dict[str, str], redact: RecordRedactor,
                   pool: RedactionPool | None = None) -> Iterator[Segment | BadLine]:
    """JSONL segments, in file order, a block of whole lines at a time: in this process, or with
    blocks parsed and redacted by the pool's workers. The pool is closed when this ends.

    Blocks are handled here until the record kind is known (the first valid record decides it for
    `jsonl`), so every worker checks records against the same kind, as the sequential parser does.
    """
    try:
        yield from _jsonl_segments(stream, kind, state, redact, pool)
    finally:
        if pool is not None:
            pool.close()


def _jsonl_segments(stream: Any, kind: str | None, state: dict[str, str], redact: RecordRedactor,
                    pool: RedactionPool | None) -> Iterator[Segment | BadLine]:
    too_long = f"line longer than {formats.MAX_RECORD_BYTES} bytes"
    blocks = raw_blocks(stream, BLOCK_BYTES)
    for first, data in blocks:
        if data is None:
            yield BadLine(first, too_long)
            continue
        yield from _block_segments(first, data, kind, redact, state)
        kind = state.get("format") or kind
        if kind is not None:
            break
    if kind is None:
        return
    if pool is None:
        for first, data in blocks:
            if data is None:
                yield BadLine(first, too_long)
            else:
                yield from _block_segments(first, data, kind, redact, state)
        return
    prefilter = redact.redactor.prefilter.export()
    window: collections.deque[concurrent.futures.Future[list[Segment | BadLine]] | list[Segment | BadLine]]
    window = collections.deque()
    for first, data in blocks:
        window.append([BadLine(first, too_long)] if data is None
                      else pool.submit(first, data, kind, prefilter, bool(state.get(REFUSING))))
        while len(window) > 2 * pool.workers + 1:
            yield from _take(window.popleft(), redact)
    while window:
        yield from _take(window.popleft(), redact)


def _take(done: concurrent.futures.Future[list[Segment | BadLine]] | list[Segment | BadLine],
          redact: RecordRedactor) -> list[Segment | BadLine]:
    result = done.result() if isinstance(done, concurrent.futures.Future) else done
    for seg in result:
        if isinstance(seg, Segment):
            redact.counts.update(seg.counts)  # as if this process had redacted them
    return result
