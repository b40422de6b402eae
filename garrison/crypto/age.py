"""The age v1 file format (https://age-encryption.org/v1) with X25519 recipients, streaming both ways.

Sealed input reaches the appliance as age files made by Debian's `age`, `rage` or `garrison seal`.
We implement the format on `cryptography` primitives instead of binding a library because the
appliance needs three things the bindings do not give together: memory that does not grow with the
file (one 64 KiB chunk in flight, plus one of look-ahead), no plaintext handed out before it has been
authenticated (a chunk is verified before it is yielded, and the final-chunk rules are checked
before the last one is), and failures that say what went wrong with a stable code (see the
`AgeError` subclasses) so the inbox can tell "wrong key" from "damaged in transit".

Only X25519 recipients (`age1...`) and identities (`AGE-SECRET-KEY-1...`) are supported; passphrase
(scrypt), SSH and plugin stanzas are recognised and refused with `age_unsupported_recipient`.
ASCII armor (the strict PEM form of the spec) is written on request and detected on reading.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import io
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from garrison.errors import InvalidRequest

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "CHUNK_SIZE",
    "AgeArmorError",
    "AgeEmptyError",
    "AgeError",
    "AgeHeaderError",
    "AgeHeaderMacError",
    "AgeKeyError",
    "AgeNoIdentityError",
    "AgeNotAgeError",
    "AgePayloadError",
    "AgeReader",
    "AgeTrailingDataError",
    "AgeTruncatedError",
    "AgeUnsupportedRecipientError",
    "AgeVersionError",
    "Passphrase",
    "bech32_decode",
    "bech32_encode",
    "decrypt_bytes",
    "decrypt_stream",
    "encode_identity",
    "encode_recipient",
    "encrypt_bytes",
    "encrypt_stream",
    "generate_identity",
    "open_decrypt",
    "parse_identity",
    "parse_identity_file",
    "parse_recipient",
    "recipient_of",
]

# -- errors ----------------------------------------------------------------------------------------


class AgeError(InvalidRequest):
    """Any failure to read or write an age file; subclasses carry the stable codes clients match on."""

    code = "age_error"


class AgeNotAgeError(AgeError):
    """The input is not an age file at all (neither the binary header nor the armor marker)."""

    code = "age_not_age"


class AgeEmptyError(AgeError):
    """The input holds no bytes: usually a delivery that was created but never written."""

    code = "age_empty"


class AgeVersionError(AgeError):
    """An age file of a format version other than v1."""

    code = "age_unsupported_version"


class AgeHeaderError(AgeError):
    """The header is malformed (a damaged line, a bad stanza): it does not parse, so no MAC can be checked."""

    code = "age_header_invalid"


class AgeNoIdentityError(AgeError):
    """No X25519 stanza opens with our identities: the file was sealed for another recipient.

    A damaged X25519 stanza addressed to us looks exactly the same, by design of the format.
    """

    code = "age_no_matching_identity"


class AgeHeaderMacError(AgeError):
    """The file key was recovered but the header MAC does not match: the header was altered."""

    code = "age_header_mac_invalid"


class AgePayloadError(AgeError):
    """A payload chunk fails authentication, or breaks the STREAM final-chunk rules."""

    code = "age_payload_corrupt"


class AgeTrailingDataError(AgePayloadError):
    """Bytes follow the final chunk; the spec forbids them and accepting them would make files malleable."""

    code = "age_trailing_data"


class AgeTruncatedError(AgeError):
    """The input provably ends early: inside the header, the nonce, a tag, or after a non-final chunk."""

    code = "age_truncated"


class AgeArmorError(AgeError):
    """The ASCII armor is not the strict PEM form the spec requires."""

    code = "age_bad_armor"


class AgeUnsupportedRecipientError(AgeNoIdentityError):
    """Only scrypt, SSH or plugin stanzas (or recipients): Garrison opens X25519 only."""

    code = "age_unsupported_recipient"


class AgeKeyError(AgeError):
    """A recipient or identity string that does not parse (bad Bech32, wrong prefix, wrong length)."""

    code = "age_invalid_key"


# -- constants -------------------------------------------------------------------------------------

MAGIC = b"age-encryption.org/"
VERSION_LINE = b"age-encryption.org/v1\n"
CHUNK_SIZE = 64 * 1024
TAG_SIZE = 16
ENC_CHUNK_SIZE = CHUNK_SIZE + TAG_SIZE
NONCE_SIZE = 16
FILE_KEY_SIZE = 16
ARMOR_BEGIN = b"-----BEGIN AGE ENCRYPTED FILE-----"
ARMOR_END = b"-----END AGE ENCRYPTED FILE-----"
ARMOR_COLUMNS = 64
_ARMOR_BYTES_PER_LINE = 48
# Raw armored bytes read per step: a whole number of LF lines, about 48 KiB decoded.
_ARMOR_BLOCK = 65 * 1024
_WHITESPACE = b" \t\r\n"
# Bounds that keep a hostile header from growing memory: real headers are a few hundred bytes
# (post-quantum stanzas about 2 KiB each).
_MAX_HEADER_LINE = 16 * 1024
_MAX_HEADER = 1024 * 1024
_MAX_LEADING_WHITESPACE = 1024 * 1024
_X25519_LABEL = b"age-encryption.org/v1/X25519"
_ZERO_NONCE = bytes(12)
_B64_RAW = re.compile(rb"[A-Za-z0-9+/]*")
_VCHAR = re.compile(rb"[\x21-\x7e]+")

_SCRYPT_LABEL = b"age-encryption.org/v1/scrypt"
_SCRYPT_SALT = 16


@dataclass(frozen=True)
class Passphrase:
    """A passphrase as age's scrypt recipient (sealing) and identity (opening), as `age -p` makes them.

    log_n is the scrypt work factor for sealing (2^18: about a second and 256 MiB, age's default);
    max_log_n bounds what opening accepts, so a hostile file cannot ask for unbounded memory.
    """

    secret: bytes
    log_n: int = 18
    max_log_n: int = 22

    def __repr__(self) -> str:
        return "Passphrase(<hidden>)"

    def key(self, salt: bytes, log_n: int) -> bytes:
        return hashlib.scrypt(self.secret, salt=_SCRYPT_LABEL + salt, n=1 << log_n, r=8, p=1,
                              maxmem=(128 * 8 * (1 << log_n)) + (1 << 24), dklen=32)


IdentityLike = X25519PrivateKey | str | Passphrase
RecipientLike = X25519PublicKey | str | Passphrase


# -- Bech32 (BIP-173, without its 90-character limit, as the age spec says) ------------------------

_BECH32_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_BECH32_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def _bech32_polymod(values: Iterable[int]) -> int:
    chk = 1
    for value in values:
        top = chk >> 25
        chk = ((chk & 0x1FFFFFF) << 5) ^ value
        for i, gen in enumerate(_BECH32_GEN):
            if (top >> i) & 1:
                chk ^= gen
    return chk


def _bech32_hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convert_bits(data: Iterable[int], from_bits: int, to_bits: int, *, pad: bool) -> list[int]:
    acc = 0
    bits = 0
    out: list[int] = []
    max_value = (1 << to_bits) - 1
    for value in data:
        acc = ((acc << from_bits) | value) & ((1 << (from_bits + to_bits)) - 1)
        bits += from_bits
        while bits >= to_bits:
            bits -= to_bits
            out.append((acc >> bits) & max_value)
    if pad:
        if bits:
            out.append((acc << (to_bits - bits)) & max_value)
    elif bits >= from_bits or (acc << (to_bits - bits)) & max_value:
        raise ValueError("invalid padding in Bech32 data")
    return out


def bech32_encode(hrp: str, data: bytes) -> str:
    """Bech32 of `data` under the human-readable part `hrp` (lowercase, as age writes recipients)."""
    hrp = hrp.lower()
    five = _convert_bits(data, 8, 5, pad=True)
    polymod = _bech32_polymod([*_bech32_hrp_expand(hrp), *five, 0, 0, 0, 0, 0, 0]) ^ 1
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_BECH32_CHARSET[d] for d in five + checksum)


def bech32_decode(text: str) -> tuple[str, bytes]:
    """(hrp, data) of a Bech32 string; raises ValueError on mixed case, bad characters or checksum."""
    if text != text.lower() and text != text.upper():
        raise ValueError("mixed case")
    text = text.lower()
    sep = text.rfind("1")
    if sep < 1 or sep + 7 > len(text):
        raise ValueError("no separator or checksum")
    hrp = text[:sep]
    if any(not 33 <= ord(c) <= 126 for c in hrp):
        raise ValueError("invalid character in human-readable part")
    values = [_BECH32_CHARSET.find(c) for c in text[sep + 1:]]
    if -1 in values:
        raise ValueError("invalid character in data part")
    if _bech32_polymod(_bech32_hrp_expand(hrp) + values) != 1:
        raise ValueError("checksum mismatch")
    return hrp, bytes(_convert_bits(values[:-6], 5, 8, pad=False))


# -- keys ------------------------------------------------------------------------------------------

_RECIPIENT_HRP = "age"
_IDENTITY_HRP = "age-secret-key-"


def generate_identity() -> X25519PrivateKey:
    """A fresh X25519 identity (32 bytes from the OS CSPRNG, inside `cryptography`)."""
    return X25519PrivateKey.generate()


def encode_identity(identity: X25519PrivateKey) -> str:
    """`AGE-SECRET-KEY-1...`, the form age-keygen writes and `age -i` reads."""
    return bech32_encode(_IDENTITY_HRP, identity.private_bytes_raw()).upper()


def encode_recipient(public: X25519PublicKey) -> str:
    """`age1...`, the recipient anyone can seal to."""
    return bech32_encode(_RECIPIENT_HRP, public.public_bytes_raw())


def recipient_of(identity: X25519PrivateKey | str) -> str:
    """The `age1...` recipient of an identity (key object or `AGE-SECRET-KEY-1...` string)."""
    key = _as_identity(identity)
    if isinstance(key, Passphrase):
        raise AgeKeyError("a passphrase has no age1 recipient")
    return encode_recipient(key.public_key())


def parse_recipient(text: str) -> X25519PublicKey:
    """An `age1...` recipient; SSH and plugin/post-quantum recipients are refused by name."""
    text = text.strip()
    if text.startswith(("ssh-", "sk-ssh-", "ecdsa-")):
        raise AgeUnsupportedRecipientError(
            f"SSH recipient {text[:20]}... is not supported; use an X25519 recipient (age1...)")
    try:
        hrp, data = bech32_decode(text)
    except ValueError as exc:
        raise AgeKeyError(f"invalid age recipient {text[:24]!r}: {exc}") from None
    if hrp != _RECIPIENT_HRP:
        if hrp.startswith("age1"):
            raise AgeUnsupportedRecipientError(
                f"recipient type {hrp!r} (plugin or post-quantum) is not supported; use an X25519 recipient")
        raise AgeKeyError(f"invalid age recipient {text[:24]!r}: expected the 'age1' prefix")
    if len(data) != 32:
        raise AgeKeyError(f"invalid age recipient {text[:24]!r}: {len(data)} bytes instead of 32")
    return X25519PublicKey.from_public_bytes(data)


def parse_identity(text: str) -> X25519PrivateKey:
    """An `AGE-SECRET-KEY-1...` identity (upper case, as age-keygen writes it)."""
    text = text.strip()
    try:
        hrp, data = bech32_decode(text)
    except ValueError as exc:
        raise AgeKeyError(f"invalid age identity: {exc}") from None
    if hrp != _IDENTITY_HRP:
        if hrp.startswith("age-plugin-") or hrp.startswith(_IDENTITY_HRP):
            raise AgeUnsupportedRecipientError(f"identity type {hrp.upper()!r} is not supported; X25519 only")
        raise AgeKeyError("invalid age identity: expected the 'AGE-SECRET-KEY-1' prefix")
    if len(data) != 32:
        raise AgeKeyError(f"invalid age identity: {len(data)} bytes instead of 32")
    return X25519PrivateKey.from_private_bytes(data)


def parse_identity_file(text: str) -> list[X25519PrivateKey]:
    """Every identity in an age-keygen file (`#` comments and blank lines skipped)."""
    keys = [parse_identity(line) for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not keys:
        raise AgeKeyError("the identity file holds no AGE-SECRET-KEY-1 line")
    return keys


def _as_identity(identity: IdentityLike) -> X25519PrivateKey | Passphrase:
    if isinstance(identity, X25519PrivateKey | Passphrase):
        return identity
    if isinstance(identity, str):
        return parse_identity(identity)
    raise TypeError(f"an age identity must be an X25519PrivateKey or an AGE-SECRET-KEY string, not {type(identity)}")


def _as_recipient(recipient: RecipientLike) -> X25519PublicKey | Passphrase:
    if isinstance(recipient, X25519PublicKey | Passphrase):
        return recipient
    if isinstance(recipient, str):
        return parse_recipient(recipient)
    raise TypeError(f"an age recipient must be an X25519PublicKey or an age1 string, not {type(recipient)}")


# -- primitives ------------------------------------------------------------------------------------


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    # cryptography treats salt=None as the RFC's "HashLen zeros", which equals an empty salt.
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt or None, info=info).derive(ikm)


def _b64_raw(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _b64_raw_decode(text: bytes) -> bytes:
    """Unpadded base64 that must be canonical, as the spec requires of decoders."""
    if not _B64_RAW.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64")
    data = base64.b64decode(text + b"=" * (-len(text) % 4))
    if _b64_raw(data) != text:
        raise ValueError("non-canonical base64")
    return data


def _stream_nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


# -- reading helpers -------------------------------------------------------------------------------


class _Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes | None: ...


def _reader(src: _Readable) -> Callable[[int], bytes]:
    def read(n: int) -> bytes:
        return src.read(n) or b""
    return read


def _read_full(read: Callable[[int], bytes], n: int) -> bytes:
    """n bytes, or fewer only at end of file (pipes and sockets return short reads)."""
    data = read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    need = n - len(data)
    while need:
        more = read(need)
        if not more:
            break
        parts.append(more)
        need -= len(more)
    return b"".join(parts)


class _Source:
    """A byte stream with a small push-back buffer: lines for the header, exact reads for the payload."""

    def __init__(self, read: Callable[[int], bytes], initial: bytes = b"") -> None:
        self._read = read
        self._buf = initial

    def read(self, n: int) -> bytes:
        if not self._buf:
            return _read_full(self._read, n)
        head, self._buf = self._buf[:n], self._buf[n:]
        if len(head) == n:
            return head
        return head + _read_full(self._read, n - len(head))

    def peek(self, n: int) -> bytes:
        """Up to n bytes without consuming them (fewer only at end of file)."""
        if len(self._buf) < n:
            self._buf += _read_full(self._read, n - len(self._buf))
        return self._buf[:n]

    def readline(self, limit: int) -> bytes:
        """One line with its LF, or what is left (no LF) at end of file."""
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line, self._buf = self._buf[:end + 1], self._buf[end + 1:]
                return line
            if len(self._buf) > limit:
                raise AgeHeaderError(f"header line longer than {limit} bytes")
            more = self._read(4096)
            if not more:
                line, self._buf = self._buf, b""
                return line
            self._buf += more


# -- ASCII armor -----------------------------------------------------------------------------------


class _ArmorReader:
    """Decodes strict PEM armor as a stream of bytes, one block at a time.

    Strict means: the BEGIN line, lines of exactly 64 base64 columns, one final line of 4 to 64
    columns (the only one that may carry `=` padding, canonically), the END line, and nothing but
    whitespace around the block; LF or CRLF. End of input before the END line is truncation, which
    armor (unlike the binary format) lets us prove. Errors surface before the age layer is handed
    the bytes that follow them, so no chunk after a damaged line is ever released.
    """

    _BEGIN, _DATA, _TRAILER, _DONE = range(4)

    def __init__(self, read: Callable[[int], bytes], initial: bytes) -> None:
        self._read = read
        self._pending = initial
        self._eof = False
        self._state = self._BEGIN
        self._final_line_seen = False
        self._have_data = False
        self._out = b""
        self._pos = 0

    def read(self, n: int) -> bytes:
        while self._pos >= len(self._out):
            if self._state == self._DONE:
                return b""
            self._out, self._pos = self._decode_more(), 0
        piece = self._out[self._pos:self._pos + n]
        self._pos += len(piece)
        return piece

    def _decode_more(self) -> bytes:
        """Decode the next block of complete lines; b"" once the END line and the trailer are checked."""
        while True:
            raw = b"" if self._eof else self._read(_ARMOR_BLOCK)
            if not raw:
                self._eof = True
            text, self._pending = self._pending + raw, b""
            if self._state == self._TRAILER:
                if text.strip(_WHITESPACE):
                    raise AgeArmorError("data after the armor's END line")
                if self._eof:
                    self._state = self._DONE
                    return b""
                continue
            cut = text.rfind(b"\n") + 1
            lines, rest = text[:cut], text[cut:]
            out = self._lines(lines) if lines else b""
            if self._state == self._TRAILER:
                if rest.strip(_WHITESPACE):
                    raise AgeArmorError("data after the armor's END line")
                rest = b""
            elif len(rest) > ARMOR_COLUMNS + 2:
                raise AgeArmorError(f"armor line longer than {ARMOR_COLUMNS} columns")
            if self._eof:
                if rest:
                    # Only the END line may lack its line ending; anything else was cut short.
                    if self._state != self._DATA or rest.rstrip(b"\r") != ARMOR_END:
                        raise AgeTruncatedError("the armored file ends in the middle of a line (truncated)")
                    self._lines(ARMOR_END + b"\n")
                if self._state != self._TRAILER:
                    raise AgeTruncatedError("the armored file ends before its END line (truncated)")
                self._state = self._DONE
                return out
            self._pending = rest
            if out:
                return out

    def _lines(self, text: bytes) -> bytes:
        if b"\r" in text:
            text = text.replace(b"\r\n", b"\n")  # a stray CR stays and fails the checks below
        if self._state == self._DATA and not self._final_line_seen:
            count = len(text) // (ARMOR_COLUMNS + 1)
            # Fast path: a block of full 64-column lines (all but the last block of a file).
            if (count and len(text) == count * (ARMOR_COLUMNS + 1) and text.count(b"\n") == count
                    and text[ARMOR_COLUMNS::ARMOR_COLUMNS + 1] == b"\n" * count):
                joined = text.replace(b"\n", b"")
                if b"=" not in joined:
                    try:
                        decoded = binascii.a2b_base64(joined, strict_mode=True)
                    except binascii.Error:
                        raise AgeArmorError("armor line holds characters outside base64") from None
                    self._have_data = True
                    return decoded
        out: list[bytes] = []
        for line in text.split(b"\n")[:-1]:
            if self._state == self._BEGIN:
                if line != ARMOR_BEGIN:
                    raise AgeArmorError("the armor's BEGIN line is malformed")
                self._state = self._DATA
            elif self._state == self._DATA:
                if line == ARMOR_END:
                    if not self._have_data:
                        raise AgeArmorError("the armor holds no data")
                    self._state = self._TRAILER
                    continue
                if self._final_line_seen:
                    raise AgeArmorError("armor data continues after its short final line")
                out.append(self._data_line(line))
            elif line.strip(_WHITESPACE):  # spaces, tabs and stray CRs may follow the block, as age allows
                raise AgeArmorError("data after the armor's END line")
        return b"".join(out)

    def _data_line(self, line: bytes) -> bytes:
        if len(line) > ARMOR_COLUMNS:
            raise AgeArmorError(f"armor line longer than {ARMOR_COLUMNS} columns")
        final = len(line) < ARMOR_COLUMNS or line.endswith(b"=")
        if final and (not line or len(line) % 4):
            raise AgeArmorError("armor line of a length that is not whole base64 groups")
        try:
            data = binascii.a2b_base64(line, strict_mode=True)
        except binascii.Error:
            raise AgeArmorError("armor line holds characters outside base64 or misplaced padding") from None
        if final:
            if base64.b64encode(data) != line:
                raise AgeArmorError("armor's final line is not canonical base64")
            self._final_line_seen = True
        self._have_data = True
        return data


class _ArmorWriter:
    """Writes strict PEM armor: 64-column lines, padding only on the last, a final LF."""

    def __init__(self, dst: BinaryIO) -> None:
        self._dst = dst
        self._buf = bytearray()
        dst.write(ARMOR_BEGIN + b"\n")

    def write(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= 1024 * _ARMOR_BYTES_PER_LINE:
            whole = len(self._buf) - len(self._buf) % _ARMOR_BYTES_PER_LINE
            self._emit(bytes(self._buf[:whole]))
            del self._buf[:whole]

    def close(self) -> None:
        if self._buf:
            self._emit(bytes(self._buf))
            self._buf.clear()
        self._dst.write(ARMOR_END + b"\n")

    def _emit(self, data: bytes) -> None:
        encoded = binascii.b2a_base64(data, newline=False)
        width = ARMOR_COLUMNS
        full = len(encoded) // width
        # Interleave LFs with 64 strided copies (C loops) rather than one slice per line:
        # about three times faster, and armor is where the time goes.
        out = bytearray(b"\n") * (full * (width + 1))
        for column in range(width):
            out[column::width + 1] = encoded[column:full * width:width]
        tail = encoded[full * width:]
        self._dst.write(out + tail + b"\n" if tail else out)


def _open_source(src: _Readable) -> _Source:
    """Binary or armored, by the first bytes; armor may be preceded by whitespace."""
    read = _reader(src)
    head = _read_full(read, 64)
    if not head:
        raise AgeEmptyError("the file is empty (0 bytes): nothing was sealed into it")
    if head.startswith(MAGIC) or (len(head) < len(MAGIC) and MAGIC.startswith(head)):
        return _Source(read, head)
    skipped = 0
    stripped = head.lstrip(_WHITESPACE)
    while not stripped:
        skipped += len(head)
        if skipped > _MAX_LEADING_WHITESPACE:
            raise AgeNotAgeError("not an age file: only whitespace")
        head = read(4096)
        if not head:
            raise AgeNotAgeError("not an age file: only whitespace")
        stripped = head.lstrip(_WHITESPACE)
    if len(stripped) < len(ARMOR_BEGIN):
        stripped += _read_full(read, len(ARMOR_BEGIN))
    if stripped.startswith(ARMOR_BEGIN):
        return _Source(_ArmorReader(read, stripped).read)
    if len(stripped) < len(ARMOR_BEGIN) and ARMOR_BEGIN.startswith(stripped):
        raise AgeTruncatedError("the armored file ends inside its BEGIN line (truncated)")
    if stripped.startswith(b"-----BEGIN "):
        raise AgeNotAgeError("not an age file: a PEM block of another kind")
    raise AgeNotAgeError("not an age file: it starts with neither 'age-encryption.org/' nor the age armor")


# -- header ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stanza:
    args: tuple[bytes, ...]
    body: bytes

    @property
    def kind(self) -> str:
        return self.args[0].decode("ascii")


def _header_line(source: _Source, size: int) -> bytes:
    line = source.readline(_MAX_HEADER_LINE)
    if not line.endswith(b"\n"):
        raise AgeTruncatedError("the file ends inside its header (truncated)")
    if size + len(line) > _MAX_HEADER:
        raise AgeHeaderError(f"header larger than {_MAX_HEADER} bytes")
    return line


def _parse_header(source: _Source) -> tuple[list[_Stanza], bytes, bytes]:
    """(stanzas, the MAC, the bytes the MAC covers)."""
    head = source.peek(len(MAGIC))
    if head != MAGIC:
        if MAGIC.startswith(head):
            raise AgeTruncatedError("the file ends inside its version line (truncated)")
        raise AgeNotAgeError("not an age file: the content does not start with 'age-encryption.org/'")
    first = source.readline(256)
    if not first.endswith(b"\n"):
        raise AgeTruncatedError("the file ends inside its version line (truncated)")
    if first != VERSION_LINE:
        version = first[len(MAGIC):-1].decode("ascii", "replace")[:40]
        raise AgeVersionError(f"age format version {version!r} is not supported (only v1)")
    covered = [first]
    size = len(first)
    stanzas: list[_Stanza] = []
    while True:
        line = _header_line(source, size)
        covered.append(line)
        size += len(line)
        if line.startswith(b"--- "):
            try:
                mac = _b64_raw_decode(line[4:-1])
            except ValueError:
                raise AgeHeaderError("the header's MAC line is malformed") from None
            if len(mac) != 32:
                raise AgeHeaderError("the header's MAC line is malformed")
            if not stanzas:
                raise AgeHeaderError("the header has no recipient stanza")
            covered[-1] = b"---"
            return stanzas, mac, b"".join(covered)
        if not line.startswith(b"-> "):
            raise AgeHeaderError(f"unexpected header line {len(covered)} (not a stanza nor the MAC)")
        args = tuple(line[3:-1].split(b" "))
        if not all(_VCHAR.fullmatch(a) for a in args):
            raise AgeHeaderError(f"malformed stanza arguments on header line {len(covered)}")
        body_lines: list[bytes] = []
        while True:
            body_line = _header_line(source, size)
            covered.append(body_line)
            size += len(body_line)
            content = body_line[:-1]
            if len(content) > 64 or not _B64_RAW.fullmatch(content):
                raise AgeHeaderError(f"malformed stanza body on header line {len(covered)}")
            body_lines.append(content)
            if len(content) < 64:
                break
        try:
            body = _b64_raw_decode(b"".join(body_lines))
        except ValueError:
            raise AgeHeaderError(f"stanza body ending on header line {len(covered)} is not canonical base64") from None
        stanzas.append(_Stanza(args, body))


def _unwrap_x25519(stanza: _Stanza, identities: Sequence[X25519PrivateKey]) -> bytes | None:
    if len(stanza.args) != 2 or len(stanza.body) != 32:
        raise AgeHeaderError("malformed X25519 stanza (argument count or body length)")
    try:
        share = _b64_raw_decode(stanza.args[1])
    except ValueError:
        raise AgeHeaderError("malformed X25519 stanza (ephemeral share is not canonical base64)") from None
    if len(share) != 32:
        raise AgeHeaderError("malformed X25519 stanza (ephemeral share is not 32 bytes)")
    peer = X25519PublicKey.from_public_bytes(share)
    for identity in identities:
        try:
            shared = identity.exchange(peer)
        except ValueError:  # an all-zero shared secret: a low-order share, which the spec says to refuse
            raise AgeHeaderError("X25519 stanza with a low-order ephemeral share") from None
        wrap_key = _hkdf(shared, share + identity.public_key().public_bytes_raw(), _X25519_LABEL)
        try:
            return ChaCha20Poly1305(wrap_key).decrypt(_ZERO_NONCE, stanza.body, None)
        except InvalidTag:
            continue
    return None


def _unwrap_scrypt(stanza: _Stanza, passphrases: Sequence[Passphrase]) -> bytes | None:
    if len(stanza.args) != 3 or len(stanza.body) != 32:
        raise AgeHeaderError("malformed scrypt stanza (argument count or body length)")
    try:
        salt = _b64_raw_decode(stanza.args[1])
    except ValueError:
        raise AgeHeaderError("malformed scrypt stanza (salt is not canonical base64)") from None
    work = stanza.args[2]
    if len(salt) != _SCRYPT_SALT or not work.isdigit() or (work != b"0" and work.startswith(b"0")):
        raise AgeHeaderError("malformed scrypt stanza (salt length or work factor)")
    log_n = int(work)
    for passphrase in passphrases:
        if not 1 <= log_n <= passphrase.max_log_n:
            raise AgeHeaderError(f"the scrypt work factor 2^{log_n} is above the accepted 2^{passphrase.max_log_n}")
        with contextlib.suppress(InvalidTag):
            return ChaCha20Poly1305(passphrase.key(salt, log_n)).decrypt(_ZERO_NONCE, stanza.body, None)
    return None


def _open_header(source: _Source, identities: Sequence[X25519PrivateKey | Passphrase]) -> bytes:
    """The file key, once a stanza opened and the header MAC checked."""
    stanzas, mac, covered = _parse_header(source)
    kinds = [s.kind for s in stanzas]
    if "scrypt" in kinds:
        if len(stanzas) > 1:
            raise AgeHeaderError("an scrypt stanza must be the only stanza of a header")
        passphrases = [i for i in identities if isinstance(i, Passphrase)]
        if not passphrases:
            raise AgeUnsupportedRecipientError(
                "the file is passphrase-encrypted (scrypt); Garrison opens files sealed to its X25519 recipient only")
        scrypt_key = _unwrap_scrypt(stanzas[0], passphrases)
        if scrypt_key is None:
            raise AgeNoIdentityError("the passphrase does not open this file")
        return _check_mac(scrypt_key, mac, covered)
    x25519 = [s for s in stanzas if s.kind == "X25519"]
    if not x25519:
        raise AgeUnsupportedRecipientError(
            f"no X25519 stanza in the header (found: {', '.join(sorted(set(kinds)))}); "
            "Garrison opens files sealed to its X25519 recipient only")
    file_key = None
    for stanza in x25519:
        file_key = _unwrap_x25519(stanza, [i for i in identities if isinstance(i, X25519PrivateKey)])
        if file_key is not None:
            break
    if file_key is None or len(file_key) != FILE_KEY_SIZE:
        raise AgeNoIdentityError(
            f"none of the file's {len(x25519)} X25519 recipient(s) is this appliance: "
            "it was sealed for another recipient (or its stanza was damaged)")
    return _check_mac(file_key, mac, covered)


def _check_mac(file_key: bytes, mac: bytes, covered: bytes) -> bytes:
    if len(file_key) != FILE_KEY_SIZE:
        raise AgeHeaderError("the file key is not 16 bytes")
    expected = hmac.new(_hkdf(file_key, b"", b"header"), covered, "sha256").digest()
    if not hmac.compare_digest(expected, mac):
        raise AgeHeaderMacError("the header MAC does not match: the header was altered or damaged")
    return file_key


def _make_header(file_key: bytes, recipients: Sequence[X25519PublicKey | Passphrase]) -> bytes:
    lines = [VERSION_LINE]
    if any(isinstance(r, Passphrase) for r in recipients) and len(recipients) > 1:
        raise AgeKeyError("a passphrase must be the only recipient of a file (age's rule for scrypt)")
    for recipient in recipients:
        if isinstance(recipient, Passphrase):
            salt = os.urandom(_SCRYPT_SALT)
            body = ChaCha20Poly1305(recipient.key(salt, recipient.log_n)).encrypt(_ZERO_NONCE, file_key, None)
            lines.append(b"-> scrypt " + _b64_raw(salt) + b" " + str(recipient.log_n).encode() + b"\n")
            lines.append(_b64_raw(body) + b"\n")
            continue
        ephemeral = X25519PrivateKey.generate()
        share = ephemeral.public_key().public_bytes_raw()
        wrap_key = _hkdf(ephemeral.exchange(recipient), share + recipient.public_bytes_raw(), _X25519_LABEL)
        body = ChaCha20Poly1305(wrap_key).encrypt(_ZERO_NONCE, file_key, None)
        lines.append(b"-> X25519 " + _b64_raw(share) + b"\n")
        encoded = _b64_raw(body)  # 43 columns: a single, short, final line
        lines.append(encoded + b"\n")
    covered = b"".join(lines) + b"---"
    mac = hmac.new(_hkdf(file_key, b"", b"header"), covered, "sha256").digest()
    return covered + b" " + _b64_raw(mac) + b"\n"


# -- payload ---------------------------------------------------------------------------------------


def _payload(source: _Source, aead: ChaCha20Poly1305) -> Iterator[bytes]:
    """Yield each chunk once authenticated; one chunk of look-ahead tells the final one."""
    counter = 0
    current = source.read(ENC_CHUNK_SIZE)
    while True:
        if len(current) == ENC_CHUNK_SIZE:
            following = source.read(ENC_CHUNK_SIZE)
            last = not following
        else:
            following, last = b"", True
        if len(current) < TAG_SIZE:
            raise AgeTruncatedError(
                "the payload ends early: " + ("no chunk after the nonce" if not current else
                                              f"chunk {counter} is shorter than its authentication tag")
                + " (truncated)")
        try:
            plain: bytes | None = aead.decrypt(_stream_nonce(counter, last), current, None)
        except InvalidTag:
            plain = None
        if plain is None:
            # The chunk may still be authentic with the other final flag (a missing final chunk, or
            # data after the final one): its plaintext is released, as age does, then the error.
            authentic, error = _diagnose(aead, counter, current, last)
            if authentic:
                yield authentic
            raise error
        if last:
            if not plain and counter:
                raise AgePayloadError("the payload ends with an empty final chunk, which the format forbids")
            if plain:
                yield plain
            return
        yield plain
        counter += 1
        current = following


def _diagnose(aead: ChaCha20Poly1305, counter: int, chunk: bytes, last: bool) -> tuple[bytes, AgeError]:
    """Name a failed chunk precisely where the format allows: (its plaintext if it authenticates with
    the other final flag, else b""; the error to raise after it)."""
    try:
        plain = aead.decrypt(_stream_nonce(counter, not last), chunk, None)
    except InvalidTag:
        if last:
            return b"", AgePayloadError(
                f"the payload's final chunk ({counter}) fails authentication: the file was damaged "
                "(or cut inside that chunk, which the format cannot tell apart)")
        return b"", AgePayloadError(f"payload chunk {counter} fails authentication: the file was damaged")
    if last:
        # Only a full chunk can be a non-final one: a short one that authenticates as non-final is not
        # payload (age releases nothing of it either).
        released = plain if len(chunk) == ENC_CHUNK_SIZE else b""
        return released, AgeTruncatedError(f"the payload ends after chunk {counter}, which is not its final chunk "
                                           "(truncated)")
    return plain, AgeTrailingDataError(f"data follows the payload's final chunk ({counter})")


# -- public API ------------------------------------------------------------------------------------


def encrypt_stream(src: _Readable, dst: BinaryIO, recipients: Sequence[RecipientLike], *,
                   armor: bool = False) -> int:
    """Seal everything `src` yields to `dst` for `recipients` (`age1...` strings or public keys).

    Reads and writes one 64 KiB chunk at a time (plus one chunk of look-ahead, to mark the final
    chunk), so memory does not depend on the size of the input. Returns the plaintext length.
    `dst` receives a partial file if this raises; callers write to a temporary and rename.
    """
    keys = [_as_recipient(r) for r in recipients]
    if not keys:
        raise AgeKeyError("at least one recipient is required")
    read = _reader(src)
    file_key = os.urandom(FILE_KEY_SIZE)
    armored = _ArmorWriter(dst) if armor else None
    write = armored.write if armored else dst.write
    write(_make_header(file_key, keys))
    nonce = os.urandom(NONCE_SIZE)
    write(nonce)
    aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
    counter = total = 0
    current = _read_full(read, CHUNK_SIZE)
    while True:
        if len(current) == CHUNK_SIZE:
            following = _read_full(read, CHUNK_SIZE)
            last = not following
        else:
            following, last = b"", True
        write(aead.encrypt(_stream_nonce(counter, last), current, None))
        total += len(current)
        if last:
            break
        counter += 1
        current = following
    if armored:
        armored.close()
    return total


def decrypt_stream(src: _Readable, identities: Sequence[IdentityLike]) -> Iterator[bytes]:
    """Open an age file (binary or armored) and iterate its plaintext, chunk by authenticated chunk.

    The header is read and checked now, so a wrong key or a damaged header raises here, before any
    output exists. The returned iterator raises `AgeError` before yielding a chunk that fails
    authentication: a consumer that stops at the first exception never holds unauthenticated
    plaintext. A chunk that authenticates but breaks the final-chunk rules (the file ends without a
    final chunk, or data follows it) is yielded before the error, as age's own reader and the C2SP
    test kit do: callers that need the whole file treat any exception as "nothing" (ingestion does).
    """
    keys = [_as_identity(i) for i in identities]
    if not keys:
        raise AgeKeyError("at least one identity is required")
    source = _open_source(src)
    file_key = _open_header(source, keys)
    nonce = source.read(NONCE_SIZE)
    if len(nonce) < NONCE_SIZE:
        raise AgeTruncatedError("the file ends inside the payload nonce (truncated)")
    return _payload(source, ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload")))


class AgeReader(io.RawIOBase):
    """A read-only file object over `decrypt_stream`, for consumers that want `read()`/lines.

    Wrap it in `io.BufferedReader` or `io.TextIOWrapper` (see `open_decrypt`). Authentication errors
    propagate from `read`, at the chunk that fails.
    """

    def __init__(self, chunks: Iterator[bytes]) -> None:
        super().__init__()
        self._chunks = chunks
        self._current = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        while self._pos >= len(self._current):
            nxt = next(self._chunks, None)
            if nxt is None:
                return 0
            self._current, self._pos = nxt, 0
        view = memoryview(buffer).cast("B")
        n = min(len(view), len(self._current) - self._pos)
        view[:n] = self._current[self._pos:self._pos + n]
        self._pos += n
        return n


def open_decrypt(src: _Readable, identities: Sequence[IdentityLike]) -> io.BufferedReader:
    """`decrypt_stream` as a buffered binary file (header checked now, as there)."""
    return io.BufferedReader(AgeReader(decrypt_stream(src, identities)), buffer_size=CHUNK_SIZE)


def encrypt_bytes(data: bytes, recipients: Sequence[RecipientLike], *, armor: bool = False) -> bytes:
    """Seal a small in-memory value (tests, tokens); files go through `encrypt_stream`."""
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(data), out, recipients, armor=armor)
    return out.getvalue()


def decrypt_bytes(data: bytes, identities: Sequence[IdentityLike]) -> bytes:
    """Open a small in-memory age file; files go through `decrypt_stream`."""
    return b"".join(decrypt_stream(io.BytesIO(data), identities))
