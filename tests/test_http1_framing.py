"""RequestParser alone: where a message ends, how the head is bounded, what is refused.

The server tests send every vector through a socket; these pin the parser's
contract (bytes consumed, pieces split anywhere) without one.
"""

from __future__ import annotations

import pytest

from authproxy.http1.errors import FramingError
from authproxy.http1.framing import RequestParser
from authproxy.http1.heads import response_head

GET = b"GET /a?b=c HTTP/1.1\r\nHost: x\r\n\r\n"
POST_CL = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
POST_CHUNKED = (
    b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;ext=1\r\nabc\r\n4\r\n\r\n\r\n\r\n0\r\nTrailer-A: v\r\n\r\n"
)


def feed_all(data: bytes, step: int | None = None, max_head: int = 64 * 1024) -> tuple[RequestParser, int]:
    """Feed ``data`` whole or ``step`` bytes at a time; returns the parser and bytes consumed."""
    p = RequestParser(max_head)
    used = 0
    pieces = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        n = p.feed(piece)
        used += n
        if p.complete:
            break
    return p, used


@pytest.mark.parametrize("step", [None, 1, 2, 3, 5, 7])
@pytest.mark.parametrize("message", [GET, POST_CL, POST_CHUNKED], ids=["get", "cl", "chunked"])
def test_message_ends_exactly_however_it_is_split(message: bytes, step: int | None) -> None:
    p, used = feed_all(message + b"GET /next HTTP/1.1\r\n", step)
    assert p.complete and used == len(message)
    body = b"".join(p.body)
    assert body == {GET: b"", POST_CL: b"hello", POST_CHUNKED: b"abc\r\n\r\n"}[message]


def test_pipelined_remainder_is_left_for_the_next_parser() -> None:
    data = GET + POST_CL + GET
    offset, bodies = 0, []
    while offset < len(data):
        p = RequestParser()
        offset += p.feed(data[offset:])
        assert p.complete
        bodies.append((p.head.method, b"".join(p.body)))  # type: ignore[union-attr]
    assert bodies == [("GET", b""), ("POST", b"hello"), ("GET", b"")]


def test_head_fields() -> None:
    p, _ = feed_all(b"PUT /x%20y HTTP/1.1\r\nHost: h\r\nX-A:  one \t\r\nx-a: two\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\nz")
    h = p.head
    assert h is not None
    assert (h.method, h.target, h.version, h.content_length, h.chunked) == ("PUT", "/x%20y", "1.1", 1, False)
    assert h.headers.getall("x-a") == ["one", "two"]
    assert h.expect_continue and h.keep_alive and not h.upgrade


def test_head_limit_is_exact() -> None:
    line = b"GET / HTTP/1.1\r\nHost: x\r\nX: "
    exact = line + b"v" * (200 - len(line) - 4) + b"\r\n\r\n"
    assert len(exact) == 200
    p, _ = feed_all(exact, max_head=200)
    assert p.complete
    with pytest.raises(FramingError, match="request head too large"):
        feed_all(exact[:-4] + b"v\r\n\r\n", max_head=200)
    with pytest.raises(FramingError, match="request head too large"):
        feed_all(exact[:-4] + b"v\r\n\r\n", step=1, max_head=200)


def test_chunk_extension_budget_counts_the_whole_message() -> None:
    head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    small = b"".join(b"1;e=%d\r\nx\r\n" % i for i in range(100)) + b"0\r\n\r\n"
    p, _ = feed_all(head + small)
    assert p.complete and b"".join(p.body) == b"x" * 100
    big = b"".join(b"1;" + b"e" * 100 + b"\r\nx\r\n" for _ in range(20)) + b"0\r\n\r\n"
    for step in (None, 1, 64):
        with pytest.raises(FramingError, match="chunk extensions too long"):
            feed_all(head + big, step)


def test_upgrade_hands_back_the_raw_bytes() -> None:
    data = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    p = RequestParser()
    used = p.feed(data + b"\x81\x02hi")
    assert p.complete and p.head.upgrade and used == len(data)  # type: ignore[union-attr]


def test_declined_upgrade_body_is_still_decoded() -> None:
    head = b"POST /h HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"2\r\nab\r\n1\r\nc\r\n0\r\n\r\n"
    for step in (None, 1, 3):
        p, used = feed_all(head + body + b"NEXT", step)
        assert p.complete and b"".join(p.body) == b"abc"
        if step is None:
            assert used == len(head + body)


def test_response_head_framing_is_the_engines() -> None:
    head = response_head(
        200, "OK\r\nX: y", [("Content-Length", "9"), ("Transfer-Encoding", "chunked"), ("Connection", "keep-alive"), ("A", "b")],
        [("Content-Length", "2")],
    )
    assert head == b"HTTP/1.1 200 OK  X: y\r\nA: b\r\nContent-Length: 2\r\n\r\n"
    with pytest.raises(ValueError):
        response_head(200, "OK", [("A", "b\r\nSet-Cookie: x")], [])
    with pytest.raises(ValueError):
        response_head(200, "OK", [("A B", "c")], [])
