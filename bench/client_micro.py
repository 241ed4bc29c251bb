#!/usr/bin/env python3
"""Micro-benchmark: CPU per request of the upstream client alone.

Compares (a) ``aiohttp.ClientSession`` configured as the proxy configured it
(``authproxy.runtime.make_session``'s settings, the forwarder's request call) with
(b) :class:`authproxy.http1.pool.Pool`, issuing small keep-alive GETs
with a proxy-like set of headers and reading each small JSON reply whole.

The upstream runs in a *separate process* (nginx, or a tiny raw asyncio server)
so that ``time.process_time()`` -- the CPU time of this process only -- measures
the client and nothing else. Wall time is shown too, but on a shared machine
only the CPU figure is meaningful.

Patterns: ``seq`` (one request at a time) and ``conc`` (``--concurrency`` tasks
sharing the pool, like wrk's 32 connections through the proxy). Rounds are
interleaved (a, b, a, b, ...) so drift hits both clients alike; the median of
the rounds is reported.

    python bench/client_micro.py                     # nginx upstream if installed, else raw
    python bench/client_micro.py --upstream raw -n 20000 --rounds 5 --uvloop
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aiohttp  # noqa: E402
from multidict import CIMultiDict  # noqa: E402
from yarl import URL  # noqa: E402

from authproxy.http1.pool import Pool  # noqa: E402

BODY = b'{"id": 42, "name": "small", "ok": true, "items": [1, 2, 3]}\n'
RAW_REPLY = (
    b"HTTP/1.1 200 OK\r\nServer: raw\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY
)
HEADERS = [
    ("Accept", "application/json"),
    ("User-Agent", "curl/8.5.0"),
    ("X-Forwarded-For", "127.0.0.1"),
    ("X-Forwarded-Proto", "http"),
    ("X-Forwarded-Host", "127.0.0.1:8080"),
    ("X-Request-Id", "0123456789abcdef0123456789abcdef"),
    ("Authorization", "Bearer bench-token-0123456789abcdef"),
]


# --------------------------------------------------------------------------- upstreams


def serve_raw(port: int) -> None:
    """A fixed small keep-alive reply per request (GETs without bodies)."""

    class P(asyncio.Protocol):
        def connection_made(self, t: asyncio.BaseTransport) -> None:
            self.t = t
            self.buf = b""
            t.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data: bytes) -> None:
            self.buf += data
            n = self.buf.count(b"\r\n\r\n")
            if n:
                self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4 :]
                self.t.write(RAW_REPLY * n)  # type: ignore[attr-defined]

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(P, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    try:
        import uvloop  # a fast server keeps the measured client the bottleneck

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


NGINX_CONF = """\
daemon off;
worker_processes 1;
{user}
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_timeout 300s;
  keepalive_requests 1000000;
  tcp_nodelay on;
  client_body_temp_path {d}/tmp;
  proxy_temp_path {d}/tmp;
  fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp;
  scgi_temp_path {d}/tmp;
  server {{
    listen 127.0.0.1:{port};
    root {d}/www;
    location = /small.json {{ default_type application/json; }}
  }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_upstream(kind: str, tmp: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    if kind == "nginx":
        os.makedirs(os.path.join(tmp, "www"))
        os.makedirs(os.path.join(tmp, "tmp"))
        with open(os.path.join(tmp, "www", "small.json"), "wb") as f:
            f.write(BODY)
        conf = os.path.join(tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(d=tmp, port=port, user="user root;" if os.geteuid() == 0 else ""))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        proc = subprocess.Popen([nginx, "-p", tmp, "-c", conf, "-e", os.path.join(tmp, "error.log")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", str(port)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.02)
    proc.kill()
    raise SystemExit(f"{kind} upstream did not start")


# --------------------------------------------------------------------------- clients


def make_session() -> aiohttp.ClientSession:
    """As authproxy.runtime.make_session configured it."""
    connector = aiohttp.TCPConnector(limit=512, limit_per_host=512, keepalive_timeout=30.0, ttl_dns_cache=60,
                                     enable_cleanup_closed=False)
    return aiohttp.ClientSession(connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                                 timeout=aiohttp.ClientTimeout(total=300, sock_connect=10), read_bufsize=256 * 1024,
                                 trust_env=False)


SKIP_AUTO = frozenset({"User-Agent", "Accept-Encoding", "Content-Type"})


async def run_aiohttp(port: int, path: str, n: int, conc: int) -> None:
    async with make_session() as session:
        url = URL(f"http://127.0.0.1:{port}{path}", encoded=True)

        async def one() -> None:
            resp = await session.request("GET", url, headers=CIMultiDict(HEADERS), allow_redirects=False,
                                         skip_auto_headers=SKIP_AUTO, compress=None, chunked=None)
            try:
                body = await resp.read()
            finally:
                resp.release()
            assert resp.status == 200 and body == BODY

        await drive(one, n, conc)


async def run_pool(port: int, path: str, n: int, conc: int) -> None:
    pool = Pool("127.0.0.1", port, connect_timeout=10, total_timeout=300)
    try:
        async def one() -> None:
            resp = await pool.request("GET", path, CIMultiDict(HEADERS))
            body = await resp.read_all()  # releases
            assert resp.status == 200 and body == BODY

        await drive(one, n, conc)
    finally:
        await pool.close()


async def drive(one, n: int, conc: int) -> None:  # type: ignore[no-untyped-def]
    for _ in range(min(200, n)):  # warm up: connections, caches
        await one()
    if conc <= 1:
        t0, w0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            await one()
    else:
        per = n // conc

        async def worker() -> None:
            for _ in range(per):
                await one()

        await asyncio.gather(*(one() for _ in range(conc)))  # open `conc` connections before measuring
        t0, w0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        n = per * conc
    RESULT.append(((time.process_time() - t0) / n * 1e6, (time.perf_counter() - w0) / n * 1e6))


RESULT: list[tuple[float, float]] = []


def measure(fn, port: int, path: str, n: int, conc: int, use_uvloop: bool) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    RESULT.clear()
    if use_uvloop:
        import uvloop

        uvloop.run(fn(port, path, n, conc))
    else:
        asyncio.run(fn(port, path, n, conc))
    return RESULT[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--upstream", choices=["nginx", "raw"], default=None)
    ap.add_argument("-n", type=int, default=10000, help="requests per measurement (default 10000)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--uvloop", action="store_true", help="run the clients on uvloop")
    a = ap.parse_args()
    if a.serve:
        serve_raw(a.serve)
        return
    kind = a.upstream or ("nginx" if (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")) else "raw")
    path = "/small.json"
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_upstream(kind, tmp)
        try:
            rows = []
            for label, conc in (("seq", 1), (f"conc{a.concurrency}", a.concurrency)):
                got: dict[str, list[tuple[float, float]]] = {"aiohttp.ClientSession": [], "http1.Pool": []}
                for _ in range(a.rounds):
                    got["aiohttp.ClientSession"].append(measure(run_aiohttp, port, path, a.n, conc, a.uvloop))
                    got["http1.Pool"].append(measure(run_pool, port, path, a.n, conc, a.uvloop))
                med = {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in got.items()}
                base = med["aiohttp.ClientSession"][0]
                for k, (cpu, wall) in med.items():
                    rows.append((label, k, cpu, wall, base / cpu))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    loop = "uvloop" if a.uvloop else "asyncio"
    print(f"upstream={kind} loop={loop} n={a.n} rounds={a.rounds} (median) python={sys.version.split()[0]} aiohttp={aiohttp.__version__}")
    print(f"{'pattern':<8} {'client':<22} {'CPU us/req':>10} {'wall us/req':>11} {'speed-up':>8}")
    for label, k, cpu, wall, x in rows:
        print(f"{label:<8} {k:<22} {cpu:>10.1f} {wall:>11.1f} {x:>7.2f}x")


if __name__ == "__main__":
    main()
