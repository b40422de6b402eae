"""The ONNX Runtime engines against the PyTorch models they were exported from.

The reference side (transformers, torch) runs in this test process only; the engine module
itself must never import them, which the subprocess test at the end checks.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from garrison.converters.hf_to_onnx import export_hf_to_onnx, quantize_onnx_dir
from garrison.engine.onnx_engine import EmbeddingResult, OnnxDecoderEngine, OnnxEmbeddingEngine, sample_token
from garrison.engine.pooling import PoolingConfig, l2_normalize, pool
from garrison.engine.types import (
    ContextLengthExceeded,
    EngineClosed,
    Finish,
    GenerationRequest,
    InvalidSamplingParams,
    SamplingParams,
    TokenEvent,
)
from garrison.errors import InvalidRequest

pytestmark = pytest.mark.slow

PROMPTS = (
    "<s><|user|>\nWhat is the capital of France?</s>\n<|assistant|>\n",
    "<s>Garrison is",
    "<s>The",
)
TEXTS = ["hello there", "the capital of france is paris", "a job is a row in the catalog", "x"]


@pytest.fixture(scope="module")
def onnx_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-engine")


@pytest.fixture(scope="module")
def llama_onnx(tiny_llama_dir: Path, onnx_root: Path) -> Path:
    return export_hf_to_onnx(tiny_llama_dir, onnx_root / "llama").path


@pytest.fixture(scope="module")
def bert_onnx(tiny_bert_dir: Path, onnx_root: Path) -> Path:
    return export_hf_to_onnx(tiny_bert_dir, onnx_root / "bert").path


@pytest.fixture(scope="module")
def engine(llama_onnx: Path) -> Any:
    with OnnxDecoderEngine(llama_onnx) as eng:
        yield eng


@pytest.fixture(scope="module")
def embedder(bert_onnx: Path) -> Any:
    with OnnxEmbeddingEngine(bert_onnx) as emb:
        yield emb


@pytest.fixture(scope="module")
def hf_llama(tiny_llama_dir: Path) -> Any:
    from transformers import AutoTokenizer, LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


async def run(eng: OnnxDecoderEngine, req: GenerationRequest) -> tuple[list[int], str, Finish]:
    ids: list[int] = []
    text = ""
    finish: Finish | None = None
    async for item in eng.generate(req):
        if isinstance(item, TokenEvent):
            ids.append(item.token_id)
            text += item.text
        else:
            finish = item
    assert finish is not None
    return ids, text + finish.text, finish


def greedy(eng: OnnxDecoderEngine, prompt: str, **kw: Any) -> GenerationRequest:
    return GenerationRequest(eng.tokenize(prompt, add_special=False), SamplingParams(temperature=0, **kw))


def hf_greedy(hf: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    model, tok = hf
    with torch.no_grad():
        ids = torch.tensor([prompt_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.eos_token_id)
    new = out[0, len(prompt_ids):].tolist()
    return new[:-1] if new and new[-1] == tok.eos_token_id else new


# --- generation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_greedy_matches_transformers_generate(engine: OnnxDecoderEngine, hf_llama: Any, prompt: str) -> None:
    req = greedy(engine, prompt, max_tokens=32)
    assert req.prompt_tokens == hf_llama[1](prompt, add_special_tokens=False)["input_ids"]
    ids, _, finish = await run(engine, req)
    assert ids == hf_greedy(hf_llama, req.prompt_tokens, 32)
    assert finish.prompt_tokens == len(req.prompt_tokens)
    assert finish.completion_tokens == len(ids)
    assert finish.finish_reason == ("length" if len(ids) == 32 else "stop")


async def test_chunked_prefill_and_concurrency_keep_results(llama_onnx: Path, engine: OnnxDecoderEngine) -> None:
    """A prompt fed 3 tokens at a time through the cache, and 3 streams at once, change nothing."""
    alone = [await run(engine, greedy(engine, p, max_tokens=24)) for p in PROMPTS]
    with OnnxDecoderEngine(llama_onnx, prefill_chunk=3, max_concurrency=2) as chunked:
        together = await asyncio.gather(*(run(chunked, greedy(chunked, p, max_tokens=24)) for p in PROMPTS))
    assert [r[0] for r in together] == [r[0] for r in alone]


async def test_stream_text_stop_strings_and_length(engine: OnnxDecoderEngine) -> None:
    ids, text, finish = await run(engine, greedy(engine, PROMPTS[0], max_tokens=40))
    assert finish.finish_reason == "stop"  # the tiny model was trained to answer and end the turn
    assert text == engine.detokenize(engine.tokenize(PROMPTS[0], add_special=False)[-4:] + ids)[
        len(engine.detokenize(engine.tokenize(PROMPTS[0], add_special=False)[-4:])):]
    assert "Paris" in text
    stop = "Paris"
    _, cut, finish = await run(engine, greedy(engine, PROMPTS[0], max_tokens=40, stop=(stop,)))
    assert finish.finish_reason == "stop"
    assert cut == text[:text.index(stop)]
    _, short, finish = await run(engine, greedy(engine, PROMPTS[0], max_tokens=3))
    assert (finish.finish_reason, finish.completion_tokens) == ("length", 3)
    assert text.startswith(short)


async def test_seeded_sampling_is_reproducible(engine: OnnxDecoderEngine) -> None:
    prompt = engine.tokenize(PROMPTS[1], add_special=False)

    def req(seed: int) -> GenerationRequest:
        return GenerationRequest(prompt, SamplingParams(temperature=1.2, top_p=0.95, top_k=50, seed=seed,
                                                        max_tokens=20, logprobs=True, top_logprobs=2))

    first, second = await asyncio.gather(run(engine, req(7)), run(engine, req(7)))
    assert first[0] == second[0]
    others = {tuple((await run(engine, req(s)))[0]) for s in (1, 2, 3)}
    assert len(others | {tuple(first[0])}) > 1
    async for item in engine.generate(req(7)):
        if isinstance(item, TokenEvent):
            assert item.logprob is not None and item.logprob <= 0
            assert item.top_logprobs is not None and len(item.top_logprobs) == 2
            break


def test_sampler_filters() -> None:
    rng = np.random.default_rng(0)
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    picks = {sample_token(logits.copy(), SamplingParams(temperature=1, top_k=2), rng) for _ in range(200)}
    assert picks == {0, 1}
    picks = {sample_token(logits.copy(), SamplingParams(temperature=1, top_p=0.7), rng) for _ in range(200)}
    assert picks == {0, 1}
    picks = {sample_token(logits.copy(), SamplingParams(temperature=1, min_p=0.5), rng) for _ in range(200)}
    assert picks == {0, 1}
    # A repeat penalty large enough turns greedy away from the seen favourite.
    assert sample_token(logits.copy(), SamplingParams(temperature=0, repeat_penalty=100.0), rng, [0]) == 1


async def test_too_long_prompt_is_refused_before_any_work(engine: OnnxDecoderEngine) -> None:
    long_prompt = engine.tokenize("Garrison is an appliance. " * 200)
    assert len(long_prompt) > engine.n_ctx == 512
    with pytest.raises(ContextLengthExceeded) as info:
        engine.generate(GenerationRequest(long_prompt, SamplingParams(max_tokens=16)))
    assert info.value.code == "context_length_exceeded"
    assert isinstance(info.value, InvalidRequest) and info.value.http_status == 400
    assert info.value.details["prompt_tokens"] == len(long_prompt)
    # The prompt fits but leaves no room for max_tokens: refused the same way.
    with pytest.raises(ContextLengthExceeded):
        engine.generate(GenerationRequest(long_prompt[:500], SamplingParams(max_tokens=100)))


def test_unsupported_request_features_are_clear(engine: OnnxDecoderEngine) -> None:
    prompt = engine.tokenize("Hello")
    with pytest.raises(InvalidSamplingParams):
        engine.generate(GenerationRequest(prompt, SamplingParams(grammar="root ::= \"a\"")))
    with pytest.raises(InvalidSamplingParams):
        engine.generate(GenerationRequest(prompt, SamplingParams(temperature=-1)))
    with pytest.raises(InvalidRequest) as info:
        engine.generate(GenerationRequest([engine.n_vocab + 5]))
    assert info.value.param == "prompt"


def test_tokenizer_and_template_facts(engine: OnnxDecoderEngine, tiny_llama_dir: Path, hf_llama: Any) -> None:
    tok = hf_llama[1]
    assert engine.chat_template == tok.chat_template
    assert (engine.bos_token, engine.eos_token) == ("<s>", "</s>")
    assert (engine.bos_token_id, engine.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)
    assert engine.eos_token_ids == frozenset({tok.eos_token_id})
    text = "Count to five: one, two, three, four, five. ½ ünïcode"
    assert engine.tokenize(text) == tok(text)["input_ids"]
    assert engine.detokenize(engine.tokenize(text)) == tok.decode(tok(text)["input_ids"], skip_special_tokens=True)
    assert engine.providers == ["CPUExecutionProvider"]


@pytest.mark.parametrize("precision", ["int8", "fp16"])
async def test_quantized_decoder_generates(llama_onnx: Path, tmp_path: Path, precision: str) -> None:
    """int8 keeps fp32 inputs; fp16 takes and returns an fp16 KV cache, which the engine feeds as such."""
    q = quantize_onnx_dir(llama_onnx, tmp_path / f"llama-{precision}", precision)
    with OnnxDecoderEngine(q.path) as eng:
        ids, text, finish = await run(eng, greedy(eng, PROMPTS[1], max_tokens=8))
    assert finish.completion_tokens == len(ids) >= 1
    assert text


async def test_abandoned_stream_frees_its_slot_and_close_ends_streams(llama_onnx: Path) -> None:
    with OnnxDecoderEngine(llama_onnx, max_concurrency=1) as eng:
        stream = eng.generate(greedy(eng, PROMPTS[1], max_tokens=30))
        async for _ in stream:
            break
        await stream.aclose()
        # With one slot, this would wait forever if the abandoned stream still held it.
        ids, _, _ = await asyncio.wait_for(run(eng, greedy(eng, PROMPTS[1], max_tokens=4)), 30)
        assert len(ids) == 4
        live = eng.generate(greedy(eng, PROMPTS[1], max_tokens=30))
        first = await live.__anext__()
        assert isinstance(first, TokenEvent)
        eng.close()
        with pytest.raises(EngineClosed):
            await live.__anext__()
        with pytest.raises(EngineClosed):
            eng.generate(greedy(eng, PROMPTS[1], max_tokens=4))


# --- embeddings ---------------------------------------------------------------------------------


def hf_embeddings(model_dir: Path, texts: list[str]) -> np.ndarray:
    import torch
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = BertModel.from_pretrained(model_dir).eval()
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, dim=-1).numpy()


def test_embeddings_equal_hf_mean_pooling(embedder: OnnxEmbeddingEngine, tiny_bert_dir: Path) -> None:
    assert embedder.pooling == PoolingConfig(modes=("mean",), normalize=True)
    result = embedder.embed_sync(TEXTS)
    reference = hf_embeddings(tiny_bert_dir, TEXTS)
    assert result.vectors.shape == (len(TEXTS), embedder.dimensions) == reference.shape
    np.testing.assert_allclose(result.vectors, reference, atol=1e-4)
    assert result.token_counts == embedder.count_tokens(TEXTS)
    assert result.token_counts[-1] == 3  # [CLS] x [SEP]
    # Padding does not leak into pooling: one text alone embeds the same as inside a padded batch.
    alone = embedder.embed_sync([TEXTS[-1]]).vectors[0]
    np.testing.assert_allclose(alone, result.vectors[-1], atol=1e-5)


async def test_async_embed_and_truncation(embedder: OnnxEmbeddingEngine) -> None:
    long_text = "the catalog " * 400
    result = await embedder.embed([long_text, "short"])
    assert isinstance(result, EmbeddingResult)
    assert result.token_counts[0] == embedder.max_length == 512
    assert embedder.count_tokens([long_text])[0] > 512
    with pytest.raises(ContextLengthExceeded) as info:
        embedder.embed_sync([long_text], truncate=False)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequest):
        embedder.embed_sync([])


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_quantized_embeddings_stay_close(bert_onnx: Path, embedder: OnnxEmbeddingEngine, tmp_path: Path,
                                         precision: str) -> None:
    q = quantize_onnx_dir(bert_onnx, tmp_path / f"bert-{precision}", precision)
    with OnnxEmbeddingEngine(q.path) as quantized:
        got = quantized.embed_sync(TEXTS).vectors
    want = embedder.embed_sync(TEXTS).vectors
    cosine = (got * want).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.min() > 0.99, cosine


def test_pooling_modes_follow_model_files(tmp_path: Path) -> None:
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    np.testing.assert_allclose(pool(hidden, mask, ("cls",)), hidden[:, 0])
    np.testing.assert_allclose(pool(hidden, mask, ("mean",)), [hidden[0].mean(0), hidden[1, :2].mean(0)])
    np.testing.assert_allclose(pool(hidden, mask, ("max",)), [hidden[0].max(0), hidden[1, :2].max(0)])
    np.testing.assert_allclose(pool(hidden, mask, ("lasttoken",)), [hidden[0, 2], hidden[1, 1]])
    assert pool(hidden, mask, ("cls", "mean")).shape == (2, 4)
    np.testing.assert_allclose(np.linalg.norm(l2_normalize(hidden[:, 0]), axis=1), 1, rtol=1e-6)
    assert PoolingConfig.from_model_dir(tmp_path) == PoolingConfig(("mean",), True)
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "pool", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                               "pooling_mode_mean_tokens": False}))
    assert PoolingConfig.from_model_dir(tmp_path) == PoolingConfig(("cls",), False)


# --- the daemon's import budget -----------------------------------------------------------------


def test_engine_module_never_imports_torch_or_transformers(llama_onnx: Path, bert_onnx: Path) -> None:
    code = (
        "import sys\n"
        "from garrison.engine.onnx_engine import OnnxDecoderEngine, OnnxEmbeddingEngine\n"
        f"OnnxDecoderEngine({str(llama_onnx)!r}).tokenize('hi')\n"
        f"OnnxEmbeddingEngine({str(bert_onnx)!r}).embed_sync(['hi'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'optimum') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


async def test_logit_bias_and_n_as_the_llama_engine_takes_them(engine: OnnxDecoderEngine) -> None:
    """The same parameters mean the same here: -100 bans, ids are range-checked, max_tokens None runs to the
    end of the context; several choices are refused rather than paid for with n prompt evaluations."""
    base, _, _ = await run(engine, greedy(engine, "The quick brown", max_tokens=6))
    banned, _, _ = await run(engine, greedy(engine, "The quick brown", max_tokens=6,
                                            logit_bias=tuple((t, -100.0) for t in set(base))))
    assert not set(banned) & set(base)
    with pytest.raises(InvalidRequest) as many:
        engine.generate(GenerationRequest(engine.tokenize("Hi"), SamplingParams(max_tokens=2), n=2))
    assert many.value.param == "n" and many.value.code == "unsupported_parameter"
    with pytest.raises(InvalidRequest) as bad:
        engine.generate(greedy(engine, "Hi", max_tokens=2, logit_bias=((engine.n_vocab, 1.0),)))
    assert bad.value.param == "logit_bias"
    prompt = engine.tokenize("Hello", add_special=False)
    _, _, finish = await run(engine, GenerationRequest(prompt, SamplingParams(temperature=0, max_tokens=None,
                                                                                ignore_eos=True)))
    assert finish.finish_reason == "length" and len(prompt) + finish.completion_tokens == engine.n_ctx


async def test_embeddings_from_token_ids(embedder: OnnxEmbeddingEngine, tiny_bert_dir: Path) -> None:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tiny_bert_dir / "tokenizer.json")).encode("the quick brown fox").ids
    by_text = (await embedder.embed(["the quick brown fox"])).vectors
    by_ids = await embedder.embed_tokens([ids, ids[:3]])
    assert np.allclose(by_ids.vectors[0], by_text[0], atol=1e-5) and by_ids.token_counts == [len(ids), 3]
    with pytest.raises(ContextLengthExceeded):
        await embedder.embed_tokens([[5] * (embedder.max_length + 1)], truncate=False)
    cut = await embedder.embed_tokens([[5] * (embedder.max_length + 1)], truncate=True)
    assert cut.token_counts == [embedder.max_length]
    with pytest.raises(InvalidRequest):
        await embedder.embed_tokens([[10**9]])
