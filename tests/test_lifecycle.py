"""The process: the real CLI as a subprocess for signals, exit codes, logs, listeners, memory."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from authproxy.testing import echo
from tests.conftest import free_port, secret, wait_for, wait_port, write_config


def base_config(tmp_path: Path, port: int, upstream: str, **extra: object) -> dict:
    return {
        "listen": f"127.0.0.1:{port}",
        "state_dir": str(tmp_path / "state"),
        "services": {"echo": {"upstream": upstream, "auth": {"scheme": "bearer", "token": secret("lifecycle-s3cret")}}},
        **extra,
    }


def vm_hwm(pid: int) -> int:
    """Peak resident set size of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


async def test_sigterm_waits_for_inflight_then_exits_0(tmp_path, upstream, cli):
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.Response(text="finished")

    app = web.Application()
    app.router.add_get("/slow", slow)
    up = await upstream(app)
    port = free_port()
    cfg = write_config(tmp_path / "c.yaml", base_config(tmp_path, port, up))
    proc = cli("run", "-c", str(cfg))
    proc.wait_log("listening")
    async with aiohttp.ClientSession() as s:
        pending = asyncio.ensure_future(s.get(f"http://127.0.0.1:{port}/echo/slow"))
        await asyncio.wait_for(arrived.wait(), 10)
        proc.signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait_log, "stopping")

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                return False
            except OSError:
                return True

        await wait_for(refused, 10)  # no longer accepting
        assert proc.proc.poll() is None  # but still finishing the request
        release.set()
        resp = await asyncio.wait_for(pending, 10)
        assert resp.status == 200 and await resp.text() == "finished"
        resp.release()
    assert await asyncio.to_thread(proc.wait, 20) == 0
    assert "stopped" in proc.log()


async def test_sighup_invalid_config_keeps_serving_and_valid_reload_applies(tmp_path, upstream, cli):
    up = await upstream(echo.make_app())
    port = free_port()
    cfg_path = tmp_path / "c.yaml"
    cfg = base_config(tmp_path, port, up)
    write_config(cfg_path, cfg)
    proc = cli("run", "-c", str(cfg_path))
    proc.wait_log("listening")
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as s:
        cfg_path.write_text("services:\n  echo:\n    upstream: http://x\n    auth: {scheme: bearer}\n")
        proc.signal(signal.SIGHUP)
        text = await asyncio.to_thread(proc.wait_log, "reload_failed")
        assert "services.echo.auth.token: required" in text
        async with s.get(url + "/echo/x") as r:
            assert r.status == 200
        cfg["services"]["second"] = {"upstream": up, "auth": {"scheme": "header", "headers": {"X-K": "v"}}}
        write_config(cfg_path, cfg)
        proc.signal(signal.SIGHUP)
        text = await asyncio.to_thread(proc.wait_log, "reloaded")
        assert "kept=1" in text and "started=second" in text
        async with s.get(url + "/second/y") as r:
            assert r.status == 200
            got = await r.json()
            assert ["X-K", "v"] in got["headers"]
        async with s.get(url + "/echo/x") as r:
            assert r.status == 200
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 20) == 0


async def test_reload_keeps_credentials_of_unchanged_services(tmp_path, upstream, proxy):
    up = await upstream(echo.make_app())
    p = await proxy({"services": {"a": {"upstream": up, "auth": {"scheme": "bearer", "token": "ta"}}, "b": {"upstream": up, "auth": {"scheme": "bearer", "token": "tb"}}}})
    before_a, before_b = p.server.runtimes["a"], p.server.runtimes["b"]
    cfg = {
        "listen": "127.0.0.1:0",
        "state_dir": p.server.config.state_dir,
        "services": {"a": {"upstream": up, "auth": {"scheme": "bearer", "token": "ta"}}, "b": {"upstream": up, "scrub_responses": False, "auth": {"scheme": "bearer", "token": "tb-changed"}}},
    }  # b: the echo's reply shows the credential sent, which scrubbing would mask
    path = write_config(tmp_path / "new.yaml", cfg)
    assert await p.server.reload(str(path))
    assert p.server.runtimes["a"] is before_a
    assert p.server.runtimes["b"] is not before_b
    async with p.request("GET", "/b/x") as r:
        got = await r.json()
    assert ["Authorization", "Bearer tb-changed"] in got["headers"]


async def test_port_in_use_exits_1(tmp_path, cli):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = write_config(tmp_path / "c.yaml", base_config(tmp_path, port, "http://127.0.0.1:1"))
        proc = cli("run", "-c", str(cfg))
        assert await asyncio.to_thread(proc.wait, 20) == 1
        assert "listen_failed" in proc.log()


async def test_unix_socket_listener(tmp_path, upstream, cli):
    up = await upstream(echo.make_app())
    sock_path = tmp_path / "ap.sock"
    cfg = base_config(tmp_path, 0, up)
    cfg["listen"] = f"unix:{sock_path}"
    proc = cli("run", "-c", str(write_config(tmp_path / "c.yaml", cfg)))
    proc.wait_log("listening")
    assert oct(sock_path.stat().st_mode & 0o777) == "0o660"
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock_path))) as s:
        async with s.get("http://localhost/echo/x?y=1") as r:
            assert r.status == 200
            assert (await r.json())["raw_path"] == "/x?y=1"
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 20) == 0
    assert not sock_path.exists()


async def test_json_logs_parse_and_carry_request_ids(tmp_path, upstream, cli):
    up = await upstream(echo.make_app())
    port = free_port()
    cfg = base_config(tmp_path, port, up, log={"level": "info", "format": "json"})
    proc = cli("run", "-c", str(write_config(tmp_path / "c.yaml", cfg)))
    proc.wait_log("listening")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/echo/x?token=abc", headers={"X-Request-Id": "req-42"}) as r:
            assert r.status == 200
            assert ["x-request-id", "req-42"] in [[k.lower(), v] for k, v in (await r.json())["headers"]]
            assert r.headers["X-Request-Id"] == "req-42"
        async with s.get(f"http://127.0.0.1:{port}/nowhere") as r:
            assert r.status == 404 and r.headers["X-Request-Id"]
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 20) == 0
    lines = [json.loads(line) for line in proc.log().splitlines() if line.strip()]
    events = [d["event"] for d in lines]
    assert {"listening", "token_fetched", "request", "stopping", "stopped"} <= set(events)
    req = next(d for d in lines if d["event"] == "request" and d.get("request_id") == "req-42")
    # token= is not a parameter this (bearer) service injects, and "abc" is no configured
    # secret: only a service's own credential parameters and secret values are masked.
    assert req["path"] == "/echo/x?token=abc" and req["status"] == 200 and req["service"] == "echo"
    assert all({"ts", "level", "event"} <= d.keys() for d in lines)


async def test_large_bodies_stream_with_bounded_memory(tmp_path, upstream, cli):
    """512 MiB down and 512 MiB up through the real process: intact, and the proxy's
    peak RSS grows by less than 64 MiB."""
    size = 512 * 1024 * 1024
    up = await upstream(echo.make_app())
    port = free_port()
    proc = cli("run", "-c", str(write_config(tmp_path / "c.yaml", base_config(tmp_path, port, up, log={"level": "warning"}))))
    wait_port(port)
    pid = proc.proc.pid
    url = f"http://127.0.0.1:{port}/echo"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        async with s.get(url + "/x") as r:  # warm up: imports, pools
            assert r.status == 200
        baseline = vm_hwm(pid)
        h = hashlib.sha256()
        received = 0
        async with s.get(f"{url}/bytes/{size}") as r:
            assert r.status == 200
            async for chunk in r.content.iter_chunked(1 << 20):
                h.update(chunk)
                received += len(chunk)
        assert received == size
        assert h.hexdigest() == echo.pattern_sha256(size)

        block = os.urandom(1 << 20)
        sent = hashlib.sha256()

        async def body():
            for _ in range(size // len(block)):
                sent.update(block)
                yield block

        async with s.post(url + "/upload", data=body(), headers={"Content-Length": str(size)}) as r:
            got = await r.json()
        assert got["body_size"] == size
        assert got["body_sha256"] == sent.hexdigest()
        growth = vm_hwm(pid) - baseline
    assert growth < 64 * 1024 * 1024, f"peak RSS grew by {growth / 2**20:.1f} MiB"


@pytest.mark.parametrize("once", [True])
def test_demo_once(tmp_path, once):
    from tests.conftest import run_cli

    r = run_cli("demo", "--once", cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo complete" in r.stdout
