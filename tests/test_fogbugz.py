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
from authproxy.schemes.fogbugz import PLACEHOLDER, FogBugzScheme, replace_param, set_body_token
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
        assert set_body_token(other, "multipart/form-data; boundary=other", "T") == other  # not its boundary
    assert set_body_token(b"token=old", "text/plain", "T") == b"token=old"


MP = "multipart/form-data; boundary=XyZ"
FILE = b"\x00\xff\r\n--XyZx\r\n--Xy\r\n\r\n"  # CRLFs, a near-delimiter: must survive as is
DATA = bytes(range(256)) + b"\r\n--\r\n\r\n-- XyZ\r\n"  # a file a real parser accepts (aiohttp's refuses "--XyZx" lines)


def _mp(*parts: tuple[bytes, bytes], eol: bytes = b"\r\n", preamble: bytes = b"", epilogue: bytes = b"\r\n") -> bytes:
    body = preamble
    for head, content in parts:
        body += b"--XyZ" + eol + head + eol + eol + content + eol
    return body + b"--XyZ--" + epilogue


def _field(name: str, extra: str = "") -> bytes:
    return f'Content-Disposition: form-data; name="{name}"{extra}'.encode()


def test_multipart_token_part_replaced_every_other_byte_kept() -> None:
    cmd, f = (_field("cmd"), b"new"), (_field("File1", '; filename="a.bin"') + b"\r\nContent-Type: application/octet-stream", FILE)
    body = _mp(cmd, (b"Content-disposition: form-data; name=token\r\nContent-Type: text/plain; charset=utf-16", b"placeholder"), f)
    assert set_body_token(body, MP, "T") == _mp(cmd, (_field("token"), b"T"), f)
    # several token parts (any case): the first gets the token, the others go
    body = _mp((_field("TOKEN"), b"a"), cmd, (_field("token"), b"b"), f, preamble=b"preamble\r\n", epilogue=b"\r\nepilogue")
    assert set_body_token(body, MP, "T") == _mp((_field("token"), b"T"), cmd, f, preamble=b"preamble\r\n", epilogue=b"\r\nepilogue")
    # none: added as the last part
    assert set_body_token(_mp(cmd, f), MP, "T") == _mp(cmd, f, (_field("token"), b"T"))
    assert set_body_token(b"--XyZ--\r\n", MP, "T") == _mp((_field("token"), b"T"))
    # bare LF line breaks (accepted by ASP.NET): found, and the new part follows suit
    lf = _mp(cmd, (_field("token"), b"old"), eol=b"\n", epilogue=b"\n")
    assert set_body_token(lf, MP, "T") == _mp(cmd, (_field("token"), b"T"), eol=b"\n", epilogue=b"\n")
    # a quoted boundary with parameters around it; an RFC 2231 name; transport padding
    quoted = 'multipart/form-data; charset=utf-8; boundary="XyZ"; x=y'
    body = _mp((b"Content-Disposition: form-data; name*=UTF-8''token", b"old"), cmd).replace(b"--XyZ\r\n", b"--XyZ \t\r\n", 1)
    assert set_body_token(body, quoted, "T") == _mp((_field("token"), b"T"), cmd).replace(b"--XyZ\r\n", b"--XyZ \t\r\n", 1)


@pytest.mark.parametrize(
    "body, ctype",
    [
        (_mp((_field("token"), b"old")), "multipart/form-data"),  # no boundary
        (_mp((_field("token"), b"old"))[:-9], MP),  # no closing delimiter
        (b"--XyZ\r\n" + _field("token") + b"\r\n--XyZ--\r\n", MP),  # no blank line after the headers
        (b"plain text", MP),
        (_mp((_field("token"), b"old")), "multipart/mixed; boundary=XyZ"),
    ],
)
def test_multipart_that_is_not_well_formed_form_data_is_left_alone(body: bytes, ctype: str) -> None:
    assert set_body_token(body, ctype, "T") == body


def test_multipart_helpers_read_fields_and_agree_with_the_email_parser() -> None:
    import email

    from authproxy.schemes import multipart
    from authproxy.schemes.fogbugz_body import client_commands

    body = _mp((_field("cmd"), b" LogOff "), (_field("File1", '; filename="cmd"'), FILE), (_field("Cmd"), b"search"))
    assert multipart.values(body, MP, "CMD") == [b" LogOff ", b"search"]  # files are not fields
    assert client_commands("cmd=x", body, MP) == (["x", "logoff", "search"], False)
    assert client_commands("", b'{"cmd": "logon"}', "text/plain") == (["logon"], True)
    # A damaged body a forgiving server may still read is read leniently for cmd (never rewritten):
    # no closing delimiter, a part without its blank line.
    damaged = b"--XyZ\r\n" + _field("x") + b"\r\n--XyZ\r\n" + _field("cmd") + b"\r\n\r\nlogoff"
    assert client_commands("", damaged, MP) == (["logoff"], False)
    assert set_body_token(damaged, MP, "T") == damaged
    assert client_commands("", b"a=1&CMD=logon", "application/x-www-form-urlencoded") == (["logon"], False)
    out = set_body_token(body, MP, "T")
    msg = email.message_from_bytes(b"Content-Type: " + MP.encode() + b"\r\n\r\n" + out)
    got = [(part.get_param("name", header="content-disposition"), part.get_payload(decode=True)) for part in msg.get_payload()]
    assert got == [("cmd", b" LogOff "), ("File1", FILE), ("Cmd", b"search"), ("token", b"T")]


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
    # Each round: the requests sent before the new token was at hand (how many depends on
    # the HTTP engine's scheduling), and one check that the token is really dead.
    assert 3 * (1 + 1) <= st.invalid_requests <= 3 * (30 + 1)
    async with p.request("GET", "/-/metrics") as r:
        metrics = await r.text()
    assert f'authproxy_auth_retries_total{{service="fb"}} {st.invalid_requests - 3}.0' in metrics  # each rejected request replayed once


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
    assert creds.health.retry_at - time.time() >= 7.5  # first retry after a refusal: 10 s ± 20 %
    for _ in range(20):  # requests meanwhile are answered at once, without touching the account
        async with p.request("GET", SEARCH) as r:
            assert r.status == 503 and r.headers["X-Authproxy-Error"] == "token_unavailable"
            assert int(r.headers["Retry-After"]) >= 7
    assert len(st.logon_attempts) == 1
    creds.health.retry_at = time.time()  # let the clock jump to the retry time
    creds._wake.set()
    await wait_for(lambda: len(st.logon_attempts) == 2 and creds.status().last_error)
    await wait_for(lambda: creds.health.retry_at - time.time() >= 15)  # the next one is 20 s ± 20 % later
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


# --------------------------------------------------------------------------- client logon/logoff, multipart bodies (FogBugzPy's way)


def multipart(*fields: tuple[str, str | bytes], files: tuple[tuple[str, bytes], ...] = ()) -> tuple[bytes, dict[str, str]]:
    """A body as FogBugzPy builds it: one part per field, then File1..N."""
    parts = [(f'Content-disposition: form-data; name="{k}"'.encode(), v.encode() if isinstance(v, str) else v) for k, v in fields]
    parts += [(f'Content-disposition: form-data; name="File{i}"; filename="f{i}.bin"\r\nContent-type: application/octet-stream'.encode(), data) for i, (_, data) in enumerate(files, 1)]
    return _mp(*parts), {"Content-Type": MP}


FORMS = {
    "query": lambda cmd: {"path": f"/fb/api.asp?cmd={cmd}&email=someone&password=x"},
    "form": lambda cmd: {"method": "POST", "path": "/fb/api.asp", "data": f"cmd={cmd}&token=placeholder".encode(), "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
    "multipart": lambda cmd: dict(zip(("data", "headers"), multipart(("email", "a@b"), ("password", "pw"), ("cmd", cmd))), method="POST", path="/fb/api.asp?"),
    "multipart-with-token": lambda cmd: dict(zip(("data", "headers"), multipart(("cmd", cmd), ("token", "placeholder"))), method="POST", path="/fb/api.asp?"),
    "json": lambda cmd: {"method": "POST", "path": JSONAPI, "json": {"cmd": cmd, "token": "placeholder"}},
}


@pytest.mark.parametrize("form", sorted(FORMS))
async def test_client_logon_and_logoff_are_answered_locally_in_every_body_form(fogbugz: Mock, proxy: Any, form: str) -> None:
    up, st = await fogbugz()
    p = await proxy({"services": {"fb": service(up)}})
    assert (await get(p, SEARCH))[0] == 200
    shared = next(t for t in st.tokens if t != API_TOKEN)
    seen = (st.xml_requests, st.json_requests)
    status, body = await get(p, **FORMS[form]("logoff"))
    assert status == 200
    if form == "json":
        assert json.loads(body) == {"data": {}, "errors": [], "warnings": [], "meta": {}, "errorCode": None, "maxCacheAge": None}
    else:
        assert body.endswith(b"<response></response>")
    status, body = await get(p, **FORMS[form]("LogOn"))
    assert status == 200 and shared.encode() not in body
    if form == "json":
        assert json.loads(body)["data"] == {"token": PLACEHOLDER} and json.loads(body)["errors"] == []
    else:
        assert body.endswith(b"<response><token><![CDATA[authproxy-placeholder]]></token></response>")
    assert (st.xml_requests, st.json_requests) == seen  # neither reached FogBugz
    assert (st.logoffs, len(st.logon_attempts)) == (0, 1) and shared in st.tokens
    status, body = await get(p, SEARCH)
    assert status == 200 and st.logons == 1


async def test_multipart_placeholder_token_is_replaced_and_files_arrive_intact(fogbugz: Mock, proxy: Any) -> None:
    up, st = await fogbugz()  # strict: a body token other than the query's is refused with 400
    p = await proxy({"services": {"fb": service(up)}})
    data, headers = multipart(("sTitle", "crash"), ("cmd", "new"), ("token", PLACEHOLDER), ("nFileCount", "1"), files=(("f", DATA * 100),))
    status, body = await get(p, "/fb/api.asp?", method="POST", data=data, headers=headers)
    assert status == 200 and b'<case ixBug="2"' in body, body
    assert st.attachments == [("f1.bin", DATA * 100)]
    data, headers = multipart(("cmd", "viewPerson"))  # no token in the body: one is added, and agrees
    status, body = await get(p, "/fb/api.asp", method="POST", data=data, headers=headers)
    assert status == 200 and b"Demo User" in body
    assert (st.conflicting_tokens, st.invalid_requests, st.logons, st.multipart_requests) == (0, 0, 1, 2)


async def test_an_upstream_preferring_the_body_token_gets_the_real_one(fogbugz: Mock, proxy: Any) -> None:
    up, st = await fogbugz(prefer_body_token=True)
    p = await proxy({"services": {"fb": service(up)}})
    data, headers = multipart(("cmd", "viewPerson"), ("token", PLACEHOLDER))
    for _ in range(5):
        status, body = await get(p, "/fb/api.asp?", method="POST", data=data, headers=headers)
        assert status == 200 and b"Demo User" in body, body
    assert (st.logons, len(st.logon_attempts), st.invalid_requests) == (1, 1, 0)


async def test_a_rejection_of_a_body_token_it_could_not_replace_keeps_the_live_token(fogbugz: Mock, proxy: Any, caplog: Any) -> None:
    """A body over max_replay_body streams untouched; if FogBugz then reads the client's
    placeholder and says "not logged on", the proxy's token is checked, found alive and
    kept: no new logon, no live token left behind."""
    up, st = await fogbugz(prefer_body_token=True)
    p = await proxy({"services": {"fb": service(up, max_replay_body=1024)}})
    assert (await get(p, SEARCH))[0] == 200
    shared = next(t for t in st.tokens if t != API_TOKEN)
    data, headers = multipart(("cmd", "new"), ("token", PLACEHOLDER), ("nFileCount", "1"), files=(("f", DATA * 20),))
    status, body = await get(p, "/fb/api.asp?", method="POST", data=data, headers=headers)
    assert status == 200 and b'<error code="3">' in body  # the rejection is the client's to see
    status, _ = await get(p, SEARCH)  # the next request checks the dropped token first
    assert status == 200 and st.logons == 1 and shared in st.tokens
    assert "token_rejection_unconfirmed" in caplog.text
    assert f"token={shared}" in st.queries[-1]
    await p.close()
    assert st.logged_off == [shared]  # still recorded, so still logged off at exit


# --------------------------------------------------------------------------- a configured API token that dies


def api_token_service(up: str, path: Path, **extra: Any) -> dict[str, Any]:
    svc = service(up, token="x", **extra)
    svc["auth"] = {"scheme": "fogbugz", "token_file": str(path)}
    return svc


async def test_a_rejected_api_token_puts_the_service_in_error_naming_the_cause(fogbugz: Mock, proxy: Any, tmp_path: Path) -> None:
    up, st = await fogbugz()
    (tmp_path / "token").write_text(API_TOKEN + "\n")
    p = await proxy({"services": {"fb": api_token_service(up, tmp_path / "token")}})
    assert (await get(p, SEARCH))[0] == 200
    st.kill_all_tokens()  # e.g. the API token was deleted in the web UI
    status, body = await get(p, SEARCH)
    assert status == 200 and b'<error code="3">' in body, body  # the rejection itself is passed to the client
    assert st.invalid_requests == 2  # the request, and one check that the token is dead
    status, ready = await p.get_json("/-/readyz")
    fb = ready["services"]["fb"]
    assert status == 503 and fb["state"] == "error"
    assert "the configured API token was rejected (not logged on)" in fb["last_error"]
    assert str(tmp_path / "token") in fb["last_error"] and API_TOKEN not in json.dumps(ready)
    creds = p.server.runtimes["fb"].creds
    assert creds.health.retry_at - time.time() >= 7.5  # a refusal: backed off hard
    for _ in range(5):  # meanwhile nothing reaches FogBugz with the dead token
        status, body = await get(p, SEARCH)
        assert status == 503 and "API token was rejected" in json.loads(body)["message"]
    assert st.invalid_requests == 2 and len(st.logon_attempts) == 0


async def test_a_rejected_api_token_is_replaced_from_its_token_file_at_most_once_a_minute(fogbugz: Mock, proxy: Any, tmp_path: Path) -> None:
    up, st = await fogbugz()
    token_file = tmp_path / "token"
    token_file.write_text(API_TOKEN)
    p = await proxy({"services": {"fb": api_token_service(up, token_file)}})
    scheme, creds = p.server.runtimes["fb"].scheme, p.server.runtimes["fb"].creds
    # The file already holds a new token when the old one dies: the one re-read heals it.
    new = secret(st.make_api_token())
    token_file.write_text(new + "\n")
    st.tokens.pop(API_TOKEN)
    status, body = await get(p, SEARCH)
    assert status == 200 and b"<cases" in body
    assert (await p.get_json("/-/readyz"))[1]["services"]["fb"]["state"] == "ready"
    # It dies too, and the file is not updated at once: error, until a re-read a minute later.
    st.kill_all_tokens()
    await get(p, SEARCH)
    await wait_for(lambda: creds.status().state == "error")
    newer = secret(st.make_api_token())
    token_file.write_text(newer)
    creds.health.retry_at = time.time()  # the backoff's retry comes: within the minute, no re-read
    creds._wake.set()
    await wait_for(lambda: creds.health.failures == 2)
    assert creds.status().state == "error"
    now = time.monotonic()
    scheme._clock = lambda: now + 61  # a minute later
    creds.health.retry_at = time.time()
    creds._wake.set()
    await wait_for(lambda: creds.status().state == "ready")
    status, body = await get(p, SEARCH)
    assert status == 200 and f"token={newer}" in st.queries[-1]
    assert len(st.logon_attempts) == 0


def test_config_token_file(tmp_path: Path) -> None:
    (tmp_path / "t").write_text(API_TOKEN + "\n")
    cfg = _load({"token_file": str(tmp_path / "t")}, tmp_path).services["fb"].auth
    assert cfg.token.reveal() == API_TOKEN and cfg.token_file == str(tmp_path / "t") and API_TOKEN not in repr(cfg)
    for auth, message in [
        ({"token_file": str(tmp_path / "t"), "token": "x"}, "services.fb.auth.token_file: give either token or token_file"),
        ({"token_file": str(tmp_path / "nope")}, "services.fb.auth.token_file: file"),
        ({"token_file": str(tmp_path / "t"), "email": EMAIL, "password": "p"}, "services.fb.auth.token_file: give either token or email"),
    ]:
        with pytest.raises(ConfigError) as e:
            _load(auth, tmp_path)
        assert message in str(e.value)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="services.fb.auth.token_file: is empty"):
        _load({"token_file": str(tmp_path / "empty")}, tmp_path)


# --------------------------------------------------------------------------- the mock is as strict as FogBugz


async def test_mock_reads_multipart_like_fogbugz_and_is_strict(fogbugz: Mock) -> None:
    import aiohttp

    up, st = await fogbugz()
    async with aiohttp.ClientSession() as http:

        async def post(query: str, *fields: tuple[str, str]) -> bytes:
            data, headers = multipart(*fields)
            async with http.post(f"{up}/api.asp?{query}", data=data, headers=headers) as r:
                return await r.read()

        async with http.get(f"{up}/api.xml") as r:
            assert b"<url>api.asp?</url>" in await r.read()
        assert b"Demo User" in await post("", ("cmd", "viewPerson"), ("token", API_TOKEN))
        assert b"Demo User" in await post(f"token={API_TOKEN}", ("cmd", "viewPerson"), ("token", API_TOKEN))
        assert b"more than one token" in await post(f"token={API_TOKEN}", ("cmd", "viewPerson"), ("token", "other"))
        assert b"more than one token" in await post("", ("cmd", "viewPerson"), ("token", API_TOKEN), ("Token", "other"))
        assert b'<error code="3">' in await post("", ("cmd", "viewPerson"))
        assert b'<error code="3">' in await post("", ("cmd", "logoff"))
        assert b"<token>" in await post("", ("cmd", "logon"), ("email", EMAIL), ("password", PASSWORD))
    assert st.conflicting_tokens == 2 and st.multipart_requests == 7
