"""The CLI's HTTP client for commands that act through the running daemon (run, chat).

Inference happens in the daemon, where the model is already loaded and batched with
other requests, so these commands talk to its OpenAI-compatible API like any client.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from garrison.config import Config
from garrison.daemon.lifecycle import running_daemon
from garrison.errors import AuthenticationError, Unavailable, from_http
from garrison.paths import StateLayout

KEY_ENV = "GARRISON_KEY"


def daemon_url(config: Config) -> str:
    info = running_daemon(StateLayout(config.state_path))
    if info and isinstance(info.get("url"), str):
        return str(info["url"])
    return config.base_url


def api_key(explicit: str | None) -> str:
    key = explicit or os.environ.get(KEY_ENV)
    if not key:
        raise AuthenticationError(f"no API key: pass --key or set {KEY_ENV} (create one with "
                                  "`garrison keys create --role infer`)", code="missing_api_key")
    return key


class DaemonClient:
    def __init__(self, url: str, key: str, ca_file: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {key}"}
        # A daemon with its own (self-signed) certificate: trust exactly that one for HTTPS.
        self.ssl: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True

    async def stream_chat(self, body: dict[str, Any], path: str = "/v1/chat/completions") -> AsyncIterator[str]:
        """Text pieces as the daemon streams them."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, session.post(
                    self.url + path, json={**body, "stream": True}, headers=self.headers, ssl=self.ssl) as resp:
                if resp.status != 200:
                    raise from_http(resp.status, await resp.json(content_type=None))
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: "):
                        continue
                    payload = line[len("data: "):]
                    if payload == "[DONE]":
                        return
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        raise from_http(500, chunk)
                    for choice in chunk.get("choices", []):
                        text = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
                        if text:
                            yield text
        except aiohttp.ClientConnectionError as exc:
            raise Unavailable(f"cannot reach the daemon at {self.url} ({exc}); start it with `garrison serve`",
                              code="daemon_unreachable") from None

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One JSON call to the daemon; an error body becomes the same Garrison exception again."""
        timeout = aiohttp.ClientTimeout(total=120, sock_connect=5)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, session.request(
                    method, self.url + path, json=body, headers=self.headers, ssl=self.ssl) as resp:
                data = await resp.json(content_type=None)
                if resp.status >= 400:
                    raise from_http(resp.status, data)
                return data
        except aiohttp.ClientConnectionError as exc:
            raise Unavailable(f"cannot reach the daemon at {self.url} ({exc}); start it with `garrison serve`",
                              code="daemon_unreachable") from None
