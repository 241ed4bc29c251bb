"""Least privilege through the real proxy: allow rules per service, named inbound keys,
the check order, no credential wait or request for a refused request, `authproxy check`."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from authproxy.config import load_config
from authproxy.proxy.app import ProxyServer
from authproxy.testing import echo, enfix
from authproxy.testing import oauth2 as oauth2_mock
from tests.conftest import run_cli, secret, wait_for, write_config

TOKEN = secret("policy-static-token-9d1e")
AGENT_KEY = secret("agent-key-5b0f1c7e")
OPS_KEY = secret("ops-key-77aa31d0")


def bearer(up: str, **extra: Any) -> dict[str, Any]:
    return {"upstream": up, "auth": {"scheme": "bearer", "token": TOKEN}, **extra}


async def status_of(p: Any, method: str, path: str, **kw: Any) -> tuple[int, str | None]:
    async with p.request(method, path, **kw) as r:
        await r.read()
        return r.status, r.headers.get("X-Authproxy-Error")


async def raw_status(p: Any, method: str, target: str, headers: dict[str, str] | None = None) -> tuple[int, str | None]:
    """A request sent byte for byte (no client library normalising the path)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", p.server.port)
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "localhost", "Connection": "close", **(headers or {})}.items())
    writer.write(f"{method} {target} HTTP/1.1\r\n{head}\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head_text = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    status = int(head_text.split(" ", 2)[1])
    code = next((ln.split(":", 1)[1].strip() for ln in head_text.split("\r\n") if ln.lower().startswith("x-authproxy-error:")), None)
    return status, code


async def assert_refused(p: Any, method: str, path: str, service: str, **kw: Any) -> dict[str, Any]:
    async with p.request(method, path, **kw) as r:
        assert r.status == 403, (method, path, r.status)
        assert r.headers["X-Authproxy-Error"] == "not_allowed"
        assert r.headers["Content-Type"] == "application/json"
        doc = await r.json()
    assert doc["error"] == "not_allowed" and doc["service"] == service
    return doc


# --------------------------------------------------------------------------- glob forms


GLOB_RULES = [
    {"methods": ["GET", "HEAD"], "paths": ["/repos/acme/*/issues", "/repos/acme/*/issues/**"]},
    {"methods": ["POST"], "paths": ["/repos/acme/widgets/issues/*/comments"]},
    {"methods": ["*"], "paths": ["/**/raw", "/a/**/z", "/files/v*.tar.gz"]},
    {"paths": ["/status", "/ping/"]},  # no methods: any
    {"methods": ["PUT"], "paths": ["/literal%2Fname", "/dot/a%2Eb"]},
]


async def test_each_glob_form_and_method(upstream, proxy):
    app = echo.make_app()
    up = await upstream(app)
    p = await proxy({"services": {"gh": bearer(up + "/base", allow=GLOB_RULES), "open": bearer(up, prefix="/open")}})
    allowed = [
        ("GET", "/gh/repos/acme/widgets/issues"),  # * within one segment
        ("HEAD", "/gh/repos/acme/widgets/issues"),
        ("GET", "/gh/repos/acme/widgets/issues/7"),  # ** at the end: one segment
        ("GET", "/gh/repos/acme/widgets/issues/7/comments/3"),  # ... several
        ("GET", "/gh/repos/acme/w-2.x/issues?state=open&q=a/b"),  # the query is not matched
        ("POST", "/gh/repos/acme/widgets/issues/12/comments"),
        ("DELETE", "/gh/raw"),  # ** at the start: zero segments; "*" = any method
        ("PATCH", "/gh/x/y/raw"),
        ("GET", "/gh/a/z"),  # ** in the middle: zero segments
        ("GET", "/gh/a/b/c/z"),
        ("GET", "/gh/files/v1.2.tar.gz"),  # * inside a segment
        ("OPTIONS", "/gh/status"),  # literal, any method
        ("GET", "/gh/ping/"),
        ("PUT", "/gh/literal%2Fname"),  # encoded characters match a literal rule exactly
        ("PUT", "/gh/dot/a%2Eb"),
    ]
    refused = [
        ("POST", "/gh/repos/acme/widgets/issues"),  # method not in the rule
        ("GET", "/gh/repos/acme/widgets/pulls"),
        ("GET", "/gh/repos/other/widgets/issues"),
        ("GET", "/gh/Repos/acme/widgets/issues"),  # case-sensitive
        ("GET", "/gh/repos/acme/a/b/issues"),  # * never crosses '/'
        ("POST", "/gh/repos/acme/gadgets/issues/12/comments"),
        ("POST", "/gh/repos/acme/widgets/issues/12/comments/1"),
        ("GET", "/gh/raw/x"),
        ("GET", "/gh/a/z/y"),
        ("GET", "/gh/files/x1.tar.gz"),
        ("GET", "/gh/status/x"),
        ("GET", "/gh/ping"),  # literal: exactly
        ("GET", "/gh"),  # the prefix alone is matched as "/"
        ("GET", "/gh/"),
        ("PUT", "/gh/literal%2fname"),  # a literal is compared as received
    ]
    for method, path in allowed:
        status, code = await status_of(p, method, path)
        assert (status, code) == (200, None), (method, path)
    before = len(app[echo.STATE].requests)
    for method, path in refused:
        doc = await assert_refused(p, method, path, "gh")
        rest = path.removeprefix("/gh") or "/"
        assert f"{method} {rest}" in doc["message"], doc
    assert len(app[echo.STATE].requests) == before  # nothing refused went upstream
    # a service without allow rules takes every request
    assert (await status_of(p, "DELETE", "/open/anything/at/all"))[0] == 200
    seen = [(r["method"], r["raw_path"]) for r in app[echo.STATE].requests]
    assert ("GET", "/base/repos/acme/w-2.x/issues?state=open&q=a/b") in seen


@pytest.mark.parametrize(
    "path",
    [
        "/gh/repos/acme/a%2Fb/issues",  # encoded /
        "/gh/repos/acme/a%2fb/issues",
        "/gh/repos/acme/a%5Cb/issues",  # encoded \
        "/gh/repos/acme/a%5cb/issues",
        "/gh/repos/acme/w%2Ex/issues",  # encoded .
        "/gh/repos/acme/w%2ex/issues",
        "/gh/repos/acme/%252e%252e/issues",  # encoded %
        "/gh/repos/acme//issues",  # an empty segment
        "/gh/repos/acme/widgets/issues//7",
        "/gh//repos/acme/widgets/issues",
    ],
)
async def test_ambiguous_paths_never_match_a_wildcard_but_may_match_a_literal(upstream, proxy, path):
    app = echo.make_app()
    up = await upstream(app)
    rest = path.removeprefix("/gh")
    rules = [{"methods": ["GET"], "paths": ["/repos/acme/*/issues", "/repos/**", "/**"]}]
    p = await proxy({"services": {"gh": bearer(up, allow=rules), "lit": bearer(up, prefix="/lit", allow=[{"paths": [rest]}])}})
    await assert_refused(p, "GET", path, "gh")
    assert app[echo.STATE].requests == []
    # the same path, named exactly by a literal rule, is allowed
    status, _ = await status_of(p, "GET", "/lit" + rest)
    assert status == 200
    assert app[echo.STATE].requests[-1]["raw_path"] == rest


async def test_dot_segments_are_refused_before_any_rule(upstream, proxy):
    app = echo.make_app()
    up = await upstream(app)
    p = await proxy({"services": {"gh": bearer(up, allow=[{"paths": ["/**"]}])}})
    for path in ("/gh/a/../b", "/gh/a/%2e%2e/b", "/gh/./x", "/gh/a/%2E/b"):
        assert await raw_status(p, "GET", path) == (400, "bad_request"), path
    assert (await status_of(p, "GET", "/gh/a/.hidden/b"))[0] == 200  # not a dot segment
    assert [r["path"] for r in app[echo.STATE].requests] == ["/a/.hidden/b"]


async def test_refused_before_100_continue(upstream, proxy):
    app = echo.make_app()
    up = await upstream(app)
    p = await proxy({"services": {"gh": bearer(up, allow=[{"methods": ["GET"], "paths": ["/**"]}])}})
    async with p.request("POST", "/gh/upload", data=b"x" * 200_000, expect100=True) as r:
        assert r.status == 403 and r.headers["X-Authproxy-Error"] == "not_allowed"
    assert app[echo.STATE].requests == []


# --------------------------------------------------------------------------- no credential wait, no credential request


async def test_refused_request_makes_no_token_request(upstream, proxy):
    app = oauth2_mock.make_app(clients=[oauth2_mock.Client("policy-client", secret=secret("policy-client-secret-3e"))])
    base = await upstream(app)
    st = app[oauth2_mock.STATE]
    svc = {
        "upstream": base + oauth2_mock.API_PATH,
        "auth": {"scheme": "oauth2", "token_url": base + oauth2_mock.TOKEN_PATH, "client_id": "policy-client", "client_secret": "policy-client-secret-3e"},
        "allow": [{"methods": ["GET"], "paths": ["/v1/**"]}],
    }
    p = await proxy({"services": {"bf": svc}})

    async def ready() -> bool:
        _, doc = await p.get_json("/-/readyz")
        return doc["services"]["bf"]["state"] == "ready"

    await wait_for(ready)
    assert (await status_of(p, "GET", "/bf/v1/apps"))[0] == 200
    # Every token held is now dead: a request that reached the upstream would cause a token request.
    st.revoke_access_tokens()
    before, served, rejected = sum(st.token_requests.values()), st.api_ok, st.api_rejected
    refused = [("POST", "/bf/v1/apps"), ("DELETE", "/bf/v1/apps/1"), ("GET", "/bf/v2/apps"), ("GET", "/bf")]
    await asyncio.gather(*(assert_refused(p, m, path, "bf") for m, path in refused * 5))
    assert sum(st.token_requests.values()) == before
    assert (st.api_ok, st.api_rejected) == (served, rejected)
    # an allowed request does: rejection, one new token, one replay
    assert (await status_of(p, "GET", "/bf/v1/apps"))[0] == 200
    assert sum(st.token_requests.values()) == before + 1


async def test_refused_request_does_not_wait_for_a_credential(upstream, proxy):
    app = oauth2_mock.make_app(clients=[oauth2_mock.Client("policy-client", secret=secret("policy-client-secret-3e"))])
    base = await upstream(app)
    st = app[oauth2_mock.STATE]
    st.token_delay = 3.0  # the start-up fetch hangs; a request that waited for it would take this long
    svc = {
        "upstream": base + oauth2_mock.API_PATH,
        "timeout": {"connect": 5, "total": 5},
        "auth": {"scheme": "oauth2", "token_url": base + oauth2_mock.TOKEN_PATH, "client_id": "policy-client", "client_secret": "policy-client-secret-3e"},
        "allow": [{"methods": ["GET"], "paths": ["/v1/**"]}],
    }
    p = await proxy({"services": {"bf": svc}})
    rt = p.server.runtimes["bf"]
    asked: list[Any] = []
    real_get = rt.creds.get

    async def counting_get(key: Any = None) -> Any:
        asked.append(key)
        return await real_get(key)

    rt.creds.get = counting_get  # type: ignore[method-assign]
    _, doc = await p.get_json("/-/readyz")
    assert doc["services"]["bf"]["state"] == "pending"
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.wait_for(assert_refused(p, "POST", "/bf/v1/apps", "bf"), 2.0)
    assert loop.time() - t0 < 2.0
    assert asked == []
    _, doc = await p.get_json("/-/readyz")
    assert doc["services"]["bf"]["state"] == "pending"  # still waiting for the start-up fetch: nobody else was served


ALICE, MALLORY = "a1" * 12, "dd" * 12
APP_TOKEN = secret("policy-enfix-app-token-61c2")
PASSWORD = secret("policy-enfix-pa55-0q")


async def test_refused_request_creates_no_obo_token_and_not_allowed_comes_before_obo_forbidden(upstream, proxy):
    app = enfix.make_app(app_token=APP_TOKEN, users={"svc": PASSWORD})
    url = await upstream(app)
    st = app[enfix.STATE]
    svc = {
        "upstream": url,
        "auth": {"scheme": "app_token", "app_token": APP_TOKEN, "username": "svc", "password": PASSWORD, "obo": {"allow_users": [ALICE]}},
        "allow": [{"methods": ["GET"], "paths": ["/api/v1/projects/", "/api/v1/projects/*/"]}],
    }
    p = await proxy({"services": {"enfix": svc}})

    async def ready() -> bool:
        _, doc = await p.get_json("/-/readyz")
        return doc["services"]["enfix"]["state"] == "ready"

    await wait_for(ready)
    logins = st.logins
    for user in (ALICE, MALLORY):
        obo = {"X-Authproxy-On-Behalf-Of": user}
        await assert_refused(p, "DELETE", "/enfix/api/v1/projects/7/", "enfix", headers=obo)
        await assert_refused(p, "GET", "/enfix/api/v1/users/", "enfix", headers=obo)
    assert not st.obo_created and st.requests == [] and st.logins == logins
    # allowed path: the OBO rule applies next
    assert await status_of(p, "GET", "/enfix/api/v1/projects/", headers={"X-Authproxy-On-Behalf-Of": MALLORY}) == (403, "obo_forbidden")
    assert not st.obo_created
    assert (await status_of(p, "GET", "/enfix/api/v1/projects/7/", headers={"X-Authproxy-On-Behalf-Of": ALICE}))[0] == 200
    assert dict(st.obo_created) == {ALICE: 1}
    assert [r["via"] for r in st.requests] == ["obo"]


# --------------------------------------------------------------------------- named inbound keys


def keyed_services(up: str) -> dict[str, Any]:
    return {
        "github-ro": bearer(up, allow=[{"methods": ["GET"], "paths": ["/**"]}]),
        "ops-svc": bearer(up),
    }


async def test_named_key_limited_to_its_services(upstream, proxy, caplog):
    app = echo.make_app()
    up = await upstream(app)
    plain = secret("plain-inbound-key-0c4")
    inbound = {
        "keys": [
            plain,
            {"name": "triage-agent", "key": AGENT_KEY, "services": ["github-ro"]},
            {"name": "ops", "key": OPS_KEY},
        ]
    }
    p = await proxy({"services": keyed_services(up), "inbound": inbound})
    caplog.set_level(logging.INFO, logger="authproxy.access")
    agent = {"X-Authproxy-Key": AGENT_KEY}
    assert (await status_of(p, "GET", "/github-ro/repos/x", headers=agent))[0] == 200
    doc = await assert_refused(p, "GET", "/ops-svc/anything", "ops-svc", headers=agent)
    assert "triage-agent" in doc["message"] and "GET /anything" in doc["message"]
    assert AGENT_KEY not in json.dumps(doc)
    # the agent's key still meets the service's own rules
    await assert_refused(p, "POST", "/github-ro/repos/x", "github-ro", headers=agent)
    for key in (plain, OPS_KEY):
        assert (await status_of(p, "GET", "/ops-svc/x", headers={"X-Authproxy-Key": key}))[0] == 200
        assert (await status_of(p, "GET", "/github-ro/x", headers={"X-Authproxy-Key": key}))[0] == 200
    assert await status_of(p, "GET", "/ops-svc/x", headers={"X-Authproxy-Key": AGENT_KEY + "x"}) == (401, "inbound_key_required")
    # the key is never forwarded
    for r in app[echo.STATE].requests:
        assert "x-authproxy-key" not in {k.lower() for k, _ in r["headers"]}
    assert len(app[echo.STATE].requests) == 5
    # the access record names the key, never the key itself
    records = [getattr(rec, "fields", {}) for rec in caplog.records if rec.name == "authproxy.access"]
    seen = [(f.get("path"), f.get("key"), f.get("status")) for f in records]
    assert ("/ops-svc/anything", "triage-agent", 403) in seen
    assert ("/ops-svc/x", "key1", 200) in seen and ("/ops-svc/x", "ops", 200) in seen
    assert ("/ops-svc/x", None, 401) in seen
    assert all(AGENT_KEY not in json.dumps(f, default=str) for f in records)


async def test_check_order_with_keys_rules_and_obo(upstream, proxy):
    up = await upstream(echo.make_app())
    inbound = {"keys": [{"name": "triage-agent", "key": AGENT_KEY, "services": ["github-ro"]}]}
    p = await proxy({"services": keyed_services(up), "inbound": inbound})
    agent = {"X-Authproxy-Key": AGENT_KEY}
    # a bad key to an unknown path: the key first
    assert await status_of(p, "GET", "/nope", headers={"X-Authproxy-Key": "bad"}) == (401, "inbound_key_required")
    assert await status_of(p, "DELETE", "/github-ro/x", headers={"X-Authproxy-Key": "bad"}) == (401, "inbound_key_required")
    # a good key to an unknown path: no_route before not_allowed
    assert await status_of(p, "GET", "/nope", headers=agent) == (404, "no_route")
    # browser rules come before the key
    assert await status_of(p, "GET", "/ops-svc/x", headers={**agent, "Origin": "https://evil.example"}) == (403, "origin_forbidden")
    assert await status_of(p, "GET", "/ops-svc/x", headers={**agent, "Host": "evil.example"}) == (403, "host_not_allowed")
    assert await raw_status(p, "GET", "/github-ro/../x", headers=agent) == (400, "bad_request")
    # not_allowed (path, or the key's services) before obo_forbidden
    obo = {**agent, "X-Authproxy-On-Behalf-Of": "someone"}
    assert await status_of(p, "DELETE", "/github-ro/x", headers=obo) == (403, "not_allowed")
    assert await status_of(p, "GET", "/ops-svc/x", headers=obo) == (403, "not_allowed")
    assert await status_of(p, "GET", "/github-ro/x", headers=obo) == (403, "obo_forbidden")


async def test_changed_rules_apply_on_reload_and_keep_the_credential(upstream, tmp_path):
    app = echo.make_app()
    up = await upstream(app)
    path = tmp_path / "c.yaml"
    doc = {"listen": "127.0.0.1:0", "state_dir": str(tmp_path / "state"), "services": {"gh": bearer(up, allow=[{"methods": ["GET"], "paths": ["/a"]}])}}
    write_config(path, doc)
    server = ProxyServer(load_config(path, env={}))
    await server.start()
    try:
        from tests.conftest import RunningProxy

        p = RunningProxy(server)
        rt = server.runtimes["gh"]
        assert (await status_of(p, "GET", "/gh/a"))[0] == 200
        await assert_refused(p, "GET", "/gh/b", "gh")
        doc["services"]["gh"]["allow"] = [{"methods": ["GET"], "paths": ["/b"]}]
        write_config(path, doc)
        assert await server.reload(str(path))
        assert server.runtimes["gh"] is rt  # same credentials
        assert (await status_of(p, "GET", "/gh/b"))[0] == 200
        await assert_refused(p, "GET", "/gh/a", "gh")
        del doc["services"]["gh"]["allow"]
        write_config(path, doc)
        assert await server.reload(str(path))
        assert (await status_of(p, "GET", "/gh/a"))[0] == 200
        await p.session.close()
    finally:
        await server.shutdown()


# --------------------------------------------------------------------------- authproxy check


def test_check_prints_rules_and_key_names_never_keys(tmp_path: Path) -> None:
    (tmp_path / "more-keys").write_text("# more\n" + secret("file-key-one-8e2") + "\n\n")
    cfg = {
        "inbound": {
            "keys": [
                secret("plain-key-check-41"),
                {"name": "triage-agent", "key": "${AGENT_KEY}", "services": ["github-ro"]},
                {"name": "ops", "key_command": ["sh", "-c", "echo " + secret("command-key-31ff")]},
            ],
            "keys_file": "more-keys",
        },
        "services": {
            "github-ro": {
                "upstream": "https://api.github.com",
                "allow": [
                    {"methods": ["GET", "HEAD"], "paths": ["/repos/acme/*/issues", "/repos/acme/*/issues/**"]},
                    {"methods": ["POST"], "paths": ["/repos/acme/widgets/issues/*/comments"]},
                    {"paths": ["/rate_limit"]},
                ],
                "auth": {"scheme": "bearer", "token": TOKEN},
            },
            "echo": {"upstream": "http://127.0.0.1:1", "auth": {"scheme": "bearer", "token": TOKEN}},
        },
    }
    path = write_config(tmp_path / "c.yaml", cfg)
    r = run_cli("check", "-c", str(path), cwd=tmp_path, env={"AGENT_KEY": AGENT_KEY})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for value in ("plain-key-check-41", AGENT_KEY, "command-key-31ff", "file-key-one-8e2", TOKEN):
        assert value not in out + r.stderr
    lines = out.splitlines()
    gh = next(i for i, ln in enumerate(lines) if "github-ro" in ln and "→" in ln)
    ec = next(i for i, ln in enumerate(lines) if "(echo:" in ln)
    gh_block = "\n".join(lines[gh:ec] if gh < ec else lines[gh:])
    ec_block = "\n".join(lines[ec:gh] if ec < gh else lines[ec:])
    assert "GET, HEAD" in gh_block and "/repos/acme/*/issues/**" in gh_block
    assert "POST" in gh_block and "/repos/acme/widgets/issues/*/comments" in gh_block
    assert "any" in gh_block and "/rate_limit" in gh_block
    assert "key1, triage-agent, ops, key2" in gh_block
    assert "all requests (no allow rules)" in ec_block
    assert "key1, ops, key2" in ec_block and "triage-agent" not in ec_block
    # without inbound keys
    del cfg["inbound"]
    write_config(path, cfg)
    r = run_cli("check", "-c", str(path), cwd=tmp_path)
    assert r.returncode == 0 and "no inbound keys" in r.stdout
