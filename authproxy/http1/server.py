"""The client-facing side of the engine: listeners, the connection count, shutdown.

:class:`Server` is what the application codes against; a connection's life is in
``connection``, one request/response in ``exchange``, the parsing rules in
``framing``, the accept loops in ``listener``.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Callable

from .connection import _Connection
from .exchange import Exchange, Handler
from .listener import Listener, bind_tcp, bind_unix

__all__ = ["ErrorReply", "Exchange", "Handler", "Server", "ServerLimits"]

ErrorReply = Callable[[str, "Exchange | None"], tuple[int, list[tuple[str, str]], bytes]]
"""``(reason, exchange or None if the head was not parsed)`` → ``(status, headers, body)``
for a refused request; the engine adds ``Content-Length`` and ``Connection: close``,
writes it in one write and closes the connection."""


@dataclass
class ServerLimits:
    """Per-connection limits; see SPEC "Client connections"."""

    idle_timeout: float = 75.0  # no byte of a next request this long → closed silently
    header_timeout: float = 10.0  # a head must arrive whole within this of its first byte (slowloris)
    body_timeout: float = 300.0  # default Exchange.body_timeout
    max_connections: int = 4096  # at the cap, new connections wait in the kernel backlog
    max_head: int = 64 * 1024
    read_high_water: int = 256 * 1024  # unread body bytes above this pause reading


class Server:
    """Serves HTTP/1.1 on any number of listeners with one handler."""

    def __init__(
        self, handler: Handler, on_error: ErrorReply, limits: ServerLimits | None = None,
        *, loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.handler = handler
        self.on_error = on_error
        self.limits = limits or ServerLimits()
        self._loop = loop
        self._listeners: list[Listener] = []
        self._conns: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._closing = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def connections(self) -> int:
        """Open client connections (what ``max_connections`` bounds)."""
        return len(self._conns)

    def _opened(self, conn: _Connection) -> None:
        self._conns.add(conn)

    def _closed(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait_closed_one(self, timeout: float | None = None) -> None:
        """Wait until some connection closes (or ``timeout``): the listeners' pause."""
        fut = self.loop.create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass

    def new_connection(self) -> asyncio.Protocol:
        return _Connection(self, self.handler)

    async def listen_tcp(self, host: str, port: int, *, backlog: int = 1024, reuse_port: bool = False) -> None:
        for sock in bind_tcp(host, port, backlog, reuse_port):
            await self.listen_socket(sock)

    async def listen_unix(self, path: str, *, backlog: int = 1024) -> None:
        listener = Listener(bind_unix(path, backlog), self, unix_path=path)
        self._listeners.append(listener)
        listener.start()

    async def listen_socket(self, sock: socket.socket) -> None:
        """Serve an already listening socket (inherited from systemd, or bound by us)."""
        listener = Listener(sock, self)
        self._listeners.append(listener)
        listener.start()

    def addresses(self) -> list[tuple[str, int] | str]:
        return [listener.address for listener in self._listeners]

    def stop_accepting(self) -> None:
        """Close the listeners; established connections go on."""
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.close()

    async def close(self, timeout: float) -> None:
        """Stop accepting; close idle connections now and busy ones after their response;
        after ``timeout``, reset whatever is left and cancel its handlers."""
        self.stop_accepting()
        self._closing = True
        for conn in list(self._conns):
            conn.shutdown()
        deadline = self.loop.time() + timeout
        while (self._conns or self._tasks) and self.loop.time() < deadline:
            if self._conns:
                await self.wait_closed_one(min(0.05, max(0.0, deadline - self.loop.time())))
            else:
                await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - self.loop.time()))
        for conn in list(self._conns):
            if conn.mode == "linger":
                conn.transport.close()
            else:
                conn.abort()
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)

