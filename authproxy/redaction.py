"""Masking a fixed set of secret values in any text, in every form they travel in.

Text that comes from elsewhere (an upstream's error message, which may echo the
form body or the headers it was sent; a client's request path) goes through a
:class:`Redactor` built once from the secrets that could be in it. It masks each
secret in every form it travels in: raw; percent-encoded (``quote`` with any
``safe``, upper- or lower-case hex, even mixed); form-encoded (``+`` for a
space); JSON-escaped (``ensure_ascii`` either way, ``\\/``); HTML-escaped; and
base64 — alone, or inside a longer value such as the ``id:secret`` of a Basic
``Authorization`` header, whatever its alignment.

This module imports nothing of authproxy: :mod:`authproxy.secret` (the
:class:`~authproxy.secret.Secret` wrapper, which prints as :data:`MASK`) sits on
top of it and re-exports its names.
"""

from __future__ import annotations

import binascii
import functools
import re
from typing import TYPE_CHECKING, Iterable
from urllib.parse import quote, quote_plus

if TYPE_CHECKING:
    from authproxy.secret import Secret

MASK = "***"
MIN_SECRET = 3  # shorter values are not masked: they would mask half of every text


def _plain(value: "Secret | str | None") -> str | None:
    """A secret's value (:func:`authproxy.secret.reveal`, without importing it)."""
    if value is None or isinstance(value, str):
        return value
    return value.reveal()


def _hex(byte: int, width: int = 2) -> str:
    """A hex number as a pattern matching it in either case (``2b`` → ``2[Bb]``)."""
    return "".join(f"[{d.upper()}{d}]" if d.isalpha() else d for d in f"{byte:0{width}x}")


_JSON_SHORT = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_HTML = {"&": ("&amp;",), "<": ("&lt;",), ">": ("&gt;",), '"': ("&quot;",), "'": ("&#39;", "&#x27;", "&apos;")}
_SPACE = " \t\r\n"


_PLAIN = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._")


def _char_forms(c: str) -> list[str]:
    """Every way one character of a secret may have been written, as regex alternatives.
    Letters, digits and ``-._`` are never escaped by any of these encoders: they stand
    for themselves only, which keeps the pattern of a long token nearly literal."""
    if c in _PLAIN:
        return [re.escape(c)]
    forms = [re.escape(c)]
    forms.append("".join("%" + _hex(b) for b in c.encode("utf-8")))  # quote / quote_plus, any case
    cp = ord(c)
    if cp < 0x10000:
        forms.append(r"\\u" + _hex(cp, 4))  # JSON, ensure_ascii
    else:
        hi, lo = 0xD800 + ((cp - 0x10000) >> 10), 0xDC00 + ((cp - 0x10000) & 0x3FF)
        forms.append(r"\\u" + _hex(hi, 4) + r"\\u" + _hex(lo, 4))
    if c in _JSON_SHORT:
        forms.append(re.escape(_JSON_SHORT[c]))
    for entity in _HTML.get(c, ()):
        forms.append(re.escape(entity))
    if c in "&<>\"'":
        forms.append(f"&#0*{cp};")
    return forms


def _blank_run() -> str:
    # One character class for the blanks themselves and '+', then the escapes: no two
    # alternatives match the same text, so a long run of blanks cannot backtrack badly.
    escapes = sorted({f for s in _SPACE for f in _char_forms(s)[1:]}, key=len, reverse=True)
    return r"(?:[\s+]|" + "|".join(escapes) + ")+"


def _tolerant(value: str) -> str:
    """One pattern matching ``value`` however each of its characters was encoded.
    A run of blanks matches any run of blanks (or ``+``): messages get their white
    space collapsed before they are shown."""
    parts: list[str] = []
    i = 0
    while i < len(value):
        c = value[i]
        if c in _SPACE:
            while i < len(value) and value[i] in _SPACE:
                i += 1
            parts.append(_BLANKS)
            continue
        forms = _char_forms(c)
        parts.append(forms[0] if len(forms) == 1 else "(?:" + "|".join(forms) + ")")
        i += 1
    return "".join(parts)


_BLANKS = _blank_run()


def _secret_pattern(value: str) -> str:
    """:func:`_tolerant`, with the forms of the first character spelled out as
    alternatives of their own, each starting with a literal: the regex engine
    then skips, in C, every position where no secret can start."""
    if value[0] in _SPACE:
        return _tolerant(value)
    rest = _tolerant(value[1:])
    return "|".join(form + rest for form in _char_forms(value[0]))


B64_TRIGGER = 16  # base64 characters of a secret looked for; a hit is confirmed by decoding


def _b64_cores(data: bytes) -> set[str]:
    """The base64 characters that depend only on ``data``, for each of the three
    alignments it can have inside a longer encoded value: any base64 text holding
    ``data`` holds one of these (in the standard or the URL-safe alphabet). Only
    their first characters are kept: enough to find a candidate, which is then decoded."""
    out: set[str] = set()
    n = len(data)
    for pad in range(3):
        enc = binascii.b2a_base64(b"\0" * pad + data[: B64_TRIGGER], newline=False).decode("ascii")
        core = enc[(8 * pad + 5) // 6 : (8 * (pad + min(n, B64_TRIGGER))) // 6][:B64_TRIGGER]
        if len(core) >= MIN_SECRET:
            out.add(core)
            out.add(core.replace("+", "-").replace("/", "_"))
    return out


_B64_RUN = re.compile(r"[A-Za-z0-9+/_-]")


class Redactor:
    """Masks a fixed set of secrets in any text. Build it once per set of secrets
    (at config load, per service) and call :meth:`redact` as often as needed: the
    work is one pass of one compiled regex, plus a check of base64 runs only where
    one could hold a secret."""

    __slots__ = ("_direct", "_b64", "_count")
    _direct: "re.Pattern[str] | None"
    _b64: "re.Pattern[str] | None"

    def __init__(self, secrets: Iterable["Secret | str | None"] = ()) -> None:
        values = sorted({v for v in map(_plain, secrets) if v and len(v) >= MIN_SECRET}, key=lambda v: (-len(v), v))
        self._count = len(values)
        if not values:
            self._direct = self._b64 = None
            return
        # Longest first: where two secrets start at one place, the longer one is masked whole.
        self._direct = re.compile("|".join(_secret_pattern(v) for v in values))
        cores: set[str] = set()
        for v in values:
            for form in {v, quote_plus(v, safe=""), quote(v, safe="")}:
                cores |= _b64_cores(form.encode("utf-8"))
        self._b64 = re.compile("|".join(re.escape(c) for c in sorted(cores, key=lambda c: (-len(c), c))))

    def __bool__(self) -> bool:
        return self._count > 0

    def __repr__(self) -> str:
        return f"Redactor({self._count} secrets)"

    def redact(self, text: str) -> str:
        if self._direct is None or not text:
            return text
        text = self._direct.sub(MASK, text)
        assert self._b64 is not None
        m = self._b64.search(text)
        if m is None:
            return text
        return self._redact_base64(text, m)

    __call__ = redact

    def contains(self, text: str) -> bool:
        """Whether ``text`` holds one of the secrets in any form."""
        return bool(text) and self.redact(text) != text

    def _redact_base64(self, text: str, m: "re.Match[str] | None") -> str:
        """Mask every run of base64 characters that decodes to something holding a secret."""
        assert self._b64 is not None
        spans: list[tuple[int, int]] = []
        pos = 0
        while m is not None:
            start, end = m.start(), m.end()
            while start > 0 and _B64_RUN.match(text, start - 1):
                start -= 1
            while end < len(text) and _B64_RUN.match(text, end):
                end += 1
            while end < len(text) and text[end] == "=":
                end += 1
            span = self._confirmed(text, start, end, m.start(), m.end())
            if span is not None:
                spans.append(span)
            pos = max(end, m.end())
            m = self._b64.search(text, pos)
        if not spans:
            return text
        out, last = [], 0
        for start, end in spans:
            out.append(text[last:start])
            out.append(MASK)
            last = end
        out.append(text[last:])
        return "".join(out)

    def _confirmed(self, text: str, start: int, end: int, hit_start: int, hit_end: int) -> tuple[int, int] | None:
        """The span to mask around a hit, once decoding shows it holds a secret: the
        '/'-free piece of the run around it when that piece alone decodes to one (a
        value in a URL path, whose '/' are no base64), else the whole run (a Basic
        token, whose '/' are)."""
        if "/" not in text[hit_start:hit_end]:
            left = text.rfind("/", start, hit_start) + 1 or start
            right = text.find("/", hit_end, end)
            right = end if right < 0 else right
            if (left, right) != (start, end) and self._decodes_to_secret(text[left:right]):
                return left, right
        return (start, end) if self._decodes_to_secret(text[start:end]) else None

    def _decodes_to_secret(self, run: str) -> bool:
        assert self._direct is not None
        std = run.rstrip("=").replace("-", "+").replace("_", "/")
        for shift in range(4):
            seg = std[shift:]
            if len(seg) % 4 == 1:
                seg = seg[:-1]
            seg += "=" * (-len(seg) % 4)
            try:
                raw = binascii.a2b_base64(seg)
            except (binascii.Error, ValueError):
                continue
            if self._direct.search(raw.decode("utf-8", "replace")):
                return True
        return False


NO_SECRETS = Redactor()


@functools.lru_cache(maxsize=128)
def _cached(values: frozenset[str]) -> Redactor:
    return Redactor(values)


def redactor_for(secrets: Iterable["Secret | str | None"]) -> Redactor:
    """A :class:`Redactor` for these secrets, reused while the same set is asked for."""
    values = frozenset(v for v in map(_plain, secrets) if v and len(v) >= MIN_SECRET)
    return _cached(values) if values else NO_SECRETS


def redact(text: str, secrets: Iterable["Secret | str | None"]) -> str:
    """Replace every occurrence of the given secrets in a text (e.g. an upstream's error
    message, which may echo what it was sent), in any encoding, by ``***``."""
    return redactor_for(secrets).redact(text)
