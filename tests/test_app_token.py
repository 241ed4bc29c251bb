"""The app_token scheme against the strict Enfix-style mock: login, on-behalf-of,
renewal, replay, expiry at exit, restart reuse, rotation — through the real proxy
(in-process) and the real CLI (subprocesses)."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from authproxy.config import ConfigError, load_config_text
from authproxy.testing import enfix
from authproxy.testing.enfix import STATE, EnfixState
from tests.conftest import free_port, http_get, run_cli, secret, wait_for, write_config

APP_TOKEN = secret("enfix-app-token-7f3a9c2e1b")
USER = "svc-user"
PASSWORD = secret("enfix-pa55word-Q8z")
ALICE, BOB, CAROL = "a1" * 12, "b2" * 12, "c3" * 12
MALLORY = "dd" * 12
API = "/enfix/api/v1"

Start = Callable[..., Awaitable[tuple[str, EnfixState]]]


@pytest.fixture
async def mock(upstream: Any) -> AsyncIterator[Start]:
    """Start an Enfix mock; every token it issued joins the log scan at the end."""
    states: list[EnfixState] = []

    async def start(**options: Any) -> tuple[str, EnfixState]:
        options.setdefault("app_token", APP_TOKEN)
        options.setdefault("users", {USER: PASSWORD})
        app = enfix.make_app(**options)
        url = await upstream(app)
        states.append(app[STATE])
        return url, app[STATE]

    yield start
    for st in states:
        for value in [*st.tokens, *st.app_tokens]:
            secret(value)


def service(url: str, **auth: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"scheme": "app_token", "app_token": APP_TOKEN, "username": USER, "password": PASSWORD}
    base.update(auth)
    return {"upstream": url, "auth": {k: v for k, v in base.items() if v is not None}}


async def ready(p: Any, name: str = "enfix") -> None:
    async def check() -> bool:
        _, doc = await p.get_json("/-/readyz")
        return doc["services"][name]["state"] == "ready"

    await wait_for(check, 10)


# --------------------------------------------------------------------------- configuration


def test_config_needs_token_or_username_and_password() -> None:
    def load(auth: dict[str, Any]) -> Any:
        doc = {"services": {"e": {"upstream": "http://127.0.0.1:1", "auth": {"scheme": "app_token", "app_token": "a", **auth}}}}
        return load_config_text(json.dumps(doc), env={})

    with pytest.raises(ConfigError, match=r"services\.e\.auth\.username: required"):
        load({})
    with pytest.raises(ConfigError, match=r"services\.e\.auth\.password: required"):
        load({"username": "u"})
    with pytest.raises(ConfigError, match=r"services\.e\.auth\.token: give either"):
        load({"token": "t", "username": "u"})
    with pytest.raises(ConfigError, match=r"services\.e\.auth\.obo\.seconds_until_expire: must be greater than 0"):
        load({"token": "t", "obo": {"seconds_until_expire": 0}})
    with pytest.raises(ConfigError, match=r"services\.e\.auth\.obo\.bogus: unknown key"):
        load({"token": "t", "obo": {"bogus": 1}})
    cfg = load({"username": "u", "password": "p", "obo": {"allow_users": ["*"]}}).services["e"].auth
    assert cfg.login_path == "/api/v1/token/" and cfg.token_lifetime == 86400 and cfg.refresh_margin == 300
    assert cfg.obo.allow_users == ("*",) and cfg.obo.seconds_until_expire == 86400 and cfg.expire_on_exit is True
    assert "'a'" not in repr(cfg)


# --------------------------------------------------------------------------- login and injection


async def test_200_concurrent_first_requests_make_one_login_and_headers_are_replaced(mock: Start, proxy: Any) -> None:
    url, st = await mock(login_delay=0.3)
    p = await proxy({"services": {"enfix": service(url)}})

    async def one(i: int) -> int:
        headers = {"Token": "client-token", "App-Token": "client-app"} if i % 2 else {}
        async with p.request("GET", f"{API}/projects/?n={i}", headers=headers) as r:
            await r.read()
            return r.status

    statuses = await asyncio.gather(*(one(i) for i in range(200)))
    assert statuses == [200] * 200
    assert st.logins == 1
    [token] = st.issued
    assert len(st.requests) == 200
    for seen in st.requests:
        assert (seen["app_token"], seen["token"], seen["via"]) == (APP_TOKEN, token, "login")
        assert seen["header_names"].count("token") == 1 and seen["header_names"].count("app-token") == 1


async def test_401_logs_in_again_and_replays_once(mock: Start, proxy: Any) -> None:
    url, st = await mock()
    p = await proxy({"services": {"enfix": service(url)}})
    async with p.request("POST", f"{API}/notes/", json={"n": 1}) as r:
        assert r.status == 200
    st.kill_user(USER)
    async with p.request("POST", f"{API}/notes/", json={"n": 2}) as r:
        assert r.status == 200
        assert (await r.json())["body"] == '{"n": 2}'
    assert st.logins == 2
    assert [json.loads(q["body"])["n"] for q in st.requests] == [1, 2]  # the 401'd attempt never reached the resource


async def test_bad_password_is_error_in_readyz_and_backed_off(mock: Start, proxy: Any) -> None:
    url, st = await mock()
    p = await proxy({"services": {"enfix": service(url, password=secret("wrong-pa55word-X1"))}})

    async def errored() -> Any:
        status, doc = await p.get_json("/-/readyz")
        return status == 503 and doc["services"]["enfix"]["state"] == "error" and doc

    doc = await wait_for(errored, 10)
    err = doc["services"]["enfix"]["last_error"]
    assert "401" in err and "Invalid username/password" in err
    for _ in range(5):
        async with p.request("GET", f"{API}/x/") as r:
            assert r.status == 503 and r.headers["X-Authproxy-Error"] == "token_unavailable" and "Retry-After" in r.headers
    assert st.login_failures == 1 and st.logins == 0  # a wrong password is not hammered


async def test_user_token_with_3s_server_lifetime_is_renewed_without_a_failed_request(mock: Start, proxy: Any) -> None:
    url, st = await mock(user_token_lifetime=3)
    p = await proxy({"services": {"enfix": service(url, token_lifetime=3)}})
    failures: list[int] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 8

    async def client() -> int:
        n = 0
        while loop.time() < deadline:
            async with p.request("GET", f"{API}/projects/") as r:
                await r.read()
                if r.status != 200:
                    failures.append(r.status)
            n += 1
            await asyncio.sleep(0.01)
        return n

    counts = await asyncio.gather(*(client() for _ in range(4)))
    assert failures == []
    assert sum(counts) > 100
    assert st.logins >= 5  # re-login every 1.5 s (refresh_margin capped at half the lifetime)
    # every replaced token still valid was expired at once (the last one or two may be in flight)
    replaced = st.issued[:-1]
    assert len(set(replaced) & set(st.expired)) >= len(replaced) - 1


# --------------------------------------------------------------------------- on behalf of


async def test_100_concurrent_requests_for_each_of_3_obo_users_make_3_creations(mock: Start, proxy: Any) -> None:
    url, st = await mock(obo_delay=0.3)
    p = await proxy({"services": {"enfix": service(url, obo={"allow_users": [ALICE, BOB, CAROL], "seconds_until_expire": 600})}})

    async def one(user: str) -> str:
        async with p.request("GET", f"{API}/me/", headers={"X-Authproxy-On-Behalf-Of": user}) as r:
            assert r.status == 200
            return (await r.json())["user_id"]

    users = [u for u in (ALICE, BOB, CAROL) for _ in range(100)]
    seen = await asyncio.gather(*(one(u) for u in users))
    assert seen == users
    assert dict(st.obo_created) == {ALICE: 1, BOB: 1, CAROL: 1}
    assert st.logins == 1
    for req in st.requests:
        assert req["via"] == "obo" and req["app_token"] == APP_TOKEN
        assert "x-authproxy-on-behalf-of" not in req["header_names"]


async def test_forbidden_obo_never_reaches_the_upstream(mock: Start, proxy: Any) -> None:
    url, st = await mock()
    p = await proxy(
        {
            "services": {
                "enfix": service(url, obo={"allow_users": [ALICE]}),
                "plain": {**service(url), "prefix": "/plain"},
            }
        }
    )
    await ready(p)
    await ready(p, "plain")
    logins = st.logins
    for path, user in ((f"{API}/x/", MALLORY), ("/plain/api/v1/x/", ALICE)):
        async with p.request("GET", path, headers={"X-Authproxy-On-Behalf-Of": user}) as r:
            assert r.status == 403
            assert r.headers["X-Authproxy-Error"] == "obo_forbidden"
            assert (await r.json())["error"] == "obo_forbidden"
    assert st.requests == [] and not st.obo_created and st.logins == logins


async def test_obo_id_the_upstream_rejects_gets_the_upstream_error_back(mock: Start, proxy: Any) -> None:
    url, st = await mock()
    p = await proxy({"services": {"enfix": service(url, obo={"allow_users": ["*"]})}})
    async with p.request("GET", f"{API}/x/", headers={"X-Authproxy-On-Behalf-Of": "not-a-hex-id"}) as r:
        assert r.status == 400
        assert "X-Authproxy-Error" not in r.headers
        assert await r.json() == {"errors": {"user": enfix.BAD_IDS}}
    assert not st.obo_created and st.requests == []
    async with p.request("GET", f"{API}/x/", headers={"X-Authproxy-On-Behalf-Of": BOB}) as r:
        assert r.status == 200 and (await r.json())["user_id"] == BOB


async def test_401_on_an_obo_request_recreates_that_users_token(mock: Start, proxy: Any) -> None:
    url, st = await mock()
    p = await proxy({"services": {"enfix": service(url, obo={"allow_users": [ALICE, BOB]})}})
    obo = {"X-Authproxy-On-Behalf-Of": ALICE}
    for user in (ALICE, BOB):
        async with p.request("GET", f"{API}/x/", headers={"X-Authproxy-On-Behalf-Of": user}) as r:
            assert r.status == 200
    st.kill(st.requests[0]["token"])
    async with p.request("POST", f"{API}/x/", headers=obo, data=b"payload") as r:
        assert r.status == 200 and (await r.json())["body"] == "payload"
    assert dict(st.obo_created) == {ALICE: 2, BOB: 1} and st.logins == 1


# --------------------------------------------------------------------------- the real CLI


def cli_config(tmp_path: Path, url: str, port: int = 0, **services: dict[str, Any]) -> Path:
    doc = {
        "listen": f"127.0.0.1:{port or free_port()}",
        "state_dir": str(tmp_path / "state"),
        "shutdown_timeout": 2,
        "services": services or {"enfix": service(url, obo={"allow_users": [ALICE, BOB]})},
    }
    return write_config(tmp_path / "authproxy.yaml", doc)


async def serve(cli: Any, cfg: Path) -> tuple[Any, str]:
    proc = cli("run", "-c", str(cfg))
    text = await asyncio.to_thread(proc.wait_log, "listening")
    address = text.split("listening address=", 1)[1].split()[0]
    return proc, f"http://{address}"


async def get(url: str, **headers: str) -> tuple[int, Any]:
    status, body = await asyncio.to_thread(http_get, url, 10, headers)
    return status, json.loads(body)


async def cli_run(tmp_path: Path, cfg: Path, *args: str) -> Any:
    return await asyncio.to_thread(run_cli, *args, "-c", str(cfg), cwd=tmp_path)


async def test_sigterm_expires_exactly_the_tokens_authproxy_created(tmp_path: Path, mock: Start, cli: Any) -> None:
    url, st = await mock()
    fixed = st.issue(USER)  # a token made in the web UI: given to authproxy, never expired by it
    secret(fixed)
    cfg = cli_config(
        tmp_path,
        url,
        enfix=service(url, obo={"allow_users": [ALICE, BOB]}),
        fixed={**service(url, username=None, password=None, token=fixed, obo={"allow_users": ["*"]}), "prefix": "/fixed"},
    )
    proc, base = await serve(cli, cfg)
    for path, user in ((API, None), (API, ALICE), (API, BOB), ("/fixed/api/v1", None), ("/fixed/api/v1", CAROL)):
        headers = {"X-Authproxy-On-Behalf-Of": user} if user else {}
        status, doc = await get(f"{base}{path}/x/", **headers)
        assert status == 200, doc
    created = set(st.issued)
    assert len(created) == 4 and fixed not in created  # 1 login + 3 OBO tokens
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 20) == 0
    assert set(st.expired) == created and len(st.expired) == 4
    assert st.valid_tokens() == [fixed]


async def test_kill_9_then_restart_reuses_the_recorded_tokens(tmp_path: Path, mock: Start, cli: Any) -> None:
    url, st = await mock()
    cfg = cli_config(tmp_path, url)
    proc, base = await serve(cli, cfg)
    assert (await get(f"{base}{API}/x/"))[0] == 200
    assert (await get(f"{base}{API}/x/", **{"X-Authproxy-On-Behalf-Of": ALICE}))[0] == 200
    proc.signal(signal.SIGKILL)
    assert await asyncio.to_thread(proc.wait, 20) == -signal.SIGKILL
    proc2, base = await serve(cli, cfg)
    assert (await get(f"{base}{API}/x/"))[0] == 200
    assert (await get(f"{base}{API}/x/", **{"X-Authproxy-On-Behalf-Of": ALICE}))[0] == 200
    assert st.logins == 1 and dict(st.obo_created) == {ALICE: 1}
    assert len({r["token"] for r in st.requests}) == 2
    # the manager's refresh and the next exit use the recorded expiry, so they are still expired at exit
    proc2.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc2.wait, 20) == 0
    assert set(st.expired) == set(st.issued)


async def test_token_cli_prints_user_and_obo_tokens_and_logout_expires_them(tmp_path: Path, mock: Start) -> None:
    url, st = await mock()
    cfg = cli_config(tmp_path, url)
    r = await cli_run(tmp_path, cfg, "token", "enfix")
    assert r.returncode == 0, r.stderr
    [user_token] = st.issued
    assert r.stdout.strip() == user_token
    r = await cli_run(tmp_path, cfg, "token", "enfix", "--obo", ALICE, "--json")
    assert r.returncode == 0, r.stderr
    obo_token = st.issued[-1]
    assert json.loads(r.stdout) == {"headers": {"App-Token": APP_TOKEN, "Token": obo_token}, "query": {}}
    r = await cli_run(tmp_path, cfg, "token", "enfix", "--obo", ALICE)
    assert r.stdout.strip() == obo_token and st.logins == 1 and st.obo_created[ALICE] == 1  # reused from the state dir
    r = await cli_run(tmp_path, cfg, "token", "enfix", "--obo", MALLORY)
    assert r.returncode == 2 and "allow_users" in r.stderr and not st.obo_created[MALLORY]
    r = await cli_run(tmp_path, cfg, "logout", "enfix")
    assert r.returncode == 0, r.stderr
    assert "revoked 2 credentials" in r.stdout
    assert set(st.expired) == {user_token, obo_token} and st.valid_tokens() == []


async def test_rotate_expire_old_then_sighup_keeps_the_proxy_working(tmp_path: Path, mock: Start, cli: Any) -> None:
    url, st = await mock()
    cfg = cli_config(tmp_path, url)
    proc, base = await serve(cli, cfg)
    assert (await get(f"{base}{API}/x/"))[0] == 200
    assert (await get(f"{base}{API}/x/", **{"X-Authproxy-On-Behalf-Of": ALICE}))[0] == 200
    r = await cli_run(tmp_path, cfg, "rotate", "enfix", "--seconds", "3600", "--expire-old")
    assert r.returncode == 0, r.stderr
    [new] = [t for t in st.app_tokens if t != APP_TOKEN]
    secret(new)
    assert new not in r.stdout and APP_TOKEN not in r.stdout
    assert "expired the previous app token (the configured app_token)" in r.stdout
    assert not st.app_token_valid(APP_TOKEN) and st.app_token_valid(new)
    assert st.app_tokens_created == 1
    stored = json.loads((tmp_path / "state" / "enfix" / "app_token.json").read_text())
    assert stored["app_token"] == new
    proc.signal(signal.SIGHUP)
    await asyncio.to_thread(proc.wait_log, "app_token_changed")
    before = len(st.requests)
    for headers in ({}, {"X-Authproxy-On-Behalf-Of": ALICE}, {"X-Authproxy-On-Behalf-Of": BOB}):
        status, doc = await get(f"{base}{API}/x/", **headers)
        assert status == 200, doc
    assert [q["app_token"] for q in st.requests[before:]] == [new] * 3
    logins = st.logins
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 20) == 0
    assert st.logins == logins
    assert st.valid_tokens() == []  # the user and OBO tokens were expired with the new app token
    # a restart reads the stored app token (the configured one is dead now)
    proc2, base = await serve(cli, cfg)
    assert (await get(f"{base}{API}/x/"))[0] == 200
    assert st.requests[-1]["app_token"] == new
    proc2.signal(signal.SIGTERM)  # here, not in the fixture: the mock shares this event loop
    assert await asyncio.to_thread(proc2.wait, 20) == 0


async def test_rotate_without_expire_old_leaves_the_old_app_token_and_a_running_proxy_heals_on_401(
    tmp_path: Path, mock: Start, proxy: Any
) -> None:
    url, st = await mock()
    cfg = cli_config(tmp_path, url)
    p = await proxy({"services": {"enfix": service(url, obo={"allow_users": [ALICE, BOB]})}})
    for user in (None, ALICE):
        async with p.request("GET", f"{API}/x/", headers={"X-Authproxy-On-Behalf-Of": user} if user else {}) as r:
            assert r.status == 200
    r = await cli_run(tmp_path, cfg, "rotate", "enfix")
    assert r.returncode == 0, r.stderr
    assert "valid for 365 days" in r.stdout and "left valid" in r.stdout
    [new] = [t for t in st.app_tokens if t != APP_TOKEN]
    secret(new)
    assert st.app_token_valid(APP_TOKEN)
    # No SIGHUP: the old app token dies behind the proxy's back. The 401 makes it read the
    # stored app token; the user and OBO tokens are still good with it, so they are kept
    # (no new login, no new OBO token, nothing valid left behind).
    assert st.logins == 2  # the service's, and rotate's proof that the new app token works
    st.kill(APP_TOKEN)
    before = len(st.requests)
    for user in (None, ALICE, None, ALICE):
        async with p.request("GET", f"{API}/x/", headers={"X-Authproxy-On-Behalf-Of": user} if user else {}) as r:
            assert r.status == 200
    assert [q["app_token"] for q in st.requests[before:]] == [new] * 4
    assert st.logins == 2 and dict(st.obo_created) == {ALICE: 1}
    # A new user gets an OBO token made with the new app token.
    async with p.request("GET", f"{API}/x/", headers={"X-Authproxy-On-Behalf-Of": BOB}) as r:
        assert r.status == 200
    await p.close()
    assert sorted(st.expired) == sorted(st.issued)  # every created token expired at exit


async def test_the_mock_is_strict_like_the_real_api(mock: Start) -> None:
    url, st = await mock(user_token_lifetime=0.2)
    api = url + "/api/v1"
    app = {"App-Token": APP_TOKEN}
    async with aiohttp.ClientSession() as s:

        async def call(method: str, path: str, **kw: Any) -> tuple[int, Any]:
            async with s.request(method, api + path, **kw) as r:
                return r.status, (await r.json() if r.status != 204 else None)

        assert await call("POST", "/token/", json={"username": USER, "password": PASSWORD}, headers=app) == (
            415, {"detail": 'Unsupported media type "application/json" in request.'})
        assert (await call("POST", "/token/", data={"username": USER}, headers=app))[0] == 400
        assert await call("POST", "/token/", data={"username": USER, "password": PASSWORD}) == (
            401, {"detail": "Authentication credentials were not provided."})
        assert await call("POST", "/token/", data={"username": USER, "password": "nope"}, headers=app) == (
            401, {"detail": "Invalid username/password."})
        assert (await call("GET", "/token/"))[0] == 405
        status, doc = await call("POST", "/token/", data={"username": USER, "password": PASSWORD}, headers=app)
        both = {**app, "Token": doc["token"]}
        assert (await call("POST", "/tokens/", data={"user": ALICE, "seconds_until_expire": "5"}, headers=both))[0] == 415
        assert (await call("POST", "/tokens/", json={"user": ALICE, "seconds_until_expire": "5"}, headers=both))[0] == 400
        assert (await call("POST", "/tokens/", json={"user": ALICE, "seconds_until_expire": 5, "x": 1}, headers=both))[0] == 400
        assert await call("POST", "/tokens/", json={"user": ALICE.upper(), "seconds_until_expire": 5}, headers=both) == (
            400, {"errors": {"user": enfix.BAD_IDS}})
        status, obo = await call("POST", "/tokens/", json={"user": ALICE, "seconds_until_expire": 5}, headers=both)
        assert status == 201
        assert (await call("PUT", f"/tokens/{obo['token']}/", json={"seconds_until_expire": -1}, headers=both))[0] == 405
        assert (await call("PATCH", "/tokens/0123/", json={"seconds_until_expire": -1}, headers=both))[0] == 404
        assert (await call("PATCH", f"/tokens/{obo['token']}/", json={"seconds_until_expire": -1}, headers=both))[0] == 200
        assert await call("GET", "/x/", headers={**app, "Token": obo["token"]}) == (401, {"detail": "Invalid token."})
        assert st.expired == [obo["token"]]
        await asyncio.sleep(0.3)  # the user token's server-side lifetime runs out; nothing says so
        assert await call("GET", "/x/", headers=both) == (401, {"detail": "Invalid token."})


async def test_rotate_with_a_fixed_token_proves_the_new_app_token_with_a_read(tmp_path: Path, mock: Start) -> None:
    url, st = await mock()
    fixed = secret(st.issue(USER))
    cfg = cli_config(tmp_path, url, enfix=service(url, username=None, password=None, token=fixed))
    r = await cli_run(tmp_path, cfg, "rotate", "enfix", "--seconds", "86400", "--expire-old")
    assert r.returncode == 0, r.stderr
    [new] = [t for t in st.app_tokens if t != APP_TOKEN]
    secret(new)
    assert "valid for 1 day " in r.stdout and "an authenticated request with it succeeded" in r.stdout
    assert st.logins == 0 and st.expired == [APP_TOKEN] and st.valid_tokens() == [fixed]
    r = await cli_run(tmp_path, cfg, "token", "enfix", "--json")
    assert json.loads(r.stdout)["headers"] == {"App-Token": new, "Token": fixed}
    r = await cli_run(tmp_path, cfg, "rotate", "enfix", "--seconds", "0")
    assert r.returncode == 2 and "--seconds" in r.stderr
