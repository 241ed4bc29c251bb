"""A lean HTTP/1.1 client for one upstream origin, with a keep-alive connection pool.

Why not ``aiohttp.ClientSession``: under load about a third of the proxy's CPU per
request went to the session's generic machinery (URL objects, request/response
wrappers, cookie and redirect hooks, per-request timeout contexts). The proxy
needs none of it: it talks to one fixed origin, with headers it has already
built, and passes bodies through untouched. This module keeps aiohttp's
C-accelerated HTTP parser and its :class:`aiohttp.StreamReader` (so the
forwarder reads bodies exactly as before) and does the rest by hand:

* the request head is serialised with one join and written with the body (when
  small) in one ``transport.write``;
* idle connections are reused LIFO (the most recently used socket is the least
  likely to have been closed by the server), at most ``limit`` exist, and
  requests beyond that wait FIFO;
* the whole exchange is bounded by a per-connection deadline (one float store per
  request) that a single pool-wide ticker checks every ``min(1 s, total/8)``:
  cheaper than a ``loop.call_at`` handle per request (a TimerHandle, a contextvars
  copy, a heap push and a cancel each time), at the price of firing up to one tick late.

Failures, and the exception each one raises:

* cannot connect (refused, DNS, TLS handshake/verification): :class:`UpstreamConnectError`
* the connection dropped before a complete response head: :class:`UpstreamDisconnected`
  (both are :class:`UpstreamConnectionError`, itself an ``aiohttp.ClientOSError``,
  so an ``aiohttp.ClientConnectionError`` *and* an ``OSError``)
* connect timeout, no response head within ``total_timeout``, no free connection
  within ``total_timeout``: :class:`UpstreamTimeout` (an ``asyncio.TimeoutError``)
* a response head the parser rejects (bad status line, headers too large):
  :class:`UpstreamProtocolError` (an ``aiohttp.ClientError``)
* the request body stream failed or did not match ``content_length``:
  :class:`RequestBodyError` (an ``aiohttp.ClientPayloadError``)
* a response body that ends early, has broken chunked framing, or is cut off:
  ``resp.content.read*()`` raises ``aiohttp.ClientPayloadError``; past the
  deadline it raises :class:`UpstreamBodyTimeout` (both a ``ClientPayloadError``
  and an ``asyncio.TimeoutError``). A broken body never looks like a clean EOF.
* header names/values with CR, LF or NUL, or a caller-supplied ``Host``,
  ``Content-Length`` or ``Transfer-Encoding`` (the pool owns framing): ``ValueError``.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import ssl as ssl_module
from typing import AsyncIterable, Mapping, NoReturn, Union

import aiohttp
from aiohttp.http_parser import HttpResponseParser
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDictProxy

__all__ = [
    "UpstreamPool",
    "UpstreamResponse",
    "UpstreamConnectionError",
    "UpstreamConnectError",
    "UpstreamDisconnected",
    "UpstreamTimeout",
    "UpstreamBodyTimeout",
    "UpstreamProtocolError",
    "RequestBodyError",
]

READ_BUFSIZE = 256 * 1024  # per-response buffer before reading from the socket pauses (high water is twice this)
_INLINE_BODY = 64 * 1024  # bodies up to this size go out in the same write as the head
_IDLE_SLACK = 0.01  # timers may fire a hair early; don't spin re-arming the idle sweep
_FLOW_ERRORS = (AttributeError, NotImplementedError, RuntimeError)  # transports without pause/resume
HeadersArg = Union[list[tuple[str, str]], tuple[tuple[str, str], ...], Mapping[str, str]]


# --------------------------------------------------------------------------- errors


class UpstreamConnectionError(aiohttp.ClientOSError):
    """The upstream could not be reached or dropped the connection before answering (→ 502)."""


class UpstreamConnectError(UpstreamConnectionError):
    """Connecting failed: refused, unreachable, DNS, TLS. ``os_error`` is the underlying error."""

    os_error: OSError | None = None


class UpstreamDisconnected(UpstreamConnectionError):
    """The connection closed (or was reset) before a complete response head arrived."""


class UpstreamTimeout(asyncio.TimeoutError):
    """Connecting, waiting for a free connection, or waiting for the response head took too long (→ 504)."""


class UpstreamBodyTimeout(aiohttp.ClientPayloadError, asyncio.TimeoutError):
    """The response body had not ended when the request's deadline passed."""


class UpstreamProtocolError(aiohttp.ClientError):
    """The upstream's response head is not valid HTTP/1.x, or exceeds the parser's limits (→ 502)."""


class RequestBodyError(aiohttp.ClientPayloadError):
    """The request body stream failed, or was shorter/longer than ``content_length`` (→ 400)."""


def _first_line(e: BaseException) -> str:
    # Parser errors quote the offending bytes on later lines; keep messages short.
    text = getattr(e, "message", None)
    if not isinstance(text, str) or not text:
        text = str(e)
    text = text.split("\n", 1)[0].strip().rstrip(":")[:200]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# --------------------------------------------------------------------------- one connection


class _Conn(asyncio.Protocol):
    """One pooled connection: feeds the parser, hands the response head to the waiting
    request, applies read/write flow control, and enforces the per-request deadline.

    It is also the ``protocol`` of the :class:`StreamReader` the parser creates, which
    calls ``pause_reading``/``resume_reading``/``connected`` on it."""

    __slots__ = (
        "pool", "transport", "parser", "cur", "head_fut", "payload", "msg", "deadline", "writer",
        "got_bytes", "done", "broken", "idle", "dropped", "idle_since", "write_paused",
        "drain_fut", "reading_paused", "eof_pending",
    )  # fmt: skip

    def __init__(self, pool: "UpstreamPool") -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = pool._new_parser(self, True)  # reused across keep-alive responses
        self.cur = None  # the parser of the current exchange (a body-less one for HEAD)
        self.head_fut: asyncio.Future | None = None
        self.payload: StreamReader | None = None
        self.msg = None
        self.deadline: float | None = None  # loop time by which the current exchange must end
        self.writer: asyncio.Task | None = None
        self.got_bytes = False
        self.done = False
        self.broken = False
        self.idle = False
        self.dropped = False
        self.idle_since = 0.0
        self.write_paused = False
        self.drain_fut: asyncio.Future | None = None
        self.reading_paused = False
        self.eof_pending = False

    # ---------------------------------------------------------------- transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        parser = self.cur
        if parser is None or self.done:
            if data:
                # Bytes nobody asked for: the framing of this connection can't be trusted.
                self.broken = True
                if self.idle:
                    self.pool._lost_idle(self)
            return
        if data:
            self.got_bytes = True
        try:
            messages, _upgraded, _tail = parser.feed_data(data)
        except Exception as e:  # noqa: BLE001 - any parser error ends the exchange
            self._parser_error(e)
            return
        if messages:
            self._messages(messages)
        payload = self.payload
        if payload is not None and payload.is_eof():
            self._complete()

    def _messages(self, messages: list) -> None:
        for msg, payload in messages:
            if self.payload is not None:  # a second response to one request
                self.broken = True
                continue
            code = msg.code
            if code < 200 and code != 101:
                continue  # 100 Continue, 103 Early Hints: interim, the real answer follows
            if code < 200 or code == 204 or code == 304:
                if code == 101 or not payload.is_eof():
                    self.broken = True  # protocol switch, or a body the parser still expects
                payload = EMPTY_PAYLOAD
            elif msg.should_close:
                self.broken = True
            self.msg = msg
            self.payload = payload
            fut = self.head_fut
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost finishes the exchange

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        fut = self.drain_fut
        if fut is not None:
            self.drain_fut = None
            if not fut.done():
                fut.set_result(None)  # the writer sees transport None and stops
        if self.idle:
            self.pool._lost_idle(self)
            return
        head = self.head_fut
        if head is not None and not head.done():
            why = f": {exc}" if exc is not None else ""
            what = "in the middle of the response head" if self.got_bytes else "before answering"
            head.set_exception(UpstreamDisconnected(f"{self.pool.origin} closed the connection {what}{why}"))
            self.deadline = None
            return
        if self.payload is not None and not self.done:
            if self.reading_paused:
                self.eof_pending = True  # the parser still holds bytes; finish once they are read
            else:
                self._finish_eof()
        self.deadline = None

    def _finish_eof(self) -> None:
        self.eof_pending = False
        payload = self.payload
        if payload is None or self.done or payload.exception() is not None:
            return
        try:
            self.cur.feed_eof()  # type: ignore[union-attr]
        except Exception as e:  # noqa: BLE001 - ContentLengthError, TransferEncodingError, ...
            self._fail_payload(aiohttp.ClientPayloadError(f"the upstream's response body ended early ({_first_line(e)})"))
            return
        if payload.is_eof():
            self._complete()  # a close-delimited body ended as it should
        else:
            self._fail_payload(aiohttp.ClientPayloadError("the upstream closed the connection in the middle of the response body"))

    # ---------------------------------------------------------------- flow control
    @property
    def connected(self) -> bool:
        return self.transport is not None or self.eof_pending

    def pause_reading(self) -> None:
        # Called by the StreamReader when its buffer passes high water: stop the parser
        # (it keeps the rest of the segment) and the socket until the reader catches up.
        parser = self.cur
        if parser is not None:
            parser.pause_reading()
        if not self.reading_paused:
            self.reading_paused = True
            if self.transport is not None:
                try:
                    self.transport.pause_reading()
                except _FLOW_ERRORS:
                    pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        was = self.reading_paused
        self.reading_paused = False
        if resume_parser and not self.done and self.cur is not None:
            self.data_received(b"")  # parse what the parser held back
        if self.eof_pending and not self.reading_paused:
            self._finish_eof()
            return
        if was and not self.reading_paused and self.transport is not None:
            try:
                self.transport.resume_reading()
            except _FLOW_ERRORS:
                pass

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        fut = self.drain_fut
        if fut is not None:
            self.drain_fut = None
            if not fut.done():
                fut.set_result(None)

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its low-water mark (or the connection is gone)."""
        if not self.write_paused or self.transport is None:
            return
        fut = self.drain_fut
        if fut is None:
            fut = self.drain_fut = self.pool._loop.create_future()
        await fut

    # ---------------------------------------------------------------- exchange state
    def _complete(self) -> None:
        self.done = True
        self.deadline = None

    def _fail_payload(self, exc: BaseException) -> None:
        self.broken = True
        self.deadline = None
        payload = self.payload
        if payload is not None and not self.done and payload.exception() is None:
            payload.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def _parser_error(self, e: BaseException) -> None:
        self.broken = True
        head = self.head_fut
        if head is not None and not head.done():
            self.deadline = None
            head.set_exception(UpstreamProtocolError(f"{self.pool.origin} sent an invalid response ({_first_line(e)})"))
            if self.transport is not None:
                self.transport.abort()
        else:
            self._fail_payload(aiohttp.ClientPayloadError(f"the upstream's response body is malformed ({_first_line(e)})"))

    def on_timeout(self) -> None:
        self.deadline = None
        self.broken = True
        head = self.head_fut
        total = self.pool._total
        if head is not None and not head.done():
            head.set_exception(UpstreamTimeout(f"{self.pool.origin} did not answer within {total:g}s"))
        elif self.payload is not None and not self.done and self.payload.exception() is None:
            self.payload.set_exception(UpstreamBodyTimeout(f"{self.pool.origin} did not finish its response within {total:g}s"))
        if self.transport is not None:
            self.transport.abort()

    def fail_request(self, exc: BaseException) -> None:
        """The request body could not be sent as promised: the exchange is void."""
        self.broken = True
        head = self.head_fut
        if head is not None and not head.done():
            self.deadline = None
            head.set_exception(exc)
        else:
            self._fail_payload(aiohttp.ClientPayloadError(f"the request body failed while the response streamed ({exc})"))
        if self.transport is not None:
            self.transport.abort()

    def reusable(self) -> bool:
        transport = self.transport
        writer = self.writer
        return (
            self.done
            and not self.broken
            and transport is not None
            and not transport.is_closing()
            and (writer is None or writer.done())
        )

    def reset(self) -> None:
        self.cur = self.head_fut = self.payload = self.msg = self.writer = None
        self.done = False

    def shutdown(self) -> None:
        """Abort the connection; a response body still being read fails rather than ending short."""
        self.deadline = None
        writer = self.writer
        if writer is not None and not writer.done():
            writer.cancel()
        payload = self.payload
        if payload is not None and not self.done and payload.exception() is None:
            payload.set_exception(aiohttp.ClientPayloadError("the response was released before its body ended"))
        self.broken = True
        if self.transport is not None:
            self.transport.abort()


# --------------------------------------------------------------------------- the response


class UpstreamResponse:
    """A response head plus its body stream. Call :meth:`release` (or use ``async with``)
    when done: a fully received keep-alive response returns its connection to the pool,
    anything else closes it. Don't read ``content`` after releasing."""

    __slots__ = ("status", "reason", "version", "headers", "raw_headers", "content_length", "chunked", "content", "_pool", "_conn")

    def __init__(self, pool: "UpstreamPool", conn: _Conn, msg, payload: StreamReader) -> None:  # type: ignore[no-untyped-def]
        self.status: int = msg.code
        self.reason: str = msg.reason
        self.version = msg.version
        headers: CIMultiDictProxy[str] = msg.headers
        self.headers = headers
        self.raw_headers: tuple[tuple[bytes, bytes], ...] = msg.raw_headers
        self.chunked: bool = bool(msg.chunked)
        cl = headers.get("Content-Length")
        length: int | None = None
        if cl is not None:
            try:
                length = int(cl)
            except ValueError:
                pass
        self.content_length = length  # the header's value, even for HEAD/304 whose body is empty
        self.content: StreamReader = payload
        self._pool = pool
        self._conn: _Conn | None = conn

    async def read(self) -> bytes:
        """The whole body (then the connection is released)."""
        content = self.content
        try:
            if content.is_eof():
                return content.read_nowait()  # all of it is here already: skip the read loop
            return await content.read()
        finally:
            self.release()

    def release(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            self._pool._release(conn)

    async def __aenter__(self) -> "UpstreamResponse":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        conn = self._conn
        if conn is not None:  # never released: don't leak the connection's slot
            self._conn = None
            try:
                self._pool._discard(conn)
            except Exception:  # noqa: BLE001 - the loop may be gone
                pass


# --------------------------------------------------------------------------- the pool


class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to one origin (``scheme://host:port``)."""

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int,
        *,
        ssl: ssl_module.SSLContext | None,
        connect_timeout: float,
        total_timeout: float | None,
        limit: int = 512,
        keepalive: float = 30.0,
        read_bufsize: int = READ_BUFSIZE,
    ) -> None:
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"unsupported scheme {scheme!r}")
        if not host or any(c in host for c in " \r\n\0/"):
            raise ValueError(f"invalid host {host!r}")
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._ssl: ssl_module.SSLContext | None = None
        if scheme == "https":  # an http origin never uses TLS, whatever context is passed
            self._ssl = ssl if ssl is not None else ssl_module.create_default_context()
        self._host = host
        self._port = port
        authority = f"[{host}]" if ":" in host else host
        if port != (443 if scheme == "https" else 80):
            authority = f"{authority}:{port}"
        self.origin = f"{scheme}://{authority}"
        self._host_line = f"Host: {authority}\r\n"
        self._connect_timeout = connect_timeout
        self._total = total_timeout if total_timeout else None
        self._tick = min(1.0, self._total / 8) if self._total else 0.0
        self._limit = limit
        self._keepalive = keepalive
        self._bufsize = read_bufsize
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # bound on first use
        self._idle: collections.deque[_Conn] = collections.deque()  # oldest left, newest right
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._conns: set[_Conn] = set()
        self._count = 0  # slots taken: open connections plus connections being opened
        self._cleanup: asyncio.TimerHandle | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._methods: set[str] = set()  # methods already checked
        self._closed = False

    # ---------------------------------------------------------------- introspection
    @property
    def connections(self) -> int:
        """Connections open or being opened."""
        return self._count

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    # ---------------------------------------------------------------- the request
    async def request(
        self,
        method: str,
        target: str,
        headers: HeadersArg = (),
        body: bytes | None = None,
        stream: AsyncIterable[bytes] | StreamReader | None = None,
        content_length: int | None = None,
    ) -> UpstreamResponse:
        """Send ``method target`` with ``headers`` (str names and values, in order, as
        given) and the body; return once the response head has arrived.

        ``target`` is the already-encoded path and query, sent byte for byte. The pool
        adds ``Host`` and the framing header: ``Content-Length`` for ``body`` (bytes)
        or for ``stream`` with ``content_length``; ``Transfer-Encoding: chunked`` for a
        stream of unknown length. The caller must :meth:`UpstreamResponse.release` the
        response (``read()`` and ``async with`` do)."""
        if self._closed:
            raise UpstreamConnectionError(f"the connection pool for {self.origin} is closed")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if body is not None:
            if stream is not None:
                raise ValueError("pass body or stream, not both")
            head = self._serialize(method, target, headers, len(body), False)
        elif stream is not None:
            if content_length is not None and content_length < 0:
                raise ValueError("content_length must not be negative")
            head = self._serialize(method, target, headers, content_length, content_length is None)
        else:
            head = self._serialize(method, target, headers, None, False)

        conn = self._take_idle()
        if conn is not None:
            reused = True
        else:
            conn, reused = await self._acquire()
        fut = self._send(conn, method, head, body, stream, content_length)
        try:
            msg = await fut
        except BaseException as e:
            if not (reused and stream is None and isinstance(e, UpstreamDisconnected) and not conn.got_bytes):
                self._discard(conn)
                raise
            # A reused keep-alive connection was closed by the server just as we sent:
            # the request never reached the application (not one byte of answer), so
            # send it again, once, on a new connection in the same slot.
            self._discard(conn, keep_slot=True)
            conn = await self._connect()
            fut = self._send(conn, method, head, body, None, None)
            try:
                msg = await fut
            except BaseException:
                self._discard(conn)
                raise
        return UpstreamResponse(self, conn, msg, conn.payload)  # type: ignore[arg-type]

    def _serialize(self, method: str, target: str, headers: HeadersArg, length: int | None, chunked: bool) -> bytes:
        """The request head, checked for injection. One C-level join, a few C-level scans."""
        items = headers if type(headers) in (list, tuple) else headers.items()  # type: ignore[union-attr]
        try:
            block = "\r\n".join(map(": ".join, items))  # type: ignore[arg-type]
        except TypeError:  # a non-str name or value
            items = headers if type(headers) in (list, tuple) else headers.items()  # type: ignore[union-attr]
            block = "\r\n".join([f"{k}: {v}" for k, v in items])  # type: ignore[misc]
        if block:
            n = len(headers) - 1  # type: ignore[arg-type]
            # Every CR and LF must be one of our separators: anything else would let a
            # value start a header (or a request) of its own.
            if block.count("\n") != n or block.count("\r") != n or "\0" in block:
                _reject(method, target, headers)
            low = block.lower()
            if low.startswith(_FRAMING) or "\nhost:" in low or "\ncontent-length:" in low or "\ntransfer-encoding:" in low:
                raise ValueError("Host, Content-Length and Transfer-Encoding are set by the pool, not the caller")
            block += "\r\n"
        if " " in target or "\r" in target or "\n" in target or "\0" in target or not target:
            _reject(method, target, headers)
        if method not in self._methods:
            if not method or any(c in method for c in " \r\n\0\t:/"):
                _reject(method, target, headers)
            self._methods.add(method)
        if length is not None:
            framing = f"Content-Length: {length}\r\n\r\n"
        elif chunked:
            framing = "Transfer-Encoding: chunked\r\n\r\n"
        else:
            framing = "\r\n"
        return f"{method} {target} HTTP/1.1\r\n{self._host_line}{block}{framing}".encode("utf-8", "surrogateescape")

    def _send(
        self,
        conn: _Conn,
        method: str,
        head: bytes,
        body: bytes | None,
        stream: AsyncIterable[bytes] | StreamReader | None,
        length: int | None,
    ) -> asyncio.Future:
        """Start the exchange on ``conn``; → the future of the response head."""
        loop = self._loop
        fut = loop.create_future()
        conn.head_fut = fut
        conn.cur = conn.parser if method != "HEAD" else self._new_parser(conn, False)
        conn.got_bytes = False
        transport = conn.transport
        if transport is None or conn.broken or transport.is_closing():
            fut.set_exception(UpstreamDisconnected(f"{self.origin} closed the connection before answering"))
            return fut
        if self._total is not None:
            conn.deadline = loop.time() + self._total
        if body is None:
            transport.write(head)
        elif len(body) <= _INLINE_BODY:
            transport.write(head + body)
        else:
            transport.write(head)
            transport.write(body)
        if stream is not None:
            conn.writer = loop.create_task(self._send_stream(conn, stream, length))
        return fut

    async def _send_stream(self, conn: _Conn, stream: AsyncIterable[bytes] | StreamReader, length: int | None) -> None:
        """Copy the request body to the connection, waiting for the socket to drain
        whenever the transport's buffer is full, so memory stays bounded."""
        sent = 0
        try:
            if isinstance(stream, StreamReader):
                chunks: AsyncIterable[bytes] = stream.iter_any()  # its own __aiter__ yields lines
            else:
                chunks = stream
            async for chunk in chunks:
                if not chunk:
                    continue
                transport = conn.transport
                if transport is None or conn.dropped:
                    return  # the exchange has ended; the response side reports why
                size = len(chunk)
                sent += size
                if length is None:
                    transport.writelines((b"%x\r\n" % size, chunk, b"\r\n"))
                elif sent > length:
                    raise RequestBodyError(f"the request body is longer than its Content-Length ({length})")
                else:
                    transport.write(chunk)
                if conn.write_paused:
                    await conn.drain()
            transport = conn.transport
            if transport is None or conn.dropped:
                return
            if length is None:
                transport.write(b"0\r\n\r\n")
            elif sent != length:
                raise RequestBodyError(f"the request body ended after {sent} of {length} bytes")
        except asyncio.CancelledError:
            raise
        except RequestBodyError as e:
            conn.fail_request(e)
        except Exception as e:  # noqa: BLE001 - whatever the body source raised
            err = RequestBodyError(f"the request body could not be read ({_first_line(e)})")
            err.__cause__ = e
            conn.fail_request(err)

    # ---------------------------------------------------------------- connections
    def _new_parser(self, conn: _Conn, with_body: bool) -> HttpResponseParser:
        return HttpResponseParser(
            conn,
            self._loop,
            self._bufsize,
            payload_exception=aiohttp.ClientPayloadError,
            response_with_body=with_body,  # False for HEAD: no body whatever Content-Length says
            read_until_eof=True,  # no length and not chunked: the body runs to EOF
            auto_decompress=False,  # bodies pass through byte for byte
        )

    def _take_idle(self) -> _Conn | None:
        """The newest idle connection if it is still fresh (LIFO: the most recently used
        socket is the least likely to have been closed by the server)."""
        idle = self._idle
        if not idle:
            return None
        conn = idle.pop()
        conn.idle = False
        if conn.transport is not None and self._loop.time() - conn.idle_since < self._keepalive:
            return conn
        # The newest idle connection has expired, so have all older ones.
        self._discard(conn)
        while idle:
            old = idle.pop()
            old.idle = False
            self._discard(old)
        return None

    async def _acquire(self) -> tuple[_Conn, bool]:
        """→ (connection, reused): a new connection within ``limit``, else wait (FIFO)."""
        if self._count < self._limit:
            self._count += 1
            return await self._connect(), False
        fut: asyncio.Future = self._loop.create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(self._total):
                got: _Conn | None = await fut
        except BaseException as e:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                got = fut.result()  # handed over just as we gave up: pass it on
                if got is None:
                    self._free_slot()
                else:
                    self._put_back(got)
            else:
                fut.cancel()
            if isinstance(e, TimeoutError):
                raise UpstreamTimeout(f"no connection to {self.origin} became free within {self._total:g}s") from None
            raise
        if got is None:  # a slot was handed over
            return await self._connect(), False
        if got.transport is None or got.broken:
            self._discard(got, keep_slot=True)
            return await self._connect(), False
        return got, True

    async def _connect(self) -> _Conn:
        """Open a connection in a slot the caller holds (the slot is freed if this fails)."""
        try:
            try:
                async with asyncio.timeout(self._connect_timeout):
                    _transport, conn = await self._loop.create_connection(
                        lambda: _Conn(self),
                        self._host,
                        self._port,
                        ssl=self._ssl,
                        server_hostname=self._host if self._ssl is not None else None,
                    )
            except TimeoutError:
                raise UpstreamTimeout(f"connecting to {self.origin} timed out after {self._connect_timeout:g}s") from None
            except OSError as e:  # refused, unreachable, DNS (gaierror), TLS (SSLError)
                if isinstance(e.errno, int) and e.errno > 0 and not isinstance(e, ssl_module.SSLError):
                    reason = os.strerror(e.errno)  # "Connection refused", not "Connect call failed (...)"
                else:
                    reason = e.strerror or str(e) or type(e).__name__
                err = UpstreamConnectError(f"cannot connect to {self.origin}: {reason}")
                err.errno, err.os_error = e.errno, e
                raise err from e
        except BaseException:
            self._free_slot()
            raise
        if self._closed:
            conn.shutdown()
            self._free_slot()
            raise UpstreamConnectionError(f"the connection pool for {self.origin} is closed")
        self._conns.add(conn)
        if self._ticker is None and self._tick:
            self._ticker = self._loop.call_later(self._tick, self._on_tick)
        return conn  # type: ignore[return-value]

    def _on_tick(self) -> None:
        """Time out the exchanges past their deadline; runs while connections exist."""
        self._ticker = None
        now = self._loop.time()
        for conn in list(self._conns):
            deadline = conn.deadline
            if deadline is not None and deadline <= now:
                conn.on_timeout()
        if self._conns and not self._closed:
            self._ticker = self._loop.call_later(self._tick, self._on_tick)

    def _release(self, conn: _Conn) -> None:
        if conn.dropped:
            return
        if self._closed or not conn.reusable():
            self._discard(conn)
            return
        conn.reset()
        self._put_back(conn)

    def _put_back(self, conn: _Conn) -> None:
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(conn)  # straight to the longest waiter: FIFO
                return
        loop = self._loop
        conn.idle = True
        conn.idle_since = now = loop.time()
        self._idle.append(conn)
        if self._cleanup is None:
            self._cleanup = loop.call_at(now + self._keepalive, self._sweep)

    def _free_slot(self) -> None:
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes to the longest waiter
                return
        self._count -= 1

    def _discard(self, conn: _Conn, keep_slot: bool = False) -> None:
        if conn.dropped:
            return
        conn.dropped = True
        conn.shutdown()
        self._conns.discard(conn)
        if not keep_slot:
            self._free_slot()

    def _lost_idle(self, conn: _Conn) -> None:
        """An idle connection was closed by the server (or sent stray bytes)."""
        conn.idle = False
        try:
            self._idle.remove(conn)
        except ValueError:
            pass
        self._discard(conn)

    def _sweep(self) -> None:
        """Close idle connections older than ``keepalive``; re-arm for the next oldest."""
        self._cleanup = None
        idle = self._idle
        ka = self._keepalive
        now = self._loop.time() + _IDLE_SLACK
        while idle and now - idle[0].idle_since >= ka:
            conn = idle.popleft()
            conn.idle = False
            self._discard(conn)
        if idle and not self._closed:
            self._cleanup = self._loop.call_at(idle[0].idle_since + ka, self._sweep)

    async def close(self) -> None:
        """Close every connection; waiting and later requests fail with UpstreamConnectionError."""
        if self._closed:
            return
        self._closed = True
        for handle in (self._cleanup, self._ticker):
            if handle is not None:
                handle.cancel()
        self._cleanup = self._ticker = None
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(UpstreamConnectionError(f"the connection pool for {self.origin} is closed"))
        for conn in self._idle:
            conn.idle = False
        self._idle.clear()
        for conn in list(self._conns):
            self._discard(conn)
        await asyncio.sleep(0)  # let the transports run connection_lost


_FRAMING = ("host:", "content-length:", "transfer-encoding:")


def _reject(method: str, target: str, headers: HeadersArg) -> NoReturn:
    """Find what made the request head unsafe; the message never quotes a value (it may be a secret)."""
    bad = ("\r", "\n", "\0")
    if not method or any(c in method for c in (*bad, " ", "\t", ":", "/")):
        raise ValueError("invalid method")
    if not target or any(c in target for c in (*bad, " ")):
        raise ValueError("the request target is empty or contains a space, CR, LF or NUL")
    items = headers if type(headers) in (list, tuple) else headers.items()  # type: ignore[union-attr]
    for k, v in items:  # type: ignore[misc]
        if any(c in str(k) for c in bad) or not str(k):
            raise ValueError(f"header name {str(k)[:40]!r} is empty or contains CR, LF or NUL")
        if any(c in str(v) for c in bad):
            raise ValueError(f"the value of header {str(k)!r} contains CR, LF or NUL")
    raise ValueError("the request head contains CR, LF or NUL")
