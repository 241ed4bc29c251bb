"""RFC 8628, the device authorization grant: `authproxy login SERVICE [--device]`.

Through the real CLI as a subprocess, against the strict mock (which answers
slow_down to a poll sooner than the interval): the person reads the user code
and URL off stdout and approves or denies over HTTP, like a browser; then the
proxy serves with the stored refresh token. Timing-only cases (the default
interval, the device code's lifetime) run in-process on a fake clock shared
with the mock.
"""

from __future__ import annotations

import asyncio
import base64
import html
import json
import re
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable
from urllib.parse import quote_plus

import aiohttp
import pytest
import yaml
from aiohttp import web

from authproxy.config import ConfigError, load_config_text
from authproxy.schemes import rfc8628
from authproxy.schemes.base import CliIO, CredentialError
from authproxy.testing import oauth2 as mock
from authproxy.testing import oauth2_device as device
from tests.conftest import wait_for, write_config
from tests.test_oauth2 import CLIENT, SECRET, api, open_runtime, service

QR_BLOCKS = re.compile("[█▀▄]{8}")


@pytest.fixture
async def device_server(upstream: Callable) -> AsyncIterator[Callable[..., Any]]:
    """A mock with the device endpoints; what it issued joins the log scan at the end."""
    from tests.conftest import secret

    apps: list[web.Application] = []

    async def start(clients: list[mock.Client] | None = None, **options: Any) -> tuple[str, mock.OAuth2State, device.DeviceState]:
        app = mock.make_app(clients=clients or [mock.Client(CLIENT, secret=SECRET)], **options)
        apps.append(app)
        app[device.DEVICE].interval = 1
        return await upstream(app), app[mock.STATE], app[device.DEVICE]

    yield start
    for app in apps:
        st, dev = app[mock.STATE], app[device.DEVICE]
        for value in [*st.access, *st.refresh, *dev.codes]:
            secret(value)


def device_service(base: str, **auth: Any) -> dict[str, Any]:
    auth = {"grant": "device_code", "client_auth": "client_secret_basic", "client_secret": SECRET, **auth}
    return service(base, device_authorization_url=base + device.DEVICE_PATH, **auth)


class Screen:
    """What a CLI subprocess prints on stdout, read line by line as it comes."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc.proc.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for raw in iter(stream.readline, b""):
            self.lines.append(raw.decode("utf-8", "replace"))

    @property
    def text(self) -> str:
        return "".join(self.lines)

    async def wait(self, needle: str, timeout: float = 30) -> str:
        def seen() -> bool:
            if needle not in self.text and self.proc.proc.poll() is not None:
                raise AssertionError(f"the CLI exited {self.proc.proc.returncode}:\n{self.text}\n{self.proc.log()}")
            return needle in self.text

        await wait_for(seen, timeout=timeout, interval=0.05)
        return self.text

    def instructions(self) -> tuple[str, str, str | None]:
        """(verification_uri, user_code, verification_uri_complete) as printed."""
        text = self.text
        user_code = re.search(r"enter the code:\s+(\S+)", text)
        urls = re.findall(r"^\s+(https?://\S+)$", text, re.M)
        assert user_code and urls, text
        return urls[0], user_code.group(1), urls[1] if len(urls) > 1 else None


async def person(url: str, action: str = "approve") -> tuple[int, str]:
    """Open the verification page (the complete URL pre-fills the code), press a button."""
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            page = await r.text()
            assert r.status == 200, page
        code = re.search(r'name="user_code" value="([^"]*)"', page)
        assert code and code.group(1), page
        async with s.post(url.split("?")[0], data={"user_code": code.group(1), "action": action}) as r:
            return r.status, await r.text()


async def finish(proc: Any, screen: Screen) -> tuple[int, str, str]:
    rc = await asyncio.to_thread(proc.wait, 30)
    await asyncio.to_thread(screen._thread.join, 5)
    return rc, screen.text, proc.log()


def assert_nothing_secret(text: str, st: mock.OAuth2State, dev: device.DeviceState) -> None:
    for value in [*dev.codes, *st.access, *st.refresh, SECRET]:
        assert value not in text


# --------------------------------------------------------------------------- through the CLI


async def test_device_login_through_the_cli_then_the_proxy_serves(device_server, proxy, state_dir, tmp_path, cli):
    base, st, dev = await device_server()
    svc = device_service(base, scope="read offline_access")
    cfg = write_config(tmp_path / "c.yaml", {"state_dir": str(state_dir), "services": {"svc": svc}})
    t0 = time.monotonic()
    proc = cli("login", "svc", "-c", str(cfg))
    screen = Screen(proc)
    await screen.wait("Waiting up to 10 minutes")
    uri, user_code, complete = screen.instructions()
    assert uri == base + device.VERIFY_PATH and re.fullmatch(r"[B-Z]{4}-[B-Z]{4}", user_code)
    assert complete == f"{uri}?user_code={user_code}"
    assert QR_BLOCKS.search(screen.text), screen.text  # the QR code of the complete URL
    await wait_for(lambda: len(dev.polls) >= 3, timeout=10)  # authorization_pending: it keeps polling
    status, page = await person(complete)
    assert status == 200 and "approved" in page
    rc, out, err = await finish(proc, screen)
    assert rc == 0, err
    assert "Logged in" in out and "refresh token is stored" in out
    # Polled at the interval (1 s), never faster: the mock would have said slow_down.
    gaps = [b - a for a, b in zip(dev.polls, dev.polls[1:])]
    assert all(1.0 <= g < 2.5 for g in gaps), gaps
    assert set(dev.errors) == {"authorization_pending"}
    assert st.token_requests == {device.GRANT_TYPE: len(dev.polls)}
    # A confidential client authenticates at the device endpoint as at the token endpoint.
    assert dev.methods == ["client_secret_basic"] and dev.requests[0] == {"scope": "read offline_access"}
    assert_nothing_secret(out + err, st, dev)
    stored = json.loads((state_dir / "svc" / "refresh.json").read_text())
    assert stored["refresh_token"] in st.refresh
    assert time.monotonic() - t0 < 30
    # The proxy (another process sharing the state dir) trades the stored refresh token.
    p = await proxy({"services": {"svc": svc}})
    status, got = await api(p, "/svc/v1/apps")
    assert status == 200 and got["scope"] == "offline_access read", got
    assert st.token_requests["refresh_token"] == 1


async def test_login_device_on_an_authorization_code_service(device_server, state_dir, tmp_path, cli):
    base, st, dev = await device_server()
    svc = service(
        base,
        grant="authorization_code",
        client_secret=SECRET,
        authorize_url=base + mock.AUTHORIZE_PATH,
        device_authorization_url=base + device.DEVICE_PATH,
    )
    cfg = write_config(tmp_path / "c.yaml", {"state_dir": str(state_dir), "services": {"svc": svc}})
    proc = cli("login", "svc", "--device", "-c", str(cfg))
    screen = Screen(proc)
    await screen.wait("Waiting")
    _, _, complete = screen.instructions()
    await person(complete)
    rc, out, err = await finish(proc, screen)
    assert rc == 0, err
    assert dev.methods == ["client_secret_post"] and dev.requests[0]["client_secret"] == "***"
    assert json.loads((state_dir / "svc" / "refresh.json").read_text())["refresh_token"] in st.refresh


async def test_access_denied_ends_with_exit_1(device_server, state_dir, tmp_path, cli):
    base, st, dev = await device_server()
    cfg = write_config(tmp_path / "c.yaml", {"state_dir": str(state_dir), "services": {"svc": device_service(base)}})
    proc = cli("login", "svc", "-c", str(cfg))
    screen = Screen(proc)
    await screen.wait("Waiting")
    _, _, complete = screen.instructions()
    status, page = await person(complete, "deny")
    assert status == 200 and "denied" in page
    rc, out, err = await finish(proc, screen)
    assert rc == 1
    assert "access_denied" in err and "the person denied the request" in err
    assert not (state_dir / "svc" / "refresh.json").exists()
    assert_nothing_secret(out + err, st, dev)


async def test_expired_token_ends_with_exit_1(device_server, state_dir, tmp_path, cli):
    base, st, dev = await device_server()
    cfg = write_config(tmp_path / "c.yaml", {"state_dir": str(state_dir), "services": {"svc": device_service(base)}})
    proc = cli("login", "svc", "-c", str(cfg))
    screen = Screen(proc)
    await screen.wait("Waiting")
    await wait_for(lambda: dev.polls, timeout=10)
    dev.expire_all()  # the server's clock ran out before anyone approved
    rc, out, err = await finish(proc, screen)
    assert rc == 1 and "expired_token" in err and "run login again" in err
    assert_nothing_secret(out + err, st, dev)


async def test_slow_down_adds_five_seconds_to_the_interval(device_server, state_dir, tmp_path, cli):
    base, st, dev = await device_server()
    dev.slow_down_next = 1  # a busy server: the first poll is told to slow down
    cfg = write_config(tmp_path / "c.yaml", {"state_dir": str(state_dir), "services": {"svc": device_service(base)}})
    proc = cli("login", "svc", "-c", str(cfg))
    screen = Screen(proc)
    await screen.wait("Waiting")
    _, _, complete = screen.instructions()
    await wait_for(lambda: dev.errors == ["slow_down"], timeout=10)
    await person(complete)
    rc, _, err = await finish(proc, screen)
    assert rc == 0, err
    assert dev.errors == ["slow_down"] and len(dev.polls) == 2  # the next poll came late enough and got the tokens
    assert dev.polls[1] - dev.polls[0] >= 6.0  # 1 s + 5 s


async def test_device_login_not_supported_and_config_rules(device_server, state_dir, tmp_path):
    from tests.conftest import run_cli

    base, _, dev = await device_server()
    code = service(base, grant="authorization_code", client_secret=SECRET, authorize_url=base + mock.AUTHORIZE_PATH)
    cc = service(base, client_secret=SECRET)
    cfg = write_config(tmp_path / "c.yaml", {"state_dir": str(state_dir), "services": {"code": code, "cc": cc}})
    out = await asyncio.to_thread(run_cli, "login", "code", "--device", "-c", str(cfg), cwd=tmp_path)
    assert out.returncode == 2 and "device_authorization_url" in out.stderr
    out = await asyncio.to_thread(run_cli, "login", "cc", "--device", "-c", str(cfg), cwd=tmp_path)
    assert out.returncode == 2 and "client_credentials" in out.stderr
    assert not dev.requests

    def load(auth: dict[str, Any]) -> None:
        svc = {"upstream": "http://127.0.0.1:1/api", "auth": {"scheme": "oauth2", "token_url": "http://127.0.0.1:1/t", "client_id": "c", **auth}}
        load_config_text(yaml.safe_dump({"services": {"svc": svc}}), env={})

    with pytest.raises(ConfigError, match="device_authorization_url.*required"):
        load({"grant": "device_code", "client_auth": "none"})
    with pytest.raises(ConfigError, match="device_authorization_url.*only used"):
        load({"client_secret": "x", "device_authorization_url": "http://127.0.0.1:1/d"})
    with pytest.raises(ConfigError, match="device_authorization_url"):
        load({"grant": "device_code", "client_auth": "none", "device_authorization_url": "ftp://x/d"})
    with pytest.raises(ConfigError, match="authorize_url"):
        load({"grant": "device_code", "client_auth": "none", "device_authorization_url": "http://127.0.0.1:1/d", "authorize_url": "http://127.0.0.1:1/a"})
    load({"grant": "device_code", "client_auth": "none", "device_authorization_url": "http://127.0.0.1:1/d"})  # a public client


# --------------------------------------------------------------------------- in-process, on a fake clock


class FakeClock:
    """One clock for the client's polling and the mock's strictness; sleeping advances it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []
        self.on_sleep: Callable[[], None] = lambda: None

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        self.on_sleep()
        await asyncio.sleep(0)


async def test_default_interval_and_the_device_codes_lifetime_bound_the_wait(device_server, state_dir):
    base, st, dev = await device_server(clients=[mock.Client(CLIENT, methods=frozenset({"none"}))])
    clock = FakeClock()
    dev.clock, dev.interval, dev.expires_in = clock, 0, 12  # the reply names no interval: 5 s
    rt = open_runtime(state_dir, "svc", device_service(base, client_auth="none", client_secret=None))
    printed: list[str] = []
    try:
        with pytest.raises(CredentialError, match=r"expired \(after 12 s\)"):
            await rfc8628.login(rt.scheme, CliIO(out=printed.append), clock=clock, sleep=clock.sleep)
    finally:
        await rt.close(revoke=False)
    assert clock.slept == [5.0, 5.0, 2.0]  # never past the device code's lifetime
    assert [t - 1000.0 for t in dev.polls] == [5.0, 10.0] and dev.errors == ["authorization_pending"] * 2
    assert dev.methods == ["none"] and dev.requests[0] == {"client_id": CLIENT}


async def test_no_refresh_token_keeps_the_access_token_until_it_expires(device_server, proxy, state_dir):
    base, st, dev = await device_server(token_lifetime=3)
    dev.issue_refresh_tokens = False
    clock = FakeClock()
    dev.clock = clock
    svc = device_service(base)
    rt = open_runtime(state_dir, "svc", svc)
    printed: list[str] = []

    def approve() -> None:
        for rec in dev.codes.values():
            rec.status = "approved"

    clock.on_sleep = approve
    try:
        await rfc8628.login(rt.scheme, CliIO(out=printed.append), clock=clock, sleep=clock.sleep)
    finally:
        await rt.close(revoke=False)
    assert "no refresh token" in printed[-1]
    p = await proxy({"services": {"svc": svc}})
    status, got = await api(p, "/svc/a")
    assert status == 200 and st.token_requests == {device.GRANT_TYPE: 1}
    # Once it has expired, only a person can help.
    async def login_required() -> bool:
        status, body = await api(p, "/svc/a")
        return status == 503 and body["error"] == "login_required"

    await wait_for(login_required, timeout=10, interval=0.2)
    assert st.token_requests == {device.GRANT_TYPE: 1}


# --------------------------------------------------------------------------- the mock is strict


async def test_mock_is_strict_about_polling(device_server):
    base, st, dev = await device_server([mock.Client(CLIENT, secret=SECRET), mock.Client("other", secret="other-secret")])
    dev.interval = 30

    async def post(path: str, form: dict[str, str], auth: tuple[str, str] = (CLIENT, SECRET)) -> tuple[int, dict]:
        pair = f"{quote_plus(auth[0])}:{quote_plus(auth[1])}"  # RFC 6749 §2.3.1
        headers = {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
        async with aiohttp.ClientSession() as s:
            async with s.post(base + path, data=form, headers=headers) as r:
                return r.status, await r.json()

    async with aiohttp.ClientSession() as s:  # a confidential client must authenticate there too
        async with s.post(base + device.DEVICE_PATH, data={"client_id": CLIENT}) as r:
            assert r.status == 401 and (await r.json())["error"] == "invalid_client"
    status, codes = await post(device.DEVICE_PATH, {"scope": "read"})
    assert status == 200 and codes["interval"] == 30
    poll = {"grant_type": device.GRANT_TYPE, "device_code": codes["device_code"]}
    assert (await post(mock.TOKEN_PATH, poll))[1]["error"] == "slow_down"  # sooner than 30 s after issue
    assert (await post(mock.TOKEN_PATH, poll, ("other", "other-secret")))[1]["error"] == "invalid_grant"
    rec = dev.codes[codes["device_code"]]
    assert rec.interval == 35
    rec.last_poll -= 60
    assert (await post(mock.TOKEN_PATH, poll))[1]["error"] == "authorization_pending"
    await person(codes["verification_uri_complete"])
    rec.last_poll -= 60
    status, tokens = await post(mock.TOKEN_PATH, poll)
    assert status == 200 and tokens["refresh_token"] in st.refresh
    rec.last_poll -= 60
    assert (await post(mock.TOKEN_PATH, poll))[1]["error"] == "invalid_grant"  # once only
    assert device.GRANT_TYPE in mock.GRANTS


# --------------------------------------------------------------------------- a real server: oidc-provider

OIDC_DIR = Path(__file__).parent / "oidc"
FORM = re.compile(r"<form\b([^>]*)>(.*?)</form>", re.S | re.I)
FIELD = re.compile(r"<input\b([^>]*)>", re.I)
ATTR = re.compile(r'([\w-]+)\s*=\s*"([^"]*)"')


@pytest.fixture(scope="module")
def oidc_provider(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """node's oidc-provider (tests/oidc/: an exact version, the device flow on, one
    confidential client, refresh tokens with offline_access), installed with npm
    into a temp dir and run on a free loopback port; stopped by its PID."""
    import os
    import shutil
    import subprocess

    from tests.conftest import CAPTURED, free_port, secret, wait_port

    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the real-server test (.ci/run installs them)")
    major = int(subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip().lstrip("v").split(".")[0])
    if major < 20:
        pytest.skip(f"oidc-provider 9 needs node >= 20 (found {major})")
    work = tmp_path_factory.mktemp("oidc")
    for name in ("package.json", "server.js"):
        shutil.copy(OIDC_DIR / name, work / name)
    install = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--no-package-lock", "--loglevel=error"], cwd=work, capture_output=True, text=True, timeout=300
    )
    assert install.returncode == 0, f"npm install failed: {install.stderr[-1500:]}"
    port = free_port()
    client_secret = secret("oidc-" + os.urandom(16).hex())
    env = {**os.environ, "OIDC_PORT": str(port), "OIDC_CLIENT_ID": "authproxy-device", "OIDC_CLIENT_SECRET": client_secret}
    log = work / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([node, "server.js"], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port(port, timeout=30)
        yield f"http://127.0.0.1:{port}", "authproxy-device", client_secret
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        CAPTURED.extend(log.read_text(errors="replace").splitlines())


async def approve_in_a_browser(url: str) -> str:
    """The person: open verification_uri_complete and answer each page oidc-provider
    shows (confirm the code, sign in, consent) by submitting its form → the last page."""
    from urllib.parse import urljoin

    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:  # cookies on 127.0.0.1
        async with s.get(url) as r:
            page, here = await r.text(), str(r.url)
        for _ in range(8):
            form = FORM.search(page)
            if form is None:
                return page
            data = {}
            for field in FIELD.finditer(form.group(2)):
                attrs = dict(ATTR.findall(field.group(1)))
                if "name" in attrs and attrs.get("type") != "submit":
                    data[attrs["name"]] = html.unescape(attrs.get("value", ""))
            data.update({k: v for k, v in (("login", "person"), ("password", "any")) if k in data})
            if "confirm" in form.group(2) and "confirm" not in data:
                data["confirm"] = "yes"
            action = html.unescape(dict(ATTR.findall(form.group(1))).get("action", here))
            async with s.post(urljoin(here, action), data=data) as r:
                page, here = await r.text(), str(r.url)
                assert r.status < 400, page[-500:]
    raise AssertionError("the approval did not end")


async def test_device_login_against_oidc_provider(oidc_provider, proxy, state_dir, tmp_path, cli):
    from tests.conftest import secret

    base, client_id, client_secret = oidc_provider
    svc = {
        "upstream": base,  # its userinfo endpoint (/me) is the protected resource
        "auth": {
            "scheme": "oauth2",
            "grant": "device_code",
            "token_url": base + "/token",
            "device_authorization_url": base + "/device/auth",
            "client_id": client_id,
            "client_auth": "client_secret_basic",
            "client_secret": client_secret,
            "scope": "openid offline_access",
        },
    }
    cfg = write_config(tmp_path / "c.yaml", {"state_dir": str(state_dir), "services": {"svc": svc}})
    proc = cli("login", "svc", "-c", str(cfg))
    screen = Screen(proc)
    await screen.wait("Waiting")
    uri, user_code, complete = screen.instructions()
    assert uri == base + "/device" and complete and user_code in complete and QR_BLOCKS.search(screen.text)
    page = await approve_in_a_browser(complete)
    assert "Sign-in Success" in page, page[-500:]
    rc, out, err = await finish(proc, screen)  # it sends no interval: the first poll comes after 5 s
    assert rc == 0, err
    refresh = secret(json.loads((state_dir / "svc" / "refresh.json").read_text())["refresh_token"])
    assert refresh not in out + err and "Logged in" in out
    p = await proxy({"services": {"svc": svc}})
    status, got = await api(p, "/svc/me")
    assert status == 200 and got == {"sub": "person"}, got
