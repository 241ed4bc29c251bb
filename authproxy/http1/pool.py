"""Keep-alive HTTP/1.1 connections to one upstream origin.

What it keeps from the old pool, and why:

* idle connections are reused LIFO (the most recently used socket is the least likely
  to have been closed by the server); at most ``limit`` exist; requests beyond that
  wait FIFO, and a released connection goes straight to the longest waiter;
* the whole exchange is bounded by a per-connection deadline (one float store per
  request) that a single pool-wide ticker checks every ``min(1 s, total/8)``: cheaper
  than a timer per request, at the price of firing up to one tick late;
* the request head is built with one join and written with a small body in one write.

What it changes (RFC 9112 §9.3.1): a request is sent again, once, on a new connection
only if it went out on a *reused* connection and either not one byte of it was
written (the connection was found closed), or it is idempotent, has a replayable body
(bytes, not a stream) and not one byte of an answer arrived. A POST or PATCH that may
have reached the application is never sent twice.

The pool frames every request itself (``Host``, ``Content-Length`` or chunked,
``Connection: Upgrade`` when the caller asks for an ``Upgrade``): the upstream never
sees a framing a client chose.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import ssl as ssl_module
from collections.abc import Mapping
from typing import AsyncIterator, Iterable

import multidict

from .client import Connection
from .errors import ConnectError, Disconnected, UpstreamTimeout
from .response import Response

__all__ = ["Pool", "IDEMPOTENT"]

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})  # RFC 9110 §9.2.2
_EMPTY_CL = frozenset({"POST", "PUT", "PATCH"})  # these say "Content-Length: 0" when they carry nothing
_OWNED = frozenset({"host", "content-length", "transfer-encoding", "connection"})  # set by the pool
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_IDLE_SLACK = 0.01  # timers may fire a hair early; don't spin re-arming the idle sweep

Headers = Iterable[tuple[str, str]] | multidict.CIMultiDict[str]


class Pool:
    """Keep-alive connections to ``host:port`` (TLS when ``ssl`` is given)."""

    def __init__(self, host: str, port: int, *, ssl: ssl_module.SSLContext | None = None,
                 server_hostname: str | None = None, limit: int = 100, connect_timeout: float = 10.0,
                 total_timeout: float = 300.0, idle_timeout: float = 30.0, host_header: str | None = None) -> None:  # fmt: skip
        if not host or any(c in host for c in " \r\n\0/"):
            raise ValueError("invalid host")
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._host, self._port, self._ssl = host, port, ssl
        self._server_hostname = (server_hostname or host) if ssl is not None else None
        authority = f"[{host}]" if ":" in host else host
        if port != (443 if ssl is not None else 80):
            authority = f"{authority}:{port}"
        self.origin = f"{'https' if ssl is not None else 'http'}://{authority}"
        host_header = authority if host_header is None else host_header
        if not host_header or any(c in host_header for c in "\r\n\0"):
            raise ValueError("invalid host_header")
        self._host_line = f"Host: {host_header}\r\n"
        self._limit = limit
        self._connect_timeout = connect_timeout
        self._total = total_timeout
        self._tick_every = max(0.01, min(1.0, total_timeout / 8))
        self._idle_timeout = idle_timeout
        self._loop: asyncio.AbstractEventLoop | None = None  # bound on first use
        self._idle: collections.deque[Connection] = collections.deque()  # oldest left, newest right
        self._waiters: collections.deque[asyncio.Future[Connection | None]] = collections.deque()
        self._conns: set[Connection] = set()  # open connections, each holding a slot
        self._count = 0  # slots taken: open connections plus connections being opened
        self._sweeper: asyncio.TimerHandle | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._names: dict[str, tuple[str, bool]] = {}  # header names already checked → (str, is it "Upgrade")
        self._methods: set[str] = set()  # methods already checked
        self._closed = False

    @property
    def connections(self) -> int:
        """Connections open or being opened."""
        return self._count

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    # ------------------------------------------------------------ the request
    async def request(self, method: str, target: str, headers: Headers = (), body: bytes | None = None,
                      stream: AsyncIterator[bytes] | None = None, content_length: int | None = None) -> Response:  # fmt: skip
        """Send ``method target`` with ``headers`` (in order, as given) and the body; return
        at the final response head. ``target`` is sent byte for byte (already encoded).
        The caller must :meth:`Response.release` the response (``read()`` to the end,
        ``read_all()`` and ``async with`` do)."""
        if self._closed:
            raise ConnectError(f"the connection pool for {self.origin} is closed")
        loop = self._loop = self._loop or asyncio.get_running_loop()
        if stream is not None:
            if body is not None:
                raise ValueError("pass body or stream, not both")
            if content_length is not None and content_length < 0:
                raise ValueError("content_length must not be negative")
            framing = "Transfer-Encoding: chunked\r\n" if content_length is None else f"Content-Length: {content_length}\r\n"
        elif content_length is not None:
            raise ValueError("content_length goes with a stream")
        elif body:
            framing = f"Content-Length: {len(body)}\r\n"
        elif method in _EMPTY_CL:
            framing, body = "Content-Length: 0\r\n", None
        else:
            framing, body = "", None
        head, upgrade = self._head(method, target, headers, framing)

        deadline = loop.time() + self._total
        conn = self._take_idle() if self._idle else None
        if conn is not None:
            reused = True
        else:
            conn, reused = await self._acquire(deadline)
        retried = False
        while True:
            try:
                return await conn.exchange(method, head, body, stream, content_length, deadline, upgrade)
            except Disconnected:
                may_retry = not conn.sent or (method in IDEMPOTENT and stream is None and not conn.got)
                if not (reused and may_retry and not retried):
                    self._discard(conn)
                    raise
                # The reused connection was closed by the server, and the request can't
                # have reached the application (or may reach it twice harmlessly): once more.
                retried, reused = True, False
                self._discard(conn, keep_slot=True)
                conn = await self._connect(deadline)
            except BaseException:
                self._discard(conn)
                raise

    def _head(self, method: str, target: str, headers: Headers, framing: str) -> tuple[bytes, bool]:
        """(the request head, checked for injection; does it ask for an upgrade). An error
        message never quotes a value."""
        if method not in self._methods:
            if not isinstance(method, str) or not _TOKEN.match(method):
                raise ValueError("invalid method")
            if len(self._methods) < 64:
                self._methods.add(method)
        if not isinstance(target, str) or not target or _BAD_TARGET.search(target):
            raise ValueError("the request target is empty or contains a space, control character or NUL")
        t = type(headers)
        if t is list or t is tuple:
            items: Iterable[tuple[str, str]] = headers
        elif t is multidict.CIMultiDict:
            items = headers.items()  # type: ignore[union-attr]
        elif isinstance(headers, Mapping):  # a CIMultiDict (all its items, in order) or a dict
            items = list(headers.items())
        else:
            items = list(headers)
        names = self._names
        lines = []
        upgrade = False
        for name, value in items:
            known = names.get(name)
            if known is None:
                if not isinstance(name, str) or not _TOKEN.match(name):
                    raise ValueError(f"header name {str(name)[:40]!r} is not a token")
                low = name.lower()
                if low in _OWNED:
                    raise ValueError("Host, Content-Length, Transfer-Encoding and Connection are set by the pool")
                # A plain str to format: a CIMultiDict's keys are istr, which f-strings format slowly.
                known = (str.__str__(name), low == "upgrade")
                if len(names) < 1024:
                    names[name] = known
            if known[1]:
                upgrade = True
            if type(value) is not str and not isinstance(value, str):
                raise ValueError(f"the value of header {name!r} is not a str")
            lines.append(f"{known[0]}: {value}\r\n")
        n = len(lines)
        block = "".join(lines)
        # Every CR and LF must be one of our separators: anything else would start a
        # header (or a request) of its own.
        if block.count("\n") != n or block.count("\r") != n or "\0" in block:
            for name, value in items:
                if any(c in value for c in "\r\n\0"):
                    raise ValueError(f"the value of header {name!r} contains CR, LF or NUL")
            raise ValueError("the request head contains CR, LF or NUL")
        if upgrade:
            block += "Connection: Upgrade\r\n"  # the caller asked for a protocol switch; the pool owns Connection
        text = f"{method} {target} HTTP/1.1\r\n{self._host_line}{block}{framing}\r\n"
        try:
            return text.encode("latin-1"), upgrade  # what a server decoded as latin-1 goes back byte for byte
        except UnicodeEncodeError:
            return text.encode("utf-8", "surrogateescape"), upgrade

    # ------------------------------------------------------------ connections
    async def _acquire(self, deadline: float) -> tuple[Connection, bool]:
        """→ (connection, reused): the newest live idle one, a new one within ``limit``,
        else wait (FIFO) until one is released or a slot frees, at most until ``deadline``."""
        conn = self._take_idle()
        if conn is not None:
            return conn, True
        if self._count < self._limit:
            self._count += 1
            return await self._connect(deadline), False
        fut: asyncio.Future[Connection | None] = self._loop.create_future()  # type: ignore[union-attr]
        self._waiters.append(fut)
        try:
            async with asyncio.timeout_at(deadline):
                got = await fut
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
            return await self._connect(deadline), False
        if not self._alive(got):
            self._discard(got, keep_slot=True)
            return await self._connect(deadline), False
        return got, True

    def _alive(self, conn: Connection) -> bool:
        t = conn.transport
        return t is not None and not t.is_closing() and not conn.will_close

    def _take_idle(self) -> Connection | None:
        """The newest idle connection that is alive and fresh; dead ones are closed."""
        idle = self._idle
        now = self._loop.time()  # type: ignore[union-attr]
        while idle:
            conn = idle.pop()
            conn.pooled = False
            if self._alive(conn) and now - conn.idle_since < self._idle_timeout:
                return conn
            self._discard(conn)
        return None

    async def _connect(self, deadline: float) -> Connection:
        """Open a connection in a slot the caller holds (the slot is freed if this fails)."""
        loop = self._loop
        assert loop is not None
        try:
            budget = min(self._connect_timeout, deadline - loop.time())
            try:
                async with asyncio.timeout(max(budget, 0)):
                    _, conn = await loop.create_connection(
                        lambda: Connection(loop, self.origin, self._released, self._lost_idle, self._detach),
                        self._host, self._port, ssl=self._ssl, server_hostname=self._server_hostname,
                    )  # fmt: skip
            except TimeoutError:
                raise UpstreamTimeout(f"connecting to {self.origin} timed out after {budget:.3g}s") from None
            except OSError as e:  # refused, unreachable, DNS (gaierror), TLS (SSLError)
                if isinstance(e.errno, int) and e.errno > 0 and not isinstance(e, ssl_module.SSLError):
                    reason = os.strerror(e.errno)  # "Connection refused", not "Connect call failed (...)"
                else:
                    reason = getattr(e, "reason", None) or e.strerror or str(e) or type(e).__name__
                    if isinstance(e, ssl_module.SSLCertVerificationError) and e.verify_message:
                        reason = f"certificate verify failed: {e.verify_message}"
                raise ConnectError(f"cannot connect to {self.origin}: {reason}", e) from e
        except BaseException:
            self._free_slot()
            raise
        if self._closed:
            conn.abort()
            self._free_slot()
            raise ConnectError(f"the connection pool for {self.origin} is closed")
        self._conns.add(conn)
        if self._ticker is None:
            self._ticker = loop.call_later(self._tick_every, self._tick)
        return conn

    def _tick(self) -> None:
        """Time out the exchanges past their deadline; runs while connections exist."""
        self._ticker = None
        now = self._loop.time()  # type: ignore[union-attr]
        for conn in [c for c in self._conns if c.deadline is not None and c.deadline <= now]:
            conn.on_timeout(self._total)
        if self._conns and not self._closed:
            self._ticker = self._loop.call_later(self._tick_every, self._tick)  # type: ignore[union-attr]

    # ------------------------------------------------------------ callbacks from connections
    def _released(self, conn: Connection) -> None:
        if conn not in self._conns:
            conn.abort()  # discarded meanwhile (pool closed, or the request was cancelled)
            return
        if self._closed or not conn.reusable:
            self._discard(conn)
            return
        conn.reset(self._loop.time())  # type: ignore[union-attr]
        self._put_back(conn)

    def _lost_idle(self, conn: Connection) -> None:
        """An idle connection was closed by the server, or sent bytes nobody asked for."""
        if conn.pooled:
            conn.pooled = False
            self._idle.remove(conn)
            self._discard(conn)

    def _detach(self, conn: Connection) -> None:
        """After a 101 takeover the connection belongs to the caller: it leaves the pool."""
        if conn in self._conns:
            self._conns.discard(conn)
            self._free_slot()

    # ------------------------------------------------------------ slots
    def _put_back(self, conn: Connection) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)  # straight to the longest waiter: FIFO
                return
        conn.pooled = True
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self._loop.call_at(conn.idle_since + self._idle_timeout, self._sweep)  # type: ignore[union-attr]

    def _free_slot(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes to the longest waiter
                return
        self._count -= 1

    def _discard(self, conn: Connection, keep_slot: bool = False) -> None:
        conn.abort()
        if conn in self._conns:
            self._conns.discard(conn)
            if not keep_slot:
                self._free_slot()

    def _sweep(self) -> None:
        """Close idle connections older than ``idle_timeout``; re-arm for the next oldest."""
        self._sweeper = None
        idle = self._idle
        now = self._loop.time() + _IDLE_SLACK  # type: ignore[union-attr]
        while idle and now - idle[0].idle_since >= self._idle_timeout:
            conn = idle.popleft()
            conn.pooled = False
            self._discard(conn)
        if idle and not self._closed:
            self._sweeper = self._loop.call_at(idle[0].idle_since + self._idle_timeout, self._sweep)  # type: ignore[union-attr]

    async def close(self) -> None:
        """Close every connection; waiting and later requests fail with :class:`ConnectError`,
        bodies being read with ``ResponseBodyError``."""
        if self._closed:
            return
        self._closed = True
        for handle in (self._sweeper, self._ticker):
            if handle is not None:
                handle.cancel()
        self._sweeper = self._ticker = None
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(ConnectError(f"the connection pool for {self.origin} is closed"))
        for conn in self._idle:
            conn.pooled = False
        self._idle.clear()
        for conn in list(self._conns):
            self._discard(conn)
        await asyncio.sleep(0)  # let the transports run connection_lost
