"""One request and its response on a client connection: what a handler sees.

The handler reads the body with :meth:`Exchange.read` and answers with
:meth:`~Exchange.respond` (whole response, one write) or :meth:`~Exchange.start`
/ :meth:`~Exchange.write` / :meth:`~Exchange.end` (streamed). Framing is always
the engine's: the caller's ``Content-Length``, ``Transfer-Encoding`` and
``Connection`` are dropped, so a handler passing an upstream's headers on can
never make one response read as two. The connection (``server._Connection``)
decides keep-alive; an exchange only reports what it did.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable

from multidict import CIMultiDict

from .errors import BodyError, ClientDisconnected
from .framing import RequestHead
from .heads import serialize_head
from .tunnel import RawStream

if TYPE_CHECKING:
    from .server import _Connection

Handler = Callable[["Exchange"], Awaitable[None]]
HeaderList = Iterable[tuple[str, str]]

_NONE, _STREAMING, _DONE, _ABORTED = range(4)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Exchange:
    """One request/response. Attributes are the request's; ``status``, ``bytes_in``
    and ``bytes_out`` fill in as the exchange runs (for the access log)."""

    __slots__ = (
        "method", "target", "version", "headers", "peer", "content_length", "chunked",
        "has_body", "expect_continue", "keep_alive", "upgrade", "body_timeout",
        "bytes_in", "bytes_out", "status", "_conn", "_pieces", "_buffered",
        "_peak_buffered", "_body_done", "_body_error", "_waiter", "_continue_sent",
        "_state", "_framing", "_remaining", "_close_after", "_tunnel", "_taken",
    )

    def __init__(self, conn: _Connection, head: RequestHead, peer: str | None, body_timeout: float) -> None:
        self.method = head.method
        self.target = head.target
        self.version = head.version
        self.headers: CIMultiDict[str] = head.headers
        self.peer = peer
        self.content_length = head.content_length
        self.chunked = head.chunked
        self.has_body = head.has_body and head.method != "CONNECT"
        self.expect_continue = head.expect_continue and self.has_body
        self.keep_alive = head.keep_alive
        self.upgrade = head.upgrade
        self.body_timeout = body_timeout
        self.bytes_in = 0
        self.bytes_out = 0
        self.status: int | None = None
        self._conn = conn
        self._pieces: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._peak_buffered = 0  # the most body bytes ever held unread (tests: memory stays bounded)
        self._body_done = not self.has_body
        self._body_error: BodyError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._continue_sent = False
        self._state = _NONE
        self._framing = ""  # "length" | "chunked" | "close" | "" (no body)
        self._remaining = 0
        self._close_after = False
        self._tunnel = False  # a 101 or CONNECT 2xx was sent: only takeover() may follow
        self._taken = False

    def __repr__(self) -> str:
        return f"<Exchange {self.method} {self.target[:60]!r} status={self.status}>"

    @property
    def closed(self) -> bool:
        """The client connection is gone: nothing more can be sent."""
        return not self._conn.writable and self._conn.mode != "raw"

    # -- request body --------------------------------------------------------------

    def _push(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self._pieces.append(piece)
            self._buffered += len(piece)
        if self._buffered > self._peak_buffered:
            self._peak_buffered = self._buffered
        self._wake()

    def _end_body(self) -> None:
        self._body_done = True
        self._wake()

    def _fail_body(self, exc: BodyError) -> None:
        if not self._body_done and self._body_error is None:
            self._body_error = exc
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def read(self) -> bytes:
        """The next piece of the body (all that is buffered); ``b""`` at its end.
        Raises :class:`BodyError` if the body did not arrive whole, or sent nothing
        for ``body_timeout`` (the connection is then closed). Sends the ``100
        Continue`` first when the client waits for it."""
        if self.expect_continue and not self._continue_sent:
            self.send_continue()
        while not self._pieces:
            if self._body_error is not None:
                raise self._body_error
            if self._body_done:
                return b""
            self._waiter = self._conn.loop.create_future()
            try:
                async with asyncio.timeout(self.body_timeout):
                    await self._waiter
            except TimeoutError:
                self._conn.body_timed_out(self)
                raise BodyError("request body timed out") from None
            finally:
                self._waiter = None
        # Joined, even when large: handing big pieces on one by one measured slower for
        # uploads (the upstream side then writes more, smaller pieces).
        data = self._pieces.popleft() if len(self._pieces) == 1 else b"".join(self._pieces)
        self._pieces.clear()
        self._buffered = 0
        self.bytes_in += len(data)
        self._conn.body_consumed()
        return data

    def send_continue(self) -> None:
        """``100 Continue``, once, only while the client may still be waiting for it."""
        if self.expect_continue and not self._continue_sent and self._state == _NONE and not self._body_done:
            self._continue_sent = True
            if self._conn.writable:
                self._conn.write(_CONTINUE)

    # -- response ------------------------------------------------------------------

    def _head(self, status: int, reason: str, headers: HeaderList, length: int | None, streaming: bool) -> bytes:
        conn = self._conn
        if conn.mode != "http" or conn.transport.is_closing():
            raise ClientDisconnected("the client connection is closed")
        if self._state != _NONE:
            raise RuntimeError("a response was already started")
        if status < 200 and status >= 100 and status != 101:
            raise ValueError("1xx responses other than 101 are not sent (100 Continue: send_continue)")
        tunnel = status == 101 or (self.method == "CONNECT" and 200 <= status < 300)
        framing = ""
        keep_length = False
        if tunnel or status == 204 or status == 304:
            self._framing = ""
        elif self.method == "HEAD":
            self._framing = ""
            if length is not None:
                framing = f"Content-Length: {length}\r\n"
            else:
                keep_length = not streaming  # respond(): the given Content-Length passes
        elif length is not None:
            self._framing, self._remaining = "length", length
            framing = f"Content-Length: {length}\r\n"
        elif self.version == "1.1":
            self._framing = "chunked"
            framing = "Transfer-Encoding: chunked\r\n"
        else:
            self._framing = "close"
        self._close_after = close = conn.will_close(self, self._framing == "close")
        if status == 101:
            framing += "Connection: upgrade\r\n"
        elif tunnel:
            pass
        elif close:
            framing += "Connection: close\r\n"
        elif self.version == "1.0":
            framing += "Connection: keep-alive\r\n"
        data = serialize_head(status, reason, headers, framing, keep_length)
        self.status, self._tunnel = status, tunnel
        return data

    async def respond(self, status: int, reason: str, headers: HeaderList = (), body: bytes = b"") -> None:
        """The whole response in one write: head (engine's framing) and body. No body
        for HEAD, 1xx, 204 and 304 (a HEAD keeps the given ``Content-Length``)."""
        length = len(body) if body or self.method != "HEAD" else None
        data = self._head(status, reason, headers, length, False)  # checks that the connection is writable
        if body and self._framing == "length":
            data += body
            self.bytes_out = len(body)
        self._state = _DONE
        await self._send_head(data)

    async def start(self, status: int, reason: str, headers: HeaderList = (), content_length: int | None = None) -> None:
        """A streamed response: ``Content-Length`` when known, else chunked to an HTTP/1.1
        client, else delimited by closing the connection. Then :meth:`write`, :meth:`end`."""
        data = self._head(status, reason, headers, content_length, True)  # checks that the connection is writable
        self._state = _DONE if self._tunnel else _STREAMING
        await self._send_head(data)

    async def _send_head(self, data: bytes) -> None:
        """One write of what :meth:`_head` built (with a whole body, for respond); a
        101/CONNECT 2xx leaves HTTP here. Waits only when the client reads slowly."""
        conn = self._conn
        conn.transport.write(data)
        if self._tunnel:
            conn.response_done(self)
        if conn._write_paused or conn.closed:
            await conn.drain()

    async def write(self, data: bytes) -> None:
        """A piece of the body; waits while the client reads slower than we write."""
        if self._state != _STREAMING:
            raise RuntimeError("write() needs a started, unfinished response")
        n = len(data)
        if not n or not self._framing:
            return
        if self._framing == "chunked":
            out = b"%x\r\n%b\r\n" % (n, data)
        else:
            if self._framing == "length":
                if n > self._remaining:
                    self.abort()
                    raise ValueError("response body longer than its Content-Length")
                self._remaining -= n
            out = data
        self._conn.write(out)
        self.bytes_out += n
        await self._conn.drain()

    async def end(self) -> None:
        """Finish the streamed response (the last chunk for chunked)."""
        if self._state != _STREAMING:
            if self._state == _DONE:
                return
            raise RuntimeError("end() needs a started response")
        if self._framing == "length" and self._remaining:
            self.abort()
            raise ValueError("response body shorter than its Content-Length")
        if self._framing == "chunked":
            self._conn.write(b"0\r\n\r\n")
        self._state = _DONE
        self._conn.response_done(self)
        await self._conn.drain()

    def abort(self) -> None:
        """A broken response: the connection is reset, so the client sees a truncated
        message (never one that looks complete, even close-delimited)."""
        if self._state != _DONE or self._tunnel:
            self._state = _ABORTED
        self._conn.abort()

    # -- leaving HTTP --------------------------------------------------------------

    def takeover(self) -> tuple[asyncio.Transport, RawStream]:
        """After a 101 or a CONNECT 2xx: the transport and the bytes that follow
        (those already received first). The connection is no longer HTTP. It lives
        as long as the handler: run the relay (:func:`~authproxy.http1.tunnel.relay`)
        inside it; the transport is closed when the handler returns at the latest."""
        if not self._tunnel or self._taken or self._state != _DONE:
            raise RuntimeError("takeover() needs a 101 or CONNECT 2xx response sent")
        if self._conn.closed:
            raise ClientDisconnected("the client connection is closed")
        self._taken = True
        return self._conn.takeover()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, handler: Handler | None = None, *, handshake_timeout: float = 10.0
    ) -> None:
        """After a CONNECT 2xx: complete the client's TLS handshake on this connection
        and serve the HTTP/1.1 requests inside it with ``handler`` (default: this
        server's), as a new connection of this server (same limits, same count).
        Returns once the handshake is done; raises :class:`ClientDisconnected` if it fails."""
        if not self._tunnel or self._taken or self._state != _DONE or self.method != "CONNECT":
            raise RuntimeError("start_tls() needs a CONNECT 2xx response sent")
        self._taken = True
        await self._conn.start_tls(ssl_context, handler, handshake_timeout)
