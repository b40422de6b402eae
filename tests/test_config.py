"""Configuration: TOML, GARRISON_<KEY> overrides, flags, and validation with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import garrison_env, run_cli

from garrison.config import SETTINGS, load_config
from garrison.errors import ConfigError


def test_defaults_are_loopback_and_valid(tmp_path: Path) -> None:
    config = load_config("/dev/null", env={"HOME": str(tmp_path)})
    assert config.listen == "127.0.0.1:8477"
    assert config.state_dir.startswith(str(tmp_path))


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    toml = tmp_path / "g.toml"
    toml.write_text('listen = "127.0.0.1:9001"\njob_concurrency = 3\nstate_dir = "/srv/a"\n')
    config = load_config(str(toml), env={})
    assert (config.listen, config.job_concurrency, config.state_dir) == ("127.0.0.1:9001", 3, "/srv/a")
    config = load_config(str(toml), env={"GARRISON_LISTEN": "127.0.0.1:9002"})
    assert config.listen == "127.0.0.1:9002"
    config = load_config(str(toml), env={"GARRISON_LISTEN": "127.0.0.1:9002"},
                         overrides={"listen": "127.0.0.1:9003", "state_dir": "/srv/b"})
    assert (config.listen, config.state_dir) == ("127.0.0.1:9003", "/srv/b")


def test_every_setting_has_an_environment_override(tmp_path: Path) -> None:
    samples = {"state_dir": "/x", "listen": "127.0.0.1:1", "log_level": "debug", "master_key_file": "/k",
               "shutdown_grace_s": "5", "max_request_mb": "2", "job_concurrency": "2", "job_poll_s": "1",
               "job_timeout_s": "10", "job_max_attempts": "4", "job_heartbeat_s": "1",
               "job_stale_after_s": "9", "allow_remote": "true", "run_jobs": "false", "model_memory_mb": "512",
               "model_keep_alive_s": "60", "model_queue": "3", "request_timeout_s": "30", "inference_threads": "2",
               "policy_file": "/p.toml", "max_upload_mb": "10", "cpu_repack": "off", "runner_max_crashes": "5",
               "master_key_keep_previous_days": "7", "tls_cert_file": "/c.pem", "tls_key_file": "/k.pem",
               "allow_plaintext_lan": "true", "max_connections": "100", "header_timeout_s": "5",
               "body_timeout_s": "30", "audit_anchor_every": "25", "allow_unknown_fields": "true",
               "cors_origins": "http://a.test", "console_session_hours": "2",
               "responses_retention_days": "7"}
    assert set(samples) == {s.key for s in SETTINGS}, "add a sample for the new setting"
    env = {f"GARRISON_{k.upper()}": v for k, v in samples.items()}
    config = load_config("/dev/null", env=env)
    for key, raw in samples.items():
        assert str(getattr(config, key)).lower().rstrip(".0") == raw.rstrip(".0") or key in {
            "shutdown_grace_s", "max_request_mb", "job_poll_s", "job_timeout_s", "job_heartbeat_s",
            "job_stale_after_s", "cors_origins"}, key
    assert config.cors_origins == ("http://a.test",)
    assert config.run_jobs is False and config.allow_remote is True and config.job_max_attempts == 4


@pytest.mark.parametrize(("text", "key"), [
    ('listen = "nowhere"', "listen"),
    ("job_concurrency = 0", "job_concurrency"),
    ('log_level = "loud"', "log_level"),
    ('job_timeout_s = "soon"', "job_timeout_s"),
    ("colour = 1", "colour"),
])
def test_bad_values_name_the_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text(text + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(toml), env={})
    assert key in err.value.message and str(toml) in err.value.message
    assert err.value.exit_code == 2


def test_non_loopback_needs_allow_remote() -> None:
    with pytest.raises(ConfigError, match="loopback"):
        load_config("/dev/null", env={"GARRISON_LISTEN": "0.0.0.0:8477"})
    assert load_config("/dev/null", env={"GARRISON_LISTEN": "0.0.0.0:8477", "GARRISON_ALLOW_REMOTE": "yes",
                                         "GARRISON_ALLOW_PLAINTEXT_LAN": "yes"}).port == 8477


def test_cli_exits_2_naming_the_key(tmp_path: Path, state_dir: Path) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text("job_max_attempts = -1\n")
    for command in (["config", "check"], ["serve"], ["keys", "list"]):
        proc = run_cli(state_dir, *command, "--config", str(toml), check=False)
        assert proc.returncode == 2, (command, proc.stderr)
        assert "job_max_attempts" in proc.stderr and str(toml) in proc.stderr
    env = garrison_env(state_dir, GARRISON_LISTEN="127.0.0.1:http")
    proc = run_cli(state_dir, "serve", env=env, check=False)
    assert proc.returncode == 2 and "GARRISON_LISTEN" in proc.stderr and "'listen'" in proc.stderr


def test_engine_table_holds_the_engine_keys(tmp_path: Path) -> None:
    toml = tmp_path / "g.toml"
    toml.write_text('listen = "127.0.0.1:9001"\n[engine]\ncpu_repack = "off"\nrunner_max_crashes = 7\n')
    config = load_config(str(toml), env={})
    assert (config.cpu_repack, config.runner_max_crashes) == ("off", 7)
    toml.write_text('[engine]\ncpu_repack = "sometimes"\n')
    with pytest.raises(ConfigError) as bad:
        load_config(str(toml), env={})
    assert bad.value.param == "cpu_repack"
