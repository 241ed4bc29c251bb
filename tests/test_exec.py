"""``authproxy exec`` and ``authproxy ca``: real, unmodified clients (curl, git, python
requests and httpx, node) configured only by the environment exec sets reach a TLS
upstream by a made-up host name, with the credential injected by authproxy and never
in their hands; exit statuses, signals, the running-proxy case, inbound keys.

Every tool runs as the real CLI in a subprocess, on loopback only.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import ssl
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from cryptography import x509

from authproxy.config import load_config_text
from tests.conftest import CAPTURED, free_port, run_cli, secret, write_config

API_TOKEN = secret("exec-api-t0ken-Zq81")
GIT_TOKEN = secret("exec-git-t0ken-Wm27")
NODE = shutil.which("node")

# CMD's environment, written by the command itself before it runs the client.
WRAP = 'env -0 > "$0"; exec "$@"'


class TlsUpstream:
    """An HTTPS upstream on 127.0.0.1 (a trustme certificate for that address) that
    requires the right Bearer token: /hello for the api service, /repo.git/... (a git
    repository served statically, "dumb HTTP") for the git service."""

    def __init__(self, tmp_path: Path) -> None:
        self.ca = trustme.CA()
        self.ca_file = tmp_path / "upstream-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.seen: list[tuple[str, str | None]] = []
        self.repo = tmp_path / "src"
        self.runner: web.AppRunner | None = None
        self.port = 0

    @web.middleware
    async def auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        sent = request.headers.get("Authorization")
        self.seen.append((request.path, sent))
        want = GIT_TOKEN if request.path.startswith("/repo.git") else API_TOKEN
        if sent != f"Bearer {want}":
            return web.json_response({"error": "no or wrong credential"}, status=401)
        return await handler(request)

    async def hello(self, request: web.Request) -> web.Response:
        return web.json_response({"hello": "world", "credential": "ok", "path": request.path})

    async def start(self) -> "TlsUpstream":
        self.repo.mkdir()
        git = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "HOME": str(self.repo.parent)}
        for cmd in (
            ["git", "init", "-q", "-b", "main"],
            ["git", "-c", "user.name=t", "-c", "user.email=t@example.test", "commit", "-q", "--allow-empty", "-m", "init"],
        ):
            subprocess.run(cmd, cwd=self.repo, env=git, check=True)
        (self.repo / "README").write_text("served by dumb HTTP\n")
        subprocess.run(["git", "add", "README"], cwd=self.repo, env=git, check=True)
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.test", "commit", "-q", "-m", "readme"], cwd=self.repo, env=git, check=True)
        subprocess.run(["git", "update-server-info"], cwd=self.repo, env=git, check=True)
        app = web.Application(middlewares=[self.auth])
        app.router.add_get("/hello", self.hello)
        app.router.add_static("/repo.git", self.repo / ".git")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1").configure_cert(ctx)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    def credentials_seen(self) -> list[str | None]:
        return [sent for _, sent in self.seen]


@pytest.fixture
async def tls_upstream(tmp_path: Path):
    up = await TlsUpstream(tmp_path).start()
    yield up
    assert up.runner is not None
    await up.runner.cleanup()


def exec_config(tmp_path: Path, up: TlsUpstream, **extra: Any) -> Path:
    """api.example.test and git.example.test mapped to the upstream; listen on a port
    where nothing runs (so exec starts its own proxy); tokens from the environment."""
    doc: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "state_dir": str(tmp_path / "state"),
        "forward_proxy": {"enabled": True},
        "services": {
            "api": {
                "upstream": f"https://127.0.0.1:{up.port}",
                "hosts": ["api.example.test"],
                "ca_file": str(up.ca_file),
                "auth": {"scheme": "bearer", "token": "${API_TOKEN}"},
            },
            "git": {
                "upstream": f"https://127.0.0.1:{up.port}",
                "hosts": ["git.example.test"],
                "ca_file": str(up.ca_file),
                "auth": {"scheme": "bearer", "token_file": str(tmp_path / "git-token")},
            },
        },
        **extra,
    }
    (tmp_path / "git-token").write_text(GIT_TOKEN + "\n")
    return write_config(tmp_path / "authproxy.yaml", doc)


def secret_env() -> dict[str, str]:
    return {"API_TOKEN": API_TOKEN, "UNRELATED_SETTING": "kept"}


async def run_exec(tmp_path: Path, cfg: Path, *cmd: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    """``authproxy exec -c cfg -- sh -c WRAP envfile CMD...``: CMD's result and environment."""
    envfile = tmp_path / f"child-env-{len(list(tmp_path.glob('child-env-*')))}"
    args = ("exec", "-c", str(cfg), "--", "sh", "-c", WRAP, str(envfile), *cmd)
    proc = await asyncio.to_thread(run_cli, *args, cwd=tmp_path, env={**secret_env(), **(env or {})}, timeout=90)
    child = {}
    if envfile.exists():
        for item in envfile.read_bytes().split(b"\0"):
            if item:
                k, _, v = item.decode().partition("=")
                child[k] = v
    return proc, child


def assert_holds_no_credential(env: dict[str, str]) -> None:
    assert env, "the child's environment was not captured"
    assert "API_TOKEN" not in env
    for k, v in env.items():
        for token in (API_TOKEN, GIT_TOKEN):
            assert token not in k and token not in v, f"{k} holds a credential"
    assert env["UNRELATED_SETTING"] == "kept"


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    return proc.stdout


# --------------------------------------------------------------------------- the environment


async def test_environment_of_cmd(tmp_path, tls_upstream):
    cfg = exec_config(tmp_path, tls_upstream)
    proc, env = await run_exec(tmp_path, cfg, "true", env={"NO_PROXY": "internal.example,localhost", "no_proxy": "other.example"})
    ok(proc)
    assert_holds_no_credential(env)
    url = env["HTTPS_PROXY"]
    assert url.startswith("http://127.0.0.1:") and int(url.rsplit(":", 1)[1]) > 0
    assert env["HTTP_PROXY"] == env["https_proxy"] == env["http_proxy"] == url
    assert env["NO_PROXY"] == env["no_proxy"] == "internal.example,localhost,other.example,127.0.0.1,::1"
    ca_path = ok(await asyncio.to_thread(run_cli, "ca", "-c", str(cfg), cwd=tmp_path, env=secret_env())).strip()
    assert env["NODE_EXTRA_CA_CERTS"] == ca_path
    bundle = Path(env["SSL_CERT_FILE"])
    assert env["REQUESTS_CA_BUNDLE"] == env["CURL_CA_BUNDLE"] == env["GIT_SSL_CAINFO"] == str(bundle)
    assert bundle.parent == tmp_path / "state" and stat.S_IMODE(bundle.stat().st_mode) == 0o644
    pem = bundle.read_text()
    assert Path(ca_path).read_text().strip() in pem and pem.count("-----BEGIN CERTIFICATE-----") > 10  # the system's CAs too
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


def test_secret_env_names_every_variable_a_secret_is_read_from(tmp_path):
    (tmp_path / "t").write_text("x")
    text = """
inbound: {keys: ["${K1}", {name: a, key: "${K2:-${K3}}"}]}
services:
  a: {upstream: "${UP}", auth: {scheme: bearer, token: "${TOK}"}}
  b: {upstream: "http://x:${PORT}", auth: {scheme: header, headers: {X: "pre-${H}"}}}
  c: {upstream: http://x, auth: {scheme: bearer, token_file: "${DIR}/t"}}
  d: {upstream: http://x, auth: {scheme: query, params: {x: "$${LITERAL}"}}}
"""
    env = {"K1": "k1", "K3": "k3", "UP": "http://h", "TOK": "t", "H": "h", "DIR": str(tmp_path), "PORT": "81"}
    cfg = load_config_text(text, env=env)
    assert cfg.secret_env == {"K1", "K2", "K3", "TOK", "H", "DIR"}  # not UP, PORT (no secret), LITERAL (escaped)


async def test_ca_command_prints_the_ca_path(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", {"state_dir": str(tmp_path / "state"), "services": {}})
    first = ok(await asyncio.to_thread(run_cli, "ca", "-c", str(cfg), cwd=tmp_path)).strip()
    assert first == str(tmp_path / "state" / "ca" / "ca.pem")
    assert stat.S_IMODE(os.stat(first).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "state" / "ca" / "ca.key").st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(Path(first).read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    again = ok(await asyncio.to_thread(run_cli, "ca", "-c", str(cfg), cwd=tmp_path)).strip()
    assert again == first and x509.load_pem_x509_certificate(Path(again).read_bytes()) == cert
    custom = write_config(tmp_path / "d.yaml", {"state_dir": str(tmp_path / "state"), "forward_proxy": {"ca_dir": str(tmp_path / "elsewhere")}})
    assert ok(await asyncio.to_thread(run_cli, "ca", "-c", str(custom), cwd=tmp_path)).strip() == str(tmp_path / "elsewhere" / "ca.pem")


# --------------------------------------------------------------------------- real clients


async def test_curl(tmp_path, tls_upstream):
    cfg = exec_config(tmp_path, tls_upstream)
    url = f"https://api.example.test:{tls_upstream.port}/hello"
    proc, env = await run_exec(tmp_path, cfg, "curl", "-sS", "--fail", url)
    assert json.loads(ok(proc)) == {"hello": "world", "credential": "ok", "path": "/hello"}
    assert_holds_no_credential(env)
    assert tls_upstream.credentials_seen() == [f"Bearer {API_TOKEN}"]


async def test_python_requests(tmp_path, tls_upstream):
    cfg = exec_config(tmp_path, tls_upstream)
    script = "import requests, sys; r = requests.get(sys.argv[1], timeout=30); print(r.status_code, r.text)"
    proc, env = await run_exec(tmp_path, cfg, sys.executable, "-c", script, f"https://api.example.test:{tls_upstream.port}/hello")
    status, body = ok(proc).split(" ", 1)
    assert status == "200" and json.loads(body)["credential"] == "ok"
    assert_holds_no_credential(env)
    assert tls_upstream.credentials_seen() == [f"Bearer {API_TOKEN}"]


async def test_python_httpx(tmp_path, tls_upstream):
    cfg = exec_config(tmp_path, tls_upstream)
    script = "import httpx, sys; r = httpx.get(sys.argv[1], timeout=30); print(r.status_code, r.text)"
    proc, env = await run_exec(tmp_path, cfg, sys.executable, "-c", script, f"https://api.example.test:{tls_upstream.port}/hello")
    status, body = ok(proc).split(" ", 1)
    assert status == "200" and json.loads(body)["credential"] == "ok"
    assert_holds_no_credential(env)
    assert tls_upstream.credentials_seen() == [f"Bearer {API_TOKEN}"]


async def test_git_clone_over_https(tmp_path, tls_upstream):
    cfg = exec_config(tmp_path, tls_upstream)
    dest = tmp_path / "clone"
    url = f"https://git.example.test:{tls_upstream.port}/repo.git"
    git_env = {"GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "HOME": str(tmp_path)}
    proc, env = await run_exec(tmp_path, cfg, "git", "clone", "-q", url, str(dest), env=git_env)
    ok(proc)
    assert (dest / "README").read_text() == "served by dumb HTTP\n"
    assert_holds_no_credential(env)
    assert "GIT_TOKEN" not in env
    seen = tls_upstream.credentials_seen()
    assert seen and all(s == f"Bearer {GIT_TOKEN}" for s in seen)
    assert any(p.endswith("/info/refs") for p, _ in tls_upstream.seen)


NODE_CLIENT = r"""
const http = require('http'), https = require('https'), tls = require('tls');
const proxy = new URL(process.env.HTTPS_PROXY), target = new URL(process.argv[1]);
const headers = {host: `${target.hostname}:${target.port}`};
if (proxy.username) {
  const id = decodeURIComponent(proxy.username) + ':' + decodeURIComponent(proxy.password);
  headers['proxy-authorization'] = 'Basic ' + Buffer.from(id).toString('base64');
}
const connect = http.request({host: proxy.hostname, port: proxy.port, method: 'CONNECT', path: headers.host, headers});
connect.on('connect', (res, socket) => {
  if (res.statusCode !== 200) { console.error('CONNECT answered', res.statusCode); process.exit(1); }
  const req = https.request({
    host: target.hostname, port: target.port, path: target.pathname,  // no agent: createConnection is used
    createConnection: () => tls.connect({socket, servername: target.hostname}),
  }, (r) => {
    let body = '';
    r.setEncoding('utf8');
    r.on('data', (d) => { body += d; });
    r.on('end', () => { console.log(r.statusCode, body); socket.destroy(); });
  });
  req.on('error', (e) => { console.error(e.message); process.exit(1); });
  req.end();
});
connect.on('error', (e) => { console.error(e.message); process.exit(1); });
connect.end();
"""


@pytest.mark.skipif(NODE is None, reason="node is not installed")
async def test_node_https_through_connect(tmp_path, tls_upstream):
    """node 20's fetch ignores HTTPS_PROXY: plain node, CONNECT by hand, then TLS
    checked against the default roots plus NODE_EXTRA_CA_CERTS."""
    cfg = exec_config(tmp_path, tls_upstream)
    proc, env = await run_exec(tmp_path, cfg, str(NODE), "-e", NODE_CLIENT, f"https://api.example.test:{tls_upstream.port}/hello")
    status, body = ok(proc).split(" ", 1)
    assert status == "200" and json.loads(body)["credential"] == "ok"
    assert_holds_no_credential(env)
    assert tls_upstream.credentials_seen() == [f"Bearer {API_TOKEN}"]


# --------------------------------------------------------------------------- the proxy used


async def test_uses_the_running_proxy(tmp_path, tls_upstream, cli):
    cfg = exec_config(tmp_path, tls_upstream)
    port = int(load_config_text(cfg.read_text(), env=secret_env()).listen.port)
    running = cli("run", "-c", str(cfg), env=secret_env())
    await asyncio.to_thread(running.wait_log, "listening")
    proc, env = await run_exec(tmp_path, cfg, "curl", "-sS", "--fail", f"https://api.example.test:{tls_upstream.port}/hello")
    assert json.loads(ok(proc))["credential"] == "ok"
    assert env["HTTPS_PROXY"] == f"http://127.0.0.1:{port}"
    assert_holds_no_credential(env)
    running.stop()
    assert "api.example.test" in running.log() or "/hello" in running.log()  # its access record


async def test_running_proxy_without_forward_mode_is_not_used(tmp_path, tls_upstream, cli):
    cfg = exec_config(tmp_path, tls_upstream, forward_proxy={"enabled": False})
    port = int(load_config_text(cfg.read_text(), env=secret_env()).listen.port)
    running = cli("run", "-c", str(cfg), env=secret_env())
    await asyncio.to_thread(running.wait_log, "listening")
    proc, env = await run_exec(tmp_path, cfg, "curl", "-sS", "--fail", f"https://api.example.test:{tls_upstream.port}/hello")
    assert json.loads(ok(proc))["credential"] == "ok"  # through exec's own proxy, forward mode forced on
    assert env["HTTPS_PROXY"] != f"http://127.0.0.1:{port}"


async def test_inbound_key_in_the_proxy_url(tmp_path, tls_upstream):
    wide = secret("k2/with:special@chars")
    keys = [{"name": "narrow", "key": secret("narrow-key-1"), "services": ["api"]}, {"name": "wide", "key": wide}]
    cfg = exec_config(tmp_path, tls_upstream, inbound={"keys": keys})
    proc, env = await run_exec(tmp_path, cfg, "curl", "-sS", "--fail", f"https://api.example.test:{tls_upstream.port}/hello")
    assert json.loads(ok(proc))["credential"] == "ok"
    assert env["HTTPS_PROXY"].startswith("http://authproxy:k2%2Fwith%3Aspecial%40chars@127.0.0.1:")
    # No key may use every service: the first one.
    cfg = exec_config(tmp_path, tls_upstream, inbound={"keys": [keys[0], {"name": "git-only", "key": secret("git-only-key"), "services": ["git"]}]})
    proc, env = await run_exec(tmp_path, cfg, "true")
    ok(proc)
    assert env["HTTPS_PROXY"].startswith("http://authproxy:narrow-key-1@127.0.0.1:")


# --------------------------------------------------------------------------- exit status and signals


async def test_exit_status_passthrough(tmp_path, tls_upstream):
    cfg = exec_config(tmp_path, tls_upstream)
    proc, _ = await run_exec(tmp_path, cfg, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert proc.returncode == 3 and proc.stdout == "out\n" and proc.stderr.endswith("err\n")
    proc, _ = await run_exec(tmp_path, cfg, "sh", "-c", "kill -TERM $$")
    assert proc.returncode == 128 + signal.SIGTERM


async def test_command_that_cannot_start_is_127(tmp_path, tls_upstream):
    cfg = exec_config(tmp_path, tls_upstream)
    proc = await asyncio.to_thread(run_cli, "exec", "-c", str(cfg), "--", "no-such-command-authproxy-test", cwd=tmp_path, env=secret_env())
    assert proc.returncode == 127 and "no-such-command-authproxy-test" in proc.stderr
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    proc = await asyncio.to_thread(run_cli, "exec", "-c", str(cfg), "--", str(script), cwd=tmp_path, env=secret_env())
    assert proc.returncode == 127


async def test_no_command_is_usage_error(tmp_path, tls_upstream):
    cfg = exec_config(tmp_path, tls_upstream)
    for args in (("exec", "-c", str(cfg)), ("exec", "-c", str(cfg), "--")):
        proc = await asyncio.to_thread(run_cli, *args, cwd=tmp_path, env=secret_env())
        assert proc.returncode == 2 and "no command" in proc.stderr


SIGNAL_CHILD = r"""
import signal, sys
def got(sig, frame):
    print("got", sig, flush=True)
    if sig == signal.SIGTERM:
        sys.exit(7)
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, got)
print("ready", flush=True)
while True:
    signal.pause()
"""


async def test_signals_are_passed_to_cmd(tmp_path, tls_upstream):
    cfg = exec_config(tmp_path, tls_upstream)
    # A session of its own: no terminal, so SIGINT is forwarded too (from a terminal's
    # foreground group Ctrl-C already reaches CMD directly, and is not sent twice).
    proc = subprocess.Popen(
        [sys.executable, "-m", "authproxy", "exec", "-c", str(cfg), "--", sys.executable, "-c", SIGNAL_CHILD],
        cwd=tmp_path,
        env={**os.environ, **secret_env(), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []

    def read_line() -> str:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        lines.append(line)
        return line.strip()

    try:
        assert await asyncio.wait_for(asyncio.to_thread(read_line), 60) == "ready"
        for sig in (signal.SIGHUP, signal.SIGINT):
            proc.send_signal(sig)
            assert await asyncio.wait_for(asyncio.to_thread(read_line), 30) == f"got {int(sig)}"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(asyncio.to_thread(read_line), 30) == f"got {int(signal.SIGTERM)}"
        assert await asyncio.to_thread(proc.wait, 30) == 7
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err = proc.stderr.read()  # type: ignore[union-attr]
        CAPTURED.extend(err.splitlines())
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def test_demo_tours_forward_proxy_mode(tmp_path):
    r = run_cli("demo", "--once", cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "forward-proxy mode" in r.stdout
    assert "AUTHPROXY_DEMO_TOKEN in its environment: no" in r.stdout
    assert "with Authorization: Bearer ***" in r.stdout
