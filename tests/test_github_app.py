"""scheme: github_app — against the strict GitHub mock, through the proxy and the real CLI.

The app's JWT (claims checked by the mock), one token request for many
clients, ``expires_at`` honoured, a revoked token replaced and the request
replayed, GHES base paths, repositories/permissions narrowing and GitHub's
refusals (error state, not hammered), `authproxy token` / `run` / `logout`,
and configuration errors through `authproxy check`.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp
import jwt
import pytest
import yaml
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from authproxy.config import ConfigError, load_config_text
from authproxy.schemes.github_app import API_VERSION
from authproxy.testing import github as mock
from tests.conftest import free_port, http_get, run_cli, secret, wait_for, write_config

APP_ID = "4242"
CLIENT_ID = "Iv1.0123456789abcdef"
INSTALLATION = "777001"
REPOS = ("widgets", "gadgets", "docs")
GRANTED = {"issues": "write", "contents": "read", "metadata": "read"}


# --------------------------------------------------------------------------- helpers


def rsa_pem() -> tuple[bytes, bytes]:
    """(private PEM, public PEM), made now; a line of the private key joins the log scan."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    secret(private.decode().splitlines()[1])
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("keys")
    private, public = rsa_pem()
    other, _ = rsa_pem()
    (folder / "app.pem").write_bytes(private)
    (folder / "other.pem").write_bytes(other)
    return {"file": folder / "app.pem", "other": folder / "other.pem", "public": public, "private": private, "dir": folder}


@pytest.fixture
async def github(upstream: Callable, keys: dict[str, Any]) -> AsyncIterator[Callable[..., Any]]:
    """Start a mock GitHub; every token it issues joins the log scan at the end."""
    apps: list[web.Application] = []

    async def start(base: str = "", **options: Any) -> tuple[str, mock.GitHubState]:
        app = mock.make_app(
            apps=[mock.App(APP_ID, keys["public"], client_id=CLIENT_ID)],
            installations=[mock.Installation(INSTALLATION, APP_ID, "acme", REPOS, dict(GRANTED))],
            base=base,
            **options,
        )
        apps.append(app)
        return await upstream(app), app[mock.STATE]

    yield start
    for app in apps:
        for token in app[mock.STATE].tokens:
            secret(token)


def service(url: str, key_file: Path, **auth: Any) -> dict[str, Any]:
    return {"upstream": url, "auth": {"scheme": "github_app", "app_id": APP_ID, "private_key_file": str(key_file), "installation_id": INSTALLATION, **auth}}


async def api(p: Any, path: str, **kw: Any) -> tuple[int, Any]:
    async with p.request(kw.pop("method", "GET"), path, **kw) as r:
        body = await r.read()
        try:
            return r.status, json.loads(body)
        except ValueError:
            return r.status, body


def sign(private: bytes, alg: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    body = {"iat": now - 60, "exp": now + 540, "iss": APP_ID, **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, private if alg == "RS256" else "x" * 32, algorithm=alg)


# --------------------------------------------------------------------------- getting and using tokens


async def test_one_token_request_for_200_concurrent_requests(github, proxy, keys):
    url, st = await github()
    st.token_delay = 0.3  # every request arrives while the one token request is in flight
    p = await proxy({"services": {"gh": service(url, keys["file"])}})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one(i: int) -> int:
            headers = {"Authorization": "token client-made-up"} if i % 2 else {}
            async with s.get(f"{p.url}/gh/repos/acme/widgets/issues?page={i}", headers=headers) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one(i) for i in range(200)))
    assert statuses == [200] * 200
    assert st.token_requests == 1 and st.issued == 1 and st.api_ok == 200 and st.api_rejected == 0
    sent = st.request_headers[0]
    assert sent["Accept"] == "application/vnd.github+json" and sent["X-GitHub-Api-Version"] == API_VERSION
    assert st.request_bodies == [None]  # no repositories / permissions: no body
    status, doc = await p.get_json("/-/readyz")
    assert doc["services"]["gh"]["state"] == "ready" and 3500 < doc["services"]["gh"]["expires_in"] <= 3600


async def test_the_app_jwt_claims_as_github_checks_them(github, proxy, keys):
    url, st = await github()
    p = await proxy({"services": {"gh": service(url, keys["file"])}})
    before = int(time.time())
    assert (await api(p, "/gh/repos/acme/widgets/issues"))[0] == 200
    [claims] = st.jwt_claims
    assert set(claims) == {"iat", "exp", "iss"} and claims["iss"] == APP_ID
    assert claims["exp"] - claims["iat"] == 600  # GitHub's maximum, not more
    assert before - 61 <= claims["iat"] <= int(time.time()) - 59  # backdated 60 s against clock drift
    assert claims["exp"] <= int(time.time()) + 540


async def test_the_mock_refuses_what_github_refuses(github, keys):
    """The mock's strictness the scheme's tests rely on: a client bug must fail here."""
    url, st = await github()
    private, other = keys["private"], keys["other"].read_bytes()
    now = int(time.time())
    cases = [
        (None, 401, mock.BAD_JWT),
        ("not-a-jwt", 401, mock.BAD_JWT),
        (sign(private, alg="HS256"), 401, mock.BAD_JWT),
        (sign(other), 401, mock.BAD_JWT),  # signed by a key the app does not have
        (sign(private, iss="999999"), 404, "Integration not found"),
        (sign(private, iat=now + 120, exp=now + 500), 401, mock.BAD_IAT),
        (sign(private, iat=float(now)), 401, mock.BAD_IAT),
        (sign(private, iat=now - 60, exp=now + 541), 401, mock.FAR_EXP),  # exp - iat = 601
        (sign(private, iat=now, exp=now + 601), 401, mock.FAR_EXP),
        (sign(private, iat=now - 700, exp=now - 100), 401, mock.BAD_EXP),
        (sign(private, exp=None), 401, mock.BAD_EXP),
    ]
    async with aiohttp.ClientSession() as s:

        async def post(token: str | None, path: str = INSTALLATION, body: Any = None) -> tuple[int, dict]:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with s.post(f"{url}/app/installations/{path}/access_tokens", headers=headers, json=body) as r:
                return r.status, await r.json()

        for token, status, message in cases:
            got = await post(token)
            assert got[0] == status and got[1]["message"] == message and "documentation_url" in got[1], (token, got)
        assert (await post(sign(private, iss=CLIENT_ID)))[0] == 201  # the client id works as iss too
        assert (await post(sign(private), path="123"))[0] == 404  # not this app's installation
        assert (await post(sign(private), body={"repositories": ["secret-repo"]})) == (422, {"message": mock.BAD_REPOS, "documentation_url": mock.TOKEN_DOCS})
        assert (await post(sign(private), body={"permissions": {"contents": "write"}}))[1]["message"] == mock.BAD_PERMISSIONS
        assert (await post(sign(private), body={"scope": "all"}))[0] == 422
        status, doc = await post(sign(private), body={"repositories": ["docs"], "permissions": {"issues": "read"}})
        assert status == 201 and doc["token"].startswith("ghs_") and doc["permissions"] == {"issues": "read"}
        assert [r["full_name"] for r in doc["repositories"]] == ["acme/docs"] and doc["expires_at"].endswith("Z")
        for auth, code in ((f"token {doc['token']}", 200), (f"Bearer {doc['token']}", 200), ("Bearer ghs_unknown", 401), ("", 401)):
            async with s.get(f"{url}/repos/acme/docs/issues", headers={"Authorization": auth} if auth else {}) as r:
                assert r.status == code
        async with s.get(f"{url}/repos/acme/widgets/issues", headers={"Authorization": f"token {doc['token']}"}) as r:
            assert r.status == 404  # a repository the token does not cover
        async with s.delete(f"{url}/installation/token", headers={"Authorization": f"token {doc['token']}"}) as r:
            assert r.status == 204
        async with s.get(f"{url}/repos/acme/docs/issues", headers={"Authorization": f"token {doc['token']}"}) as r:
            assert r.status == 401 and (await r.json())["message"] == "Bad credentials"


async def test_expires_at_is_honoured_refreshed_before_expiry_without_a_failed_request(github, proxy, keys):
    url, st = await github(token_lifetime=3)  # refresh_margin 300 > lifetime / 2: renewed about every 1.5 s
    p = await proxy({"services": {"gh": service(url, keys["file"])}})
    failures, done = [], 0
    deadline = time.monotonic() + 20
    while st.issued < 4 and time.monotonic() < deadline:  # bounded: until a few refreshes happened
        status, got = await api(p, "/gh/repos/acme/widgets/issues")
        done += 1
        if status != 200:
            failures.append((status, got))
        await asyncio.sleep(0.02)
    assert st.issued >= 4, "no refresh ahead of expires_at"
    assert not failures and st.api_rejected == 0 and done > 20
    assert len(set(st.served)) >= 3  # the requests moved on to the new tokens


async def test_a_revoked_token_is_replaced_and_the_request_replayed_once(github, proxy, keys):
    url, st = await github()
    p = await proxy({"services": {"gh": service(url, keys["file"], permissions={"issues": "write"})}})
    assert (await api(p, "/gh/repos/acme/widgets/issues"))[0] == 200
    st.revoke_all()
    status, got = await api(p, "/gh/repos/acme/widgets/issues", method="POST", json={"title": "replayed"})
    assert status == 201 and got["title"] == "replayed"
    assert st.api_rejected == 1 and st.issued == 2 and st.served == [1, 2]
    async with p.request("GET", "/-/metrics") as r:
        assert 'authproxy_auth_retries_total{service="gh"} 1.0' in await r.text()


async def test_ghes_api_url_with_a_base_path(github, proxy, keys):
    url, st = await github(base="/api/v3")
    p = await proxy(
        {
            "services": {
                "ghe": service(url + "/api/v3", keys["file"]),  # api_url defaults to the upstream, base path included
                "ghe2": {**service(url + "/api/v3", keys["file"], api_url=url + "/api/v3/"), "prefix": "/ghe2"},
            }
        }
    )
    assert (await api(p, "/ghe/repos/acme/widgets/issues"))[0] == 200
    assert (await api(p, "/ghe2/repos/acme/gadgets/issues"))[0] == 200
    assert st.token_requests == 2 and not st.token_errors


async def test_repositories_and_permissions_reach_github_and_a_refusal_is_shown(github, proxy, keys):
    url, st = await github()
    p = await proxy(
        {
            "services": {
                "narrow": service(url, keys["file"], repositories=["widgets", "docs"], permissions={"issues": "read", "metadata": "read"}),
                "toomuch": service(url, keys["file"], permissions={"issues": "admin"}),
                "norepo": service(url, keys["file"], repositories=["private-elsewhere"]),
            }
        }
    )
    assert (await api(p, "/narrow/repos/acme/docs/issues"))[0] == 200
    assert (await api(p, "/narrow/repos/acme/gadgets/issues"))[0] == 404  # not in the token's repositories
    assert (await api(p, "/narrow/repos/acme/docs/issues", method="POST", json={"title": "x"}))[0] == 403  # issues: read
    # exactly what the config says, once (the other services' bodies are theirs)
    assert st.request_bodies.count({"repositories": ["widgets", "docs"], "permissions": {"issues": "read", "metadata": "read"}}) == 1
    assert {"permissions": {"issues": "admin"}} in st.request_bodies and {"repositories": ["private-elsewhere"]} in st.request_bodies

    async def refused() -> dict[str, Any] | None:
        status, doc = await p.get_json("/-/readyz")
        got = doc["services"]
        return got if status == 503 and got["toomuch"]["last_error"] and got["norepo"]["last_error"] else None

    got = await wait_for(refused)
    assert got["toomuch"]["state"] == "error" and mock.BAD_PERMISSIONS in got["toomuch"]["last_error"]
    assert "HTTP 422" in got["toomuch"]["last_error"] and "repositories or permissions" in got["toomuch"]["last_error"]
    assert got["norepo"]["state"] == "error" and mock.BAD_REPOS in got["norepo"]["last_error"]
    status, body = await api(p, "/toomuch/repos/acme/widgets/issues")
    assert status == 503 and body["error"] == "token_unavailable" and mock.BAD_PERMISSIONS in body["message"]


async def test_bad_key_or_wrong_app_id_is_an_error_not_hammered(github, proxy, keys):
    url, st = await github()
    p = await proxy(
        {
            "services": {
                "wrongkey": service(url, keys["other"]),
                "wrongapp": service(url, keys["file"], app_id="99999"),
                "noinst": service(url, keys["file"], installation_id="31337"),
            }
        }
    )

    async def all_failed() -> dict[str, Any] | None:
        status, doc = await p.get_json("/-/readyz")
        got = doc["services"]
        return got if all(got[n]["last_error"] for n in got) else None

    got = await wait_for(all_failed)
    assert {n: s["state"] for n, s in got.items()} == {"wrongkey": "error", "wrongapp": "error", "noinst": "error"}
    assert mock.BAD_JWT in got["wrongkey"]["last_error"] and "check app_id" in got["wrongkey"]["last_error"]
    assert "Integration not found" in got["wrongapp"]["last_error"] and "knows no app 99999" in got["wrongapp"]["last_error"]
    assert "installation 31337" in got["noinst"]["last_error"] and "HTTP 404" in got["noinst"]["last_error"]
    for name in got:
        for _ in range(5):  # clients keep asking; GitHub is not asked again
            async with p.request("GET", f"/{name}/repos/acme/widgets/issues") as r:
                assert r.status == 503 and int(r.headers["Retry-After"]) >= 8  # 10 s ± 20 % after a refusal
        assert p.server.runtimes[name].creds.health.retry_at - time.time() >= 7
    assert st.token_requests == 3


async def test_github_outage_backs_off_then_heals(github, proxy, keys):
    url, st = await github()
    st.fail(502, "<html><body>Unicorn! GitHub is having trouble</body></html>")
    p = await proxy({"services": {"gh": service(url, keys["file"])}})
    got = await wait_for(lambda: p.server.runtimes["gh"].creds.status().last_error)
    assert p.server.runtimes["gh"].creds.status().state == "backoff" and "HTTP 502" in got and "Unicorn" in got
    status, doc = await p.get_json("/-/readyz")
    assert status == 503 and doc["services"]["gh"]["state"] == "backoff"
    await wait_for(lambda: p.server.runtimes["gh"].creds.status().state == "ready", timeout=5)  # the first step is about 1 s
    assert (await api(p, "/gh/repos/acme/widgets/issues"))[0] == 200 and st.token_requests == 2


async def test_an_error_echoing_the_jwt_is_masked(upstream, proxy, keys):
    async def echo(request: web.Request) -> web.Response:
        sent = request.headers["Authorization"].removeprefix("Bearer ")
        secret(sent)
        return web.json_response({"message": f"Validation Failed for {sent}", "documentation_url": mock.DOCS}, status=422)

    app = web.Application()
    app.router.add_post("/app/installations/{id}/access_tokens", echo)
    url = await upstream(app)
    p = await proxy({"services": {"gh": service(url, keys["file"])}})
    err = await wait_for(lambda: p.server.runtimes["gh"].creds.status().last_error)
    assert "Validation Failed for ***" in err and "eyJ" not in err


# --------------------------------------------------------------------------- the real CLI


async def test_cli_token_then_run_reuses_it_exit_keeps_it_logout_revokes_it(github, keys, tmp_path, cli):
    url, st = await github()
    port = free_port()
    cfg = write_config(
        tmp_path / "authproxy.yaml",
        {"listen": f"127.0.0.1:{port}", "state_dir": str(tmp_path / "state"), "shutdown_timeout": 2, "services": {"gh": service(url, keys["file"], repositories=["widgets"])}},
    )
    r = await asyncio.to_thread(run_cli, "token", "gh", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    [token] = st.tokens
    assert r.stdout.strip() == token and token.startswith("ghs_")
    r = await asyncio.to_thread(run_cli, "token", "gh", "--json", "-c", str(cfg), cwd=tmp_path)
    assert json.loads(r.stdout) == {"headers": {"Authorization": f"Bearer {token}"}, "query": {}} and st.issued == 1
    proc = cli("run", "-c", str(cfg))
    await asyncio.to_thread(proc.wait_log, "listening")
    status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/gh/repos/acme/widgets/issues", 10)
    assert status == 200 and json.loads(body)[0]["number"] == 1
    assert st.issued == 1 and st.served == [1]  # the recorded token, reused by the proxy
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 20) == 0
    assert st.revocations == 0 and st.live(token)  # not revoked at exit: `authproxy token` printed it for someone
    r = await asyncio.to_thread(run_cli, "logout", "gh", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "revoked 1 credential" in r.stdout and st.revocations == 1 and st.live(token) is None
    assert token not in proc.log() and keys["private"].decode().splitlines()[1] not in proc.log()


def test_config_errors_via_check_exit_2(keys, tmp_path):
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "ec.pem").write_bytes(ec_key)
    (tmp_path / "public.pem").write_bytes(keys["public"])
    upstream_url = "https://api.github.com"
    for key_file, message in (
        (tmp_path / "missing.pem", "services.gh.auth.private_key_file: file"),
        (tmp_path / "ec.pem", "is an EC key; RS256 needs an RSA key"),
        (tmp_path / "public.pem", "holds no private key"),
    ):
        cfg = write_config(tmp_path / "c.yaml", {"services": {"gh": service(upstream_url, key_file)}})
        r = run_cli("check", "-c", str(cfg), cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr, (key_file, r.stderr)
        assert "BEGIN" not in r.stderr + r.stdout
    cfg = write_config(tmp_path / "ok.yaml", {"services": {"gh": service(upstream_url, keys["file"], repositories=["widgets"], permissions={"issues": "read"})}})
    r = run_cli("check", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 0 and "(gh: github_app)" in r.stdout, r.stderr
    cases = [
        ({"installation_id": "acme"}, "auth.installation_id: the installation's numeric id"),
        ({"app_id": ""}, "auth.app_id:"),
        ({"api_url": "ghe.example/api/v3"}, "auth.api_url: must be an absolute http(s) URL"),
        ({"repositories": ["acme/widgets"]}, "auth.repositories[0]: give the repository's name without its owner"),
        ({"permissions": {"issues": "delete"}}, "auth.permissions: issues: 'delete' must be one of read, write, admin"),
        ({"refresh_margin": -1}, "auth.refresh_margin: must not be negative"),
        ({"client_secret": "x"}, "auth.client_secret: unknown key"),
    ]
    for auth, message in cases:
        doc = {"services": {"gh": service(upstream_url, keys["file"], **auth)}}
        with pytest.raises(ConfigError) as e:
            load_config_text(yaml.safe_dump(doc), env={})
        assert message in str(e.value), (auth, str(e.value))
    doc = {"services": {"gh": service(upstream_url, keys["file"])}}
    del doc["services"]["gh"]["auth"]["installation_id"]
    with pytest.raises(ConfigError, match="auth.installation_id: required"):
        load_config_text(yaml.safe_dump(doc), env={})


async def test_the_private_key_is_never_shown(keys, tmp_path):
    from authproxy.runtime import ServiceRuntime
    from authproxy.store.statedir import StateDirStore

    cfg = load_config_text(yaml.safe_dump({"state_dir": str(tmp_path / "s"), "services": {"gh": service("https://api.github.com", keys["file"])}}), env={})
    rt = ServiceRuntime(cfg.services["gh"], StateDirStore(cfg.state_dir))
    try:
        shown = repr(rt.scheme) + repr(rt.scheme.config) + repr(rt.scheme.app_jwt())
        key_line = keys["private"].decode().splitlines()[1]
        assert key_line not in shown and "eyJ" not in shown and APP_ID in shown
    finally:
        await rt.close(revoke=False)


async def test_a_key_rotated_under_the_same_file_is_used_after_reload(github, proxy, keys, tmp_path):
    """SIGHUP re-reads private_key_file: GitHub lets an app hold a new key beside the old one."""
    key_file = tmp_path / "rotating.pem"
    key_file.write_bytes(keys["private"])
    url, st = await github()
    p = await proxy({"services": {"gh": service(url, key_file)}})
    assert (await api(p, "/gh/repos/acme/widgets/issues"))[0] == 200
    new_private, new_public = rsa_pem()
    st.apps[APP_ID].public_key_pem = new_public  # the old key deleted on GitHub, the new one registered
    key_file.write_bytes(new_private)
    rt = p.server.runtimes["gh"]
    await rt.scheme.reload()
    rt.creds.rejected(rt.creds.current())
    assert (await api(p, "/gh/repos/acme/widgets/issues"))[0] == 200
    assert st.issued == 2 and not st.token_errors


def test_the_example_config_block_loads_once_uncommented(keys):
    lines = (Path(__file__).resolve().parent.parent / "config.example.yaml").read_text().splitlines()
    start = lines.index("  # github-app:")
    block = []
    for ln in lines[start:]:
        if not ln.startswith("  # "):
            break
        block.append(ln.replace("  # ", "  ", 1))
    text = "services:\n" + "\n".join(block).replace("/run/secrets/github-app.pem", str(keys["file"])) + "\n"
    auth = load_config_text(text, env={}).services["github-app"].auth
    assert auth.app_id == "123456" and auth.installation_id == "12345678"
    assert auth.repositories == ("widgets",) and auth.permissions == {"issues": "read"} and auth.refresh_margin == 300
