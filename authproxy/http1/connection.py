"""One client connection: its requests one at a time, timeouts, flow control, closing.

A fresh :class:`~.framing.RequestParser` per request and one handler task per
request. Bytes that arrive after the current request (pipelining) are held, at
most a head's worth before reading pauses, and parsed only once the response is
done, so no request ever runs ahead of the previous response. Everything the
SPEC refuses is answered by ``on_error`` (400) and the connection closed: a
connection whose framing was in doubt is never reused. Closing after a response
half-closes and discards input for a moment (lingering), because closing with
unread input resets the connection and can destroy the response in flight.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from http import HTTPStatus
from typing import TYPE_CHECKING, Callable

from .errors import BodyError, ClientDisconnected, FramingError
from .exchange import _DONE, _NONE, Exchange, Handler
from .framing import RequestParser
from .heads import response_head
from .tunnel import RawStream, WriteFlow

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("authproxy.http1")

WRITE_HIGH_WATER = 256 * 1024
LINGER = 2.0  # after our last byte, how long we read and discard what a client still sends
_INTERNAL_ERROR_HEAD = (
    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 22\r\nConnection: close\r\n\r\n"
)
_INTERNAL_ERROR = _INTERNAL_ERROR_HEAD + b"internal server error\n"


class _Connection(WriteFlow):
    """One client connection. Modes: "http" (requests), "linger" (answered and
    half-closed, discarding input until the client closes), "raw" (taken over),
    "gone" (closed, or handed to a TLS connection)."""

    def __init__(self, server: Server, handler: Handler) -> None:
        self.server = server
        self.loop = server.loop
        self.limits = server.limits
        self.handler = handler
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.peer: str | None = None
        self.mode = "http"
        self.closed = False
        self._parser: RequestParser | None = None
        self._exchange: Exchange | None = None
        self._task: asyncio.Task[None] | None = None
        self._stash = bytearray()  # bytes after the current request, parsed once it is done
        self._paused: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_cb: Callable[[], None] | None = None  # what the one timer does at _deadline
        self._deadline = 0.0
        self._head_started = 0.0
        self._eof = False
        self._write_paused = False
        self._drainers: list[asyncio.Future[None]] = []
        self._raw: RawStream | None = None
        self._early = b""  # TLS inside a CONNECT: data can come before connection_made

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.closed:  # lost during a TLS handshake's hand-over: never counted
            return
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        self.server._opened(self)
        self._set_timer(self.limits.idle_timeout, self._idle_timed_out)
        if self._early:
            early, self._early = self._early, b""
            self.data_received(early)

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()
        if self._raw is not None:
            if exc is not None:
                self._raw.set_exception(ClientDisconnected(str(exc)))
            else:
                self._raw.feed_eof()

    def _gone(self) -> None:
        if self.closed:
            return
        self.closed, self.mode = True, "gone"
        self._cancel_timer()
        ex = self._exchange
        if ex is not None:
            ex._fail_body(BodyError("the client connection closed mid-body"))
        for fut in self._drainers:
            if not fut.done():
                fut.set_exception(ClientDisconnected("the client connection closed"))
        self._drainers.clear()
        self.server._closed(self)

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            self._early += data
        elif self.mode == "http":
            if self._exchange is not None and (self._parser is None or self._parser.complete):
                self._hold(data)
            else:
                self._process(data)
        elif self.mode == "raw":
            self._raw.feed(data)  # type: ignore[union-attr]
        # "linger": discarded

    def eof_received(self) -> bool:
        self._eof = True
        if self.mode == "raw":
            self._raw.feed_eof()  # type: ignore[union-attr]
            return True
        ex = self._exchange
        if self.mode == "http" and ex is not None and self._parser is None and not self.closed:
            return True  # the request is whole: answer it, then close
        if ex is not None:
            ex._fail_body(BodyError("the client closed the connection mid-body"))
        return False

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high water."""
        if self.closed:
            raise ClientDisconnected("the client connection is closed")
        if self._write_paused:
            fut = self.loop.create_future()
            self._drainers.append(fut)
            await fut

    # -- requests --------------------------------------------------------------------

    def _process(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            parser = self._parser = RequestParser(self.limits.max_head)
            self._timer_cb = None  # the head's deadline counts from now, armed if it is not whole at once
            self._head_started = self.loop.time()
        try:
            used = parser.feed(data)
        except FramingError as exc:
            if self._exchange is None and parser.head is not None:  # body broken in the head's read
                self._exchange = Exchange(self, parser.head, self.peer, self.limits.body_timeout)
            self._refuse(exc.reason)
            return
        ex = self._exchange
        if ex is None:
            if parser.head is None:
                if self._timer_cb is None:
                    self._set_timer(self._head_started + self.limits.header_timeout - self.loop.time(), self._head_timed_out)
                return
            self._timer_cb = None
            ex = self._exchange = Exchange(self, parser.head, self.peer, self.limits.body_timeout)
            task = self._task = self.loop.create_task(self._run(ex))
            self.server._tasks.add(task)
        if parser.body:
            ex._push(parser.body)
            parser.body = []
            if ex._buffered > self.limits.read_high_water:
                self._pause("body")
        if parser.complete:
            self._parser = None
            ex._end_body()
            if used < len(data):
                self._hold(data[used:])

    def _hold(self, data: bytes) -> None:
        """A pipelined request (or an upgrade's first raw bytes): kept, not parsed yet."""
        self._stash += data
        if len(self._stash) > self.limits.max_head:
            self._pause("stash")

    async def _run(self, ex: Exchange) -> None:
        try:
            await self.handler(ex)
        except (ClientDisconnected, BodyError):
            pass  # the client went away or broke its body: nothing to answer, nothing to log
        except Exception:
            log.exception("request handler failed: %s %s", ex.method, ex.target[:200])
            if ex._state == _NONE and self.writable:
                ex._state, ex.status, ex._close_after = _DONE, 500, True
                self.write(_INTERNAL_ERROR if ex.method != "HEAD" else _INTERNAL_ERROR_HEAD)
        finally:
            task, self._task = self._task, None
            self.server._tasks.discard(task)  # type: ignore[arg-type]
            self._finished(ex)

    def _finished(self, ex: Exchange) -> None:
        """The handler returned: next request, or close."""
        if self.closed or self.mode == "gone":
            return
        if ex._taken:
            if self.mode == "raw":
                self.transport.close()
            return
        if ex._state != _DONE:  # no complete response
            self.abort()
            return
        if ex._close_after or ex._tunnel or self.server._closing:
            self._close_gracefully()
            return
        self._exchange = None
        if self._paused:
            self._paused.discard("body")
            self._paused.discard("stash")
            self._resume()
        if self._stash:
            data, self._stash = bytes(self._stash), bytearray()
            self._process(data)
        else:
            self._set_timer(self.limits.idle_timeout, self._idle_timed_out)

    def will_close(self, ex: Exchange, close_delimited: bool) -> bool:
        """Decided when the response head is written (it says so in ``Connection``)."""
        return (
            close_delimited
            or not ex.keep_alive
            or ex.upgrade  # declined: what follows the head may not be HTTP
            or self._parser is not None  # the body is not all in: unread bytes on the wire
            or self._eof
            or self.server._closing
        )

    def response_done(self, ex: Exchange) -> None:
        if ex._tunnel:
            self._pause("tunnel")  # the next bytes are the new protocol's, for takeover

    def body_consumed(self) -> None:
        if "body" in self._paused:
            self._paused.discard("body")
            self._resume()

    def body_timed_out(self, ex: Exchange) -> None:
        ex._fail_body(BodyError("request body timed out"))
        self.abort()

    # -- writing and closing ------------------------------------------------------------

    @property
    def writable(self) -> bool:
        """An HTTP response can still be sent (not closed, not answered-and-closing)."""
        return self.mode == "http" and not self.transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self.writable:
            raise ClientDisconnected("the client connection is closed")
        self.transport.write(data)

    def abort(self) -> None:
        """Reset the connection: the client sees a truncated message, never a complete one."""
        if self.closed:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.transport.abort()
        self._gone()

    def _close_gracefully(self) -> None:
        """Half-close and discard input for a moment: closing with unread input would
        reset the connection and could destroy the response before the client reads it."""
        if self.closed or self.mode == "linger":
            return
        self.mode = "linger"
        self._stash = bytearray()
        if self._eof or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self._paused.clear()
        self._resume()
        self._set_timer(LINGER, self.transport.close)

    def _refuse(self, reason: str) -> None:
        """A FramingError (or a head that timed out): on_error's 400, then close."""
        ex = self._exchange
        self._parser = None
        if ex is not None:
            ex._fail_body(BodyError(reason))
            if ex._state != _NONE:
                self.abort()
                return
            ex._state, ex._close_after = _DONE, True
        try:
            status, headers, body = self.server.on_error(reason, ex)
        except Exception:
            log.exception("on_error failed")
            status, headers, body = 400, [("Content-Type", "text/plain")], b"bad request\n"
        if ex is not None:
            ex.status = status
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        framing = [("Content-Length", str(len(body))), ("Connection", "close")]
        self.transport.write(response_head(status, phrase, headers, framing) + body)
        self._close_gracefully()

    def _set_timer(self, delay: float | None, callback: Callable[[], None] | None = None) -> None:
        """One timer per connection, re-armed lazily: a handle that fires no later than
        the new deadline is kept and re-checks then, so a keep-alive request costs no
        new timer (disarming only forgets the callback)."""
        self._timer_cb = callback if delay is not None else None
        if delay is None:
            return
        self._deadline = deadline = self.loop.time() + delay
        handle = self._timer
        if handle is not None:
            if handle.when() <= deadline:
                return
            handle.cancel()
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def _cancel_timer(self) -> None:
        self._timer_cb = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        callback = self._timer_cb
        if callback is None or self.closed:
            return
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
            return
        self._timer_cb = None
        callback()

    def _idle_timed_out(self) -> None:
        if self.mode == "http" and self._exchange is None and self._parser is None:
            self.transport.close()

    def _head_timed_out(self) -> None:
        if self.mode == "http" and self._exchange is None:
            self._refuse("request head timed out")

    def _pause(self, reason: str) -> None:
        if not self._paused and not self.closed:
            self.transport.pause_reading()
        self._paused.add(reason)

    def _resume(self) -> None:
        if not self._paused and not self.closed and not self.transport.is_closing():
            self.transport.resume_reading()

    def shutdown(self) -> None:
        """Server closing: an idle connection closes now, a busy one after its response."""
        if self.mode == "http" and self._exchange is None and (self._parser is None or not self._parser.started):
            self.transport.close()

    # -- leaving HTTP ----------------------------------------------------------------------

    def takeover(self) -> tuple[asyncio.Transport, RawStream]:
        self.mode = "raw"
        self._cancel_timer()
        raw = self._raw = RawStream(self.transport, self.limits.read_high_water)
        if self._stash:
            raw.feed(bytes(self._stash))
            self._stash = bytearray()
        if self._eof:
            raw.feed_eof()
        self._paused.clear()
        self._resume()
        return self.transport, raw

    async def start_tls(self, ctx: ssl.SSLContext, handler: Handler | None, timeout: float) -> None:
        if self._stash or self._eof:  # bytes before our 200 cannot be handed to the TLS layer
            self.abort()
            raise ClientDisconnected("the client sent data before the tunnel was established")
        transport, inner = self.transport, _Connection(self.server, handler or self.handler)
        self.mode = "gone"
        self._cancel_timer()
        self._paused.clear()
        try:
            tls = await self.loop.start_tls(transport, inner, ctx, server_side=True, ssl_handshake_timeout=timeout)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, RuntimeError) as exc:
            transport.abort()
            self._gone()
            raise ClientDisconnected(f"TLS handshake failed: {exc}") from None
        if tls is None:  # the handshake ended by the client closing
            self._gone()
            raise ClientDisconnected("TLS handshake failed: connection closed")
        inner.connection_made(tls)  # start_tls does not call it
        self._gone()  # the slot passes to the inner connection
