"""An upstream that answers every request with what it received, as JSON.

Used for static schemes and for the proxy's own behaviour (paths, queries,
headers, bodies, redirects, streaming).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from aiohttp import web

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from authproxy.testing import DemoService

STATE: web.AppKey["EchoState"] = web.AppKey("echo_state")


@dataclass
class EchoState:
    requests: list[dict] = field(default_factory=list)  # the last 1000 requests, without bodies

    def record(self, entry: dict) -> None:
        self.requests.append(entry)
        del self.requests[:-1000]


async def _echo(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    h = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        h.update(chunk)
        size += len(chunk)
    entry = {
        "method": request.method,
        "raw_path": request.raw_path,
        "path": request.raw_path.split("?", 1)[0],
        "query": request.raw_path.split("?", 1)[1] if "?" in request.raw_path else "",
        "headers": [[k, v] for k, v in request.headers.items()],
        "body_size": size,
        "body_sha256": h.hexdigest(),
        "chunked": "chunked" in request.headers.get("Transfer-Encoding", "").lower(),
    }
    state.record(entry)


    return web.json_response(entry)


async def _redirect(request: web.Request) -> web.Response:
    """GET /redirect?to=URL answers 302 to that location."""
    return web.Response(status=302, headers={"Location": request.query.get("to", "/")})


async def _status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    return web.Response(status=code, text=f"status {code}\n", headers={"X-Upstream": "echo"})


async def _bytes(request: web.Request) -> web.StreamResponse:
    """GET /bytes/N streams N bytes (a repeated pattern) with a Content-Length, or
    chunked with ?chunked=1; ?break=K closes the connection after K bytes."""
    n = int(request.match_info["n"])
    chunked = request.query.get("chunked") == "1"
    brk = int(request.query["break"]) if "break" in request.query else None
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if not chunked:
        resp.content_length = n
    await resp.prepare(request)
    block = bytes(range(256)) * 1024  # 256 KiB
    sent = 0
    while sent < n:
        piece = block[: min(len(block), n - sent)]
        if brk is not None and sent + len(piece) > brk:
            await resp.write(piece[: brk - sent])
            assert request.transport is not None
            request.transport.abort()
            return resp
        await resp.write(piece)
        sent += len(piece)
    await resp.write_eof()
    return resp


def make_app(base: str = "") -> web.Application:
    """``base``: the path the helper routes live under (an upstream's base path)."""
    app = web.Application(client_max_size=1 << 40)
    app[STATE] = EchoState()
    app.router.add_route("GET", base + "/redirect", _redirect)
    app.router.add_route("*", base + "/status/{code:\\d+}", _status)
    app.router.add_route("GET", base + "/bytes/{n:\\d+}", _bytes)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


def pattern_sha256(n: int) -> str:
    """The digest of what GET /bytes/N sends, for tests checking integrity."""
    block = bytes(range(256)) * 1024
    h = hashlib.sha256()
    while n > 0:
        piece = block[: min(len(block), n)]
        h.update(piece)
        n -= len(piece)
    return h.hexdigest()


def decode(body: bytes) -> dict:
    return json.loads(body)


def demo() -> "DemoService":
    """The static schemes: the upstream echoes what it received, credential masked."""
    from authproxy.testing import DemoService, TourStep

    app = make_app()

    def seen(header: str) -> object:
        def show(status: int, headers: dict[str, str], body: bytes) -> str:
            got = json.loads(body)
            h = {k.lower(): v for k, v in got["headers"]}
            value = h.get(header.lower())
            masked = value[:7] + "***" if value else "(none)"
            return f"upstream got {got['method']} {got['raw_path']} with {header}: {masked}"

        return show

    def show_query(status: int, headers: dict[str, str], body: bytes) -> str:
        got = json.loads(body)
        q = "&".join(p if not p.startswith("api_key=") else "api_key=***" for p in got["query"].split("&"))
        return f"upstream got {got['method']} {got['path']}?{q}"

    return DemoService(
        name="static",
        app=app,
        config=lambda url: {"upstream": url + "/v1", "auth": {"scheme": "bearer", "token": "demo-static-token"}},
        tour=[
            TourStep(
                "a static bearer token replaces whatever the client sent",
                path="/static/items?page=2",
                headers={"Authorization": "Bearer client-value"},
                show=seen("Authorization"),
            ),
            TourStep(
                "bodies stream through; hop-by-hop headers are dropped",
                method="POST",
                path="/static/upload",
                data=b"x" * 100_000,
                headers={"Connection": "X-Private", "X-Private": "1"},
                show=lambda s, h, b: f"upstream got {json.loads(b)['body_size']} bytes; X-Private forwarded: "
                + str(any(k.lower() == "x-private" for k, _ in json.loads(b)["headers"])),
            ),
            TourStep(
                "a cross-site browser request is refused before anything goes upstream",
                path="/static/items",
                headers={"Origin": "https://evil.example"},
                expect=403,
            ),
            TourStep("an unknown prefix is the proxy's own 404", path="/nope", expect=404),
        ],
        summary=lambda: f"{len(app[STATE].requests)} requests",
    )
