"""The upstream side of authproxy.http1 (Pool, Connection, Response) against hostile
loopback upstreams: raw ``asyncio.start_server`` servers that write exact bytes.

No fixed sleeps: every wait is an event or a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import tracemalloc
from typing import AsyncIterator, Awaitable, Callable

import pytest
import trustme
from multidict import CIMultiDict

from authproxy.http1 import response as response_module
from authproxy.http1.client import Connection
from authproxy.http1.errors import (
    ConnectError,
    Disconnected,
    RequestBodyError,
    ResponseBodyError,
    ResponseFramingError,
    UpstreamError,
    UpstreamTimeout,
)
from authproxy.http1.pool import Pool
from authproxy.http1.response import HIGH_WATER, ResponseBodyTimeout, ResponseTooLarge
from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


# --------------------------------------------------------------------------- helpers


class RawServer:
    """A loopback server running ``handler(reader, writer, connection_index)`` per connection;
    records every request (head, de-chunked body, connection index) and which connections
    the client closed."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.requests: list[tuple[bytes, bytes, int]] = []
        self.eof: set[int] = set()  # connections on which the client closed its side
        self.tasks: set[asyncio.Task] = set()
        self.port = 0

    async def start(self, ssl_ctx: ssl.SSLContext | None = None) -> "RawServer":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        index = self.accepted
        self.accepted += 1
        try:
            await self.handler(reader, writer, index)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        except asyncio.CancelledError:  # stopped by close(); ending normally keeps asyncio 3.11's stream callback quiet
            pass
        finally:
            writer.close()
            self.tasks.discard(task)

    @property
    def heads(self) -> list[bytes]:
        return [h for h, _, _ in self.requests]

    @property
    def bodies(self) -> list[bytes]:
        return [b for _, b, _ in self.requests]

    async def read_request(self, reader: asyncio.StreamReader, index: int = -1) -> tuple[bytes, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        lower = head.lower()
        body = b""
        if b"\r\ncontent-length:" in lower:
            body = await reader.readexactly(int(lower.split(b"\r\ncontent-length:")[1].split(b"\r\n")[0]))
        elif b"\r\ntransfer-encoding: chunked" in lower:
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                parts.append((await reader.readexactly(size + 2))[:-2])
                if size == 0:
                    break
            body = b"".join(parts)
        self.requests.append((head, body, index))
        return head, body

    async def until_eof(self, reader: asyncio.StreamReader, index: int) -> None:
        while await reader.read(65536):
            pass
        self.eof.add(index)

    async def close(self) -> None:
        self.server.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


@pytest.fixture
async def raw() -> AsyncIterator[Callable[..., Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(handler: Handler, ssl_ctx: ssl.SSLContext | None = None) -> RawServer:
        s = await RawServer(handler).start(ssl_ctx)
        servers.append(s)
        return s

    yield start
    for s in servers:
        await s.close()


@pytest.fixture
async def pools() -> AsyncIterator[Callable[..., Pool]]:
    made: list[Pool] = []

    def make(port: int, host: str = "127.0.0.1", **kw: object) -> Pool:
        kw.setdefault("connect_timeout", 5.0)
        kw.setdefault("total_timeout", 10.0)
        p = Pool(host, port, **kw)  # type: ignore[arg-type]
        made.append(p)
        return p

    yield make
    for p in made:
        await p.close()


def answer(status: str = "200 OK", body: bytes = b"ok", headers: tuple[str, ...] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status}", *headers, f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def serve_forever(srv_ref: list[RawServer], reply: bytes | Callable[[bytes], bytes] = answer()) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        while True:
            head, _ = await srv_ref[0].read_request(reader, index)
            writer.write(reply(head) if callable(reply) else reply)
            await writer.drain()

    return handler


async def keepalive(raw: Callable[..., Awaitable[RawServer]], reply: bytes | Callable[[bytes], bytes] = answer()) -> RawServer:
    ref: list[RawServer] = []
    srv = await raw(await serve_forever(ref, reply))
    ref.append(srv)
    return srv


async def get(pool: Pool, target: str = "/", method: str = "GET", **kw: object) -> tuple[int, bytes]:
    resp = await pool.request(method, target, kw.pop("headers", []), **kw)  # type: ignore[arg-type]
    async with resp:
        return resp.status, await resp.read_all()


def path_of(head: bytes) -> bytes:
    return head.split(b" ")[1]


# --------------------------------------------------------------------------- the request on the wire


async def test_request_head_bytes_exact(raw, pools) -> None:
    srv = await keepalive(raw)
    pool = pools(srv.port)
    headers = [("X-Mixed-Case", "v1"), ("accept", "*/*"), ("X-Dup", "1"), ("X-Dup", "2"), ("Authorization", "Bearer t")]
    await get(pool, "/a%20b/c?x=1&y=%2F&z", headers=headers)
    host = f"Host: 127.0.0.1:{srv.port}\r\n".encode()
    assert srv.heads[0] == (
        b"GET /a%20b/c?x=1&y=%2F&z HTTP/1.1\r\n" + host
        + b"X-Mixed-Case: v1\r\naccept: */*\r\nX-Dup: 1\r\nX-Dup: 2\r\nAuthorization: Bearer t\r\n\r\n"
    )  # fmt: skip
    await get(pool, "/m", headers=CIMultiDict([("A", "1"), ("a", "2")]))  # order and duplicates kept
    await get(pool, "/g", headers=(h for h in [("X-Latin", "caf\xe9")]))  # any iterable; latin-1 byte for byte
    assert srv.heads[1] == b"GET /m HTTP/1.1\r\n" + host + b"A: 1\r\na: 2\r\n\r\n"
    assert srv.heads[2] == b"GET /g HTTP/1.1\r\n" + host + b"X-Latin: caf\xe9\r\n\r\n"


async def test_request_framing_exact_bytes(raw, pools, monkeypatch) -> None:
    writes: list[list[bytes]] = []

    class Counting:
        def __init__(self, t: asyncio.Transport) -> None:
            self._t, self.log = t, []
            writes.append(self.log)

        def write(self, data: bytes) -> None:
            self.log.append(bytes(data))
            self._t.write(data)

        def __getattr__(self, name: str) -> object:
            return getattr(self._t, name)

    made = Connection.connection_made
    monkeypatch.setattr(Connection, "connection_made", lambda self, t: made(self, Counting(t)))  # type: ignore[arg-type]
    srv = await keepalive(raw, lambda head: b"HTTP/1.1 200 OK\r\nX: y\r\n\r\n" if head.startswith(b"HEAD") else answer())
    pool = pools(srv.port)
    host = f"Host: 127.0.0.1:{srv.port}\r\n".encode()

    async def gen() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b""
        yield b"defgh"

    async def nothing() -> AsyncIterator[bytes]:
        return
        yield b""

    cases = [
        ("POST", dict(body=b"hello", headers=[("Content-Type", "text/plain")]), b"Content-Type: text/plain\r\nContent-Length: 5\r\n", b"hello"),
        ("POST", {}, b"Content-Length: 0\r\n", b""),
        ("PUT", dict(body=b""), b"Content-Length: 0\r\n", b""),
        ("PATCH", {}, b"Content-Length: 0\r\n", b""),
        ("GET", {}, b"", b""),
        ("GET", dict(body=b""), b"", b""),
        ("HEAD", {}, b"", b""),
        ("DELETE", {}, b"", b""),
        ("OPTIONS", {}, b"", b""),
        ("GET", dict(body=b"q"), b"Content-Length: 1\r\n", b"q"),
        ("POST", dict(stream=gen(), content_length=8), b"Content-Length: 8\r\n", b"abcdefgh"),
        ("POST", dict(stream=gen()), b"Transfer-Encoding: chunked\r\n", b"abcdefgh"),
        ("PUT", dict(stream=nothing(), content_length=0), b"Content-Length: 0\r\n", b""),
    ]
    for i, (method, kw, framing, body) in enumerate(cases):
        resp = await pool.request(method, f"/{i}", kw.pop("headers", []), **kw)  # type: ignore[arg-type]
        resp.release()
        assert srv.heads[-1] == f"{method} /{i} HTTP/1.1\r\n".encode() + host + framing + b"\r\n", method
        assert srv.bodies[-1] == body
    assert srv.accepted == 1  # all on one keep-alive connection
    # The head and a small body go out in one write.
    assert writes[0][0] == f"POST /0 HTTP/1.1\r\n".encode() + host + b"Content-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"

    seen = asyncio.get_running_loop().create_future()

    async def handler(reader, writer, index) -> None:
        await reader.readuntil(b"\r\n\r\n")
        seen.set_result(await reader.readuntil(b"0\r\n\r\n"))
        writer.write(answer())

    async def chunks() -> AsyncIterator[bytes]:
        yield b"x" * 17
        yield b"yz"

    srv2 = await raw(handler)
    assert (await get(pools(srv2.port), "/", "POST", stream=chunks()))[0] == 200
    assert await seen == b"11\r\n" + b"x" * 17 + b"\r\n2\r\nyz\r\n0\r\n\r\n"


def test_host_header() -> None:
    ctx = ssl.create_default_context()
    assert Pool("example.com", 80)._host_line == "Host: example.com\r\n"
    assert Pool("example.com", 443, ssl=ctx)._host_line == "Host: example.com\r\n"
    assert Pool("example.com", 443)._host_line == "Host: example.com:443\r\n"
    assert Pool("example.com", 80, ssl=ctx)._host_line == "Host: example.com:80\r\n"
    assert Pool("::1", 8443, ssl=ctx).origin == "https://[::1]:8443"
    assert Pool("10.0.0.1", 8080, host_header="api.example.com")._host_line == "Host: api.example.com\r\n"
    with pytest.raises(ValueError):
        Pool("example.com", 80, host_header="a\r\nX: 1")


@pytest.mark.parametrize(
    "method,headers,target",
    [
        ("GET", [("X-A", "v\r\nInjected: 1")], "/"),
        ("GET", [("X-A", "v\nInjected: 1")], "/"),
        ("GET", [("X-A", "v\rx")], "/"),
        ("GET", [("X-A", "v\x00x")], "/"),
        ("GET", [("X-A\r\nInjected", "v")], "/"),
        ("GET", [("X A", "v")], "/"),
        ("GET", [("", "v")], "/"),
        ("GET", [], "/x HTTP/1.1\r\nInjected: 1\r\n\r\nGET /"),
        ("GET", [], "/a b"),
        ("GET", [], ""),
        ("GE T", [], "/"),
        ("GET\r\n", [], "/"),
        ("GET", [("Host", "evil.example")], "/"),
        ("GET", [("content-length", "5")], "/"),
        ("GET", [("X-A", "1"), ("Transfer-Encoding", "chunked")], "/"),
        ("GET", [("Connection", "close")], "/"),
    ],
)
async def test_unsafe_requests_rejected(raw, pools, method, headers, target) -> None:
    srv = await keepalive(raw)
    pool = pools(srv.port)
    with pytest.raises(ValueError) as ei:
        await pool.request(method, target, headers)
    assert "Injected: 1" not in str(ei.value)  # never quotes a value
    assert srv.accepted == 0 and pool.connections == 0  # nothing was sent
    # A value that merely mentions a framing header is fine.
    assert (await get(pool, "/", headers=[("X-Forwarded-Host", "host:1"), ("X-Note", "content-length: 3")]))[0] == 200


# --------------------------------------------------------------------------- response framing


async def test_response_framings(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        while True:
            head, _ = await srv.read_request(reader, index)
            path = path_of(head)
            if path == b"/cl":
                writer.write(answer(body=b"0123456789", headers=("Set-Cookie: a=1", "x-other: o  ", "set-cookie: b=2")))
            elif path == b"/chunked":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n")
            elif path == b"/eof":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
                await writer.drain()
                return
            await writer.drain()

    srv = await raw(handler)
    pool = pools(srv.port)
    resp = await pool.request("GET", "/cl", [])
    assert (resp.status, resp.reason, resp.version, resp.content_length, resp.chunked, resp.will_close) == (200, "OK", "1.1", 10, False, False)
    assert list(resp.headers.items()) == [("Set-Cookie", "a=1"), ("x-other", "o"), ("set-cookie", "b=2"), ("Content-Length", "10")]
    assert resp.headers.getall("set-cookie") == ["a=1", "b=2"]
    assert await resp.read_all() == b"0123456789" and resp.bytes_read == 10
    resp = await pool.request("GET", "/chunked", [])
    assert resp.chunked and resp.content_length is None
    assert await resp.read_all() == b"hello world"
    assert srv.accepted == 1 and pool.idle_connections == 1
    resp = await pool.request("GET", "/eof", [])
    assert resp.content_length is None and resp.will_close
    assert await resp.read_all() == b"until the end"
    assert pool.connections == 0  # a close-delimited body can't be followed by another response
    assert await get(pool, "/cl") == (200, b"0123456789")
    assert srv.accepted == 2


async def test_streamed_body_arrives_piece_by_piece(raw, pools) -> None:
    """An SSE-like chunked body: each piece reaches the caller before the next is sent."""
    got = asyncio.Queue()

    async def handler(reader, writer, index) -> None:
        await srv.read_request(reader, index)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(3):
            event = b"data: %d\n\n" % i
            writer.write(b"%x\r\n%b\r\n" % (len(event), event))
            await writer.drain()
            assert await got.get() == event
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await srv.read_request(reader, index)

    srv = await raw(handler)
    resp = await pools(srv.port).request("GET", "/events", [])
    while piece := await resp.read():
        await got.put(piece)
    assert resp.bytes_read == 3 * len(b"data: 0\n\n")


async def test_extra_bytes_after_a_response_close_the_connection(raw, pools) -> None:
    """The desync: a complete response, then (same packet) the start of another head. It
    must never become the next request's response: that connection is closed."""
    junk = b"HTTP/1.1 299 X\r\nX-From-Previous: yes\r\n"
    firsts = [
        answer(body=b"ok") + junk,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n" + junk,
        b"HTTP/1.1 204 No Content\r\n\r\n" + junk,
    ]

    async def handler(reader, writer, index) -> None:
        while True:
            head, _ = await srv.read_request(reader, index)
            if path_of(head).startswith(b"/first"):
                writer.write(firsts[int(path_of(head)[-1:])])
                await writer.drain()
                await srv.until_eof(reader, index)
                return
            # What completes the smuggled head, were it still in a parser.
            writer.write(answer(body=b"fresh"))
            await writer.drain()

    srv = await raw(handler)
    pool = pools(srv.port)
    for i in range(len(firsts)):
        resp = await pool.request("GET", f"/first{i}", [])
        assert resp.status in (200, 204)
        assert await resp.read_all() == (b"ok" if resp.status == 200 else b"")
        assert pool.connections == 0
        resp = await pool.request("GET", "/second", [])
        async with resp:
            assert resp.status == 200 and "X-From-Previous" not in resp.headers
            assert await resp.read_all() == b"fresh"
        assert srv.requests[-1][2] != srv.requests[-2][2]  # the second request used a new connection
        await wait_for(lambda: srv.requests[-2][2] in srv.eof)  # and the first was closed
        await pool.close()
        pool = pools(srv.port)


async def test_bytes_on_an_idle_connection_close_it(raw, pools) -> None:
    stray = asyncio.Event()

    async def handler(reader, writer, index) -> None:
        await srv.read_request(reader, index)
        writer.write(answer())
        await writer.drain()
        if index == 0:
            await stray.wait()
            writer.write(b"HTTP/1.1 299 X\r\nX-From-Previous: yes\r\n")
            await writer.drain()
            await srv.until_eof(reader, index)
        else:
            await srv.read_request(reader, index)

    srv = await raw(handler)
    pool = pools(srv.port)
    assert await get(pool, "/") == (200, b"ok")
    assert pool.idle_connections == 1
    stray.set()
    await wait_for(lambda: pool.connections == 0 and 0 in srv.eof)
    resp = await pool.request("GET", "/", [])
    assert "X-From-Previous" not in resp.headers and await resp.read_all() == b"ok"
    assert srv.accepted == 2


async def test_interim_responses_are_consumed(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        for together in (False, True):
            await srv.read_request(reader, index)
            parts = [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n",
                     answer("201 Created", b"made", ("X-Final: yes",))]  # fmt: skip
            for part in [b"".join(parts)] if together else parts:
                writer.write(part)
                await writer.drain()
        await srv.read_request(reader, index)

    srv = await raw(handler)
    pool = pools(srv.port)
    for _ in range(2):
        resp = await pool.request("POST", "/", [("Expect", "100-continue")], body=b"x")
        assert resp.status == 201 and resp.reason == "Created"
        assert resp.headers["X-Final"] == "yes" and "Link" not in resp.headers
        assert await resp.read_all() == b"made"
    assert srv.accepted == 1


async def test_head_204_304_have_no_body(raw, pools) -> None:
    replies = {
        b"/head-cl-bytes": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"/head-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
        b"/head-chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"/head-plain": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n",
        b"/204-cl-bytes": b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello",
        b"/204": b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
        b"/304-cl-bytes": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nhello",
        b"/304-cl": b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\nETag: \"e\"\r\n\r\n",
    }
    srv = await keepalive(raw, lambda head: replies.get(path_of(head), answer(body=b"next")))
    pool = pools(srv.port)
    reused = {b"/head-plain": True, b"/204": True, b"/304-cl": True}
    for path, reply in replies.items():
        method = "HEAD" if path.startswith(b"/head") else "GET"
        resp = await pool.request(method, path.decode(), [])
        assert resp.status == int(reply[9:12])
        assert await resp.read() == b""
        if b"Content-Length: 1000" in reply:
            assert resp.content_length == 1000  # the header's value, though no body follows
            assert await resp.read_all(limit=10) == b""
        resp.release()
        assert pool.idle_connections == (1 if reused.get(path) else 0), path
        # The next response is parsed cleanly, on the same connection only if it was reusable.
        assert await get(pool, "/next") == (200, b"next")
        assert (srv.requests[-1][2] == srv.requests[-2][2]) is reused.get(path, False), path


async def test_connection_close_is_honoured(raw, pools) -> None:
    replies = {
        b"/close200": answer(headers=("Connection: close",)),
        b"/close404": answer("404 Not Found", b"no", ("Connection: keep-alive, Close",)),
        b"/http10": b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"/http10ka": b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
    }
    srv = await keepalive(raw, lambda head: replies.get(path_of(head), answer()))
    pool = pools(srv.port)
    for path, closes in [("/close200", True), ("/close404", True), ("/http10", True), ("/http10ka", False), ("/", False)]:
        resp = await pool.request("GET", path, [])
        assert resp.will_close is closes
        await resp.read_all()
        assert pool.connections == (0 if closes else 1), path
    assert srv.accepted == 4


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n0\r\n\r\n",  # bad chunk, same packet
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2 \r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",  # bare LF
        b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"NOT HTTP AT ALL\r\n\r\n",
        b"\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n",  # nobody asked
    ],
)
async def test_ambiguous_or_invalid_response_is_a_framing_error(raw, pools, reply) -> None:
    async def handler(reader, writer, index) -> None:
        await srv.read_request(reader, index)
        writer.write(reply)
        await writer.drain()
        await srv.until_eof(reader, index)

    srv = await raw(handler)
    pool = pools(srv.port)
    with pytest.raises(ResponseFramingError) as ei:
        await pool.request("GET", "/", [])
    assert len(str(ei.value)) < 300 and b"aaaa" not in str(ei.value).encode()
    assert pool.connections == 0
    await wait_for(lambda: 0 in srv.eof)  # the connection was closed


BROKEN = {
    "content-length": (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"only ten b", True),
    "chunked-mid-chunk": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n10\r\nshort", True),
    "chunked-no-terminator": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n", True),
    "chunked-bad-size": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\nzz\r\nbad\r\n0\r\n\r\n", False),
    "chunked-bad-crlf": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhelloXX0\r\n\r\n", False),
}


@pytest.mark.parametrize("case", list(BROKEN))
async def test_broken_body_raises_from_read(raw, pools, case) -> None:
    head, rest, then_close = BROKEN[case]
    head_seen = asyncio.Event()

    async def handler(reader, writer, index) -> None:
        await srv.read_request(reader, index)
        writer.write(head)
        await writer.drain()
        await head_seen.wait()  # the body goes out only once the caller has the head
        writer.write(rest)
        await writer.drain()
        if not then_close:
            await srv.until_eof(reader, index)

    srv = await raw(handler)
    pool = pools(srv.port)
    resp = await pool.request("GET", "/", [])
    assert resp.status == 200
    head_seen.set()
    with pytest.raises(ResponseBodyError):
        while True:
            assert await resp.read(), "a broken body must never end like a complete one"
    resp.release()
    assert pool.connections == 0


# --------------------------------------------------------------------------- retries


async def test_stale_keepalive_connection_retried_for_idempotent_requests(raw, pools) -> None:
    """The server closes a kept-alive connection just as the next request arrives: a GET
    (or a PUT with a bytes body) is sent again on a new connection."""

    rst = False

    async def handler(reader, writer, index) -> None:
        await srv.read_request(reader, index)
        writer.write(answer(body=b"first" if index == 0 else b"fresh"))
        await writer.drain()
        if index == 0:
            await srv.read_request(reader, index)  # read the next request, close unanswered
            if rst:  # the second round: close with a reset
                writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            return
        await srv.until_eof(reader, index)

    srv = await raw(handler)
    pool = pools(srv.port)
    assert await get(pool, "/1") == (200, b"first")
    assert await get(pool, "/2") == (200, b"fresh")
    assert [i for _, _, i in srv.requests] == [0, 0, 1]
    await pool.close()
    srv.requests.clear()
    srv.accepted = 0
    rst = True
    pool = pools(srv.port)
    assert await get(pool, "/1") == (200, b"first")
    assert await get(pool, "/3", "PUT", body=b"replayable") == (200, b"fresh")
    assert srv.bodies == [b"", b"replayable", b"replayable"]


def _once(body: str) -> dict[str, object]:
    async def stream() -> AsyncIterator[bytes]:
        yield b"once"

    return {"bytes": dict(body=b"once"), "chunked": dict(stream=stream()), "length": dict(stream=stream(), content_length=4)}[body]


@pytest.mark.parametrize("method,body", [("POST", "bytes"), ("POST", "chunked"), ("POST", "length"), ("PATCH", "bytes"), ("GET", "chunked")])
async def test_request_that_may_have_arrived_is_never_sent_twice(raw, pools, method, body) -> None:
    """A reused connection dies after the upstream read the whole request: no retry."""

    async def handler(reader, writer, index) -> None:
        await srv.read_request(reader, index)
        writer.write(answer())
        await writer.drain()
        await srv.read_request(reader, index)  # the whole request... then close without answering

    srv = await raw(handler)
    pool = pools(srv.port)
    await get(pool, "/warm")
    with pytest.raises(Disconnected, match="before answering"):
        await pool.request(method, "/once", [], **_once(body))  # type: ignore[arg-type]
    assert [(path_of(h), b) for h, b, _ in srv.requests] == [(b"/warm", b""), (b"/once", b"once")]
    assert srv.accepted == 1 and pool.connections == 0


async def test_any_request_retried_when_not_a_byte_was_written(raw, pools, monkeypatch) -> None:
    async def handler(reader, writer, index) -> None:
        while True:
            head, _ = await srv.read_request(reader, index)
            writer.write(answer(body=b"%d" % index))
            await writer.drain()
            if path_of(head) == b"/warm":
                return  # then close the idle connection

    srv = await raw(handler)
    pool = pools(srv.port)
    assert await get(pool, "/warm") == (200, b"0")
    await wait_for(lambda: pool.connections == 0)  # the pool saw the EOF and dropped the idle connection
    assert await get(pool, "/post", "POST", body=b"data") == (200, b"1")

    # The same, with the dead connection still handed out: exchange() refuses to write
    # on it, and even a POST with a stream body goes out (once) on a new connection.
    monkeypatch.setattr(Pool, "_lost_idle", lambda self, conn: None)
    monkeypatch.setattr(Pool, "_alive", lambda self, conn: True)
    pool2 = pools(srv.port)
    await get(pool2, "/warm")  # connection 2, which the server closes
    await wait_for(lambda: pool2._idle[0].transport is None)

    async def stream() -> AsyncIterator[bytes]:
        yield b"streamed"

    assert await get(pool2, "/post2", "POST", stream=stream()) == (200, b"3")
    posts = [(path_of(h), b, i) for h, b, i in srv.requests if path_of(h).startswith(b"/post")]
    assert posts == [(b"/post", b"data", 1), (b"/post2", b"streamed", 3)]


async def test_partial_head_then_close_is_not_retried(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        await srv.read_request(reader, index)
        writer.write(answer())
        await writer.drain()
        await srv.read_request(reader, index)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await writer.drain()

    srv = await raw(handler)
    pool = pools(srv.port)
    await get(pool, "/")
    with pytest.raises(Disconnected, match="middle of the response head"):
        await pool.request("GET", "/", [])
    assert srv.accepted == 1 and pool.connections == 0


async def test_fresh_connection_closed_before_answer_is_not_retried(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        await srv.read_request(reader, index)

    srv = await raw(handler)
    pool = pools(srv.port)
    with pytest.raises(Disconnected):
        await pool.request("GET", "/", [])
    assert srv.accepted == 1 and pool.connections == 0


# --------------------------------------------------------------------------- timeouts and failures


async def test_timeouts(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        head, _ = await srv.read_request(reader, index)
        if path_of(head) == b"/body":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf!")
            await writer.drain()
        await asyncio.Event().wait()

    srv = await raw(handler)
    pool = pools(srv.port, total_timeout=0.3, limit=1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(UpstreamTimeout):
        await pool.request("GET", "/head", [])
    assert 0.25 <= loop.time() - t0 < 3
    assert pool.connections == 0

    resp = await pool.request("GET", "/body", [])
    assert await resp.read() == b"half!"
    with pytest.raises(ResponseBodyError) as ei:
        await resp.read()
    assert isinstance(ei.value, ResponseBodyTimeout) and isinstance(ei.value, UpstreamTimeout)
    resp.release()
    assert pool.connections == 0

    first = asyncio.create_task(pool.request("GET", "/head", []))
    await wait_for(lambda: pool.connections == 1)
    with pytest.raises(UpstreamTimeout):
        await pool.request("GET", "/head", [])  # waiting for the only connection is bounded too
    with pytest.raises(UpstreamTimeout):
        await first
    assert pool.connections == 0


async def test_connect_failures(pools) -> None:
    port = free_port()
    pool = pools(port)
    with pytest.raises(ConnectError) as ei:
        await pool.request("GET", "/", [])
    assert isinstance(ei.value.os_error, ConnectionRefusedError) and f"127.0.0.1:{port}" in str(ei.value)
    assert "Connection refused" in str(ei.value)
    assert pool.connections == 0
    await pool.close()
    with pytest.raises(ConnectError, match="closed"):
        await pool.request("GET", "/", [])


async def test_request_stream_failures(raw, pools) -> None:
    srv = await keepalive(raw)
    pool = pools(srv.port)

    async def boom() -> AsyncIterator[bytes]:
        yield b"part"
        raise ConnectionResetError("client went away")

    async def short() -> AsyncIterator[bytes]:
        yield b"abc"

    with pytest.raises(RequestBodyError, match="could not be read"):
        await pool.request("POST", "/", [], stream=boom())
    with pytest.raises(RequestBodyError, match="ended after 3 of 10"):
        await pool.request("POST", "/", [], stream=short(), content_length=10)
    with pytest.raises(RequestBodyError, match="longer"):
        await pool.request("POST", "/", [], stream=short(), content_length=2)
    assert pool.connections == 0
    assert await get(pool, "/") == (200, b"ok")


async def test_cancelled_request_frees_its_connection(raw, pools) -> None:
    got = asyncio.Event()

    async def handler(reader, writer, index) -> None:
        await reader.readuntil(b"\r\n\r\n")
        got.set()
        await srv.until_eof(reader, index)

    srv = await raw(handler)
    pool = pools(srv.port, limit=1)
    task = asyncio.create_task(pool.request("GET", "/", []))
    await asyncio.wait_for(got.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.connections == 0
    await wait_for(lambda: 0 in srv.eof)


async def test_unread_body_closes_the_connection_on_release(raw, pools) -> None:
    srv = await keepalive(raw, answer(body=b"z" * 2_000_000))
    pool = pools(srv.port)
    resp = await pool.request("GET", "/", [])
    assert await resp.read()
    resp.release()
    assert pool.connections == 0
    with pytest.raises(ResponseBodyError):
        await resp.read()  # reading after release fails instead of ending short
    resp = await pool.request("GET", "/", [])
    with pytest.raises(RuntimeError):
        resp.takeover()  # not a 101: and the response stays usable
    with pytest.raises(ResponseTooLarge):
        await resp.read_all(limit=1000)
    assert pool.connections == 0
    resp = await pool.request("GET", "/", [])
    assert len(await resp.read_all(limit=2_000_000)) == 2_000_000
    assert srv.accepted == 3 and pool.idle_connections == 1


async def test_closing_the_pool_fails_a_body_being_read(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        await srv.read_request(reader, index)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf!")
        await writer.drain()
        await srv.until_eof(reader, index)

    srv = await raw(handler)
    pool = pools(srv.port)
    resp = await pool.request("GET", "/", [])
    assert await resp.read() == b"half!"
    await pool.close()
    with pytest.raises(ResponseBodyError):
        await resp.read()
    assert pool.connections == 0
    await wait_for(lambda: 0 in srv.eof)


async def test_idle_connections_expire_and_keepalive_reuses_one(raw, pools) -> None:
    srv = await keepalive(raw, lambda head: answer(body=path_of(head)))
    pool = pools(srv.port, idle_timeout=0.2)
    for i in range(100):
        assert await get(pool, f"/{i}") == (200, f"/{i}".encode())
    assert srv.accepted == 1
    await asyncio.gather(*(get(pool, "/") for _ in range(3)))
    assert pool.idle_connections == 3
    await wait_for(lambda: pool.connections == 0, timeout=5)  # the sweep closed them
    await get(pool, "/")
    assert srv.accepted == 4


async def test_early_response_while_uploading(raw, pools) -> None:
    """The upstream answers 413 without reading the body: the answer comes through, the
    upload stops, and the connection is closed afterwards."""

    async def handler(reader, writer, index) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nbig!")
        await writer.drain()
        await asyncio.Event().wait()  # never reads the body

    srv = await raw(handler)
    pool = pools(srv.port)
    produced = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(BIG // len(CHUNK)):
            produced += len(CHUNK)
            yield CHUNK

    resp = await pool.request("POST", "/", [], stream=body())
    assert resp.status == 413 and resp.will_close
    assert await resp.read_all() == b"big!"
    assert pool.connections == 0
    assert produced < BIG // 4  # the writer waited for the socket instead of buffering the body


# --------------------------------------------------------------------------- limits and memory


async def test_limit_and_fifo_waiters(raw, pools) -> None:
    in_flight = peak = 0
    gate = asyncio.Event()
    order: list[int] = []

    async def handler(reader, writer, index) -> None:
        nonlocal in_flight, peak
        while True:
            head, _ = await srv.read_request(reader, index)
            order.append(int(path_of(head)[1:]))
            in_flight += 1
            peak = max(peak, in_flight)
            await gate.wait()
            in_flight -= 1
            writer.write(answer(body=path_of(head)[1:]))
            await writer.drain()

    srv = await raw(handler)
    pool = pools(srv.port, limit=4)
    tasks = [asyncio.create_task(get(pool, f"/{i}")) for i in range(20)]
    await wait_for(lambda: in_flight == 4)
    for _ in range(20):
        await asyncio.sleep(0)  # give any over-limit request every chance to slip through
    assert in_flight == 4 and pool.connections == 4 and len(pool._waiters) == 16
    gate.set()
    assert [b for _, b in await asyncio.gather(*tasks)] == [str(i).encode() for i in range(20)]
    assert peak == 4 and srv.accepted == 4

    # With one connection the order the upstream sees is exactly the order of arrival.
    order.clear()
    gate.clear()
    one = pools(srv.port, limit=1)
    tasks = [asyncio.create_task(get(one, f"/{i}")) for i in range(10)]
    await wait_for(lambda: in_flight == 1)
    gate.set()
    await asyncio.gather(*tasks)
    assert order == list(range(10)) and one.connections == 1


CHUNK = b"\x5a" * (64 * 1024)
BIG = 64 * 1024 * 1024


async def test_64mib_upload_and_download_with_bounded_memory(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if path_of(head) == b"/sink":  # chunked: count, never keep
                received = 0
                while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                    while size:
                        got = await reader.read(min(size, 1 << 16))
                        received += len(got)
                        size -= len(got)
                    await reader.readexactly(2)
                await reader.readexactly(2)
                writer.write(answer(body=str(received).encode()))
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
                for _ in range(BIG // len(CHUNK)):
                    writer.write(CHUNK)
                    await writer.drain()
            await writer.drain()

    srv = await raw(handler)
    pool = pools(srv.port, total_timeout=60)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(BIG // len(CHUNK)):
            yield CHUNK

    tracemalloc.start()
    try:
        assert await get(pool, "/sink", "POST", stream=body()) == (200, str(BIG).encode())
        up_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        resp = await pool.request("GET", "/source", [])
        assert resp.content_length == BIG
        conn = resp._conn
        assert conn is not None
        await wait_for(lambda: conn._read_paused)  # a slow reader: the socket is paused...
        assert resp._body.size <= HIGH_WATER + 256 * 1024  # ...with a bounded buffer
        total = 0
        while chunk := await resp.read():
            total += len(chunk)
        down_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == BIG
    assert up_peak < 8 * 1024 * 1024, up_peak
    assert down_peak < 8 * 1024 * 1024, down_peak
    assert pool.connections == 1 and pool.idle_connections == 1


# --------------------------------------------------------------------------- TLS and upgrades


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_tls_with_private_ca(raw, pools, ca) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    ref: list[RawServer] = []
    srv = await raw(await serve_forever(ref, lambda head: answer(body=head.split(b"\r\n")[1])), server_ctx)
    ref.append(srv)
    for host, kw in [("localhost", {}), ("127.0.0.1", {}), ("127.0.0.1", {"server_hostname": "localhost"})]:
        pool = pools(srv.port, host=host, ssl=client_ctx, **kw)
        for _ in range(3):
            assert await get(pool, "/") == (200, f"Host: {host}:{srv.port}".encode())
        assert pool.connections == 1
    for ctx, kw in [(ssl.create_default_context(), {}), (client_ctx, {"server_hostname": "wrong.example"})]:
        untrusting = pools(srv.port, host="localhost", ssl=ctx, **kw)
        with pytest.raises(ConnectError, match="certificate"):
            await untrusting.request("GET", "/", [])
        assert untrusting.connections == 0


async def test_upgrade_takeover_echo(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        head, _ = await srv.read_request(reader, index)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\nhello")
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    srv = await raw(handler)
    pool = pools(srv.port)
    resp = await pool.request("GET", "/ws", [("Upgrade", "echo")])
    assert resp.status == 101 and resp.upgraded
    assert b"\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n" in srv.heads[0]
    transport, stream = resp.takeover()
    assert pool.connections == 0  # it left the pool
    got = b""
    while len(got) < 5:
        got += await stream.read()
    assert got == b"hello"
    transport.write(b"ping")
    await transport.get_protocol().drain()  # type: ignore[attr-defined]
    got = b""
    while len(got) < 4:
        got += await stream.read()
    assert got == b"ping"
    transport.close()
    assert await asyncio.wait_for(stream.read(), 5) == b""
    resp.release()  # harmless after takeover
    with pytest.raises(RuntimeError):
        resp.takeover()


def test_errors_are_upstream_errors() -> None:
    for cls in (ConnectError, Disconnected, ResponseFramingError, ResponseBodyError, UpstreamTimeout, RequestBodyError, ResponseBodyTimeout):
        assert issubclass(cls, UpstreamError)
    assert response_module.MAX_HEAD == 64 * 1024
