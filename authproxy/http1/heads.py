"""Response heads going out to clients: the engine writes every status line and
header block through here, so a CR, LF or NUL in a caller's value can never become
a header injection, and framing headers are always the engine's own."""

from __future__ import annotations

import re
from typing import Iterable, Mapping

_DROPPED = frozenset(("content-length", "transfer-encoding", "connection"))
_REASON_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN_STR = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_STATUS_LINES: dict[tuple[int, str], str] = {}  # (status, reason) → "HTTP/1.1 200 OK\r\n"
_OUT_NAMES: dict[str, tuple[str, str]] = {}  # response header names already checked → (str, lower-case)


def response_head(
    status: int,
    reason: str,
    headers: Iterable[tuple[str, str]],
    framing: list[tuple[str, str]],
    *,
    keep_content_length: bool = False,
) -> bytes:
    """Serialise a response head: the caller's end-to-end headers without their
    framing (``framing`` is the engine's own), one latin-1 string, CRLF line ends.
    A CR, LF or NUL in a name or value is a bug of the caller (ValueError), never
    a header injection. ``keep_content_length`` passes the caller's length (HEAD)."""
    tail = "".join([f"{name}: {value}\r\n" for name, value in framing])
    return serialize_head(status, reason, headers, tail, keep_content_length)


def serialize_head(
    status: int, reason: str, headers: Iterable[tuple[str, str]], framing: str, keep_content_length: bool = False
) -> bytes:
    """:func:`response_head` with the engine's framing already as text (``"Name: value\\r\\n"``
    lines): the exchange builds it without a list of tuples per response."""
    line = _STATUS_LINES.get((status, reason))
    if line is None:
        if type(status) is not int or not 100 <= status <= 999:
            raise ValueError(f"bad status {status}")
        line = f"HTTP/1.1 {status} {_REASON_BAD.sub(' ', reason)}\r\n"
        if len(_STATUS_LINES) < 256:
            _STATUS_LINES[(status, reason)] = line
    parts = [line]
    t = type(headers)
    items = headers if t is list or t is tuple else (
        headers.items() if isinstance(headers, Mapping) else headers)  # fmt: skip
    names = _OUT_NAMES
    for name, value in items:
        known = names.get(name)
        if known is None:
            if not _TOKEN_STR.fullmatch(name):
                raise ValueError(f"bad response header name {name!r}")
            # A plain str to format (a CIMultiDict's keys are istr, which f-strings format slowly).
            known = (str.__str__(name), name.lower())
            if len(names) < 1024:
                names[name] = known
        if known[1] in _DROPPED:
            if not (keep_content_length and known[1] == "content-length" and value.strip().isdigit()):
                continue
            value = value.strip()
        parts.append(f"{known[0]}: {value}\r\n")
    block = "".join(parts)
    breaks = len(parts)
    if block.count("\n") != breaks or block.count("\r") != breaks or "\0" in block:
        raise ValueError("CR, LF or NUL in a response header value")
    return (block + framing + "\r\n").encode("latin-1")
