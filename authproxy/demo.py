"""``authproxy demo``: mock upstreams of every scheme, a proxy in front, and a tour.

Everything runs in this process on loopback, with a throw-away state dir, so a
new user sees each scheme obtain, inject, heal and revoke its credential
without configuring anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import signal
import sys
import tempfile
from typing import Any, TextIO

import aiohttp
import yaml
from aiohttp import web
from yarl import URL

from authproxy.config import load_config_text
from authproxy.observe import setup_logging
from authproxy.testing import DemoService, TourStep

DEMO_MODULES = ("echo", "fogbugz", "oauth2", "enfix")
DEFAULT_LISTEN = "127.0.0.1:8080"


def load_demos() -> list[DemoService]:
    demos = []
    for name in DEMO_MODULES:
        try:
            module = importlib.import_module(f"authproxy.testing.{name}")
        except ImportError:
            continue
        factory = getattr(module, "demo", None)
        if factory is not None:
            demos.append(factory())
    return demos


def _short(body: bytes, limit: int = 160) -> str:
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Tour:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.failures = 0

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    async def step(self, session: aiohttp.ClientSession, base: str, step: TourStep) -> None:
        self.say(f"  • {step.note}")
        if step.action is not None:
            result = step.action()
            if asyncio.iscoroutine(result):
                await result
            return
        kwargs: dict[str, Any] = {"headers": step.headers, "allow_redirects": False}
        if step.json is not None:
            kwargs["json"] = step.json
        elif step.data is not None:
            kwargs["data"] = step.data
        extra = "".join(f" -H '{k}: {v}'" for k, v in step.headers.items())
        self.say(f"      → {step.method} {step.path}{extra}")
        try:
            async with session.request(step.method, URL(base + step.path, encoded=True), **kwargs) as r:
                body = await r.read()
                status, headers = r.status, dict(r.headers)
        except aiohttp.ClientError as e:
            self.failures += 1
            self.say(f"      ✗ request failed: {e}")
            return
        shown = step.show(status, headers, body) if step.show else _short(body)
        ok = step.expect is None or status == step.expect
        if not ok:
            self.failures += 1
        mark = "←" if ok else f"✗ expected {step.expect}, got"
        self.say(f"      {mark} {status} {shown}")


async def _start_app(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def demo(once: bool, listen: str | None, out: TextIO = sys.stdout) -> int:
    from authproxy.proxy.app import ProxyServer

    tour = Tour(out)
    demos = load_demos()
    runners: list[web.AppRunner] = []
    server: ProxyServer | None = None
    with tempfile.TemporaryDirectory(prefix="authproxy-demo-") as state_dir:
        try:
            services: dict[str, Any] = {}
            for d in demos:
                runner, url = await _start_app(d.app)
                runners.append(runner)
                services[d.name] = d.config(url)
            listen = listen or ("127.0.0.1:0" if once else DEFAULT_LISTEN)
            doc = {"listen": listen, "state_dir": state_dir, "shutdown_timeout": 2, "services": services}
            config = load_config_text(yaml.safe_dump(doc), env={}, path="<demo>")
            server = ProxyServer(config)
            try:
                await server.start()
            except OSError as e:
                tour.say(f"authproxy demo: cannot listen on {listen}: {e.strerror or e} (try --listen 127.0.0.1:8081)")
                return 1
            base = f"http://127.0.0.1:{server.port}"
            tour.say(f"authproxy demo — mock upstreams on loopback, proxy on {base}\n")
            async with aiohttp.ClientSession(auto_decompress=False) as session:
                for d in demos:
                    svc = config.services[d.name]
                    tour.say(f"{d.name}  ({svc.scheme}: {base}{svc.prefix}/… → mock {svc.upstream.url})")
                    for step in d.tour:
                        await tour.step(session, base, step)
                    if d.summary:
                        tour.say(f"    upstream saw: {d.summary()}")
                    tour.say()
                async with session.get(base + "/-/readyz") as r:
                    tour.say(f"GET /-/readyz → {r.status} {_short(await r.read(), 400)}")
            if not once:
                tour.say(f"\nThe proxy keeps serving on {base} — try:")
                first = next((d for d in demos if d.tour and d.tour[0].path), None)
                if first is not None:
                    tour.say(f"  curl -s '{base}{first.tour[0].path}'")
                tour.say(f"  curl -s {base}/-/readyz")
                tour.say("Ctrl-C to stop (created tokens are then logged off / expired).")
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, stop.set)
                await stop.wait()
        finally:
            if server is not None:
                await server.shutdown()
            for d in demos:
                if d.summary:
                    with contextlib.suppress(Exception):
                        tour.say(f"at exit, {d.name} upstream saw: {d.summary()}")
            for r in runners:
                await r.cleanup()
    if tour.failures:
        tour.say(f"\n{tour.failures} step(s) did not go as expected")
        return 1
    tour.say("\ndemo complete: every step went as expected")
    return 0


def run_demo(once: bool, listen: str | None) -> int:
    setup_logging("warning", "text")
    return asyncio.run(demo(once, listen))
