"""Sending a request body to the upstream as it streams in, with backpressure.

A body that is not all in memory (a client's upload relayed while it arrives) is
copied chunk by chunk, waiting whenever the transport's write buffer is full, so
a slow upstream slows the client instead of filling memory. Its framing is held
to what the head declared: chunked when no length was given, else exactly
``Content-Length`` bytes, no more, no fewer. A body source that fails ends the
exchange as a :class:`RequestBodyError`, never as a request that looks complete.

:class:`Upload` is the write side of :class:`~.client.Connection` (a mixin: the
protocol's ``pause_writing``/``resume_writing`` callbacks and the copy loop), so
that ``client.py`` keeps to the response side and the connection's states.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from .errors import RequestBodyError
from .response import Response, _short

WRITE_HIGH_WATER = 256 * 1024
_FLOW_ERRORS = (AttributeError, NotImplementedError, RuntimeError)  # transports without pause/resume


class Upload:
    """The write side of an upstream connection. The connection provides these."""

    transport: asyncio.Transport | None
    _loop: asyncio.AbstractEventLoop
    _head_fut: asyncio.Future[Response] | None
    _write_paused: bool
    _drain: asyncio.Future[None] | None

    def abort(self) -> None:  # pragma: no cover - the connection's
        raise NotImplementedError

    async def _pump(self, stream: AsyncIterator[bytes], length: int | None) -> None:
        """Copy the request body stream, waiting whenever the transport's buffer is full."""
        sent = 0
        try:
            async for chunk in stream:
                if not chunk:
                    continue
                t = self.transport
                if t is None or t.is_closing():
                    return  # the exchange is over; the response side says why
                n = len(chunk)
                sent += n
                if length is None:
                    t.write(b"%x\r\n%b\r\n" % (n, chunk))
                elif sent > length:
                    raise RequestBodyError(f"the request body is longer than its Content-Length ({length})")
                else:
                    t.write(chunk)
                if self._write_paused:
                    await self.drain()
            t = self.transport
            if t is None or t.is_closing():
                return
            if length is None:
                t.write(b"0\r\n\r\n")
            elif sent != length:
                raise RequestBodyError(f"the request body ended after {sent} of {length} bytes")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the body source raised
            err = e if isinstance(e, RequestBodyError) else RequestBodyError(f"the request body could not be read ({_short(e)})")
            if err is not e:
                err.__cause__ = e
            fut = self._head_fut
            if fut is not None and not fut.done():
                fut.set_exception(err)
            self.abort()

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its low-water mark (or it closed)."""
        while self._write_paused and self.transport is not None:
            if self._drain is None:
                self._drain = self._loop.create_future()
            await self._drain

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    def _wake_drain(self) -> None:
        d, self._drain = self._drain, None
        if d is not None and not d.done():
            d.set_result(None)
