"""The continuous-batching llama.cpp engine, on the tiny real GGUF Llama.

The acceptance criterion is the first test: greedy outputs do not depend on what else
was in the batch. The rest pin the request contract (stop strings, lengths, errors,
cancellation, queue limits, grammar, logprobs, prefix reuse).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from garrison.engine.json_grammar import InvalidGrammar, json_schema_grammar
from garrison.engine.llama_engine import LlamaEngine, _runs
from garrison.engine.llama_sampling import TextAssembler
from garrison.engine.types import (
    ContextLengthExceeded,
    DeadlineExceeded,
    EngineClosed,
    Finish,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from garrison.errors import InvalidRequest, NotFound, RateLimited

PROMPTS = [
    "The catalog keeps", "A job is", "Count to five", "What is a model", "The daemon starts",
    "Sealed data is", "One, two, three", "Training runs on", "The key is", "Every request",
    "An adapter is", "The queue holds", "Tokens are",
    # Longer than a step's token budget: evaluated in chunks while the others decode.
    "The catalog keeps every job and every model, and the daemon answers requests. " * 3,
    "Export the model to GGUF, then quantize it, then serve it to every client that asks. " * 3,
    "Hello there",
]


@dataclass
class Result:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    events: list[TokenEvent] = field(default_factory=list)
    finish: Finish | None = None


async def run(engine: LlamaEngine, req: GenerationRequest, timeout: float = 60) -> Result:
    async def consume() -> Result:
        out = Result()
        async for item in engine.generate(req):
            if isinstance(item, Finish):
                out.finish = item
                out.text += item.text
            else:
                out.events.append(item)
                out.tokens.append(item.token_id)
                out.text += item.text
        return out

    return await asyncio.wait_for(consume(), timeout)


def greedy(engine: LlamaEngine, text: str, max_tokens: int = 16, **kw: object) -> GenerationRequest:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)  # type: ignore[arg-type]
    return GenerationRequest(prompt_tokens=engine.tokenize(text), params=params)


async def wait_idle(engine: LlamaEngine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.active_slots == 0 and stats.queued_requests == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine not idle after {timeout}s: {engine.stats()}")


@pytest.fixture(scope="module", autouse=True)
def verified_kernels(tiny_llama_gguf: Path, repack_verdicts: Any) -> Iterator[None]:
    """These unit tests drive the engine in this process (they read its slots and threads), so its
    kernels are the ones the runner would get: extra buffer types only where a throw-away probe
    decoded the model's weight types with them on this CPU. A kernel that faults never runs here."""
    use, _why = repack_verdicts.decide("auto", tiny_llama_gguf)
    defaults = LlamaEngine.__init__.__kwdefaults__
    saved = defaults["use_extra_bufts"]
    defaults["use_extra_bufts"] = use
    yield
    defaults["use_extra_bufts"] = saved


@pytest.fixture(scope="module")
def engine(tiny_llama_gguf: Path, verified_kernels: None) -> Iterator[LlamaEngine]:
    eng = LlamaEngine(tiny_llama_gguf, n_ctx_per_slot=256, n_parallel=4, n_batch=64, n_threads=2, max_queue=32)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def tiny_lora_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_llama_gguf: Path) -> Path:
    """A rank-4 LoRA for the tiny Llama, written with llama.cpp's own gguf-py (random, strong weights).

    Random rather than trained: the tests need an adapter that visibly changes greedy
    output, not a good one.
    """
    import sys

    import numpy as np

    from garrison.paths import converter_dir

    gguf_py = converter_dir() / "gguf-py"
    assert gguf_py.is_dir(), f"llama.cpp's gguf-py is not installed at {gguf_py}; run ./install.sh"
    sys.path.insert(0, str(gguf_py))
    try:
        import gguf
    finally:
        sys.path.remove(str(gguf_py))
    out = tmp_path_factory.mktemp("lora") / "tiny-lora.gguf"
    writer = gguf.GGUFWriter(str(out), arch="llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 4.0)
    rng = np.random.default_rng(0)
    # (in, out) of the tiny model's weights: hidden 64, 2 KV heads of 16, FFN 128.
    shapes = {"attn_q": (64, 64), "attn_v": (64, 32), "ffn_up": (64, 128)}
    for layer in range(2):
        for name, (n_in, n_out) in shapes.items():
            # PyTorch layout, as convert_lora_to_gguf.py writes it: A is (r, in), B is (out, r).
            writer.add_tensor(f"blk.{layer}.{name}.weight.lora_a",
                              (rng.standard_normal((4, n_in)) * 0.5).astype(np.float32))
            writer.add_tensor(f"blk.{layer}.{name}.weight.lora_b",
                              (rng.standard_normal((n_out, 4)) * 0.5).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# -- no model needed -----------------------------------------------------------------------


def test_text_assembler_holds_back_stop_prefix_across_pieces() -> None:
    asm = TextAssembler(["END"])
    assert asm.push(b"Hello E") == ("Hello ", False)  # "E" could start "END"
    assert asm.push(b"x") == ("Ex", False)  # it did not
    assert asm.push(b" E") == (" ", False)
    assert asm.push(b"N") == ("", False)
    assert asm.push(b"D and more") == ("", True)  # nothing of the stop string leaks


def test_text_assembler_joins_split_utf8_and_flushes() -> None:
    asm = TextAssembler([])
    raw = "é✓".encode()
    assert asm.push(raw[:1]) == ("", False)
    assert asm.push(raw[1:3]) == ("é", False)
    assert asm.push(raw[3:]) == ("✓", False)
    asm2 = TextAssembler(["zz"])
    assert asm2.push(b"ab z") == ("ab ", False)
    assert asm2.flush() == "z"


def test_sampling_params_are_validated() -> None:
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(top_p=0).validate()
    assert err.value.param == "top_p"


def test_json_schema_grammar_rejects_garbage() -> None:
    assert "root" in json_schema_grammar({"type": "boolean"})
    with pytest.raises(InvalidGrammar):
        json_schema_grammar("{not json")


# -- the engine ----------------------------------------------------------------------------


async def test_concurrent_batched_outputs_equal_solo_outputs(tiny_llama_gguf: Path) -> None:
    """16 greedy requests through 4 slots (12 queue) match each request run alone."""
    with LlamaEngine(tiny_llama_gguf, n_ctx_per_slot=256, n_parallel=1, n_batch=64, n_threads=2) as solo:
        alone = [await run(solo, greedy(solo, p, max_tokens=24)) for p in PROMPTS]
    with LlamaEngine(tiny_llama_gguf, n_ctx_per_slot=256, n_parallel=4, n_batch=32, n_threads=2,
                     max_queue=16) as eng:
        together = await asyncio.gather(*(run(eng, greedy(eng, p, max_tokens=24)) for p in PROMPTS))
        stats = eng.stats()
    for prompt, a, b in zip(PROMPTS, alone, together, strict=True):
        assert b.tokens == a.tokens, prompt
        assert b.text == a.text
        assert b.finish is not None and a.finish is not None
        assert b.finish.finish_reason == a.finish.finish_reason
    generated = sum(len(r.tokens) for r in together)
    assert stats.tokens_generated == generated
    # Batching happened: far fewer decode steps than tokens produced.
    assert stats.decode_steps < generated / 2, stats
    assert stats.requests_finished == len(PROMPTS)


async def test_two_engines_share_one_compute_thread(tiny_llama_gguf: Path) -> None:
    """Two models in one process take turns on one thread (one OpenMP team, see the engine's
    docstring); each answers as it does alone, and closing one mid-stream leaves the other running."""
    import threading

    with LlamaEngine(tiny_llama_gguf, n_ctx_per_slot=256, n_parallel=2, n_batch=32, n_threads=2) as solo:
        alone = [await run(solo, greedy(solo, p, max_tokens=24)) for p in PROMPTS[:4]]
    before = {t.name for t in threading.enumerate()}
    first = LlamaEngine(tiny_llama_gguf, n_ctx_per_slot=256, n_parallel=2, n_batch=32, n_threads=2)
    second = LlamaEngine(tiny_llama_gguf, n_ctx_per_slot=256, n_parallel=2, n_batch=32, n_threads=2)
    try:
        assert [t.name for t in threading.enumerate()].count("llama-compute") == 1
        assert {t.name for t in threading.enumerate()} - before <= {"llama-compute"}
        doomed = first.generate(greedy(first, "A job is", max_tokens=200))
        await doomed.__anext__()
        together = await asyncio.gather(*(run(e, greedy(e, p, max_tokens=24))
                                          for e, p in zip([second] * 4, PROMPTS[:4], strict=True)),
                                        first.aclose())
        with pytest.raises(EngineClosed):
            async for _ in doomed:
                pass
        for a, b in zip(alone, together[:4], strict=True):
            assert isinstance(b, Result) and b.tokens == a.tokens
        assert (await run(second, greedy(second, PROMPTS[0], max_tokens=24))).tokens == alone[0].tokens
    finally:
        first.close()
        second.close()


async def test_new_requests_keep_busy_slots_in_one_run(tiny_llama_gguf: Path) -> None:
    """llama.cpp gives each run of consecutive sequence ids its own pass over the weights, so a
    request goes next to the busy slots, not to the least recently used one (which here is 2)."""
    assert _runs({0, 1, 2, 5}) == 2 and _runs(set()) == 0 and _runs({3}) == 1
    with LlamaEngine(tiny_llama_gguf, n_ctx_per_slot=256, n_parallel=4, n_batch=64, n_threads=2) as eng:
        lengths = [2, 12, 4, 12]  # slot 0 finishes first, then slot 2: the LRU order is 0, 2
        await asyncio.gather(*(run(eng, greedy(eng, p, max_tokens=n, ignore_eos=True))
                               for p, n in zip(PROMPTS[:4], lengths, strict=True)))
        streams = [eng.generate(greedy(eng, p, max_tokens=40, ignore_eos=True)) for p in PROMPTS[5:7]]
        for stream in streams:
            await stream.__anext__()
        busy = {seq for seq, _, taken in eng.iter_slots() if taken}
        for stream in streams:
            await stream.aclose()
    assert busy == {0, 1}, busy


async def test_same_seed_same_output(engine: LlamaEngine) -> None:
    def req(seed: int) -> GenerationRequest:
        return GenerationRequest(engine.tokenize("The catalog"), SamplingParams(temperature=1.0, seed=seed,
                                                                                 max_tokens=16))

    first, second = await asyncio.gather(run(engine, req(7)), run(engine, req(7)))
    assert first.tokens == second.tokens
    others = await asyncio.gather(*(run(engine, req(s)) for s in (1, 2, 3)))
    assert any(o.tokens != first.tokens for o in others)


async def test_stop_string_spanning_tokens_is_not_emitted(engine: LlamaEngine) -> None:
    base = await run(engine, greedy(engine, "Count to five", max_tokens=24, ignore_eos=True))
    pieces = [e.text for e in base.events]
    # A stop string made of the end of one piece and the start of the next.
    k = next(i for i in range(1, len(pieces) - 1) if len(pieces[i]) >= 2 and pieces[i + 1].strip())
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    expected = base.text[:base.text.index(stop)]
    got = await run(engine, greedy(engine, "Count to five", max_tokens=24, stop=(stop,), ignore_eos=True))
    assert got.finish is not None and got.finish.finish_reason == "stop"
    assert got.text == expected
    assert stop not in got.text


async def test_max_tokens_gives_length(engine: LlamaEngine) -> None:
    got = await run(engine, greedy(engine, "The catalog keeps", max_tokens=3))
    assert got.finish is not None
    assert (got.finish.finish_reason, got.finish.completion_tokens, len(got.events)) == ("length", 3, 3)
    assert got.finish.prompt_tokens == len(engine.tokenize("The catalog keeps"))


async def test_prompt_too_long_is_refused(engine: LlamaEngine) -> None:
    tokens = engine.tokenize("word " * 300)
    assert len(tokens) + 8 > engine.n_ctx_per_slot
    with pytest.raises(ContextLengthExceeded) as err:
        engine.generate(GenerationRequest(tokens, SamplingParams(max_tokens=8)))
    assert err.value.code == "context_length_exceeded"
    assert isinstance(err.value, InvalidRequest)
    # max_tokens counts too: a short prompt with a huge budget is refused the same way.
    with pytest.raises(ContextLengthExceeded):
        engine.generate(GenerationRequest(engine.tokenize("hi"), SamplingParams(max_tokens=engine.n_ctx_per_slot)))


async def test_prefix_reuse_counts_and_matches_cold_engine(tiny_llama_gguf: Path) -> None:
    prefix = "The catalog keeps every job and every model. A job is a row in the catalog. " * 2
    first, second = prefix + "Count to five", prefix + "What is a job?"
    with LlamaEngine(tiny_llama_gguf, n_ctx_per_slot=256, n_parallel=2, n_batch=64, n_threads=2) as warm:
        await run(warm, greedy(warm, first))
        got = await run(warm, greedy(warm, second))
        reused = warm.stats().prompt_tokens_reused
    with LlamaEngine(tiny_llama_gguf, n_ctx_per_slot=256, n_parallel=2, n_batch=64, n_threads=2) as cold:
        want = await run(cold, greedy(cold, second))
        assert cold.stats().prompt_tokens_reused == 0
    assert got.finish is not None and want.finish is not None
    assert got.finish.cached_tokens > 20
    assert reused == got.finish.cached_tokens
    assert want.finish.cached_tokens == 0
    assert got.tokens == want.tokens


async def test_repeated_prompt_reevaluates_only_last_token(engine: LlamaEngine) -> None:
    req = greedy(engine, "Training runs on the CPU of the appliance", max_tokens=4)
    await run(engine, req)
    again = await run(engine, req)
    assert again.finish is not None
    assert again.finish.cached_tokens == len(req.prompt_tokens) - 1


# A grammar that never completes forbids EOS: such a request ends only by max_tokens,
# cancellation or deadline, and 2000 tokens take the tiny model well over half a second.
ENDLESS = SamplingParams(temperature=0, max_tokens=2000, grammar='root ::= "a" root')


@pytest.fixture(scope="module")
def long_engine(tiny_llama_gguf: Path) -> Iterator[LlamaEngine]:
    eng = LlamaEngine(tiny_llama_gguf, n_ctx_per_slot=2048, n_parallel=2, n_batch=16, n_threads=2)
    yield eng
    eng.close()


async def assert_cancelled_early(engine: LlamaEngine, before_finished: int, before_tokens: int) -> None:
    """The slot is free, and the request was dropped (never finished) long before max_tokens."""
    await wait_idle(engine, timeout=5)
    stats = engine.stats()
    assert stats.requests_finished == before_finished
    assert stats.tokens_generated - before_tokens < ENDLESS.max_tokens


async def test_cancel_mid_stream_frees_slot(long_engine: LlamaEngine) -> None:
    await wait_idle(long_engine)
    before = long_engine.stats()
    stream = long_engine.generate(GenerationRequest(long_engine.tokenize("The daemon starts"), ENDLESS))
    seen = 0
    async for item in stream:
        assert isinstance(item, TokenEvent)
        seen += 1
        if seen == 2:
            break
    await stream.aclose()
    await assert_cancelled_early(long_engine, before.requests_finished, before.tokens_generated)


async def test_dropped_stream_frees_slot(long_engine: LlamaEngine) -> None:
    """A handler that breaks out and returns, without aclose(), still frees the slot."""
    await wait_idle(long_engine)
    before = long_engine.stats()

    async def read_one() -> None:
        async for _ in long_engine.generate(GenerationRequest(long_engine.tokenize("The daemon"), ENDLESS)):
            break

    await read_one()
    await assert_cancelled_early(long_engine, before.requests_finished, before.tokens_generated)


async def test_cancelled_consumer_task_frees_slot(long_engine: LlamaEngine) -> None:
    await wait_idle(long_engine)
    before = long_engine.stats()
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in long_engine.generate(GenerationRequest(long_engine.tokenize("Hello there"), ENDLESS)):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_cancelled_early(long_engine, before.requests_finished, before.tokens_generated)


async def test_full_queue_raises_rate_limited(tiny_llama_gguf: Path) -> None:
    with LlamaEngine(tiny_llama_gguf, n_ctx_per_slot=256, n_parallel=1, n_batch=16, n_threads=2,
                     max_queue=1) as eng:
        running = eng.generate(greedy(eng, "A job is", max_tokens=200))
        queued = eng.generate(greedy(eng, "A key is", max_tokens=200))
        with pytest.raises(RateLimited) as err:
            eng.generate(greedy(eng, "The queue", max_tokens=4))
        assert err.value.retry_after_s >= 1
        assert err.value.http_status == 429
        await running.aclose()
        await queued.aclose()
        await wait_idle(eng)


async def test_deadline_ends_request(engine: LlamaEngine) -> None:
    req = GenerationRequest(engine.tokenize("A job is"), SamplingParams(temperature=0, max_tokens=200),
                            deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded):
        await run(engine, req)
    await wait_idle(engine)


async def test_deadline_ends_running_request(long_engine: LlamaEngine) -> None:
    await wait_idle(long_engine)
    req = GenerationRequest(long_engine.tokenize("A job is"), ENDLESS, deadline=time.monotonic() + 0.2)
    events = 0
    with pytest.raises(DeadlineExceeded):
        async for _ in long_engine.generate(req):
            events += 1
    assert 0 < events < ENDLESS.max_tokens
    await wait_idle(long_engine)


async def test_json_schema_grammar_output_parses(engine: LlamaEngine) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
              "required": ["ok", "color"], "additionalProperties": False}
    req = greedy(engine, "Answer in JSON:", max_tokens=64, grammar=json_schema_grammar(schema))
    got = await run(engine, req)
    value = json.loads(got.text)
    assert set(value) == {"ok", "color"}
    assert isinstance(value["ok"], bool) and value["color"] in {"red", "green"}
    assert got.finish is not None and got.finish.finish_reason == "stop"


async def test_bad_grammar_refused_before_queueing(engine: LlamaEngine) -> None:
    with pytest.raises(InvalidGrammar):
        engine.generate(greedy(engine, "x", grammar="root ::= (((("))


async def test_logprobs_are_log_probabilities(engine: LlamaEngine) -> None:
    got = await run(engine, greedy(engine, "One, two, three", max_tokens=6, logprobs=True, top_logprobs=3))
    assert got.events
    for event in got.events:
        assert event.logprob is not None and event.logprob <= 0
        assert event.top_logprobs is not None and len(event.top_logprobs) == 3
        values = [lp for _, lp in event.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        # Greedy picks the most likely token of the raw distribution.
        assert event.logprob == pytest.approx(values[0])
    plain = await run(engine, greedy(engine, "One, two, three", max_tokens=6))
    assert plain.tokens == got.tokens and all(e.logprob is None for e in plain.events)


async def test_close_ends_running_streams(tiny_llama_gguf: Path) -> None:
    eng = LlamaEngine(tiny_llama_gguf, n_ctx_per_slot=256, n_parallel=1, n_batch=16, n_threads=2)
    req = greedy(eng, "A job is", max_tokens=200)
    stream = eng.generate(req)
    await stream.__anext__()
    await eng.aclose()
    with pytest.raises(EngineClosed):
        async for _ in stream:
            pass
    with pytest.raises(EngineClosed):
        eng.generate(req)
    with pytest.raises(EngineClosed):
        eng.tokenize("after close")


def test_model_facts(engine: LlamaEngine) -> None:
    assert engine.n_ctx_per_slot == 256
    assert engine.bos_token == "<s>" and engine.eos_token == "</s>"
    assert engine.chat_template and "{%" in engine.chat_template
    tokens = engine.tokenize("A job is a row.")
    assert tokens[0] == engine.bos_token_id
    assert engine.detokenize(tokens).strip() == "A job is a row."


async def test_lora_requests_batch_apart_and_match_solo(tiny_llama_gguf: Path, tiny_lora_gguf: Path) -> None:
    """Base and adapter requests interleave (one adapter group per step) and each equals its solo run."""
    prompts = PROMPTS[:4]

    def reqs(eng: LlamaEngine) -> list[GenerationRequest]:
        out = []
        for p in prompts:
            base = greedy(eng, p, max_tokens=12)
            out += [base, GenerationRequest(base.prompt_tokens, base.params, lora_path=tiny_lora_gguf)]
        return out

    with LlamaEngine(tiny_llama_gguf, n_ctx_per_slot=256, n_parallel=1, n_batch=64, n_threads=2) as solo:
        alone = [await run(solo, r) for r in reqs(solo)]
        # The adapter run right after the base run of the same prompt must not reuse its cache.
        assert all(r.finish is not None and r.finish.cached_tokens == 0 for r in alone[1::2])
    for i in range(0, len(alone), 2):
        assert alone[i].tokens != alone[i + 1].tokens, "the adapter should change greedy output"
    with LlamaEngine(tiny_llama_gguf, n_ctx_per_slot=256, n_parallel=4, n_batch=64, n_threads=2) as eng:
        together = await asyncio.gather(*(run(eng, r) for r in reqs(eng)))
    assert [r.tokens for r in together] == [r.tokens for r in alone]


async def test_bad_lora_files(engine: LlamaEngine, tmp_path: Path) -> None:
    prompt = engine.tokenize("A job is")
    with pytest.raises(NotFound):
        engine.generate(GenerationRequest(prompt, SamplingParams(max_tokens=4), lora_path=tmp_path / "x.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(InvalidRequest) as err:
        await run(engine, GenerationRequest(prompt, SamplingParams(max_tokens=4), lora_path=junk))
    assert err.value.code == "invalid_lora"
    await wait_idle(engine)


async def test_ignore_eos_generates_max_tokens(engine: LlamaEngine) -> None:
    chat = "<|user|>\nHello</s>\n<|assistant|>\n"  # the tiny model's chat template: it answers, then </s>
    natural = await run(engine, greedy(engine, chat, max_tokens=64))
    assert natural.finish is not None and natural.finish.finish_reason == "stop"
    forced = await run(engine, greedy(engine, chat, max_tokens=64, ignore_eos=True))
    assert forced.finish is not None and forced.finish.finish_reason == "length"
    assert forced.finish.completion_tokens == 64


# -- several choices of one prompt (n), logit_bias, max_tokens to the end of the context ------


async def run_choices(engine: LlamaEngine, req: GenerationRequest, timeout: float = 60) -> list[Result]:
    async def consume(stream: Any) -> Result:
        out = Result()
        async for item in stream:
            if isinstance(item, Finish):
                out.finish = item
                out.text += item.text
            else:
                out.tokens.append(item.token_id)
                out.text += item.text
        return out

    streams = engine.generate_choices(req)
    return list(await asyncio.wait_for(asyncio.gather(*(consume(s) for s in streams)), timeout))


async def test_n_choices_evaluate_the_prompt_once(tiny_llama_gguf: Path) -> None:
    """Three greedy choices: one evaluation of the prompt (the counters say so), the KV cells copied to
    the other two sequences, and every choice equal to the request run alone."""
    text = "The catalog keeps every job and every model, and the daemon answers requests. " * 3
    with LlamaEngine(tiny_llama_gguf, n_ctx_per_slot=256, n_parallel=4, n_batch=64, n_threads=2) as eng:
        req = GenerationRequest(eng.tokenize(text), SamplingParams(temperature=0, max_tokens=24), n=3)
        choices = await run_choices(eng, req)
        stats = eng.stats()
        await wait_idle(eng)
        alone = await run(eng, greedy(eng, text, max_tokens=24))
    prompt = len(req.prompt_tokens)
    assert prompt > 64, "longer than one step's budget: the prompt is evaluated in chunks"
    assert stats.prompt_tokens_evaluated == prompt, stats
    assert stats.prompt_tokens_reused == 2 * prompt, stats
    assert stats.requests_finished == 3
    assert [c.finish.cached_tokens for c in choices if c.finish] == [0, prompt, prompt]
    assert all(c.finish and c.finish.prompt_tokens == prompt for c in choices)
    assert [c.tokens for c in choices] == [alone.tokens] * 3
    assert stats.tokens_generated == 3 * len(alone.tokens)


async def test_n_seeded_choices_differ_and_each_matches_its_seed(tiny_llama_gguf: Path) -> None:
    text = "Once upon a time"
    with LlamaEngine(tiny_llama_gguf, n_ctx_per_slot=256, n_parallel=4, n_batch=64, n_threads=2) as eng:
        params = SamplingParams(temperature=1.0, max_tokens=16, seed=1234, ignore_eos=True)
        choices = await run_choices(eng, GenerationRequest(eng.tokenize(text), params, n=3))
        alone = [await run(eng, GenerationRequest(eng.tokenize(text), SamplingParams(
            temperature=1.0, max_tokens=16, seed=1234 + i, ignore_eos=True))) for i in range(3)]
    assert len({tuple(c.tokens) for c in choices}) == 3, "each choice samples with its own seed"
    assert [c.tokens for c in choices] == [a.tokens for a in alone]


async def test_n_choices_survive_the_first_leaving_early(tiny_llama_gguf: Path) -> None:
    """Choice 0 evaluates the prompt; cancelled at once, another choice takes the evaluation over."""
    text = "Export the model to GGUF, then quantize it, then serve it to every client that asks. " * 2
    with LlamaEngine(tiny_llama_gguf, n_ctx_per_slot=256, n_parallel=4, n_batch=16, n_threads=2) as eng:
        req = GenerationRequest(eng.tokenize(text), SamplingParams(temperature=0, max_tokens=12), n=3)
        streams = eng.generate_choices(req)
        streams[0].cancel()
        rest = []
        for stream in streams[1:]:
            out = Result()
            async for item in stream:
                if not isinstance(item, Finish):
                    out.tokens.append(item.token_id)
            rest.append(out)
        await wait_idle(eng)
        alone = await run(eng, greedy(eng, text, max_tokens=12))
    assert [r.tokens for r in rest] == [alone.tokens] * 2


async def test_n_beyond_the_slots_is_refused(engine: LlamaEngine) -> None:
    with pytest.raises(InvalidRequest) as err:
        engine.generate_choices(GenerationRequest(engine.tokenize("Hello"), SamplingParams(max_tokens=4), n=5))
    assert err.value.param == "n"
    with pytest.raises(InvalidRequest):
        engine.generate(GenerationRequest(engine.tokenize("Hello"), SamplingParams(max_tokens=4), n=2))


async def test_logit_bias_bans_and_forces_tokens(engine: LlamaEngine) -> None:
    base = await run(engine, greedy(engine, "The catalog keeps", max_tokens=8))
    banned = tuple((t, -100.0) for t in set(base.tokens))
    other = await run(engine, greedy(engine, "The catalog keeps", max_tokens=8, logit_bias=banned))
    assert not set(other.tokens) & set(base.tokens)
    forced_id = engine.tokenize("zebra", add_special=False)[0]
    forced = await run(engine, greedy(engine, "The catalog keeps", max_tokens=3,
                                      logit_bias=((forced_id, 100.0),)))
    assert forced.tokens == [forced_id] * 3
    with pytest.raises(InvalidRequest) as err:
        engine.generate(greedy(engine, "Hi", logit_bias=((1, 101.0),)))
    assert err.value.param == "logit_bias"
    with pytest.raises(InvalidRequest) as err:
        engine.generate(greedy(engine, "Hi", logit_bias=((engine.n_vocab, 1.0),)))
    assert err.value.param == "logit_bias"


async def test_max_tokens_none_runs_to_the_end_of_the_context(engine: LlamaEngine) -> None:
    req = GenerationRequest(engine.tokenize("Hello"), SamplingParams(temperature=0, max_tokens=None,
                                                                     ignore_eos=True))
    out = await run(engine, req)
    assert out.finish is not None and out.finish.finish_reason == "length"
    assert len(req.prompt_tokens) + out.finish.completion_tokens == engine.n_ctx_per_slot
    full = GenerationRequest(list(range(1, engine.n_ctx_per_slot + 1)), SamplingParams(max_tokens=None))
    with pytest.raises(ContextLengthExceeded):
        engine.generate(full)
