"""The engine's server side through real sockets: a listening Server on 127.0.0.1:0,
raw bytes from the client, exact bytes back.

Every framing vector of the SPEC is refused with on_error's 400, ``Connection:
close``, the connection closed, and the handler never called. Timeouts, the
connection cap, descriptor exhaustion, pipelining, 100-continue, streaming,
backpressure and takeover are exercised with small limits and polled deadlines.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from typing import AsyncIterator, Awaitable, Callable

import httptools
import pytest

from authproxy.http1.errors import BodyError
from authproxy.http1.server import Exchange, Server, ServerLimits
from authproxy.http1.tunnel import RawProtocol, relay

Handler = Callable[[Exchange], Awaitable[None]]


class Harness:
    """A running Server plus what its handler and on_error saw."""

    def __init__(self, handler: Handler | None, limits: ServerLimits | None) -> None:
        self.calls: list[Exchange] = []
        self.errors: list[tuple[str, Exchange | None]] = []
        self._handler = handler or echo
        self.server = Server(self._handle, self._on_error, limits or ServerLimits())

    async def _handle(self, ex: Exchange) -> None:
        self.calls.append(ex)
        await self._handler(ex)

    def _on_error(self, reason: str, ex: Exchange | None) -> tuple[int, list[tuple[str, str]], bytes]:
        self.errors.append((reason, ex))
        return 400, [("Content-Type", "text/plain"), ("Content-Length", "999"), ("X-Err", "bad_request")], b"refused: " + reason.encode()

    @property
    def port(self) -> int:
        return self.server.addresses()[0][1]  # type: ignore[index]

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


async def echo(ex: Exchange) -> None:
    body = bytearray()
    while chunk := await ex.read():
        body += chunk
    await ex.respond(200, "OK", [("Content-Type", "text/plain")], f"{ex.method} {ex.target} ".encode() + bytes(body))


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    made: list[Harness] = []

    async def start(handler: Handler | None = None, **limits: float) -> Harness:
        h = Harness(handler, ServerLimits(**limits))  # type: ignore[arg-type]
        await h.server.listen_tcp("127.0.0.1", 0)
        made.append(h)
        return h

    yield start
    for h in made:
        await h.server.close(1.0)


async def read_until_eof(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


async def read_response(reader: asyncio.StreamReader, head_only: bool = False, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One response, parsed by llhttp's response parser (HEAD: ``head_only``)."""
    got: dict[str, object] = {"headers": {}, "body": bytearray(), "done": False}

    class P:
        def on_header(self, n: bytes, v: bytes) -> None:
            got["headers"][n.decode().lower()] = v.decode()  # type: ignore[index]

        def on_headers_complete(self) -> None:
            got["head"] = True

        def on_body(self, b: bytes) -> None:
            got["body"] += b  # type: ignore[operator]

        def on_message_complete(self) -> None:
            got["done"] = True

    parser = httptools.HttpResponseParser(P())
    async with asyncio.timeout(timeout):
        if head_only:
            head = await reader.readuntil(b"\r\n\r\n")
            parser.feed_data(head)
            return parser.get_status_code(), got["headers"], b""  # type: ignore[return-value]
        while not got["done"]:
            data = await reader.read(65536)
            if not data:
                break
            parser.feed_data(data)
    return parser.get_status_code(), got["headers"], bytes(got["body"])  # type: ignore[arg-type]


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


# -- every framing vector ---------------------------------------------------------------

H = "Host: x\r\n"
TE = "Transfer-Encoding: chunked\r\n"
VECTORS: dict[str, tuple[str, str]] = {
    # name: (request bytes, reason on_error receives)
    "cl_and_te": ("POST / HTTP/1.1\r\n" + H + "Content-Length: 4\r\n" + TE + "\r\n0\r\n\r\n", "both Content-Length and Transfer-Encoding"),
    "te_and_cl": ("POST / HTTP/1.1\r\n" + H + TE + "Content-Length: 4\r\n\r\n0\r\n\r\n", "both Content-Length and Transfer-Encoding"),
    "te_chunked_identity": ("POST / HTTP/1.1\r\n" + H + "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", "invalid Transfer-Encoding"),
    "te_xchunked": ("POST / HTTP/1.1\r\n" + H + "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", "invalid Transfer-Encoding"),
    "te_identity": ("POST / HTTP/1.1\r\n" + H + "Transfer-Encoding: identity\r\n\r\n", "invalid Transfer-Encoding"),
    "te_gzip_chunked": ("POST / HTTP/1.1\r\n" + H + "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "invalid Transfer-Encoding"),
    "te_chunked_not_last": ("POST / HTTP/1.1\r\n" + H + "Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", "invalid Transfer-Encoding"),
    "te_repeated": ("POST / HTTP/1.1\r\n" + H + TE + TE + "\r\n0\r\n\r\n", "invalid Transfer-Encoding"),
    "te_in_http10": ("POST / HTTP/1.0\r\n" + TE + "\r\n0\r\n\r\n", "Transfer-Encoding in an HTTP/1.0 request"),
    "cl_twice_equal": ("POST / HTTP/1.1\r\n" + H + "Content-Length: 2\r\nContent-Length: 2\r\n\r\nab", "several Content-Length headers"),
    "cl_list": ("POST / HTTP/1.1\r\n" + H + "Content-Length: 2, 2\r\n\r\nab", "invalid Content-Length"),
    "cl_plus": ("POST / HTTP/1.1\r\n" + H + "Content-Length: +2\r\n\r\nab", "invalid Content-Length"),
    "cl_minus": ("POST / HTTP/1.1\r\n" + H + "Content-Length: -2\r\n\r\nab", "invalid Content-Length"),
    "cl_hex": ("POST / HTTP/1.1\r\n" + H + "Content-Length: 0x2\r\n\r\nab", "invalid Content-Length"),
    "cl_empty": ("POST / HTTP/1.1\r\n" + H + "Content-Length: \r\n\r\nab", "invalid Content-Length"),
    "cl_19_digits": ("POST / HTTP/1.1\r\n" + H + "Content-Length: 1000000000000000000\r\n\r\nab", "invalid Content-Length"),
    "cl_19_digits_zeros": ("POST / HTTP/1.1\r\n" + H + "Content-Length: 0000000000000000002\r\n\r\nab", "invalid Content-Length"),
    "cl_overflow": ("POST / HTTP/1.1\r\n" + H + "Content-Length: 99999999999999999999999\r\n\r\nab", "invalid Content-Length"),
    "chunk_size_not_hex": ("POST / HTTP/1.1\r\n" + H + TE + "\r\nzz\r\nab\r\n0\r\n\r\n", "malformed chunked body"),
    "chunk_size_signed": ("POST / HTTP/1.1\r\n" + H + TE + "\r\n-2\r\nab\r\n0\r\n\r\n", "malformed chunked body"),
    "chunk_size_overflow": ("POST / HTTP/1.1\r\n" + H + TE + "\r\n10000000000000000\r\nab\r\n0\r\n\r\n", "malformed chunked body"),
    "chunk_size_space": ("POST / HTTP/1.1\r\n" + H + TE + "\r\n2 \r\nab\r\n0\r\n\r\n", "malformed chunked body"),
    "chunk_data_overrun": ("POST / HTTP/1.1\r\n" + H + TE + "\r\n2\r\nabc\r\n0\r\n\r\n", "malformed chunked body"),
    "chunk_ext_2k_one": ("POST / HTTP/1.1\r\n" + H + TE + "\r\n2;" + "e" * 2000 + "\r\nab\r\n0\r\n\r\n", "chunk extensions too long"),
    "chunk_ext_2k_many": ("POST / HTTP/1.1\r\n" + H + TE + "\r\n" + ("1;" + "e" * 100 + "\r\na\r\n") * 20 + "0\r\n\r\n", "chunk extensions too long"),
    "chunk_size_zeros": ("POST / HTTP/1.1\r\n" + H + TE + "\r\n" + "0" * 1100 + "1\r\na\r\n0\r\n\r\n", "chunk extensions too long"),
    "chunk_bare_lf": ("POST / HTTP/1.1\r\n" + H + TE + "\r\n2\nab\r\n0\r\n\r\n", "malformed chunked body"),
    "chunk_data_bare_lf": ("POST / HTTP/1.1\r\n" + H + TE + "\r\n2\r\nab\n0\r\n\r\n", "malformed chunked body"),
    "trailer_bad_name": ("POST / HTTP/1.1\r\n" + H + TE + "\r\n0\r\nBad Name: v\r\n\r\n", "malformed header"),
    "bare_lf_request_line": ("GET / HTTP/1.1\n" + H + "\r\n", "malformed request line"),
    "bare_lf_header": ("GET / HTTP/1.1\r\nHost: x\n\r\n", "malformed header"),
    "bare_lf_everywhere": ("GET / HTTP/1.1\nHost: x\n\n", "malformed request line"),
    "bare_lf_end_of_head": ("GET / HTTP/1.1\r\n" + H + "\n", "malformed header"),
    "bare_lf_before_request": ("\nGET / HTTP/1.1\r\n" + H + "\r\n", "malformed request line"),
    "bare_cr_request_line": ("GET / HTTP/1.1\r" + H + "\r\n", "malformed request line"),
    "bare_cr_header": ("GET / HTTP/1.1\r\nHost: x\rX-A: b\r\n\r\n", "malformed header"),
    "bare_cr_before_request": ("\rGET / HTTP/1.1\r\n" + H + "\r\n", "malformed request line"),
    "obs_fold_space": ("GET / HTTP/1.1\r\n" + H + "X-A: one\r\n two\r\n\r\n", "malformed header"),
    "obs_fold_tab": ("GET / HTTP/1.1\r\n" + H + "X-A: one\r\n\ttwo\r\n\r\n", "malformed header"),
    "nul_in_value": ("GET / HTTP/1.1\r\n" + H + "X-A: a\x00b\r\n\r\n", "malformed header"),
    "ctl_in_value": ("GET / HTTP/1.1\r\n" + H + "X-A: a\x01b\r\n\r\n", "malformed header"),
    "name_space": ("GET / HTTP/1.1\r\n" + H + "X A: b\r\n\r\n", "malformed header"),
    "name_space_before_colon": ("GET / HTTP/1.1\r\n" + H + "X-A : b\r\n\r\n", "malformed header"),
    "name_paren": ("GET / HTTP/1.1\r\n" + H + "X(A): b\r\n\r\n", "malformed header"),
    "name_empty": ("GET / HTTP/1.1\r\n" + H + ": b\r\n\r\n", "malformed header"),
    "name_non_ascii": ("GET / HTTP/1.1\r\n" + H + "X-\xe9: b\r\n\r\n", "malformed header"),
    "header_no_colon": ("GET / HTTP/1.1\r\n" + H + "X-A\r\n\r\n", "malformed header"),
    "http09": ("GET /\r\n\r\n", "unsupported HTTP version"),
    "http09_explicit": ("GET / HTTP/0.9\r\n" + H + "\r\n", "unsupported HTTP version"),
    "http20": ("GET / HTTP/2.0\r\n" + H + "\r\n", "unsupported HTTP version"),
    "http12": ("GET / HTTP/1.2\r\n" + H + "\r\n", "malformed request line"),
    "http30": ("GET / HTTP/3.0\r\n" + H + "\r\n", "malformed request line"),
    "http_1_10": ("GET / HTTP/1.10\r\n" + H + "\r\n", "malformed request line"),
    "http_lowercase": ("GET / http/1.1\r\n" + H + "\r\n", "malformed request line"),
    "h2_preface": ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "malformed request head"),
    "two_spaces_after_method": ("GET  / HTTP/1.1\r\n" + H + "\r\n", "malformed request line"),
    "two_spaces_after_target": ("GET /  HTTP/1.1\r\n" + H + "\r\n", "malformed request line"),
    "tab_separator": ("GET\t/ HTTP/1.1\r\n" + H + "\r\n", "malformed request line"),
    "trailing_space": ("GET / HTTP/1.1 \r\n" + H + "\r\n", "malformed request line"),
    "no_target": ("GET HTTP/1.1\r\n" + H + "\r\n", "malformed request target"),
    "space_in_target": ("GET /a b HTTP/1.1\r\n" + H + "\r\n", "malformed request line"),
    "ctl_in_target": ("GET /a\x01b HTTP/1.1\r\n" + H + "\r\n", "malformed request target"),
    "unknown_method": ("FOO / HTTP/1.1\r\n" + H + "\r\n", "malformed request line"),
    "lowercase_method": ("get / HTTP/1.1\r\n" + H + "\r\n", "malformed request line"),
    "missing_host_11": ("GET / HTTP/1.1\r\n\r\n", "missing or repeated Host header"),
    "two_hosts": ("GET / HTTP/1.1\r\n" + H + "Host: y\r\n\r\n", "missing or repeated Host header"),
    "head_over_64k_headers": ("GET / HTTP/1.1\r\n" + H + "".join(f"X-H{i}: {'v' * 1000}\r\n" for i in range(70)) + "\r\n", "request head too large"),
    "head_over_64k_one_line": ("GET /" + "a" * 70000 + " HTTP/1.1\r\n" + H + "\r\n", "request head too large"),
    "head_over_64k_no_end": ("GET / HTTP/1.1\r\n" + H + "X: " + "v" * 70000, "request head too large"),
}


@pytest.mark.parametrize("name", sorted(VECTORS))
async def test_framing_vector_is_refused_with_400_and_closed(name: str, serve) -> None:
    h = await serve()
    raw, reason = VECTORS[name]
    reader, writer = await h.connect()
    try:
        writer.write(raw.encode("latin-1"))
        got = await read_until_eof(reader)  # EOF: the server closed the connection
    finally:
        writer.close()
    assert got.startswith(b"HTTP/1.1 400 Bad Request\r\n"), got[:200]
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close" in head and b"\r\nX-Err: bad_request" in head
    assert f"\r\nContent-Length: {len(body)}\r\n".encode() in head + b"\r\n"  # the engine's, not on_error's 999
    assert body == b"refused: " + reason.encode()
    assert [r for r, _ in h.errors] == [reason]
    assert h.calls == []
    await until(lambda: h.server.connections == 0)


async def test_accepted_edge_cases_are_served(serve) -> None:
    """What the rules must not refuse: case and spaces around chunked, 18-digit
    length, short extensions, trailers, leading empty lines, HTTP/1.0 without Host."""
    h = await serve()
    ok = [
        "POST /a HTTP/1.1\r\n" + H + "Transfer-Encoding:  CHUNKED  \r\n\r\n2;a=b\r\nab\r\n0\r\nT: v\r\n\r\n",
        "POST /b HTTP/1.1\r\n" + H + "Content-Length: 000000000000000002\r\n\r\nab",
        "\r\n\r\nGET /c HTTP/1.1\r\n" + H + "\r\n",
        "GET /d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        "GET /e?q=%C3%A9 HTTP/1.1\r\n" + H + "X-Obs: caf\xe9\r\n\r\n",
    ]
    reader, writer = await h.connect()
    for raw in ok:
        writer.write(raw.encode("latin-1"))
        status, _, body = await read_response(reader)
        assert status == 200, raw
    writer.close()
    assert [(c.method, c.target) for c in h.calls] == [("POST", "/a"), ("POST", "/b"), ("GET", "/c"), ("GET", "/d"), ("GET", "/e?q=%C3%A9")]
    assert h.calls[-1].headers["x-obs"] == "caf\xe9" and h.errors == []


async def test_body_broken_after_the_handler_started(serve) -> None:
    """A bad chunk arriving while the handler reads: read() raises, the client gets
    on_error's 400 (with the exchange), the connection closes."""
    seen: list[BaseException] = []

    async def reader_handler(ex: Exchange) -> None:
        try:
            while await ex.read():
                pass
        except BodyError as exc:
            seen.append(exc)
            raise

    h = await serve(reader_handler)
    reader, writer = await h.connect()
    writer.write(("POST /p HTTP/1.1\r\n" + H + TE + "\r\n3\r\nabc\r\n").encode())
    await until(lambda: h.calls and h.calls[0].bytes_in == 3)
    writer.write(b"zz\r\n")
    got = await read_until_eof(reader)
    assert got.startswith(b"HTTP/1.1 400 ") and got.endswith(b"refused: malformed chunked body")
    assert h.errors[0][1] is h.calls[0] and h.calls[0].status == 400
    await until(lambda: bool(seen))
    writer.close()


# -- timeouts, the cap, descriptors -------------------------------------------------------


async def test_trickled_head_within_the_timeout_is_served(serve) -> None:
    h = await serve(header_timeout=2.0)
    reader, writer = await h.connect()
    writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for byte in ("GET /slow HTTP/1.1\r\n" + H + "\r\n").encode():
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.005)  # the trickle itself, not a wait for the server
    status, _, body = await read_response(reader)
    assert status == 200 and body == b"GET /slow "
    writer.close()


async def test_slowloris_head_is_cut_at_header_timeout(serve) -> None:
    h = await serve(header_timeout=0.3)
    reader, writer = await h.connect()
    t0 = time.monotonic()
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    got = await read_until_eof(reader)
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 1.5, elapsed
    assert got.startswith(b"HTTP/1.1 400 ") and got.endswith(b"refused: request head timed out")
    assert h.calls == [] and h.errors == [("request head timed out", None)]
    writer.close()


async def test_head_trickled_past_header_timeout_is_cut(serve) -> None:
    """Bytes that keep coming do not extend the head's deadline (measured from its first byte)."""
    h = await serve(header_timeout=0.3)
    reader, writer = await h.connect()
    t0 = time.monotonic()
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
    eof = asyncio.ensure_future(read_until_eof(reader))
    while not eof.done() and time.monotonic() - t0 < 3:
        writer.write(b"X-A: b\r\n")  # a header line every 20 ms, never the end of the head
        await asyncio.sleep(0.02)
    got = await eof
    assert 0.25 <= time.monotonic() - t0 < 1.5
    assert got.endswith(b"refused: request head timed out") and h.calls == []
    writer.close()


async def test_idle_keep_alive_connection_is_closed_silently_after_idle_timeout(serve) -> None:
    h = await serve(idle_timeout=0.3)
    reader, writer = await h.connect()
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = await read_response(reader)
    assert status == 200 and "connection" not in headers
    t0 = time.monotonic()
    assert await read_until_eof(reader) == b""  # nothing sent, just closed
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 1.5, elapsed
    writer.close()
    await until(lambda: h.server.connections == 0)


async def test_connection_cap_holds_new_connections_in_the_backlog(serve) -> None:
    h = await serve(max_connections=5)
    conns = []
    for _ in range(5):
        r, w = await h.connect()
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(r))[0] == 200
        conns.append((r, w))
    assert h.server.connections == 5
    r6, w6 = await h.connect()  # the kernel completes the handshake; we do not accept
    w6.write(b"GET /sixth HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(r6.read(1), 0.3)
    assert h.server.connections == 5 and len(h.calls) == 5
    conns[0][1].close()
    status, _, body = await read_response(r6)
    assert status == 200 and body == b"GET /sixth "
    for _, w in [*conns[1:], (r6, w6)]:
        w.close()


EMFILE_SERVER = r"""
import asyncio, logging, resource, sys
from authproxy.http1.server import Server
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(created).3f %(levelname)s %(message)s")
async def handler(ex):
    await ex.respond(200, "OK", [], b"ok")
async def main():
    s = Server(handler, lambda r, e: (400, [], r.encode()))
    await s.listen_tcp("127.0.0.1", 0)
    resource.setrlimit(resource.RLIMIT_NOFILE, (40, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    print(s.addresses()[0][1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


async def test_descriptor_exhaustion_pauses_logs_rarely_and_recovers() -> None:
    proc = subprocess.Popen([sys.executable, "-c", EMFILE_SERVER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 10)  # type: ignore[union-attr]
        port = int(line)
        socks = []
        for _ in range(60):  # more than the 40 descriptors the server may hold
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(s)
        served = 0
        for s in socks[:20]:  # well under the limit: accepted and answered
            s.settimeout(5)
            served += s.recv(100).startswith(b"HTTP/1.1 200")
        assert served == 20
        time.sleep(1.2)  # let the accept loop hit EMFILE for a while: that is the scenario
        for s in socks:
            s.close()
        deadline = time.monotonic() + 10
        while True:  # service resumes as connections close
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    if s.recv(100).startswith(b"HTTP/1.1 200"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "service did not resume"
            await asyncio.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    lines = [line for line in err.decode().splitlines() if "accept failed" in line]
    assert lines, err.decode()[-2000:]
    assert all("Traceback" not in line for line in err.decode().splitlines())
    assert re.search(r"accept failed: too many open files; \d+ connections open; pausing", lines[0])
    stamps = [float(line.split()[0]) for line in lines]
    assert all(b - a >= 0.95 for a, b in zip(stamps, stamps[1:])), stamps
    assert len(lines) <= 4, lines  # ~1.2 s of exhaustion: at most one a second


# -- keep-alive, pipelining, versions -------------------------------------------------------


async def test_pipelined_requests_in_one_packet_are_answered_in_order(serve) -> None:
    order: list[str] = []

    async def handler(ex: Exchange) -> None:
        order.append("start " + ex.target)
        await asyncio.sleep(0.01 if ex.target == "/1" else 0)  # the first is slower
        await echo(ex)
        order.append("end " + ex.target)

    h = await serve(handler)
    reader, writer = await h.connect()
    writer.write(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nPOST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /3 HTTP/1.1\r\nHost: x\r\n\r\n")
    bodies = [(await read_response(reader))[2] for _ in range(3)]
    assert bodies == [b"GET /1 ", b"POST /2 abc", b"GET /3 "]
    assert order == ["start /1", "end /1", "start /2", "end /2", "start /3", "end /3"]
    writer.close()


async def test_http10_closes_unless_keep_alive_is_asked(serve) -> None:
    h = await serve()
    reader, writer = await h.connect()
    writer.write(b"GET /a HTTP/1.0\r\n\r\n")
    got = await read_until_eof(reader)
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nConnection: close\r\n" in got
    writer.close()
    reader, writer = await h.connect()
    for path in (b"/b", b"/c"):
        writer.write(b"GET " + path + b" HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert status == 200 and headers["connection"] == "keep-alive" and body == b"GET " + path + b" "
    writer.close()
    assert [c.version for c in h.calls] == ["1.0"] * 3


async def test_connection_close_from_a_11_client_is_obeyed(serve) -> None:
    h = await serve()
    reader, writer = await h.connect()
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /never HTTP/1.1\r\nHost: x\r\n\r\n")
    got = await read_until_eof(reader)
    assert got.count(b"HTTP/1.1 200") == 1 and b"Connection: close" in got
    assert len(h.calls) == 1
    writer.close()


# -- bodies, 100-continue, streaming --------------------------------------------------------------


async def test_100_continue_only_when_the_body_is_read(serve) -> None:
    async def refuse(ex: Exchange) -> None:
        await ex.respond(403, "Forbidden", [], b"no")

    h = await serve(refuse)
    reader, writer = await h.connect()
    writer.write(b"PUT /u HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    got = await read_until_eof(reader)  # no 100; the body was never read, so the connection closes
    assert got.startswith(b"HTTP/1.1 403 Forbidden\r\n") and b"Connection: close" in got and b"100 Continue" not in got
    assert h.calls[0].expect_continue
    writer.close()

    h = await serve(echo)
    reader, writer = await h.connect()
    writer.write(b"PUT /u HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    assert await asyncio.wait_for(reader.readexactly(25), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    status, headers, body = await read_response(reader)
    assert status == 200 and body == b"PUT /u hello" and "connection" not in headers
    writer.close()


async def test_send_continue_is_explicit_and_idempotent(serve) -> None:
    async def handler(ex: Exchange) -> None:
        ex.send_continue()
        ex.send_continue()
        await echo(ex)

    h = await serve(handler)
    reader, writer = await h.connect()
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert await asyncio.wait_for(reader.readexactly(25), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"ok")
    status, _, body = await read_response(reader)
    assert status == 200 and body == b"POST / ok"
    writer.close()


async def test_chunked_request_body_is_delivered_exactly(serve) -> None:
    got: list[bytes] = []

    async def handler(ex: Exchange) -> None:
        body = bytearray()
        while chunk := await ex.read():
            body += chunk
        got.append(bytes(body))
        await ex.respond(200, "OK", [], hashlib.sha256(body).hexdigest().encode())

    h = await serve(handler)
    payload = os.urandom(300_000) + b"\r\n\r\n0\r\n\r\n" + os.urandom(1000)
    sizes = [1, 0xFFF, 70_000, 4, 100_000]
    chunks, pos = [], 0
    for n in sizes:
        chunks.append(b"%x\r\n" % n + payload[pos : pos + n] + b"\r\n")
        pos += n
    rest = payload[pos:]
    chunks.append(b"%X;name=value\r\n" % len(rest) + rest + b"\r\n")
    data = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(chunks) + b"0\r\nX-Trailer: t\r\n\r\n"
    reader, writer = await h.connect()
    for i in range(0, len(data), 777):  # in odd pieces
        writer.write(data[i : i + 777])
    status, _, body = await read_response(reader)
    assert status == 200 and body == hashlib.sha256(payload).hexdigest().encode()
    assert got == [payload] and h.calls[0].chunked and h.calls[0].bytes_in == len(payload)
    writer.close()


async def test_streamed_response_chunked_to_11_close_delimited_to_10(serve) -> None:
    async def handler(ex: Exchange) -> None:
        await ex.start(200, "OK", [("Content-Type", "text/event-stream"), ("Content-Length", "1"), ("Transfer-Encoding", "gzip")])
        for piece in (b"one", b"", b"two"):
            await ex.write(piece)
        await ex.end()

    h = await serve(handler)
    reader, writer = await h.connect()
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    raw = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
    assert raw == b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n3\r\ntwo\r\n0\r\n\r\n"
    writer.close()
    reader, writer = await h.connect()
    writer.write(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    raw = await read_until_eof(reader)
    assert raw == b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\nonetwo"
    writer.close()
    assert [c.bytes_out for c in h.calls] == [6, 6]


async def test_head_204_304_have_no_body(serve) -> None:
    async def handler(ex: Exchange) -> None:
        if ex.target == "/stream":
            await ex.start(200, "OK", [], content_length=5)
            await ex.write(b"hello")
            await ex.end()
        elif ex.target == "/upstream-head":
            await ex.respond(200, "OK", [("Content-Length", "1234")])
        else:
            status = int(ex.target[1:] or 200)
            await ex.respond(status, "X", [], b"hello")

    h = await serve(handler)
    reader, writer = await h.connect()
    writer.write(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 200 X\r\nContent-Length: 5\r\n\r\n"
    writer.write(b"HEAD /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    writer.write(b"HEAD /upstream-head HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
    for status in (204, 304):
        writer.write(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % status)
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 %d X\r\n\r\n" % status
    writer.write(b"GET /200 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")  # nothing leaked in between
    assert await read_until_eof(reader) == b"HTTP/1.1 200 X\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    writer.close()


async def test_backpressure_keeps_a_64_mib_upload_bounded(serve) -> None:
    size = 64 * 1024 * 1024
    high = 256 * 1024

    async def handler(ex: Exchange) -> None:
        n = 0
        while chunk := await ex.read():
            n += len(chunk)
            await asyncio.sleep(0)  # a consumer no faster than the loop
        await ex.respond(200, "OK", [], str(n).encode())

    h = await serve(handler, read_high_water=high)
    reader, writer = await h.connect()
    writer.write(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
    block = b"x" * (1024 * 1024)
    for _ in range(64):
        writer.write(block)
        await writer.drain()
    status, _, body = await read_response(reader, timeout=30)
    assert status == 200 and body == str(size).encode()
    ex = h.calls[0]
    assert ex.bytes_in == size
    assert ex._peak_buffered <= high + 256 * 1024, ex._peak_buffered  # the high water + one socket read
    writer.close()


# -- handler outcomes -------------------------------------------------------------------------------


async def test_handler_failures(serve, caplog) -> None:
    async def handler(ex: Exchange) -> None:
        if ex.target == "/raise":
            raise RuntimeError("bug")
        if ex.target == "/silent":
            return
        if ex.target == "/inject":
            await ex.respond(200, "OK", [("X", "a\r\nSet-Cookie: s=1")], b"")
        await ex.start(200, "OK", [])
        await ex.write(b"partial")
        if ex.target == "/abort":
            ex.abort()
            return
        raise RuntimeError("late bug")

    h = await serve(handler)
    for path in (b"/raise", b"/inject"):
        reader, writer = await h.connect()
        writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        got = await read_until_eof(reader)
        assert got.startswith(b"HTTP/1.1 500 ") and b"Connection: close" in got and b"Set-Cookie" not in got
        writer.close()
    assert len([r for r in caplog.records if r.name == "authproxy.http1"]) == 2
    for path in (b"/silent", b"/abort", b"/late"):
        reader, writer = await h.connect()
        writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            got = await read_until_eof(reader)
        except ConnectionResetError:
            got = b"<reset>"
        assert b"0\r\n\r\n" not in got and not got.startswith(b"HTTP/1.1 500"), (path, got)
        writer.close()


async def test_abort_of_a_close_delimited_response_is_a_reset(serve) -> None:
    async def handler(ex: Exchange) -> None:
        await ex.start(200, "OK", [])
        await ex.write(b"partial")
        ex.abort()

    h = await serve(handler)
    reader, writer = await h.connect()
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    with pytest.raises(ConnectionResetError):
        await read_until_eof(reader)
    writer.close()


async def test_unread_body_closes_the_connection_after_the_response(serve) -> None:
    async def handler(ex: Exchange) -> None:
        await ex.respond(413, "Too Large", [], b"no")

    h = await serve(handler)
    reader, writer = await h.connect()
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
    status, headers, body = await read_response(reader)
    assert status == 413 and headers["connection"] == "close"
    writer.write(b"x" * 5000)  # still sending: the server lingers, then we see EOF
    assert await read_until_eof(reader) == b""
    writer.close()


async def test_close_finishes_busy_connections_and_drops_idle_ones(serve) -> None:
    release = asyncio.Event()

    async def handler(ex: Exchange) -> None:
        if ex.target == "/slow":
            await release.wait()
        await ex.respond(200, "OK", [], b"done")

    h = await serve(handler)
    idle_r, idle_w = await h.connect()
    idle_w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_response(idle_r)
    busy_r, busy_w = await h.connect()
    busy_w.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await until(lambda: len(h.calls) == 2)
    closing = asyncio.ensure_future(h.server.close(5.0))
    assert await read_until_eof(idle_r) == b""
    release.set()
    status, headers, body = await read_response(busy_r)
    assert status == 200 and body == b"done" and headers["connection"] == "close"
    busy_w.close()  # the server lingers until the client closes (or LINGER passes)
    await asyncio.wait_for(closing, 5)
    assert h.server.connections == 0
    idle_w.close()
    busy_w.close()


# -- leaving HTTP -------------------------------------------------------------------------------------------


async def test_upgrade_takeover_echo(serve) -> None:
    async def handler(ex: Exchange) -> None:
        assert ex.upgrade
        await ex.respond(101, "Switching Protocols", [("Upgrade", "echo"), ("Connection", "nonsense")])
        transport, raw = ex.takeover()
        while data := await raw.read():
            transport.write(data.upper())
        transport.close()

    h = await serve(handler)
    reader, writer = await h.connect()
    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nfirst ")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head == b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\n"
    assert await asyncio.wait_for(reader.readexactly(6), 5) == b"FIRST "
    writer.write(b"second")
    assert await asyncio.wait_for(reader.readexactly(6), 5) == b"SECOND"
    writer.write_eof()
    assert await read_until_eof(reader) == b""
    writer.close()


async def test_connect_relay_to_an_echo_server(serve) -> None:
    loop = asyncio.get_running_loop()

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport

        def data_received(self, data: bytes) -> None:
            self.t.write(data)  # type: ignore[attr-defined]

        def eof_received(self) -> None:
            self.t.close()

    echo_srv = await loop.create_server(Echo, "127.0.0.1", 0)
    echo_port = echo_srv.sockets[0].getsockname()[1]
    counts: list[tuple[int, int]] = []

    async def handler(ex: Exchange) -> None:
        host, port = ex.target.rsplit(":", 1)
        up_t, up = await loop.create_connection(RawProtocol, host, int(port))
        await ex.respond(200, "Connection established", [])
        client_t, client_raw = ex.takeover()
        counts.append(await relay(client_t, client_raw, up_t, up.stream))

    h = await serve(handler)
    reader, writer = await h.connect()
    writer.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\nearly" % (echo_port, echo_port))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head == b"HTTP/1.1 200 Connection established\r\n\r\n"
    big = os.urandom(2_000_000)
    writer.write(big)
    assert await asyncio.wait_for(reader.readexactly(5 + len(big)), 10) == b"early" + big
    writer.write_eof()
    assert await read_until_eof(reader) == b""
    await until(lambda: bool(counts))
    assert counts == [(5 + len(big), 5 + len(big))]
    writer.close()
    echo_srv.close()


async def test_connect_then_tls_inside(serve, tmp_path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("intercepted.example")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def inner(ex: Exchange) -> None:
        await ex.respond(200, "OK", [], f"inside {ex.method} {ex.target} from {ex.peer}".encode())

    async def handler(ex: Exchange) -> None:
        await ex.respond(200, "Connection established", [])
        await ex.start_tls(server_ctx, inner)

    h = await serve(handler)
    reader, writer = await h.connect()
    writer.write(b"CONNECT intercepted.example:443 HTTP/1.1\r\nHost: intercepted.example:443\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    await writer.start_tls(client_ctx, server_hostname="intercepted.example")
    for _ in range(2):
        writer.write(b"GET /in HTTP/1.1\r\nHost: intercepted.example\r\n\r\n")
        status, _, body = await read_response(reader)
        assert status == 200 and body == b"inside GET /in from 127.0.0.1"
    assert h.server.connections == 1
    writer.close()
    await until(lambda: h.server.connections == 0)


async def test_declined_upgrade_with_a_body_is_served_normally(serve) -> None:
    h = await serve(echo)
    reader, writer = await h.connect()
    writer.write(b"POST /h2c HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                 b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Length: 4\r\n\r\nbody")
    got = await read_until_eof(reader)  # declined upgrade: answered, then closed
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"POST /h2c body") and b"Connection: close" in got
    assert h.calls[0].upgrade
    writer.close()


async def test_unix_socket_listener(tmp_path) -> None:
    server = Server(echo, lambda r, e: (400, [], b""))
    path = str(tmp_path / "s.sock")
    await server.listen_unix(path)
    try:
        assert server.addresses() == [path]
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"GET /u HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = await read_response(reader)
        assert status == 200 and body == b"GET /u "
        writer.close()
    finally:
        await server.close(1.0)
    assert not os.path.exists(path)


async def test_inherited_listening_socket_and_stop_accepting() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = Server(echo, lambda r, e: (400, [], b""))
    await server.listen_socket(sock)
    try:
        port = server.addresses()[0][1]  # type: ignore[index]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /i HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[2] == b"GET /i "
        server.stop_accepting()  # the established connection goes on
        writer.write(b"GET /j HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[2] == b"GET /j "
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        writer.close()
    finally:
        await server.close(1.0)


def test_raise_nofile_limit_lifts_the_soft_limit_to_the_hard_one() -> None:
    code = (
        "import resource; from authproxy.http1.listener import raise_nofile_limit;"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE);"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard));"
        "old, new = raise_nofile_limit();"
        "assert old == 64 and new == resource.getrlimit(resource.RLIMIT_NOFILE)[0] > 64, (old, new);"
        "assert hard == resource.RLIM_INFINITY or new == hard, (new, hard)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
