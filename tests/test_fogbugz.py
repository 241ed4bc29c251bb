"""FogBugz scheme: logon/logoff, token injection (query, form and JSON bodies),
"not logged on" recovery, persistence across restarts, backoff on refusals, the CLI.

Everything runs against the strict mock (authproxy.testing.fogbugz) on loopback:
it refuses an email or password in a URL, two different tokens in one request,
and locks the account after repeated wrong passwords.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
import yaml

from authproxy.config import ConfigError, load_config_text
from authproxy.credentials import backoff_delay
from authproxy.schemes.fogbugz import FogBugzScheme, replace_param, set_body_token
from authproxy.testing import fogbugz as mock
from authproxy.testing.fogbugz import STATE, FogBugzState
from tests.conftest import free_port, http_get, run_cli, secret, wait_for, write_config

EMAIL = "robot@example.com"
PASSWORD = secret("p&ss+w=rd%20 \u00fcn\u00ef-fb-s3cret")  # every character form encoding must get right
API_TOKEN = secret("fb-api-token-made-in-the-web-ui")
SEARCH = "/fb/api.asp?cmd=search&q=foo"
JSONAPI = "/fb/f/api/0/jsonapi"

Mock = Callable[..., Awaitable[tuple[str, FogBugzState]]]


@pytest.fixture
async def fogbugz(upstream: Any) -> AsyncIterator[Mock]:
    """Start a strict mock FogBugz; at the end, every token it issued joins the log
    scan, and it must never have seen a password in a URL or been locked."""
    states: list[FogBugzState] = []

    async def start(**options: Any) -> tuple[str, FogBugzState]:
        options.setdefault("password", PASSWORD)
        app = mock.make_app(email=EMAIL, api_token=API_TOKEN, **options)
        url = await upstream(app)
        states.append(app[STATE])
        return url, app[STATE]

    yield start
    for st in states:
        for token in st.issued:
            secret(token)
        assert st.secrets_in_url == []
        assert not st.locked


def service(up: str, **auth: Any) -> dict[str, Any]:
    extra = {k: auth.pop(k) for k in ("max_replay_body",) if k in auth}
    if "token" not in auth:
        auth = {"email": EMAIL, "password": PASSWORD, **auth}
    return {"upstream": up, "prefix": "/fb", **extra, "auth": {"scheme": "fogbugz", **auth}}


async def get(p: Any, path: str, **kw: Any) -> tuple[int, bytes]:
    async with p.request(kw.pop("method", "GET"), path, **kw) as r:
        return r.status, await r.read()


# --------------------------------------------------------------------------- configuration


def _load(auth: dict[str, Any], tmp_path: Path) -> Any:
    doc = {"state_dir": str(tmp_path), "services": {"fb": {"upstream": "https://x.fogbugz.com", "auth": {"scheme": "fogbugz", **auth}}}}
    return load_config_text(yaml.safe_dump(doc), env={})


@pytest.mark.parametrize(
    "auth, message",
    [
        ({}, "services.fb.auth: give token"),
        ({"token": "t", "email": EMAIL, "password": "p"}, "services.fb.auth.token: give either token or email and password"),
        ({"email": EMAIL}, "services.fb.auth.password: required"),
        ({"password": "p"}, "services.fb.auth.email: required"),
        ({"token": "t", "api_path": "api.asp"}, "services.fb.auth.api_path: must be a path"),
        ({"token": "t", "frobnicate": 1}, "services.fb.auth.frobnicate: unknown key"),
    ],
)
def test_config_needs_exactly_a_token_or_email_and_password(tmp_path: Path, auth: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(auth, tmp_path)
    assert message in str(e.value)


def test_config_password_file_and_defaults(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    cfg = _load({"email": EMAIL, "password_file": str(tmp_path / "pw")}, tmp_path).services["fb"].auth
    assert cfg.password.reveal() == PASSWORD and PASSWORD not in repr(cfg)
    assert (cfg.api_path, cfg.logoff_on_exit, cfg.token) == ("/api.asp", True, None)


# --------------------------------------------------------------------------- pure helpers


def test_query_token_replaced_case_insensitively_other_bytes_kept() -> None:
    assert replace_param("cmd=search&q=a+b%2F&token=old&TOKEN=x&=y", "token", "t/1") == "cmd=search&q=a+b%2F&=y&token=t%2F1"
    assert replace_param("", "token", "t") == "token=t"


def test_body_token_form_json_and_others() -> None:
    form = "application/x-www-form-urlencoded; charset=utf-8"
    assert set_body_token(b"cmd=new&sTitle=%C3%BC+\xc3\xbc&token=old", form, "T") == b"cmd=new&sTitle=%C3%BC+\xc3\xbc&token=T"
    # JSON without a token: the field is inserted, every other byte kept
    body = b' {"cmd": "search", "q": 1.50, "x": [1, 2]}'
    assert set_body_token(body, "application/json", "T") == b'{"token":"T","cmd": "search", "q": 1.50, "x": [1, 2]}'
    assert set_body_token(b"{}", "application/json", "T") == b'{"token":"T"}'
    # JSON with one (any case): replaced; recognised even when labelled as a form (curl -d)
    got = json.loads(set_body_token(b'{"cmd":"search","Token":"old","token":"old2"}', form, "T"))
    assert got == {"token": "T", "cmd": "search"}
    for other in (b"[1,2]", b'"x"', b"--b\r\ncontent-disposition: form-data; name=token\r\n\r\nold\r\n--b--"):
        assert set_body_token(other, "multipart/form-data; boundary=b", "T") == other
    assert set_body_token(b"token=old", "text/plain", "T") == b"token=old"


def _scheme() -> FogBugzScheme:
    return FogBugzScheme.__new__(FogBugzScheme)


@pytest.mark.parametrize(
    "status, ctype, body, rejected",
    [
        (200, "text/xml", b'<?xml version="1.0"?><response><error code="3"><![CDATA[Not logged on]]></error></response>', True),
        (200, "text/xml; charset=utf-8", b"<response><error code='3'>Not logged on</error></response>", True),
        (200, "text/xml", b'<response><error code="1">Incorrect password</error></response>', False),
        (200, "text/xml", b'<response><cases><case><sTitle><![CDATA[<error code="3">]]></sTitle></case></cases></response>', False),
        (500, "text/xml", b'<response><error code="3">Not logged on</error></response>', False),
        (200, "application/json", b'{"data":{},"errors":[{"message":"Not logged on","detail":null,"code":"3"}]}', True),
        (400, "application/json", b'{"data":{},"errors":[{"message":"Not logged on","detail":null,"code":"3"}],"errorCode":400}', True),
        (200, "application/json", b'{"data":{"code":"3"},"errors":[]}', False),
        (200, "text/html", b'<response><error code="3">Not logged on</error></response>', False),
        (200, "text/xml", b'<!DOCTYPE x [<!ENTITY a "3">]><response><error code="3">&a;</error></response>', False),
    ],
)
def test_rejection_recognised_only_in_fogbugz_error_replies(status: int, ctype: str, body: bytes, rejected: bool) -> None:
    s = _scheme()
    headers = {"Content-Type": ctype}
    assert s.is_rejection(status, headers, body) is rejected
    if rejected:
        assert s.rejection_needs_body(status, headers)
        gz = {**headers, "Content-Encoding": "gzip"}
        assert s.is_rejection(status, gz, gzip.compress(body))  # a client that asked for gzip
    assert not s.rejection_needs_body(status, {**headers, "Content-Encoding": "br"})
    assert s.is_rejection(status, headers, None) is False  # streamed: never inspected


# --------------------------------------------------------------------------- the proxy path


async def test_200_concurrent_first_requests_cause_one_logon(fogbugz: Mock, proxy: Any) -> None:
    up, st = await fogbugz(logon_delay=0.3)  # every request arrives while the one logon is in flight
    p = await proxy({"services": {"fb": service(up)}})
    replies = await asyncio.gather(*(get(p, SEARCH) for _ in range(200)))
    assert {s for s, _ in replies} == {200}
    assert all(b"<cases" in b for _, b in replies)
    assert st.logons == 1 and len(st.logon_attempts) == 1
    assert st.valid_requests == 200 and st.invalid_requests == 0
    assert all(q.startswith("cmd=search&q=foo&token=") for q in st.queries if "cmd=search" in q)
    status, ready = await p.get_json("/-/readyz")
    assert status == 200 and ready["services"]["fb"] == {"state": "ready", "expires_in": None, "last_error": None}


async def test_token_set_in_query_form_and_json_bodies_replacing_the_clients(fogbugz: Mock, proxy: Any) -> None:
    up, st = await fogbugz()
    p = await proxy({"services": {"fb": service(up), "fb-small": {**service(up, max_replay_body=512), "prefix": "/small"}}})
    # The strict mock refuses a request carrying two different tokens: a 200 proves the client's was replaced.
    status, body = await get(p, "/fb/api.asp?cmd=viewPerson&token=client-token&TOKEN=other")
    assert status == 200 and b"Demo User" in body
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, body = await get(p, "/fb/api.asp", method="POST", data=b"cmd=viewPerson&token=client-token", headers=form)
    assert status == 200 and b"Demo User" in body
    for payload, headers in [
        (b'{"cmd": "viewPerson", "token": "client-token"}', {"Content-Type": "application/json"}),
        (b'{"cmd": "search", "q": "foo"}', {"Content-Type": "application/json"}),
        (b'{"cmd": "viewPerson"}', form),  # curl -d '{...}' labels JSON as a form
    ]:
        status, body = await get(p, JSONAPI, method="POST", data=payload, headers=headers)
        assert status == 200, body
        assert json.loads(body)["errors"] == []
    # A body larger than max_replay_body streams untouched: its own token reaches the upstream.
    big = b"cmd=viewPerson&token=client-token&pad=" + b"x" * 4096
    status, body = await get(p, "/small/api.asp", method="POST", data=big, headers=form)
    assert status == 400 and b"more than one token" in body and st.conflicting_tokens == 1
    assert st.logons == 2  # one per service: each has its own token and state


async def test_killed_tokens_heal_with_one_logon_client_sees_only_200(fogbugz: Mock, proxy: Any) -> None:
    up, st = await fogbugz()
    p = await proxy({"services": {"fb": service(up)}})
    assert (await get(p, SEARCH))[0] == 200
    assert st.logons == 1
    for round_, (api, error_status) in enumerate([("xml", 400), ("json", 400), ("json", 200)], start=2):
        st.json_error_status = error_status
        st.kill_all_tokens()
        if api == "xml":
            replies = await asyncio.gather(*(get(p, SEARCH) for _ in range(30)))
        else:
            replies = await asyncio.gather(
                *(get(p, JSONAPI, method="POST", json={"cmd": "search", "q": "foo"}) for _ in range(30))
            )
        assert [s for s, _ in replies] == [200] * 30, (api, error_status)
        assert st.logons == round_, (api, error_status)
    assert st.logoffs == 0  # dead tokens are not logged off
    assert st.invalid_requests == 3 * 30
    async with p.request("GET", "/-/metrics") as r:
        metrics = await r.text()
    assert 'authproxy_auth_retries_total{service="fb"} 90.0' in metrics


async def test_large_or_other_replies_pass_through_uninspected(fogbugz: Mock, proxy: Any) -> None:
    up, st = await fogbugz()
    p = await proxy({"services": {"fb": service(up, max_replay_body=64)}})
    assert (await get(p, SEARCH))[0] == 200
    st.kill_all_tokens()
    status, body = await get(p, SEARCH)  # the "not logged on" reply is over 64 bytes: streamed, not inspected
    assert status == 200 and b'<error code="3">' in body
    assert st.logons == 1
    assert p.server.runtimes["fb"].creds.current() is not None  # the credential was not dropped


async def test_api_path_is_relative_to_the_upstream_base_path(fogbugz: Mock, proxy: Any) -> None:
    up, st = await fogbugz(base="/tracker/x")
    p = await proxy({"services": {"fb": service(up + "/tracker", api_path="/x/api.asp")}})
    status, body = await get(p, "/fb/x/api.asp?cmd=viewPerson")
    assert status == 200 and b"Demo User" in body
    assert st.logons == 1


async def test_wrong_api_path_is_named_in_the_error(fogbugz: Mock, proxy: Any) -> None:
    up, st = await fogbugz()
    p = await proxy({"services": {"fb": service(up, api_path="/nope.asp")}})
    creds = p.server.runtimes["fb"].creds
    await wait_for(lambda: creds.status().last_error)
    assert "HTTP 404" in creds.status().last_error and "/nope.asp" in creds.status().last_error


async def test_configured_token_used_as_given_never_logged_on_or_off(fogbugz: Mock, proxy: Any) -> None:
    up, st = await fogbugz()
    p = await proxy({"services": {"fb": service(up, token=API_TOKEN)}})
    status, body = await get(p, "/fb/api.asp?cmd=viewPerson&token=mine")
    assert status == 200 and b"Demo User" in body
    status, body = await get(p, JSONAPI, method="POST", json={"cmd": "viewPerson"})
    assert status == 200
    await p.close()
    assert (st.logons, len(st.logon_attempts), st.logoffs) == (0, 0, 0)
    assert API_TOKEN in st.tokens
    assert not (p.server.runtimes["fb"].ctx.store.path / "credentials.json").exists()


async def test_logon_token_recorded_reused_after_restart_and_logged_off_at_exit(fogbugz: Mock, proxy: Any, state_dir: Path) -> None:
    up, st = await fogbugz(cdata=False)  # <token>abc</token> as well as CDATA
    record = state_dir / "fb" / "credentials.json"
    p1 = await proxy({"services": {"fb": service(up, logoff_on_exit=False)}})
    assert (await get(p1, SEARCH))[0] == 200
    await p1.close()
    assert st.logoffs == 0 and record.exists()
    assert oct(record.stat().st_mode & 0o777) == "0o600"
    token = next(iter(t for t in st.tokens if t != API_TOKEN))
    p2 = await proxy({"services": {"fb": service(up)}})
    assert (await get(p2, SEARCH))[0] == 200
    assert st.logons == 1  # reused, not logged on again
    await p2.close()
    assert st.logged_off == [token]
    assert not record.exists()


async def test_wrong_password_is_an_error_with_backoff_not_hammered(fogbugz: Mock, proxy: Any) -> None:
    up, st = await fogbugz(password="the-real-password", lock_after=5)
    p = await proxy({"services": {"fb": service(up)}})
    creds = p.server.runtimes["fb"].creds
    await wait_for(lambda: creds.status().state == "error")
    status, ready = await p.get_json("/-/readyz")
    fb = ready["services"]["fb"]
    assert status == 503 and fb["state"] == "error"
    assert "error 1" in fb["last_error"] and "Incorrect password" in fb["last_error"]
    assert PASSWORD not in json.dumps(ready)
    assert creds._retry_at - time.time() >= 7.5  # first retry after a refusal: 10 s ± 20 %
    for _ in range(20):  # requests meanwhile are answered at once, without touching the account
        async with p.request("GET", SEARCH) as r:
            assert r.status == 503 and r.headers["X-Authproxy-Error"] == "token_unavailable"
            assert int(r.headers["Retry-After"]) >= 7
    assert len(st.logon_attempts) == 1
    creds._retry_at = time.time()  # let the clock jump to the retry time
    creds._wake.set()
    await wait_for(lambda: len(st.logon_attempts) == 2 and creds.status().last_error)
    await wait_for(lambda: creds._retry_at - time.time() >= 15)  # the next one is 20 s ± 20 % later
    # So: attempts at 0 s, ≥ 8 s, ≥ 24 s, then at most one a minute — never enough to lock the account.
    assert backoff_delay(1, True, lambda: 0.0) + backoff_delay(2, True, lambda: 0.0) > 15
    assert [backoff_delay(n, True, lambda: 1.0) for n in (4, 5, 9)] == [60.0, 60.0, 60.0]
    assert not st.locked


async def test_an_upstream_echoing_the_password_is_masked(upstream: Any, proxy: Any) -> None:
    from aiohttp import web

    async def echo_logon(request: web.Request) -> web.Response:
        form = await request.post()
        from xml.sax.saxutils import escape

        text = f"<response><error code=\"1\">no user with password {escape(str(form['password']))}</error></response>"
        return web.Response(text=text, content_type="text/xml")

    app = web.Application()
    app.router.add_post("/api.asp", echo_logon)
    p = await proxy({"services": {"fb": service(await upstream(app))}})
    await wait_for(lambda: p.server.runtimes["fb"].creds.status().state == "error")
    status, ready = await p.get_json("/-/readyz")
    assert "no user with password ***" in ready["services"]["fb"]["last_error"]
    assert PASSWORD not in json.dumps(ready)


@pytest.mark.parametrize(
    "options, needles",
    [
        ({"ambiguous": True}, ["error 2", "Ambiguous Logon", "Demo User, Demo Double"]),
        ({"two_factor": True}, ["error 1", "Two-factor", "API token"]),
    ],
)
async def test_ambiguous_logon_and_two_factor_are_refusals(fogbugz: Mock, proxy: Any, options: dict[str, Any], needles: list[str]) -> None:
    up, st = await fogbugz(**options)
    p = await proxy({"services": {"fb": service(up)}})
    await wait_for(lambda: p.server.runtimes["fb"].creds.status().state == "error")
    status, ready = await p.get_json("/-/readyz")
    assert status == 503
    for needle in needles:
        assert needle in ready["services"]["fb"]["last_error"]
    status, body = await get(p, SEARCH)
    assert status == 503 and json.loads(body)["error"] == "token_unavailable"
    assert len(st.logon_attempts) == 1


# --------------------------------------------------------------------------- the real CLI


def cli_config(tmp_path: Path, up: str, port: int = 0) -> Path:
    pw = tmp_path / "fogbugz-password"
    pw.write_text(PASSWORD + "\n")
    os.chmod(pw, 0o600)
    doc = {
        "listen": f"127.0.0.1:{port or free_port()}",
        "state_dir": str(tmp_path / "state"),
        "services": {
            "fogbugz": {"upstream": up, "auth": {"scheme": "fogbugz", "email": EMAIL, "password_file": str(pw)}},
            "fogbugz-api": {"upstream": up, "auth": {"scheme": "fogbugz", "token": API_TOKEN}},
        },
    }
    return write_config(tmp_path / "authproxy.yaml", doc)


async def serve(cli: Any, cfg: Path) -> tuple[Any, str]:
    proc = cli("run", "-c", str(cfg))
    text = await asyncio.to_thread(proc.wait_log, "listening")
    port = yaml.safe_load(cfg.read_text())["listen"].rsplit(":", 1)[1]
    assert f"address=127.0.0.1:{port}" in text
    return proc, f"http://127.0.0.1:{port}"


async def fetch(url: str) -> tuple[int, bytes]:
    return await asyncio.to_thread(http_get, url)


async def test_cli_sigterm_logs_off_created_token_never_the_configured_one(tmp_path: Path, fogbugz: Mock, cli: Any) -> None:
    up, st = await fogbugz()
    proc, base = await serve(cli, cli_config(tmp_path, up))
    for prefix in ("/fogbugz", "/fogbugz-api"):
        status, body = await fetch(f"{base}{prefix}/api.asp?cmd=search&q=foo")
        assert status == 200 and b"<cases" in body
    assert st.logons == 1
    created = next(t for t in st.tokens if t != API_TOKEN)
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 20) == 0
    assert st.logged_off == [created]
    assert API_TOKEN in st.tokens
    log = proc.log()
    assert "tokens_revoked" in log and PASSWORD not in log and created not in log


async def test_cli_kill9_then_restart_makes_no_new_logon(tmp_path: Path, fogbugz: Mock, cli: Any) -> None:
    up, st = await fogbugz()
    cfg = cli_config(tmp_path, up)
    proc, base = await serve(cli, cfg)
    assert (await fetch(f"{base}/fogbugz/api.asp?cmd=search&q=foo"))[0] == 200
    proc.signal(signal.SIGKILL)
    assert await asyncio.to_thread(proc.wait, 20) == -signal.SIGKILL
    proc2, _ = await serve(cli, cfg)
    assert "state_reused" in proc2.log()
    assert (await fetch(f"{base}/fogbugz/api.asp?cmd=search&q=foo"))[0] == 200
    assert st.logons == 1 and len(st.logon_attempts) == 1
    proc2.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc2.wait, 20) == 0
    assert st.logoffs == 1  # the token from before the crash is not left behind


async def test_cli_token_prints_and_reuses_logout_logs_off(tmp_path: Path, fogbugz: Mock) -> None:
    up, st = await fogbugz()
    cfg = str(cli_config(tmp_path, up))

    async def run(*args: str) -> Any:
        return await asyncio.to_thread(run_cli, *args, "-c", cfg, cwd=tmp_path)

    r = await run("token", "fogbugz")
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert token in st.tokens and st.logons == 1
    r = await run("token", "fogbugz", "--json")
    assert json.loads(r.stdout) == {"headers": {}, "query": {"token": token}}
    assert st.logons == 1 and st.logoffs == 0  # reused from the state dir, and still valid
    r = await run("token", "fogbugz-api")
    assert r.stdout.strip() == API_TOKEN
    r = await run("logout", "fogbugz")
    assert r.returncode == 0 and "revoked 1 credential" in r.stdout
    assert st.logged_off == [token] and token not in st.tokens
    assert not (tmp_path / "state" / "fogbugz" / "credentials.json").exists()
    r = await run("logout", "fogbugz-api")
    assert r.returncode == 0 and "revoked 0 credentials" in r.stdout
    assert API_TOKEN in st.tokens and st.logoffs == 1
    for out in (r.stderr,):
        assert PASSWORD not in out


async def test_a_client_logoff_is_answered_locally_and_the_shared_token_lives(fogbugz, proxy):
    """All clients share one token: a client's cmd=logoff (query, form or JSON body)
    is answered by the proxy, never forwarded, and the next request needs no logon."""
    up, st = await fogbugz()
    p = await proxy({"services": {"fb": service(up)}})
    status, _ = await get(p, "/fb/api.asp?cmd=search&q=x")
    assert status == 200 and st.logons == 1
    status, body = await get(p, "/fb/api.asp?cmd=logoff")
    assert status == 200 and b"<response></response>" in body
    status, body = await get(p, "/fb/api.asp", method="POST", data={"cmd": "LogOff"})
    assert status == 200
    status, body = await get(p, "/fb/f/api/0/jsonapi", method="POST", json={"cmd": "logoff", "token": "x"})
    assert status == 200 and json.loads(body)["errors"] == []
    assert st.logoffs == 0
    status, _ = await get(p, "/fb/api.asp?cmd=search&q=y")
    assert status == 200 and st.logons == 1
