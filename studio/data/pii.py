"""PII and secret detection for the Dataset tab: find, mask, redact, drop, and remember scans.

Everything here runs offline and returns plain data (no gradio). The scan is built for speed:
a few compiled regexes that start on a character class or literal (so the regex engine skips
ordinary text in C) find *candidates* (an '@', a run of 8+ digits with separators, an IPv4,
IPv6 or IBAN shape, a key prefix); only those reach the real validators: email-validator (no
DNS), phonenumbers, python-stdnum (Luhn, Thai PIN, IBAN) and ipaddress. An ordinary chat row
costs tens of microseconds (see the measured rate in the lead's notes / studio.bench data).

Detected kinds (`Finding.kind`):
- ``email``: addresses with an ASCII domain and a local part in any script, matched whole
  (``nguyễn.văn@gmail.com``, ``Đặng.Thị@congty.vn``, NFC or NFD), validated by email-validator
  (``check_deliverability=False``; special-use domains such as ``.test``/``localhost`` are not
  deliverable and so not flagged). Text of another script glued before the address is not part
  of it (``ติดต่อsomchai@gmail.com``).
- ``phone``: numbers valid (phonenumbers) for VN, TH, GB written with the trunk ``0``
  (0912 345 678, 081-234-5678, 020 7946 0958), US as 10 digits or 3-3-4 ((415) 555-2671),
  and any country as ``+CC``/``00CC`` (+66 81 234 5678, +84912345678, 0084 912 345 678).
- ``card``: 13-19 digits starting with 2-6, in one block or grouped 4-4-4-4 / 4-6-5 by spaces
  or dashes, Luhn-valid.
- ``th_national_id``: 13 digits (plain or 1-4-5-2-1) with the Thai PIN checksum.
- ``vn_cccd``: 12 digits (no checksum exists) only within ~30 characters of a keyword:
  CCCD, CMND, căn cước, chứng minh, định danh (with or without diacritics).
- ``iban``: any country, mod-97 and country format checked (upper case, spaces allowed).
- ``ip``: public IPv4 (``is_global``) and global-unicast IPv6 (2000::/3).
- ``secret``: Hugging Face ``hf_`` tokens, OpenAI ``sk-``/``sk-proj-`` keys, AWS access key
  ids (AKIA/ASIA), GitHub tokens (ghp_/gho_/ghu_/ghs_/ghr_/github_pat_), private key blocks
  (``-----BEGIN ... PRIVATE KEY-----`` through its END line, or its base64 lines).

Numbers glued to Thai text ("เบอร์โทร0812345678ค่ะ") are found: boundaries are "not a digit",
never ``\\b``; Thai digits (๐-๙) count as digits. Not flagged on purpose: dates (2024-05-12,
12/05/2024, 12.05.2024), times, version strings (1.2.3.4, v10.0.19045), amounts with thousands
separators (25.000.000), numbers right after ``#``/order/invoice/ticket/mã đơn (order numbers),
private/loopback/documentation IPs, IPv4 whose four parts are single digits (read as a version;
this also skips 8.8.8.8), digits inside identifiers (SKU12345678X, UUIDs, hashes), counted
sequences and number tables ("98 99 100 101"), non-Luhn card-like numbers, 12 digits with no
CCCD keyword nearby, invalid phone numbers, and ``hf_``/``sk-`` words that are not random keys.

Known limits: obfuscated emails ("a [at] b.com"), emails with a non-ASCII domain, national
numbers of other countries written without ``+CC``, the old 9-digit CMND, names and street
addresses are not detected. A random 13-digit number passes the Thai checksum 1 time in 11, a
random 13-19 digit number starting with 2-6 passes Luhn 1 time in 10: such numbers (e.g.
millisecond timestamps) can be flagged and are shown for review, masked.

Cache: a scan is stored under ``datasets_dir()/scans/<sha256 of the file>.json`` (without the
raw PII values), so the Train tab can ask ``unresolved_pii(path)`` without rescanning.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import json
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from stdnum import iban as _iban
from stdnum import luhn as _luhn
from stdnum.th import pin as _th_pin

from studio import compat, paths
from studio.util import new_path

# Bump when detection changes, so cached scans made by an older engine are not trusted.
ENGINE_VERSION = 1

KINDS = ("email", "phone", "card", "th_national_id", "vn_cccd", "iban", "ip", "secret")

PLACEHOLDERS: dict[str, str] = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "card": "[CARD]",
    "th_national_id": "[TH_ID]",
    "vn_cccd": "[VN_CCCD]",
    "iban": "[IBAN]",
    "ip": "[IP]",
    "secret": "[SECRET]",
}

ACTIONS = ("redact", "drop")


@dataclass
class Finding:
    """One piece of PII in one text.

    row: the row number the caller passed (a file line number; 0 from `scan_text`).
    where: which text of the row, e.g. "messages[1].content" ("" from `scan_text`).
    kind: one of KINDS. value: the raw matched text (empty when loaded from the scan cache,
    which never stores raw PII). masked: a recognisable but safe form for display.
    start/end: character offsets of `value` in that text (text[start:end] == value).
    """

    row: int
    where: str
    kind: str
    value: str
    masked: str
    start: int
    end: int


@dataclass
class PIIReport:
    """The result of scanning a dataset.

    findings: every Finding, in row order. counts: findings per kind (only kinds found).
    rows_with_pii: sorted, distinct row numbers that have at least one finding.
    total_rows: how many rows were scanned.
    """

    findings: list[Finding] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    rows_with_pii: list[int] = field(default_factory=list)
    total_rows: int = 0

    def to_dict(self, include_values: bool = True) -> dict[str, Any]:
        """JSON-ready dict; `include_values=False` blanks raw values (used by the cache)."""
        findings = []
        for f in self.findings:
            d = asdict(f)
            if not include_values:
                d["value"] = ""
            findings.append(d)
        return {
            "findings": findings,
            "counts": dict(self.counts),
            "rows_with_pii": list(self.rows_with_pii),
            "total_rows": self.total_rows,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PIIReport:
        """Inverse of `to_dict`."""
        findings = [Finding(**f) for f in data.get("findings", [])]
        return cls(
            findings=findings,
            counts={str(k): int(v) for k, v in dict(data.get("counts", {})).items()},
            rows_with_pii=[int(r) for r in data.get("rows_with_pii", [])],
            total_rows=int(data.get("total_rows", 0)),
        )

    def table(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Rows for a display table (row, where, kind, masked); never the raw value."""
        items = self.findings if limit is None else self.findings[:limit]
        return [{"row": f.row, "where": f.where, "kind": f.kind, "masked": f.masked} for f in items]


@dataclass
class CleanResult:
    """What `write_cleaned` wrote: the new file, its row count, and findings removed."""

    path: Path
    rows_written: int
    findings_fixed: int


# ---------------------------------------------------------------------------------------------
# Candidate pre-filters. Each pattern starts with a literal or a character class, so the regex
# engine skips ordinary characters in C; look-behind boundaries come right after the first
# character (a cheap check) and the rest is checked in Python on the rare candidates.
# Digits: ASCII and Thai (๐-๙), the scripts our users write numbers in.
_D = "[0-9\u0e50-\u0e59]"
_SEP = r"[ \-.\u00a0()]{0,3}"
_NUMERIC = re.compile(
    # start only at the first digit of a run (or at '+' / '(')
    rf"[0-9\u0e50-\u0e59+(](?<!{_D}{_D})(?:"
    # the digits of an IBAN (GB82WEST..., DE89 3704...), which start after two capitals
    r"(?<=[A-Z][A-Z][0-9])[0-9](?: ?[A-Z0-9]){11,32}|"
    # IPv6 in 2000::/3 (the only global unicast space): 2xxx: or 3xxx:
    r"(?<=[23])[0-9A-Fa-f]{3}(?::[0-9A-Fa-f]{0,4}){2,7}"
    # IPv4 shape
    rf"|(?<={_D}){_D}{{0,2}}(?:\.{_D}{{1,3}}){{3}}(?!\.?{_D})"
    # +CC... / (0xx) ... and plain runs of 8+ digits with separators
    rf"|(?<=[+(])\+?{_SEP}{_D}(?:{_SEP}{_D}){{6,}}"
    rf"|(?<={_D})(?:{_SEP}{_D}){{7,}}"
    ")"
)
_IBAN_SHAPE = re.compile(r"[A-Z][A-Z][0-9][0-9](?: ?[A-Z0-9]){11,32}")
_SECRET = re.compile(
    r"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----"
    r"|hf_[A-Za-z0-9]{30,}"
    r"|sk-[A-Za-z0-9_\-]{20,}"
    r"|A(?:KIA|SIA)[A-Z0-9]{16}(?![A-Za-z0-9])"
    r"|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|github_pat_[A-Za-z0-9_]{22,}"
)
# ASCII characters of an email's local part that we match (RFC 5322 allows a few more, rare).
_EMAIL_LOCAL_ASCII = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+'-_"
)
_EMAIL_LOCAL_MAX = 64
# Scripts that one address may mix (Japanese writes kanji with kana).
_SCRIPT_GROUPS = {"HIRAGANA": "CJK", "KATAKANA": "CJK"}
_EMAIL_DOMAIN = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*\.[A-Za-z]{2,24}"
)
_KEY_END = re.compile(r"-----END [A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----")
# Without an END line, the key is the base64 lines after the header (words are shorter).
_KEY_BODY = re.compile(r"(?:(?:\s|\\n)*[A-Za-z0-9+/=]{16,})*")
_DIGIT_GROUP = re.compile(r"\d+")
_NON_DIGIT = re.compile(r"\D")
_NOT_PLAIN = re.compile(r"[^\d \-\u00a0]")  # card/ID numbers: only space or dash between
_DATE = re.compile(
    r"(?<!\d)(?:(?:1[89]|2\d)\d\d[-./](?:0?[1-9]|1[0-2])[-./](?:0?[1-9]|[12]\d|3[01])"
    r"|(?:0?[1-9]|[12]\d|3[01])[-./](?:0?[1-9]|1[0-2])[-./](?:1[89]|2\d)\d\d)(?!\d)"
)
_AMOUNT = re.compile(r"[1-9]\d{0,2}(?:([ .,\u00a0])\d{3})(?:\1\d{3})*")
_ORDER_CONTEXT = re.compile(
    r"(?:#|\b(?:order|invoice|ticket|tracking|ref|sku)\.?|mã(?: đơn)?|đơn hàng|số đơn"
    r"|hóa đơn|คำสั่งซื้อ|เลขที่)\s*(?:no\.?|number|id|số|#|:)?\s*[:#]?\s*\Z",
    re.IGNORECASE,
)
_VERSION_CONTEXT = re.compile(
    r"(?:\bv|version|\bver\.?|build|release|phiên bản|เวอร์ชัน|รุ่น)\s*[:=]?\s*\Z", re.IGNORECASE
)
_CCCD_KEYWORD = re.compile(
    r"cccd|cmnd|căn cước|can cuoc|chứng minh|chung minh|định danh|dinh danh", re.IGNORECASE
)
_CCCD_WINDOW = 30
# No number we detect is written in more than 6 groups (+84 91 234 56 78, 1-1017-00230-70-8).
_MAX_GROUPS = 6
_PHONE_REGIONS_TRUNK = ("VN", "TH", "GB")
_CC_REGION = {"84": "VN", "66": "TH", "44": "GB"}
_TH_ID_SHAPES = {(13,), (1, 4, 5, 2, 1)}
_US_SHAPES = {(10,), (11,), (3, 3, 4), (1, 3, 3, 4), (3, 7), (1, 10)}
_IPV6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_ASCII_WORD = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_HEX = frozenset("0123456789abcdefABCDEF")
_IPV4_SHAPE = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")


def _ascii_digits(s: str) -> str:
    """The decimal digits of s as ASCII (Thai ๐-๙ and other scripts' digits included)."""
    digits = _NON_DIGIT.sub("", s)
    if digits.isascii():
        return digits
    return "".join(str(unicodedata.digit(ch)) for ch in digits)


def _mask_digits(value: str, keep: int, head: int = 0) -> str:
    """Replace every digit but the first `head` and last `keep` with '*', keeping separators."""
    total = sum(ch.isdecimal() for ch in value)
    out, seen = [], 0
    for ch in value:
        if ch.isdecimal():
            seen += 1
            out.append(ch if seen <= head or seen > total - keep else "*")
        else:
            out.append(ch)
    return "".join(out)


def _country_code_digits(value: str) -> int:
    """How many leading digits of a +CC number are its country code (shown when masked)."""
    if not value.lstrip("( ").startswith("+"):
        return 0
    try:
        return len(str(phonenumbers.parse(value, None).country_code))
    except phonenumbers.NumberParseException:
        return 0


def mask(kind: str, value: str) -> str:
    """A display form of `value` that shows only enough to recognise it."""
    if kind == "email":
        local, _, domain = value.rpartition("@")
        shown = local[:2] if len(local) > 2 else local[:1]
        return f"{shown}***@{domain}"
    if kind == "card":
        return "**** **** **** " + _ascii_digits(value)[-4:]
    if kind == "phone":
        return _mask_digits(value, 3, _country_code_digits(value))
    if kind in ("th_national_id", "vn_cccd"):
        return _mask_digits(value, 4)
    if kind == "iban":
        compact = value.replace(" ", "")
        return compact[:2] + "*" * max(len(compact) - 6, 2) + compact[-4:]
    if kind == "ip":
        if ":" in value:
            return value.split(":", 1)[0] + ":****"
        return value.split(".", 1)[0] + ".*.*.*"
    if kind == "secret":
        if value.startswith("-----BEGIN"):
            return value.split("-----", 2)[1].join(["-----", "----- ****"])
        for prefix in ("sk-proj-", "sk-svcacct-", "sk-admin-", "github_pat_", "AKIA", "ASIA"):
            if value.startswith(prefix):
                return prefix + "****"
        return value[:3] + "****" if value[2:3] in "_-" else value[:4] + "****"
    return "****"


# ---------------------------------------------------------------------------------------------
# Validators for each candidate shape. They return (kind, start, end) tuples.


def _script(ch: str) -> str | None:
    """The script of a letter or digit ("LATIN", "THAI", "CJK"); None for marks and symbols."""
    if ch.isascii():
        return "LATIN" if ch.isalpha() else None
    if unicodedata.category(ch)[0] not in "LN":
        return None
    word = unicodedata.name(ch, "").split(" ", 1)[0]
    return _SCRIPT_GROUPS.get(word, word)


def _email_local_start(text: str, at: int) -> int:
    """Where the local part of the address whose '@' is text[at] starts (== at: none).

    Internationalised local parts (SMTPUTF8: "nguyễn.văn", "Đặng.Thị", "สมชาย", typed NFC or
    NFD) are taken whole: letters, combining marks and digits of any script. Thai is written
    without spaces, so a run of another script glued before the address ("ติดต่อsomchai@")
    ends it: the local part keeps to the script of the letters nearest the '@'.
    """
    start, script = at, None
    limit = max(0, at - _EMAIL_LOCAL_MAX)
    while start > limit:
        ch = text[start - 1]
        if ch not in _EMAIL_LOCAL_ASCII and (
            ch.isascii() or unicodedata.category(ch)[0] not in "LMN"
        ):
            break
        s = _script(ch)
        if s is not None:
            if script is not None and s != script:
                break
            script = s
        start -= 1
    return start


def _email_at(text: str, at: int) -> tuple[str, int, int] | None:
    d = _EMAIL_DOMAIN.match(text, at + 1)
    if not d:
        return None
    start = _email_local_start(text, at)
    while start < at and text[start] == ".":
        start += 1
    if start == at:
        return None
    try:
        validate_email(text[start : d.end()], check_deliverability=False)
    except EmailNotValidError:
        return None
    return ("email", start, d.end())


def _char_classes(s: str) -> int:
    """How many of upper case, lower case and digits occur in s."""
    return any(c.isupper() for c in s) + any(c.islower() for c in s) + any(c.isdigit() for c in s)


def _secret(text: str, s: int, e: int) -> tuple[str, int, int] | None:
    value = text[s:e]
    if s > 0 and text[s - 1] in _ASCII_WORD:
        return None  # inside a longer identifier ("mask-..." , "XAKIA...")
    if value.startswith("-----BEGIN"):
        end = _KEY_END.search(text, e)
        if end:
            return ("secret", s, end.end())
        return ("secret", s, _KEY_BODY.match(text, e).end())
    if value.startswith("sk-"):
        body = value[3:]
        for prefix in ("proj-", "svcacct-", "admin-"):
            body = body.removeprefix(prefix)
        # Keys are random base62/64: all of upper, lower and digits ("sk-2024-notes-v2" is not).
        if len(body) < 20 or _char_classes(body) < 3:
            return None
    elif value.startswith(("hf_", "gh")) and _char_classes(value.partition("_")[2]) < 2:
        return None  # hf_/gh*_ tokens mix cases or digits ("hf_abcdefghijklmnop..." does not)
    return ("secret", s, e)


def _ipv6(text: str, s: int, e: int) -> tuple[str, int, int] | None:
    if s > 0 and (text[s - 1] in _ASCII_WORD or text[s - 1] == ":"):
        return None
    if e < len(text) and (text[e] in _HEX or text[e] == ":"):
        return None
    value = text[s:e]
    while value.endswith(":") and not value.endswith("::"):
        value, e = value[:-1], e - 1
    try:
        addr = ipaddress.IPv6Address(value)
    except ValueError:
        return None
    if addr in _IPV6_GLOBAL_UNICAST and addr.is_global:
        return ("ip", s, e)
    return None


def _ipv4(text: str, s: int, e: int) -> tuple[str, int, int] | None:
    if s > 0 and (text[s - 1] in _ASCII_WORD or text[s - 1] in ".-" or text[s - 1].isdecimal()):
        return None  # v1.2.3.4, build-1.2.3.4, part of a longer dotted number
    value = text[s:e]
    parts = value.split(".")
    if all(len(p) == 1 for p in parts) or not value.isascii():
        return None  # 1.2.3.4 reads as a version, not an address
    if _VERSION_CONTEXT.search(text, max(0, s - 16), s):
        return None
    try:
        addr = ipaddress.IPv4Address(value)
    except ValueError:
        return None
    return ("ip", s, e) if addr.is_global else None


def _iban_at(text: str, s: int, e: int) -> tuple[str, int, int] | None:
    if s > 0 and text[s - 1] in _ASCII_WORD:
        return None
    # The shape regex is greedy (it may swallow a following upper-case word): try shorter ends.
    ends = [i + 1 for i in range(s, e) if text[i] != " "]
    for end in reversed(ends):
        if end - s < 15:
            break
        if end < len(text) and text[end] in _ASCII_WORD and end != e:
            continue
        if _iban.is_valid(text[s:end]):
            return ("iban", s, end)
    return None


def _cccd_keyword_near(text: str, s: int, e: int) -> bool:
    window = text[max(0, s - _CCCD_WINDOW) : s] + " " + text[e : e + _CCCD_WINDOW]
    return bool(_CCCD_KEYWORD.search(unicodedata.normalize("NFC", window)))


def _phone_candidates(
    span: str, digits: str, sizes: tuple[int, ...]
) -> list[tuple[str, str | None]]:
    """(number, region) pairs worth asking phonenumbers about, by how the span is written.

    People write a national number with its trunk 0 (VN/TH/GB), a US number as 10 digits or
    3-3-4, and anything else as +CC/00CC; group sizes must look like a phone number's, which
    keeps number tables ("214 96 499 29") out.
    """
    if span.lstrip("( ").startswith("+"):
        return [(span, None)]
    if len(sizes) > 1 and (min(sizes[1:]) < 2 or max(sizes) < 3):
        return []  # groups of 2+ digits (a lone leading 1 aside), one of 3+
    if sizes[0] == 1 and digits[0] == "0":
        return []
    if digits.startswith("00") or (digits.startswith("0") and 9 <= len(digits) <= 11):
        return [(span, region) for region in _PHONE_REGIONS_TRUNK]
    out: list[tuple[str, str | None]] = []
    if len(sizes) == 1 and digits[:2] in _CC_REGION and 10 <= len(digits) <= 13:
        out.append(("+" + digits, None))  # 84912345678: the country code without its +
    if sizes in _US_SHAPES and (len(digits) == 10 or digits[0] == "1"):
        out.append((span, "US"))
    return out


def _valid_phone(span: str, digits: str, sizes: tuple[int, ...]) -> bool:
    """phonenumbers validity, with the writing conventions that keep look-alikes out."""
    for number, region in _phone_candidates(span, digits, sizes):
        try:
            parsed = phonenumbers.parse(number, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(parsed):
            return True
    return False


def _card_shape(sizes: tuple[int, ...]) -> bool:
    """Card numbers are one block, 4-4-4-4(-1..3) or Amex/Diners 4-6-5 / 4-6-4."""
    if len(sizes) == 1 or sizes in ((4, 6, 5), (4, 6, 4)):
        return True
    return all(x == 4 for x in sizes[:-1]) and 1 <= sizes[-1] <= 4


def _counted_sequence(text: str, groups: list[tuple[int, int]]) -> bool:
    """True for "98 99 100 101" and the like: a list of numbers, not one number."""
    if len(groups) < 3:
        return False
    values = [int(_ascii_digits(text[a:b])) for a, b in groups]
    step = values[1] - values[0]
    return step > 0 and all(y - x == step for x, y in itertools.pairwise(values))


def _classify_digits(
    text: str, s: int, e: int, groups: list[tuple[int, int]], plus: bool
) -> str | None:
    """Which kind a digit span is, or None. `groups` are its digit runs' offsets.

    Cheap checks on length and grouping come first; checksums, keywords and phonenumbers
    only run on spans that are shaped like the kind in question.
    """
    sizes = tuple(b - a for a, b in groups)
    n = sum(sizes)
    plain = not _NOT_PLAIN.search(text, groups[0][0], e)
    lead = _ascii_digits(text[groups[0][0]])
    maybe_th = n == 13 and plain and sizes in _TH_ID_SHAPES and lead not in "09"
    maybe_card = 13 <= n <= 19 and plain and lead in "23456" and _card_shape(sizes)
    maybe_cccd = n == 12 and plain and len(sizes) <= 4
    maybe_phone = 8 <= n <= 15 and (
        plus or lead in "01" or sizes in _US_SHAPES or (len(sizes) == 1 and n >= 10)
    )
    if not (maybe_th or maybe_card or maybe_cccd or maybe_phone):
        return None
    if _counted_sequence(text, groups):
        return None
    span = text[s:e]
    digits = _ascii_digits(span)
    if plus:
        return "phone" if _valid_phone(span, digits, sizes) else None
    if maybe_th and _th_pin.is_valid(digits):
        return "th_national_id"
    if maybe_card and len(set(digits)) > 1 and _luhn.is_valid(digits):
        return "card"
    if maybe_cccd and _cccd_keyword_near(text, s, e):
        return "vn_cccd"
    if maybe_phone and not _ORDER_CONTEXT.search(text, max(0, s - 24), s):
        return "phone" if _valid_phone(span, digits, sizes) else None
    return None


def _digit_run(text: str, s: int, e: int) -> list[tuple[str, int, int]]:
    """Findings inside a run of digits and separators: the whole run, else its parts.

    A run may hold several numbers ("0912 345 678 0987 654 321") or a number next to a
    date; parts are whole digit groups, tried leftmost first and longest first, never
    through a date. Work is linear in the run's length (a part has at most 19 digits).
    """
    if s > 0:
        prev = text[s - 1]
        if prev.isdecimal():
            return []  # a restart inside a run the regex already judged
        if prev in _ASCII_WORD and e < len(text) and text[e] in _ASCII_WORD:
            return []  # digits inside an identifier (SKU12345678X, a hash)
        if prev == "-" and s > 1 and text[s - 2] in _HEX:
            return []  # a UUID or hash segment (a716-446655440000)
        if prev in "vV" and (s < 2 or text[s - 2] not in _ASCII_WORD):
            return []  # v10.0.19045
    if e < len(text) and text[e] == "_":
        return []
    plus = text[s] == "+" or text[s : s + 2] == "(+"
    body = s
    while not text[body].isdecimal():
        body += 1
    if not plus and _AMOUNT.fullmatch(text, body, e):
        return []  # 25.000.000, 98 000 000: an amount
    if "." in text[s:e] and _VERSION_CONTEXT.search(text, max(0, s - 16), s):
        return []  # version 10.0.19045
    groups = [(m.start(), m.end()) for m in _DIGIT_GROUP.finditer(text, body, e)]
    count = len(groups)
    if (
        count > 1
        and min(b - a for a, b in groups) == 1
        and all(text[groups[k][1] : groups[k + 1][0]] == "." for k in range(count - 1))
    ):
        return []  # 10.0.19045.2965 and other dotted version numbers
    in_date = [False] * count
    k = 0
    for m in _DATE.finditer(text, body, e):
        while k < count and groups[k][0] < m.start():
            k += 1
        while k < count and groups[k][0] < m.end():
            in_date[k] = True
            k += 1

    found: list[tuple[str, int, int]] = []
    i = 0
    while i < count:
        ends: list[int] = []
        digits = 0
        for j in range(i, min(count, i + _MAX_GROUPS)):
            digits += groups[j][1] - groups[j][0]
            if in_date[j] or digits > 19:
                break
            if digits >= 8:
                ends.append(j)
        next_i = i + 1
        for j in reversed(ends):
            a = s if i == 0 else groups[i][0]  # the whole run keeps its leading '+' or '('
            b = groups[j][1]
            kind = _classify_digits(text, a, b, groups[i : j + 1], plus and i == 0)
            if kind:
                found.append((kind, a, b))
                next_i = j + 1
                break
        i = next_i
    return found


def _scan_spans(text: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) of every finding in text, non-overlapping, in order."""
    raw: list[tuple[str, int, int]] = []
    hit: tuple[str, int, int] | None
    at = text.find("@")
    while at >= 0:
        hit = _email_at(text, at)
        if hit:
            raw.append(hit)
        at = text.find("@", at + 1)
    for m in _NUMERIC.finditer(text):
        s, e = m.span()
        value = m.group()
        iban = s >= 2 and "A" <= text[s - 1] <= "Z" and _IBAN_SHAPE.match(text, s - 2)
        if iban:
            # An IBAN-shaped code: an IBAN or nothing (its digits are no phone or card).
            hit = _iban_at(text, s - 2, iban.end())
        elif ":" in value:
            hit = _ipv6(text, s, e)
        elif _IPV4_SHAPE.fullmatch(value):
            hit = _ipv4(text, s, e)
        else:
            raw.extend(_digit_run(text, s, e))
            continue
        if hit:
            raw.append(hit)
    # Every secret shape contains one of these; `in` checks are cheaper than a regex pass.
    if "_" in text or "sk-" in text or "AKIA" in text or "ASIA" in text or "-----" in text:
        for m in _SECRET.finditer(text):
            hit = _secret(text, *m.span())
            if hit:
                raw.append(hit)
    if len(raw) < 2:
        return raw
    # Passes overlap (a phone number as an email's local part, digits in an IBAN): keep the
    # leftmost, then the longest.
    raw.sort(key=lambda h: (h[1], h[1] - h[2]))
    kept: list[tuple[str, int, int]] = []
    for h in raw:
        if kept and h[1] < kept[-1][2]:
            continue
        kept.append(h)
    return kept


# ---------------------------------------------------------------------------------------------
# Public API


def scan_text(text: str, row: int = 0, where: str = "") -> list[Finding]:
    """Every finding in one text, in order (row/where are copied into each Finding)."""
    if not text or not isinstance(text, str):
        return []
    return [
        Finding(row, where, kind, text[s:e], mask(kind, text[s:e]), s, e)
        for kind, s, e in _scan_spans(text)
    ]


def _message_keys(row: Mapping[str, Any]) -> tuple[str, ...]:
    """The message lists of a normalized row: a preference pair's prompt and both answers
    (its `messages` only repeats prompt + chosen), else its messages."""
    return ("prompt", "chosen", "rejected") if "rejected" in row else ("messages",)


def _texts(row: Any) -> Iterable[tuple[str, str]]:
    """(where, text) for every message text of a normalized row."""
    if not isinstance(row, Mapping):
        return
    for key in _message_keys(row):
        messages = row.get(key)
        if not isinstance(messages, list):
            continue
        for i, msg in enumerate(messages):
            if not isinstance(msg, Mapping):
                continue
            content = msg.get("content")
            if isinstance(content, str):
                yield f"{key}[{i}].content", content
            elif isinstance(content, list):  # multi-part content: scan the text parts
                for j, part in enumerate(content):
                    if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                        yield f"{key}[{i}].content[{j}].text", part["text"]


def _row_number(row_numbers: Sequence[int] | Mapping[int, int] | None, index: int) -> int:
    if row_numbers is None:
        return index + 1
    return int(row_numbers[index])


def scan_rows(
    rows: Sequence[Mapping[str, Any]],
    row_numbers: Sequence[int] | Mapping[int, int] | None = None,
) -> PIIReport:
    """Scan normalized rows ({"messages": [{"role", "content"}]}) into a PIIReport.

    row_numbers[i] is the row number reported for rows[i] (the file's line number); without
    it rows are numbered from 1. Non-string content and malformed rows are skipped, not fatal.
    """
    findings: list[Finding] = []
    counts: dict[str, int] = {}
    with_pii: set[int] = set()
    for index, row in enumerate(rows):
        number = None
        for where, text in _texts(row):
            spans = _scan_spans(text)
            if not spans:
                continue
            if number is None:
                number = _row_number(row_numbers, index)
            with_pii.add(number)
            for kind, s, e in spans:
                value = text[s:e]
                findings.append(Finding(number, where, kind, value, mask(kind, value), s, e))
                counts[kind] = counts.get(kind, 0) + 1
    return PIIReport(findings, counts, sorted(with_pii), len(rows))


def redact_text(text: str, findings: Sequence[Finding] | None = None) -> str:
    """text with each finding replaced by its PLACEHOLDERS entry ("[EMAIL]", "[PHONE]", ...).

    Without findings the text is scanned first. A finding whose offsets do not match the text
    (a different text, or its value no longer there) is ignored rather than corrupting it.
    """
    if findings is None:
        findings = scan_text(text)
    out = text
    last = len(text) + 1
    for f in sorted(findings, key=lambda f: f.start, reverse=True):
        if f.end > last or f.start < 0 or f.end > len(text) or f.start >= f.end:
            continue
        if f.value and text[f.start : f.end] != f.value:
            continue
        out = out[: f.start] + PLACEHOLDERS.get(f.kind, "[PII]") + out[f.end :]
        last = f.start
    return out


def _redact_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A new row dict with every message text redacted; `row` is not modified. A preference
    pair loses its derived `messages`, so the cleaned file is a preference file again."""
    new = dict(row)
    if "rejected" in row:
        new.pop("messages", None)
    for key in _message_keys(row):
        if isinstance(row.get(key), list):
            new[key] = [_redact_message(msg) for msg in row[key]]
    return new


def _redact_message(msg: Any) -> Any:
    """One message with its text (or text parts) redacted."""
    if not isinstance(msg, Mapping):
        return msg
    m = dict(msg)
    content = msg.get("content")
    if isinstance(content, str):
        m["content"] = redact_text(content)
    elif isinstance(content, list):
        m["content"] = [
            {**p, "text": redact_text(p["text"])}
            if isinstance(p, Mapping) and isinstance(p.get("text"), str)
            else p
            for p in content
        ]
    return m


def _as_written(row: Any) -> Any:
    """A row as a cleaned file holds it: a preference pair without its derived messages."""
    if isinstance(row, Mapping) and "rejected" in row:
        return {k: v for k, v in row.items() if k != "messages"}
    return row


def redact_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """New rows with all PII replaced by placeholders; the input rows are left unchanged."""
    return [_redact_row(row) if isinstance(row, Mapping) else row for row in rows]


def drop_rows(
    rows: Sequence[Mapping[str, Any]],
    report: PIIReport,
    row_numbers: Sequence[int] | Mapping[int, int] | None = None,
) -> list[Mapping[str, Any]]:
    """The rows whose row number is not in report.rows_with_pii (same numbering as scan_rows)."""
    bad = set(report.rows_with_pii)
    return [row for i, row in enumerate(rows) if _row_number(row_numbers, i) not in bad]


# ---------------------------------------------------------------------------------------------
# Files: cleaned copies and the scan cache


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (the scan cache key: content, not name or mtime)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _scans_dir() -> Path:
    d = paths.datasets_dir() / "scans"
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_scan(path: str | os.PathLike[str], report: PIIReport) -> Path:
    """Cache `report` as the scan of the file at `path`; returns the cache file.

    Raw PII values are not stored (only masked forms and offsets), so the cache never becomes
    a second copy of the data it warns about.
    """
    sha = file_sha256(path)
    target = _scans_dir() / f"{sha}.json"
    payload = {
        "engine_version": ENGINE_VERSION,
        "sha256": sha,
        "source": str(Path(path).resolve()),
        "scanned_at": datetime.now().isoformat(timespec="seconds"),
        "report": report.to_dict(include_values=False),
    }
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".scan-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, ensure_ascii=False)
        compat.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_scan(path: str | os.PathLike[str]) -> PIIReport | None:
    """The cached scan of this file's current content, or None (never scanned, changed since,
    scanned by an older engine, or the file is missing)."""
    try:
        sha = file_sha256(path)
    except OSError:
        return None
    cached = _scans_dir() / f"{sha}.json"
    try:
        payload = json.loads(cached.read_text(encoding="utf-8"))
        if payload.get("engine_version") != ENGINE_VERSION:
            return None
        return PIIReport.from_dict(payload["report"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def unresolved_pii(path: str | os.PathLike[str]) -> int | None:
    """Findings in the cached scan of this file, or None if it has never been scanned."""
    report = load_scan(path)
    return None if report is None else len(report.findings)


def _place(tmp: Path, target: Path) -> None:
    """Move tmp to target; FileExistsError when target exists (it is never replaced)."""
    try:
        os.link(tmp, target)  # fails if target appeared meanwhile: no overwrite
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links
        if target.exists():
            raise FileExistsError(target) from None
        compat.replace(tmp, target)
        return
    tmp.unlink()


def write_cleaned(
    rows: Sequence[Mapping[str, Any]],
    source_path: str | os.PathLike[str],
    action: str,
) -> CleanResult:
    """Write a cleaned copy of `rows` (the normalized rows of `source_path`) as a new JSONL file.

    action "redact": every finding replaced by its placeholder; "drop": rows with any finding
    left out. The file goes to datasets_dir() as `<stem>.redacted-<YYYYmmdd-HHMMSS>.jsonl` (or
    `.dropped-`), with `-2`, `-3`... added if the name is taken; the source file is only used
    for its name and never opened. The cleaned file's own scan is cached, so
    `unresolved_pii(result.path)` is 0 right away. rows_written may be 0 (all rows dropped).
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
    before = scan_rows(rows)
    if action == "redact":
        cleaned: Sequence[Mapping[str, Any]] = redact_rows(rows)
    else:
        cleaned = [_as_written(row) for row in drop_rows(rows, before)]
    directory = paths.datasets_dir()
    stem = Path(source_path).stem or "dataset"
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{stem}-", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            for row in cleaned:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        verb = {"redact": "redacted", "drop": "dropped"}[action]
        final = new_path(directory, f"{stem}.{verb}", ".jsonl", create=lambda p: _place(tmp, p))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    after = scan_rows(cleaned)
    save_scan(final, after)
    fixed = len(before.findings) - len(after.findings)
    return CleanResult(path=final, rows_written=len(cleaned), findings_fixed=fixed)
