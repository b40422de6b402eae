"""Train/serve parity of prompt tokens: the ids a model is trained on up to its answer are the ids it is served.

The tiny SentencePiece Llama's template ends its generation prompt with `assistant: `. Tokenized whole,
a conversation puts the space and the answer's first word into one token ('▁The'); the served prompt
(rendered, then tokenized by llama.cpp) ends with a lone '▁'. Training follows
garrison.engine.prompt_tokens instead: no token crosses the generation-prompt boundary.
"""

from __future__ import annotations

from pathlib import Path

from garrison.engine.chat_template import render
from garrison.engine.prompt_tokens import prompt_ids
from garrison.training import data as td

QUESTION, ANSWER = "When does my parcel ship?", "The parcel ships on Tuesday."


def test_trained_prompt_ids_are_the_served_prompt_ids(tiny_spaced_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    from garrison.converters.hf_to_gguf import ensure_gguf
    from garrison.engine.llama_logits import SequenceScorer

    tokenizer = AutoTokenizer.from_pretrained(tiny_spaced_llama_dir)
    record = {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}
    example, _ = td.tokenize_chat(tokenizer, record, 256)
    assert example is not None and not example.cut_fallback
    first_target = next(i for i, label in enumerate(example.labels) if label != td.IGNORE_INDEX)
    served_text = render(tokenizer.chat_template, record["messages"][:1], special_tokens=tokenizer.special_tokens_map)
    assert served_text.endswith("assistant: ")
    with SequenceScorer(ensure_gguf(tiny_spaced_llama_dir, "f16"), n_ctx=128) as scorer:
        served = scorer.tokenize(served_text, add_special=False, parse_special=True)
    assert served == prompt_ids(tokenizer, served_text) == example.input_ids[:first_target]
    assert tokenizer.convert_ids_to_tokens(served[-1]) == "▁"
    # the trained ids, right after the prompt, decode to the answer and its end-of-turn token, nothing more
    targets = [t for t in example.labels if t != td.IGNORE_INDEX]
    assert targets == example.input_ids[first_target:first_target + len(targets)]
    assert tokenizer.decode(targets) == ANSWER + "</s>"
    # tokenized whole (the old rule), the space and the answer's first word were one token, so the
    # trained context before the answer was not the served prompt
    whole = tokenizer(render(tokenizer.chat_template, record["messages"], special_tokens=tokenizer.special_tokens_map,
                             add_generation_prompt=False), add_special_tokens=False)["input_ids"]
    assert whole[:len(served)] != served and "▁The" in tokenizer.convert_ids_to_tokens(whole)


def test_later_turns_are_cut_at_their_boundaries_too(tiny_spaced_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_spaced_llama_dir)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The gate is open."},
                {"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    example, _ = td.tokenize_chat(tokenizer, {"messages": messages}, 256)
    assert example is not None and not example.cut_fallback
    runs: list[list[int]] = []
    for i, label in enumerate(example.labels):
        if label != td.IGNORE_INDEX:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
    assert [tokenizer.decode([example.input_ids[i] for i in run]) for run in runs] == [
        "The gate is open.</s>", ANSWER + "</s>"]
    for run in runs:  # each answer follows the lone '▁' its served prompt ends with
        assert tokenizer.convert_ids_to_tokens(example.input_ids[run[0] - 1]) == "▁"
    assert tokenizer.decode(example.input_ids) == render(tokenizer.chat_template, messages,
                                                         special_tokens=tokenizer.special_tokens_map,
                                                         add_generation_prompt=False)
