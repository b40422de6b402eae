"""age interoperability the way age itself proves it: the C2SP CCTV age test kit.

Every vector in `cctv_age/` (vendored from github.com/C2SP/CCTV, folder age/testdata, commit
1e3d2860; 0BSD/CC0, see cctv_age/README.md) is a textual header, an empty line, and an age file.
Each is opened with the vector's identities or passphrases, and the outcome must be the one the
vector expects, with the error class age's own testkit distinguishes; all plaintext released
before a failure must hash to the vector's `payload`. Vectors for features Garrison does not
implement (hybrid post-quantum recipients) are skipped, naming the feature.
"""

from __future__ import annotations

import hashlib
import io
import zlib
from pathlib import Path

import pytest

from garrison.crypto import age

KIT = Path(__file__).parent / "cctv_age"
VECTORS = sorted(p for p in KIT.iterdir() if p.is_file() and p.name != "README.md")

# The testkit's failure kinds and the errors that carry them here.
EXPECTED: dict[str, tuple[type[age.AgeError], ...]] = {
    "no match": (age.AgeNoIdentityError,),
    "HMAC failure": (age.AgeHeaderMacError,),
    "header failure": (age.AgeHeaderError, age.AgeVersionError, age.AgeNotAgeError, age.AgeTruncatedError),
    "payload failure": (age.AgePayloadError, age.AgeTruncatedError),
    "armor failure": (age.AgeArmorError, age.AgeTruncatedError, age.AgeNotAgeError),
}
UNSUPPORTED_IDENTITIES = {"AGE-SECRET-KEY-PQ-": "hybrid ML-KEM-768 + X25519 recipients"}
# Where Garrison names a failure more precisely than the kit's kind, on purpose.
MORE_PRECISE: dict[str, tuple[type[age.AgeError], str]] = {
    "empty": (age.AgeEmptyError, "an empty file has its own code (age_empty), not a header error"),
    "armor_empty": (age.AgeArmorError, "an armor block without data is refused by the armor layer"),
}


def _parse(path: Path) -> tuple[dict[str, list[str]], bytes]:
    raw = path.read_bytes()
    head, _, body = raw.partition(b"\n\n")
    fields: dict[str, list[str]] = {}
    for line in head.decode().splitlines():
        key, _, value = line.partition(": ")
        fields.setdefault(key, []).append(value)
    if fields.get("compressed") == ["zlib"]:
        body = zlib.decompress(body)
    return fields, body


def test_the_kit_is_complete() -> None:
    assert len(VECTORS) == 143
    kinds = {_parse(p)[0]["expect"][0] for p in VECTORS}
    assert kinds == {"success", *EXPECTED}


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.name)
def test_vector(path: Path) -> None:
    fields, body = _parse(path)
    for identity in fields.get("identity", []):
        for prefix, feature in UNSUPPORTED_IDENTITIES.items():
            if identity.startswith(prefix):
                pytest.skip(f"not implemented: {feature}")
    identities: list[age.IdentityLike] = [*fields.get("identity", []),
                                          *(age.Passphrase(p.encode()) for p in fields.get("passphrase", []))]
    if not identities:  # the file must fail before any key is tried: any identity will do
        identities = [age.generate_identity()]
    expect = fields["expect"][0]
    released = hashlib.sha256()
    error: age.AgeError | None = None
    try:
        for chunk in age.decrypt_stream(io.BytesIO(body), identities):
            released.update(chunk)
    except age.AgeError as exc:
        error = exc
    if expect == "success":
        assert error is None, f"{path.name}: {error!r} ({fields.get('comment')})"
    else:
        assert error is not None, f"{path.name} should fail with {expect} ({fields.get('comment')})"
        allowed = (MORE_PRECISE[path.name][0],) if path.name in MORE_PRECISE else EXPECTED[expect]
        assert isinstance(error, allowed), \
            f"{path.name}: expected {expect}, got {type(error).__name__}: {error} ({fields.get('comment')})"
    if "payload" in fields and expect in ("success", "payload failure"):
        assert released.hexdigest() == fields["payload"][0], f"{path.name}: released plaintext differs"
