"""The table of built-in PII detectors and the validators behind them.

Every detector is one row of `DETECTORS`: an entity type, a compiled pattern that finds
*candidates*, an optional validator that turns a candidate into a finding (check digits,
length tables, date plausibility), a priority for overlaps, and cheap substring hints
that let the redactor skip a pattern whose text cannot contain a match. Adding a format
means adding a row, not another branch in the redactor.

Why regex + validator and not regex alone: a pattern can only say "16 digits"; the
precision the appliance needs (order numbers, timestamps and versions are everywhere in
customer data) comes from the checks a pattern cannot express: Luhn, ISO 13616 mod 97,
ISO 7064 MOD 11-2, calling-code tables, the SSA's never-issued ranges.

Boundaries are ASCII on purpose: Chinese text writes numbers right next to Han characters
("手机号+8613800138000"), and a Unicode word boundary would hide them.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import ipaddress
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

__all__ = [
    "DETECTORS",
    "ENTITY_TYPES",
    "Detector",
    "card_ok",
    "iban_ok",
    "ipv4_ok",
    "ipv6_ok",
    "luhn_ok",
    "phone_ok",
    "prc_id_ok",
    "quoted_secret_ok",
    "secret_value_ok",
    "ssn_ok",
]

#: The built-in entity types, in the order reports list them.
ENTITY_TYPES: tuple[str, ...] = (
    "email", "phone", "payment_card", "iban", "ipv4", "ipv6", "us_ssn", "prc_id", "secret",
)


@dataclass(frozen=True)
class Detector:
    """One row of the table.

    `value_groups` names regex groups that hold the sensitive part (a password after
    `password=`): the first that took part in the match is the span, else the whole match.
    `trim` lists characters at which a candidate the validator rejects is cut back and
    tried again, longest first (a phone number followed by " 12:30" is still a phone).
    `hints` are lower-case substrings one of which must occur in the lower-cased text for
    the pattern to be worth running; empty means always run.
    `requires` is a cheap pattern that must occur somewhere for the row to run; rows share
    the object (every number needs a digit), and the redactor searches each one once.
    `finder`, for the one row whose left edge a forward regex finds slowly (e-mail: every
    word is a possible local part), yields candidate spans itself from `pattern` as anchor.
    """

    entity: str
    name: str
    pattern: re.Pattern[str]
    validator: Callable[[str], bool] | None = None
    priority: int = 0
    trim: str = ""
    hints: tuple[str, ...] = ()
    value_groups: tuple[str, ...] = field(default=())
    finder: Callable[[str], Iterator[tuple[int, int]]] | None = None
    requires: re.Pattern[str] | None = None


# --------------------------------------------------------------------------- boundaries
# A pattern begins with a one-character class and checks what precedes it *after* that
# character, so CPython's matcher can skip ahead on the first character (a leading
# look-behind disables that optimisation and costs ~5x on long text).

_W = "[A-Za-z0-9_]"


def _start(first: str, *not_before: str) -> str:
    """`first` (a single-character class) not preceded by any of `not_before` (fixed-width)."""
    return first + "".join(f"(?<!{nb}{first})" for nb in not_before)


# Numbers: not glued to a word, and not the tail/head of a dotted, dashed, slashed or
# colon-separated number (dates, versions, times, order numbers).
_NUM_END = rf"(?!{_W})(?![./:-]\d)"


# --------------------------------------------------------------------------- validators

# Luhn's doubled digit (2d, less 9 above 9), as a str.translate table: the check then runs in C.
_LUHN_DOUBLE = str.maketrans("0123456789", "0246813579")


_LUHN_DOUBLE_BYTES = bytes.maketrans(b"0123456789", b"0246813579")


def luhn_ok(digits: str) -> bool:
    """The Luhn mod-10 check over a string of ASCII digits."""
    if digits.isascii() and digits.isdigit():
        # Summing bytes runs in C: each digit counts its code, 48 too many.
        rev = digits.encode()[::-1]
        return (sum(rev[::2]) + sum(rev[1::2].translate(_LUHN_DOUBLE_BYTES)) - 48 * len(rev)) % 10 == 0
    total = 0  # anything else keeps the arithmetic it always had
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i & 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


_ANY = tuple(range(12, 20))
# (lowest prefix, highest prefix, allowed lengths): issuer ranges of the card networks
# whose numbers appear in practice. Luhn alone passes one random number in ten; the IIN
# and length tables cut that by another order of magnitude.
_CARD_RANGES: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("4", "4", (13, 16, 19)),                      # Visa
    ("51", "55", (16,)),                           # Mastercard
    ("2221", "2720", (16,)),                       # Mastercard 2-series
    ("34", "34", (15,)), ("37", "37", (15,)),     # American Express
    ("300", "305", (14, 16, 17, 18, 19)),          # Diners Club
    ("36", "36", (14, 16, 17, 18, 19)),
    ("38", "39", (14, 16, 17, 18, 19)),
    ("3528", "3589", (16, 17, 18, 19)),            # JCB
    ("6011", "6011", (16, 17, 18, 19)),            # Discover
    ("644", "649", (16, 17, 18, 19)),
    ("65", "65", (16, 17, 18, 19)),
    ("62", "62", (16, 17, 18, 19)),                # UnionPay
    ("2200", "2204", (16, 17, 18, 19)),            # Mir
    ("50", "50", _ANY),                            # Maestro
    ("56", "69", _ANY),
)


def _card_prefixes() -> tuple[tuple[int, dict[str, frozenset[int]]], ...]:
    """_CARD_RANGES as lookups: per prefix width, each prefix in a range -> the lengths issued there."""
    table: dict[int, dict[str, set[int]]] = {}
    for lo, hi, lengths in _CARD_RANGES:
        assert len(lo) == len(hi), "a range's bounds have one width"
        for prefix in range(int(lo), int(hi) + 1):
            table.setdefault(len(lo), {}).setdefault(str(prefix).zfill(len(lo)), set()).update(lengths)
    return tuple((width, {p: frozenset(n) for p, n in prefixes.items()}) for width, prefixes in sorted(table.items()))


_CARD_PREFIXES = _card_prefixes()


def card_ok(candidate: str) -> bool:
    """A payment card number: known issuer range, a length that range issues, Luhn."""
    digits = candidate.replace(" ", "").replace("-", "")
    n = len(digits)
    if not 12 <= n <= 19 or not (digits.isascii() and digits.isdigit()):
        return False
    for width, prefixes in _CARD_PREFIXES:
        lengths = prefixes.get(digits[:width])
        if lengths is not None and n in lengths:
            return luhn_ok(digits)
    return False


# ISO 13616 registry (SWIFT, release 2024): country -> total IBAN length.
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21,
    "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28,
    "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22,
    "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}


def iban_ok(candidate: str) -> bool:
    """ISO 13616: registered country, that country's length, check digits 02..98, mod 97 == 1."""
    s = candidate.replace(" ", "").upper()
    if IBAN_LENGTHS.get(s[:2]) != len(s) or not (s.isascii() and s.isalnum()) or not s[2:4].isdigit():
        return False
    if not 2 <= int(s[2:4]) <= 98:
        return False
    rearranged = s[4:] + s[:4]
    # int(ch, 36) maps 0-9 to 0-9 and A-Z to 10-35, ISO 13616's letter substitution.
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


# ITU-T E.164 country calling codes in use (prefix-free, so a number has at most one).
_CC: frozenset[str] = frozenset(
    ["1", "7"]
    + [
        "20", "27", "30", "31", "32", "33", "34", "36", "39", "40", "41", "43", "44", "45", "46", "47", "48", "49",
        "51", "52", "53", "54", "55", "56", "57", "58", "60", "61", "62", "63", "64", "65", "66", "81", "82", "84",
        "86", "90", "91", "92", "93", "94", "95", "98",
    ]
    + [
        "211", "212", "213", "216", "218", "290", "291", "297", "298", "299", "350", "351", "352", "353", "354",
        "355", "356", "357", "358", "359", "370", "371", "372", "373", "374", "375", "376", "377", "378", "380",
        "381", "382", "383", "385", "386", "387", "389", "420", "421", "423", "500", "501", "502", "503", "504",
        "505", "506", "507", "508", "509", "590", "591", "592", "593", "594", "595", "596", "597", "598", "599",
        "670", "672", "673", "674", "675", "676", "677", "678", "679", "680", "681", "682", "683", "685", "686",
        "687", "688", "689", "690", "691", "692", "850", "852", "853", "855", "856", "880", "886", "960", "961",
        "962", "963", "964", "965", "966", "967", "968", "970", "971", "972", "973", "974", "975", "976", "977",
        "992", "993", "994", "995", "996", "998",
    ]
    + [str(c) for c in range(220, 259)] + [str(c) for c in range(260, 270)]
)
# National significant number lengths (min, max) where the numbering plan is fixed enough
# to say; other codes get a generous default. This is what rejects "+2024-05-06".
_NSN_LENGTHS: dict[str, tuple[int, int]] = {
    "1": (10, 10), "7": (10, 10), "20": (8, 10), "27": (9, 9), "30": (10, 10), "31": (9, 9), "32": (8, 9),
    "33": (9, 9), "34": (9, 9), "36": (8, 9), "39": (6, 11), "40": (9, 9), "41": (9, 9), "43": (4, 13),
    "44": (9, 10), "45": (8, 8), "46": (7, 13), "47": (8, 8), "48": (9, 9), "49": (6, 13), "51": (8, 9),
    "52": (10, 10), "54": (10, 11), "55": (10, 11), "56": (9, 9), "57": (8, 10), "60": (8, 10), "61": (9, 9),
    "62": (8, 12), "63": (8, 10), "64": (8, 10), "65": (8, 8), "66": (8, 9), "81": (9, 10), "82": (8, 10),
    "84": (9, 10), "86": (10, 11), "90": (10, 10), "91": (10, 10), "92": (9, 10), "351": (9, 9),
    "353": (7, 9), "358": (5, 12), "380": (9, 9), "420": (9, 9), "852": (8, 8), "853": (8, 8),
    "886": (8, 9), "966": (9, 9), "971": (8, 9), "972": (8, 9),
}
_NSN_DEFAULT = (7, 12)


_NOT_ASCII_DIGITS = re.compile(r"[^0-9]+")
_ASCII_NON_DIGITS = bytes(c for c in range(128) if not 48 <= c <= 57)  # bytes.translate deletes these


def phone_ok(candidate: str) -> bool:
    """An international number: assigned calling code, a national length that code allows.

    For +1 (NANP) the area code and exchange must also start with 2-9, which is what
    separates a real number from a run of digits that merely starts with 1.
    """
    body = candidate.replace("(0)", "", 1) if "(0)" in candidate else candidate
    digits = (body.encode().translate(None, _ASCII_NON_DIGITS).decode() if body.isascii()
              else _NOT_ASCII_DIGITS.sub("", body))
    for k in (1, 2, 3):
        cc = digits[:k]
        if cc in _CC:
            nsn = digits[k:]
            lo, hi = _NSN_LENGTHS.get(cc, _NSN_DEFAULT)
            if not lo <= len(nsn) <= min(hi, 15 - k):
                return False
            return not (cc == "1" and (nsn[0] in "01" or nsn[3] in "01"))
    return False


_PRC_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_PRC_CHECK = "10X98765432"
# Province-level divisions (GB/T 2260 first two digits) plus 71/81/82/83 (Taiwan, Hong
# Kong, Macau, and Taiwan residents' permits).
_PRC_REGIONS = frozenset(
    [
        "11", "12", "13", "14", "15", "21", "22", "23", "31", "32", "33", "34", "35", "36", "37", "41", "42", "43",
        "44", "45", "46", "50", "51", "52", "53", "54", "61", "62", "63", "64", "65", "71", "81", "82", "83",
    ]
)


def prc_id_ok(candidate: str) -> bool:
    """GB 11643: province code, a real birth date 1900..today, ISO 7064 MOD 11-2 check character."""
    s = candidate.upper()
    if len(s) != 18 or not s.isascii() or not s[:17].isdigit() or s[:2] not in _PRC_REGIONS:
        return False
    try:
        born = _dt.date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    if not _dt.date(1900, 1, 1) <= born <= _dt.date.today():
        return False
    total = sum(int(c) * w for c, w in zip(s[:17], _PRC_WEIGHTS, strict=True))
    return _PRC_CHECK[total % 11] == s[17]


# Numbers the SSA has published as never valid (advertising, the Woolworth wallet card).
_SSN_NEVER = frozenset({"078051120", "219099999"})


def ssn_ok(candidate: str) -> bool:
    """SSA rules: area not 000, 666 or 9xx; group not 00; serial not 0000."""
    digits = candidate.replace("-", "").replace(" ", "")
    if len(digits) != 9 or not (digits.isascii() and digits.isdigit()):
        return False
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return (area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"
            and digits not in _SSN_NEVER)


def ipv4_ok(candidate: str) -> bool:
    """Dotted-quad IPv4 (the pattern already refuses leading zeros and octets over 255)."""
    try:
        ipaddress.IPv4Address(candidate)
    except ValueError:
        return False
    return True


def ipv6_ok(candidate: str) -> bool:
    """A valid IPv6 text form that looks like an address rather than code or a clock.

    `std::vector`-like tokens made of hex letters ("cafe::beef", "add::dec") parse as
    IPv6, so an address must contain a decimal digit and at least two non-empty groups;
    this also leaves out "::1" and "::", which say nothing about anyone.
    """
    addr = candidate.split("%", 1)[0]
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    groups = [g for g in addr.split(":") if g]
    return len(groups) >= 2 and any(ch.isdigit() for ch in addr)


def _mixed(s: str) -> bool:
    """Upper, lower and digit: random tokens have all three; prose and identifiers rarely do."""
    return any(c.isdigit() for c in s) and any(c.isupper() for c in s) and any(c.islower() for c in s)


def _has_digit(s: str) -> bool:
    return any(c.isdigit() for c in s)


def _not_a_word(s: str) -> bool:
    """Anything but a plain lower-case word ("Bearer authenticationrequired" is prose)."""
    return not (s.isalpha() and s.islower())


def _jwt_ok(candidate: str) -> bool:
    """The first segment must decode to a JSON object with "alg" (RFC 7515 header)."""
    head = candidate.split(".", 1)[0]
    if len(head) > 2048:  # real headers are a few dozen characters; this bounds the parse
        return False
    try:
        obj = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(obj, dict) and "alg" in obj


_PLACEHOLDERS = frozenset({
    "null", "none", "nil", "true", "false", "undefined", "redacted", "changeme", "password", "secret",
    "example", "xxxxxx", "your_password", "your-password", "your_api_key", "your-api-key", "<redacted>",
})


_TEMPLATE_START = ("$", "<", "%", "{", "[", "*")
_EXPRESSION = re.compile(r"[A-Za-z_$][\w$]*(?:\.[A-Za-z_$][\w$]*)+(?:\(.*)?", re.ASCII)
# One part of a snake_case / kebab-case / camelCase / PascalCase / UPPER name. Measured on
# 54k identifiers from installed packages, 97% of names fit; of random 9-20 letter
# strings, 8% do (those are the passwords this costs).
_NAME_PART = re.compile(r"[A-Z]?[a-z]*(?:[A-Z][a-z]+)*|[A-Z]+|[A-Z]+(?:[A-Z][a-z]+)+", re.ASCII)
_NAME_SPLIT = re.compile(r"[_-]+")


def _identifier_like(v: str) -> bool:
    parts = [p for p in _NAME_SPLIT.split(v) if p]
    return bool(parts) and all(_NAME_PART.fullmatch(p) for p in parts)


def _plausible_secret(v: str) -> bool:
    """Not a placeholder, template, mask, code expression or identifier.

    Configuration and source code are full of `token = tokenizer.eos_token`,
    `password = args.password` and `api_key: API_KEY_NAME`: a name of a secret, not one.
    Words are names too, so "password: required" stays, and so, the price of that rule,
    does "password=sunshine".
    """
    return not (v.lower() in _PLACEHOLDERS or len(set(v)) < 3 or v.startswith(_TEMPLATE_START)
                or _EXPRESSION.fullmatch(v) or _identifier_like(v))


def secret_value_ok(value: str) -> bool:
    """An unquoted value after `password=` or `api_key:`."""
    return _plausible_secret(value)


def _url_password_ok(value: str) -> bool:
    """The password in scheme://user:password@host, unless it is a template or a mask."""
    return not (value.lower() in _PLACEHOLDERS or value.startswith(_TEMPLATE_START) or set(value) == {"*"})


def quoted_secret_ok(value: str) -> bool:
    """A quoted value: the same rules; spaces are allowed ("correct horse battery staple")."""
    return _plausible_secret(value.strip())


# --------------------------------------------------------------------------- the table

def _c(pattern: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(pattern, flags | re.ASCII)


_DIGIT = re.compile("[0-9]")


# File extensions that are not top-level domains: "icon@2x.png" is a file name. (".py",
# ".md", ".zip" are real TLDs, of Paraguay, Moldova and a gTLD, so they are not here.)
_FILE_TLDS = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "bmp", "css", "js", "json", "yaml", "yml",
                        "txt", "pdf", "html", "tar", "gz"})


def _email_ok(candidate: str) -> bool:
    local, _, domain = candidate.rpartition("@")
    return (len(candidate) <= 254 and len(local) <= 64
            and domain.rsplit(".", 1)[-1].lower() not in _FILE_TLDS)


# The domain part, anchored on "@" (a literal, which the matcher finds fast); the local part
# is found by walking left from the "@" (see `_find_emails`).
_EMAIL_AT = r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}(?![A-Za-z0-9_-])"
_EMAIL_LOCAL_STR = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-"
_EMAIL_LOCAL_CHARS = frozenset(_EMAIL_LOCAL_STR)
_EMAIL_LOCAL_WINDOW = 80  # longer than any local part _email_ok accepts (64)
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9_%+-]+(?:\.[A-Za-z0-9_%+-]+)*", re.ASCII)
_EMAIL_AT_RE = re.compile(_EMAIL_AT, re.ASCII)


def _find_emails(text: str) -> Iterator[tuple[int, int]]:
    """Local part = the maximal run of local-part characters before "@", if well formed.

    Equivalent to a forward regex with a left boundary, but runs at the speed of a search
    for "@" instead of trying every word start in the text.
    """
    for m in _EMAIL_AT_RE.finditer(text):
        at = m.start()
        # The run's start, found in C (str.rstrip) over the longest local part worth a look; a run
        # that fills that window is walked to its real start (it fails the length check anyway).
        left = max(0, at - _EMAIL_LOCAL_WINDOW)
        i = left + len(text[left:at].rstrip(_EMAIL_LOCAL_STR))
        if i == left:
            while i > 0 and text[i - 1] in _EMAIL_LOCAL_CHARS:
                i -= 1
        if i < at and _EMAIL_LOCAL.fullmatch(text, i, at):
            yield i, m.end()


# "+" country code, then either a compact run or separated groups, optionally "(0)" and a
# parenthesised area code. Separators are mandatory between groups, which keeps the
# pattern linear (no ambiguous splitting of a digit run).
_PHONE = (
    _start(r"\+", _W, r"\+")
    + r"(?:\d{7,15}+"
    + r"|\d{1,4}+(?:[ .-]?\(0\))?"
    + r"(?:[ .-]?\(\d{1,5}\)[ .-]?\d{1,10}+|[ .-]\d{1,10}+)"
    + r"(?:[ .-]\d{1,10}+){0,6})"
    + r"(?!\w)(?![.:/-]\d)"
)

_NUM_FIRST = _start(r"\d", _W, r"\d[./:-]")
# Cards: 12-19 digits in one run, or the printed groupings 4-4-4-4, 4-4-4-4-3 (19-digit
# Visa/UnionPay), 4-6-5 (Amex), 4-6-4 (Diners). A grouped number is not a card when it
# continues a longer grouped run: not preceded by "digit + space" (the tail of an IBAN,
# "DE51 6548 5363 ...") and not followed by another group of 1-4 digits ("... 5773 245");
# a following date or expiry ("2024-05-06", "12/27") is not a group.
_CARD_FIRST = _start(r"\d", _W, r"\d[./:-]", r"\d[ ]")
_NO_MORE_GROUPS = r"(?!{sep}\d{{1,4}}(?!\d|[-/.:]\d))"
_CARD = (
    _CARD_FIRST
    + r"(?:\d{11,18}"
    + r"|\d{3}([ -])\d{4}\1\d{4}\1\d{4}(?:\1\d{3})?" + _NO_MORE_GROUPS.format(sep=r"\1")
    + r"|\d{3}([ -])\d{6}\2\d{4,5}" + _NO_MORE_GROUPS.format(sep=r"\2") + ")"
    + _NUM_END
)
_PRC = _NUM_FIRST + r"\d{16}[\dXx]" + _NUM_END
_SSN = _NUM_FIRST + r"\d{2}([- ])\d{2}\1\d{4}" + _NUM_END
_IBAN = _start("[A-Z]", _W) + r"[A-Z]\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?!\w)"

# Candidates only; ipaddress then refuses octets over 255 and leading zeros.
_IPV4 = _start(r"\d", _W, r"\d\.") + r"\d{0,2}(?:\.\d{1,3}){3}(?!\w)(?!\.\d)"
# At most 45 characters before the zone (RFC 4291 text form), so a run of colons or hex
# groups costs a bounded amount of work per starting position.
_IPV6 = (
    _start("[0-9A-Fa-f:]", "[A-Za-z0-9_:.]")
    + r"[0-9A-Fa-f]{0,3}:[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:.]{0,40}(?:%[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)?(?![A-Za-z0-9_:])"
)

_TOKEN_END = "(?![A-Za-z0-9_-])"
# Keywords that name a secret, grouped by first letter so that the pattern can begin with
# a plain character class (see `_start`): "db_password" and "x-api-key" match because "_"
# and "-" are not alphanumerics, "passwordless" and "max_tokens" do not.
_KEYWORDS = {
    "a": ["pi[_-]?key", "pikey", "pi[_-]?secret", "ccess[_-]?token", "uth[_-]?token"],
    "b": ["earer[_-]?token"],
    "c": ["lient[_-]?secret", "redentials?"],
    "p": ["assword", "asswd", "assphrase", "wd", "rivate[_-]?key"],
    "r": ["efresh[_-]?token"],
    "s": ["ecret(?:[_-]?(?:access[_-]?)?key)?", "ession[_-]?token"],
    "t": ["oken"],
}
_KEYWORD = (
    _start("[" + "".join(k + k.upper() for k in _KEYWORDS) + "]", "[A-Za-z0-9]")
    + "(?i:" + "|".join(f"(?<={k})(?:{'|'.join(v)})" for k, v in _KEYWORDS.items()) + ")"
    + r"(?![A-Za-z0-9])[\"']?[ \t]*[:=][ \t]*"
)
# A bare (unquoted) value: printable ASCII up to a delimiter; it may not end in "." or ":",
# which in running text close the sentence or the clause.
_BARE = "".join(re.escape(chr(c)) for c in range(0x21, 0x7F) if chr(c) not in "\"'`,;&<>(){}[]")
_BARE_END = "".join(re.escape(chr(c)) for c in range(0x21, 0x7F) if chr(c) not in "\"'`,;&<>(){}[].:")
_ASSIGN_QUOTED = _KEYWORD + r"(?:\"(?P<dq>[^\"\r\n]{4,200})\"|'(?P<sq>[^'\r\n]{4,200})')"
_ASSIGN_BARE = _KEYWORD + rf"(?P<bare>[{_BARE}]{{5,199}}[{_BARE_END}])"
_ASSIGN_HINTS = ("key", "token", "secret", "pass", "pwd", "credential")


DETECTORS: tuple[Detector, ...] = (
    # --- secrets: most specific first; all outrank everything they might contain.
    Detector("secret", "pem_private_key", _c(
        # The body runs to the next "-----" and no further (possessive), so a BEGIN without
        # an END costs one scan, not one per BEGIN.
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----(?:[^-]++|-(?!----))++"
        r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"), priority=100, hints=("-----begin",)),
    Detector("secret", "aws_access_key_id", _c(
        _start("A", "[A-Za-z0-9]")
        + r"(?:KIA|SIA|BIA|CCA|GPA|IDA|IPA|NPA|NVA|PKA|ROA|SCA)[A-Z0-9]{16}(?![A-Za-z0-9])"),
        priority=90, hints=("akia", "asia", "abia", "acca", "agpa", "aida", "aipa", "anpa", "anva", "apka",
                            "aroa", "asca")),
    Detector("secret", "github_token", _c(
        _start("g", _W) + r"(?:h[pousr]_[A-Za-z0-9]{36,251}|ithub_pat_[A-Za-z0-9_]{22,255})(?![A-Za-z0-9_])"),
        priority=90, hints=("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),
    Detector("secret", "slack_token", _c(
        _start("x", _W) + r"ox[abposre]-[0-9A-Za-z-]{10,250}" + _TOKEN_END), validator=_has_digit,
        priority=90, hints=("xox",)),
    Detector("secret", "slack_webhook", _c(
        _start("h", _W) + r"ttps://hooks\.slack\.com/services/T[A-Z0-9]{6,}/B[A-Z0-9]{6,}/[A-Za-z0-9]{16,}"
        r"(?![A-Za-z0-9])"),
        priority=95, hints=("hooks.slack.com",)),
    Detector("secret", "openai_key", _c(
        _start("s", "[A-Za-z0-9_-]") + r"k-(?:proj-|svcacct-|admin-|ant-)?[A-Za-z0-9_-]{20,250}" + _TOKEN_END),
        validator=_mixed, priority=90, hints=("sk-",)),
    Detector("secret", "google_api_key", _c(
        _start("A", _W) + r"Iza[0-9A-Za-z_-]{35}" + _TOKEN_END), priority=90, hints=("aiza",)),
    Detector("secret", "stripe_key", _c(
        _start("[rsw]", _W) + r"(?:(?<=[rs])k_(?:live|test)_[0-9A-Za-z]{10,247}|(?<=w)hsec_[A-Za-z0-9]{24,})"
        + r"(?![A-Za-z0-9_])"), priority=90, hints=("_live_", "_test_", "whsec_")),
    Detector("secret", "jwt", _c(
        _start("e", "[A-Za-z0-9_.-]")
        + r"yJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{10,}(?![A-Za-z0-9_-])(?!\.[A-Za-z0-9_-])"),
        validator=_jwt_ok, priority=90, hints=("eyj",)),
    Detector("secret", "url_credentials", _c(r"://[^\s:/@\"']{1,128}:(?P<pw>[^\s/@\"']{1,128})@"),
             validator=_url_password_ok, priority=85, hints=("://",), value_groups=("pw",)),
    Detector("secret", "bearer_token", _c(
        _start("[Bb]", "[A-Za-z0-9]") + r"(?:earer|EARER)[ \t]+(?P<tok>[A-Za-z0-9._~+/-]{15,}[A-Za-z0-9_~+/-]=*)"
        r"(?![A-Za-z0-9_~+/=-])(?!\.[A-Za-z0-9_~+/-])"),
        validator=_not_a_word, priority=80, hints=("bearer",), value_groups=("tok",)),
    Detector("secret", "assignment_quoted", _c(_ASSIGN_QUOTED), validator=quoted_secret_ok, priority=75,
             hints=_ASSIGN_HINTS, value_groups=("dq", "sq")),
    Detector("secret", "assignment_bare", _c(_ASSIGN_BARE), validator=secret_value_ok, priority=75,
             hints=_ASSIGN_HINTS, value_groups=("bare",)),
    # --- structured identifiers.
    Detector("email", "email", _EMAIL_AT_RE, validator=_email_ok, priority=70, hints=("@",),
             finder=_find_emails),
    Detector("iban", "iban", _c(_IBAN), validator=iban_ok, priority=60, trim=" ", requires=_DIGIT),
    Detector("prc_id", "prc_resident_id", _c(_PRC), validator=prc_id_ok, priority=55, requires=_DIGIT),
    Detector("payment_card", "payment_card", _c(_CARD), validator=card_ok, priority=50, requires=_DIGIT),
    Detector("phone", "phone_international", _c(_PHONE), validator=phone_ok, priority=45, trim=" ",
             hints=("+",)),
    Detector("us_ssn", "us_ssn", _c(_SSN), validator=ssn_ok, priority=40, requires=_DIGIT),
    Detector("ipv6", "ipv6", _c(_IPV6), validator=ipv6_ok, priority=35, trim=":.", hints=(":",)),
    Detector("ipv4", "ipv4", _c(_IPV4), validator=ipv4_ok, priority=30, hints=(".",), requires=_DIGIT),
)
