"""The proxy between a hostile client and a hostile upstream, through real sockets.

Each test sends exact bytes and asserts both what the client got and what the
upstream received: a malformed request never reaches the upstream, one
response never bleeds into the next, and a POST is never sent twice.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from tests.conftest import secret, wait_for
from tests.rawpeer import RawUpstream, exchange, ok, read_response

TOKEN = "framing-static-token-0123"


def svc(url: str) -> dict:
    return {"services": {"svc": {"upstream": url, "auth": {"scheme": "bearer", "token": secret(TOKEN)}}}}


@pytest.fixture
async def raw_upstream():
    made: list[RawUpstream] = []

    async def start(script) -> RawUpstream:  # type: ignore[no-untyped-def]
        up = await RawUpstream(script).start()
        made.append(up)
        return up

    yield start
    for up in made:
        await up.close()


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def _body(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1]


GOOD = "GET /svc/x HTTP/1.1\r\nHost: localhost\r\n"

VECTORS = {
    "cl_and_te": "POST /svc/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_chunked_identity": "POST /svc/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "te_xchunked": "POST /svc/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te_repeated": "POST /svc/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_not_last": "POST /svc/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "two_equal_cl": "POST /svc/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab",
    "cl_list": "POST /svc/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2, 2\r\n\r\nab",
    "cl_signed": "POST /svc/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: +2\r\n\r\nab",
    "cl_hex": "POST /svc/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0x2\r\n\r\nab",
    "cl_overlong": "POST /svc/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999999999999999999999\r\n\r\nab",
    "bad_chunk_size": "POST /svc/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    "bare_lf": "GET /svc/x HTTP/1.1\nHost: localhost\n\n",
    "bare_cr": "GET /svc/x HTTP/1.1\rHost: localhost\r\n\r\n",
    "obs_fold": "GET /svc/x HTTP/1.1\r\nHost: localhost\r\nX-A: one\r\n two\r\n\r\n",
    "nul_in_value": "GET /svc/x HTTP/1.1\r\nHost: localhost\r\nX-A: a\x00b\r\n\r\n",
    "bad_header_name": "GET /svc/x HTTP/1.1\r\nHost: localhost\r\nX A: b\r\n\r\n",
    "http09": "GET /svc/x\r\n\r\n",
    "http20": "GET /svc/x HTTP/2.0\r\nHost: localhost\r\n\r\n",
    "two_spaces": "GET  /svc/x HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "huge_head": GOOD + "".join(f"X-H{i}: {'v' * 1000}\r\n" for i in range(70)) + "\r\n",
    "long_chunk_ext": "POST /svc/x HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n2;" + "e" * 2000 + "\r\nab\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(VECTORS))
async def test_malformed_request_is_refused_and_never_forwarded(name, raw_upstream, proxy, caplog):
    up = await raw_upstream(lambda c, i, h, b: (ok(), False))
    p = await proxy(svc(up.url))
    caplog.set_level(logging.DEBUG, logger="authproxy")
    got = await exchange(p.server.port, VECTORS[name].encode("latin-1"))
    assert _status(got) == 400, got[:200]
    assert b"x-authproxy-error: bad_request" in got.lower()
    doc = json.loads(_body(got))
    assert doc["error"] == "bad_request" and doc["service"] is None
    assert up.received == []
    assert not any(r.exc_info for r in caplog.records), "a refusal must log without a traceback"


@pytest.mark.parametrize(
    "path",
    ["/svc/a/..%2fb", "/svc/a/%2e%2e/b", "/svc/a/..%5cb", "/svc/a/..;/b", "/svc/%2E%2E", "/svc/a/./b", "/svc/a\\..\\b"],
)
async def test_paths_that_climb_out_are_refused(path, raw_upstream, proxy):
    up = await raw_upstream(lambda c, i, h, b: (ok(), False))
    p = await proxy(svc(up.url))
    got = await exchange(p.server.port, f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    assert _status(got) == 400 and json.loads(_body(got))["error"] == "bad_request"
    assert up.received == []


@pytest.mark.parametrize("method", ["TRACE", "CONNECT"])
async def test_trace_and_connect_are_refused_with_405(method, raw_upstream, proxy):
    up = await raw_upstream(lambda c, i, h, b: (ok(), False))
    p = await proxy(svc(up.url))
    target = "/svc/x" if method == "TRACE" else "localhost:443"
    got = await exchange(p.server.port, f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    assert _status(got) == 405
    assert json.loads(_body(got))["error"] == "bad_request"
    assert up.received == []


async def test_bytes_after_a_complete_response_never_reach_the_next_request(raw_upstream, proxy):
    """The desync: a complete response followed by the start of another head in the
    same packet. The leftover must die with its connection."""

    def script(conn: int, index: int, head: bytes, body: bytes) -> tuple[bytes, bool]:
        if conn == 0 and index == 0:
            return ok(b"first") + b"HTTP/1.1 299 X\r\nX-From-Previous: alice-secret\r\n", False
        return ok(b"second"), False

    up = await raw_upstream(script)
    p = await proxy(svc(up.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.server.port)
    try:
        for want in (b"first", b"second", b"second"):
            writer.write(GOOD.encode() + b"\r\n")
            status, headers, body = await read_response(reader)
            assert status == 200 and body == want
            assert "x-from-previous" not in headers
    finally:
        writer.close()
    assert up.connections >= 2  # the tainted connection was closed, not reused


async def test_post_is_never_sent_twice_when_a_reused_connection_dies(raw_upstream, proxy):
    """The upstream reads a whole POST on a kept-alive connection, then closes without
    answering: the client gets 502, and the upstream saw the POST once."""

    def script(conn: int, index: int, head: bytes, body: bytes) -> tuple[bytes, bool]:
        if head.startswith(b"POST"):
            return b"", True
        return ok(), False

    up = await raw_upstream(script)
    p = await proxy(svc(up.url))
    async with p.request("GET", "/svc/warm") as r:
        assert r.status == 200
    async with p.request("POST", "/svc/pay", data=b"amount=10") as r:
        assert r.status == 502
        assert (await r.json())["error"] == "upstream_unreachable"
    posts = [x for x in up.received if x.request_line.startswith("POST")]
    assert len(posts) == 1 and posts[0].body == b"amount=10"


async def test_get_is_retried_once_on_a_stale_connection(raw_upstream, proxy):
    def script(conn: int, index: int, head: bytes, body: bytes) -> tuple[bytes, bool]:
        if conn == 0 and index == 1:
            return b"", True  # read the GET, closed without a byte of a response
        return ok(b"fine"), False

    up = await raw_upstream(script)
    p = await proxy(svc(up.url))
    for _ in range(2):
        async with p.request("GET", "/svc/r") as r:
            assert r.status == 200 and await r.read() == b"fine"
    assert len(up.received) == 3


async def test_head_reply_with_a_body_gives_the_head_and_a_fresh_connection(raw_upstream, proxy):
    def script(conn: int, index: int, head: bytes, body: bytes) -> tuple[bytes, bool]:
        if head.startswith(b"HEAD"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", False
        return ok(b"after"), False

    up = await raw_upstream(script)
    p = await proxy(svc(up.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.server.port)
    try:
        writer.write(b"HEAD /svc/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 5" in head
        writer.write(GOOD.encode() + b"\r\n")
        status, _, body = await read_response(reader)
        assert status == 200 and body == b"after"  # not "hello" left over from the HEAD
    finally:
        writer.close()


@pytest.mark.parametrize("status", [200, 404])
async def test_upstream_connection_close_is_obeyed(status, raw_upstream, proxy):
    def script(conn: int, index: int, head: bytes, body: bytes) -> tuple[bytes, bool]:
        return f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi".encode(), False  # ...but keeps it open

    up = await raw_upstream(script)
    p = await proxy(svc(up.url))
    for _ in range(3):
        async with p.request("GET", "/svc/c") as r:
            assert r.status == status
    assert up.connections == 3


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n0\r\n\r\n",
    ],
    ids=["cl_and_te", "two_cl", "bad_chunk"],
)
async def test_ambiguous_response_is_502(reply, raw_upstream, proxy):
    up = await raw_upstream(lambda c, i, h, b: (reply, False))
    p = await proxy(svc(up.url))
    got = await exchange(p.server.port, (GOOD + "Connection: close\r\n\r\n").encode())
    if _status(got) == 200:
        # A bad chunk can only be seen after the head went out: the body must be broken.
        assert not got.endswith(b"0\r\n\r\n")
    else:
        assert _status(got) == 502 and json.loads(_body(got))["error"] == "upstream_unreachable"


async def test_interim_1xx_is_consumed(raw_upstream, proxy):
    up = await raw_upstream(lambda c, i, h, b: (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ok(b"final"), False))
    p = await proxy(svc(up.url))
    async with p.request("GET", "/svc/x") as r:
        assert r.status == 200 and await r.read() == b"final"


async def test_continue_is_not_sent_before_the_credential(tmp_path, raw_upstream, proxy):
    """With the service in backoff, a client that asked for 100-continue gets the 503
    instead, and uploads nothing."""
    up = await raw_upstream(lambda c, i, h, b: (ok(), False))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    cfg = {
        "services": {
            "svc": {
                "upstream": up.url,
                "auth": {
                    "scheme": "oauth2",
                    "token_url": f"http://127.0.0.1:{dead}/token",
                    "client_id": "id",
                    "client_secret": secret("continue-client-secret"),
                },
            }
        }
    }
    p = await proxy(cfg)
    await wait_for(lambda: p.server.runtimes["svc"].creds.status().state == "backoff")
    reader, writer = await asyncio.open_connection("127.0.0.1", p.server.port)
    try:
        writer.write(b"PUT /svc/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3145728\r\nExpect: 100-continue\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert status == 503 and json.loads(body)["error"] == "token_unavailable"
    finally:
        writer.close()
    assert up.received == []
