"""Mask personal details in any text shown to a person.

Six recognizers find spans of personal detail; :func:`mask_text` replaces each with a tag:

=========  ==========================================================  ==========
kind       what it finds                                               tag
=========  ==========================================================  ==========
``url``    ``scheme://...``, ``www....``, short links like ``t.co/x``    ``[url]``
``email``  ``local@domain.tld``                                        ``[email]``
``ip``     dotted IPv4 and IPv6 addresses (checked by ``ipaddress``)     ``[ip]``
``user``   handles, ``@name`` (also inside ``RT @name:``)               ``@[user]``
``card``   13 to 19 digits, optional spaces/dashes, valid Luhn checksum  ``[card]``
``phone``  9 to 15 digits in phone-like groups, optional ``+``/``()``  ``[phone]``
=========  ==========================================================  ==========

Before matching, :func:`normalise_text` undoes HTML entities (repeatedly, so ``&amp;#64;``
cannot hide an ``@``), applies Unicode NFKC (full-width ``＠`` becomes ``@``) and drops
invisible format characters (zero-width spaces, bidi controls) that could split a handle.

When spans of two recognizers overlap, the one that starts first wins, then the longer one,
then the earlier kind in the table. So ``jane.doe@example.org`` is one e-mail address, not a
handle ``@example``, and a URL whose query string holds an ``@`` stays one URL.

Limitations: spelled-out addresses (``jane at example dot org``), bare domains without a path
(``example.org``) and phone numbers with fewer than 9 digits (a local ``555-0199``) are not
masked. IPv6 addresses count only when they hold a digit (``cafe::bad`` stays). Hashtags
(``#Yankees``) are topics, not personal details, and stay.
"""

from __future__ import annotations

import html
import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from enum import StrEnum

from harmtrace.errors import InputDataError

__all__ = ["PiiKind", "Span", "find_pii", "mask_text", "normalise_text"]


class PiiKind(StrEnum):
    """Which recognizer found a span; the order is the tie-break priority."""

    URL = "url"
    EMAIL = "email"
    IP = "ip"
    USER = "user"
    CARD = "card"
    PHONE = "phone"


TAGS: dict[PiiKind, str] = {
    PiiKind.URL: "[url]",
    PiiKind.EMAIL: "[email]",
    PiiKind.IP: "[ip]",
    PiiKind.USER: "@[user]",
    PiiKind.CARD: "[card]",
    PiiKind.PHONE: "[phone]",
}


@dataclass(frozen=True)
class Span:
    """``text[start:end]`` is a personal detail of kind ``kind``."""

    kind: PiiKind
    start: int
    end: int


# A URL may not end on punctuation that usually closes the sentence around it.
_URL_BODY = r"[^\s<>\"'`]*[^\s<>\"'`.,;:!?)\]}]"
_SHORT_TLDS = "com|org|net|edu|gov|io|co|ly|me|gl|gd|it|uk|de|fr|to|tv|us|info|biz|be|link|app"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# An IPv6 candidate: hex digits, colons and dots with at least two colons, standing alone;
# :func:`_accept` keeps only what :class:`ipaddress.IPv6Address` parses.
_IPV6 = r"(?<![\w:.])(?=[0-9a-f.]*:[0-9a-f.]*:)[0-9a-f:.]*(?:[0-9a-f]|::)(?!\w|:[\w:])"

_PATTERNS: dict[PiiKind, re.Pattern[str]] = {
    PiiKind.URL: re.compile(
        rf"(?:[a-z][a-z0-9+.-]*://|www\.){_URL_BODY}"
        rf"|(?<![\w@.-])(?:[a-z0-9-]+\.)+(?:{_SHORT_TLDS})/{_URL_BODY}",
        re.IGNORECASE,
    ),
    PiiKind.EMAIL: re.compile(r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[a-z]{2,}", re.IGNORECASE),
    PiiKind.IP: re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.[0-9])|{_IPV6}",
                           re.IGNORECASE),
    PiiKind.USER: re.compile(r"@\w+(?:\.\w+)*"),
    PiiKind.CARD: re.compile(r"(?<![\w+])[0-9](?:[ -]?[0-9]){12,18}(?!\w)"),
    PiiKind.PHONE: re.compile(
        r"(?<![\w+])(?:\+[0-9]{1,3}[ .-]?)?(?:\([0-9]{1,4}\)[ .-]?)?"
        r"[0-9]{2,4}(?:[ .-]?[0-9]{2,5}){1,4}(?!\w)"
    ),
}
_PRIORITY = {kind: rank for rank, kind in enumerate(PiiKind)}
# Dates and timestamps ("2024-05-01 12:30") have phone-like digit groups; a date never opens a
# phone number, so a candidate that starts with one is rejected.
_DATE_PREFIX = re.compile(
    r"(?:[0-9]{4}([-./])[0-9]{1,2}\1[0-9]{1,2}|[0-9]{1,2}([-./])[0-9]{1,2}\2[0-9]{4})(?:[ T]|$)"
)
_MAX_PASSES = 5


def normalise_text(text: str) -> str:
    """``text`` with HTML entities undone, NFKC applied and invisible format characters gone."""
    for _ in range(_MAX_PASSES):
        unescaped = html.unescape(text)
        if unescaped == text:
            break
        text = unescaped
    text = unicodedata.normalize("NFKC", text)
    return "".join(char for char in text if unicodedata.category(char) != "Cf")


def _luhn_ok(digits: str) -> bool:
    """Whether ``digits`` pass the Luhn checksum of payment card numbers."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char) * (2 if position % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def _accept(kind: PiiKind, found: str) -> bool:
    """Whether a regex match really is of ``kind``; filters phone-shaped non-phones,
    card-shaped numbers that fail the Luhn check and colon runs that are no IPv6 address."""
    if kind is PiiKind.IP and ":" in found:
        try:
            ipaddress.IPv6Address(found)
        except ValueError:
            return False
        return any(char.isdigit() for char in found)
    if kind is PiiKind.CARD:
        digits = "".join(char for char in found if char.isdigit())
        return 13 <= len(digits) <= 19 and _luhn_ok(digits)
    if kind is not PiiKind.PHONE:
        return True
    n_digits = sum(char.isdigit() for char in found)
    return 9 <= n_digits <= 15 and _DATE_PREFIX.match(found) is None


def find_pii(text: str) -> list[Span]:
    """Non-overlapping spans of personal detail in ``text``, sorted by start.

    Spans index ``text`` exactly as given; :func:`mask_text` first normalises the text (see
    :func:`normalise_text`), so call ``find_pii(normalise_text(text))`` to see what it masks.
    """
    _require_str(text)
    candidates = [
        Span(kind, match.start(), match.end())
        for kind, pattern in _PATTERNS.items()
        for match in pattern.finditer(text)
        if _accept(kind, match.group())
    ]
    candidates.sort(key=lambda span: (span.start, span.start - span.end, _PRIORITY[span.kind]))

    chosen: list[Span] = []
    for span in candidates:
        if not chosen or span.start >= chosen[-1].end:
            chosen.append(span)
    return chosen


def _mask_once(text: str) -> str:
    pieces, cursor = [], 0
    for span in find_pii(text):
        pieces.append(text[cursor : span.start])
        pieces.append(TAGS[span.kind])
        cursor = span.end
    pieces.append(text[cursor:])
    return "".join(pieces)


def mask_text(text: str) -> str:
    """``text`` normalised, with every personal detail replaced by its tag.

    Masking repeats until nothing changes, so ``mask_text(mask_text(t)) == mask_text(t)`` and
    no entity or invisible character left by one pass can form a new detail.

    >>> mask_text("RT @jane: mail jane.doe@example.org, see http://t.co/abc123!")
    'RT @[user]: mail [email], see [url]!'
    """
    _require_str(text)
    current = normalise_text(text)
    for _ in range(_MAX_PASSES):
        masked = normalise_text(_mask_once(current))
        if masked == current:
            break
        current = masked
    return current


def _require_str(text: object) -> None:
    if not isinstance(text, str):
        raise InputDataError(
            f"text to mask must be a str, got {type(text).__name__}; convert it with str() first"
        )
