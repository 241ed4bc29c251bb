"""Accept loops the engine controls, and the file-descriptor limit.

Why not ``loop.create_server``: its accept loop cannot be told to stop at a
connection cap, and when descriptors run out (EMFILE) it logs a traceback per
attempt and pauses on its own schedule. Ours waits, at ``max_connections``, until
a connection closes (new ones wait in the kernel's backlog), and on EMFILE/ENFILE
pauses ~0.1 s or until a connection closes, logging at most one line a second.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import time
from typing import Protocol

__all__ = ["Listener", "bind_tcp", "bind_unix", "raise_nofile_limit"]

log = logging.getLogger("authproxy.http1")

_EXHAUSTED = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
_TRANSIENT = frozenset((errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN, errno.EWOULDBLOCK))
PAUSE = 0.1
ACCEPT_BATCH = 256  # connections taken from the backlog per wake-up, beyond the first
LOG_EVERY = 1.0


class _Host(Protocol):
    """What a listener needs of the server."""

    @property
    def connections(self) -> int: ...
    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def limits(self) -> object: ...
    async def wait_closed_one(self, timeout: float | None = None) -> None: ...
    def new_connection(self) -> asyncio.Protocol: ...


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (SPEC: at start). Returns (old, new)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    targets = [hard] if hard != resource.RLIM_INFINITY else []
    targets += [1 << 20, 65536]  # an infinite hard limit is refused by Linux (nr_open), macOS (OPEN_MAX)
    for target in targets:
        if target <= soft and soft != resource.RLIM_INFINITY:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target
        except (ValueError, OSError):
            continue
    return soft, soft


def bind_tcp(host: str, port: int, backlog: int, reuse_port: bool) -> list[socket.socket]:
    """Listening sockets for every address ``host`` resolves to (like create_server)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, type_, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def bind_unix(path: str, backlog: int) -> socket.socket:
    """A listening unix socket at ``path``; a stale socket file there is replaced."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Listener:
    """One listening socket and its accept loop."""

    def __init__(self, sock: socket.socket, server: _Host, *, unix_path: str | None = None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.server = server
        self.address: tuple[str, int] | str = self._address(sock)
        self._unix_path = unix_path
        self._unix_ino = os.stat(unix_path).st_ino if unix_path else None
        self._task: asyncio.Task[None] | None = None
        self._last_log = -LOG_EVERY
        self._tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self._pending = 0  # accepted, not yet connected to a protocol (they count against the cap)
        self._connecting: set[asyncio.Task[None]] = set()

    @staticmethod
    def _address(sock: socket.socket) -> tuple[str, int] | str:
        name = sock.getsockname()
        if isinstance(name, tuple):
            return name[0], name[1]
        return name.decode() if isinstance(name, bytes) else name

    def start(self) -> None:
        self._task = self.server.loop.create_task(self._accept_loop())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.sock.close()
        if self._unix_path:
            try:  # remove our socket file, not one a successor bound since
                if os.stat(self._unix_path).st_ino == self._unix_ino:
                    os.unlink(self._unix_path)
            except OSError:
                pass

    async def _accept_loop(self) -> None:
        """Wait for the listening socket to be readable, then take every connection the
        backlog holds (up to the cap) before waiting again. Accepting one connection per
        loop iteration would let a burst of new connections (a client opening 128 at
        once) sit in the backlog for seconds behind busy ones, with their first request
        already sent."""
        server, loop = self.server, self.server.loop
        cap: int = getattr(server.limits, "max_connections")
        sock = self.sock
        while True:
            while server.connections + self._pending >= cap:
                await server.wait_closed_one()
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno in _TRANSIENT:
                    continue
                if sock.fileno() == -1:
                    return  # closed under us
                self._log_failure(exc)
                await server.wait_closed_one(PAUSE)
                continue
            self._start(conn)
            for _ in range(ACCEPT_BATCH):  # the rest of the backlog, without waiting
                if server.connections + self._pending >= cap:
                    break
                try:
                    conn, _ = sock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    if exc.errno in _TRANSIENT:
                        continue
                    if sock.fileno() == -1:
                        return
                    self._log_failure(exc)
                    await server.wait_closed_one(PAUSE)
                    break
                self._start(conn)

    def _start(self, conn: socket.socket) -> None:
        """Hand an accepted socket to the loop; its slot counts from now."""
        try:
            conn.setblocking(False)
            if self._tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            conn.close()
            return
        self._pending += 1
        task = self.server.loop.create_task(self._connect(conn))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self.server.loop.connect_accepted_socket(self.server.new_connection, conn)
        except asyncio.CancelledError:
            conn.close()
            raise
        except OSError as exc:
            conn.close()
            if exc.errno in _EXHAUSTED:
                self._log_failure(exc)
        finally:
            self._pending -= 1

    def _log_failure(self, exc: OSError) -> None:
        """One line a second at most, never a traceback: under EMFILE this runs
        ten times a second until a connection closes."""
        now = time.monotonic()
        if now - self._last_log < LOG_EVERY:
            return
        self._last_log = now
        what = (exc.strerror or str(exc)).lower()
        state = "pausing" if exc.errno in _EXHAUSTED else "retrying"
        log.warning("accept failed: %s; %d connections open; %s", what, self.server.connections, state)
