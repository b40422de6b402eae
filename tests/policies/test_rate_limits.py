"""Rate-limit policy and limiter arithmetic, on a hand-driven clock (nothing sleeps)."""

from __future__ import annotations

import pytest

from garrison.errors import InvalidRequest, RateLimited
from garrison.operations.policy import AppliancePolicy
from garrison.policies.rate_limits import Limits, RateLimiter, RateLimitPolicy, go_duration, refusal_error

KEY = "key_0123456789abcdef"
OTHER = "key_fedcba9876543210"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_key_overrides_role_overrides_default_field_by_field() -> None:
    policy = AppliancePolicy.from_toml(f"""
        [rate_limits]
        requests_per_minute = 100
        [rate_limits.roles.infer]
        tokens_per_minute = 5000
        concurrent_requests = 4
        [rate_limits.keys.{KEY}]
        concurrent_requests = 1
        tokens_per_minute = "unlimited"
    """).rate_limits
    assert policy.limits_for(KEY, "infer") == Limits(100, None, 1)
    assert policy.limits_for(OTHER, "infer") == Limits(100, 5000, 4)
    assert policy.limits_for(OTHER, "admin") == Limits(100, None, None)
    assert not RateLimitPolicy.from_dict(None).limits_for(KEY, "admin").any
    assert not AppliancePolicy.from_toml("").rate_limits.limits_for(KEY, "infer").any


@pytest.mark.parametrize(("toml", "param"), [
    ("[rate_limits]\nrequests_per_second = 5", "rate_limits.requests_per_second"),
    ("[rate_limits.roles.infer]\nrequests_per_minute = 0", "rate_limits.roles.infer.requests_per_minute"),
    ("[rate_limits.roles.infer]\nrequests_per_minute = true", "rate_limits.roles.infer.requests_per_minute"),
    ("[rate_limits.roles.infer]\ntokens_per_minute = 1.5", "rate_limits.roles.infer.tokens_per_minute"),
    ("[rate_limits.roles.infer]\nconcurrent_requests = \"8\"", "rate_limits.roles.infer.concurrent_requests"),
    ("[rate_limits.roles.wizard]\nrequests_per_minute = 5", "rate_limits.roles.wizard"),
    ("[rate_limits.keys.grs_abc]\nrequests_per_minute = 5", "rate_limits.keys.grs_abc"),
    (f"[rate_limits.keys.{KEY}]\nburst = 5", f"rate_limits.keys.{KEY}.burst"),
    ("[rate_limits]\nroles = 5", "rate_limits.roles"),
    ("[rate_limits.roles]\ninfer = 5", "rate_limits.roles.infer"),
])
def test_mistakes_are_refused_naming_the_dotted_key(toml: str, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        AppliancePolicy.from_toml(toml)
    assert caught.value.code == "invalid_policy"
    assert caught.value.param == param
    assert param in caught.value.message


def test_requests_per_minute_bucket_allows_a_burst_then_refills(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    limits = Limits(requests_per_minute=3)
    for _ in range(3):
        assert limiter.check(KEY, limits) is None
        limiter.release(KEY)
    refusal = limiter.check(KEY, limits)
    assert refusal is not None and refusal.kind == "requests" and refusal.limit == 3
    assert refusal.retry_after_s == pytest.approx(20.0)
    clock.now += 19.9
    assert limiter.check(KEY, limits) is not None  # not yet
    clock.now += 0.1
    assert limiter.check(KEY, limits) is None
    assert limiter.check(OTHER, limits) is None  # buckets are per key


def test_headers_say_limit_remaining_and_reset_as_openai_does(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    limits = Limits(requests_per_minute=60, tokens_per_minute=1000)
    assert limiter.check(KEY, limits) is None
    limiter.charge_tokens(KEY, limits, 100)
    assert limiter.headers(KEY, limits) == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "900",
        "x-ratelimit-reset-tokens": "6s"}
    clock.now += 3
    headers = limiter.headers(KEY, limits)
    assert headers["x-ratelimit-remaining-requests"] == "60"
    assert headers["x-ratelimit-reset-requests"] == "0s"
    assert headers["x-ratelimit-remaining-tokens"] == "950"
    assert headers["x-ratelimit-reset-tokens"] == "3s"
    assert limiter.headers(KEY, Limits(concurrent_requests=2)) == {}


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.0172, "18ms"), (0.5, "500ms"), (1, "1s"), (1.5, "1.5s"), (20.0001, "20.001s"),
    (59.9999, "1m0s"), (360, "6m0s"), (90.25, "1m30.25s"), (3600, "1h0m0s"), (3725, "1h2m5s"),
])
def test_reset_durations_in_go_style(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_tokens_are_refused_only_once_spent_and_charged_from_real_usage(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    limits = Limits(tokens_per_minute=600)  # 10 tokens a second
    assert limiter.check(KEY, limits) is None
    limiter.charge_tokens(KEY, limits, 599)  # one token left: the next request is admitted
    limiter.release(KEY)
    assert limiter.check(KEY, limits) is None
    limiter.charge_tokens(KEY, limits, 201)  # its real usage takes the bucket 200 below zero
    limiter.release(KEY)
    refusal = limiter.check(KEY, limits)
    assert refusal is not None and refusal.kind == "tokens"
    assert refusal.retry_after_s == pytest.approx(20.1)  # back to one token at 10 a second
    assert limiter.headers(KEY, limits)["x-ratelimit-remaining-tokens"] == "0"
    clock.now += 20.0
    assert limiter.check(KEY, limits) is not None  # exactly empty is still spent
    clock.now += 0.1
    assert limiter.check(KEY, limits) is None


def test_a_refused_request_takes_nothing(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    limits = Limits(requests_per_minute=2, tokens_per_minute=100)
    assert limiter.check(KEY, limits) is None
    limiter.charge_tokens(KEY, limits, 500)
    limiter.release(KEY)
    for _ in range(5):  # refused by tokens: no request is taken from the request bucket
        refusal = limiter.check(KEY, limits)
        assert refusal is not None and refusal.kind == "tokens"
    assert limiter.headers(KEY, limits)["x-ratelimit-remaining-requests"] == "1"
    assert limiter.in_flight(KEY) == 0


def test_concurrency_counts_requests_in_flight(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    limits = Limits(concurrent_requests=2)
    assert limiter.check(KEY, limits) is None
    assert limiter.check(KEY, limits) is None
    refusal = limiter.check(KEY, limits)
    assert refusal is not None and refusal.kind == "concurrency" and refusal.limit == 2
    assert limiter.check(OTHER, limits) is None
    limiter.release(KEY)
    assert limiter.check(KEY, limits) is None
    for _ in range(5):
        limiter.release(OTHER)  # releasing more than was taken never goes below zero
    assert limiter.in_flight(OTHER) == 0


def test_new_limits_apply_to_running_buckets(clock: Clock) -> None:
    limiter = RateLimiter(clock)
    assert limiter.check(KEY, Limits(requests_per_minute=10)) is None
    limiter.release(KEY)
    # Lowered (a reload): the level is capped at the new capacity, not reset to full.
    lowered = Limits(requests_per_minute=2)
    assert limiter.headers(KEY, lowered)["x-ratelimit-remaining-requests"] == "2"
    assert limiter.check(KEY, lowered) is None
    assert limiter.check(KEY, lowered) is None
    assert limiter.check(KEY, lowered) is not None
    # Raised: the spent bucket refills at the new rate from where it stands.
    raised = Limits(requests_per_minute=120)
    assert limiter.check(KEY, raised) is not None
    clock.now += 0.5
    assert limiter.check(KEY, raised) is None


def test_refusals_become_429_with_a_whole_retry_after() -> None:
    limiter = RateLimiter(Clock())
    limits = Limits(requests_per_minute=40)  # one every 1.5 s
    for _ in range(40):
        assert limiter.check(KEY, limits) is None
    refusal = limiter.check(KEY, limits)
    assert refusal is not None
    err = refusal_error(KEY, refusal)
    assert isinstance(err, RateLimited) and err.http_status == 429 and err.code == "rate_limit_exceeded"
    assert err.retry_after_s == 2.0  # rounded up, so obeying it is enough
    assert "requests per min (RPM): Limit 40" in err.message and "1.5s" in err.message
    assert err.details == {"limit": "requests", "value": 40}
    assert refusal_error(KEY, limiter.check(KEY, Limits(concurrent_requests=40))  # type: ignore[arg-type]
                         ).code == "concurrency_limit_exceeded"
