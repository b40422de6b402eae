"""The master key: generated once with mode 0600, never replaced, refused when exposed."""

from __future__ import annotations

from pathlib import Path

import pytest

from garrison.config import load_config
from garrison.errors import ConfigError
from garrison.store.master_key import load_master_key, master_key_path


def test_developer_key_is_generated_once_and_private(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    config = load_config("/dev/null", env=env)
    with pytest.raises(ConfigError) as missing:
        load_master_key(config, env=env)
    assert missing.value.code == "master_key_missing"
    key = load_master_key(config, create=True, env=env)
    path = master_key_path(config, env)
    assert path == tmp_path / ".config" / "garrison" / "master.key"
    assert len(key) == 32 and path.stat().st_mode & 0o777 == 0o600
    assert load_master_key(config, create=True, env=env) == key
    assert not str(path).startswith(config.state_dir)


def test_credential_wins_and_exposed_or_bad_keys_are_refused(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "master.key").write_text("ab" * 32 + "\n")
    env = {"HOME": str(tmp_path), "CREDENTIALS_DIRECTORY": str(creds)}
    config = load_config("/dev/null", env=env)
    assert load_master_key(config, env=env) == bytes.fromhex("ab" * 32)

    exposed = tmp_path / "exposed.key"
    exposed.write_text("cd" * 32)
    exposed.chmod(0o644)
    env = {"HOME": str(tmp_path), "GARRISON_MASTER_KEY_FILE": str(exposed)}
    with pytest.raises(ConfigError) as err:
        load_master_key(load_config("/dev/null", env=env), env=env)
    assert err.value.code == "master_key_exposed"
    exposed.chmod(0o600)
    exposed.write_text("too short")
    with pytest.raises(ConfigError) as err:
        load_master_key(load_config("/dev/null", env=env), env=env)
    assert err.value.code == "master_key_invalid"
