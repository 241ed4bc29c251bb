"""grant: jwt_bearer (RFC 7523 §2.1) and Google service-account key files, through the
real proxy and CLI, against a Google-like strict mock.

Every key is generated here; the key file is in Google's format with ``token_uri``
pointing at the mock, so ``token_url`` is not configured at all.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from authproxy.testing import oauth2 as mock
from authproxy.testing import oauth2_assertions as google
from tests.conftest import CAPTURED, run_cli, secret, wait_for, write_config

EMAIL = "authproxy@demo-project.iam.gserviceaccount.com"
KID = "3f1c0a5e9b7d2c4e6a8b0d1f3e5c7a9b1d3f5e7a"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def keypair(kind: str = "rsa") -> tuple[Any, str, bytes]:
    """(key, private PKCS#8 PEM, public PEM); a line of the private key joins the log scan."""
    key: Any = ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    secret(private.strip().splitlines()[1])
    return key, private, public


KEY, PRIVATE_PEM, PUBLIC_PEM = keypair()


def key_file(path: Path, token_uri: str | None, private_pem: str = PRIVATE_PEM, **fields: Any) -> Path:
    """A service-account key file exactly as Google issues it."""
    doc = {
        "type": "service_account",
        "project_id": "demo-project",
        "private_key_id": KID,
        "private_key": private_pem,
        "client_email": EMAIL,
        "client_id": "109876543210987654321",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "universe_domain": "googleapis.com",
        **fields,
    }
    path.write_text(json.dumps({k: v for k, v in doc.items() if v is not None}, indent=2))
    path.chmod(0o600)
    return path


@pytest.fixture
async def google_server(upstream: Callable) -> AsyncIterator[Callable[..., Any]]:
    """The mock with the service account registered under its key id."""
    apps: list[web.Application] = []

    async def start(clients: list[mock.Client] | None = None) -> tuple[str, mock.OAuth2State, google.AssertionState]:
        app = mock.make_app(clients=clients or [])
        app[google.ASSERTIONS].add_service_account(EMAIL, KID, PUBLIC_PEM)
        apps.append(app)
        return await upstream(app), app[mock.STATE], app[google.ASSERTIONS]

    yield start
    for app in apps:
        for value in [*app[mock.STATE].access, *app[google.ASSERTIONS].assertions]:
            secret(value)


def service(base: str, **auth: Any) -> dict[str, Any]:
    return {"upstream": base + mock.API_PATH, "auth": {"scheme": "oauth2", "grant": "jwt_bearer", **auth}}


async def api(p: Any, path: str) -> tuple[int, Any]:
    async with p.request("GET", path) as r:
        return r.status, json.loads(await r.read())


async def test_a_google_key_file_gets_a_token(google_server, proxy, tmp_path):
    base, st, gst = await google_server()
    token_url = base + mock.TOKEN_PATH
    sa = key_file(tmp_path / "key.json", token_url)
    p = await proxy({"services": {"gcp": service(base, service_account_file=str(sa), assertion_claims={"scope": SCOPE})}})
    status, got = await api(p, "/gcp/v1/projects")
    assert status == 200 and got["client_id"] == EMAIL and got["scope"] == SCOPE, got
    p.server.runtimes["gcp"].creds.rejected(p.server.runtimes["gcp"].creds.current())
    assert (await api(p, "/gcp/v1/projects"))[0] == 200
    assert st.token_requests == {google.JWT_BEARER: 2} and not st.token_errors
    assert all(set(params) == {"grant_type", "assertion"} for params in st.token_params)  # no client authentication
    (h1, c1), (h2, c2) = gst.accepted_assertions
    assert h1 == {"alg": "RS256", "typ": "JWT", "kid": KID}
    assert c1["iss"] == EMAIL and c1["aud"] == token_url and c1["scope"] == SCOPE and "sub" not in c1
    assert c1["exp"] - c1["iat"] == 60 and abs(c1["iat"] - time.time()) < 30
    assert c1["jti"] != c2["jti"]  # a fresh one every time
    config = p.server.runtimes["gcp"].scheme.config
    assert config.token_url == token_url and config.client_auth == "none"  # from token_uri; Google's default
    shown = repr(config) + repr(p.server.runtimes["gcp"].scheme.__dict__)
    assert "PRIVATE KEY" not in shown and PRIVATE_PEM.splitlines()[1] not in shown


async def test_private_key_file_with_assertion_claims_and_client_authentication(google_server, proxy, tmp_path):
    key, private, public = keypair("ec")
    base, st, gst = await google_server([mock.Client("gw", secret=secret("jb-client-secret-77e1"))])
    gst.add_service_account("robot@example.test", "k1", public)
    (tmp_path / "key.pem").write_text(private)
    auth = {
        "token_url": base + mock.TOKEN_PATH,
        "private_key_file": str(tmp_path / "key.pem"),
        "jwt_alg": "ES256",
        "jwt_lifetime": 3600,  # Google's maximum
        "assertion_claims": {"iss": "robot@example.test", "sub": "person@example.test", "scope": "read write"},
        "client_id": "gw",
        "client_auth": "client_secret_basic",
        "client_secret": "jb-client-secret-77e1",
    }
    p = await proxy({"services": {"jb": service(base, **auth)}})
    status, got = await api(p, "/jb/x")
    assert status == 200 and got["client_id"] == "person@example.test" and got["scope"] == "read write", got
    ((header, claims),) = gst.accepted_assertions
    assert header == {"alg": "ES256", "typ": "JWT"} and claims["exp"] - claims["iat"] == 3600
    assert claims["sub"] == "person@example.test"


async def test_a_refused_assertion_backs_off_with_googles_words(google_server, proxy, tmp_path):
    base, st, gst = await google_server()
    _, other_private, _ = keypair()  # not the key Google holds for this account
    sa = key_file(tmp_path / "key.json", base + mock.TOKEN_PATH, private_pem=other_private)
    noscope = key_file(tmp_path / "noscope.json", base + mock.TOKEN_PATH)
    p = await proxy({"services": {"bad": service(base, service_account_file=str(sa), assertion_claims={"scope": SCOPE}), "noscope": service(base, service_account_file=str(noscope))}})

    async def failed() -> Any:
        status, doc = await p.get_json("/-/readyz")
        got = doc["services"]
        return got if all(got[n]["last_error"] for n in got) else None

    got = await wait_for(failed)
    assert got["bad"]["state"] == "backoff" and got["bad"]["last_error"].endswith("400 invalid_grant: Invalid JWT Signature."), got
    assert got["noscope"]["state"] == "error" and "invalid_scope: Invalid OAuth scope" in got["noscope"]["last_error"]
    status, body = await api(p, "/bad/x")
    assert status == 503 and body["error"] == "token_unavailable"
    shown = json.dumps(got) + "\n".join(CAPTURED)
    assert not any(a in shown for a in gst.assertions)


async def test_authproxy_token_with_a_google_key_file_and_the_real_cli(google_server, tmp_path):
    base, st, gst = await google_server()
    key_file(tmp_path / "key.json", base + mock.TOKEN_PATH)
    cfg = write_config(
        tmp_path / "c.yaml",
        {"state_dir": str(tmp_path / "state"), "services": {"gcp": service(base, service_account_file="key.json", assertion_claims={"scope": SCOPE})}},
    )
    out = await asyncio.to_thread(run_cli, "token", "gcp", "-c", str(cfg), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in st.access and gst.accepted_assertions[0][0]["kid"] == KID
    out = await asyncio.to_thread(run_cli, "check", "-c", str(cfg), cwd=tmp_path)
    assert out.returncode == 0, out.stderr


def test_config_errors_exit_2_via_authproxy_check(tmp_path):
    url = "https://oauth2.example.test/token"
    key_file(tmp_path / "key.json", url)
    key_file(tmp_path / "nouri.json", None)
    key_file(tmp_path / "user.json", url, type="authorized_user")
    (tmp_path / "key.pem").write_text(PRIVATE_PEM)
    truncated_pem = "-----BEGIN " + "PRIVATE KEY-----\nAAAA"  # a cut-off file, no key in it (spelt so no scanner takes it for one)
    (tmp_path / "broken.json").write_text('{"type": "service_account", "private_key": "' + truncated_pem)
    cases = {
        "both": ({"service_account_file": "key.json", "assertion_claims": {"iss": "me@example.test", "scope": "s"}}, "auth.assertion_claims: iss comes from service_account_file"),
        "twokeys": ({"service_account_file": "key.json", "private_key_file": "key.pem"}, "auth.private_key_file: give either service_account_file or private_key_file"),
        "noiss": ({"token_url": url, "private_key_file": "key.pem", "assertion_claims": {"scope": "s"}}, "auth.assertion_claims: iss is required with private_key_file"),
        "nokey": ({"token_url": url, "assertion_claims": {"iss": "me@example.test"}}, "auth.private_key_file: required with grant: jwt_bearer"),
        "claim": ({"service_account_file": "key.json", "assertion_claims": {"exp": "1"}}, "auth.assertion_claims: exp: not a claim authproxy sets"),
        "nouri": ({"service_account_file": "nouri.json"}, "auth.token_url: required (or a service_account_file with a token_uri)"),
        "user": ({"service_account_file": "user.json"}, 'auth.service_account_file: ' + str(tmp_path / "user.json") + ' is not a service-account key ("type" is \'authorized_user\''),
        "broken": ({"token_url": url, "service_account_file": "broken.json"}, "is not JSON (line"),
        "life": ({"service_account_file": "key.json", "jwt_lifetime": 3601}, "auth.jwt_lifetime: must be 1..3600"),
        "elsewhere": ({"grant": "client_credentials", "token_url": url, "client_id": "c", "client_secret": "s", "service_account_file": "key.json"}, "auth.service_account_file: only used with grant: jwt_bearer"),
        "claims-elsewhere": ({"grant": "client_credentials", "token_url": url, "client_id": "c", "client_secret": "s", "assertion_claims": {"scope": "x"}}, "auth.assertion_claims: only used with grant: jwt_bearer"),
    }
    services = {n: {"upstream": "https://api.example.test", "auth": {"scheme": "oauth2", "grant": "jwt_bearer", **a}} for n, (a, _) in cases.items()}
    cfg = write_config(tmp_path / "bad.yaml", {"state_dir": str(tmp_path / "state"), "services": services})
    out = run_cli("check", "-c", str(cfg), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    for name, (_, message) in cases.items():
        assert f"services.{name}.{message}" in out.stderr or (name == "broken" and message in out.stderr), (name, out.stderr)
    assert "BEGIN" not in out.stderr and PRIVATE_PEM.splitlines()[1] not in out.stderr


async def test_mock_refuses_what_google_refuses(google_server):
    base, st, gst = await google_server()
    url = base + mock.TOKEN_PATH

    def assertion(key: Any = KEY, kid: str | None = KID, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": EMAIL, "aud": url, "scope": SCOPE, "iat": now, "exp": now + 600, "jti": f"j{time.monotonic_ns()}", **claims}
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid} if kid else None)

    async def post(value: str, **extra: str) -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as s:
            async with s.post(url, data={"grant_type": google.JWT_BEARER, "assertion": value, **extra}) as r:
                return r.status, await r.json()

    once = assertion(jti="once")
    assert (await post(once))[0] == 200
    assert (await post(assertion(kid=None)))[0] == 200  # no kid: every key of the account is tried
    now = int(time.time())
    for value, error, words in [
        (once, "invalid_grant", "jti has been used before"),
        (assertion(key=keypair()[0]), "invalid_grant", google.BAD_SIGNATURE),
        (assertion(kid="unknown-kid"), "invalid_grant", google.BAD_SIGNATURE),
        (assertion(iss="someone@else.iam.gserviceaccount.com"), "invalid_grant", google.NO_ACCOUNT),
        (assertion(aud="https://oauth2.googleapis.com/token"), "invalid_grant", "Failed audience check"),
        (assertion(iat=now, exp=now + 3601), "invalid_grant", google.BAD_TIMES),
        (assertion(iat=now - 700, exp=now - 100), "invalid_grant", google.BAD_TIMES),
        (assertion(iat=now + 300, exp=now + 900), "invalid_grant", google.BAD_TIMES),
        (assertion(jti=None), "invalid_grant", "a jti is required"),
        (assertion(scope=None), "invalid_scope", google.BAD_SCOPE),
    ]:
        status, body = await post(value)
        assert status == 400 and body == {"error": error, "error_description": body["error_description"]}, body
        assert words in body["error_description"], (words, body)
    status, body = await post("")
    assert body["error"] == "invalid_request"
    status, body = await post(assertion(), client_id="unregistered")  # naming a client means authenticating it
    assert status == 401 and body["error"] == "invalid_client"
