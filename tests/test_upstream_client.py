"""The lean upstream client (authproxy.proxy.upstream) against real loopback servers.

aiohttp servers where ordinary HTTP is enough; raw ``asyncio.start_server`` servers
where the test needs the exact bytes on the wire or a misbehaving upstream.
No fixed sleeps: every wait is an event or a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import struct
import tracemalloc
from typing import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import trustme
from aiohttp import web
from multidict import CIMultiDict

from authproxy.proxy.upstream import (
    RequestBodyError,
    UpstreamBodyTimeout,
    UpstreamConnectError,
    UpstreamConnectionError,
    UpstreamDisconnected,
    UpstreamPool,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.timeout(60)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


# --------------------------------------------------------------------------- helpers


class RawServer:
    """A loopback TCP server running ``handler(reader, writer, connection_index)`` per connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.tasks: set[asyncio.Task] = set()
        self.port = 0

    async def start(self) -> "RawServer":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
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
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.tasks.discard(task)

    async def read_request(self, reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
        """One request: (head, de-chunked body); both recorded."""
        head = await reader.readuntil(b"\r\n\r\n")
        lower = head.lower()
        body = b""
        if b"\r\ncontent-length:" in lower:
            n = int(lower.split(b"\r\ncontent-length:")[1].split(b"\r\n")[0])
            body = await reader.readexactly(n)
        elif b"\r\ntransfer-encoding: chunked" in lower:
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                parts.append(await reader.readexactly(size + 2))
                if size == 0:
                    break
            body = b"".join(p[:-2] for p in parts)
        self.heads.append(head)
        self.bodies.append(body)
        return head, body

    async def close(self) -> None:
        self.server.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Handler], Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        s = await RawServer(handler).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        await s.close()


@pytest.fixture
async def pools() -> AsyncIterator[Callable[..., UpstreamPool]]:
    made: list[UpstreamPool] = []

    def make(port: int, *, scheme: str = "http", host: str = "127.0.0.1", **kw: object) -> UpstreamPool:
        kw.setdefault("ssl", None)
        kw.setdefault("connect_timeout", 5.0)
        kw.setdefault("total_timeout", 10.0)
        p = UpstreamPool(scheme, host, port, **kw)  # type: ignore[arg-type]
        made.append(p)
        return p

    yield make
    for p in made:
        await p.close()


def answer(status: str = "200 OK", body: bytes = b"ok", headers: tuple[str, ...] = ()) -> bytes:
    lines = [f"HTTP/1.1 {status}", *headers, f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def keepalive_server(srv_holder: list, reply: bytes | Callable[[bytes], bytes] = answer()) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int) -> None:
        while True:
            head, _ = await srv_holder[0].read_request(reader)
            writer.write(reply(head) if callable(reply) else reply)
            await writer.drain()

    return handler


async def start_keepalive(raw: Callable[[Handler], Awaitable[RawServer]], reply: bytes | Callable[[bytes], bytes] = answer()) -> RawServer:
    holder: list[RawServer] = []
    srv = await raw(keepalive_server(holder, reply))
    holder.append(srv)
    return srv


async def get(pool: UpstreamPool, target: str = "/", method: str = "GET", **kw: object) -> tuple[int, bytes]:
    resp = await pool.request(method, target, kw.pop("headers", []), **kw)  # type: ignore[arg-type]
    async with resp:
        return resp.status, await resp.content.read()


# --------------------------------------------------------------------------- the request on the wire


async def test_request_head_bytes_exact(raw, pools) -> None:
    srv = await start_keepalive(raw)
    pool = pools(srv.port)
    headers = [("X-Mixed-Case", "v1"), ("accept", "*/*"), ("X-Dup", "1"), ("X-Dup", "2"), ("Authorization", "Bearer t")]
    await get(pool, "/a%20b/c?x=1&y=%2F&z", headers=headers)
    assert srv.heads[0] == (
        b"GET /a%20b/c?x=1&y=%2F&z HTTP/1.1\r\n"
        + f"Host: 127.0.0.1:{srv.port}\r\n".encode()
        + b"X-Mixed-Case: v1\r\naccept: */*\r\nX-Dup: 1\r\nX-Dup: 2\r\nAuthorization: Bearer t\r\n\r\n"
    )
    # A CIMultiDict keeps order and duplicates too; no User-Agent, no Accept-Encoding.
    await get(pool, "/m", headers=CIMultiDict([("A", "1"), ("a", "2")]))
    assert srv.heads[1] == f"GET /m HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nA: 1\r\na: 2\r\n\r\n".encode()


async def test_request_bodies_framing(raw, pools) -> None:
    srv = await start_keepalive(raw)
    pool = pools(srv.port)
    host = f"Host: 127.0.0.1:{srv.port}\r\n".encode()

    await get(pool, "/b", "POST", headers=[("Content-Type", "text/plain")], body=b"hello")
    assert srv.heads[-1] == b"POST /b HTTP/1.1\r\n" + host + b"Content-Type: text/plain\r\nContent-Length: 5\r\n\r\n"
    assert srv.bodies[-1] == b"hello"

    await get(pool, "/e", "PUT", body=b"")
    assert srv.heads[-1] == b"PUT /e HTTP/1.1\r\n" + host + b"Content-Length: 0\r\n\r\n"

    async def gen() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b""
        yield b"defgh"

    await get(pool, "/s", "POST", stream=gen(), content_length=8)
    assert srv.heads[-1] == b"POST /s HTTP/1.1\r\n" + host + b"Content-Length: 8\r\n\r\n"
    assert srv.bodies[-1] == b"abcdefgh"

    await get(pool, "/c", "POST", stream=gen())
    assert srv.heads[-1] == b"POST /c HTTP/1.1\r\n" + host + b"Transfer-Encoding: chunked\r\n\r\n"
    assert srv.bodies[-1] == b"abcdefgh"
    assert srv.accepted == 1  # all on one keep-alive connection


async def test_chunked_wire_format(raw, pools) -> None:
    seen = asyncio.get_running_loop().create_future()

    async def handler(reader, writer, index) -> None:
        await reader.readuntil(b"\r\n\r\n")
        seen.set_result(await reader.readuntil(b"0\r\n\r\n"))
        writer.write(answer())

    srv = await raw(handler)

    async def gen() -> AsyncIterator[bytes]:
        yield b"x" * 17
        yield b"yz"

    status, _ = await get(pools(srv.port), "/", "POST", stream=gen())
    assert status == 200
    assert await seen == b"11\r\n" + b"x" * 17 + b"\r\n2\r\nyz\r\n0\r\n\r\n"


def test_host_header_omits_default_port() -> None:
    assert UpstreamPool("http", "example.com", 80, ssl=None, connect_timeout=1, total_timeout=1)._host_line == "Host: example.com\r\n"
    assert UpstreamPool("https", "example.com", 443, ssl=None, connect_timeout=1, total_timeout=1)._host_line == "Host: example.com\r\n"
    assert UpstreamPool("http", "example.com", 443, ssl=None, connect_timeout=1, total_timeout=1)._host_line == "Host: example.com:443\r\n"
    assert UpstreamPool("https", "::1", 8443, ssl=None, connect_timeout=1, total_timeout=1).origin == "https://[::1]:8443"


@pytest.mark.parametrize(
    "headers,target",
    [
        ([("X-A", "v\r\nInjected: 1")], "/"),
        ([("X-A", "v\nInjected: 1")], "/"),
        ([("X-A", "v\rx")], "/"),
        ([("X-A", "v\x00x")], "/"),
        ([("X-A\r\nInjected", "v")], "/"),
        ([], "/x HTTP/1.1\r\nInjected: 1\r\n\r\nGET /"),
        ([], "/a b"),
        ([("Host", "evil.example")], "/"),
        ([("content-length", "5")], "/"),
        ([("X-A", "1"), ("Transfer-Encoding", "chunked")], "/"),
    ],
)
async def test_header_injection_rejected(raw, pools, headers, target) -> None:
    srv = await start_keepalive(raw)
    pool = pools(srv.port)
    with pytest.raises(ValueError) as ei:
        await pool.request("GET", target, headers)
    assert "Injected: 1" not in str(ei.value)  # never quotes a value
    assert srv.accepted == 0  # nothing was sent
    # A value that merely mentions a framing header is fine.
    assert (await get(pool, "/", headers=[("X-Forwarded-Host", "host:1"), ("X-Note", "content-length: 3")]))[0] == 200


# --------------------------------------------------------------------------- response framing


async def test_response_framings(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        while True:
            head, _ = await srv.read_request(reader)
            path = head.split(b" ")[1]
            if path == b"/cl":
                writer.write(answer(body=b"0123456789"))
            elif path == b"/chunked":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n")
            elif path == b"/eof":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
                await writer.drain()
                writer.close()
                return
            await writer.drain()

    srv = await raw(handler)
    pool = pools(srv.port)
    resp = await pool.request("GET", "/cl", [])
    assert (resp.status, resp.content_length, resp.chunked) == (200, 10, False)
    assert await resp.read() == b"0123456789"
    resp = await pool.request("GET", "/chunked", [])
    assert resp.chunked and resp.content_length is None
    assert await resp.read() == b"hello world"
    assert srv.accepted == 1 and pool.idle_connections == 1
    resp = await pool.request("GET", "/eof", [])
    assert resp.content_length is None
    assert await resp.read() == b"until the end"
    assert pool.connections == 0  # a close-delimited body can't be followed by another response
    assert (await get(pool, "/cl"))[1] == b"0123456789"
    assert srv.accepted == 2


async def test_head_204_304_have_no_body_and_keep_the_connection(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        while True:
            head, _ = await srv.read_request(reader)
            method, path = head.split(b" ")[:2]
            if method == b"HEAD":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: text/plain\r\n\r\n")
            elif path == b"/204":
                writer.write(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
            elif path == b"/304":
                writer.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\nETag: \"e\"\r\n\r\n")
            else:
                writer.write(answer(body=b"after"))
            await writer.drain()

    srv = await raw(handler)
    pool = pools(srv.port)
    for method, path, status in [("HEAD", "/h", 200), ("GET", "/204", 204), ("GET", "/304", 304), ("HEAD", "/h2", 200)]:
        resp = await pool.request(method, path, [])
        assert resp.status == status
        assert await resp.content.read() == b""
        assert resp.content.at_eof()
        if method == "HEAD":
            assert resp.content_length == 1000  # the header's value, though no body follows
        resp.release()
        # The next response on the same connection parses cleanly.
        assert await get(pool, "/next") == (200, b"after")
    assert srv.accepted == 1


async def test_interim_responses_are_skipped(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        while True:
            await srv.read_request(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
            writer.write(answer("201 Created", b"made", ("X-Final: yes",)))
            await writer.drain()

    srv = await raw(handler)
    pool = pools(srv.port)
    for _ in range(2):
        resp = await pool.request("POST", "/", [("Expect", "100-continue")], body=b"x")
        assert resp.status == 201 and resp.reason == "Created"
        assert resp.headers["X-Final"] == "yes" and "Link" not in resp.headers
        assert await resp.read() == b"made"
    assert srv.accepted == 1


async def test_duplicate_headers_kept(raw, pools) -> None:
    reply = answer(headers=("Set-Cookie: a=1; Path=/", "X-Other: o", "Set-Cookie: b=2", "set-cookie: c=3"))
    srv = await start_keepalive(raw, reply)
    resp = await pools(srv.port).request("GET", "/", [])
    async with resp:
        assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2", "c=3"]
        assert [k for k, _ in resp.raw_headers] == [b"Set-Cookie", b"X-Other", b"Set-Cookie", b"set-cookie", b"Content-Length"]


async def test_large_response_head_is_a_protocol_error(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20000 + b"\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    srv = await raw(handler)
    pool = pools(srv.port)
    with pytest.raises(UpstreamProtocolError) as ei:
        await pool.request("GET", "/", [])
    assert "invalid response" in str(ei.value) and len(str(ei.value)) < 400
    assert pool.connections == 0


async def test_garbage_status_line_is_a_protocol_error(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        await srv.read_request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()

    srv = await raw(handler)
    with pytest.raises(UpstreamProtocolError):
        await pools(srv.port).request("GET", "/", [])


# --------------------------------------------------------------------------- keep-alive


async def test_keepalive_one_connection_for_100_requests(upstream, pools) -> None:
    peers: set[tuple] = set()

    async def handler(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        return web.json_response({"n": request.query.get("n")})

    app = web.Application()
    app.router.add_get("/", handler)
    url = await upstream(app)
    pool = pools(int(url.rsplit(":", 1)[1]))
    for i in range(100):
        resp = await pool.request("GET", f"/?n={i}", [("Accept", "application/json")])
        assert await resp.read() == b'{"n": "%d"}' % i
    assert len(peers) == 1
    assert pool.connections == 1


async def test_stale_keepalive_connection_is_retried_once(raw, pools) -> None:
    """The server closes an idle keep-alive connection just as the next request arrives."""

    async def handler(reader, writer, index) -> None:
        await srv.read_request(reader)
        writer.write(answer(body=b"first" if index == 0 else b"fresh"))
        await writer.drain()
        if index == 0:
            await reader.readuntil(b"\r\n\r\n")  # the second request: drop it unanswered
            return
        while True:
            await srv.read_request(reader)
            writer.write(answer(body=b"again"))
            await writer.drain()

    srv = await raw(handler)
    pool = pools(srv.port)
    assert await get(pool, "/1") == (200, b"first")
    assert await get(pool, "/2", "POST", body=b"replayable") == (200, b"fresh")  # not idempotent, still safe: never reached the app
    assert srv.accepted == 2
    assert srv.bodies[-1] == b"replayable"
    assert await get(pool, "/3") == (200, b"again")
    assert pool.connections == 1


async def test_stale_connection_with_reset_is_retried(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        await srv.read_request(reader)
        writer.write(answer(body=b"%d" % index))
        await writer.drain()
        if index == 0:
            await reader.readuntil(b"\r\n\r\n")
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close → RST
            writer.transport.abort()
            return
        await reader.read()

    srv = await raw(handler)
    pool = pools(srv.port)
    assert await get(pool, "/") == (200, b"0")
    assert await get(pool, "/") == (200, b"1")


async def test_streamed_body_on_stale_connection_is_not_retried(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        await srv.read_request(reader)
        writer.write(answer())
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")

    srv = await raw(handler)
    pool = pools(srv.port)
    await get(pool, "/")

    async def gen() -> AsyncIterator[bytes]:
        yield b"once"

    with pytest.raises(UpstreamDisconnected):
        await pool.request("POST", "/", [], stream=gen(), content_length=4)
    assert srv.accepted == 1


async def test_fresh_connection_closed_before_answer_is_not_retried(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        await reader.readuntil(b"\r\n\r\n")

    srv = await raw(handler)
    pool = pools(srv.port)
    with pytest.raises(UpstreamDisconnected) as ei:
        await pool.request("GET", "/", [])
    assert isinstance(ei.value, aiohttp.ClientConnectionError) and isinstance(ei.value, OSError)
    assert srv.accepted == 1 and pool.connections == 0


async def test_partial_head_then_close_is_not_retried(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        await srv.read_request(reader)
        if index == 0:
            writer.write(answer())
            await writer.drain()
            await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await writer.drain()

    srv = await raw(handler)
    pool = pools(srv.port)
    await get(pool, "/")
    with pytest.raises(UpstreamDisconnected, match="middle of the response head"):
        await pool.request("GET", "/", [])
    assert srv.accepted == 1


async def test_idle_connection_closed_by_server_is_dropped(raw, pools) -> None:
    close_now = asyncio.Event()

    async def handler(reader, writer, index) -> None:
        await srv.read_request(reader)
        writer.write(answer(body=b"%d" % index))
        await writer.drain()
        await close_now.wait()

    srv = await raw(handler)
    pool = pools(srv.port)
    assert await get(pool, "/") == (200, b"0")
    assert pool.idle_connections == 1
    close_now.set()
    await wait_for(lambda: pool.connections == 0, timeout=5)
    close_now.clear()
    assert await get(pool, "/") == (200, b"1")


async def test_connection_close_and_http10_are_honoured(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        while True:
            head, _ = await srv.read_request(reader)
            path = head.split(b" ")[1]
            if path == b"/close":
                writer.write(answer(headers=("Connection: close",)))
            elif path == b"/http10":
                writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
            elif path == b"/http10ka":
                writer.write(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok")
            else:
                writer.write(answer())
            await writer.drain()

    srv = await raw(handler)
    pool = pools(srv.port)
    await get(pool, "/close")
    assert pool.connections == 0
    await get(pool, "/http10")
    assert pool.connections == 0
    await get(pool, "/http10ka")
    assert pool.connections == 1
    await get(pool, "/")
    assert srv.accepted == 3


async def test_idle_connections_expire(raw, pools) -> None:
    srv = await start_keepalive(raw)
    pool = pools(srv.port, keepalive=0.2)
    await asyncio.gather(*(get(pool, "/") for _ in range(3)))
    assert pool.idle_connections == 3
    await wait_for(lambda: pool.connections == 0, timeout=5)  # the periodic sweep closed them
    await get(pool, "/")
    assert srv.accepted == 4


async def test_unread_body_closes_connection_on_release(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        while True:
            await srv.read_request(reader)
            writer.write(answer(body=b"z" * 2_000_000))
            await writer.drain()

    srv = await raw(handler)
    pool = pools(srv.port)
    resp = await pool.request("GET", "/", [])
    assert len(await resp.content.read(100)) == 100
    resp.release()
    assert pool.connections == 0
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.content.read()  # reading after release fails instead of ending short
    resp = await pool.request("GET", "/", [])
    assert len(await resp.read()) == 2_000_000
    assert srv.accepted == 2 and pool.idle_connections == 1


# --------------------------------------------------------------------------- broken bodies, timeouts, errors


TRUNCATED = {
    "content-length": (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"only ten b"),
    "chunked-mid-chunk": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n10\r\nshort"),
    "chunked-no-terminator": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n"),
    "chunked-bad-size": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\nzz\r\nbad\r\n0\r\n\r\n"),
}


@pytest.mark.parametrize("case", list(TRUNCATED))
async def test_truncated_body_raises_payload_error(raw, pools, case) -> None:
    head, rest = TRUNCATED[case]
    head_seen = asyncio.Event()

    async def handler(reader, writer, index) -> None:
        await srv.read_request(reader)
        writer.write(head)
        await writer.drain()
        await head_seen.wait()  # the body goes out only once the client has parsed the head
        writer.write(rest)
        await writer.drain()

    srv = await raw(handler)
    pool = pools(srv.port)
    resp = await pool.request("GET", "/", [])
    assert resp.status == 200
    head_seen.set()
    got = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        while True:
            chunk = await resp.content.readany()
            assert chunk, "a truncated body must not end like a complete one"
            got += chunk
    resp.release()
    assert pool.connections == 0


async def test_broken_framing_in_first_segment_fails_the_request(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        await srv.read_request(reader)
        writer.write(b"".join(TRUNCATED["chunked-bad-size"]))
        await writer.drain()

    srv = await raw(handler)
    pool = pools(srv.port)
    try:
        resp = await pool.request("GET", "/", [])
    except UpstreamProtocolError as e:
        assert "invalid response" in str(e)  # the head and the bad chunk arrived together
    else:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert pool.connections == 0


async def test_total_timeout_before_headers(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.Event().wait()  # accept, read, never answer

    srv = await raw(handler)
    pool = pools(srv.port, total_timeout=0.3)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(asyncio.TimeoutError) as ei:
        await pool.request("GET", "/", [])
    assert isinstance(ei.value, UpstreamTimeout)
    assert 0.25 <= loop.time() - t0 < 5
    assert pool.connections == 0


async def test_total_timeout_during_body(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf!")
        await writer.drain()
        await asyncio.Event().wait()

    srv = await raw(handler)
    pool = pools(srv.port, total_timeout=0.3)
    resp = await pool.request("GET", "/", [])
    assert await resp.content.readany() == b"half!"
    with pytest.raises(aiohttp.ClientPayloadError) as ei:
        await resp.content.readany()
    assert isinstance(ei.value, UpstreamBodyTimeout) and isinstance(ei.value, asyncio.TimeoutError)
    resp.release()
    assert pool.connections == 0


async def test_connection_refused(pools) -> None:
    port = free_port()
    pool = pools(port)
    with pytest.raises(UpstreamConnectError) as ei:
        await pool.request("GET", "/", [])
    e = ei.value
    assert isinstance(e, UpstreamConnectionError) and isinstance(e, OSError) and isinstance(e, aiohttp.ClientConnectionError)
    assert e.errno == errno.ECONNREFUSED and isinstance(e.os_error, ConnectionRefusedError)
    assert f"127.0.0.1:{port}" in str(e)
    assert pool.connections == 0


async def test_dns_failure(pools) -> None:
    pool = pools(80, host="no-such-host.invalid", connect_timeout=5)
    # EAI_NONAME at once here; a resolver that can't be reached may time out instead.
    with pytest.raises((UpstreamConnectError, UpstreamTimeout), match="no-such-host.invalid"):
        await pool.request("GET", "/", [])
    assert pool.connections == 0


async def test_request_stream_failures(raw, pools) -> None:
    srv = await start_keepalive(raw)
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
        await asyncio.Event().wait()

    srv = await raw(handler)
    pool = pools(srv.port, limit=1)
    task = asyncio.create_task(pool.request("GET", "/", []))
    await asyncio.wait_for(got.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.connections == 0


async def test_closed_pool_refuses(raw, pools) -> None:
    srv = await start_keepalive(raw)
    pool = pools(srv.port)
    await get(pool, "/")
    await pool.close()
    assert pool.connections == 0
    with pytest.raises(UpstreamConnectionError, match="closed"):
        await pool.request("GET", "/", [])


# --------------------------------------------------------------------------- limits and memory


async def test_requests_beyond_limit_wait_fifo_and_all_succeed(upstream, pools) -> None:
    in_flight = 0
    peak = 0
    gate = asyncio.Event()
    order: list[int] = []
    peers: set[tuple] = set()

    async def handler(request: web.Request) -> web.Response:
        nonlocal in_flight, peak
        peers.add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        order.append(int(request.query["i"]))
        in_flight += 1
        peak = max(peak, in_flight)
        await gate.wait()
        in_flight -= 1
        return web.Response(text=request.query["i"])

    app = web.Application()
    app.router.add_get("/", handler)
    url = await upstream(app)
    pool = pools(int(url.rsplit(":", 1)[1]), limit=4)
    tasks = [asyncio.create_task(get(pool, f"/?i={i}")) for i in range(20)]
    await wait_for(lambda: in_flight == 4)
    for _ in range(20):
        await asyncio.sleep(0)  # give any over-limit request every chance to slip through
    assert in_flight == 4 and pool.connections == 4 and len(pool._waiters) == 16
    gate.set()
    results = await asyncio.gather(*tasks)
    assert [b for _, b in results] == [str(i).encode() for i in range(20)]
    assert peak == 4 and len(peers) == 4
    assert sorted(order[:4]) == [0, 1, 2, 3] and order[4:] == list(range(4, 20))  # waiters served in order


async def test_pool_wait_is_bounded_by_total_timeout(raw, pools) -> None:
    async def handler(reader, writer, index) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.Event().wait()

    srv = await raw(handler)
    pool = pools(srv.port, limit=1, total_timeout=0.3)
    first = asyncio.create_task(pool.request("GET", "/", []))
    await wait_for(lambda: srv.accepted == 1)
    with pytest.raises(UpstreamTimeout):
        await pool.request("GET", "/", [])  # either "no connection became free" or the exchange timeout
    with pytest.raises(UpstreamTimeout):
        await first
    assert pool.connections == 0


CHUNK = b"\x5a" * (64 * 1024)
BIG = 64 * 1024 * 1024


async def test_64mib_upload_and_download_bounded_memory(upstream, pools) -> None:
    received = 0

    async def sink(request: web.Request) -> web.Response:
        nonlocal received
        while True:
            chunk = await request.content.readany()
            if not chunk:
                break
            received += len(chunk)
        return web.Response(text=str(received))

    async def source(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(BIG)})
        await resp.prepare(request)
        for _ in range(BIG // len(CHUNK)):
            await resp.write(CHUNK)
        await resp.write_eof()
        return resp

    app = web.Application(client_max_size=0)
    app.router.add_post("/sink", sink)
    app.router.add_get("/source", source)
    url = await upstream(app)
    pool = pools(int(url.rsplit(":", 1)[1]), total_timeout=60)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(BIG // len(CHUNK)):
            yield CHUNK

    tracemalloc.start()
    try:
        resp = await pool.request("POST", "/sink", [], stream=body())  # chunked, unknown length
        assert await resp.read() == str(BIG).encode()
        up_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        resp = await pool.request("GET", "/source", [])
        assert resp.content_length == BIG
        total = 0
        while True:
            chunk = await resp.content.readany()
            if not chunk:
                break
            total += len(chunk)
        resp.release()
        down_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == BIG
    # Client and server share the process: both are bounded; neither holds the 64 MiB.
    assert up_peak < 8 * 1024 * 1024, up_peak
    assert down_peak < 8 * 1024 * 1024, down_peak
    assert pool.connections == 1


async def test_early_response_while_uploading(raw, pools) -> None:
    """The upstream answers (413) without reading the body: the answer comes through,
    and releasing it stops the upload and closes the connection."""

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
    assert resp.status == 413
    assert await resp.read() == b"big!"
    assert pool.connections == 0
    assert produced < BIG // 2  # the writer waited for the socket instead of buffering the body


async def test_aiohttp_request_content_as_the_body(upstream, pools) -> None:
    """The forwarder's case: an aiohttp server's request.content streamed upstream."""

    async def sink(request: web.Request) -> web.Response:
        data = await request.read()
        te = request.headers.get("Transfer-Encoding", "-")
        return web.Response(body=b"%d %s %s" % (len(data), te.encode(), data[:3]))

    sink_app = web.Application(client_max_size=0)
    sink_app.router.add_post("/sink", sink)
    sink_url = await upstream(sink_app)
    pool = pools(int(sink_url.rsplit(":", 1)[1]))

    async def front(request: web.Request) -> web.Response:
        resp = await pool.request("POST", "/sink", [], stream=request.content, content_length=request.content_length)
        return web.Response(body=await resp.read())

    front_app = web.Application(client_max_size=0)
    front_app.router.add_post("/", front)
    front_url = await upstream(front_app)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(16):
            yield CHUNK

    async with aiohttp.ClientSession() as s:
        async with s.post(front_url + "/", data=b"abc" + CHUNK) as r:
            assert await r.read() == b"%d - abc" % (len(CHUNK) + 3)
        async with s.post(front_url + "/", data=chunks()) as r:
            assert await r.read() == b"%d chunked ZZZ" % (16 * len(CHUNK))
    assert pool.connections == 1


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_tls_with_private_ca(upstream, pools, ca) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=f"{request.scheme} {request.host}")

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        for host in ("localhost", "127.0.0.1"):
            pool = pools(port, scheme="https", host=host, ssl=client_ctx)
            for _ in range(3):
                assert await get(pool, "/") == (200, f"https {host}:{port}".encode())
            assert pool.connections == 1
        untrusting = pools(port, scheme="https", host="localhost", ssl=ssl.create_default_context())
        with pytest.raises(UpstreamConnectError, match="certificate"):
            await untrusting.request("GET", "/", [])
        assert untrusting.connections == 0
    finally:
        await runner.cleanup()
