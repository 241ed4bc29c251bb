"""A connection that stopped being HTTP: the bytes after a 101 or a CONNECT 2xx.

Both sides of the engine hand such a connection over as ``(transport, RawStream)``:
the server after the client's upgrade/CONNECT, the upstream client after the
upstream's 101. :func:`relay` joins two of them. Memory stays bounded: a stream
given its transport pauses reading while more than ``high_water`` bytes wait to
be read, and the relay waits on the destination's write buffer (its protocol's
``drain()``) before reading more.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

__all__ = ["RawProtocol", "RawStream", "relay"]

HIGH_WATER = 256 * 1024


class RawStream:
    """``feed``/``feed_eof``/``set_exception`` in (from a protocol), ``read()`` out.

    Bytes buffered before the hand-over (after the head) are fed first, so a
    reader never misses what the peer sent right after its head."""

    def __init__(self, transport: asyncio.Transport | None = None, high_water: int = HIGH_WATER) -> None:
        self._transport = transport
        self._high_water = high_water
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    def feed(self, data: bytes) -> None:
        if not data or self._eof:
            return
        self._chunks.append(bytes(data))
        self._size += len(data)
        if self._transport is not None and not self._paused and self._size > self._high_water:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        """The connection broke (reset): a read after the buffered bytes raises ``exc``."""
        self._exc = exc
        self._eof = True
        self._wake()

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    def take_buffered(self) -> bytes:
        """Everything buffered now (without waiting), e.g. to hand to another protocol."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        self._maybe_resume()
        return data

    async def read(self) -> bytes:
        """The next bytes (all that is buffered); ``b""`` at EOF; raises what
        :meth:`set_exception` was given once the buffered bytes are read."""
        while not self._chunks:
            if self._eof:
                if self._exc is not None:
                    raise self._exc
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.take_buffered()

    def _maybe_resume(self) -> None:
        if self._paused and self._transport is not None and not self._transport.is_closing():
            self._paused = False
            self._transport.resume_reading()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)


class WriteFlow(asyncio.Protocol):
    """Write-side flow control shared by the engine's server-side protocols: the
    transport says when its buffer passes high water; writers wait on ``_drainers``
    until it says it has drained. Subclasses set both attributes in ``__init__``."""

    _write_paused: bool
    _drainers: list[asyncio.Future[None]]

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for fut in self._drainers:
            if not fut.done():
                fut.set_result(None)
        self._drainers.clear()


class RawProtocol(WriteFlow):
    """A protocol for a raw connection we open ourselves (``unmapped: tunnel``):
    ``loop.create_connection(RawProtocol, host, port)``, then relay its ``stream``."""

    def __init__(self, high_water: int = HIGH_WATER) -> None:
        self._high_water = high_water
        self.stream = RawStream()
        self._write_paused = False
        self._drainers: list[asyncio.Future[None]] = []
        self._lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.stream = RawStream(transport, self._high_water)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.stream.feed(data)

    def eof_received(self) -> bool:
        self.stream.feed_eof()
        return True  # half-closed: the other direction may still be relayed

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = ConnectionResetError(str(exc)) if exc else ConnectionError("connection closed")
        if exc is not None:
            self.stream.set_exception(self._lost)
        else:
            self.stream.feed_eof()
        self.resume_writing()

    async def drain(self) -> None:
        if self._lost is not None:
            raise self._lost
        if self._write_paused:
            fut = asyncio.get_running_loop().create_future()
            self._drainers.append(fut)
            await fut


async def _drain(transport: asyncio.Transport) -> None:
    """Wait while ``transport``'s write buffer is above its high water, through its
    protocol's ``drain()`` (both sides of the engine provide one)."""
    drain: Any = getattr(transport.get_protocol(), "drain", None)
    if drain is not None:
        await drain()


async def _pump(src: RawStream, dst: asyncio.Transport, counts: list[int], i: int) -> None:
    try:
        while True:
            data = await src.read()
            if not data or dst.is_closing():
                break
            dst.write(data)
            counts[i] += len(data)
            await _drain(dst)
    except (ConnectionError, OSError):
        return
    if not dst.is_closing() and dst.can_write_eof():
        with contextlib.suppress(OSError, RuntimeError):
            dst.write_eof()  # pass the half-close on; the other direction may still run


async def relay(
    a_transport: asyncio.Transport,
    a_stream: RawStream,
    b_transport: asyncio.Transport,
    b_stream: RawStream,
) -> tuple[int, int]:
    """Copy a→b and b→a until both directions ended (an EOF is passed on as a
    half-close where both transports can) or either connection is gone; then close
    both. Returns ``(bytes a→b, bytes b→a)``."""
    counts = [0, 0]
    pending = {
        asyncio.ensure_future(_pump(a_stream, b_transport, counts, 0)),
        asyncio.ensure_future(_pump(b_stream, a_transport, counts, 1)),
    }
    half_close = a_transport.can_write_eof() and b_transport.can_write_eof()
    try:
        while pending:
            _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if not half_close or a_transport.is_closing() or b_transport.is_closing():
                break
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        a_transport.close()
        b_transport.close()
    return counts[0], counts[1]
