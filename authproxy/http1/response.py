"""The response side of one upstream exchange: the head's fields and the body stream.

Why a separate body object per response: a :class:`Response` the caller kept after
releasing it must never read the bytes of the next exchange on the same connection.
Why ``read()`` raises instead of returning ``b""`` when the body broke off: a proxy
that passed a truncated body on as complete would hand the client a corrupt file that
looks whole.
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING

import httptools
from multidict import CIMultiDict

from .errors import ResponseBodyError, ResponseFramingError, UpstreamError, UpstreamTimeout
if TYPE_CHECKING:
    from .client import Connection
    from .tunnel import RawStream

__all__ = ["Response", "ResponseBodyTimeout", "ResponseParser", "ResponseTooLarge"]

HIGH_WATER = 256 * 1024  # unread body above this pauses reading from the socket
MAX_HEAD = 64 * 1024  # a response head larger than this is refused
BIG_PIECE = 64 * 1024  # a body piece this large is handed on by itself, never joined with the next


class ResponseBodyTimeout(ResponseBodyError, UpstreamTimeout):
    """The body had not ended by the exchange's deadline: a broken body (never to be
    passed on as complete) and a timeout (for logs and metrics)."""


class ResponseTooLarge(UpstreamError):
    """:meth:`Response.read_all` found a body over its limit; the connection is closed."""


def _short(e: BaseException) -> str:
    """llhttp's reason, without any of the bytes it choked on (they could be secrets)."""
    return str(e).split("\n", 1)[0][:120] or type(e).__name__


_NAMES: dict[str, str] = {}  # header names seen → lower-case
_FRAMING = frozenset(("content-length", "transfer-encoding", "connection"))


class ResponseParser:
    """One response: a fresh llhttp parser and the framing rules on top of it.

    Fed exactly the head (:meth:`feed_head` finds its end itself: llhttp is strict, so
    a head ends at the first CRLF CRLF and nowhere else), then, for a chunked body
    only, the body (``parser.feed_data``); a second message is refused.

    llhttp validates the head; the fields are then read from the head's text in one
    pass, not through a callback per field: strict llhttp admits exactly
    ``name ":" OWS value OWS CRLF`` per line (no obs-fold, no bare CR or LF), so
    splitting the validated head on CRLF and each line at its first colon is exact."""

    __slots__ = ("label", "parser", "body", "_tail", "_head", "_head_len", "_reason", "_pairs", "cl", "cl_count",
                 "te_count", "_messages", "conn_tokens", "head_done", "msg_done", "keep_alive", "error",
                 "status", "version")  # fmt: skip

    def __init__(self, label: str) -> None:
        self.label = label
        self.parser = httptools.HttpResponseParser(self)
        self.body: _Body | None = None  # where a chunked body goes
        self._tail = b""  # the last bytes of the head so far, to find a CRLF CRLF split across reads
        self._head: list[bytes] | None = None  # the head's earlier pieces when it spans reads
        self._head_len = 0
        self._reason = b""
        self._pairs: list[tuple[str, str]] = []
        self.cl: int | None = None
        self.cl_count = self.te_count = self._messages = 0
        self.conn_tokens: frozenset[str] | set[str] = _NO_TOKENS
        self.head_done = self.msg_done = False
        self.keep_alive = False  # llhttp's verdict, taken at headers-complete (it resets after the message)
        self.error: ResponseFramingError | None = None
        self.status = 0  # these two are llhttp's, taken at headers-complete
        self.version = ""

    def close(self) -> None:
        """Drop llhttp once it is no longer fed: it holds our bound callbacks and we hold
        it, a reference cycle that only the garbage collector would otherwise free."""
        self.parser = None
        self.body = None

    @property
    def reason(self) -> str:
        return self._reason.decode("latin-1")

    def headers(self) -> CIMultiDict[str]:
        return CIMultiDict(self._pairs)

    def refuse(self, what: str) -> ResponseFramingError:
        self.error = ResponseFramingError(f"{self.label} sent an invalid response: {what}")
        return self.error

    def feed_head(self, data: bytes) -> int:
        """Parse the part of ``data`` that belongs to the head. → how many bytes of
        ``data`` that was if the head ended, else -1. Raises ResponseFramingError."""
        tail = self._tail
        end = -1
        if tail:
            i = (tail + data[:3]).find(b"\r\n\r\n")
            end = i + 4 - len(tail) if i >= 0 else -1
        if end < 0:
            i = data.find(b"\r\n\r\n")
            end = i + 4 if i >= 0 else -1
        piece = data if end < 0 or end == len(data) else data[:end]
        self._head_len += len(piece)
        if self._head_len > MAX_HEAD:
            raise self.refuse(f"a response head over {MAX_HEAD} bytes")
        try:
            self.parser.feed_data(piece)
        except httptools.HttpParserUpgrade:
            pass  # 101: llhttp stops at the end of the head, where we stopped feeding anyway
        except httptools.HttpParserError as e:
            if not (self.head_done and self.status == 101 and self.error is None):
                raise (self.error or self.refuse(_short(e))) from None
        if end < 0:
            if self.head_done:
                raise self.refuse("the head ended without CRLF CRLF")
            self._tail = (tail + piece)[-3:]
            if self._head is None:
                self._head = []
            self._head.append(bytes(piece))
            return -1
        if not self.head_done:
            raise self.refuse("an incomplete response head")
        if self._head is not None:
            self._head.append(bytes(piece))
            piece = b"".join(self._head)
            self._head = None
        self._fields(piece)
        return end

    def _fields(self, head: bytes) -> None:
        """The header fields of a head llhttp accepted, and the framing rules on them."""
        lines = head.decode("latin-1").split("\r\n")
        pairs = self._pairs
        names = _NAMES
        for line in lines[1:-2]:  # after the status line; the head ends with CRLF CRLF
            name, _, value = line.partition(":")
            value = value.strip(" \t")
            pairs.append((name, value))
            low = names.get(name)
            if low is None:
                low = name.lower()
                if len(names) < 1024:
                    names[name] = low
            if low in _FRAMING:
                if low == "content-length":
                    self.cl_count += 1
                    if self.cl_count > 1:
                        raise self.refuse("several Content-Length headers")
                    if not (value.isascii() and value.isdigit()) or len(value) > 18:
                        raise self.refuse("a Content-Length that is not a decimal number")
                    self.cl = int(value)
                elif low == "transfer-encoding":
                    self.te_count += 1
                    if self.te_count > 1 or value.lower() != "chunked":
                        raise self.refuse("a Transfer-Encoding other than exactly chunked")
                elif "," in value:
                    self.conn_tokens = {t.strip(" \t") for t in value.lower().split(",")} | self.conn_tokens
                else:
                    self.conn_tokens = {value.lower()} | self.conn_tokens
        if self.cl_count and self.te_count:
            raise self.refuse("both Content-Length and Transfer-Encoding")

    # llhttp's callbacks
    def on_message_begin(self) -> None:
        self._messages += 1
        if self._messages > 1:  # only reachable in a chunked body: bytes beyond the response
            raise self.refuse("bytes after the end of the response")

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_headers_complete(self) -> None:
        parser = self.parser
        self.keep_alive = parser.should_keep_alive()
        self.status = parser.get_status_code()
        self.version = parser.get_http_version()
        self.head_done = True

    def on_body(self, data: bytes) -> None:
        self.body.feed(data)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        self.msg_done = True


_NO_TOKENS: frozenset[str] = frozenset()


class _Body:
    """The received, unread part of one response body. One per response, so a stale
    :class:`Response` can never read the next exchange's bytes."""

    __slots__ = ("chunks", "size", "done", "error", "waiter", "conn")

    def __init__(self, conn: "Connection") -> None:
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.done = False  # every byte of the body was received
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.conn = conn

    def feed(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size > HIGH_WATER:
            self.conn._pause()
        self._wake()

    def finish(self) -> None:
        self.done = True
        self._wake()

    def fail(self, exc: BaseException, drop: bool = False) -> None:
        """The body will not be complete. ``drop``: nobody may read what was buffered."""
        if self.done or self.error is not None:
            return
        self.error = exc
        if drop:
            self.chunks.clear()
            self.size = 0
        self._wake()

    def _wake(self) -> None:
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    async def read(self) -> bytes:
        while not self.chunks:
            if self.error is not None:
                raise self.error
            if self.done:
                return b""
            self.waiter = self.conn._loop.create_future()
            await self.waiter
        chunks = self.chunks
        if len(chunks) == 1 or len(chunks[0]) >= BIG_PIECE:
            data = chunks.popleft()  # a big piece goes on alone: joining would copy it once more
            self.size -= len(data)
        else:
            data = b"".join(chunks)
            chunks.clear()
            self.size = 0
        if self.size <= HIGH_WATER:
            self.conn._resume()
        return data


class Response:
    """A response head and its body stream. :meth:`release` (or ``async with``) when
    done: a complete, reusable exchange returns the connection to the pool, anything
    else closes it. :meth:`read` releases by itself at the end of the body."""

    __slots__ = ("status", "reason", "version", "headers", "content_length", "chunked", "will_close",
                 "bytes_read", "upgraded", "_conn", "_body")  # fmt: skip

    def __init__(self, conn: "Connection", body: _Body, status: int, reason: str, version: str,
                 headers: CIMultiDict[str], content_length: int | None, chunked: bool, will_close: bool) -> None:  # fmt: skip
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.content_length = content_length  # the header's value, even for HEAD/304 (no body follows)
        self.chunked = chunked
        self.will_close = will_close  # as known at the head: the connection will not be reused
        self.bytes_read = 0  # body bytes returned by read() so far
        self.upgraded = status == 101
        self._conn: Connection | None = conn
        self._body = body

    async def read(self) -> bytes:
        """The next piece of the body as it arrived; ``b""`` at its end. Raises
        :class:`ResponseBodyError` (or :class:`ResponseBodyTimeout`) if it broke off."""
        data = await self._body.read()
        if data:
            self.bytes_read += len(data)
        elif not self.upgraded:
            self.release()
        return data

    async def read_all(self, limit: int | None = None) -> bytes:
        """The whole body. Over ``limit`` bytes: :class:`ResponseTooLarge`, connection closed."""
        body = self._body
        if body.done and body.error is None and not self.upgraded:  # all here already: no await
            chunks = body.chunks
            data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            body.size = 0
            if limit is not None and len(data) > limit:
                self.release()
                raise ResponseTooLarge(f"the response body is over {limit} bytes")
            self.bytes_read += len(data)
            self.release()
            return data
        if limit is not None and self.content_length is not None and self.content_length > limit and not self._body.done:
            self.release()
            raise ResponseTooLarge(f"the response body ({self.content_length} bytes) is over {limit} bytes")
        parts: list[bytes] = []
        size = 0
        while data := await self.read():
            size += len(data)
            if limit is not None and size > limit:
                self.release()
                raise ResponseTooLarge(f"the response body is over {limit} bytes")
            parts.append(data)
        return b"".join(parts)

    def release(self) -> None:
        """Idempotent. Hands the connection back (reused only if the exchange ended cleanly)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.release()

    def takeover(self) -> tuple[asyncio.Transport, RawStream]:
        """After a 101: the raw transport and the bytes that follow the head. The
        connection leaves the pool. ``transport.get_protocol().drain()`` waits for
        the write buffer to empty (backpressure)."""
        conn = self._conn
        if conn is None or not self.upgraded:
            raise RuntimeError("takeover() needs an unreleased 101 response")
        self._conn = None
        return conn.takeover()

    async def __aenter__(self) -> "Response":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        conn, self._conn = getattr(self, "_conn", None), None
        if conn is not None:  # never released: don't leak the connection's slot
            try:
                conn.abort()
                conn.release()
            except Exception:  # noqa: BLE001 - the loop may be gone
                pass
