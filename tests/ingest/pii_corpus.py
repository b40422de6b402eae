"""A seeded generator of labelled PII records with hard negatives, for tests and the benchmark.

Each record is a line of text (prose, log lines, JSON-ish, key=value, Chinese) with
entities of every built-in type embedded in varied formats and positions, and the exact
character span of each one. Hard negatives sit next to them: order numbers, timestamps,
version strings, card-like numbers that fail Luhn, IBAN-like strings that fail mod 97,
never-issued SSNs, 18-digit numbers with a wrong PRC check digit, git SHAs, UUIDs, prices,
dates, MAC addresses, placeholders after `password=`.

The check digits here are computed by this module's own code, not by the detectors', so a
bug in a detector's validator shows up as a recall or precision loss instead of being
mirrored into the labels.

Labelling decisions (what counts as the entity), documented because they are choices:
- secrets in `key=value` / `"key": "value"` / `Bearer x` / `scheme://user:pw@host` are
  labelled on the value only; a PEM private key is labelled from BEGIN to END inclusive;
- phone numbers are international (a leading "+" and a calling code); national-only forms
  such as "(415) 555-0132" are neither generated nor used as negatives;
- four dot-separated numbers each <= 255 *are* IPv4 syntax, so version negatives use three
  parts, a part over 255, or five parts ("10.0.19045.2965", "1.3.6.1.4.1.311");
- "::1" and hex-only forms such as "cafe::beef" are left out on both sides;
- a passwords-after-keyword value that is a single lower-case word ("sunshine") is not
  generated: the detector deliberately leaves such values alone (prose such as
  "password: required" would otherwise be redacted).
Entities in one record are separated by words or punctuation, never by a bare space,
because "+49 30 1234567 123 45 6789" is ambiguous to any reader.
"""

from __future__ import annotations

import base64
import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

TYPES: tuple[str, ...] = (
    "email", "phone", "payment_card", "iban", "ipv4", "ipv6", "us_ssn", "prc_id", "secret",
)


@dataclass(frozen=True)
class Gold:
    """One labelled entity: text[start:end] is a value of `type`."""

    start: int
    end: int
    type: str


@dataclass(frozen=True)
class Record:
    text: str
    spans: tuple[Gold, ...]


@dataclass(frozen=True)
class Piece:
    """Generated text with the labelled part at [start, end) (None: a negative, nothing labelled)."""

    text: str
    type: str | None = None
    start: int = 0
    end: int = -1
    phrase: bool = False  # carries its own key/context (password=...): plain templates only

    @staticmethod
    def of(text: str, type_: str) -> Piece:
        return Piece(text, type_, 0, len(text))


# --------------------------------------------------------------------------- check digits

def luhn_check_digit(payload: str) -> str:
    """The digit that makes payload + digit pass Luhn."""
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2
            d = d - 9 if d > 9 else d
        total += d
    return str((10 - total % 10) % 10)


def luhn_valid(number: str) -> bool:
    return luhn_check_digit(number[:-1]) == number[-1]


def iban_check_digits(country: str, bban: str) -> str:
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    return f"{98 - int(numeric) % 97:02d}"


def prc_check_char(first17: str) -> str:
    weights = [2 ** (17 - i) % 11 for i in range(17)]
    total = sum(int(c) * w for c, w in zip(first17, weights, strict=True))
    return "10X98765432"[total % 11]


# --------------------------------------------------------------------------- entities

def _d(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(n))


def _alnum(rng: random.Random, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


_FIRST = ["john", "jane", "wei", "li", "maria", "ahmed", "olga", "kenji", "priya", "lucas", "anna", "omar"]
_LAST = ["smith", "zhang", "garcia", "mueller", "tanaka", "patel", "rossi", "kowalski", "nguyen", "dubois"]
_DOMAINS = ["example.com", "mail.example.co.uk", "corp-mail.example.org", "uni.example.edu.cn", "example.io",
            "sub.domain.example.de", "example.com.au", "x.example", "example-shop.fr", "gmail.example.net"]


def email(rng: random.Random) -> Piece:
    f, last = rng.choice(_FIRST), rng.choice(_LAST)
    tag = rng.choice(["news", "tag", "x1"])
    local = rng.choice([f"{f}.{last}", f"{f}_{last}", f"{f}{last}{rng.randint(1, 99)}", f"{f[0]}.{last}+{tag}",
                        f"{f}-{last}", f"{f.upper()}.{last.capitalize()}", f"{f}{rng.randint(1900, 2010)}"])
    domain = rng.choice(_DOMAINS)
    if rng.random() < 0.15:
        domain = domain.upper()
    return Piece.of(f"{local}@{domain}", "email")


def _nanp(rng: random.Random) -> tuple[str, str, str]:
    return f"{rng.randint(2, 9)}{_d(rng, 2)}", f"{rng.randint(2, 9)}{_d(rng, 2)}", _d(rng, 4)


def phone(rng: random.Random) -> Piece:
    a, e, n = _nanp(rng)
    choices: list[Callable[[], str]] = [
        lambda: f"+1 ({a}) {e}-{n}", lambda: f"+1-{a}-{e}-{n}", lambda: f"+1.{a}.{e}.{n}",
        lambda: f"+1{a}{e}{n}", lambda: f"+1 {a} {e} {n}",
        lambda: f"+44 20 {_d(rng, 4)} {_d(rng, 4)}", lambda: f"+44 (0)20 {_d(rng, 4)} {_d(rng, 4)}",
        lambda: f"+44 7{_d(rng, 3)} {_d(rng, 6)}", lambda: f"+447{_d(rng, 9)}",
        lambda: f"+86 1{rng.choice('3456789')}{_d(rng, 1)} {_d(rng, 4)} {_d(rng, 4)}",
        lambda: f"+86-10-{rng.randint(2, 8)}{_d(rng, 7)}", lambda: f"+861{rng.choice('3589')}{_d(rng, 9)}",
        lambda: f"+49 30 {rng.randint(1, 9)}{_d(rng, 6)}", lambda: f"+49 (0)30 {_d(rng, 8)}",
        lambda: f"+49 151 {_d(rng, 8)}",
        lambda: f"+33 {rng.randint(1, 7)} {_d(rng, 2)} {_d(rng, 2)} {_d(rng, 2)} {_d(rng, 2)}",
        lambda: f"+91 9{_d(rng, 4)} {_d(rng, 5)}", lambda: f"+91-9{_d(rng, 9)}",
        lambda: f"+81 3-{_d(rng, 4)}-{_d(rng, 4)}", lambda: f"+81 90-{_d(rng, 4)}-{_d(rng, 4)}",
        lambda: f"+55 11 9{_d(rng, 4)}-{_d(rng, 4)}", lambda: f"+61 4{_d(rng, 2)} {_d(rng, 3)} {_d(rng, 3)}",
        lambda: f"+65 {rng.choice('689')}{_d(rng, 3)} {_d(rng, 4)}",
        lambda: f"+41 44 {_d(rng, 3)} {_d(rng, 2)} {_d(rng, 2)}",
        lambda: f"+7 495 {_d(rng, 3)}-{_d(rng, 2)}-{_d(rng, 2)}",
        lambda: f"+34 6{_d(rng, 2)} {_d(rng, 3)} {_d(rng, 3)}",
        lambda: f"+852 {rng.choice('235689')}{_d(rng, 3)} {_d(rng, 4)}",
        lambda: f"+971 50 {_d(rng, 3)} {_d(rng, 4)}",
    ]
    return Piece.of(rng.choice(choices)(), "phone")


# (prefix generator, total length, grouping) per brand.
_BRANDS: list[tuple[Callable[[random.Random], str], int, tuple[int, ...]]] = [
    (lambda r: "4", 16, (4, 4, 4, 4)),
    (lambda r: "4", 13, ()),
    (lambda r: "4", 19, (4, 4, 4, 4, 3)),
    (lambda r: str(r.randint(51, 55)), 16, (4, 4, 4, 4)),
    (lambda r: str(r.randint(2221, 2720)), 16, (4, 4, 4, 4)),
    (lambda r: r.choice(["34", "37"]), 15, (4, 6, 5)),
    (lambda r: "6011", 16, (4, 4, 4, 4)),
    (lambda r: str(r.randint(3528, 3589)), 16, (4, 4, 4, 4)),
    (lambda r: "62", 16, (4, 4, 4, 4)),
    (lambda r: "62", 19, (4, 4, 4, 4, 3)),
    (lambda r: "36", 14, (4, 6, 4)),
]


def _group(digits: str, groups: tuple[int, ...], sep: str) -> str:
    out, i = [], 0
    for g in groups:
        out.append(digits[i:i + g])
        i += g
    return sep.join(out)


def _card_digits(rng: random.Random) -> tuple[str, tuple[int, ...]]:
    prefix_fn, length, groups = rng.choice(_BRANDS)
    prefix = prefix_fn(rng)
    payload = prefix + _d(rng, length - len(prefix) - 1)
    return payload + luhn_check_digit(payload), groups


def payment_card(rng: random.Random) -> Piece:
    digits, groups = _card_digits(rng)
    if groups and rng.random() < 0.6:
        return Piece.of(_group(digits, groups, rng.choice([" ", "-"])), "payment_card")
    return Piece.of(digits, "payment_card")


# country -> BBAN layout: n digits, a upper-case letters, c alphanumerics.
_IBAN_LAYOUTS: dict[str, str] = {
    "GB": "4a14n", "DE": "18n", "FR": "10n11c2n", "ES": "20n", "IT": "1a10n12c", "NL": "4a10n", "BE": "12n",
    "CH": "5n12c", "PL": "24n", "NO": "11n", "AT": "16n", "IE": "4a14n", "SA": "2n18c", "BR": "23n1a1c",
    "MT": "4a5n18c", "LU": "3n13c", "FI": "14n", "DK": "14n", "SE": "20n", "PT": "21n",
}


def _bban(rng: random.Random, layout: str) -> str:
    out, num = [], ""
    for ch in layout:
        if ch.isdigit():
            num += ch
            continue
        n, num = int(num), ""
        alphabet = {"n": string.digits, "a": string.ascii_uppercase, "c": string.ascii_uppercase + string.digits}[ch]
        out.append(_alnum(rng, n, alphabet))
    return "".join(out)


def _iban_text(rng: random.Random, compact: str) -> str:
    if rng.random() < 0.5:
        return " ".join(compact[i:i + 4] for i in range(0, len(compact), 4))
    return compact


def iban(rng: random.Random) -> Piece:
    cc = rng.choice(list(_IBAN_LAYOUTS))
    bban = _bban(rng, _IBAN_LAYOUTS[cc])
    return Piece.of(_iban_text(rng, cc + iban_check_digits(cc, bban) + bban), "iban")


def ipv4(rng: random.Random) -> Piece:
    first = rng.choice([10, 172, 192, 100, 203, 8, 1, 45, 185, 255, rng.randint(1, 223)])
    addr = ".".join(str(x) for x in (first, rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)))
    fmt = rng.choice(["{}", "{}", "{}:8080", "http://{}/status", "{}/24", "src={}"])
    text = fmt.format(addr)
    i = text.index(addr)
    return Piece(text, "ipv4", i, i + len(addr))


def ipv6(rng: random.Random) -> Piece:
    groups = [f"{rng.randint(0, 0xFFFF):x}" for _ in range(8)]
    groups[0] = rng.choice(["2001", "fe80", "2a00", "fd12", "2607", "2001"])
    if not any(ch.isdigit() for g in groups[1:] for ch in g):
        groups[7] = str(rng.randint(1, 9999))
    style = rng.randrange(5)
    if style == 0:
        addr = ":".join(groups)
    elif style == 1:  # a run of zeros compressed
        i = rng.randint(1, 5)
        j = rng.randint(i + 1, 7)
        addr = ":".join(groups[:i]) + "::" + ":".join(groups[j:])
    elif style == 2:
        addr = f"{groups[0]}:db8:{groups[2]}::{groups[7]}"
    elif style == 3:
        addr = f"::ffff:{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    else:
        addr = f"fe80::{groups[5]}:{groups[6]}:{rng.randint(1, 0xFFFF):x}%eth{rng.randint(0, 3)}"
    if rng.random() < 0.2:
        addr = addr.upper().replace("ETH", "eth")
    fmt = rng.choice(["{}", "{}", "[{}]:443", "http://[{}]/"])
    text = fmt.format(addr)
    i = text.index(addr)
    return Piece(text, "ipv6", i, i + len(addr))


def us_ssn(rng: random.Random) -> Piece:
    area = rng.randint(1, 899)
    while area == 666:
        area = rng.randint(1, 899)
    sep = rng.choice(["-", "-", "-", " "])
    return Piece.of(f"{area:03d}{sep}{rng.randint(1, 99):02d}{sep}{rng.randint(1, 9999):04d}", "us_ssn")


_PRC_AREAS = ["110105", "310115", "440305", "510104", "320102", "330106", "420102", "610113", "650102", "120101",
              "370202", "500103", "230102", "450102", "530102", "210102", "130102", "350102", "410102", "640104"]


def _prc_body(rng: random.Random) -> str:
    y, m, day = rng.randint(1940, 2006), rng.randint(1, 12), rng.randint(1, 28)
    return f"{rng.choice(_PRC_AREAS)}{y}{m:02d}{day:02d}{_d(rng, 3)}"


def prc_id(rng: random.Random) -> Piece:
    body = _prc_body(rng)
    if rng.random() < 0.3:  # make sure the X check character shows up often enough
        for _ in range(60):
            if prc_check_char(body) == "X":
                break
            body = _prc_body(rng)
    check = prc_check_char(body)
    if check == "X" and rng.random() < 0.2:
        check = "x"
    return Piece.of(body + check, "prc_id")


_B62 = string.ascii_letters + string.digits
_B64URL = _B62 + "-_"


def _b64url(obj: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode().rstrip("=")


def _password(rng: random.Random) -> str:
    alphabet = _B62 + "!#%^*_+=-"
    while True:
        pw = rng.choice(_B62) + _alnum(rng, rng.randint(7, 18), alphabet) + rng.choice(_B62)
        if not (pw.isalpha() and pw.islower()):
            return pw


def _pem(rng: random.Random, escaped: bool) -> str:
    kind = rng.choice(["RSA ", "EC ", "OPENSSH ", "", "ENCRYPTED "])
    nl = "\\n" if escaped else "\n"
    lines = [base64.b64encode(rng.randbytes(48)).decode() for _ in range(rng.randint(2, 6))]
    return f"-----BEGIN {kind}PRIVATE KEY-----{nl}{nl.join(lines)}{nl}-----END {kind}PRIVATE KEY-----"


def _phrase(prefix: str, value: str, suffix: str = "") -> Piece:
    return Piece(prefix + value + suffix, "secret", len(prefix), len(prefix) + len(value), phrase=True)


def secret(rng: random.Random) -> Piece:
    kind = rng.randrange(16)
    if kind == 0:
        return Piece.of(rng.choice(["AKIA", "ASIA"]) + _alnum(rng, 16, string.ascii_uppercase + string.digits),
                        "secret")
    if kind == 1:
        return Piece.of(rng.choice(["ghp_", "gho_", "ghs_"]) + _alnum(rng, 36), "secret")
    if kind == 2:
        return Piece.of(f"github_pat_{_alnum(rng, 22)}_{_alnum(rng, 59)}", "secret")
    if kind == 3:
        return Piece.of(f"xox{rng.choice('bpa')}-{_d(rng, 12)}-{_d(rng, 13)}-{_alnum(rng, 24)}", "secret")
    if kind == 4:
        body = rng.choice([f"proj-{_alnum(rng, 56, _B64URL)}", _alnum(rng, 48),
                           f"ant-api03-{_alnum(rng, 80, _B64URL)}"])
        body = body[:-1] + rng.choice(_B62)  # tokens end in a letter or digit
        return Piece.of("sk-" + body, "secret")
    if kind == 5:
        body = _alnum(rng, 34, _B64URL) + rng.choice(_B62)
        return Piece.of("AIza" + body, "secret")
    if kind == 6:
        return Piece.of(f"{rng.choice(['sk', 'rk'])}_{rng.choice(['live', 'test'])}_{_alnum(rng, 24)}", "secret")
    if kind == 7:
        header = _b64url({"alg": rng.choice(["HS256", "RS256", "ES256"]), "typ": "JWT"})
        payload = _b64url({"sub": _d(rng, 10), "name": rng.choice(_FIRST),
                           "iat": rng.randint(1_600_000_000, 1_800_000_000)})
        return Piece.of(f"{header}.{payload}.{_alnum(rng, 43, _B64URL)}{rng.choice(_B62)}", "secret")
    if kind == 8:
        return Piece.of(_pem(rng, escaped=rng.random() < 0.3), "secret")
    if kind == 9:
        return Piece.of(f"https://hooks.slack.com/services/T{_alnum(rng, 8, string.ascii_uppercase + string.digits)}"
                        f"/B{_alnum(rng, 10, string.ascii_uppercase + string.digits)}/{_alnum(rng, 24)}", "secret")
    if kind == 10:
        pw = _password(rng).replace("#", "x")
        scheme, host = rng.choice([("postgres", "db.internal.example.com:5432/prod"),
                                   ("https", "git.example.com/team/repo.git"),
                                   ("mongodb+srv", "cluster0.example.net/app"),
                                   ("redis", "cache.example.internal:6379/0")])
        user = rng.choice(["admin", "app_user", "deploy", "svc"])
        return _phrase(f"{scheme}://{user}:", pw, f"@{host}")
    if kind == 11:
        tok = _alnum(rng, rng.randint(24, 48), _B64URL + ".") + rng.choice(_B62)
        return _phrase("Authorization: Bearer ", tok)
    key = rng.choice(["password", "DB_PASSWORD", "api_key", "apiKey", "client_secret", "AWS_SECRET_ACCESS_KEY",
                      "x-api-key", "passwd", "auth_token", "SECRET_KEY", "access_token", "pwd"])
    value = _password(rng) if kind < 14 else _alnum(rng, 40, _B62 + "/+")
    style = rng.randrange(6)
    if style == 0:
        return _phrase(f"{key}=", value)
    if style == 1:
        return _phrase(f"{key}: ", value)
    if style == 2:
        return _phrase(f'"{key}": "', value, '"')
    if style == 3:
        return _phrase(f"{key} = '", value, "'")
    if style == 4:
        return _phrase(f"export {key.upper().replace('-', '_')}=", value)
    return _phrase('passphrase: "', " ".join(rng.choice(["correct", "horse", "battery", "staple", "violet",
                                                          "ocean", "tiger"]) for _ in range(4)), '"')


GENERATORS: dict[str, Callable[[random.Random], Piece]] = {
    "email": email, "phone": phone, "payment_card": payment_card, "iban": iban, "ipv4": ipv4, "ipv6": ipv6,
    "us_ssn": us_ssn, "prc_id": prc_id, "secret": secret,
}


# --------------------------------------------------------------------------- hard negatives

def _card_failing_luhn(rng: random.Random) -> str:
    digits, groups = _card_digits(rng)
    bad = digits[:-1] + str((int(digits[-1]) + rng.randint(1, 9)) % 10)
    if groups and rng.random() < 0.5:
        return _group(bad, groups, rng.choice([" ", "-"]))
    return bad


def _iban_failing(rng: random.Random) -> str:
    cc = rng.choice(list(_IBAN_LAYOUTS))
    bban = _bban(rng, _IBAN_LAYOUTS[cc])
    good = int(iban_check_digits(cc, bban))
    bad = (good + rng.randint(1, 90)) % 97
    bad = bad if bad >= 2 else bad + 2
    if bad == good:
        bad = good + 1 if good < 98 else good - 1
    return _iban_text(rng, f"{cc}{bad:02d}{bban}")


def _prc_wrong(rng: random.Random) -> str:
    while True:
        body = _prc_body(rng)
        right = prc_check_char(body)
        wrong = rng.choice([c for c in "0123456789X" if c != right])
        candidate = body + wrong
        if wrong == "X" or not luhn_valid(candidate):  # not a card number either
            return candidate


def _prc_bad_date(rng: random.Random) -> str:
    while True:
        body = (f"{rng.choice(_PRC_AREAS)}{rng.randint(1950, 2000)}{rng.choice(['13', '00', '02'])}"
                f"{rng.choice(['30', '31', '00', '45'])}{_d(rng, 3)}")
        candidate = body + prc_check_char(body)
        if candidate[-1] == "X" or not luhn_valid(candidate):  # not a card number either
            return candidate


def _long_run_with_card(rng: random.Random) -> str:
    digits, _ = _card_digits(rng)
    extra = _d(rng, rng.randint(max(1, 20 - len(digits)), 24 - len(digits)))  # 20+ digits: no card is that long
    return rng.choice([digits + extra, extra + digits])


def _hexs(rng: random.Random, n: int) -> str:
    return _alnum(rng, n, "0123456789abcdef")


NEGATIVES: dict[str, Callable[[random.Random], str]] = {
    "order_number": lambda r: rng_choice(r, [f"ORD-{r.randint(2019, 2025)}-{_d(r, 6)}", f"PO#{_d(r, 5)}",
                                             f"INV-{r.randint(2019, 2025)}{_d(r, 4)}-{_d(r, 4)}",
                                             f"#{_card_failing_luhn(r)}", f"order {_d(r, 8)}"]),
    "timestamp": lambda r: rng_choice(r, [
        f"{r.randint(2000, 2030)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}T{r.randint(0, 23):02d}:"
        f"{r.randint(0, 59):02d}:{r.randint(0, 59):02d}Z",
        f"{r.randint(2000, 2030)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}T{r.randint(0, 23):02d}:"
        f"{r.randint(0, 59):02d}:{r.randint(0, 59):02d}+{r.choice(['02:00', '05:30', '08:00'])}",
        f"{r.randint(2000, 2030)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d} {r.randint(0, 23):02d}:"
        f"{r.randint(0, 59):02d}:{r.randint(0, 59):02d}.{_d(r, 3)}",
        str(r.randint(1_000_000_000, 1_999_999_999)), str(r.randint(1_000_000_000_000, 1_999_999_999_999)),
        f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}",
        "Mon, 06 May 2024 12:34:56 +0000", f"UTC+{r.randint(1, 12):02d}:00"]),
    "version": lambda r: rng_choice(r, [
        f"v{r.randint(0, 20)}.{r.randint(0, 30)}.{r.randint(0, 99)}",
        f"{r.randint(0, 20)}.{r.randint(0, 30)}.{r.randint(0, 99)}",
        f"10.0.{r.randint(10240, 22631)}.{r.randint(256, 4000)}", f"Python 3.{r.randint(6, 13)}.{r.randint(0, 19)}",
        f"1.0.0+{r.randint(2010, 2024)}{_d(r, 10)}", f"v4.19.0-{r.randint(10, 30)}-amd64",
        f"1.3.6.1.4.1.{r.randint(1, 60000)}",
        f"{r.randint(1, 9)}.{r.randint(256, 999)}.{r.randint(0, 9)}.{r.randint(0, 9)}"]),
    "card_failing_luhn": _card_failing_luhn,
    "card_in_long_run": _long_run_with_card,
    "card_unknown_issuer": lambda r: (lambda p: p + luhn_check_digit(p))(r.choice("19") + _d(r, 14)),
    "iban_failing_mod97": _iban_failing,
    "ssn_invalid": lambda r: rng_choice(r, [f"000-{_d(r, 2)}-{_d(r, 4)}", f"666-{r.randint(10, 99)}-{_d(r, 4)}",
                                            f"9{_d(r, 2)}-{r.randint(10, 99)}-{r.randint(1000, 9999)}",
                                            f"{r.randint(100, 665)}-00-{r.randint(1000, 9999)}",
                                            f"{r.randint(100, 665)}-{r.randint(10, 99)}-0000", "078-05-1120"]),
    "prc_wrong_check": _prc_wrong,
    "prc_bad_date": _prc_bad_date,
    "hex_hash": lambda r: rng_choice(r, [_hexs(r, 40), _hexs(r, 7), _hexs(r, 64), f"sha256:{_hexs(r, 64)}",
                                         f"commit {_hexs(r, 40)}"]),
    "uuid": lambda r: f"{_hexs(r, 8)}-{_hexs(r, 4)}-4{_hexs(r, 3)}-{r.choice('89ab')}{_hexs(r, 3)}-{_hexs(r, 12)}",
    "price": lambda r: rng_choice(r, [f"${r.randint(1, 9999):,}.{_d(r, 2)}", f"€{r.randint(1, 999)}.{_d(r, 2)}",
                                      f"USD {r.randint(1000, 9999999):,}.00", f"{r.randint(1, 99)},{_d(r, 3)} EUR"]),
    "date": lambda r: rng_choice(r, [f"{r.randint(1990, 2030)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}",
                                     f"{r.randint(1, 28):02d}/{r.randint(1, 12):02d}/{r.randint(1990, 2030)}",
                                     f"{r.randint(1, 28):02d}.{r.randint(1, 12):02d}.{r.randint(1990, 2030)}",
                                     f"May {r.randint(1, 28)}, {r.randint(1990, 2030)}"]),
    "mac_and_code": lambda r: rng_choice(r, [":".join(_hexs(r, 2).upper() for _ in range(6)), "std::vector<int>",
                                             "16:9", f"{r.randint(1, 9)}:{r.randint(1, 9)}:{r.randint(1, 9)}",
                                             "C++17", "image@2x.png", "@octocat", "a::b::c"]),
    "plus_numbers": lambda r: rng_choice(r, [f"+{r.randint(1, 99)} points", f"+{r.randint(1, 40)}.5°C", "+1234",
                                             f"+{r.randint(2, 9)}%", "+49", f"+999 {_d(r, 3)} {_d(r, 3)} {_d(r, 3)}",
                                             f"+1 0{_d(r, 2)} 555 {_d(r, 4)}", f"+{r.randint(2000, 2030)}-05-06"]),
    "not_ip": lambda r: rng_choice(r, [
        f"{r.randint(256, 999)}.{r.randint(0, 255)}.{r.randint(0, 255)}.1", f"192.168.{r.randint(0, 255)}",
        ".".join(str(r.randint(1, 9)) for _ in range(5)), "3.14159"]),
    "secret_placeholder": lambda r: rng_choice(r, [
        "password: ********", "api_key=${API_KEY}", "token: null", "password=<your-password>",
        'API_KEY: "{{ api_key }}"', "the password is required", "password: required", "max_tokens=256",
        "num_tokens: 1024", "token_count=512", "password_policy=strict", "sk-learn", "AKIA1234",
        "Bearer realm=example", '"token_type": "bearer"', f"secret: {r.choice(['true', 'false', 'none'])}",
        "eyJhbGciOiJIUzI1NiJ9", "ghp_short", "-----BEGIN PUBLIC KEY-----"]),
    # Source code and configuration name secrets far more often than they contain them.
    "secret_reference": lambda r: rng_choice(r, [
        "token = tokenizer.eos_token", 'api_key = os.environ["API_KEY"]', "password = args.password",
        "SECRET_KEY = get_secret_key()", "self.token = token_value", "password: Optional[str] = None",
        "access_token: AccessTokenProvider", "api_key=API_KEY_NAME", "token=self.bos_token",
        'password = "password"', "pwd = os.getcwd()", 'credentials: "ServiceAccountCredentials"',
        "client_secret = settings.CLIENT_SECRET", "token: str", "password = request.form.get"]),
}


def rng_choice(rng: random.Random, options: list[str]) -> str:
    return rng.choice(options)


# --------------------------------------------------------------------------- records

# "{}" marks a slot. Plain templates accept phrase pieces (password=...); JSON-ish ones do not.
_PLAIN = [
    "{}", "Please contact {} for details.", "{} was seen at the front desk", "Customer note: {}",
    "{}, {} and {} were listed on the form.", "Ref {} / {}", "ticket #{} -> {}", "log: user={} status=ok",
    "[{}]", "({})", "'{}'", "<{}>", "Value:\t{};", "First {}.\nThen {}.", "see {} now!",
    "请联系{}，谢谢。", "客户资料：{}；备注：{}", "{} -- {} -- {}", "From: {}\nTo: {}", "a={}, b={}",
]
_JSONISH = ['{{"user": "{}", "note": "ok"}}', '{{"contact": "{}", "backup": "{}"}}', '["{}", "{}"]',
            '{{"field": "{}"}}']
_FILLER = ["", "", "Hello. ", "Re: invoice. ", "2024-05-06 INFO ", "note ", "FYI: "]


def _fill(template: str, pieces: list[Piece]) -> Record:
    out: list[str] = []
    spans: list[Gold] = []
    parts = template.split("{}")
    pos = 0
    for i, part in enumerate(parts):
        part = part.replace("{{", "{").replace("}}", "}")
        out.append(part)
        pos += len(part)
        if i < len(pieces):
            piece = pieces[i]
            if piece.type is not None:
                spans.append(Gold(pos + piece.start, pos + piece.end, piece.type))
            out.append(piece.text)
            pos += len(piece.text)
    return Record("".join(out), tuple(spans))


def generate(n: int, seed: int = 0, positive_rate: float = 0.6) -> list[Record]:
    """n labelled records; the same (n, seed) always gives the same corpus."""
    rng = random.Random(seed)
    records: list[Record] = []
    negative_kinds = list(NEGATIVES)
    made = 0
    for _ in range(n):
        jsonish = rng.random() < 0.2
        template = rng.choice(_JSONISH if jsonish else _PLAIN)
        slots = template.count("{}")
        pieces: list[Piece] = []
        for _slot in range(slots):
            if rng.random() < positive_rate:
                # Round-robin over types keeps support balanced; the generator's own rng varies formats.
                type_ = TYPES[made % len(TYPES)]
                made += 1
                piece = GENERATORS[type_](rng)
                while jsonish and (piece.phrase or "\n" in piece.text or '"' in piece.text):
                    piece = GENERATORS[type_](rng)
            else:
                neg = NEGATIVES[rng.choice(negative_kinds)](rng)
                if jsonish:
                    neg = neg.replace('"', "'")
                piece = Piece(neg)
            pieces.append(piece)
        rec = _fill(template, pieces)
        filler = rng.choice(_FILLER)
        if filler:
            rec = Record(filler + rec.text, tuple(Gold(g.start + len(filler), g.end + len(filler), g.type)
                                                  for g in rec.spans))
        records.append(rec)
    return records


def score(records: list[Record], find: Callable[[str], list[tuple[int, int, str]]],
          types: tuple[str, ...] = TYPES) -> dict[str, dict[str, float]]:
    """Span-level exact-match precision, recall, F1 and support per type."""
    tp = dict.fromkeys(types, 0)
    fp = dict.fromkeys(types, 0)
    fn = dict.fromkeys(types, 0)
    for rec in records:
        gold = {(g.start, g.end, g.type) for g in rec.spans}
        pred = {p for p in find(rec.text) if p[2] in tp}
        for _, _, t in pred & gold:
            tp[t] += 1
        for _, _, t in pred - gold:
            fp[t] += 1
        for _, _, t in gold - pred:
            fn[t] += 1
    out: dict[str, dict[str, float]] = {}
    for t in types:
        p = tp[t] / (tp[t] + fp[t]) if tp[t] + fp[t] else 1.0
        r = tp[t] / (tp[t] + fn[t]) if tp[t] + fn[t] else 1.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        out[t] = {"precision": p, "recall": r, "f1": f1, "support": tp[t] + fn[t], "tp": tp[t], "fp": fp[t],
                  "fn": fn[t]}
    return out


def errors(records: list[Record], find: Callable[[str], list[tuple[int, int, str]]],
           limit: int = 20) -> list[str]:
    """Readable false positives and negatives, for a failing test's message."""
    lines: list[str] = []
    for rec in records:
        gold = {(g.start, g.end, g.type) for g in rec.spans}
        pred = set(find(rec.text))
        for s, e, t in sorted(pred - gold):
            lines.append(f"FP {t}: {rec.text[s:e]!r} in {rec.text!r}")
        for s, e, t in sorted(gold - pred):
            lines.append(f"FN {t}: {rec.text[s:e]!r} in {rec.text!r}")
        if len(lines) >= limit:
            break
    return lines[:limit]


def table(metrics: dict[str, dict[str, float]]) -> str:
    """A markdown table of the metrics."""
    rows = ["| type | precision | recall | F1 | support | FP | FN |", "|---|---:|---:|---:|---:|---:|---:|"]
    for t, m in metrics.items():
        rows.append(f"| {t} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {int(m['support'])} "
                    f"| {int(m['fp'])} | {int(m['fn'])} |")
    return "\n".join(rows)
