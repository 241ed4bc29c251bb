"""Raw-socket peers for framing tests: an upstream that answers with exact bytes
and records exactly what it received, and a client that sends exact bytes.

Both model the other side as it really behaves on the wire (extra bytes,
partial heads, closing mid-message), which a high-level client or server
would smooth over.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

# A script answers one parsed request: gets (conn index, request index on that
# connection, request head bytes, body bytes) and returns (bytes to send, close after?).
Script = Callable[[int, int, bytes, bytes], "tuple[bytes, bool] | Awaitable[tuple[bytes, bool]]"]


@dataclass
class Received:
    conn: int
    index: int
    head: bytes
    body: bytes

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    def header(self, name: str) -> list[str]:
        out = []
        for line in self.head.split(b"\r\n")[1:]:
            k, _, v = line.decode("latin-1").partition(":")
            if k.strip().lower() == name.lower():
                out.append(v.strip())
        return out


@dataclass
class RawUpstream:
    """An HTTP/1.1 upstream that reads requests framed by Content-Length or chunked
    (the proxy frames every request itself) and answers with scripted bytes."""

    script: Script
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    server: asyncio.AbstractServer | None = None
    port: int = 0

    async def start(self) -> "RawUpstream":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    _tasks: set = field(default_factory=set)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        conn = self.connections
        self.connections += 1
        index = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                body = await _read_body(reader, head)
                self.received.append(Received(conn, index, head, body))
                result = self.script(conn, index, head, body)
                if asyncio.iscoroutine(result):
                    result = await result
                data, close = result  # type: ignore[misc]
                if data:
                    writer.write(data)
                    await writer.drain()
                index += 1
                if close:
                    return
        finally:
            writer.close()
            self._tasks.discard(task)


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    length = None
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
        elif k.strip().lower() == b"transfer-encoding" and v.strip().lower() == b"chunked":
            chunked = True
    if chunked:
        out = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return out
            out += await reader.readexactly(size)
            await reader.readexactly(2)
    if length:
        return await reader.readexactly(length)
    return b""


def ok(body: bytes = b"ok", extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


async def exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send raw bytes to the proxy, read until it closes (or the timeout), return all."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_until_closed(reader, timeout)
    finally:
        writer.close()


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return out
        try:
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except asyncio.TimeoutError:
            return out
        except ConnectionError:
            return out
        if not chunk:
            return out
        out += chunk


async def read_response(reader: asyncio.StreamReader, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Read one Content-Length-framed response (the proxy's own errors and small replies)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(n), timeout) if n else b""
    return status, headers, body
