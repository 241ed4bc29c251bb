"""Client connections: idle and header timeouts, the connection cap, and running out
of file descriptors — through the real listener (and the real CLI for the limit)."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import subprocess
import sys
import time

from tests.conftest import CAPTURED, free_port, http_get, secret, wait_port, write_config
from tests.rawpeer import read_response


def cfg(upstream: str, **inbound: object) -> dict:
    return {
        "inbound": inbound,
        "services": {"svc": {"upstream": upstream, "auth": {"scheme": "bearer", "token": secret("conn-static-token-xyz")}}},
    }


async def _closed_within(reader: asyncio.StreamReader, limit: float) -> float:
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(65536), limit)
    while data:  # the proxy may say something (a 408/400) before closing
        data = await asyncio.wait_for(reader.read(65536), limit)
    return time.monotonic() - started


async def test_idle_keepalive_connection_is_closed(upstream, proxy):
    from authproxy.testing import echo

    up = await upstream(echo.make_app())
    p = await proxy(cfg(up, idle_timeout=0.5))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.server.port)
    try:
        writer.write(b"GET /svc/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, _, _ = await read_response(reader)
        assert status == 200
        took = await _closed_within(reader, 5)
        assert 0.3 <= took <= 2.5, took
    finally:
        writer.close()


async def test_silent_connection_is_closed(upstream, proxy):
    from authproxy.testing import echo

    up = await upstream(echo.make_app())
    p = await proxy(cfg(up, idle_timeout=0.5))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.server.port)
    try:
        took = await _closed_within(reader, 5)  # never sent a byte
        assert took <= 2.5
    finally:
        writer.close()


async def test_slowloris_head_is_cut_but_a_trickled_head_is_served(upstream, proxy):
    from authproxy.testing import echo

    up = await upstream(echo.make_app())
    p = await proxy(cfg(up, header_timeout=1.0))
    # A trickled head that completes in time is fine.
    reader, writer = await asyncio.open_connection("127.0.0.1", p.server.port)
    head = b"GET /svc/x HTTP/1.1\r\nHost: localhost\r\n\r\n"
    for i in range(0, len(head), 8):
        writer.write(head[i : i + 8])
        await writer.drain()
        await asyncio.sleep(0.01)
    status, _, _ = await read_response(reader)
    assert status == 200
    writer.close()
    # One that never completes is cut.
    reader, writer = await asyncio.open_connection("127.0.0.1", p.server.port)
    started = time.monotonic()
    writer.write(b"GET /svc/x HTTP/1.1\r\nHost: localhost\r\n")
    try:
        while True:
            writer.write(b"X-A: b\r\n")
            await writer.drain()
            if time.monotonic() - started > 5:
                raise AssertionError("slowloris connection still open after 5 s")
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.2)
            except asyncio.TimeoutError:
                continue
            if not data or data.startswith(b"HTTP/1.1 4"):
                break
    except ConnectionError:
        pass
    finally:
        writer.close()
    assert time.monotonic() - started < 3.0


async def test_connection_cap_makes_new_connections_wait(upstream, proxy):
    from authproxy.testing import echo

    up = await upstream(echo.make_app())
    p = await proxy(cfg(up, max_connections=3))
    held = [await asyncio.open_connection("127.0.0.1", p.server.port) for _ in range(3)]
    for _, w in held:
        w.write(b"GET /svc/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
    for r, _ in held:
        assert (await read_response(r))[0] == 200
    reader, writer = await asyncio.open_connection("127.0.0.1", p.server.port)  # sits in the backlog
    writer.write(b"GET /svc/y HTTP/1.1\r\nHost: localhost\r\n\r\n")
    try:
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)
        raise AssertionError("a 4th connection was served past max_connections")
    except asyncio.TimeoutError:
        pass
    held[0][1].close()
    status, _, _ = await read_response(reader, timeout=5)
    assert status == 200
    writer.close()
    for _, w in held[1:]:
        w.close()


def test_running_out_of_descriptors_pauses_quietly_and_recovers(tmp_path):
    """With the descriptor limit at 64 (soft and hard), 150 connections exhaust it. The
    log gets at most about a line a second (never a traceback per attempt), and
    service resumes once the connections close."""
    port = free_port()
    path = write_config(tmp_path / "c.yaml", {"listen": f"127.0.0.1:{port}", "state_dir": str(tmp_path / "s"), **cfg("http://127.0.0.1:9")})
    log_path = tmp_path / "stderr.log"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "authproxy", "run", "-c", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            stdin=subprocess.DEVNULL,
            preexec_fn=limit,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    socks: list[socket.socket] = []
    try:
        wait_port(port)
        started = time.monotonic()
        for _ in range(150):
            s = socket.socket()
            s.settimeout(2)
            s.connect(("127.0.0.1", port))
            socks.append(s)
        # Give the accept loop a moment of real exhaustion, bounded by a deadline on the log.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "accept" not in log_path.read_text(errors="replace"):
            time.sleep(0.05)
        time.sleep(1.5)  # measure the log rate over a window: this is the quantity under test
        elapsed = time.monotonic() - started
        for s in socks:
            s.close()
        socks.clear()
        status, body = _get_with_deadline(f"http://127.0.0.1:{port}/-/healthz", 15)
        assert status == 200
        text = log_path.read_text(errors="replace")
        accept_lines = [ln for ln in text.splitlines() if "accept" in ln.lower()]
        assert accept_lines, text[-2000:]
        assert len(accept_lines) <= elapsed + 3, (len(accept_lines), elapsed)
        assert "Traceback" not in text
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(20)
        CAPTURED.extend(log_path.read_text(errors="replace").splitlines())


def _get_with_deadline(url: str, timeout: float) -> tuple[int, bytes]:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return http_get(url, timeout=2)
        except OSError as e:
            last = e
            time.sleep(0.05)
    raise AssertionError(f"no answer within {timeout} s: {last}")
