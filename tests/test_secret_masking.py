"""Secrets never leave encoded: an upstream's error text that echoes what it was sent
(the form body, an Authorization header) is masked in every encoding before it
reaches /-/readyz, a 503 body or a log line; and a logged request target masks its
service's credential parameters and configured secrets, nothing else.

The integration tests run the real proxy in-process against small upstreams on
loopback that refuse the credential request and quote what they received, each in
one encoding.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any, Callable
from urllib.parse import parse_qsl, quote, quote_plus, unquote_plus
from xml.sax.saxutils import escape

import pytest
from aiohttp import web

from authproxy.credentials import ServiceCredentials, Unavailable
from authproxy.schemes.base import Credential, CredentialError, Scheme
from authproxy.secret import MASK, Redactor, Secret, UrlMasker, mask_url, redact, redactor_for
from authproxy.store.statedir import StateDirStore
from tests.conftest import CAPTURED, secret, wait_for

# Every character some encoding treats specially: space (+ / %20), + & = @ / (quote
# with and without '/' safe), '"' (JSON escapes it even without ensure_ascii), and
# non-ASCII (JSON with ensure_ascii, UTF-8 percent-escapes).
PASSWORD = secret('pw SPECIAL+secret&x=@y/"\u00fc\u20ac')
CLIENT_SECRET = secret('cs SPECIAL+secret&x=@y/"\u00fc\u20ac-oauth')
USER = "robot@example.com"
CLIENT = "svc client"


def _lower_hex(text: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), text)


def encodings(value: str, user: str = USER) -> dict[str, str]:
    """The forms a secret may come back in."""
    return {
        "raw": value,
        "percent": quote(value, safe=""),
        "percent_slash_safe": quote(value),
        "percent_lower": _lower_hex(quote(value, safe="")),
        "percent_slash_safe_lower": _lower_hex(quote(value)),
        "form": quote_plus(value),
        "form_lower": _lower_hex(quote_plus(value)),
        "json": json.dumps(value)[1:-1],
        "json_utf8": json.dumps(value, ensure_ascii=False)[1:-1],
        "base64": base64.b64encode(value.encode()).decode(),
        "base64_urlsafe": base64.urlsafe_b64encode(value.encode()).decode().rstrip("="),
        "basic": base64.b64encode(f"{quote_plus(user)}:{quote_plus(value)}".encode()).decode(),
        "basic_plain": base64.b64encode(f"{user}:{value}".encode()).decode(),
    }


ENCODED = [name for name in encodings(PASSWORD) if name != "raw"]  # raw was masked before too

for _v in (PASSWORD, CLIENT_SECRET):
    for _form in encodings(_v).values():
        secret(_form)  # the session-wide log scan looks for every form as well


def assert_absent(value: str, where: str, text: str) -> None:
    for name, form in encodings(value).items():
        assert form not in text, f"{name} form of the secret in {where}: {text[:400]!r}"


# --------------------------------------------------------------------------- the redactor


@pytest.mark.parametrize("encoding", list(encodings(PASSWORD)))
def test_redactor_masks_every_encoding(encoding: str) -> None:
    r = Redactor([PASSWORD])
    form = encodings(PASSWORD)[encoding]
    for text in (form, f"error: got [{form}] (retry)", f'{{"detail": "password={form}&x=1"}}', f"Authorization: Basic {form}\r\n"):
        out = r.redact(text)
        assert_absent(PASSWORD, f"redact({text!r})", out)
        assert MASK in out


def test_redactor_mixed_case_and_partial_percent_escapes() -> None:
    r = Redactor([PASSWORD])
    form = quote_plus(PASSWORD)
    escapes = iter(range(100))
    mixed = re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower() if next(escapes) % 2 else m.group(0), form)
    assert "%2B" in mixed and "%bc" in mixed  # upper- and lower-case hex in one value
    assert r.redact(f"x={mixed}") == f"x={MASK}"
    partly = PASSWORD.replace("&", "%26").replace(" ", "+")  # some characters escaped, others not
    assert r.redact(f"x={partly};") == f"x={MASK};"


@pytest.mark.parametrize("user", ["", "a", "ab", "abc", "svc client", "robot@example.com"])
def test_redactor_finds_a_secret_inside_base64_at_any_alignment(user: str) -> None:
    r = Redactor([PASSWORD])
    for pair in (f"{quote_plus(user)}:{quote_plus(PASSWORD)}", f"{user}:{PASSWORD}", f"{user}:{PASSWORD}:tail"):
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            token = enc(pair.encode()).decode()
            assert r.redact(f'{{"authorization": "Basic {token}"}}') == f'{{"authorization": "Basic {MASK}"}}'
            assert r.redact(f"h={token.rstrip('=')}&x=1") == f"h={MASK}&x=1"


def test_redactor_leaves_other_text_and_short_values_alone() -> None:
    r = Redactor([PASSWORD, "ab", "", None, Secret("xy")])
    text = "nothing secret: ab xy YWJj eHk= dXNlcjpwdw== %61%62 pw SPECIAL"
    assert r.redact(text) == text
    assert not Redactor(["ab"]) and Redactor(["abc"]).redact("1abc2") == f"1{MASK}2"


def test_redactor_longest_first_and_several_secrets() -> None:
    r = Redactor(["token-abc", "token-abcdef", Secret("other/secret")])
    assert r.redact("a token-abcdef b token-abc c other%2Fsecret d") == f"a {MASK} b {MASK} c {MASK} d"


def test_redactor_is_built_once_per_set_of_secrets() -> None:
    a = redactor_for([Secret(PASSWORD), "another-secret"])
    b = redactor_for(["another-secret", PASSWORD, None, "x"])
    assert a is b
    assert redact(f"got {quote_plus(PASSWORD)}", [Secret(PASSWORD)]) == f"got {MASK}"
    assert PASSWORD not in repr(a)


def test_redactor_of_a_long_token_is_cheap_to_build() -> None:
    import time

    token = "eyJhbGciOiJSUzI1NiJ9." + "A1b2_C3d-" * 200
    started = time.perf_counter()
    r = Redactor([token, PASSWORD])
    assert time.perf_counter() - started < 0.5
    assert r.redact(f"Bearer {token}.") == f"Bearer {MASK}."
    assert r.redact("Basic " + base64.b64encode(f"u:{token}".encode()).decode()) == f"Basic {MASK}"


# --------------------------------------------------------------------------- logged request targets


def test_url_masker_masks_the_services_parameters_and_configured_secrets_only() -> None:
    masker = UrlMasker(["token", "password"], Redactor([PASSWORD]))
    target = f"/fb/api.asp?cmd=search&code=abc&sig=s1&key=k&Token=t0k&%74oken=t1&q={quote_plus(PASSWORD)}"
    assert masker(target) == f"/fb/api.asp?cmd=search&code=abc&sig=s1&key=k&Token={MASK}&%74oken={MASK}&q={MASK}"
    # a configured secret anywhere in the path, in any encoding
    for name, form in encodings(PASSWORD).items():
        if name == "raw":
            continue  # a raw one would not be a valid request target
        out = masker(f"/svc/items/{form}/x?a=1")
        assert out == f"/svc/items/{MASK}/x?a=1", name
    # a service without query credentials masks no parameter at all: code= is not noise-masked
    assert UrlMasker((), Redactor([CLIENT_SECRET]))("/api/cb?code=abc&state=1") == "/api/cb?code=abc&state=1"
    assert mask_url("/api/cb?code=abc&token=x", param_names=(), redactor=None) == "/api/cb?code=abc&token=x"
    assert mask_url("/api/cb?code=abc&q=" + quote(CLIENT_SECRET, safe=""), param_names=["q"], redactor=Redactor([CLIENT_SECRET])) == f"/api/cb?code=abc&q={MASK}"
    # Without names (URLs of credential endpoints quoted in messages, which may hold
    # anything) the generic credential parameters are still masked.
    assert mask_url("https://auth.example/token?client_secret=s&code=c&x=1") == f"https://auth.example/token?client_secret={MASK}&code={MASK}&x=1"
    assert mask_url("/a?x=1", ["x"]) == f"/a?x={MASK}"


def test_maskers_built_once_from_the_config_as_the_proxy_does() -> None:
    """The recipe for the access log: one Redactor of every configured secret (any
    service's, inbound keys too), one UrlMasker per service with its own parameters."""
    import yaml

    from authproxy.config import load_config_text
    from authproxy.schemes import SCHEMES as REGISTRY
    from authproxy.secret import CALLBACK_PARAMS, collect_secrets

    key = secret("inbound-key-4c1d9")
    doc = {
        "inbound": {"keys": [key]},
        "services": {
            "fb": {"upstream": "http://127.0.0.1:1", "auth": {"scheme": "fogbugz", "email": USER, "password": PASSWORD}},
            "api": {"upstream": "http://127.0.0.1:1", "auth": {"scheme": "oauth2", "token_url": "http://127.0.0.1:1/t", "client_id": CLIENT, "client_secret": CLIENT_SECRET}},
        },
    }
    cfg = load_config_text(yaml.safe_dump(doc), env={})
    assert {s.reveal() for s in collect_secrets(cfg)} == {PASSWORD, CLIENT_SECRET, key}
    everyone = Redactor(collect_secrets(cfg))
    maskers = {name: UrlMasker(REGISTRY[svc.scheme].secret_params, everyone) for name, svc in cfg.services.items()}
    assert maskers["fb"]("/fb/api.asp?cmd=logon&token=T0k&code=1") == f"/fb/api.asp?cmd=logon&token={MASK}&code=1"
    assert maskers["api"]("/api/x?code=1&token=t&state=s") == "/api/x?code=1&token=t&state=s"
    assert maskers["api"](f"/api/x?q={quote(PASSWORD, safe='')}&k={key}") == f"/api/x?q={MASK}&k={MASK}"
    assert UrlMasker(CALLBACK_PARAMS, everyone)("/-/callback/api?code=c0de&state=st4te&iss=x") == f"/-/callback/api?code={MASK}&state={MASK}&iss=x"


# --------------------------------------------------------------------------- the credential manager


class _Ctx:
    def __init__(self, store: Any, secrets: list[Secret]) -> None:
        class _Svc:
            name = "svc"

            class upstream:
                url = "http://fake"

        self.service = _Svc()
        self.store = store
        self._secrets = secrets

    def known_secrets(self, *more: Any) -> list[Any]:
        return [*self._secrets, *more]


class _EchoingScheme(Scheme):
    """A scheme that forgets to mask what the upstream echoed."""

    def __init__(self, store: Any, message: str) -> None:
        self.ctx = _Ctx(store, [Secret(PASSWORD)])  # type: ignore[assignment]
        self.config = None
        self.message = message

    async def obtain(self, key: str | None) -> Credential:
        raise CredentialError(self.message, refused=True)

    def apply(self, out: Any, cred: Credential) -> None:  # pragma: no cover
        pass


@pytest.mark.parametrize("encoding", ENCODED)
async def test_manager_masks_last_error_and_messages_even_if_a_scheme_did_not(tmp_path: Any, encoding: str) -> None:
    form = encodings(PASSWORD)[encoding]
    start = len(CAPTURED)
    creds = ServiceCredentials("svc", _EchoingScheme(StateDirStore(str(tmp_path)).service("svc"), f"upstream said: got {form}"))
    with pytest.raises(Unavailable) as e:
        await creds.get(None)
    assert_absent(PASSWORD, "the 503 message", e.value.message)
    st = creds.status()
    assert st.state == "error" and st.last_error is not None and MASK in st.last_error
    assert_absent(PASSWORD, "last_error", st.last_error)
    with pytest.raises(Unavailable) as e:
        await creds.get(None)  # in backoff: the stored message
    assert_absent(PASSWORD, "the 503 message in backoff", e.value.message)
    with pytest.raises(Unavailable) as e:
        await creds.get("alice")  # an on-behalf-of fetch logs its own failure
    assert_absent(PASSWORD, "an OBO 503 message", e.value.message)
    await creds.stop()
    for line in CAPTURED[start:]:
        assert_absent(PASSWORD, "a log line", line)


# --------------------------------------------------------------------------- end to end: echoing upstreams


def echo(encoding: str, value: str, user: str = USER) -> str:
    return encodings(value, user)[encoding]


def fogbugz_app(encoding: str) -> web.Application:
    """cmd=logon answered with error 1, quoting the password it was sent."""

    async def api(request: web.Request) -> web.Response:
        body = await request.text()
        form = dict(parse_qsl(body, keep_blank_values=True))
        said = body if encoding == "form" else echo(encoding, form["password"], form["email"])
        xml = f'<?xml version="1.0"?><response><error code="1">Incorrect password: got {escape(said)}</error></response>'
        return web.Response(text=xml, content_type="text/xml")

    app = web.Application()
    app.router.add_route("*", "/api.asp", api)
    return app


def oauth2_app(encoding: str) -> web.Application:
    """The token endpoint refuses the client, quoting its Authorization header."""

    async def token(request: web.Request) -> web.Response:
        scheme, _, b64 = request.headers["Authorization"].partition(" ")
        client_id, _, sent = base64.b64decode(b64).decode().partition(":")
        said = b64 if encoding == "basic" else echo(encoding, unquote_plus(sent), unquote_plus(client_id))
        doc = {"error": "invalid_client", "error_description": f"bad client secret: got {said}"}
        return web.json_response(doc, status=401)

    app = web.Application()
    app.router.add_post("/token", token)
    return app


def app_token_app(encoding: str) -> web.Application:
    """The login refuses the password, quoting it (DRF style)."""

    async def login(request: web.Request) -> web.Response:
        body = await request.text()
        form = dict(parse_qsl(body, keep_blank_values=True))
        said = body if encoding == "form" else echo(encoding, form["password"], form["username"])
        return web.json_response({"detail": f"bad credentials: got {said}"}, status=400)

    app = web.Application()
    app.router.add_post("/api/v1/token/", login)
    return app


def fogbugz_service(url: str) -> dict[str, Any]:
    return {"upstream": url, "prefix": "/svc", "auth": {"scheme": "fogbugz", "email": USER, "password": PASSWORD}}


def oauth2_service(url: str) -> dict[str, Any]:
    auth = {
        "scheme": "oauth2",
        "token_url": url + "/token",
        "client_id": CLIENT,
        "client_auth": "client_secret_basic",
        "client_secret": CLIENT_SECRET,
    }
    return {"upstream": url, "prefix": "/svc", "auth": auth}


def app_token_service(url: str) -> dict[str, Any]:
    auth = {"scheme": "app_token", "app_token": secret("app-token-e2e-9c1f"), "username": USER, "password": PASSWORD}
    return {"upstream": url, "prefix": "/svc", "auth": auth}


SCHEMES: dict[str, tuple[Callable[[str], web.Application], Callable[[str], dict[str, Any]], str, str]] = {
    "fogbugz": (fogbugz_app, fogbugz_service, PASSWORD, USER),
    "oauth2": (oauth2_app, oauth2_service, CLIENT_SECRET, CLIENT),
    "app_token": (app_token_app, app_token_service, PASSWORD, USER),
}


# client_secret_basic sends no form body to echo
CASES = [(s, e) for s in SCHEMES for e in ENCODED if not (s == "oauth2" and e == "form")]


@pytest.mark.parametrize("scheme, encoding", CASES)
async def test_an_echoed_secret_is_masked_in_readyz_503_and_logs(upstream: Any, proxy: Any, scheme: str, encoding: str) -> None:
    make_app, make_service, value, _user = SCHEMES[scheme]
    url = await upstream(make_app(encoding))
    start = len(CAPTURED)
    p = await proxy({"services": {"svc": make_service(url)}})

    async def failed() -> Any:
        async with p.request("GET", "/-/readyz") as r:
            text = await r.text()
        doc = json.loads(text)["services"]["svc"]
        return doc["last_error"] is not None and (doc, text)

    doc, readyz = await wait_for(failed, 10)
    assert doc["state"] == "error"
    assert "got " in doc["last_error"] and MASK in doc["last_error"], doc["last_error"]  # the echo was there, and masked
    assert_absent(value, "/-/readyz", readyz)
    async with p.request("GET", "/svc/items?x=1") as r:
        body = await r.text()
        assert r.status == 503 and r.headers["X-Authproxy-Error"] == "token_unavailable"
    assert "got " in body and MASK in body
    assert_absent(value, "the 503 body", body)
    await p.close()
    lines = CAPTURED[start:]
    assert any("got " in line and MASK in line for line in lines)
    for line in lines:
        assert_absent(value, "a log line", line)


async def test_an_obo_failure_that_echoes_the_service_users_token_is_masked(upstream: Any, proxy: Any) -> None:
    """The service user's own token is sent to create on-behalf-of tokens; an upstream
    that quotes it back (percent-encoded, base64) must not get it into a 503 or a log."""
    user_token = secret('usr-token/4f9+"e2e"&z')
    for form in encodings(user_token).values():
        secret(form)

    async def login(request: web.Request) -> web.Response:
        return web.json_response({"token": user_token})

    async def create(request: web.Request) -> web.Response:
        sent = request.headers["Token"]
        said = f"{quote(sent, safe='')} {base64.b64encode(sent.encode()).decode()} {json.dumps(sent)}"
        return web.json_response({"detail": f"backend failed for {said}"}, status=500)

    app = web.Application()
    app.router.add_post("/api/v1/token/", login)
    app.router.add_post("/api/v1/tokens/", create)
    url = await upstream(app)
    start = len(CAPTURED)
    svc = app_token_service(url)
    svc["auth"]["obo"] = {"allow_users": ["*"]}
    svc["auth"]["expire_on_exit"] = False
    p = await proxy({"services": {"svc": svc}})

    async def ready() -> bool:
        _, doc = await p.get_json("/-/readyz")
        return doc["services"]["svc"]["state"] == "ready"

    await wait_for(ready, 10)
    async with p.request("GET", "/svc/items", headers={"X-Authproxy-On-Behalf-Of": "alice"}) as r:
        body = await r.text()
        assert r.status == 503, body
    assert "backend failed for" in body and MASK in body
    assert_absent(user_token, "the 503 body", body)
    await p.close()
    lines = CAPTURED[start:]
    assert any("token_fetch_failed" in line for line in lines)
    for line in lines:
        assert_absent(user_token, "a log line", line)


# --------------------------------------------------------------------------- the log safety net


def test_log_redactor_masks_fields_messages_and_tracebacks() -> None:
    import logging
    import sys

    from authproxy.observe import JsonFormatter, TextFormatter, log_event, set_log_redactor

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    lg = logging.getLogger("authproxy.test_masking")
    handler = Keep()
    lg.addHandler(handler)
    forms = encodings(PASSWORD)
    set_log_redactor(Redactor([PASSWORD]))
    try:
        log_event(lg, logging.WARNING, "something_failed", error=f"got {forms['form']}", items=[forms["json"]])
        lg.warning("plain message with %s", forms["percent"])
        try:
            raise ValueError(f"bad {forms['basic']}")
        except ValueError:
            lg.exception("crashed")
        lines = [f().format(r) for r in records for f in (TextFormatter, JsonFormatter)]
    finally:
        set_log_redactor(None)
        lg.removeHandler(handler)
    assert len(lines) == 6 and all(MASK in line for line in lines)
    for line in lines:
        assert_absent(PASSWORD, "a formatted log line", line)
    # off again: nothing is rewritten
    rec = logging.LogRecord("authproxy.x", logging.INFO, __file__, 1, "m %s", (forms["percent"],), None)
    assert forms["percent"] in TextFormatter().format(rec)
    assert sys.modules["authproxy.observe"]._redactor is None


@pytest.mark.parametrize("scheme", ["fogbugz", "app_token"])
async def test_a_secret_straddling_the_cut_of_an_error_text_is_not_half_shown(upstream: Any, proxy: Any, scheme: str) -> None:
    """Error texts are cut to a few hundred characters: the cut comes after masking,
    so a secret that straddles it never shows a readable prefix."""

    async def refuse(request: web.Request) -> web.Response:
        form = dict(parse_qsl(await request.text(), keep_blank_values=True))
        filler = "x" * ((300 if scheme == "fogbugz" else 200) - len(form["password"]) // 2 - 10)
        return web.Response(status=500 if scheme == "fogbugz" else 400, text=f"bad: {filler} got {form['password']} end")

    app = web.Application()
    app.router.add_route("*", "/api.asp", refuse)
    app.router.add_route("*", "/api/v1/token/", refuse)
    url = await upstream(app)
    make_service = fogbugz_service if scheme == "fogbugz" else app_token_service
    p = await proxy({"services": {"svc": make_service(url)}})

    async def failed() -> Any:
        doc = (await p.get_json("/-/readyz"))[1]["services"]["svc"]
        return doc["last_error"] is not None and doc

    doc = await wait_for(failed, 10)
    half = PASSWORD[: len(PASSWORD) // 2]
    assert half not in doc["last_error"], doc["last_error"]
