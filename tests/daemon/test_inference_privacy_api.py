"""Privacy on the inference routes, driven by the official `openai` client against real daemons.

Two daemons serve the tiny Llama (GGUF), each with its own policy file: one denies card numbers
in prompts and responses, the other redacts them. A tiny model cannot be asked to write a card
number, so the responses that contain one are forced by a JSON-schema grammar whose only string
is the number: the engine then generates it digit by digit, across many stream chunks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import Daemon, free_port, garrison_env, run_cli

CARD = "4111 1111 1111 1111"
NOT_A_CARD = "4111 1111 1111 1112"  # the same shape, failing Luhn: no detector takes it
TOKEN = "ghp_" + "a1B2" * 9
POLICIES = {
    "deny": '[inference_privacy.prompts]\npayment_card = "deny"\nsecret = "redact"\n'
            '[inference_privacy.responses]\npayment_card = "deny"\n',
    "redact": '[inference_privacy.prompts]\npayment_card = "redact"\nsecret = "redact"\n'
              '[inference_privacy.responses]\npayment_card = "redact"\n',
}
CARD_SCHEMA = {"type": "json_schema", "json_schema": {"name": "card", "schema": {
    "type": "object", "properties": {"card": {"type": "string", "enum": [CARD]}},
    "required": ["card"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def daemons(tiny_llama_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Daemon]]:
    started: dict[str, Daemon] = {}
    try:
        for name, text in POLICIES.items():
            root = tmp_path_factory.mktemp(f"privacy-{name}")
            state, policy = root / "state", root / "policy.toml"
            policy.write_text(text)
            env = garrison_env(state, GARRISON_POLICY_FILE=str(policy))
            run_cli(state, "models", "import", str(tiny_llama_gguf), "--name", "tiny", "--parallel", "2",
                    "--ctx", "512", env=env)
            started[name] = Daemon(state, free_port(), env, root / "daemon.log").start()
        yield started
    finally:
        for daemon in started.values():
            daemon.stop()


def client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=daemon.key("infer"), max_retries=0)


def ask(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------------------------------ deny

def test_a_denied_card_in_a_prompt_is_a_400_naming_payment_card(daemons: dict[str, Daemon]) -> None:
    c = client(daemons["deny"])
    with pytest.raises(openai.BadRequestError) as chat:
        c.chat.completions.create(model="tiny", messages=ask(f"Charge my card {CARD} please"), max_tokens=4)
    with pytest.raises(openai.BadRequestError) as completion:
        c.completions.create(model="tiny", prompt=f"Card: {CARD}", max_tokens=4)
    with pytest.raises(openai.BadRequestError) as embedding:
        c.embeddings.create(model="tiny", input=["fine", f"card {CARD}"])
    for refused, param in ((chat, "messages[0].content"), (completion, "prompt"), (embedding, "input[1]")):
        err = refused.value
        assert err.code == "prompt_contains_pii" and err.param == param
        assert isinstance(err.body, dict) and err.body["details"] == {"entity_types": ["payment_card"]}
        assert "4111" not in str(err.body)
    assert "4111" not in daemons["deny"].log()  # nothing of the prompt is logged
    ok = c.chat.completions.create(model="tiny", messages=ask(f"My order is {NOT_A_CARD}"), max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_a_denied_card_in_a_response_ends_it_with_content_filter(daemons: dict[str, Daemon]) -> None:
    c = client(daemons["deny"])
    out = c.chat.completions.create(model="tiny", messages=ask("Which card?"), max_tokens=60, temperature=0,
                                    response_format=CARD_SCHEMA)  # type: ignore[arg-type]
    assert out.choices[0].finish_reason == "content_filter"
    content = out.choices[0].message.content or ""
    assert "card" in content and not any(ch.isdigit() for ch in content)
    chunks = list(c.chat.completions.create(model="tiny", messages=ask("Which card?"), max_tokens=60,  # type: ignore[arg-type]
                                            temperature=0, response_format=CARD_SCHEMA, stream=True,  # type: ignore[arg-type]
                                            stream_options={"include_usage": True}))
    texts = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert "".join(texts) == content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "content_filter"
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0  # the tokens generated before the cut count


def test_logprobs_are_refused_while_responses_are_screened(daemons: dict[str, Daemon]) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client(daemons["deny"]).completions.create(model="tiny", prompt="Hello", max_tokens=2, logprobs=1)
    assert refused.value.code == "logprobs_unavailable" and refused.value.param == "logprobs"


# ------------------------------------------------------------------------------------------ redact

def test_the_model_receives_the_redacted_prompt(daemons: dict[str, Daemon]) -> None:
    """Greedy output and prompt token count are those of the prompt with the tag written in by hand,
    and not those of a prompt of the same shape that no detector takes."""
    c = client(daemons["redact"])

    def complete(prompt: str) -> tuple[str, int]:
        out = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert out.usage is not None
        return out.choices[0].text, out.usage.prompt_tokens

    redacted = complete(f"Card number {CARD} and key {TOKEN} on file.")
    by_hand = complete("Card number [PAYMENT_CARD] and key [SECRET] on file.")
    unredacted = complete(f"Card number {NOT_A_CARD} and key [SECRET] on file.")
    assert redacted == by_hand
    assert unredacted[1] != by_hand[1]

    def chat(text: str) -> tuple[str | None, int]:
        out = c.chat.completions.create(model="tiny", messages=ask(text), max_tokens=12, temperature=0)
        assert out.usage is not None
        return out.choices[0].message.content, out.usage.prompt_tokens

    assert chat(f"Bill {CARD} today") == chat("Bill [PAYMENT_CARD] today")


def test_a_streamed_card_never_shows_in_any_chunk(daemons: dict[str, Daemon]) -> None:
    """The grammar admits one string, the card number: what arrives is the tag, in every chunk."""
    c = client(daemons["redact"])
    chunks = list(c.chat.completions.create(model="tiny", messages=ask("Which card?"), max_tokens=60,  # type: ignore[arg-type]
                                            temperature=0, response_format=CARD_SCHEMA, stream=True,  # type: ignore[arg-type]
                                            stream_options={"include_usage": True}))
    texts = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    for text in texts:
        assert not any(ch.isdigit() for ch in text), texts
    assert json.loads("".join(texts)) == {"card": "[PAYMENT_CARD]"}
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens >= len(CARD.replace(" ", ""))  # digit by digit
    whole = c.chat.completions.create(model="tiny", messages=ask("Which card?"), max_tokens=60, temperature=0,
                                      response_format=CARD_SCHEMA)  # type: ignore[arg-type]
    assert whole.choices[0].message.content == "".join(texts)
    assert whole.choices[0].finish_reason == "stop"
