"""scheme: oauth2 — against the strict mock authorization server, through the real proxy.

Client authentication (post, basic with §2.3.1 encoding, RFC 7523 assertions),
single-flight, proactive refresh, refresh-token rotation across restarts and
processes, login_required, `authproxy login` (loopback, the running proxy's
callback, oob), `token`/`logout`, rejection replay and token endpoint failures.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp
import pytest
import yaml
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from authproxy.config import ConfigError, load_config_text
from authproxy.runtime import ServiceRuntime
from authproxy.schemes.base import CliIO, CredentialError
from authproxy.store.statedir import StateDirStore
from authproxy.testing import oauth2 as mock
from tests.conftest import CAPTURED, free_port, run_cli, secret, wait_for, write_config

# A secret with every character §2.3.1 form-encoding exists for.
SECRET = secret("s3cr:t%2B+with space&=/ü")
CLIENT = "svc-client"
URL_RE = re.compile(r"https?://\S+")


# --------------------------------------------------------------------------- helpers


def pem_keys(kind: str) -> tuple[bytes, bytes]:
    """(private PEM, public PEM) made now: rsa-pkcs1, rsa-pkcs8, ec."""
    if kind == "ec":
        key: Any = ec.generate_private_key(ec.SECP256R1())
        fmt = serialization.PrivateFormat.TraditionalOpenSSL
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        fmt = serialization.PrivateFormat.TraditionalOpenSSL if kind == "rsa-pkcs1" else serialization.PrivateFormat.PKCS8
    private = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    secret(private.decode().strip().splitlines()[1])  # a line of the key must never be logged
    return private, public


@pytest.fixture
async def auth_server(upstream: Callable) -> AsyncIterator[Callable[..., Any]]:
    """Start a mock; every token and code it issues joins the log scan at the end."""
    apps: list[web.Application] = []

    async def start(clients: list[mock.Client] | None = None, **options: Any) -> tuple[str, mock.OAuth2State]:
        if clients is None:
            clients = [mock.Client(CLIENT, secret=SECRET)]
        app = mock.make_app(clients=clients, **options)
        apps.append(app)
        return await upstream(app), app[mock.STATE]

    yield start
    for app in apps:
        st = app[mock.STATE]
        for value in [*st.access, *st.refresh, *st.codes, *st.assertions]:
            secret(value)


def service(base: str, **auth: Any) -> dict[str, Any]:
    return {"upstream": base + mock.API_PATH, "auth": {"scheme": "oauth2", "token_url": base + mock.TOKEN_PATH, "client_id": CLIENT, **auth}}


def code_service(base: str, **auth: Any) -> dict[str, Any]:
    return service(
        base,
        grant="authorization_code",
        client_secret=SECRET,
        authorize_url=base + mock.AUTHORIZE_PATH,
        revocation_url=base + mock.REVOKE_PATH,
        **auth,
    )


def open_runtime(state_dir: Path, name: str, svc: dict[str, Any]) -> ServiceRuntime:
    cfg = load_config_text(yaml.safe_dump({"state_dir": str(state_dir), "services": {name: svc}}), env={})
    return ServiceRuntime(cfg.services[name], StateDirStore(cfg.state_dir))


def fetch_oob_code(url: str) -> str:
    """The person: open the authorize URL, read the code off the page."""
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback
        page = r.read().decode()
    m = re.search(r'id="code"[^>]*value="([^"]+)"', page)
    assert m, page
    return m.group(1)


async def login_oob(state_dir: Path, name: str, svc: dict[str, Any]) -> None:
    """`authproxy login` in-process with the oob redirect: the prompt is answered by
    opening the printed URL the way a person would."""
    printed: list[str] = []

    def ask(prompt: str) -> str:
        url = next(m.group(0) for line in printed for m in [URL_RE.search(line)] if m)
        return fetch_oob_code(url)

    rt = open_runtime(state_dir, name, svc)
    try:
        await rt.scheme.login(CliIO(out=printed.append, ask=ask))
    finally:
        await rt.close(revoke=False)


async def browse(url: str) -> tuple[int, str, str | None]:
    """A headless browser step: GET without following redirects → (status, body, Location)."""
    async with aiohttp.ClientSession() as s:
        async with s.get(url, allow_redirects=False) as r:
            return r.status, await r.text(), r.headers.get("Location")


async def read_url(stream: Any, timeout: float = 20) -> str:
    """The first URL a CLI subprocess prints on stdout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = await asyncio.wait_for(asyncio.to_thread(stream.readline), deadline - time.monotonic())
        if not line:
            raise AssertionError("the CLI closed stdout before printing a URL")
        m = URL_RE.search(line.decode() if isinstance(line, bytes) else line)
        if m:
            return m.group(0)
    raise AssertionError("no URL printed")


async def api(p: Any, path: str, **kw: Any) -> tuple[int, Any]:
    async with p.request(kw.pop("method", "GET"), path, **kw) as r:
        body = await r.read()
        try:
            return r.status, json.loads(body)
        except ValueError:
            return r.status, body


# --------------------------------------------------------------------------- client_credentials


@pytest.mark.parametrize("method", ["client_secret_post", "client_secret_basic"])
async def test_client_secret_methods_scope_and_extra_params(auth_server, proxy, method):
    base, st = await auth_server([mock.Client(CLIENT, secret=SECRET, methods=frozenset({method}))])
    p = await proxy({"services": {"svc": service(base, client_auth=method, client_secret=SECRET, scope="read write", extra_params={"audience": "https://api.example"})}})
    status, got = await api(p, "/svc/v1/apps?x=1", headers={"Authorization": "Bearer client-made-up"})
    assert status == 200, got
    assert got["client_id"] == CLIENT and got["scope"] == "read write" and got["path"] == "/api/v1/apps"
    assert st.token_requests == {"client_credentials": 1}
    sent = st.token_params[0]
    assert sent["scope"] == "read write" and sent["audience"] == "https://api.example"
    assert ("client_secret" in sent) == (method == "client_secret_post")


@pytest.mark.parametrize("kind,alg", [("rsa-pkcs1", "RS256"), ("rsa-pkcs8", "RS256"), ("ec", "ES256")])
async def test_private_key_jwt(auth_server, proxy, tmp_path, kind, alg):
    private, public = pem_keys(kind)
    key_file = tmp_path / "private-key.pem"
    key_file.write_bytes(private)
    base, st = await auth_server([mock.Client(CLIENT, public_key_pem=public, methods=frozenset({"private_key_jwt"}))])
    p = await proxy({"services": {"svc": service(base, client_auth="private_key_jwt", private_key_file=str(key_file), jwt_alg=alg, jwt_lifetime=30)}})
    assert (await api(p, "/svc/a"))[0] == 200
    # Each request is a fresh assertion: the mock refuses a jti it has seen.
    p.server.runtimes["svc"].creds.rejected(p.server.runtimes["svc"].creds.current())
    assert (await api(p, "/svc/b"))[0] == 200
    assert st.token_requests == {"client_credentials": 2} and not st.token_errors
    assert len(st.jtis) == 2


async def test_mock_is_strict_about_client_authentication(auth_server, tmp_path):
    """The checks the scheme's tests rely on: a client bug must fail here."""
    import base64

    import jwt

    private, public = pem_keys("rsa-pkcs8")
    base, st = await auth_server([mock.Client(CLIENT, secret=SECRET), mock.Client("jwt", public_key_pem=public, methods=frozenset({"private_key_jwt"}))])
    token_url = base + mock.TOKEN_PATH
    key = serialization.load_pem_private_key(private, None)

    def assertion(**claims: Any) -> str:
        now = int(time.time())
        body = {"iss": "jwt", "sub": "jwt", "aud": token_url, "iat": now, "nbf": now, "exp": now + 60, "jti": "j1", **claims}
        return jwt.encode(body, key, algorithm="RS256")

    async def post(form: dict[str, str], headers: dict[str, str] | None = None) -> tuple[int, dict]:
        async with aiohttp.ClientSession() as s:
            async with s.post(token_url, data=form, headers=headers) as r:
                return r.status, await r.json()

    jwt_form = {"grant_type": "client_credentials", "client_assertion_type": mock.ASSERTION_TYPE}
    assert (await post({**jwt_form, "client_assertion": assertion()}))[0] == 200
    for bad, why in [
        (assertion(), "jti seen before"),
        (assertion(jti="j2", aud="https://other.example/token"), "Audience"),
        (assertion(jti="j3", exp=int(time.time()) + 300), "longer than 120"),
        (assertion(jti="j4", sub="someone-else"), "sub must equal iss"),
    ]:
        status, body = await post({**jwt_form, "client_assertion": bad})
        assert status == 401 and body["error"] == "invalid_client" and why in body["error_description"], body
    raw = base64.b64encode(f"{CLIENT}:{SECRET}".encode()).decode()  # not form-encoded first: wrong per §2.3.1
    status, body = await post({"grant_type": "client_credentials"}, {"Authorization": f"Basic {raw}"})
    assert status == 401 and body["error"] == "invalid_client"
    status, body = await post({"grant_type": "client_credentials", "client_id": CLIENT, "client_secret": SECRET}, {"Authorization": f"Basic {raw}"})
    assert status == 400 and "more than one" in body["error_description"]


async def test_a_thousand_concurrent_first_requests_make_one_token_request(auth_server, proxy):
    base, st = await auth_server()
    st.token_delay = 0.5  # every request arrives while the one token request is in flight
    p = await proxy({"services": {"svc": service(base, client_secret=SECRET)}})
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def one(i: int) -> int:
            async with s.get(f"{p.url}/svc/item/{i}") as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one(i) for i in range(1000)))
    assert statuses == [200] * 1000
    assert st.token_requests == {"client_credentials": 1}
    assert st.api_ok == 1000


async def test_short_lived_token_is_refreshed_ahead_without_a_failed_request(auth_server, proxy):
    base, st = await auth_server(token_lifetime=2)  # refresh_margin 60 > lifetime/2: refreshed after 1 s
    p = await proxy({"services": {"svc": service(base, client_secret=SECRET)}})
    failures, done = [], 0
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        status, got = await api(p, "/svc/loop")
        done += 1
        if status != 200:
            failures.append((status, got))
        await asyncio.sleep(0.02)
    assert not failures and st.api_rejected == 0
    assert 4 <= st.token_requests["client_credentials"] <= 9  # about one a second, ahead of expiry
    assert done > 50


async def test_rejected_token_is_replaced_and_the_request_replayed_once(auth_server, proxy):
    base, st = await auth_server(token_lifetime=None)  # no expires_in: used until rejected
    st.token_type = "Bearer"  # compared case-insensitively
    p = await proxy({"services": {"svc": service(base, client_secret=SECRET)}})
    assert (await api(p, "/svc/a"))[0] == 200
    status, doc = await p.get_json("/-/readyz")
    assert doc["services"]["svc"] == {"state": "ready", "expires_in": None, "last_error": None}
    st.revoke_access_tokens()
    status, got = await api(p, "/svc/a", method="POST", data=b'{"x": 1}')
    assert status == 200 and got["token_serial"] == 2 and got["method"] == "POST"
    assert st.api_rejected == 1 and st.token_requests == {"client_credentials": 2}
    async with p.request("GET", "/-/metrics") as r:
        assert 'authproxy_auth_retries_total{service="svc"} 1.0' in await r.text()


async def test_token_endpoint_failures_back_off_with_the_servers_error(auth_server, proxy):
    """5xx with an RFC 6749 error, non-JSON, a timeout, a refusal, and an error that echoes the secret."""
    bases = {}
    for name in ("unavailable", "html", "slow", "refused", "echo", "mac"):
        bases[name] = await auth_server()
    bases["mac"][1].token_type = "mac"
    bases["unavailable"][1].fail(503, {"error": "temporarily_unavailable", "error_description": "maintenance until 10:00"})
    bases["html"][1].fail(502, "<html><body>Bad Gateway</body></html>")
    bases["slow"][1].token_delay = 2
    bases["echo"][1].fail(400, {"error": "invalid_request", "error_description": f"secret {SECRET} is malformed"})
    services = {
        name: {**service(base, client_secret=SECRET if name != "refused" else secret("wrong-secret-value")), "timeout": {"connect": 1, "total": 0.5}}
        for name, (base, _) in bases.items()
    }
    p = await proxy({"services": services})

    async def errors() -> dict[str, Any] | None:
        status, doc = await p.get_json("/-/readyz")
        got = doc["services"]
        return got if status == 503 and all(got[n]["last_error"] for n in services) else None

    got = await wait_for(errors, timeout=10)
    assert got["unavailable"]["state"] == "backoff"
    assert "503 temporarily_unavailable: maintenance until 10:00" in got["unavailable"]["last_error"]
    assert got["html"]["state"] == "backoff" and "HTTP 502" in got["html"]["last_error"] and "Bad Gateway" in got["html"]["last_error"]
    assert got["slow"]["state"] == "backoff" and "did not answer within" in got["slow"]["last_error"]
    assert got["refused"]["state"] == "error" and "401 invalid_client" in got["refused"]["last_error"]
    assert "invalid_request: secret *** is malformed" in got["echo"]["last_error"]
    assert got["mac"]["state"] == "error" and "type 'mac'" in got["mac"]["last_error"]
    assert SECRET not in json.dumps(got)
    status, body = await api(p, "/unavailable/x")
    assert status == 503 and body["error"] == "token_unavailable"
    # Backed off (the first step is about a second), then healed once the server answers again.
    await wait_for(lambda: p.server.runtimes["unavailable"].creds.status().state == "ready", timeout=5)
    status, body = await api(p, "/unavailable/x")
    assert status == 200
    assert bases["unavailable"][1].token_requests["client_credentials"] == 2
    assert bases["refused"][1].token_requests["client_credentials"] == 1  # a refusal waits about 10 s


def test_config_errors_name_the_key(tmp_path):
    base = "https://auth.example"
    rsa_private, _ = pem_keys("rsa-pkcs8")
    ec_private, _ = pem_keys("ec")
    (tmp_path / "rsa.pem").write_bytes(rsa_private)
    (tmp_path / "ec.pem").write_bytes(ec_private)
    (tmp_path / "public.pem").write_bytes(pem_keys("rsa-pkcs8")[1])
    encrypted = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    (tmp_path / "encrypted.pem").write_bytes(encrypted)
    cases = [
        ({"client_auth": "client_secret_basic"}, "auth.client_secret: required with client_auth: client_secret_basic"),
        ({"client_secret": "x", "jwt_lifetime": 121}, "auth.jwt_lifetime: must be 1..120"),
        ({"client_auth": "private_key_jwt", "private_key_file": str(tmp_path / "missing.pem")}, "auth.private_key_file: file"),
        ({"client_auth": "private_key_jwt", "private_key_file": str(tmp_path / "ec.pem")}, "is an EC key; RS256 needs an RSA key"),
        ({"client_auth": "private_key_jwt", "private_key_file": str(tmp_path / "rsa.pem"), "jwt_alg": "ES256"}, "is an RSA key; ES256 needs"),
        ({"client_auth": "private_key_jwt", "private_key_file": str(tmp_path / "public.pem")}, "holds no private key"),
        ({"client_auth": "private_key_jwt", "private_key_file": str(tmp_path / "encrypted.pem")}, "is encrypted"),
        ({"client_auth": "none"}, "auth.client_auth: none (a public client) works only with grant: authorization_code"),
        ({"client_secret": "x", "grant": "authorization_code"}, "auth.authorize_url: required with grant: authorization_code"),
        ({"client_secret": "x", "grant": "authorization_code", "authorize_url": base + "/a", "redirect_uri": "http://example.com:80/cb"}, "auth.redirect_uri: example.com is not a loopback address"),
        ({"client_secret": "x", "grant": "authorization_code", "authorize_url": base + "/a", "redirect_uri": "http://127.0.0.1/cb"}, "give an explicit port"),
        ({"client_secret": "x", "extra_params": {"client_id": "y"}}, "auth.extra_params: client_id is set by authproxy"),
        ({"client_secret": "x", "token_url": "/auth/token"}, "auth.token_url: must be an absolute http(s) URL"),
        ({"client_secret": "x", "issuer": base}, "auth.issuer: only used with grant: authorization_code"),
    ]
    for auth, message in cases:
        doc = {"services": {"svc": {"upstream": base, "auth": {"scheme": "oauth2", "token_url": base + "/token", "client_id": "c", **auth}}}}
        with pytest.raises(ConfigError) as e:
            load_config_text(yaml.safe_dump(doc), env={})
        assert message in str(e.value), (auth, str(e.value))
        assert "BEGIN" not in str(e.value)


# --------------------------------------------------------------------------- authorization_code: refresh and rotation


async def test_rotation_survives_a_restart_and_no_refresh_token_is_ever_reused(auth_server, proxy, state_dir):
    base, st = await auth_server(token_lifetime=2)
    svc = code_service(base)
    await login_oob(state_dir, "svc", svc)
    assert st.token_requests == {"authorization_code": 1}
    p1 = await proxy({"services": {"svc": svc}})
    assert (await api(p1, "/svc/a"))[0] == 200
    await wait_for(lambda: st.token_requests["refresh_token"] >= 2, timeout=6)
    assert (await api(p1, "/svc/a"))[0] == 200
    await p1.close()
    before = st.token_requests["refresh_token"]
    p2 = await proxy({"services": {"svc": svc}})  # a new process on the same state dir
    assert (await api(p2, "/svc/b"))[0] == 200
    await wait_for(lambda: st.token_requests["refresh_token"] >= before + 2, timeout=6)
    assert (await api(p2, "/svc/b"))[0] == 200
    assert st.refresh_reuse == 0 and not st.token_errors
    assert len(set(st.refresh_tokens_presented)) == len(st.refresh_tokens_presented)
    stored = json.loads((state_dir / "svc" / "refresh.json").read_text())["refresh_token"]
    assert st.valid_refresh_tokens() == [stored]


async def test_a_rotated_refresh_token_the_state_dir_refused_is_kept_and_used_next(auth_server, state_dir, monkeypatch):
    """The new refresh token is stored before the access token is used; if the store
    fails, the access token is held back and the unsaved refresh token is used next."""
    from authproxy.credentials import Unavailable
    from authproxy.store.base import StoreError

    base, st = await auth_server()
    svc = code_service(base)
    await login_oob(state_dir, "svc", svc)
    rt = open_runtime(state_dir, "svc", svc)
    try:
        store = rt.ctx.store
        real_put = store.put

        async def failing_put(name: str, doc: Any, **kw: Any) -> None:
            raise StoreError("cannot write refresh.json: No space left on device")

        monkeypatch.setattr(store, "put", failing_put)
        with pytest.raises(Unavailable, match="cannot store the new refresh token"):
            await rt.creds.get()
        assert st.token_requests["refresh_token"] == 1 and st.api_ok == 0
        monkeypatch.setattr(store, "put", real_put)
        cred = await rt.scheme.obtain(None)  # the next attempt (the manager's backoff skipped)
        assert cred.token.reveal() in st.access
    finally:
        await rt.close(revoke=False)
    assert st.refresh_reuse == 0 and not st.token_errors
    stored = json.loads((state_dir / "svc" / "refresh.json").read_text())["refresh_token"]
    assert st.valid_refresh_tokens() == [stored]


async def test_proxy_and_cli_token_share_the_rotating_refresh_token(auth_server, proxy, state_dir, tmp_path):
    base, st = await auth_server(token_lifetime=2)
    svc = code_service(base)
    await login_oob(state_dir, "svc", svc)
    p = await proxy({"services": {"svc": svc}})
    cfg = write_config(tmp_path / "c.yaml", {"state_dir": str(state_dir), "services": {"svc": svc}})
    for _ in range(3):
        status, _ = await api(p, "/svc/a")
        assert status == 200
        out = await asyncio.to_thread(run_cli, "token", "svc", "-c", str(cfg), cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() in st.access
    assert st.refresh_reuse == 0 and not st.token_errors
    assert len(set(st.refresh_tokens_presented)) == len(st.refresh_tokens_presented)


async def test_invalid_grant_means_login_required_for_that_service_only(auth_server, proxy, state_dir):
    base, st = await auth_server()
    svc = code_service(base)
    await login_oob(state_dir, "coded", svc)
    p = await proxy({"services": {"coded": svc, "other": service(base, client_secret=SECRET)}})
    assert (await api(p, "/coded/a"))[0] == 200
    st.revoke_grants()  # e.g. the person revoked access in the provider's console
    status, body = await api(p, "/coded/a")
    assert status == 503 and body["error"] == "login_required"
    assert "authproxy login coded" in body["message"] and "invalid_grant" in body["message"]
    status, doc = await p.get_json("/-/readyz")
    assert status == 503
    assert doc["services"]["coded"]["state"] == "login_required"
    assert doc["services"]["other"]["state"] == "ready"
    assert (await api(p, "/other/a"))[0] == 200
    refreshes = st.token_requests["refresh_token"]
    for _ in range(5):  # no network while nothing changed
        assert (await api(p, "/coded/a"))[0] == 503
    assert st.token_requests["refresh_token"] == refreshes
    # A new login (another process) heals it without a request or a restart.
    await login_oob(state_dir, "coded", svc)
    await wait_for(lambda: p.server.runtimes["coded"].creds.status().state == "ready", timeout=6)
    assert (await api(p, "/coded/a"))[0] == 200
    assert st.refresh_reuse == 0


# --------------------------------------------------------------------------- authproxy login


async def test_login_headless_over_a_loopback_redirect(auth_server, tmp_path, cli):
    base, st = await auth_server(issuer="https://issuer.example")
    port = free_port()
    svc = code_service(base, redirect_uri=f"http://127.0.0.1:{port}/callback", issuer="https://issuer.example", scope="read offline_access")
    cfg = write_config(tmp_path / "c.yaml", {"state_dir": str(tmp_path / "state"), "services": {"svc": svc}})
    proc = cli("login", "svc", "-c", str(cfg))
    url = await read_url(proc.proc.stdout)
    assert "code_challenge_method=S256" in url and "state=" in url
    status, _, location = await browse(url)
    assert status == 302 and location.startswith(f"http://127.0.0.1:{port}/callback?code=")
    assert "iss=https%3A%2F%2Fissuer.example" in location
    # A forged response (wrong state) is refused and does not end the login.
    forged = re.sub(r"state=[^&]+", "state=forged", location)
    status, page, _ = await browse(forged)
    assert status == 400 and "state mismatch" in page
    status, page, _ = await browse(location)
    assert status == 200 and "Logged in" in page
    assert await asyncio.to_thread(proc.wait, 20) == 0
    rest = proc.proc.stdout.read().decode()
    assert "Logged in" in rest
    assert st.token_requests == {"authorization_code": 1}
    assert st.token_params[0]["redirect_uri"] == f"http://127.0.0.1:{port}/callback"
    assert st.token_params[0]["code_verifier"] == "***"
    stored = json.loads((tmp_path / "state" / "svc" / "refresh.json").read_text())
    assert stored["refresh_token"] in st.refresh
    assert (tmp_path / "state" / "svc" / "refresh.json").stat().st_mode & 0o777 == 0o600


async def test_login_completed_by_the_running_proxys_callback(auth_server, proxy, state_dir, tmp_path, cli):
    base, st = await auth_server()
    port = free_port()
    svc = code_service(base, redirect_uri=f"http://127.0.0.1:{port}/-/callback/svc")
    p = await proxy({"listen": f"127.0.0.1:{port}", "services": {"svc": svc}})
    status, body = await api(p, "/svc/a")
    assert status == 503 and body["error"] == "login_required"
    cfg = write_config(tmp_path / "c.yaml", {"listen": f"127.0.0.1:{port}", "state_dir": str(state_dir), "services": {"svc": svc}})
    proc = cli("login", "svc", "-c", str(cfg))
    url = await read_url(proc.proc.stdout)
    _, _, location = await browse(url)
    assert location.startswith(f"http://127.0.0.1:{port}/-/callback/svc?")
    status, page, _ = await browse(re.sub(r"state=[^&]+", "state=forged", location))
    assert status == 400
    status, page, _ = await browse(location)
    assert status == 200 and "Logged in" in page, page
    assert await asyncio.to_thread(proc.wait, 20) == 0
    assert "running authproxy" in proc.proc.stdout.read().decode()
    await wait_for(lambda: p.server.runtimes["svc"].creds.status().state == "ready", timeout=5)
    status, got = await api(p, "/svc/a")
    assert status == 200
    assert st.token_requests == {"authorization_code": 1}  # the login's own access token is used first
    assert not (state_dir / "svc" / "login.json").exists()
    status, page, _ = await browse(location)  # a replayed response finds no pending login
    assert status == 400


async def test_login_oob_reads_the_pasted_code_from_stdin(auth_server, tmp_path):
    base, st = await auth_server()
    svc = code_service(base)  # redirect_uri defaults to the oob URN
    cfg = write_config(tmp_path / "c.yaml", {"state_dir": str(tmp_path / "state"), "services": {"svc": svc}})
    proc = subprocess.Popen(
        [sys.executable, "-m", "authproxy", "login", "svc", "-c", str(cfg)],
        cwd=tmp_path, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        url = await read_url(proc.stdout)
        code = await asyncio.to_thread(fetch_oob_code, url)
        out, err = await asyncio.to_thread(proc.communicate, (code + "\n").encode(), 20)
    finally:
        if proc.poll() is None:
            proc.kill()
    CAPTURED.extend(err.decode().splitlines())
    assert proc.returncode == 0, err
    assert b"Logged in" in out
    assert st.token_requests == {"authorization_code": 1}
    assert json.loads((tmp_path / "state" / "svc" / "refresh.json").read_text())["refresh_token"] in st.refresh


async def test_login_rejects_a_response_from_another_issuer(auth_server, state_dir):
    base, st = await auth_server()
    st.iss_override = "https://evil.example"
    port = free_port()
    svc = code_service(base, redirect_uri=f"http://127.0.0.1:{port}/callback", issuer=base)
    printed: list[str] = []
    rt = open_runtime(state_dir, "svc", svc)
    try:
        login = asyncio.ensure_future(rt.scheme.login(CliIO(out=printed.append, ask=lambda _: "")))
        url = await wait_for(lambda: next((m.group(0) for line in printed for m in [URL_RE.search(line)] if m), None))
        status, page, location = await browse(url)
        assert status == 302, page
        status, page, _ = await browse(location)
        assert status == 400 and "mix-up" in page
        with pytest.raises(CredentialError, match="evil.example"):
            await asyncio.wait_for(login, 10)
    finally:
        await rt.close(revoke=False)
    assert st.token_requests["authorization_code"] == 0  # the code was never exchanged
    assert not (state_dir / "svc" / "refresh.json").exists()


async def test_token_and_logout_commands(auth_server, state_dir, tmp_path):
    base, st = await auth_server()
    svc = code_service(base)
    await login_oob(state_dir, "svc", svc)
    cfg = write_config(tmp_path / "c.yaml", {"state_dir": str(state_dir), "services": {"svc": svc}})
    out = await asyncio.to_thread(run_cli, "token", "svc", "-c", str(cfg), cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() in st.access
    out = await asyncio.to_thread(run_cli, "token", "svc", "--json", "-c", str(cfg), cwd=tmp_path)
    exported = json.loads(out.stdout)
    assert exported["headers"]["Authorization"].removeprefix("Bearer ") in st.access and exported["query"] == {}
    out = await asyncio.to_thread(run_cli, "logout", "svc", "-c", str(cfg), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert st.revocations == ["refresh_token"] and not st.valid_refresh_tokens()
    assert not (state_dir / "svc" / "refresh.json").exists()
    out = await asyncio.to_thread(run_cli, "token", "svc", "-c", str(cfg), cwd=tmp_path)
    assert out.returncode == 1 and "authproxy login svc" in out.stderr
    cc = write_config(tmp_path / "cc.yaml", {"state_dir": str(state_dir), "services": {"cc": service(base, client_secret=SECRET)}})
    out = await asyncio.to_thread(run_cli, "login", "cc", "-c", str(cc), cwd=tmp_path)
    assert out.returncode == 2 and "authorization_code" in out.stderr
