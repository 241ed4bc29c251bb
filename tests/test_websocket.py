"""WebSocket through the proxy: the credential on the handshake, then bytes relayed
both ways untouched — against aiohttp's real WebSocket server and client."""

from __future__ import annotations

import asyncio
import os

import aiohttp
from aiohttp import web

from tests.conftest import secret

TOKEN = "ws-static-token-7781"


def ws_app(seen: list[dict[str, str]]) -> web.Application:
    async def echo(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        ws = web.WebSocketResponse(max_msg_size=4 << 20)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    async def plain(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(text="plain")

    app = web.Application()
    app.router.add_get("/base/ws", echo)
    app.router.add_get("/base/plain", plain)
    return app


async def test_websocket_echo_carries_the_credential_and_relays_both_ways(upstream, proxy):
    seen: list[dict[str, str]] = []
    up = await upstream(ws_app(seen))
    p = await proxy({"services": {"svc": {"upstream": up + "/base", "auth": {"scheme": "bearer", "token": secret(TOKEN)}}}})
    big = os.urandom(1 << 20)
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(p.url + "/svc/ws", max_msg_size=4 << 20) as ws:
            await ws.send_str("hello")
            assert (await ws.receive_str(timeout=5)) == "echo:hello"
            await ws.send_bytes(b"\x00\x01\x02")
            assert (await ws.receive_bytes(timeout=5)) == b"\x02\x01\x00"
            await ws.send_bytes(big)
            assert (await ws.receive_bytes(timeout=10)) == big[::-1]
            await ws.send_str("x" * (1 << 20))
            assert (await ws.receive_str(timeout=10)) == "echo:" + "x" * (1 << 20)
    assert seen[0]["Authorization"] == f"Bearer {TOKEN}"
    assert seen[0]["Upgrade"].lower() == "websocket"


async def test_other_upgrades_are_dropped_and_the_request_served_plainly(upstream, proxy):
    seen: list[dict[str, str]] = []
    up = await upstream(ws_app(seen))
    p = await proxy({"services": {"svc": {"upstream": up + "/base", "auth": {"scheme": "bearer", "token": secret(TOKEN)}}}})
    async with p.request("GET", "/svc/plain", headers={"Connection": "Upgrade", "Upgrade": "h2c"}) as r:
        assert r.status == 200 and await r.text() == "plain"
    assert "Upgrade" not in seen[0]


async def test_a_refused_handshake_is_passed_back(upstream, proxy):
    seen: list[dict[str, str]] = []
    up = await upstream(ws_app(seen))
    p = await proxy({"services": {"svc": {"upstream": up + "/base", "auth": {"scheme": "bearer", "token": secret(TOKEN)}}}})
    async with aiohttp.ClientSession() as s:
        try:
            await s.ws_connect(p.url + "/svc/plain")
            raise AssertionError("handshake to a plain route succeeded")
        except aiohttp.WSServerHandshakeError as e:
            assert e.status == 200


async def test_a_quiet_websocket_outlives_the_service_timeout(upstream, proxy):
    seen: list[dict[str, str]] = []
    up = await upstream(ws_app(seen))
    p = await proxy(
        {"services": {"svc": {"upstream": up + "/base", "timeout": {"connect": 1, "total": 0.5}, "auth": {"scheme": "bearer", "token": secret(TOKEN)}}}}
    )
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(p.url + "/svc/ws", autoping=False, heartbeat=None) as ws:
            await asyncio.sleep(1.2)  # the quantity under test: silence longer than timeout.total
            await ws.send_str("still")
            assert (await ws.receive_str(timeout=5)) == "echo:still"
