"""RFC 8252 — the loopback redirect of a native app's authorization-code login.

``authproxy login`` listens on the redirect address (``http://127.0.0.1:PORT/PATH``)
just long enough for the browser to bring the authorization response back.
Requests for other paths, or carrying a ``state`` that is not the one in
flight, are answered and ignored: a stray or forged request must neither end
nor hijack the login.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from typing import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

OOB = "urn:ietf:wg:oauth:2.0:oob"

#: Handles one authorization response: (HTTP status, HTML, finished?).
Handler = Callable[[dict[str, str]], Awaitable[tuple[int, str, bool]]]


@dataclass(frozen=True)
class LoopbackAddress:
    host: str  # the address to bind: 127.0.0.1 or ::1
    port: int
    path: str

    @property
    def display(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def origin(self) -> str:
        return f"http://{self.display}"


def parse_loopback(uri: str) -> LoopbackAddress:
    """``http://127.0.0.1:PORT/PATH``, ``http://[::1]:PORT/PATH`` or ``http://localhost:PORT/PATH``;
    raises ValueError saying what is wrong."""
    parts = urlsplit(uri)
    if parts.scheme != "http":
        raise ValueError("must be urn:ietf:wg:oauth:2.0:oob or a loopback http://127.0.0.1:PORT/PATH")
    host = parts.hostname or ""
    if host == "localhost":
        bind = "127.0.0.1"
    else:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host or 'the host'} is not a loopback address; use 127.0.0.1 (RFC 8252 §7.3)") from None
        if not ip.is_loopback:
            raise ValueError(f"{host} is not a loopback address; use 127.0.0.1 (RFC 8252 §7.3)")
        bind = str(ip)
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the port is not a number in 1..65535") from None
    if not port:
        raise ValueError("give an explicit port, e.g. http://127.0.0.1:8765/callback (it must be registered with the server)")
    if parts.username or parts.password or parts.fragment:
        raise ValueError("must not contain user info or a fragment")
    return LoopbackAddress(bind, port, parts.path or "/")


class LoopbackReceiver:
    """A one-route HTTP server on the redirect address, alive for one login."""

    def __init__(self, address: LoopbackAddress, handler: Handler) -> None:
        self.address = address
        self.handler = handler
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._runner: web.ServerRunner | None = None
        self._busy = asyncio.Lock()

    async def start(self) -> None:
        """Bind the address; raises OSError (EADDRINUSE when something else listens there)."""
        server = web.Server(self._handle, access_log=None)
        runner = web.ServerRunner(server, handle_signals=False, access_log=None, shutdown_timeout=1)
        await runner.setup()
        # SO_REUSEADDR only skips TIME_WAIT leftovers of an earlier login; Linux still
        # refuses the bind while another socket listens there (the running proxy).
        site = web.TCPSite(runner, self.address.host, self.address.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD") or request.path != self.address.path:
            return web.Response(status=404, text="Not the authproxy login redirect.\n")
        if len(set(request.query)) != len(request.query):
            return _page(400, "<p>The authorization response repeats a parameter (RFC 6749 §3.1); it was ignored.</p>")
        async with self._busy:  # one authorization response at a time: a code is exchanged once
            if self.done.done():
                return _page(410, "<p>This login is already over. You can close this window.</p>")
            status, html, finished = await self.handler(dict(request.query))
            resp = _page(status, html)
            if finished:
                # Send the page before the login ends and this server closes.
                await resp.prepare(request)
                await resp.write_eof()
                self.done.set_result(None)
        return resp

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _page(status: int, html: str) -> web.Response:
    return web.Response(
        status=status,
        text=html,
        content_type="text/html",
        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
    )
