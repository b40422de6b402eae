"""The appliance identity: made once, kept encrypted under the master key, one per state folder;
`garrison identity` / `garrison seal`, and GET /v1/garrison/identity."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner

from garrison.commands.identity import identity_command, seal_command
from garrison.config import load_config
from garrison.crypto import age
from garrison.crypto.identity import (
    MAGIC,
    IdentityCache,
    identity_path,
    install_next_identity,
    load_appliance_identity,
    load_identity,
    load_or_create_identity,
    next_identity_path,
    previous_identity_path,
    seal_identity,
    verify_signature,
)
from garrison.daemon.api import identity as identity_api
from garrison.daemon.state import STATE
from garrison.errors import ConfigError, Conflict, IntegrityError, NotFound
from garrison.paths import StateLayout

REPO = Path(__file__).resolve().parents[2]
KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))


@pytest.fixture
def layout(tmp_path: Path) -> StateLayout:
    return StateLayout(tmp_path / "state")


def test_created_once_encrypted_and_private(layout: StateLayout) -> None:
    first = load_or_create_identity(layout, KEY_A)
    again = load_or_create_identity(layout, KEY_A)
    assert first.recipient == again.recipient and first.recipient.startswith("age1")
    assert first.signing_public_key_hex == again.signing_public_key_hex
    path = identity_path(layout)
    assert path == layout.identity / "keys.enc"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    blob = path.read_bytes()
    assert blob.startswith(MAGIC)
    secret = age.encode_identity(first.age_identity)
    assert secret.encode() not in blob and secret.lower().encode() not in blob
    assert first.age_identity.private_bytes_raw() not in blob
    assert "SECRET" not in repr(first)
    assert [p.name for p in layout.identity.iterdir() if p.name.endswith(".tmp")] == []


def test_identity_opens_what_is_sealed_for_it(layout: StateLayout) -> None:
    identity = load_or_create_identity(layout, KEY_A)
    sealed = age.encrypt_bytes(b"training data", [identity.recipient])
    assert age.decrypt_bytes(sealed, [identity.age_identity]) == b"training data"


def test_wrong_master_key_is_refused_clearly(layout: StateLayout) -> None:
    load_or_create_identity(layout, KEY_A)
    before = identity_path(layout).read_bytes()
    with pytest.raises(IntegrityError) as info:
        load_or_create_identity(layout, KEY_B)
    assert info.value.code == "identity_unreadable"
    assert "master key does not open this appliance's identity" in info.value.message
    assert identity_path(layout).read_bytes() == before  # never replaced by a new identity
    with pytest.raises(ConfigError):
        load_or_create_identity(layout, b"short")


def test_damaged_file_is_refused(layout: StateLayout) -> None:
    load_or_create_identity(layout, KEY_A)
    path = identity_path(layout)
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError) as info:
        load_or_create_identity(layout, KEY_A)
    assert info.value.code == "identity_unreadable"
    path.write_bytes(b"something else entirely")
    with pytest.raises(IntegrityError, match="not a Garrison identity file"):
        load_or_create_identity(layout, KEY_A)


def test_sign_and_verify(layout: StateLayout) -> None:
    identity = load_or_create_identity(layout, KEY_A)
    manifest = b'{"sha256": "abc", "base": "tiny"}'
    signature = identity.sign(manifest)
    assert len(signature) == 64
    identity.verify(manifest, signature)
    verify_signature(identity.signing_public_key_hex, manifest, signature)
    for data, sig in ((manifest + b" ", signature), (manifest, bytes(64)), (manifest, signature[:10])):
        with pytest.raises(IntegrityError) as info:
            identity.verify(data, sig)
        assert info.value.code == "signature_invalid"
    other = load_or_create_identity(StateLayout(layout.root.parent / "other"), KEY_A)
    with pytest.raises(IntegrityError):
        other.verify(manifest, signature)


def test_concurrent_first_starts_agree_on_one_identity(layout: StateLayout) -> None:
    script = ("import sys; from pathlib import Path; from garrison.paths import StateLayout;"
              "from garrison.crypto.identity import load_or_create_identity;"
              "print(load_or_create_identity(StateLayout(Path(sys.argv[1])), bytes(range(32))).recipient)")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(layout.root)], stdout=subprocess.PIPE,
                              text=True, cwd=REPO) for _ in range(6)]
    recipients = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(recipients) == 1
    assert recipients == {load_or_create_identity(layout, KEY_A).recipient}
    assert sorted(p.name for p in layout.identity.iterdir()) == ["keys.enc", "keys.lock"]


def test_a_rotation_seals_the_identity_beside_it_then_installs_it(layout: StateLayout) -> None:
    """Whatever instant a rotation stops at, one of the files opens with one of the two keys."""
    identity = load_or_create_identity(layout, KEY_A)
    seal_identity(layout, identity, KEY_B, next_identity_path(layout))
    for key in (KEY_A, KEY_B):  # prepared: keys.enc (A) and keys.enc.next (B)
        assert load_identity(layout, key).recipient == identity.recipient
    install_next_identity(layout)
    assert load_identity(layout, KEY_B).signing_public_key_hex == identity.signing_public_key_hex
    assert load_identity(layout, KEY_A).recipient == identity.recipient  # keys.enc.previous, until --finish
    install_next_identity(layout)  # a retried install is a no-op
    previous_identity_path(layout).unlink()
    with pytest.raises(IntegrityError) as info:
        load_identity(layout, KEY_A)
    assert info.value.code == "identity_unreadable"
    assert stat.S_IMODE(identity_path(layout).stat().st_mode) == 0o600


def test_production_install_does_not_mint_a_master_key(tmp_path: Path, env: dict[str, str]) -> None:
    config = load_config(overrides={"master_key_file": str(tmp_path / "missing.key")})
    with pytest.raises(ConfigError) as info:
        load_appliance_identity(config)
    assert info.value.code == "master_key_missing"
    dev = load_appliance_identity(load_config())
    assert (tmp_path / "home" / ".config" / "garrison" / "master.key").exists()
    assert load_appliance_identity(load_config()).recipient == dev.recipient


# -- CLI ---------------------------------------------------------------------------------------------


def test_identity_command(env: dict[str, str]) -> None:
    runner = CliRunner()
    plain = runner.invoke(identity_command, [], catch_exceptions=False)
    assert plain.exit_code == 0
    recipient = plain.output.strip()
    age.parse_recipient(recipient)
    as_json = runner.invoke(identity_command, ["--json"], catch_exceptions=False)
    body = json.loads(as_json.output)
    assert body["recipient"] == recipient and len(bytes.fromhex(body["signing_public_key"])) == 32
    other_state = Path(env["GARRISON_STATE_DIR"]).parent / "other"
    moved = runner.invoke(identity_command, ["--state-dir", str(other_state)], catch_exceptions=False)
    assert moved.output.strip() != recipient


def test_seal_for_the_local_appliance(tmp_path: Path, env: dict[str, str]) -> None:
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"messages": []}\n' * 10000)
    with pytest.raises(NotFound) as missing:  # never mint an identity just to seal to it
        CliRunner().invoke(seal_command, [str(data)], catch_exceptions=False)
    assert missing.value.code == "identity_missing"
    assert not (tmp_path / "home" / ".config" / "garrison" / "master.key").exists()
    CliRunner().invoke(identity_command, [], catch_exceptions=False)  # the appliance's first start
    result = CliRunner().invoke(seal_command, [str(data)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    sealed = tmp_path / "train.jsonl.age"
    identity = load_appliance_identity(load_config())
    with sealed.open("rb") as fh:
        assert b"".join(age.decrypt_stream(fh, [identity.age_identity])) == data.read_bytes()
    with pytest.raises(Conflict) as info:
        CliRunner().invoke(seal_command, [str(data)], catch_exceptions=False)
    assert info.value.code == "output_exists"
    armored = CliRunner().invoke(seal_command, [str(data), "--armor", "--force"], catch_exceptions=False)
    assert armored.exit_code == 0 and sealed.read_bytes().startswith(b"-----BEGIN AGE ENCRYPTED FILE-----\n")


@pytest.mark.skipif(shutil.which("age-keygen") is None, reason="needs Debian's age")
def test_seal_for_explicit_recipients_opens_with_debian_age(tmp_path: Path, env: dict[str, str]) -> None:
    keyfile = tmp_path / "producer.txt"
    subprocess.run(["age-keygen", "-o", str(keyfile)], check=True, capture_output=True)
    recipient = subprocess.run(["age-keygen", "-y", str(keyfile)], check=True, capture_output=True,
                               text=True).stdout.strip()
    data = tmp_path / "notes.txt"
    data.write_bytes(os.urandom(100_000))
    out = tmp_path / "out" / "notes.sealed"
    out.parent.mkdir()
    result = CliRunner().invoke(seal_command, [str(data), "-r", recipient, "-o", str(out), "-a"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    opened = subprocess.run(["age", "-d", "-i", str(keyfile), str(out)], check=True, capture_output=True)
    assert opened.stdout == data.read_bytes()
    assert not (Path(env["GARRISON_STATE_DIR"]) / "identity").exists()  # -r needs no local state
    with pytest.raises(age.AgeKeyError):
        CliRunner().invoke(seal_command, [str(data), "-r", "age1typo", "-o", str(tmp_path / "x.age")],
                           catch_exceptions=False)
    assert not (tmp_path / "x.age").exists()


def test_seal_leaves_nothing_behind_on_failure(tmp_path: Path, env: dict[str, str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "big.bin"
    data.write_bytes(os.urandom(300_000))

    def failing(src: io.BufferedReader, dst: io.BufferedWriter, recipients: list[str], *, armor: bool) -> int:
        dst.write(src.read(100_000))
        raise OSError("disk full")

    monkeypatch.setattr(age, "encrypt_stream", failing)
    with pytest.raises(OSError, match="disk full"):
        CliRunner().invoke(seal_command, [str(data), "-r", age.recipient_of(age.generate_identity())],
                           catch_exceptions=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]


# -- HTTP --------------------------------------------------------------------------------------------


@pytest.fixture
async def client(env: dict[str, str]) -> AsyncIterator[TestClient]:
    app = web.Application()
    app[STATE] = SimpleNamespace(config=load_config())  # type: ignore[misc]
    for route in identity_api.ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    async with TestClient(TestServer(app)) as c:
        yield c


async def test_identity_route(client: TestClient) -> None:
    (route,) = identity_api.ROUTES
    assert (route.method, route.path, route.scope) == ("GET", "/v1/garrison/identity", "read")
    response = await client.get("/v1/garrison/identity")
    assert response.status == 200
    body = await response.json()
    expected = load_appliance_identity(load_config())
    assert body == {"recipient": expected.recipient, "signing_public_key": expected.signing_public_key_hex}


async def test_identity_route_uses_the_state_cache(client: TestClient) -> None:
    calls = []

    def loader(config: object) -> object:
        calls.append(config)
        return load_appliance_identity(load_config())

    cache = IdentityCache(loader)  # type: ignore[arg-type]
    client.app[STATE].identity_cache = cache
    for _ in range(3):
        assert (await client.get("/v1/garrison/identity")).status == 200
    assert len(calls) == 1
