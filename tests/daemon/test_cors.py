"""CORS against a real daemon over loopback: a browser's preflight (no key) and the request after it."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

import pytest

from garrison.config import load_config
from garrison.errors import ConfigError

UI = "http://localhost:3000"


def send(url: str, method: str, headers: dict[str, str]) -> tuple[int, Any]:
    req = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers
    except urllib.error.HTTPError as err:
        return err.code, err.headers


def preflight(url: str, origin: str) -> tuple[int, Any]:
    return send(url, "OPTIONS", {"Origin": origin, "Access-Control-Request-Method": "POST",
                                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})


def test_no_origin_is_allowed_by_default(make_daemon: Any) -> None:
    daemon = make_daemon().start()
    status, headers = preflight(daemon.url + "/v1/chat/completions", UI)
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    status, headers = send(daemon.url + "/v1/models", "GET", {"Origin": UI,
                                                              "Authorization": f"Bearer {daemon.key('infer')}"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


def test_allowed_origins_get_preflights_without_a_key_and_headers_on_answers(make_daemon: Any) -> None:
    daemon = make_daemon(GARRISON_CORS_ORIGINS=f"{UI}, https://app.example.com").start()
    url = daemon.url + "/v1/chat/completions"
    status, headers = preflight(url, UI)
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == UI
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "authorization, content-type, x-stainless-os"
    assert "Access-Control-Allow-Credentials" not in headers
    assert "Origin" in headers.get("Vary", "")
    status, headers = preflight(url, "http://evil.test")
    assert status == 403 and "Access-Control-Allow-Origin" not in headers
    # The request itself still needs its key; its answers (errors too) name the origin for the browser.
    status, headers = send(daemon.url + "/v1/models", "GET", {"Origin": UI})
    assert status == 401 and headers["Access-Control-Allow-Origin"] == UI
    status, headers = send(daemon.url + "/v1/models", "GET",
                           {"Origin": UI, "Authorization": f"Bearer {daemon.key('infer')}"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == UI
    assert "Retry-After" in headers["Access-Control-Expose-Headers"]
    status, headers = send(daemon.url + "/v1/models", "GET", {"Origin": "http://evil.test",
                                                              "Authorization": f"Bearer {daemon.key('infer')}"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    # An OPTIONS that is not a preflight is an ordinary request: it needs a key.
    assert send(daemon.url + "/v1/models", "OPTIONS", {})[0] == 401


def test_any_origin_never_comes_with_credentials(make_daemon: Any) -> None:
    daemon = make_daemon(GARRISON_CORS_ORIGINS="*").start()
    status, headers = preflight(daemon.url + "/v1/embeddings", "http://anything.test")
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in headers


@pytest.mark.parametrize("bad", ["localhost:3000", "http://ui.test/path", "ftp://ui.test", "http://u@ui.test"])
def test_origins_are_checked_at_start(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("/dev/null", env={"GARRISON_CORS_ORIGINS": bad})
    assert err.value.param == "cors_origins"
