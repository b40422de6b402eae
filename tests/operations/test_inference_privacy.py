"""The inference privacy policy and its filters, without a daemon: parsing, prompt screening, and
the streaming hold-back, checked against screening the whole text at once for every split."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import random
import re
import re._parser as sre_parse
import sys
from typing import Any

import pytest
from conftest import REPO

from garrison.engine.types import Finish, TokenEvent
from garrison.errors import InvalidRequest
from garrison.ingest.pii_detectors import DETECTORS, ENTITY_TYPES
from garrison.operations.inference_privacy import (
    HOLD_CHARS,
    MARKER_ROWS,
    RUN_ROWS,
    DirectionRules,
    InferencePrivacyPolicy,
    ResponseFilter,
    filtered_events,
)
from garrison.operations.policy import AppliancePolicy


def _corpus() -> Any:
    """The ingestion tests' labelled PII generator (tests/ingest is not on this folder's path)."""
    if "pii_corpus" not in sys.modules:
        spec = importlib.util.spec_from_file_location("pii_corpus", REPO / "tests" / "ingest" / "pii_corpus.py")
        assert spec is not None and spec.loader is not None
        module = sys.modules["pii_corpus"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["pii_corpus"]


CARD = "4111 1111 1111 1111"
TOKEN = "ghp_" + "a1B2" * 9
PEM = ("-----BEGIN RSA PRIVATE KEY-----\n"
       + "\n".join(["MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt"] * 8)
       + "\n-----END RSA PRIVATE KEY-----")
PROSE = ("The quarterly report covers revenue, costs and the outlook for the next period. " * 6)
REDACT_ALL = DirectionRules(default="redact")


def policy(text: str) -> InferencePrivacyPolicy:
    return AppliancePolicy.from_toml(text).inference_privacy


# ------------------------------------------------------------------------------------------ policy

def test_without_the_table_prompts_redact_secrets_and_nothing_else() -> None:
    p = AppliancePolicy.from_toml("").inference_privacy
    assert p == InferencePrivacyPolicy()
    assert p.prompts.action_for("secret") == "redact"
    assert all(p.prompts.action_for(t) == "allow" for t in ENTITY_TYPES if t != "secret")
    assert not p.responses.active and asyncio.run(p.response_filter()) is None


def test_the_table_parses_per_direction_and_a_present_sub_table_replaces_the_default() -> None:
    p = policy('[inference_privacy.prompts]\npayment_card = "deny"\ndefault = "allow"\n'
               '[inference_privacy.responses]\nemail = "redact"\n')
    assert p.prompts.action_for("payment_card") == "deny"
    assert p.prompts.action_for("secret") == "allow"  # the sub-table is the whole statement
    assert p.responses.action_for("email") == "redact" and p.responses.action_for("phone") == "allow"
    only_responses = policy('[inference_privacy.responses]\ndefault = "redact"\n')
    assert only_responses.prompts.action_for("secret") == "redact"


@pytest.mark.parametrize(("toml", "param"), [
    ('[inference_privacy.prompts]\ncredit_card = "deny"', "inference_privacy.prompts.credit_card"),
    ('[inference_privacy.prompts]\nemail = "mask"', "inference_privacy.prompts.email"),
    ('[inference_privacy.responses]\ndefault = "block"', "inference_privacy.responses.default"),
    ('[inference_privacy.answers]\nemail = "deny"', "inference_privacy.answers"),
    ('[inference_privacy]\nprompts = "deny"', "inference_privacy.prompts"),
    ('inference_privacy = 3', "inference_privacy"),
])
def test_mistakes_are_refused_naming_the_dotted_key(toml: str, param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        AppliancePolicy.from_toml(toml)
    assert refused.value.code == "invalid_policy" and refused.value.param == param


def test_the_operator_guides_example_is_a_valid_policy() -> None:
    guide = (REPO / "docs" / "operator-guide.md").read_text()
    section = guide[guide.index("## Privacy on the inference path"):]
    example = re.search(r"```toml\n(.*?)```", section, re.S)
    assert example is not None
    p = policy(example.group(1))
    assert p.prompts.action_for("payment_card") == "deny" and p.responses.action_for("email") == "redact"


# ------------------------------------------------------------------------------------------ prompts

def test_a_denied_type_refuses_the_prompt_naming_only_the_type() -> None:
    p = policy('[inference_privacy.prompts]\npayment_card = "deny"\nsecret = "redact"')
    with pytest.raises(InvalidRequest) as refused:
        asyncio.run(p.screen_messages([{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": f"charge {CARD} with key {TOKEN}"}]))
    err = refused.value
    assert err.code == "prompt_contains_pii" and err.http_status == 400
    assert err.details == {"entity_types": ["payment_card"]} and err.param == "messages[1].content"
    assert CARD not in str(err.to_openai()) and "4111" not in str(err.to_openai())


def test_redacted_prompts_carry_ingestions_tags() -> None:
    p = policy('[inference_privacy.prompts]\npayment_card = "redact"\nsecret = "redact"\nemail = "allow"')
    out = asyncio.run(p.screen_prompts([f"pay {CARD} now", "mail bob@example.com", f"token={TOKEN}"],
                                       ["input[0]", "input[1]", "input[2]"]))
    assert out == ["pay [PAYMENT_CARD] now", "mail bob@example.com", "token=[SECRET]"]


def test_the_default_redacts_secrets_only() -> None:
    out = asyncio.run(InferencePrivacyPolicy().screen_prompts([f"key {TOKEN}, card {CARD}"], ["prompt"]))
    assert out == [f"key [SECRET], card {CARD}"]


def test_a_long_prompt_is_screened_off_the_event_loop_and_a_short_one_cheaply() -> None:
    """Above THREAD_ABOVE_CHARS the scan runs on a thread; below it, it is cheap enough to run inline."""
    import time

    p = policy('[inference_privacy.prompts]\ndefault = "redact"')
    asyncio.run(p.screen_prompts(["warm up"], ["prompt"]))
    short = PROSE * 3 + f" card {CARD}"
    started = time.perf_counter()
    for _ in range(100):
        assert asyncio.run(p.screen_prompts([short], ["prompt"]))[0].endswith("[PAYMENT_CARD]")
    per_call = (time.perf_counter() - started) / 100
    assert per_call < 0.005, f"{per_call * 1000:.2f} ms for {len(short)} characters"

    threads: list[str] = []

    async def scenario() -> None:
        import threading

        original = p._screen_prompts

        def spy(texts: Any, fields: Any) -> list[str]:
            threads.append(threading.current_thread().name)
            return original(texts, fields)

        object.__setattr__(p, "_screen_prompts", spy)
        await p.screen_prompts([PROSE * 100], ["prompt"])
        await p.screen_prompts(["short"], ["prompt"])

    asyncio.run(scenario())
    assert threads[0] != "MainThread" and threads[1] == "MainThread"


# ------------------------------------------------------------------------------------------ streaming

def stream(text: str, cuts: list[int], rules: DirectionRules = REDACT_ALL) -> tuple[list[str], ResponseFilter]:
    screen = ResponseFilter(rules)
    bounds = [0, *cuts, len(text)]
    pieces = [screen.feed(text[a:b]) for a, b in itertools.pairwise(bounds)]
    pieces.append(screen.finish())
    return pieces, screen


def whole(text: str, rules: DirectionRules = REDACT_ALL) -> str:
    return ResponseFilter(rules).screen(text)


@pytest.mark.parametrize("value", [CARD, "4111111111111111", TOKEN, "bob.smith@mail.example.co.uk",
                                   PEM, 'password = "correct horse battery staple"', "DE89 3704 0044 0532 0130 00",
                                   "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0." + "x" * 300,
                                   # recognised only at its last character, 300 characters after it began
                                   "Bearer " + "q" * 300 + "7"])
def test_a_value_split_at_every_position_never_shows(value: str) -> None:
    text = PROSE + value + " and then " + PROSE
    expected = whole(text)
    secret_part = value.split('"')[1] if '"' in value else value.removeprefix("Bearer ")
    assert secret_part not in expected and "[" in expected
    start = len(PROSE)
    for cut in range(start - 1, start + len(value) + 2):
        pieces, _ = stream(text, [cut])
        assert "".join(pieces) == expected, cut
    for second in range(start + 1, start + len(value), max(1, len(value) // 40)):  # three pieces
        pieces, _ = stream(text, [start + 1, second])
        assert "".join(pieces) == expected
    pieces, _ = stream(text, list(range(1, len(text))))  # one character at a time
    assert "".join(pieces) == expected
    assert all(secret_part[:8] not in p for p in pieces)


def test_streams_of_the_labelled_corpus_equal_screening_it_whole() -> None:
    """Records of every type and format, with the corpus's hard negatives, as one long response cut
    into token-sized pieces: the stream's text is exactly the one-shot screening, which holds no value."""
    records = _corpus().generate(300, seed=7)
    text = "\n".join(r.text for r in records)
    expected = whole(text)
    for r in records:
        for g in r.spans:
            value = r.text[g.start:g.end]
            if len(value) >= 8:
                assert value not in expected
    rng = random.Random(3)
    for _ in range(20):
        cuts, pos = [], 0
        while pos < len(text):
            pos += rng.randint(1, 9)
            cuts.append(pos)
        pieces, _ = stream(text, [c for c in cuts if c < len(text)])
        assert "".join(pieces) == expected


def test_text_without_values_is_released_while_streaming() -> None:
    """The hold-back is a window, not the whole response: prose and CJK text stream."""
    for text in (PROSE * 10, "这是一个很长的中文回答，没有任何个人信息。" * 60):
        pieces, _ = stream(text, list(range(1, len(text))))
        released_before_end = sum(len(p) for p in pieces[:-1])
        assert released_before_end >= len(text) - HOLD_CHARS - 16
        assert "".join(pieces) == text


def test_text_after_a_closed_pem_block_streams_again() -> None:
    text = PROSE + PEM + "\n" + PROSE * 4
    pieces, _ = stream(text, list(range(1, len(text))))
    assert sum(len(p) for p in pieces[:-1]) > len(PROSE) * 3
    assert "".join(pieces) == whole(text) and "MIIE" not in "".join(pieces)


def test_a_denied_value_ends_the_response_before_it() -> None:
    rules = DirectionRules(actions={"payment_card": "deny", "email": "redact"})
    text = PROSE + "mail bob@example.com, card " + CARD + " expires soon. " + PROSE
    before = PROSE + "mail [EMAIL], card "
    for cut in range(len(PROSE), len(text) - len(PROSE) + 1):
        pieces, screen = stream(text, [cut], rules)
        assert "".join(pieces) == before and screen.denied == ("payment_card",)
    one_shot = ResponseFilter(rules)
    assert one_shot.screen(text) == before and one_shot.denied == ("payment_card",)


def test_filtered_events_end_with_content_filter_and_close_the_generation() -> None:
    closed: list[bool] = []

    async def engine_events() -> Any:
        try:
            for piece in ["Your card is ", "4111 ", "1111 ", "1111 ", "1111", " thanks", " more"]:
                yield TokenEvent(text=piece, token_id=1)
            yield Finish("stop", prompt_tokens=5, completion_tokens=7, cached_tokens=0)
        finally:
            closed.append(True)

    async def run(rules: DirectionRules) -> list[TokenEvent | Finish]:
        return [item async for item in filtered_events(engine_events(), ResponseFilter(rules), 5)]

    denied = asyncio.run(run(DirectionRules(actions={"payment_card": "deny"})))
    final = denied[-1]
    assert isinstance(final, Finish) and final.finish_reason == "content_filter"
    assert "".join(i.text for i in denied) == "Your card is " and closed == [True]
    redacted = asyncio.run(run(REDACT_ALL))
    final = redacted[-1]
    assert isinstance(final, Finish) and final.finish_reason == "stop" and final.completion_tokens == 7
    assert "".join(i.text for i in redacted) == "Your card is [PAYMENT_CARD] thanks more"


# ------------------------------------------------------------------------------------------ the table

def _value_width(pattern: re.Pattern[str], groups: tuple[str, ...]) -> int:
    """The longest text a row's value can be: its value groups' widest, else the whole match's."""
    tree = sre_parse.parse(pattern.pattern, pattern.flags)
    if not groups:
        return int(tree.getwidth()[1])
    wanted = {pattern.groupindex[g] for g in groups}
    widths: list[int] = []

    def walk(sub: Any) -> None:
        for op, av in sub:
            if op is sre_parse.SUBPATTERN:
                if av[0] in wanted:
                    widths.append(int(av[-1].getwidth()[1]))
                walk(av[-1])
            elif op in (sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, sre_parse.POSSESSIVE_REPEAT):
                walk(av[2])
            elif op is sre_parse.BRANCH:
                for branch in av[1]:
                    walk(branch)
            elif op in (sre_parse.ATOMIC_GROUP,):
                walk(av)
            elif op in (sre_parse.ASSERT, sre_parse.ASSERT_NOT):
                walk(av[1])

    walk(tree)
    return max(widths)


def test_every_detector_row_is_covered_by_the_hold_back() -> None:
    """A row whose value may be longer than the held window must be a run row or a marker row; a new
    detector row fails here until someone decides how streams hold it back."""
    uncovered = []
    for det in DETECTORS:
        width = _value_width(det.pattern, det.value_groups)
        if det.finder is not None or width > HOLD_CHARS - 16:
            if det.name not in RUN_ROWS | MARKER_ROWS:
                uncovered.append(f"{det.name} (values up to {width} characters)")
        elif det.name in RUN_ROWS | MARKER_ROWS:
            uncovered.append(f"{det.name} is bounded ({width}): drop it from RUN_ROWS/MARKER_ROWS")
    assert not uncovered, uncovered
