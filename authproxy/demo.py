"""``authproxy demo``: mock upstreams of every scheme, a proxy in front, and a tour.

Everything runs in this process on loopback, with a throw-away state dir, so a
new user sees each scheme obtain, inject, heal and revoke its credential
without configuring anything. Forward-proxy mode is toured too: an unmodified
tool run by ``authproxy exec`` calls a mock by its made-up host name over TLS,
and authproxy injects the credential on the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib
import ipaddress
import os
import signal
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import yaml
from aiohttp import web
from yarl import URL

from authproxy.config import load_config_text
from authproxy.observe import setup_logging
from authproxy.testing import DemoService, TourStep

DEMO_MODULES = ("echo", "fogbugz", "oauth2", "enfix", "github", "workload", "oauth2_assertions")
DEFAULT_LISTEN = "127.0.0.1:8080"
FORWARD_HOST = "api.demo.test"  # forward-proxy mode: a made-up name only authproxy resolves
FORWARD_TOKEN_VAR = "AUTHPROXY_DEMO_TOKEN"
FORWARD_TOKEN = "demo-forward-token"
# What the tool run by `authproxy exec` does: a plain urllib request, configured by nothing but its environment.
FORWARD_CHILD = """
import os, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=30) as r:
    r.read()
    held = "yes" if os.environ.get(sys.argv[2]) else "no"
    print(f"{r.status} from {sys.argv[1]}; {sys.argv[2]} in its environment: {held}; HTTPS_PROXY={os.environ.get('HTTPS_PROXY')}")
"""


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


async def _start_app(app: web.Application, tls: ssl.SSLContext | None = None) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"{'https' if tls else 'http'}://127.0.0.1:{port}"


def _tls_upstream_context(folder: Path) -> tuple[ssl.SSLContext, str]:
    """A throw-away CA and a certificate for 127.0.0.1 signed by it (what trustme makes
    for tests): the server context of a TLS mock, and the CA file a service trusts."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "authproxy demo upstream CA")])

    def usage(sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(not sign, False, False, False, False, sign, sign, False, False)

    def build(subject: x509.Name, public: Any, ca: bool) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public)
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
            .add_extension(usage(ca), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )  # fmt: skip

    ca_cert = build(ca_name, ca_key.public_key(), True).add_extension(
        x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
    ).sign(ca_key, hashes.SHA256())
    leaf = (
        build(x509.Name([]), key.public_key(), False)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(mode=0o700, exist_ok=True)
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (folder / "leaf.pem").write_bytes(leaf.public_bytes(pem) + key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(folder / "leaf.pem")
    return ctx, str(folder / "ca.pem")


async def _forward_tour(tour: Tour, config_file: Path, port: int, app: web.Application) -> None:
    """``authproxy exec -- python -c <urllib request>``, as a subprocess, against the demo's
    own proxy (exec finds it at the config's listen)."""
    from authproxy.testing.echo import STATE

    url = f"https://{FORWARD_HOST}:{port}/items?page=1"
    tour.say(f"forward-proxy mode  (an unmodified tool calls {url}; authproxy, its HTTPS_PROXY, injects the credential)")
    tour.say(f"  • authproxy exec -c {config_file.name} -- python -c '<urllib.request.urlopen(url)>'")
    env = {**os.environ, FORWARD_TOKEN_VAR: FORWARD_TOKEN}  # read by the config; exec keeps it from the tool
    argv = [sys.executable, "-m", "authproxy", "exec", "-c", str(config_file), "--", sys.executable, "-c", FORWARD_CHILD, url, FORWARD_TOKEN_VAR]
    proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except asyncio.TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
    if proc.returncode != 0:
        tour.failures += 1
        tour.say(f"      ✗ exec exited {proc.returncode}: {_short(out + err, 400)}")
        return
    tour.say(f"      ← the tool printed: {_short(out, 300)}")
    seen = app[STATE].requests[-1] if app[STATE].requests else {"headers": []}
    sent = dict((k.lower(), v) for k, v in seen["headers"]).get("authorization")
    tour.say(f"    upstream saw: {seen.get('method', '?')} {seen.get('raw_path', '?')} with Authorization: {sent[:7] + '***' if sent else '(none)'}")
    if not sent:
        tour.failures += 1
    tour.say()


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
            # Forward-proxy mode: an echo mock over TLS, reached by the name api.demo.test.
            from authproxy.testing.echo import make_app as echo_app

            forward_app = echo_app()
            tls, ca_file = _tls_upstream_context(Path(state_dir) / "upstream-tls")
            runner, url = await _start_app(forward_app, tls)
            runners.append(runner)
            forward_port = int(url.rsplit(":", 1)[1])
            token = f"${{{FORWARD_TOKEN_VAR}:-{FORWARD_TOKEN}}}"
            services["forward"] = {"upstream": url, "hosts": [FORWARD_HOST], "ca_file": ca_file, "auth": {"scheme": "bearer", "token": token}}
            listen = listen or ("127.0.0.1:0" if once else DEFAULT_LISTEN)
            doc = {"listen": listen, "state_dir": state_dir, "shutdown_timeout": 2, "forward_proxy": {"enabled": True}, "services": services}
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
                # exec finds this proxy by the config's listen: the file names the bound port.
                config_file = Path(state_dir) / "authproxy.yaml"
                config_file.write_text(yaml.safe_dump({**doc, "listen": f"127.0.0.1:{server.port}"}))
                await _forward_tour(tour, config_file, forward_port, forward_app)
                async with session.get(base + "/-/readyz") as r:
                    tour.say(f"GET /-/readyz → {r.status} {_short(await r.read(), 400)}")
            if not once:
                tour.say(f"\nThe proxy keeps serving on {base} — try:")
                first = next((d for d in demos if d.tour and d.tour[0].path), None)
                if first is not None:
                    tour.say(f"  curl -s '{base}{first.tour[0].path}'")
                tour.say(f"  curl -s {base}/-/readyz")
                tour.say(f"  authproxy exec -c {config_file} -- curl -s https://{FORWARD_HOST}:{forward_port}/items")
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
