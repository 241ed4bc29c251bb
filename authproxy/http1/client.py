"""One upstream HTTP/1.1 connection: an :class:`asyncio.Protocol` with explicit states.

IDLE → WRITING (request out, no answer yet) → HEAD (response head arriving) → BODY →
DONE, or CLOSED / UPGRADED. The pool (``pool.py``) owns the connections; this module
knows one exchange at a time and nothing of the pool but three callbacks. The parser
of one response and the body stream are in ``response.py``; sending a streamed
request body, with backpressure, is in ``upload.py``.

Why it is built this way (the old pool kept one parser per connection, and the tail
of one response became the head of another client's response):

* A fresh ``httptools.HttpResponseParser`` per response, and it is fed *exactly* the
  head: we find the ``CRLF CRLF`` ourselves (llhttp is strict, so a head can end
  nowhere else) and parse the body by Content-Length or until EOF without llhttp.
  Only a chunked body goes through llhttp, and a second message there is refused in
  ``on_message_begin``. So we always know where a response ends: any byte beyond it,
  or any byte on an idle connection, closes that connection.
* HEAD, 204 and 304 have no body whatever the head says, decided by us (llhttp cannot
  be told about HEAD). A HEAD/204 head that declares a body closes the connection
  afterwards: a body sent anyway could arrive later, as the "next" response.
* Ambiguous framing (CL and TE, several CL, a TE other than ``chunked``, a non-decimal
  CL) is refused in ``on_header``/``on_headers_complete`` on top of llhttp's own strict
  checks; leniencies are never enabled.
* A body that breaks after the head was returned raises from :meth:`Response.read`,
  never a clean EOF; unread body over ``HIGH_WATER`` pauses reading the socket.
"""

from __future__ import annotations

import asyncio
import enum
from typing import TYPE_CHECKING, AsyncIterator, Callable

import httptools
from .errors import Disconnected, ResponseBodyError, ResponseFramingError, UpstreamTimeout
from .response import Response, ResponseBodyTimeout, ResponseParser, _Body, _short
from .upload import _FLOW_ERRORS, WRITE_HIGH_WATER, Upload

if TYPE_CHECKING:
    from .tunnel import RawStream

__all__ = ["Connection", "State"]

INLINE_BODY = 64 * 1024  # a body up to this size goes out in the same write as the head
_LENGTH, _CHUNKED, _EOF = 1, 2, 3  # how the body of the current response is delimited


class State(enum.Enum):
    IDLE = "idle"
    WRITING = "writing"  # a request is (being) sent; no byte of the answer yet
    HEAD = "head"  # bytes of a response head (or of a 1xx) have arrived
    BODY = "body"
    DONE = "done"  # the response is complete; waiting for release
    UPGRADED = "upgraded"  # after a 101: raw bytes, no HTTP any more
    CLOSED = "closed"


_IDLE, _WRITING, _HEAD, _BODY = State.IDLE, State.WRITING, State.HEAD, State.BODY
_DONE, _UPGRADED, _CLOSED = State.DONE, State.UPGRADED, State.CLOSED


class Connection(Upload, asyncio.Protocol):
    """One upstream connection; one exchange at a time. ``on_release(conn)`` is called
    when the response is released, ``on_idle_lost(conn)`` when an idle connection
    closes or sends bytes nobody asked for, ``on_detach(conn)`` at takeover."""

    def __init__(self, loop: asyncio.AbstractEventLoop, label: str, on_release: Callable[["Connection"], None],
                 on_idle_lost: Callable[["Connection"], None], on_detach: Callable[["Connection"], None]) -> None:  # fmt: skip
        self._loop = loop
        self.label = label  # the origin, for messages (never a header value: it could be a secret)
        self._on_release, self._on_idle_lost, self._on_detach = on_release, on_idle_lost, on_detach
        self.transport: asyncio.Transport | None = None
        self.state = _IDLE
        self.pooled = False  # in the pool's idle list
        self.idle_since = 0.0
        self.deadline: float | None = None  # loop time by which the current exchange must end
        self.sent = False  # a byte of the current request was handed to the transport
        self.got = False  # a byte of a response to the current request arrived
        self.will_close = False  # the connection must not carry another exchange
        self._method = ""
        self._upgrade = False
        self._head_fut: asyncio.Future[Response] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._body: _Body | None = None
        self._raw: RawStream | None = None
        self._raw_transport: asyncio.Transport | None = None
        self._mode = 0
        self._remaining = 0
        self._write_paused = self._read_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._p = ResponseParser(label)

    # ------------------------------------------------------------ the exchange
    def exchange(self, method: str, head: bytes, body: bytes | None, stream: AsyncIterator[bytes] | None,
                 length: int | None, deadline: float | None, upgrade: bool = False) -> asyncio.Future[Response]:  # fmt: skip
        """Send one request (head + body, or head then the stream with backpressure) and
        return at its final response head. Failures: :class:`Disconnected` (``sent``
        and ``got`` say whether it may be retried), ``RequestBodyError``, framing, timeout.
        ``upgrade``: the request asked for a protocol switch (else a 101 is refused).
        Returns the future of the response head (a plain function: no coroutine per request)."""
        self.sent = self.got = False
        t = self.transport
        if t is None or t.is_closing() or self.state is not _IDLE or self.will_close:
            raise Disconnected(f"{self.label} closed the connection before the request was sent")
        self.state, self._method, self.deadline, self._upgrade = _WRITING, method, deadline, upgrade
        self.sent = True
        self._p = ResponseParser(self.label)  # a fresh parser for every response
        fut = self._head_fut = self._loop.create_future()
        if body is None:
            t.write(head)
        elif len(body) <= INLINE_BODY:
            t.write(head + body)
        else:
            t.write(head)
            t.write(body)
        if stream is not None:
            self._writer = self._loop.create_task(self._pump(stream, length))
        return fut

    # ------------------------------------------------------------ transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        try:  # a streamed request body pauses at this much unsent (the loop's default, 64 KiB, stalls uploads)
            transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        except _FLOW_ERRORS:
            pass

    def data_received(self, data: bytes) -> None:
        st = self.state
        if st is _BODY:
            mode = self._mode
            if mode == _LENGTH:
                self._length_body(data)
            elif mode == _CHUNKED:
                self._chunked_body(data)
            elif data:
                self._body.feed(data)  # type: ignore[union-attr]
        elif st is _WRITING or st is _HEAD:
            self._head_bytes(data)
        elif st is _UPGRADED:
            self._raw.feed(data)  # type: ignore[union-attr]
        elif data:  # idle, done or closing: bytes nobody asked for; this connection can't be trusted
            self.will_close = True
            if self.transport is not None:
                self.transport.abort()

    def eof_received(self) -> bool | None:
        if self.state is _UPGRADED:
            self._raw.feed_eof()  # type: ignore[union-attr]
            return True  # a half-close: the other direction may still be relayed
        return None  # close our side too; connection_lost ends whatever was under way

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self._wake_drain()
        st, self.state = self.state, _CLOSED
        self.deadline = None
        self.will_close = True
        if st is _IDLE:
            self._on_idle_lost(self)
        elif st is _WRITING or st is _HEAD:
            why = f" ({_short(exc)})" if exc is not None else ""
            where = "in the middle of the response head" if self.got else "before answering"
            self._fail_head(Disconnected(f"{self.label} closed the connection {where}{why}"))
        elif st is _BODY:
            if self._mode == _EOF and exc is None:
                self._body.finish()  # type: ignore[union-attr]  # a close-delimited body ends here
            else:
                self._body.fail(ResponseBodyError(f"{self.label} closed the connection in the middle of the response body"))  # type: ignore[union-attr]
        elif st is _UPGRADED:
            self.state = _UPGRADED
            if exc is not None:
                self._raw.set_exception(ConnectionResetError(_short(exc)))  # type: ignore[union-attr]
            else:
                self._raw.feed_eof()  # type: ignore[union-attr]
        w = self._writer
        if w is not None and not w.done():
            w.cancel()

    def _pause(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            try:
                self.transport.pause_reading()
            except _FLOW_ERRORS:
                pass

    def _resume(self) -> None:
        if self._read_paused:
            self._read_paused = False
            if self.transport is not None:
                try:
                    self.transport.resume_reading()
                except _FLOW_ERRORS:
                    pass

    # ------------------------------------------------------------ the response head
    def _head_bytes(self, data: bytes) -> None:
        """Feed the parser up to the end of the head; then the rest per the response."""
        self.got = True
        while data:
            self.state = _HEAD
            try:
                end = self._p.feed_head(data)
            except ResponseFramingError as e:
                return self._fail_head(e)
            if end < 0:
                return
            data = data[end:]
            status = self._p.status
            if status >= 200 or status == 101:
                return self._final_head(status, data)
            self._p = ResponseParser(self.label)  # 100 Continue, 103 Early Hints: consumed; a fresh parser
            self.state = _WRITING

    def _final_head(self, status: int, rest: bytes) -> None:
        p = self._p
        version = p.version
        if version not in ("1.1", "1.0"):
            return self._fail_head(p.refuse(f"HTTP/{version}"))
        if status == 101 and not self._upgrade:
            return self._fail_head(p.refuse("a 101 to a request that asked for no upgrade"))
        tokens = p.conn_tokens
        keep = "close" not in tokens and (version == "1.1" or "keep-alive" in tokens)
        chunked = p.te_count > 0
        declared = chunked or bool(p.cl)
        body = self._body = _Body(self)
        p.body = body
        w = self._writer
        if w is not None and not w.done():
            w.cancel()  # an early answer (413, 401...): stop sending; the request is cut short
            keep = False
        if status == 101:
            from .tunnel import RawStream  # only here: the server side's module, needed for upgrades alone

            self.state, self.deadline = _UPGRADED, None
            self._raw, self._raw_transport = RawStream(self.transport), self.transport
            body.finish()
            if rest:
                self._raw.feed(rest)
        elif self._method == "HEAD" or status == 204 or status == 304:
            if rest or (declared and status != 304):
                keep = False  # a body that was sent anyway, or may still come, must not be read as a response
            self.state = _BODY
            self._mode = _LENGTH
            self._remaining = 0
        elif chunked:
            keep = keep and p.keep_alive
            self.state, self._mode = _BODY, _CHUNKED
        elif p.cl is not None:
            keep = keep and p.keep_alive
            self.state, self._mode, self._remaining = _BODY, _LENGTH, p.cl
        else:
            keep = False  # delimited by the connection closing
            self.state, self._mode = _BODY, _EOF
        self.will_close = not keep
        resp = Response(self, body, status, p.reason, version, p.headers(), p.cl, chunked, self.will_close)
        if not chunked:
            p.close()  # llhttp saw all it will see: free it now, not in a garbage collection
        if self.state is _BODY and (rest or (self._mode == _LENGTH and not self._remaining)):
            self.data_received(rest)  # may complete the body (or find it broken) right away
        fut = self._head_fut
        if fut is not None and not fut.done():
            if body.error is not None:
                fut.set_exception(ResponseFramingError(str(body.error)))  # broken before the head was returned
                self.abort()
            else:
                fut.set_result(resp)

    def _fail_head(self, exc: BaseException) -> None:
        fut = self._head_fut
        if fut is not None and not fut.done():
            fut.set_exception(exc)
        self.abort()

    # ------------------------------------------------------------ the body
    def _length_body(self, data: bytes) -> None:
        r = self._remaining
        n = len(data)
        if n < r:
            if not n:
                return
            self._remaining = r - n
            self._body.feed(data)  # type: ignore[union-attr]
            return
        if n > r:
            self.will_close = True  # bytes beyond the response: never reuse this connection
            data = data[:r]
        if data:
            self._body.feed(data)  # type: ignore[union-attr]
        self._remaining = 0
        self._complete()

    def _chunked_body(self, data: bytes) -> None:
        try:
            self._p.parser.feed_data(data)
        except httptools.HttpParserError as e:
            if not self._p.msg_done:
                self._body.fail(ResponseBodyError(f"{self.label} sent a broken chunked body ({_short(self._p.error or e)})"))  # type: ignore[union-attr]
                self.abort()
                return
            self.will_close = True  # a complete response, then more bytes
        if self._p.msg_done:
            self._complete()

    def _complete(self) -> None:
        self.state = _DONE
        self.deadline = None
        self._p.close()
        self._body.finish()  # type: ignore[union-attr]
        if self.will_close and self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------ ends
    def on_timeout(self, total: float) -> None:
        """Called by the pool when ``deadline`` passed."""
        self.deadline = None
        st = self.state
        if st is _BODY and self._body is not None:
            self._body.fail(ResponseBodyTimeout(f"{self.label} did not finish its response within {total:g}s"))
        self._fail_head(UpstreamTimeout(f"{self.label} did not answer within {total:g}s"))

    @property
    def reusable(self) -> bool:
        t, w = self.transport, self._writer
        return (self.state is _DONE and not self.will_close and t is not None and not t.is_closing()
                and (w is None or w.done()))  # fmt: skip

    def reset(self, now: float) -> None:
        """Back to IDLE for the next exchange (the pool calls this on a reusable connection)."""
        self.state, self.deadline, self.idle_since = _IDLE, None, now
        self._head_fut = self._writer = self._body = None
        self._resume()

    def release(self) -> None:
        body = self._body
        if body is not None and not body.done:
            body.fail(ResponseBodyError("the response was released before its body ended"), drop=True)
            self.will_close = True
        self._on_release(self)

    def takeover(self) -> tuple[asyncio.Transport, RawStream]:
        self._on_detach(self)
        return self._raw_transport, self._raw  # type: ignore[return-value]

    def abort(self) -> None:
        """Close now; whatever is under way fails (a body never looks complete)."""
        self.will_close = True
        self.deadline = None
        w = self._writer
        if w is not None and not w.done() and w is not asyncio.current_task():
            w.cancel()
        if self._body is not None and self.state is not _UPGRADED:
            self._body.fail(ResponseBodyError(f"the connection to {self.label} was closed before the body ended"))
        if self.transport is not None:
            self.transport.abort()
