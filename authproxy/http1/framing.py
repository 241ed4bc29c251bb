"""The SPEC's framing rules for requests from clients (response heads: heads.py; chunk-size lines: chunked.py).

llhttp (through ``httptools``, strict: no leniency is ever enabled) does the
parsing; it already refuses most malformed input. What it accepts but the SPEC
does not (two spaces in the request line, ``HTTP/2.0`` or ``HTTP/0.9``,
``Transfer-Encoding: gzip, chunked``, a 19-digit ``Content-Length``, a head of
any size, chunk extensions of any size, ``Transfer-Encoding`` on HTTP/1.0,
bare CR/LF before the request line, several ``Host`` headers) is refused here,
from the parser's callbacks. Every refusal is a :class:`FramingError` with a
short plain reason, never llhttp's message (which may quote the client's bytes).

One :class:`RequestParser` (and one llhttp parser) per request message: llhttp
would happily run into the next pipelined message, so the parser is fed only
up to where this message can end and reports how much it consumed. A head or a
chunked body can only end right after a CRLFCRLF (strict llhttp admits no other
line end), so data is fed in pieces split after each CRLFCRLF and the end is
always a piece boundary; a ``Content-Length`` body is fed exactly its length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import httptools
from multidict import CIMultiDict

from .chunked import CHUNK_EXTENSIONS_BUDGET, ChunkLines
from .errors import FramingError

MAX_CONTENT_LENGTH_DIGITS = 18
CHUNK_OVERHEAD_PER_CHUNK = 16 + 4  # 16 hex digits, CRLF after the size, CRLF after the data
_CRLF2 = b"\r\n\r\n"
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
_VERSIONS = ("1.0", "1.1")
# llhttp's reason → ours; the first matching fragment wins. Unknown ones fall back per phase.
_LLHTTP_REASONS = (  # llhttp's message (lowercased) → ours; the first matching fragment wins
    ("can't be present with", "both Content-Length and Transfer-Encoding"),
    ("duplicate content-length", "several Content-Length headers"),
    ("content-length", "invalid Content-Length"),
    ("transfer-encoding", "invalid Transfer-Encoding"),
    ("chunk", "malformed chunked body"),
    ("header", "malformed header"),
    ("version", "malformed request line"),
    ("http/", "malformed request line"),
    ("method", "malformed request line"),
)


@dataclass(slots=True)
class RequestHead:
    """What the engine and the handler need to know about a request head."""

    method: str
    target: str
    version: str
    headers: CIMultiDict[str]
    content_length: int | None
    chunked: bool
    keep_alive: bool
    upgrade: bool
    expect_continue: bool

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


def _llhttp_reason(exc: Exception, in_head: bool) -> str:
    if isinstance(exc, httptools.HttpParserInvalidURLError):
        return "malformed request target"
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        return "malformed request line"
    message = str(exc).lower()
    for fragment, reason in _LLHTTP_REASONS:
        if fragment in message:
            return reason
    return "malformed request head" if in_head else "malformed request body"


def _tokens(values: Iterable[str]) -> set[str]:
    return {t.strip(" \t").lower() for v in values for t in v.split(",")}


_SPECIAL = frozenset((b"content-length", b"transfer-encoding", b"host", b"connection", b"expect"))
_NAMES: dict[bytes, tuple[str, bytes]] = {}  # header names already checked → (str, lower-case bytes)
_METHODS: dict[bytes, str] = {}
_LINE_END = {"1.1": b" HTTP/1.1\r\n", "1.0": b" HTTP/1.0\r\n"}


class RequestParser:
    """One request message, fed with :meth:`feed` until :attr:`complete`.

    Body bytes are collected in :attr:`body` for the owner to take after each
    feed. Raises :class:`FramingError` on anything the SPEC refuses."""

    __slots__ = (
        "_parser", "_max_head", "_head_buf", "_url", "_pairs", "_cl", "_te", "_hosts", "_conn",
        "_expect", "_last3", "_begun", "_error", "_body_fed", "_chunks", "head", "body",
        "body_received", "complete", "started", "_lines",
    )

    def __init__(self, max_head: int = 64 * 1024) -> None:
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._max_head = max_head
        self._head_buf: bytes | bytearray = b""  # every byte fed before the head completed (≤ max_head)
        self._url = b""
        self._pairs: list[tuple[str, str]] = []
        self._cl: int | None = None
        self._te = False
        self._hosts = 0
        self._conn: list[str] | None = None  # Connection values
        self._expect: str | None = None
        self._last3 = b""  # the last bytes fed, to find a CRLFCRLF split across two reads
        self._begun = False
        self._error: FramingError | None = None
        self._body_fed = 0  # bytes fed after the head (chunked overhead accounting)
        self._chunks = 0
        self._lines: ChunkLines | None = None  # a chunked body's size lines, once the head is in
        self.head: RequestHead | None = None
        self.body: list[bytes] = []
        self.body_received = 0
        self.complete = False
        self.started = False  # a first byte of this message arrived

    # -- feeding -----------------------------------------------------------------

    def feed(self, data: bytes) -> int:
        """Feed ``data``; returns how many bytes belong to this message. The rest
        (when :attr:`complete`) is the next message, or raw bytes after an upgrade."""
        used = self._feed_all(data)
        if self.complete:
            # llhttp holds our bound callbacks and we hold it: a reference cycle that only
            # the garbage collector would free. Done with it, so the cycle goes now.
            self._parser = None
        return used

    def _feed_all(self, data: bytes) -> int:
        pos, n = 0, len(data)
        if not self.started and n:
            self.started = True
            # The usual case: the whole head in the first read. One feed, no copies.
            i = data.find(_CRLF2)
            if 0 < i <= self._max_head - 4:
                end = i + 4
                piece = data if end == n else data[:end]
                self._head_buf = piece
                upgraded_at = self._feed(piece, True)
                self._last3 = piece[-3:]
                if upgraded_at is not None:
                    return upgraded_at
                if self.head is None:  # never expected: llhttp ends a head at CRLF CRLF
                    self._head_buf = bytearray(piece)
                elif not self.complete:
                    self._body_fed = 0
                    self._check_chunk_overhead()
                pos = end
            else:
                self._head_buf = bytearray()
        elif not self.started:
            return 0
        if pos < n and not self.complete:
            return self._feed_rest(data, pos, n)
        return pos

    def _feed_rest(self, data: bytes, pos: int, n: int) -> int:
        view = memoryview(data)
        while pos < n and not self.complete:
            head = self.head
            if head is None:
                end = self._next_split(data, pos)
                budget = self._max_head - len(self._head_buf)
                if end - pos > budget:
                    end = pos + budget
                self._head_buf += view[pos:end]  # type: ignore[operator]
            elif head.chunked:
                end = self._next_split(data, pos)
            else:
                end = min(n, pos + (head.content_length or 0) - self.body_received)
                if end <= pos:  # llhttp should have completed the message; never expected
                    raise FramingError("malformed request")
                # A Content-Length body needs no parsing: its bytes pass as they came (the
                # whole read when it is all body), without llhttp copying them once more.
                chunk = data if pos == 0 and end == n else data[pos:end]
                self.body.append(chunk)
                self.body_received += end - pos
                if self.body_received == head.content_length:
                    self.complete = True
                pos = end
                continue
            piece = view[pos:end]
            upgraded_at = self._feed(piece, head is None)
            self._last3 = (self._last3 + bytes(view[max(pos, end - 3) : end]))[-3:]
            if upgraded_at is not None:
                return pos + upgraded_at
            if self.head is None:
                if len(self._head_buf) >= self._max_head:
                    raise FramingError("request head too large")
            else:
                if head is not None:
                    self._body_fed += end - pos
                elif not self.complete:  # the head ended here; what follows is body
                    self._body_fed = 0
                self._check_chunk_overhead()
                if head is not None and head.chunked:
                    self._chunk_lines(data, pos, end)
            pos = end
        return pos

    def _next_split(self, data: bytes, pos: int) -> int:
        """Just past the next CRLFCRLF from ``pos`` (counting bytes already fed), or the end."""
        if self._last3:
            i = (self._last3 + data[pos : pos + 3]).find(_CRLF2)
            if i != -1:
                return pos + i + 4 - len(self._last3)
        i = data.find(_CRLF2, pos)
        return len(data) if i == -1 else i + 4

    def _feed(self, piece: memoryview, in_head: bool) -> int | None:
        """Feed llhttp; returns the upgrade offset within ``piece`` when the message became raw."""
        try:
            self._parser.feed_data(piece)
        except httptools.HttpParserUpgrade as exc:
            return self._upgraded(piece, int(exc.args[0]))
        except httptools.HttpParserError as exc:
            if self._error is not None:
                raise self._error from None
            raise FramingError(_llhttp_reason(exc, in_head)) from None
        if self._error is not None:  # raised in a callback llhttp doesn't check (never expected)
            raise self._error
        return None

    def _upgraded(self, piece: memoryview, offset: int) -> int | None:
        """llhttp skips the body of an Upgrade request and hands back the rest as raw.
        Such a body is still a body if the handler declines the upgrade: it is decoded
        by a body-only llhttp parser (a fixed synthetic head giving the same framing)."""
        head = self.head
        assert head is not None
        if head.method == "CONNECT" or not head.has_body:
            self.complete = True
            return offset
        framing = b"Transfer-Encoding: chunked" if head.chunked else b"Content-Length: %d" % head.content_length
        self._parser = httptools.HttpRequestParser(_BodyOnly(self))
        self._parser.feed_data(b"PUT / HTTP/1.1\r\nHost: body\r\n" + framing + b"\r\n\r\n")
        self.complete = False
        rest = piece[offset:]
        if rest:
            self._body_fed += len(rest)
            upgraded = self._feed(rest, False)
            assert upgraded is None
            self._check_chunk_overhead()
            if head.chunked:
                self._chunk_lines(bytes(rest), 0, len(rest))
        return None

    def _chunk_lines(self, data: bytes, pos: int, end: int) -> None:
        lines = self._lines
        if lines is None:
            lines = self._lines = ChunkLines()
        lines.feed(data, pos, end)

    def _check_chunk_overhead(self) -> None:
        """httptools does not expose chunk extensions: bound them by what llhttp consumed
        beyond the body bytes it delivered (sizes, CRLFs, extensions, trailers)."""
        if self.head is not None and self.head.chunked:
            allowed = (self._chunks + 1) * CHUNK_OVERHEAD_PER_CHUNK + CHUNK_EXTENSIONS_BUDGET
            if self._body_fed - self.body_received > allowed:
                raise FramingError("chunk extensions too long")

    def _fail(self, reason: str) -> FramingError:
        self._error = FramingError(reason)
        return self._error

    # -- llhttp callbacks --------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._begun:  # llhttp ran into a next message: never expected given the splits
            raise self._fail("malformed request")
        self._begun = True

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        known = _NAMES.get(name)
        if known is None:
            if not _TOKEN.fullmatch(name):
                raise self._fail("malformed header")
            known = (name.decode("latin-1"), name.lower())
            if len(_NAMES) < 1024:
                _NAMES[name] = known
        if _BAD_VALUE.search(value):
            raise self._fail("malformed header")
        if self.head is not None:  # a trailer field: checked, then dropped
            return
        value = value.strip(b" \t")
        sname, lname = known
        if lname in _SPECIAL:
            if lname == b"content-length":
                if self._cl is not None:
                    raise self._fail("several Content-Length headers")
                if not value.isdigit() or len(value) > MAX_CONTENT_LENGTH_DIGITS:
                    raise self._fail("invalid Content-Length")
                self._cl = int(value)
            elif lname == b"transfer-encoding":
                if self._te:
                    raise self._fail("repeated Transfer-Encoding")
                if value.lower() != b"chunked":
                    raise self._fail("invalid Transfer-Encoding")
                self._te = True
            elif lname == b"host":
                self._hosts += 1
            elif lname == b"connection":
                if self._conn is None:
                    self._conn = []
                self._conn.append(value.decode("latin-1"))
            elif self._expect is None:  # expect: the first one counts
                self._expect = value.decode("latin-1")
        self._pairs.append((sname, value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = parser.get_http_version()
        if version not in _VERSIONS:
            raise self._fail("unsupported HTTP version")
        method = parser.get_method()
        self._check_request_line(method, version)
        if self._cl is not None and self._te:
            raise self._fail("both Content-Length and Transfer-Encoding")
        if self._te and version == "1.0":
            raise self._fail("Transfer-Encoding in an HTTP/1.0 request")
        if self._hosts != 1 and (self._hosts or version == "1.1"):
            raise self._fail("missing or repeated Host header")
        if self._conn is None:
            keep_alive = version == "1.1"
        else:
            conn = _tokens(self._conn)
            keep_alive = "close" not in conn if version == "1.1" else "keep-alive" in conn
        name = _METHODS.get(method)
        if name is None:
            name = method.decode("ascii")
            if len(_METHODS) < 64:
                _METHODS[method] = name
        has_body = self._te or bool(self._cl)
        self.head = RequestHead(
            name,
            self._url.decode("latin-1"),
            version,
            CIMultiDict(self._pairs),
            self._cl,
            self._te,
            keep_alive,
            parser.should_upgrade(),
            version == "1.1" and has_body and self._expect is not None and self._expect.lower() == "100-continue",
        )

    def _check_request_line(self, method: bytes, version: str) -> None:
        """Exactly ``METHOD SP target SP HTTP/1.x CRLF`` (after optional empty CRLF
        lines): compared byte for byte with what llhttp parsed, which tolerates
        several spaces and a bare CR or LF before the request line."""
        buf = self._head_buf
        start = 0
        while buf.startswith(b"\r\n", start):
            start += 2
        if not buf.startswith(b"%s %s%s" % (method, self._url, _LINE_END[version]), start):
            raise self._fail("malformed request line")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.body_received += len(body)

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_message_complete(self) -> None:
        self.complete = True


class _BodyOnly:
    """Callbacks of the body-only parser of a declined upgrade: body and chunks go to
    the request's parser; the synthetic head is not the client's."""

    def __init__(self, owner: RequestParser) -> None:
        self.on_body = owner.on_body
        self.on_chunk_header = owner.on_chunk_header
        self.on_message_complete = owner.on_message_complete
        self._owner = owner

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._owner.head is not None and self._owner.body_received + self._owner._chunks:
            self._owner.on_header(name, value)  # trailers of the real body
