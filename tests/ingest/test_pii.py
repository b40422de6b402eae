"""PII detection and redaction: per-type accuracy on a generated corpus, validators, actions, policy."""

from __future__ import annotations

import itertools
import re
import time
from typing import Any

import pytest
from pii_corpus import TYPES, errors, generate, iban_check_digits, luhn_check_digit, prc_check_char, score, table

from garrison.errors import InvalidRequest
from garrison.ingest.pii import PSEUDONYM_HEX_CHARS, Redactor, Span
from garrison.ingest.pii_detectors import (
    DETECTORS,
    ENTITY_TYPES,
    card_ok,
    iban_ok,
    ipv4_ok,
    ipv6_ok,
    luhn_ok,
    phone_ok,
    prc_id_ok,
    quoted_secret_ok,
    secret_value_ok,
    ssn_ok,
)
from garrison.ingest.policy import RedactionPolicy

KEY = b"k" * 32
OTHER_KEY = b"o" * 32


def _redactor(policy: dict[str, Any] | None = None, key: bytes = KEY) -> Redactor:
    return Redactor(RedactionPolicy.from_dict(policy), key)


def _found(text: str, redactor: Redactor | None = None) -> list[tuple[str, str]]:
    r = redactor or _redactor()
    return [(s.type, text[s.start:s.end]) for s in r.find(text)]


# --------------------------------------------------------------------------- accuracy

@pytest.fixture(scope="module")
def corpus() -> list[Any]:
    return generate(4000, seed=20240506)


def test_per_type_precision_and_recall_at_least_0_99(corpus: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    r = _redactor()

    def find(text: str) -> list[tuple[int, int, str]]:
        return [(s.start, s.end, s.type) for s in r.find(text)]

    metrics = score(corpus, find)
    report = table(metrics)
    with capsys.disabled():
        print(f"\nPII detection, {len(corpus)} generated records (span-level exact match):\n{report}")
    for t in TYPES:
        m = metrics[t]
        assert m["support"] >= 300, f"too few {t} examples to measure: {m['support']}"
        assert m["precision"] >= 0.99 and m["recall"] >= 0.99, (
            f"{t}: precision {m['precision']:.4f} recall {m['recall']:.4f}\n{report}\n"
            + "\n".join(errors(corpus, find)))


def test_corpus_is_seeded_labelled_and_has_hard_negatives(corpus: list[Any]) -> None:
    again = generate(50, seed=20240506)
    assert [r.text for r in again] == [r.text for r in corpus[:50]]
    assert [r.text for r in generate(50, seed=1)] != [r.text for r in again]
    for rec in corpus:
        for g in rec.spans:
            assert 0 <= g.start < g.end <= len(rec.text) and g.type in TYPES
    assert TYPES == ENTITY_TYPES
    text = "\n".join(r.text for r in corpus)
    for marker in ("ORD-", "T1", "v1", "sha256:", "password: ********", "000-", "666-", "tokenizer.eos_token"):
        assert marker in text, marker


def test_corpus_check_digits_match_published_examples() -> None:
    # Independent of the detectors' validators: these feed the labels.
    assert iban_check_digits("GB", "WEST12345698765432") == "82"
    assert iban_check_digits("DE", "370400440532013000") == "89"
    assert prc_check_char("11010519491231002") == "X"
    assert luhn_check_digit("411111111111111") == "1"


def test_spans_never_overlap_and_are_sorted(corpus: list[Any]) -> None:
    r = _redactor()
    for rec in corpus[:1500]:
        spans = r.find(rec.text)
        for a, b in itertools.pairwise(spans):
            assert a.end <= b.start, (a, b, rec.text)


# --------------------------------------------------------------------------- the table

def test_detectors_are_a_table_covering_every_type() -> None:
    names = [d.name for d in DETECTORS]
    assert len(names) == len(set(names))
    assert {d.entity for d in DETECTORS} == set(ENTITY_TYPES)
    assert sum(d.entity == "secret" for d in DETECTORS) >= 10
    for d in DETECTORS:
        assert isinstance(d.pattern, re.Pattern)
        assert all(h == h.lower() for h in d.hints), d.name


# --------------------------------------------------------------------------- validators

@pytest.mark.parametrize("number, ok", [
    ("4111111111111111", True), ("4111111111111112", False),
    ("4532015112830366", True), ("4532015112830367", False),
    ("79927398713", True), ("79927398710", False),
])
def test_luhn(number: str, ok: bool) -> None:
    assert luhn_ok(number) is ok


@pytest.mark.parametrize("number, ok", [
    ("4111 1111 1111 1111", True),       # Visa
    ("5555-5555-5555-4444", True),       # Mastercard
    ("2223000048400011", True),          # Mastercard 2-series
    ("378282246310005", True),           # Amex, 15
    ("3782822463100050", False),         # Amex prefix at 16 digits
    ("6011111111111117", True),          # Discover
    ("3530111333300000", True),          # JCB
    ("30569309025904", True),            # Diners, 14
    ("6200000000000005", True),          # UnionPay
    ("1234567812345670", False),         # passes Luhn, no issuer
    ("4111111111111112", False),         # fails Luhn
    ("0000000000000000", False),         # passes Luhn, no issuer
])
def test_card_issuer_length_and_luhn(number: str, ok: bool) -> None:
    assert card_ok(number) is ok


@pytest.mark.parametrize("value, ok", [
    ("GB82WEST12345698765432", True), ("GB82 WEST 1234 5698 7654 32", True), ("gb82west12345698765432", True),
    ("DE89370400440532013000", True), ("NO9386011117947", True), ("FR1420041010050500013M02606", True),
    ("GB83WEST12345698765432", False),   # check digits
    ("GB82WEST1234569876543", False),    # length for GB
    ("XX82WEST12345698765432", False),   # no such registry entry
    ("GB00WEST12345698765432", False),   # check digits 00 are never issued
])
def test_iban_mod97_and_length(value: str, ok: bool) -> None:
    assert iban_ok(value) is ok


def _prc(body17: str) -> str:
    return body17 + prc_check_char(body17)


@pytest.mark.parametrize("value, ok", [
    ("11010519491231002X", True), ("11010519491231002x", True),
    ("110105194912310021", False),             # wrong check character
    (_prc("11010519490231002"), False),        # 31 February ... check right, date wrong
    (_prc("11010518991231002"), False),        # before 1900
    (_prc("11010521990101002"), False),        # in the future
    (_prc("99010519491231002"), False),        # no such province
    (_prc("44030519850615123"), True),
])
def test_prc_resident_id(value: str, ok: bool) -> None:
    assert prc_id_ok(value) is ok


@pytest.mark.parametrize("value, ok", [
    ("123-45-6789", True), ("123 45 6789", True), ("000-12-3456", False), ("666-12-3456", False),
    ("900-12-3456", False), ("123-00-4567", False), ("123-45-0000", False), ("078-05-1120", False),
])
def test_ssn_rules(value: str, ok: bool) -> None:
    assert ssn_ok(value) is ok


@pytest.mark.parametrize("value, ok", [
    ("+1 (415) 555-0132", True), ("+44 20 7946 0958", True), ("+86 138 0013 8000", True), ("+8613800138000", True),
    ("+44 (0)20 7946 0958", True), ("+33 1 23 45 67 89", True), ("+49 30 1234567", True),
    ("+1 055 555 0132", False),    # NANP area codes do not start with 0 or 1
    ("+999 123 456 789", False),   # unassigned calling code
    ("+2024-05-06", False),        # Egypt's numbers are longer
    ("+44 20 7946 0958 12", False),
])
def test_phone_calling_code_and_length(value: str, ok: bool) -> None:
    assert phone_ok(value) is ok


def test_ip_validators() -> None:
    assert ipv4_ok("192.168.0.1") and not ipv4_ok("256.1.1.1") and not ipv4_ok("01.2.3.4")
    assert ipv6_ok("2001:db8::1") and ipv6_ok("fe80::1%eth0") and ipv6_ok("::ffff:192.0.2.1")
    assert not ipv6_ok("12:34:56") and not ipv6_ok("00:1A:2B:3C:4D:5E")
    assert not ipv6_ok("cafe::beef")  # hex words, C++ scopes: no decimal digit
    assert not ipv6_ok("::1")         # loopback says nothing about anyone


@pytest.mark.parametrize("value, ok", [
    ("Hunter22!", True), ("s3cr3t-P@ss", True), ("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", True),
    ("required", False), ("KeyStore", False), ("eos_token", False), ("API_KEY_NAME", False),
    ("tokenizer.eos_token", False), ("os.getcwd()", False), ("${API_KEY}", False), ("********", False),
    ("null", False), ("changeme", False),
])
def test_secret_value_rules(value: str, ok: bool) -> None:
    assert secret_value_ok(value) is ok


def test_quoted_secret_allows_passphrases() -> None:
    assert quoted_secret_ok("correct horse battery staple")
    assert not quoted_secret_ok("hidden") and not quoted_secret_ok("{{ api_key }}")


# --------------------------------------------------------------------------- detection in context

@pytest.mark.parametrize("text, expected", [
    ("mail Bob.Smith+tag@Example.co.uk.", [("email", "Bob.Smith+tag@Example.co.uk")]),
    ("icon@2x.png", []),
    ("call +1 (415) 555-0132 at 12:30:45", [("phone", "+1 (415) 555-0132")]),
    ("call +44 20 7946 0958 2 times", [("phone", "+44 20 7946 0958")]),   # trimmed back to a valid number
    ("tz +05:30, score +15, build 1.0.0+20130313144700", []),
    ("card 4111 1111 1111 1111, exp 12/27", [("payment_card", "4111 1111 1111 1111")]),
    ("#4532 0151 1283 0367", []),                                       # fails Luhn
    ("run 41111111111111111234 end", []),                               # a card inside a longer digit run
    ("4111 1111 1111 1111 9547", []),                                   # ... or a longer grouped run
    ("x4111111111111111 4111111111111111y", []),                        # glued to words
    ("IBAN GB82 WEST 1234 5698 7654 32.", [("iban", "GB82 WEST 1234 5698 7654 32")]),
    ("DE51 6548 5363 9377 3858 74", []),                                # IBAN failing mod 97, and no card in it
    ("ip 10.0.0.1:8080 and [2001:db8::1]:443", [("ipv4", "10.0.0.1"), ("ipv6", "2001:db8::1")]),
    ("build 10.0.19045.2965, v1.2.3, OID 1.3.6.1.4.1.311", []),
    ("at 2024-05-06T12:34:56Z from 00:1A:2B:3C:4D:5E, std::vector", []),
    ("ssn 123-45-6789; not 000-12-3456", [("us_ssn", "123-45-6789")]),
    ("身份证号11010519491231002X，手机+8613800138000。",
     [("prc_id", "11010519491231002X"), ("phone", "+8613800138000")]),
    ("18-digit 110105194912310021", []),
    ("commit 9fceb02d0ae598e95dc970b74767f19372d61af8 id 123e4567-e89b-12d3-a456-426614174000", []),
])
def test_detection_in_context(text: str, expected: list[tuple[str, str]]) -> None:
    assert _found(text) == expected


@pytest.mark.parametrize("token", [
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_" + "a1B2" * 9,
    "github_pat_" + "A1" * 11 + "_" + "b2C" * 19 + "x2",
    "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
    "https://hooks.slack.com/services/T0123ABCD/B0123ABCDEF/AbCdEfGhIjKlMnOpQrStUvWx",
    "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z",
    "AIzaSyA-1234567890abcdefghijklmnopqrstu",
    "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
])
def test_token_formats(token: str) -> None:
    assert _found(f"use {token}.") == [("secret", token)]
    assert _found(f"x{token}") == []  # inside a longer token


@pytest.mark.parametrize("text, secret", [
    ("Authorization: Bearer abc123DEF456ghi789JKL", "abc123DEF456ghi789JKL"),
    ("DB_PASSWORD=Hunter22!", "Hunter22!"),
    ('{"api_key": "correct horse battery staple"}', "correct horse battery staple"),
    ("x-api-key: 9f8e7d6c5b4a", "9f8e7d6c5b4a"),
    ("postgres://app:s3cretPW@db.example.com:5432/app", "s3cretPW"),
])
def test_secret_values_after_a_key(text: str, secret: str) -> None:
    assert _found(text) == [("secret", secret)]


def test_jwt_and_pem_block() -> None:
    jwt = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
           "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U")
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n" \
          "-----END RSA PRIVATE KEY-----"
    text = f"token {jwt}.\nkey:\n{pem}\n"
    assert _found(text) == [("secret", jwt), ("secret", pem)]
    assert _found("eyJub3QiOiJqd3QifQ.eyJzdWIiOiIxIn0.c2lnbmF0dXJlMTIz") == []  # header without "alg"


@pytest.mark.parametrize("text", [
    "token = tokenizer.eos_token", 'api_key = os.environ["API_KEY"]', "password: required",
    "password: ********", "api_key=${API_KEY}", "max_tokens=256", "passwordless=true", "Bearer realm=example",
])
def test_secret_references_are_not_secrets(text: str) -> None:
    assert _found(text) == []


def test_overlaps_resolved_by_priority_then_length() -> None:
    # The card-like digits inside the address and the password inside the URL: one finding each.
    assert _found("john+4111111111111111@example.com") == [("email", "john+4111111111111111@example.com")]
    assert _found("redis://svc:Pa55word99@cache.example.com:6379") == [("secret", "Pa55word99")]
    # An API key assignment whose value is also a known token format: one span, not two.
    assert _found("api_key=ghp_" + "a1B2" * 9) == [("secret", "ghp_" + "a1B2" * 9)]
    # An IPv4 inside an IPv4-mapped IPv6 address belongs to the IPv6 address.
    assert _found("::ffff:192.0.2.1") == [("ipv6", "::ffff:192.0.2.1")]
    r = _redactor()
    text = "::ffff:192.0.2.1"
    assert {s.detector for s in r.candidates(text)} == {"ipv6", "ipv4"}
    assert [s.detector for s in r.find(text)] == ["ipv6"]


def test_prc_id_outranks_a_card_reading_of_the_same_digits() -> None:
    body = "65010219850615"
    for seq in range(1000):
        number = _prc(f"{body}{seq:03d}")
        if number[-1] != "X" and card_ok(number):
            break
    else:
        pytest.fail("no PRC number that is also a valid card number")
    r = _redactor()
    assert {s.type for s in r.candidates(number)} == {"prc_id", "payment_card"}
    assert _found(number) == [("prc_id", number)]


# --------------------------------------------------------------------------- actions

def test_default_action_tags_every_type() -> None:
    r = _redactor()
    res = r.redact("mail bob@example.com, ip 10.0.0.1, card 4111111111111111")
    assert res.text == "mail [EMAIL], ip [IPV4], card [PAYMENT_CARD]"
    assert res.counts == {"email": 1, "ipv4": 1, "payment_card": 1} and not res.dropped


def test_mask_keeps_length() -> None:
    r = _redactor({"actions": {"us_ssn": "mask"}})
    res = r.redact("ssn 123-45-6789.")
    assert res.text == "ssn ***********." and len(res.text) == len("ssn 123-45-6789.")


def test_hash_is_a_stable_keyed_pseudonym() -> None:
    policy = {"default": "hash"}
    a = _redactor(policy).redact("call +1 (415) 555-0132 or +1-415-555-0132; mail Bob@Example.com, bob@example.com")
    pseudonyms = re.findall(r"<([A-Z_]+):([0-9a-f]+)>", a.text)
    assert len(pseudonyms) == 4 and all(len(h) == PSEUDONYM_HEX_CHARS for _, h in pseudonyms)
    assert pseudonyms[0] == pseudonyms[1] and pseudonyms[2] == pseudonyms[3]   # normalised value
    assert pseudonyms[0][1] != pseudonyms[2][1]
    again = _redactor(policy).redact("+1 415 555 0132")
    assert again.text == f"<PHONE:{pseudonyms[0][1]}>"                        # same key, same pseudonym
    other = _redactor(policy, key=OTHER_KEY).redact("+1 415 555 0132")
    assert other.text != again.text                                             # another appliance
    # The type is part of the hashed input: equal digits of different types do not collide.
    r = _redactor(policy)
    assert r.pseudonym("us_ssn", "123456789") != r.pseudonym("payment_card", "123456789")


def test_drop_withdraws_the_whole_record() -> None:
    r = _redactor({"actions": {"secret": "drop"}})
    res = r.redact("mail bob@example.com with password=Hunter22!")
    assert res.dropped and res.text == "" and res.counts == {"email": 1, "secret": 1}
    assert not r.redact("mail bob@example.com").dropped


def test_keep_leaves_text_but_counts() -> None:
    r = _redactor({"actions": {"ipv4": "keep"}})
    res = r.redact("from 10.0.0.1 and 10.0.0.2")
    assert res.text == "from 10.0.0.1 and 10.0.0.2" and res.counts == {"ipv4": 2}


def test_redact_record_walks_json_values() -> None:
    r = _redactor()
    rec = {"messages": [{"role": "user", "content": "I am bob@example.com"},
                        {"role": "assistant", "content": "Noted, +44 20 7946 0958."}], "n": 3}
    out = r.redact_record(rec)
    assert out.value == {"messages": [{"role": "user", "content": "I am [EMAIL]"},
                                      {"role": "assistant", "content": "Noted, [PHONE]."}], "n": 3}
    assert out.counts == {"email": 1, "phone": 1} and not out.dropped
    dropped = _redactor({"actions": {"email": "drop"}}).redact_record(rec)
    assert dropped.dropped and dropped.value is None


def test_short_hmac_key_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Redactor(None, b"short")


# --------------------------------------------------------------------------- custom patterns and word lists

def test_custom_pattern_with_value_group_and_action() -> None:
    r = _redactor({"patterns": {
        "employee_id": {"regex": r"EMP-\d{6}", "action": "mask"},
        "patient_id": {"regex": r"(?i)patient id:\s*(?P<value>\d{5,})", "action": "tag"},
    }})
    res = r.redact("EMP-123456 saw Patient ID: 99812 today")
    assert res.text == "********** saw Patient ID: [PATIENT_ID] today"
    assert res.counts == {"employee_id": 1, "patient_id": 1}


def test_word_lists_are_whole_word_case_insensitive() -> None:
    r = _redactor({"word_lists": {
        "codenames": {"words": ["Falcon", "Project  Nightjar"], "action": "tag"},
        "names": ["张伟", "O'Brien"],
    }})
    res = r.redact("falcon and FALCON, not Falcons; project\nnightjar; 我是张伟。 Mr O'Brien.")
    assert res.text == "[CODENAMES] and [CODENAMES], not Falcons; [CODENAMES]; 我是[NAMES]。 Mr [NAMES]."
    assert res.counts == {"codenames": 3, "names": 2}


def test_word_list_hash_normalises_case_and_spacing() -> None:
    r = _redactor({"word_lists": {"names": {"words": ["Jane Doe"], "action": "hash"}}})
    a, b = r.redact("Jane Doe").text, r.redact("JANE   doe").text
    assert a == b and a.startswith("<NAMES:")


def test_large_word_list_is_one_fast_pass() -> None:
    words = [f"name{i:05d}x" for i in range(5000)]
    started = time.perf_counter()
    r = _redactor({"word_lists": {"people": words}})
    text = " ".join([f"hello name{i:05d}x" for i in range(0, 5000, 7)] * 4)
    spans = r.find(text)
    assert len(spans) == 4 * len(range(0, 5000, 7))
    assert time.perf_counter() - started < 5


def test_builtins_outrank_custom_entries_by_default() -> None:
    r = _redactor({"word_lists": {"names": ["bob"]}})
    assert _found("bob@example.com and bob", r) == [("email", "bob@example.com"), ("names", "bob")]
    r = _redactor({"word_lists": {"names": {"words": ["bob"], "priority": 500}}})
    assert _found("bob@example.com", r)[0] == ("names", "bob")


# --------------------------------------------------------------------------- policy

def test_policy_from_toml() -> None:
    policy = RedactionPolicy.from_toml("""
        [redaction]
        default = "mask"
        on_bad_lines = "skip"
        [redaction.actions]
        email = "hash"
        [redaction.patterns.ticket]
        regex = 'TCK-\\d+'
        action = "keep"
        [redaction.word_lists.codenames]
        words = ["Falcon"]
    """)
    assert policy.default == "mask" and policy.on_bad_lines == "skip"
    assert policy.action_for("email") == "hash" and policy.action_for("phone") == "mask"
    assert policy.action_for("ticket") == "keep" and policy.action_for("codenames") == "tag"
    assert policy.entity_types[-2:] == ("ticket", "codenames")
    default = RedactionPolicy.from_dict(None)
    assert default.action_for("secret") == "tag" and default.on_bad_lines == "refuse"


@pytest.mark.parametrize("data, param, words", [
    ({"actions": {"emial": "hash"}}, "redaction.actions.emial", "unknown entity type"),
    ({"actions": {"email": "scramble"}}, "redaction.actions.email", "unknown action"),
    ({"default": "erase"}, "redaction.default", "unknown action"),
    ({"patterns": {"bad": {"regex": "(unclosed"}}}, "redaction.patterns.bad.regex", "not a valid regular expression"),
    ({"patterns": {"empty": {"regex": "x*"}}}, "redaction.patterns.empty.regex", "matches the empty string"),
    ({"patterns": {"p": {"regex": "x", "action": "nope"}}}, "redaction.patterns.p.action", "unknown action"),
    ({"patterns": {"p": {"regex": "x", "colour": "red"}}}, "redaction.patterns.p.colour", "unknown key"),
    ({"patterns": {"email": "x@y"}}, "redaction.patterns.email", "already used"),
    ({"patterns": {"Bad Name": "x"}}, "redaction.patterns.Bad Name", "lower-case"),
    ({"word_lists": {"w": {"words": []}}}, "redaction.word_lists.w.words", "non-empty list"),
    ({"word_lists": {"w": ["ok", 3]}}, "redaction.word_lists.w.words[1]", "non-empty string"),
    ({"word_lists": {"w": ["a"]}, "patterns": {"w": "b"}}, "redaction.word_lists.w", "already used"),
    ({"on_bad_lines": "ignore"}, "redaction.on_bad_lines", "'refuse' or 'skip'"),
    ({"acions": {}}, "redaction.acions", "unknown key"),
    ({"actions": ["email"]}, "redaction.actions", "must be a table"),
])
def test_policy_errors_name_the_key(data: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        RedactionPolicy.from_dict(data)
    assert info.value.param == param and info.value.code == "invalid_policy"
    assert words in info.value.message and param in info.value.message


def test_policy_toml_syntax_error() -> None:
    with pytest.raises(InvalidRequest, match="not valid TOML"):
        RedactionPolicy.from_toml("[redaction\n")


# --------------------------------------------------------------------------- robustness

@pytest.mark.parametrize("text", [
    "1" * 200_000, "a" * 200_000, "@" * 50_000 + "a.bc", ":" * 100_000, "+1 " * 50_000,
    "-----BEGIN PRIVATE KEY-----" * 2000, "1." * 100_000, "a@b." * 50_000, "password=" * 20_000,
    "GB82 " * 40_000, "fe80:" * 40_000,
])
def test_pathological_input_is_linear(text: str) -> None:
    r = _redactor()
    started = time.perf_counter()
    r.find(text)
    assert time.perf_counter() - started < 3.0


def test_span_is_exported() -> None:
    assert Span(0, 1, "email", "email") < Span(1, 2, "email", "email")


def test_validators_and_find_survive_junk() -> None:
    import random

    from garrison.ingest import pii_detectors as d

    rng = random.Random(3)
    alphabet = "0123456789abcdefABCDEFXx+-.:@/= _()%\n\"'٣²é张-----BEGIN PRIVATE KEY eyJ"
    validators = [d.luhn_ok, d.card_ok, d.iban_ok, d.phone_ok, d.prc_id_ok, d.ssn_ok, d.ipv4_ok, d.ipv6_ok,
                  d.secret_value_ok, d.quoted_secret_ok]
    r = _redactor({"default": "hash"})
    for _ in range(3000):
        junk = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        for v in validators:
            v(junk if v is not d.luhn_ok else "".join(c for c in junk if c in "0123456789") or "0")
        r.redact(junk)
    assert d.card_ok("٤١١١١١١١١١١١١١١١") is False  # non-ASCII digits are not a card


# ------------------------------------------------------------------------- validators against plain references
# The validators are written for speed (bytes sums, prefix tables, str.rstrip); each must agree with
# the plain reading of its rule on every input, which these references spell out.

def _luhn_reference(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _card_reference(candidate: str) -> bool:
    from garrison.ingest.pii_detectors import _CARD_RANGES

    digits = candidate.replace(" ", "").replace("-", "")
    if not 12 <= len(digits) <= 19 or not re.fullmatch("[0-9]+", digits):
        return False
    return any(lo <= digits[:len(lo)] <= hi and len(digits) in lengths and _luhn_reference(digits)
               for lo, hi, lengths in _CARD_RANGES)


def _emails_reference(text: str) -> list[tuple[int, int]]:
    from garrison.ingest.pii_detectors import _EMAIL_AT_RE, _EMAIL_LOCAL, _EMAIL_LOCAL_CHARS

    out = []
    for m in _EMAIL_AT_RE.finditer(text):
        at = i = m.start()
        while i > 0 and text[i - 1] in _EMAIL_LOCAL_CHARS:
            i -= 1
        if i < at and _EMAIL_LOCAL.fullmatch(text, i, at):
            out.append((i, m.end()))
    return out


def test_fast_validators_agree_with_their_references() -> None:
    import random

    from garrison.ingest.pii_detectors import _find_emails

    rng = random.Random(11)
    for _ in range(20000):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randrange(1, 24)))
        assert luhn_ok(digits) is _luhn_reference(digits), digits
        prefix = rng.choice(["4", "51", "2221", "2720", "34", "37", "300", "36", "3528", "6011", "65", "62", "2200",
                             "50", "69", "1", "99", ""])
        card = prefix + digits
        card = " ".join(card[i:i + 4] for i in range(0, len(card), 4)) if rng.random() < 0.3 else card
        assert card_ok(card) is _card_reference(card), card
    for _ in range(3000):
        local = "".join(rng.choice("ab.9_%+-é ") for _ in range(rng.randrange(0, 120)))
        text = rng.choice(["", "x ", "é"]) + local + "@mail.example.com" + rng.choice(["", " and z@q.io", "@b.cd"])
        assert list(_find_emails(text)) == _emails_reference(text), text


def test_phone_digits_ascii_and_not() -> None:
    assert phone_ok("+44 20 7946 0958") and phone_ok("+44 (0) 20-7946-0958")
    assert phone_ok("+٤٤ ٢٠ ٧٩٤٦ ٠٩٥٨") is phone_ok("+44 20 7946 0958".replace("4", "٤")) is False


def test_every_action_has_a_replacement() -> None:
    from typing import get_args

    from garrison.ingest.pii import _REPLACERS
    from garrison.ingest.policy import Action

    assert set(_REPLACERS) == set(get_args(Action))
