"""SIGHUP means reload: the configuration and the policy file are read again and every setting that can
change live applies at once; a bad file refuses the whole reload, naming the key, and the old
configuration and policy keep running. Real daemon, real notify socket, real HTTP."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import signal
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import Daemon
from test_lifecycle import NotifyListener

from garrison.config import SETTINGS, Config, Reload, load_config
from garrison.daemon.lifecycle import _running_values

EMAIL = {"messages": [{"role": "user", "content": "write to alice@example.com"},
                     {"role": "assistant", "content": "done"}]}
PLAIN = {"messages": [{"role": "user", "content": "plain"}, {"role": "assistant", "content": "ok"}]}
BIG_BODY = {"model": "none", "messages": [{"role": "user", "content": "x" * 600_000}]}  # ~0.57 MiB


def test_every_setting_says_what_sighup_does_with_it() -> None:
    fields = {f.name for f in dataclasses.fields(Config)} - {"source"}
    assert {s.key for s in SETTINGS} == fields
    for setting in SETTINGS:
        assert isinstance(setting.reload, Reload), setting.key
        if setting.reload is not Reload.LIVE:
            assert setting.reload_note, f"{setting.key}: say why it is not applied at once"


def test_restart_only_settings_keep_their_running_value() -> None:
    old = load_config(env={"GARRISON_CONFIG": "/dev/null", "HOME": "/nonexistent"})
    new = dataclasses.replace(old, state_dir="/elsewhere", run_jobs=not old.run_jobs, log_level="debug",
                              max_request_mb=1.0, tls_cert_file="/etc/cert.pem")
    running = _running_values(old, new, serves_tls=False)
    assert (running.state_dir, running.run_jobs, running.tls_cert_file) == (old.state_dir, old.run_jobs, "")
    assert (running.log_level, running.max_request_mb) == ("debug", 1.0)


def _write_config(path: Path, **values: Any) -> None:
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))


def _ingest(daemon: Daemon, n: int) -> dict[str, Any]:
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key=daemon.key(), max_retries=0)
    plain = {"messages": [{"role": "user", "content": f"plain {n}"}, *PLAIN["messages"][1:]]}
    data = (json.dumps(EMAIL) + "\n" + json.dumps(plain) + "\n").encode()
    created = client.files.create(file=(f"f{n}.jsonl", io.BytesIO(data)), purpose="fine-tune")
    report: dict[str, Any] = (created.model_extra or {})["report"]
    return report


def _sighup(daemon: Daemon, listener: NotifyListener) -> dict[str, str]:
    """Send SIGHUP; the STATUS the daemon reports once it is ready again."""
    listener.messages.clear()
    daemon.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    listener.wait_for("RELOADING", timeout=10)
    listener.wait_for("READY", timeout=10)
    return next(f for _, f in listener.messages if "READY" in f)


def test_sighup_applies_every_live_setting_and_the_policy(make_daemon: Any, tmp_path: Path) -> None:
    listener = NotifyListener(tmp_path / "notify.sock")
    policy = tmp_path / "policy.toml"
    policy.write_text('[redaction.actions]\nemail = "keep"\n')
    toml = tmp_path / "garrison.toml"
    _write_config(toml, policy_file=str(policy), max_request_mb=1.0, log_level="warning", model_keep_alive_s=900.0,
                  model_queue=64)
    daemon: Daemon = make_daemon(NOTIFY_SOCKET=str(tmp_path / "notify.sock"), GARRISON_CONFIG=str(toml))
    daemon.key()
    daemon.start()
    listener.wait_for("READY", timeout=10)

    assert daemon.request("POST", "/v1/chat/completions", BIG_BODY)[0] != 413
    assert _ingest(daemon, 1)["records_dropped"] == 0  # email = "keep"
    info = daemon.request("GET", "/v1/garrison/system")[1]
    assert info["policy_source"] == str(policy) and info["log_level"] == "warning"
    assert info["model_manager"]["keep_alive_s"] == 900.0 and info["model_manager"]["max_queue"] == 64

    policy.write_text('[redaction.actions]\nemail = "drop"\n')
    _write_config(toml, policy_file=str(policy), max_request_mb=0.5, log_level="info", model_keep_alive_s=60.0,
                  model_queue=3, run_jobs=False)
    status = _sighup(daemon, listener)
    assert "reloaded" in status.get("STATUS", ""), status

    code, body = daemon.request("POST", "/v1/chat/completions", BIG_BODY)
    assert code == 413 and "max_request_mb" in body["error"]["message"], body
    assert daemon.request("POST", "/v1/chat/completions", {"model": "none", "messages": []})[0] != 413
    assert _ingest(daemon, 2)["records_dropped"] == 1  # email = "drop", from the file read again
    info = daemon.request("GET", "/v1/garrison/system")[1]
    assert info["config_reloads"] == 1 and info["log_level"] == "info"
    assert info["model_manager"]["keep_alive_s"] == 60.0 and info["model_manager"]["max_queue"] == 3
    assert info["job_runner"] is True  # run_jobs needs a restart: the runner keeps running
    log = daemon.log()
    assert "event=config.reloaded" in log  # an info line: written only since the log level became info
    assert "event=config.needs_restart key=run_jobs" in log

    # A bad policy (an unknown key) refuses the whole reload: the old policy and configuration run on.
    policy.write_text('colour = "blue"\n[redaction.actions]\nemail = "keep"\n')
    _write_config(toml, policy_file=str(policy), max_request_mb=1.0, log_level="info")
    status = _sighup(daemon, listener)
    assert "refused" in status.get("STATUS", "") and "colour" in status["STATUS"], status
    log = daemon.log()
    assert "event=policy.reload_refused" in log and "key=colour" in log
    assert _ingest(daemon, 3)["records_dropped"] == 1  # still "drop"
    assert daemon.request("POST", "/v1/chat/completions", BIG_BODY)[0] == 413  # still 0.5 MiB
    assert daemon.request("GET", "/v1/garrison/system")[1]["config_reloads"] == 1
    # Both reloads are in the audit trail: which policy (by its text's SHA-256) ran from when, and the refusal.
    trail = daemon.request("GET", "/v1/garrison/audit?limit=1000")[1]
    reloads = [e for e in trail["data"] if e["action"] == "config.reload"]
    assert [e["outcome"] for e in reloads] == ["ok", "refused"] and trail["chain_intact"]
    applied = hashlib.sha256(b'[redaction.actions]\nemail = "drop"\n').hexdigest()
    assert reloads[0]["detail"]["policy_sha256"] == applied and "max_request_mb" in reloads[0]["detail"]["changed"]
    assert reloads[1]["detail"]["key"] == "colour" and reloads[1]["detail"]["kept_policy_sha256"] == applied
    assert reloads[0]["actor"] == "signal:SIGHUP"
    assert daemon.stop() == 0

    # The same file refuses a start, naming the key.
    started = time.monotonic()
    again: Daemon = make_daemon(GARRISON_CONFIG=str(toml))
    again.start(wait=False)
    assert again.proc is not None and again.proc.wait(timeout=30) == 2
    assert "invalid_policy" in again.log() and "colour" in again.log() and str(policy) in again.log()
    print(f"refused start in {time.monotonic() - started:.2f}s")


@pytest.mark.parametrize("bad", ['colour = 1\n[redaction.actions]\nemail = "drop"\n',
                                 '[redaction.actions]\nemail = "drop"\n[rate_limits]\nno_such_limit = 1\n'])
def test_cli_ingest_validates_the_whole_policy_file(bad: str, tmp_path: Path, make_daemon: Any) -> None:
    from conftest import run_cli

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(EMAIL) + "\n" + json.dumps(PLAIN) + "\n")
    policy = tmp_path / "policy.toml"
    policy.write_text('retention_days = 7\n[redaction.actions]\nemail = "drop"\n[inference_privacy]\n')
    daemon: Daemon = make_daemon()
    ok = run_cli(daemon.state_dir, "ingest", str(data), "--dataset", "d", "--plaintext", "--policy", str(policy),
                 "--json", env=daemon.env)
    assert json.loads(ok.stdout)["report"]["records_dropped"] == 1  # other sections do not bother ingestion
    policy.write_text(bad)
    refused = run_cli(daemon.state_dir, "ingest", str(data), "--dataset", "d", "--plaintext", "--policy",
                      str(policy), env=daemon.env, check=False)
    assert refused.returncode == 2 and "invalid_policy" in refused.stderr


def test_operator_guide_says_what_reloads_from_the_settings_table() -> None:
    import re

    from conftest import REPO, run_cli

    from garrison.config import RELOAD_BEGIN, RELOAD_END

    guide = (REPO / "docs" / "operator-guide.md").read_text()
    embedded = re.search(re.escape(RELOAD_BEGIN) + r".*?" + re.escape(RELOAD_END), guide, re.S)
    assert embedded, "docs/operator-guide.md lost its reload markers"
    assert embedded.group(0).strip() == run_cli(REPO, "docs", "reload").stdout.strip(), \
        "the reload list in docs/operator-guide.md is stale: paste `garrison docs reload` between the markers"
    for setting in SETTINGS:
        assert f"`{setting.key}`" in embedded.group(0)
