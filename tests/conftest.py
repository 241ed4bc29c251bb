"""Shared fixtures: real servers on loopback, the proxy in-process or as the real CLI.

Every secret a test configures is registered with :func:`secret`; at the end of
the session every log line captured (in-process records and subprocess stderr)
is scanned for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import yaml
from aiohttp import web

from authproxy.config import load_config_text
from authproxy.proxy.app import ProxyServer

SECRETS: set[str] = set()
CAPTURED: list[str] = []


def secret(value: str) -> str:
    """Register a value that must never appear in any log line; returns it."""
    SECRETS.add(value)
    return value


class _Capture(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from authproxy.observe import JsonFormatter, TextFormatter

        try:
            CAPTURED.append(TextFormatter().format(record))
            CAPTURED.append(JsonFormatter().format(record))
        except Exception:  # pragma: no cover - a formatting failure is itself a bug
            CAPTURED.append(f"UNFORMATTABLE {record.msg!r}")


_capture = _Capture(level=logging.DEBUG)


def pytest_configure(config: pytest.Config) -> None:
    lg = logging.getLogger("authproxy")
    lg.addHandler(_capture)
    lg.setLevel(logging.DEBUG)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leaks = [(s, line) for line in CAPTURED for s in SECRETS if s in line]
    if leaks:
        s, line = leaks[0]
        print(f"\nSECRET LEAKED INTO A LOG LINE ({len(leaks)} lines): {line[:300]!r}", file=sys.stderr)
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(
        f"log scan: {len(CAPTURED)} captured log lines checked against {len(SECRETS)} configured secrets"
    )


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    """Start an aiohttp application on a loopback port; returns its base URL. Stopped by the test."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application, port: int = 0) -> str:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        runners.append(runner)
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for r in reversed(runners):
        await r.cleanup()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
async def proxy(state_dir: Path) -> AsyncIterator[Callable[..., Awaitable["RunningProxy"]]]:
    """Start the proxy in-process from a config mapping (listen and state_dir filled in)."""
    started: list[RunningProxy] = []

    async def start(config: dict[str, Any], env: dict[str, str] | None = None) -> RunningProxy:
        config = {"listen": "127.0.0.1:0", "state_dir": str(state_dir), **config}
        cfg = load_config_text(yaml.safe_dump(config), env=env or {})
        server = ProxyServer(cfg)
        await server.start()
        rp = RunningProxy(server)
        started.append(rp)
        return rp

    yield start
    for rp in started:
        await rp.close()


class RunningProxy:
    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.url = f"http://127.0.0.1:{server.port}"
        self.session = aiohttp.ClientSession(auto_decompress=False)
        self._closed = False

    def request(self, method: str, path: str, **kw: Any) -> Any:
        from yarl import URL

        url = URL(self.url + path, encoded=True) if "params" not in kw else self.url + path
        return self.session.request(method, url, allow_redirects=False, **kw)

    async def get_json(self, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.request("GET", path, **kw) as r:
            return r.status, await r.json(content_type=None)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self.session.close()
            await self.server.shutdown()


# --------------------------------------------------------------------------- the real CLI


class CliProcess:
    """``python -m authproxy ...`` as a subprocess; stderr goes to a file that the
    secret scan reads at the end."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = cwd / f"stderr-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "authproxy", *args],
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if needle in text:
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"process exited {self.proc.returncode} before logging {needle!r}:\n{text}")
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {needle!r}:\n{self.log()}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()
        CAPTURED.extend(self.log().splitlines())


@pytest.fixture
def cli(tmp_path: Path) -> Any:
    procs: list[CliProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> CliProcess:
        p = CliProcess(list(args), tmp_path, env)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion; its stderr joins the secret scan."""
    proc = subprocess.run(
        [sys.executable, "-m", "authproxy", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
    )
    CAPTURED.extend(proc.stderr.splitlines())
    return proc


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


async def wait_for(predicate: Callable[[], Any], timeout: float = 10, interval: float = 0.01) -> Any:
    """Poll until ``predicate()`` is truthy (awaiting it if it is a coroutine); bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


def http_get(url: str, timeout: float = 5, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback only
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.02)
    raise AssertionError(f"port {port} did not open")


# --------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One real redis-server for the session (``.url`` = redis://127.0.0.1:PORT/0);
    tests share it by using a unique key prefix each. Skips when redis-server is
    missing and cannot be installed."""
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Any:
    """Start a test's own redis-server (to stop, restart or dump it, or with a
    password, or TLS): ``redis_factory(password=None, tls=(cert_file, key_file))``. All are stopped after the test."""
    from tests.redis_server import RedisServer

    servers: list[Any] = []

    def start(password: str | None = None, tls: tuple[str, str] | None = None) -> Any:
        server = RedisServer(tmp_path / f"redis{len(servers)}", password=password, tls=tls).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
