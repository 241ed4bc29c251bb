"""``multipart/form-data`` fields read and set by name, every other byte kept.

FogBugz client libraries (FogBugzPy among them) POST every command as
``multipart/form-data``, with ``cmd`` and ``token`` as form fields beside any
attached files. authproxy must see the ``cmd`` and set the ``token`` field —
and nothing else: a re-encoded body could change an attachment's bytes, its
headers, the line breaks or the order of the fields.

So this module does not parse and rebuild the form. It finds the delimiter
lines (RFC 2046 §5.1.1: ``--boundary`` at the start of a line, then
``--`` for the last one, or optional white space and the line break), reads
each part's ``Content-Disposition`` name (RFC 7578 §4.2, through the stdlib
``email`` header parser, which handles quoting and RFC 2231), and edits the
original bytes at those offsets only: the first part of the field's name gets
the new value, any further ones are removed, and a missing field is added as
the last part. Every other byte — preamble, other parts, file contents,
epilogue — stays as the client sent it.

Line breaks: RFC 2046 says CRLF; bare LF is accepted as well, because the
servers this talks to (ASP.NET's form reader among them) accept it, and a
field they see but authproxy did not would defeat the point. A body that is
not well-formed (no boundary, no closing delimiter, a part without the blank
line after its headers) is reported as such (``None``) and left alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message
from email.utils import collapse_rfc2231_value

MAX_BOUNDARY = 200  # RFC 2046 says at most 70; be lenient, but not unbounded
_PADDING = b" \t"


@dataclass(frozen=True)
class Part:
    start: int  # offset of the part's delimiter line ("--boundary")
    head: int  # first byte after the delimiter line: the part's header block
    content: int  # first byte of the part's content
    end: int  # end of the content: the line break before the next delimiter
    next: int  # offset of the next delimiter line
    name: str | None  # the Content-Disposition name, as sent
    filename: str | None


@dataclass(frozen=True)
class Form:
    boundary: bytes
    parts: tuple[Part, ...]
    close: int  # offset of the closing delimiter ("--boundary--")

    def named(self, name: str) -> list[Part]:
        """The parts of one field, the name compared case-insensitively (as ASP.NET
        and classic ASP read form fields)."""
        wanted = name.lower()
        return [p for p in self.parts if p.name is not None and p.name.lower() == wanted]


def boundary(content_type: str) -> bytes | None:
    """The boundary of a ``multipart/form-data`` Content-Type, or None (another type,
    no boundary, or one that cannot be a boundary)."""
    if content_type.split(";", 1)[0].strip().lower() != "multipart/form-data":
        return None
    msg = Message()
    msg["Content-Type"] = content_type
    value = msg.get_param("boundary")
    if isinstance(value, tuple):
        value = collapse_rfc2231_value(value)
    if not isinstance(value, str) or not value or len(value) > MAX_BOUNDARY:
        return None
    if any(c in value for c in "\r\n") or not value.isascii():
        return None
    return value.encode("ascii")


def parse(body: bytes, content_type: str, lenient: bool = False) -> Form | None:
    """Where each part of a ``multipart/form-data`` body is; None if the body is not
    one (or not a well-formed one). ``lenient`` skips a part without a header block
    instead of giving up: what a forgiving server may still read, for questions where
    seeing too much is safe (is this a logoff?), never for rewriting."""
    b = boundary(content_type)
    if b is None:
        return None
    dash = b"--" + b
    delimiters = _delimiters(body, dash)
    if delimiters is None:
        return None
    *openings, (close, _) = delimiters
    parts: list[Part] = []
    for i, (start, head) in enumerate(openings):
        nxt = delimiters[i + 1][0]
        end = _line_break_before(body, nxt)
        headers, content = _header_block(body, head, end)
        if content is None:
            if lenient:
                continue
            return None
        name, filename = _disposition(headers)
        parts.append(Part(start, head, content, end, nxt, name, filename))
    return Form(b, tuple(parts), close)


def values(body: bytes, content_type: str, name: str) -> list[bytes] | None:
    """The contents of every (non-file) part named ``name``, read leniently; None if
    the body is not multipart/form-data at all."""
    b = boundary(content_type)
    if b is None:
        return None
    form = parse(body, content_type, lenient=True)
    if form is None:  # no closing delimiter: read as if the body ended with one
        body += b"\r\n--" + b + b"--"
        form = parse(body, content_type, lenient=True)
    if form is None:
        return None
    return [body[p.content : p.end] for p in form.named(name) if p.filename is None]


def set_field(body: bytes, content_type: str, name: str, value: bytes) -> bytes | None:
    """The body with exactly one field ``name`` holding ``value``: the first such part
    is replaced in place (its headers too, so no Content-Transfer-Encoding or charset
    of the client's applies to the new value), later ones are removed, and without one
    a part is added at the end. None if the body is not well-formed multipart/form-data.
    ``name`` must be a plain token (it is written unescaped)."""
    form = parse(body, content_type)
    if form is None:
        return None
    def part(eol: bytes) -> bytes:
        return b'Content-Disposition: form-data; name="' + name.encode("ascii") + b'"' + eol + eol + value

    matching = form.named(name)
    edits: list[tuple[int, int, bytes]] = []  # (start, end, replacement), applied from the end
    if matching:
        first, *rest = matching
        edits.append((first.head, first.end, part(_eol(body, first.head))))
        edits.extend((p.start, p.next, b"") for p in rest)
    else:
        eol = _eol(body, form.close) if form.close else b"\r\n"
        edits.append((form.close, form.close, b"--" + form.boundary + eol + part(eol) + eol))
    out = body
    for start, end, replacement in sorted(edits, reverse=True):
        out = out[:start] + replacement + out[end:]
    return out


# --------------------------------------------------------------------------- the byte level


def _delimiters(body: bytes, dash: bytes) -> list[tuple[int, int]] | None:
    """[(offset of a delimiter line, offset after it), ...] ending with the closing
    delimiter's (offset, offset after "--boundary--"); None without a closing one."""
    found: list[tuple[int, int]] = []
    pos = 0
    while True:
        if pos == 0 and body.startswith(dash):
            at = 0
        else:
            nl = body.find(b"\n" + dash, pos)
            if nl < 0:
                return None
            at = nl + 1
        after = at + len(dash)
        if body.startswith(b"--", after):
            found.append((at, after + 2))
            return found
        line_end = _delimiter_line_end(body, after)
        if line_end is not None:
            found.append((at, line_end))
        # "--boundaryX...": not a delimiter line, so part of the content; look further.
        pos = line_end if line_end is not None else after


def _delimiter_line_end(body: bytes, i: int) -> int | None:
    """After "--boundary": optional transport padding, then the line break; the offset
    after it, or None when the line goes on (so it was no delimiter)."""
    n = len(body)
    while i < n and body[i] in _PADDING:
        i += 1
    if body.startswith(b"\r\n", i):
        return i + 2
    if body.startswith(b"\n", i):
        return i + 1
    return None


def _eol(body: bytes, line_start: int) -> bytes:
    """The line break that ends the line before ``line_start``: new lines match it."""
    return b"\r\n" if body[line_start - 2 : line_start] == b"\r\n" else b"\n"


def _line_break_before(body: bytes, delimiter: int) -> int:
    """The offset of the line break that a delimiter line at ``delimiter`` begins with."""
    if delimiter >= 2 and body[delimiter - 2 : delimiter] == b"\r\n":
        return delimiter - 2
    return delimiter - 1


def _header_block(body: bytes, head: int, end: int) -> tuple[list[bytes], int | None]:
    """The header lines of a part and the offset of its content (None: no blank line)."""
    lines: list[bytes] = []
    pos = head
    while pos <= end:
        nl = body.find(b"\n", pos, end)
        if nl < 0:
            return lines, None
        line = body[pos:nl]
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            return lines, nl + 1
        if line[:1] in (b" ", b"\t") and lines:  # obsolete line folding
            lines[-1] += b" " + line.strip()
        else:
            lines.append(line)
        pos = nl + 1
    return lines, None


def _disposition(headers: list[bytes]) -> tuple[str | None, str | None]:
    for line in headers:
        key, sep, value = line.partition(b":")
        if not sep or key.strip().lower() != b"content-disposition":
            continue
        msg = Message()
        msg["Content-Disposition"] = value.strip().decode("utf-8", "surrogateescape")
        return _param(msg, "name"), _param(msg, "filename")
    return None, None


def _param(msg: Message, name: str) -> str | None:
    value = msg.get_param(name, header="content-disposition")
    if isinstance(value, tuple):
        value = collapse_rfc2231_value(value)
    return value if isinstance(value, str) else None
