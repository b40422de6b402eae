"""HTTPS beyond loopback: refused without a certificate, served with one, renewed on SIGHUP."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import pytest
from conftest import free_port, garrison_env, run_cli

from garrison.config import load_config
from garrison.daemon.tls import fingerprint
from garrison.errors import ConfigError


def test_listening_beyond_loopback_needs_tls_or_an_explicit_choice(tmp_path: Path) -> None:
    env = {"GARRISON_LISTEN": "0.0.0.0:8477", "GARRISON_ALLOW_REMOTE": "true"}
    with pytest.raises(ConfigError) as refused:
        load_config("/dev/null", env=env)
    assert refused.value.param == "tls_cert_file"
    assert load_config("/dev/null", env={**env, "GARRISON_ALLOW_PLAINTEXT_LAN": "true"}).base_url.startswith("http:")
    with_tls = load_config("/dev/null", env={**env, "GARRISON_TLS_CERT_FILE": str(tmp_path / "c.pem")})
    assert with_tls.base_url == "https://127.0.0.1:8477"


@pytest.fixture
def tls_daemon(tmp_path: Path) -> Iterator[tuple[str, Path, dict[str, str], subprocess.Popen[bytes]]]:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    out = run_cli(tmp_path, "tls", "new-cert", "--cert", str(cert), "--key", str(key),
                  env=garrison_env(tmp_path / "none")).stdout
    assert "SHA-256 fingerprint" in out and (key.stat().st_mode & 0o777) == 0o600
    state = tmp_path / "state"
    port = free_port()
    env = garrison_env(state, GARRISON_LISTEN=f"0.0.0.0:{port}", GARRISON_ALLOW_REMOTE="true",
                       GARRISON_TLS_CERT_FILE=str(cert), GARRISON_TLS_KEY_FILE=str(key))
    log = (tmp_path / "daemon.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "garrison.cli", "serve"], env=env, stdout=log, stderr=log)
    url = f"https://127.0.0.1:{port}"
    context = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=1, context=context).read()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
            time.sleep(0.1)
    yield url, cert, env, proc
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def test_the_openai_client_talks_tls_with_the_appliance_certificate(
        tls_daemon: tuple[str, Path, dict[str, str], subprocess.Popen[bytes]]) -> None:
    url, cert, env, _ = tls_daemon
    key = run_cli(Path(env["GARRISON_STATE_DIR"]), "keys", "create", "--role", "infer", env=env).stdout.strip()
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0,
                           http_client=httpx2.Client(verify=ssl.create_default_context(cafile=str(cert))))
    assert client.models.list().data == []
    with pytest.raises(openai.APIConnectionError):  # without the appliance's certificate: not trusted
        openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0).models.list()
    plain = url.replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):  # plain HTTP to the TLS port
        urllib.request.urlopen(plain + "/health", timeout=5).read()
    # The CLI's own client trusts the configured certificate (tls_cert_file) for the daemon's https URL.
    ps = run_cli(Path(env["GARRISON_STATE_DIR"]), "ps", "--key",
                 run_cli(Path(env["GARRISON_STATE_DIR"]), "keys", "create", "--role", "read", env=env).stdout.strip(),
                 "--json", env=env).stdout
    assert json.loads(ps)["data"] == []


def test_sighup_loads_a_renewed_certificate(
        tls_daemon: tuple[str, Path, dict[str, str], subprocess.Popen[bytes]], tmp_path: Path) -> None:
    url, cert, env, proc = tls_daemon
    port = int(url.rsplit(":", 1)[1])
    before = ssl.get_server_certificate(("127.0.0.1", port))
    renewed_cert, renewed_key = tmp_path / "renewed.crt", tmp_path / "renewed.key"
    run_cli(tmp_path, "tls", "new-cert", "--cert", str(renewed_cert), "--key", str(renewed_key),
            env=garrison_env(tmp_path / "none"))
    cert.write_bytes(renewed_cert.read_bytes())
    Path(env["GARRISON_TLS_KEY_FILE"]).write_bytes(renewed_key.read_bytes())
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while ssl.get_server_certificate(("127.0.0.1", port)) == before:
        assert time.monotonic() < deadline, "the renewed certificate was not served after SIGHUP"
        time.sleep(0.1)
    der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port)))
    assert ssl.DER_cert_to_PEM_cert(der) and fingerprint(cert) == fingerprint(renewed_cert)
