"""age v1: interoperability with Debian's `age` both ways, every failure's own code, bounded memory.

The interoperability and error tests drive the real /usr/bin/age and age-keygen, so a format bug
that is symmetric in our reader and writer cannot hide.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
import subprocess
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from garrison.crypto import age
from garrison.errors import InvalidRequest

needs_age = pytest.mark.skipif(shutil.which("age") is None or shutil.which("age-keygen") is None,
                               reason="Debian's age (apt install age) is needed for interoperability tests")

SIZES = (0, 1, 65535, 65536, 65537, 200000)
ENC = age.ENC_CHUNK_SIZE


class Keys:
    def __init__(self, folder: Path, name: str) -> None:
        self.file = folder / f"{name}.txt"
        subprocess.run(["age-keygen", "-o", str(self.file)], check=True, capture_output=True)
        self.recipient = subprocess.run(["age-keygen", "-y", str(self.file)], check=True, capture_output=True,
                                        text=True).stdout.strip()
        self.identities = age.parse_identity_file(self.file.read_text())


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys"), "ours")


@pytest.fixture(scope="module")
def theirs(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys"), "theirs")


def age_encrypt(data: bytes, *recipients: str, armor: bool = False) -> bytes:
    args = ["age", *(["-a"] if armor else [])]
    for r in recipients:
        args += ["-r", r]
    return subprocess.run(args, input=data, capture_output=True, check=True).stdout


def age_decrypt(blob: bytes, keys: Keys) -> bytes:
    return subprocess.run(["age", "-d", "-i", str(keys.file)], input=blob, capture_output=True, check=True).stdout


def header_len(blob: bytes) -> int:
    return blob.index(b"\n--- ") + len(blob[blob.index(b"\n--- "):].split(b"\n", 2)[1]) + 2


def code_of(blob: bytes, keys: Keys) -> str:
    with pytest.raises(age.AgeError) as info:
        age.decrypt_bytes(blob, keys.identities)
    assert isinstance(info.value, InvalidRequest)
    assert info.value.message
    return info.value.code


# -- keys ------------------------------------------------------------------------------------------


def test_spec_x25519_vector() -> None:
    identity = age.parse_identity("AGE-SECRET-KEY-1GFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPQ4EGAEX")
    assert age.recipient_of(identity) == "age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwj"
    assert age.encode_identity(identity) == \
        "AGE-SECRET-KEY-1GFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPQ4EGAEX"


@needs_age
def test_keys_match_age_keygen(ours: Keys) -> None:
    assert age.recipient_of(ours.identities[0]) == ours.recipient
    assert age.encode_recipient(age.parse_recipient(ours.recipient)) == ours.recipient
    fresh = age.generate_identity()
    assert age.parse_identity(age.encode_identity(fresh)).private_bytes_raw() == fresh.private_bytes_raw()


@pytest.mark.parametrize("bad", [
    "age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwq",  # checksum
    "age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73EQUNUJWJ",  # mixed case
    "age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwb",  # b is not in the charset
    "bc1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwj", "", "age1",
])
def test_bad_recipients_refused(bad: str) -> None:
    with pytest.raises(age.AgeKeyError) as info:
        age.parse_recipient(bad)
    assert info.value.code == "age_invalid_key"


def test_ssh_and_plugin_recipients_refused_by_name() -> None:
    with pytest.raises(age.AgeUnsupportedRecipientError):
        age.parse_recipient("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHsKLqeplhpW+uObz5dvMgjz1OxfM/XXUB+VHtZ6isGN")
    pq = age.bech32_encode("age1pq", b"\x01" * 40)
    with pytest.raises(age.AgeUnsupportedRecipientError):
        age.parse_recipient(pq)


# -- interoperability --------------------------------------------------------------------------------


@needs_age
@pytest.mark.parametrize("armor", [False, True], ids=["binary", "armored"])
@pytest.mark.parametrize("size", SIZES)
def test_debian_age_and_ours_open_each_other(ours: Keys, size: int, armor: bool) -> None:
    data = os.urandom(size)
    theirs_sealed = age_encrypt(data, ours.recipient, armor=armor)
    assert age.decrypt_bytes(theirs_sealed, ours.identities) == data
    ours_sealed = age.encrypt_bytes(data, [ours.recipient], armor=armor)
    assert ours_sealed.startswith(b"-----BEGIN AGE" if armor else b"age-encryption.org/v1\n")
    assert age_decrypt(ours_sealed, ours) == data


@needs_age
def test_multiple_recipients_and_identities(ours: Keys, theirs: Keys) -> None:
    data = os.urandom(70000)
    sealed = age.encrypt_bytes(data, [theirs.recipient, ours.recipient])
    assert age_decrypt(sealed, ours) == data and age_decrypt(sealed, theirs) == data
    both = age_encrypt(data, theirs.recipient, ours.recipient)
    assert age.decrypt_bytes(both, [*theirs.identities, *ours.identities]) == data
    assert age.decrypt_bytes(both, ours.identities) == data


class Trickle(io.RawIOBase):
    """A pipe-like source that returns at most `step` bytes per read."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data, self._pos, self._step = data, 0, step

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self._step if n < 0 else min(n, self._step)
        piece = self._data[self._pos:self._pos + n]
        self._pos += len(piece)
        return piece


@needs_age
@pytest.mark.parametrize("armor", [False, True])
def test_short_reads_both_ways(ours: Keys, armor: bool) -> None:
    data = os.urandom(150001)
    out = io.BytesIO()
    age.encrypt_stream(Trickle(data, 777), out, [ours.recipient], armor=armor)
    assert age_decrypt(out.getvalue(), ours) == data
    sealed = age_encrypt(data, ours.recipient, armor=armor)
    assert b"".join(age.decrypt_stream(Trickle(sealed, 333), ours.identities)) == data


@needs_age
def test_armor_whitespace_and_crlf_accepted(ours: Keys) -> None:
    data = os.urandom(1000)
    armored = age_encrypt(data, ours.recipient, armor=True)
    assert age.decrypt_bytes(b"\n  \r\n" + armored + b"\n\n  ", ours.identities) == data
    assert age.decrypt_bytes(armored.replace(b"\n", b"\r\n"), ours.identities) == data
    assert age.decrypt_bytes(armored.rstrip(b"\n"), ours.identities) == data  # END without a final LF


@needs_age
def test_file_reader_reads_lines(ours: Keys) -> None:
    text = b"".join(b'{"n": %d}\n' % i for i in range(20000))
    sealed = age_encrypt(text, ours.recipient)
    with age.open_decrypt(io.BytesIO(sealed), ours.identities) as fh:
        lines = list(io.TextIOWrapper(fh, encoding="utf-8"))
    assert len(lines) == 20000 and lines[-1] == '{"n": 19999}\n'


# -- failures: each its own code -------------------------------------------------------------------


@needs_age
def test_wrong_recipient(ours: Keys, theirs: Keys) -> None:
    sealed = age_encrypt(b"secret", theirs.recipient)
    with pytest.raises(age.AgeNoIdentityError):
        age.decrypt_stream(io.BytesIO(sealed), ours.identities)  # raised at open, before any iteration
    assert code_of(sealed, ours) == "age_no_matching_identity"


@needs_age
@pytest.mark.parametrize("armor", [False, True])
def test_truncated_inside_header(ours: Keys, armor: bool) -> None:
    sealed = age_encrypt(os.urandom(1000), ours.recipient)
    cuts = [5, 30, header_len(sealed) - 10, header_len(sealed), header_len(sealed) + 7]
    for cut in cuts:
        blob = _armor(sealed[:cut]) if armor else sealed[:cut]
        assert code_of(blob, ours) == "age_truncated", cut


def _armor(blob: bytes) -> bytes:
    """Armor for an arbitrary byte string (to armor a binary file cut short)."""
    b64 = base64.b64encode(blob)
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return b"-----BEGIN AGE ENCRYPTED FILE-----\n" + b"\n".join(lines) + b"\n-----END AGE ENCRYPTED FILE-----\n"


@needs_age
def test_truncated_inside_payload(ours: Keys) -> None:
    data = os.urandom(200000)  # chunks of 65536, 65536, 65536, 3392 bytes
    sealed = age_encrypt(data, ours.recipient)
    payload = header_len(sealed) + age.NONCE_SIZE
    # Provable truncations: after a non-final chunk, inside a tag, no chunk at all.
    for cut in (payload + ENC, payload + 2 * ENC, payload + 3 * ENC + 10, payload, payload + 5):
        assert code_of(sealed[:cut], ours) == "age_truncated", cut
    # A cut inside the final bytes of a chunk is indistinguishable from damage to that chunk:
    # the format has no length field. It is still refused, as corrupt, naming both causes.
    with pytest.raises(age.AgePayloadError, match="cut"):
        age.decrypt_bytes(sealed[:payload + ENC + 1000], ours.identities)


@needs_age
def test_truncated_armored_file_anywhere(ours: Keys) -> None:
    armored = age_encrypt(os.urandom(200000), ours.recipient, armor=True)
    # Armor ends with an END line, so a cut anywhere (mid-line, at a line end, in the END line) is provable.
    for cut in (len(armored) // 2, len(armored) // 2 - len(armored) // 2 % 65, len(armored) - 10, 200):
        assert code_of(armored[:cut], ours) == "age_truncated", cut


@needs_age
def test_flipped_byte_in_header(ours: Keys, theirs: Keys) -> None:
    sealed = bytearray(age_encrypt(b"data", theirs.recipient, ours.recipient))
    lines = bytes(sealed).split(b"\n")
    assert lines[1].startswith(b"-> X25519 ") and lines[3].startswith(b"-> X25519 ")
    # In the MAC itself.
    mac_at = bytes(sealed).index(b"\n--- ") + 10
    flipped = bytearray(sealed)
    flipped[mac_at] = ord("A") if flipped[mac_at] != ord("A") else ord("B")
    assert code_of(bytes(flipped), ours) == "age_header_mac_invalid"
    # In the other recipient's stanza: our stanza still opens, and the MAC catches the change.
    at = len(lines[0]) + 1 + 15
    flipped = bytearray(sealed)
    flipped[at] = ord("A") if flipped[at] != ord("A") else ord("B")
    assert code_of(bytes(flipped), ours) == "age_header_mac_invalid"
    # A flip that breaks the header's syntax cannot reach the MAC check: malformed header.
    flipped = bytearray(sealed)
    flipped[len(lines[0])] = ord(" ")  # the version line's LF
    assert code_of(bytes(flipped), ours) in {"age_unsupported_version", "age_header_invalid"}
    flipped = bytearray(sealed)
    flipped[len(lines[0]) + 1] = ord("x")  # "-> " becomes "x> "
    assert code_of(bytes(flipped), ours) == "age_header_invalid"


@needs_age
def test_flipped_byte_in_payload_is_caught_before_release(ours: Keys) -> None:
    data = os.urandom(200000)
    sealed = age_encrypt(data, ours.recipient)
    payload = header_len(sealed) + age.NONCE_SIZE
    for chunk in range(4):
        flipped = bytearray(sealed)
        flipped[payload + chunk * ENC + 100] ^= 0x01
        assert code_of(bytes(flipped), ours) == "age_payload_corrupt"
        released = []
        with pytest.raises(age.AgePayloadError):
            for piece in age.decrypt_stream(io.BytesIO(bytes(flipped)), ours.identities):
                released.append(piece)
        assert b"".join(released) == data[:chunk * age.CHUNK_SIZE]  # every chunk before, none after
    flipped = bytearray(sealed)
    flipped[payload - 3] ^= 0x80  # the payload nonce: a different payload key, chunk 0 fails
    assert code_of(bytes(flipped), ours) == "age_payload_corrupt"


@needs_age
def test_trailing_data_refused(ours: Keys) -> None:
    sealed = age_encrypt(os.urandom(65536), ours.recipient)
    assert code_of(sealed + b"x", ours) == "age_trailing_data"
    assert code_of(sealed + os.urandom(ENC), ours) == "age_trailing_data"
    short = age_encrypt(b"abc", ours.recipient)
    assert code_of(short + b"x", ours) == "age_payload_corrupt"  # a final chunk one byte longer


@needs_age
@pytest.mark.parametrize("damage", [
    "bad_char", "short_line", "long_line", "after_end", "bad_end", "bad_begin", "padding_inside",
    "non_canonical_padding", "blank_line", "no_data",
])
def test_broken_armor(ours: Keys, damage: str) -> None:
    armored = age_encrypt(os.urandom(1000), ours.recipient, armor=True)
    lines = armored.split(b"\n")
    if damage == "bad_char":
        lines[3] = lines[3][:10] + b"!" + lines[3][11:]
    elif damage == "short_line":
        lines[2] = lines[2][:-4]
    elif damage == "long_line":
        lines[2] = lines[2] + lines[3][:4]
        del lines[3]
    elif damage == "after_end":
        lines.append(b"garbage")
    elif damage == "bad_end":
        lines[-2] = b"-----END AGE ENCRYPTED FILE----"
    elif damage == "bad_begin":
        lines[0] = b"-----BEGIN AGE ENCRYPTED FILE-----  x"
    elif damage == "padding_inside":
        lines[2] = lines[2][:-2] + b"=="
    elif damage == "non_canonical_padding":
        body = base64.b64encode(b"\x00" * 47)  # ends in one "=": the last char's low bits are unused
        lines = [lines[0], body[:-2] + b"B=", lines[-2], b""]
    elif damage == "blank_line":
        lines.insert(2, b"")
    elif damage == "no_data":
        lines = [lines[0], lines[-2], b""]
    assert code_of(b"\n".join(lines), ours) == "age_bad_armor", damage


def test_empty_file() -> None:
    with pytest.raises(age.AgeEmptyError) as info:
        age.decrypt_bytes(b"", [age.generate_identity()])
    assert info.value.code == "age_empty"


@pytest.mark.parametrize("content", [
    b"hello, world\n", b'{"messages": []}\n', os.urandom(5000), b"\x00" * 100, b"   \n\t  ",
    b"-----BEGIN PGP MESSAGE-----\nabcd\n-----END PGP MESSAGE-----\n", b"age-encryption.or\n",
])
def test_not_age(content: bytes) -> None:
    with pytest.raises(age.AgeNotAgeError) as info:
        age.decrypt_bytes(content, [age.generate_identity()])
    assert info.value.code == "age_not_age"


def _b64(size: int) -> str:
    return base64.b64encode(os.urandom(size)).decode().rstrip("=")


def _header(*stanzas: str) -> bytes:
    return ("age-encryption.org/v1\n" + "".join(stanzas) + "--- " + "A" * 42 + "E\n").encode() + bytes(40)


def test_unsupported_recipient_types() -> None:
    ident = [age.generate_identity()]
    scrypt = _header(f"-> scrypt {_b64(16)} 18\n{_b64(32)}\n")
    ssh = _header(f"-> ssh-ed25519 Xb7Jbw {_b64(32)}\n{_b64(32)}\n")
    plugin = _header(f"-> piv-p256 abcd {_b64(33)}\n{_b64(32)}\n")
    for blob in (scrypt, ssh, plugin):
        with pytest.raises(age.AgeUnsupportedRecipientError) as info:
            age.decrypt_bytes(blob, ident)
        assert info.value.code == "age_unsupported_recipient"
    assert "passphrase" in _message(scrypt, ident)
    mixed = _header(f"-> scrypt {_b64(16)} 18\n{_b64(32)}\n", f"-> X25519 {_b64(32)}\n{_b64(32)}\n")
    with pytest.raises(age.AgeHeaderError):  # the spec forbids scrypt beside other stanzas
        age.decrypt_bytes(mixed, ident)


def _message(blob: bytes, ident: list[age.X25519PrivateKey]) -> str:
    with pytest.raises(age.AgeError) as info:
        age.decrypt_bytes(blob, ident)
    return info.value.message


def test_other_version_refused() -> None:
    with pytest.raises(age.AgeVersionError) as info:
        age.decrypt_bytes(b"age-encryption.org/v2\n-> X25519 abc\n\n--- x\n", [age.generate_identity()])
    assert info.value.code == "age_unsupported_version"


@needs_age
def test_every_failure_has_its_own_code(ours: Keys, theirs: Keys) -> None:
    sealed = age_encrypt(os.urandom(200000), ours.recipient)
    payload = header_len(sealed) + age.NONCE_SIZE
    mac_flip = bytearray(sealed)
    at = sealed.index(b"\n--- ") + 10
    mac_flip[at] = ord("A") if mac_flip[at] != ord("A") else ord("B")
    body_flip = bytearray(sealed)
    body_flip[payload + 10] ^= 0x01
    bad_armor = age_encrypt(b"x", ours.recipient, armor=True).replace(b"\n", b"\n\n", 2)
    cases = {
        "wrong recipient": age_encrypt(b"x", theirs.recipient),
        "truncated payload": sealed[:payload + ENC],
        "truncated header": sealed[:40],
        "header flip": bytes(mac_flip),
        "payload flip": bytes(body_flip),
        "broken armor": bad_armor,
        "empty": b"",
        "not age": b"just some text\n",
        "scrypt": _header(f"-> scrypt {_b64(16)} 18\n{_b64(32)}\n"),
    }
    expected = {
        "wrong recipient": "age_no_matching_identity", "truncated payload": "age_truncated",
        "truncated header": "age_truncated", "header flip": "age_header_mac_invalid",
        "payload flip": "age_payload_corrupt", "broken armor": "age_bad_armor", "empty": "age_empty",
        "not age": "age_not_age", "scrypt": "age_unsupported_recipient",
    }
    assert {name: code_of(blob, ours) for name, blob in cases.items()} == expected
    assert len(set(expected.values())) == 8
    assert all(re.fullmatch(r"age_[a-z_]+", c) for c in expected.values())


# -- bounded memory ----------------------------------------------------------------------------------

STREAM_SIZE = 64 * 1024 * 1024
PEAK_LIMIT = 4 * 1024 * 1024


class Generated(io.RawIOBase):
    """64 MiB of deterministic bytes made on demand: the source is never held in memory."""

    def __init__(self, size: int) -> None:
        self._left = size
        self._block = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB pattern
        self._offset = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        reps = (self._offset + n) // len(self._block) + 1
        out = (self._block * reps)[self._offset:self._offset + n]
        self._offset = (self._offset + n) % len(self._block)
        self._left -= n
        return out


class HashSink(io.RawIOBase):
    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.digest.update(data)
        self.size += len(data)
        return len(data)


def _chunks(chunks: Iterator[bytes]) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for piece in chunks:
        digest.update(piece)
        size += len(piece)
    return digest.hexdigest(), size


@pytest.mark.parametrize("armor", [False, True], ids=["binary", "armored"])
def test_memory_stays_bounded_for_64_mib(tmp_path: Path, armor: bool) -> None:
    identity = age.generate_identity()
    expected = HashSink()
    source = Generated(STREAM_SIZE)
    while piece := source.read(1 << 20):
        expected.write(piece)
    sealed = tmp_path / "big.age"
    tracemalloc.start()
    try:
        with sealed.open("wb") as dst:
            assert age.encrypt_stream(Generated(STREAM_SIZE), dst, [age.recipient_of(identity)],
                                      armor=armor) == STREAM_SIZE
        _, encrypt_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with sealed.open("rb") as src:
            digest, size = _chunks(age.decrypt_stream(src, [identity]))
        _, decrypt_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size == STREAM_SIZE and digest == expected.digest.hexdigest()
    assert sealed.stat().st_size > STREAM_SIZE
    assert encrypt_peak < PEAK_LIMIT, encrypt_peak
    assert decrypt_peak < PEAK_LIMIT, decrypt_peak
