"""Rate limits and per-key usage, driven by the official `openai` client against a real daemon.

One daemon for the module, with a policy file that gives each test its own key and limits (the
tiny Llama as GGUF; key ids are made before the daemon starts, so the policy can name them).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from conftest import Daemon, free_port, garrison_env, run_cli

CHAT = [{"role": "user", "content": "What is Garrison?"}]
# One key per test, each with the limits the policy gives it below.
LIMITED = {
    "requests": {"requests_per_minute": 2},
    "tokens": {"tokens_per_minute": 40},
    "stream_tokens": {"tokens_per_minute": 40},
    "concurrency": {"concurrent_requests": 1},
    "reload": {"requests_per_minute": 4},
    "usage": {},
}


@dataclass
class Served:
    daemon: Daemon
    keys: dict[str, str]  # name -> secret
    ids: dict[str, str]  # name -> key id
    policy: Path


@pytest.fixture(scope="module")
def served(tiny_llama_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("ratelimits")
    state = root / "state"
    policy = root / "policy.toml"
    env = garrison_env(state, GARRISON_MODEL_KEEP_ALIVE_S="0", GARRISON_POLICY_FILE=str(policy))
    run_cli(state, "models", "import", str(tiny_llama_gguf), "--name", "tiny", "--parallel", "2", "--ctx", "512",
            env=env)
    keys, ids, lines = {}, {}, []
    for name, limits in LIMITED.items():
        made = json.loads(run_cli(state, "keys", "create", "--role", "infer", "--name", name, "--json",
                                  env=env).stdout)
        keys[name], ids[name] = made["key"], made["id"]
        lines.append(f"[rate_limits.keys.{made['id']}]")
        lines += [f"{field} = {value}" for field, value in limits.items()]
    # Every other infer key (the admin and read keys the tests use are not limited).
    policy.write_text("[rate_limits.roles.infer]\nrequests_per_minute = 1000\n" + "\n".join(lines) + "\n")
    daemon = Daemon(state, free_port(), env, root / "daemon.log").start()
    yield Served(daemon, keys, ids, policy)
    daemon.stop()


def client(served: Served, name: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.daemon.url + "/v1", api_key=served.keys[name], max_retries=0)


def metrics_text(daemon: Daemon) -> str:
    req = urllib.request.Request(daemon.url + "/metrics", headers={"Authorization": f"Bearer {daemon.key('read')}"})
    return str(urllib.request.urlopen(req, timeout=5).read().decode())


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{name}{{{re.escape(wanted)}}} ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_requests_per_minute_gives_rate_limit_error_with_retry_after(served: Served) -> None:
    c = client(served, "requests")
    first = c.chat.completions.with_raw_response.create(model="tiny", messages=CHAT, max_tokens=4)  # type: ignore[arg-type]
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert re.fullmatch(r"\d+(\.\d+)?m?s", first.headers["x-ratelimit-reset-requests"])
    assert "x-ratelimit-limit-tokens" not in first.headers  # not limited for this key
    assert first.parse().choices[0].message.content is not None
    c.models.list()  # every route counts, not only inference
    with pytest.raises(openai.RateLimitError) as limited:
        c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4)  # type: ignore[arg-type]
    response = limited.value.response
    assert limited.value.code == "rate_limit_exceeded"
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= 30  # a request every 30 s: back within 30 s of the last one taken
    assert 0 < int(response.headers["retry-after-ms"]) <= retry_after * 1000
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    body = response.json()["error"]
    assert body["details"] == {"limit": "requests", "value": 2}
    assert "requests per min (RPM): Limit 2" in body["message"]
    # Other keys are not affected.
    assert client(served, "usage").models.list().data
    assert metric(metrics_text(served.daemon), "garrison_rate_limited_total", key=served.ids["requests"],
                  limit="requests") == 1


def test_token_limit_is_charged_from_usage_then_refuses(served: Served) -> None:
    c = client(served, "tokens")
    raw = c.completions.with_raw_response.create(model="tiny", prompt="Tell me about the vault", max_tokens=48,
                                                 extra_body={"ignore_eos": True})
    usage = raw.parse().usage
    assert usage is not None and usage.total_tokens > 40  # more than a minute's allowance: admitted, then charged
    assert raw.headers["x-ratelimit-limit-tokens"] == "40"
    assert raw.headers["x-ratelimit-remaining-tokens"] == "0"  # the headers leave after the charge
    with pytest.raises(openai.RateLimitError) as limited:
        c.completions.create(model="tiny", prompt="Again", max_tokens=4)
    response = limited.value.response
    assert response.json()["error"]["details"] == {"limit": "tokens", "value": 40}
    # Below zero by (usage - 40) tokens, refilled at 40 a minute: back to one token after that long.
    wait_s = (usage.total_tokens - 40 + 1) * 60 / 40
    assert abs(int(response.headers["retry-after"]) - wait_s) <= 3
    assert metric(metrics_text(served.daemon), "garrison_rate_limited_total", key=served.ids["tokens"],
                  limit="tokens") == 1


def test_a_stream_is_charged_when_it_ends(served: Served) -> None:
    c = client(served, "stream_tokens")
    stream = c.chat.completions.with_raw_response.create(
        model="tiny", messages=CHAT, max_tokens=48, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    assert stream.headers["x-ratelimit-remaining-tokens"] == "40"  # sent before the first token
    total = 0
    for chunk in stream.parse():
        if chunk.usage:
            total = chunk.usage.total_tokens
    assert total > 40
    with pytest.raises(openai.RateLimitError) as limited:
        c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4)  # type: ignore[arg-type]
    assert limited.value.response.json()["error"]["details"]["limit"] == "tokens"


def test_concurrent_requests_limit(served: Served) -> None:
    async def scenario() -> None:
        async with openai.AsyncOpenAI(base_url=served.daemon.url + "/v1", api_key=served.keys["concurrency"],
                                      max_retries=0, timeout=120) as c:
            busy = await c.completions.create(model="tiny", prompt="Count", max_tokens=300, stream=True,
                                              extra_body={"ignore_eos": True})
            assert await busy.__anext__() is not None
            with pytest.raises(openai.RateLimitError) as limited:
                await c.models.list()
            assert limited.value.code == "concurrency_limit_exceeded"
            assert int(limited.value.response.headers["retry-after"]) >= 1
            async for _ in busy:
                pass
            assert (await c.models.list()).data  # the slot is free once the stream has ended

    asyncio.run(scenario())
    assert metric(metrics_text(served.daemon), "garrison_rate_limited_total", key=served.ids["concurrency"],
                  limit="concurrency") == 1


def test_a_reload_applies_new_limits_to_the_running_buckets(served: Served) -> None:
    c = client(served, "reload")
    for _ in range(4):
        c.models.list()
    with pytest.raises(openai.RateLimitError):
        c.models.list()
    key_id = served.ids["reload"]
    text = served.policy.read_text()
    served.policy.write_text(text.replace(f"[rate_limits.keys.{key_id}]\nrequests_per_minute = 4",
                                          f"[rate_limits.keys.{key_id}]\nrequests_per_minute = 6"))
    assert served.daemon.proc is not None
    served.daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:  # refusals cost nothing, so polling does not spend the bucket
        with pytest.raises(openai.RateLimitError) as limited:
            c.models.list()
        headers = limited.value.response.headers
        if headers["x-ratelimit-limit-requests"] == "6" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert headers["x-ratelimit-limit-requests"] == "6"
    # The spent bucket carried over: a fresh one would hold 6 requests.
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert int(headers["retry-after"]) <= 10  # refilling at the new rate: one request every 10 s
    served.policy.write_text(text)


def test_usage_is_recorded_per_key_and_shown_by_api_and_cli(served: Served) -> None:
    daemon, key_id = served.daemon, served.ids["usage"]
    c = client(served, "usage")
    spent = [c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8).usage,  # type: ignore[arg-type]
             c.completions.create(model="tiny", prompt="Hello", max_tokens=5).usage]
    prompt = sum(u.prompt_tokens for u in spent if u)
    completion = sum(u.completion_tokens for u in spent if u)
    status, report = daemon.request("GET", f"/v1/garrison/keys/usage?key={key_id}")
    assert status == 200, report
    assert report["data"] == [{"key_id": key_id, "key_name": "usage", "role": "infer", "model": "tiny",
                               "requests": 2, "prompt_tokens": prompt, "completion_tokens": completion,
                               "total_tokens": prompt + completion, "first_hour": report["data"][0]["first_hour"],
                               "last_hour": report["data"][0]["last_hour"]}]
    text = metrics_text(daemon)
    assert metric(text, "garrison_key_tokens_total", key=key_id, kind="prompt") == prompt
    assert metric(text, "garrison_key_tokens_total", key=key_id, kind="completion") == completion
    assert daemon.request("GET", "/v1/garrison/keys/usage", role="infer")[0] == 403
    assert daemon.request("GET", "/v1/garrison/keys/usage?since=yesterday")[0] == 400
    assert daemon.request("GET", "/v1/garrison/keys/usage?key=key_0000000000000000")[0] == 404
    status, by_day = daemon.request("GET", f"/v1/garrison/keys/usage?key={key_id}&by=day&since=1d")
    assert status == 200 and len(by_day["data"]) == 1 and by_day["data"][0]["day"].endswith("T00:00:00Z")

    # A last request, then SIGTERM: its usage is written at shutdown, not lost with the batch.
    last = c.completions.create(model="tiny", prompt="Bye", max_tokens=3).usage
    assert last is not None
    assert daemon.stop(signal.SIGTERM) == 0
    cli = json.loads(run_cli(daemon.state_dir, "keys", "usage", "--key", key_id, "--json", env=daemon.env).stdout)
    assert cli["totals"] == {"requests": 3, "prompt_tokens": prompt + last.prompt_tokens,
                             "completion_tokens": completion + last.completion_tokens,
                             "total_tokens": prompt + completion + last.total_tokens}
    table = run_cli(daemon.state_dir, "keys", "usage", env=daemon.env).stdout.splitlines()
    assert table[0].split() == ["KEY", "NAME", "MODEL", "REQUESTS", "PROMPT", "COMPLETION", "TOTAL"]
    assert any(line.split()[:3] == [key_id, "usage", "tiny"] and line.split()[3] == "3" for line in table)
    daemon.start()  # for any test after this one
