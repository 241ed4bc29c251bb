"""grant: token_exchange (RFC 8693) — workload identity, through the real proxy and CLI.

The strict mock plays a cloud STS that trusts a "cluster" key: the subject token
is a Kubernetes-style projected service-account token (a JWT) generated here,
written to a file that is rotated in place between exchanges, as the kubelet does.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from authproxy.schemes.base import CredentialError
from authproxy.schemes.rfc8693 import read_token_file
from authproxy.testing import oauth2 as mock
from authproxy.testing import oauth2_assertions as sts
from tests.conftest import CAPTURED, run_cli, secret, wait_for, write_config

CLUSTER_ISS = "https://kubernetes.default.svc.cluster.local"
STS_AUD = "sts.example.test"
CLIENT = "workload-client"
CLIENT_SECRET = secret("te-client-secret-4f1a9c")
ACCESS_TYPE = "urn:ietf:params:oauth:token-type:access_token"


def _keypair() -> tuple[Any, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key, public


CLUSTER_KEY, CLUSTER_PUBLIC = _keypair()


def k8s_token(sub: str = "system:serviceaccount:team:app", *, expires_in: int = 600, key: Any = None, aud: str = STS_AUD) -> str:
    """A projected service-account token as the kubelet writes it (registered as a secret)."""
    now = int(time.time())
    claims = {"iss": CLUSTER_ISS, "sub": sub, "aud": [aud], "iat": now - 5, "nbf": now - 5, "exp": now + expires_in, "jti": str(uuid.uuid4())}
    return secret(jwt.encode(claims, key or CLUSTER_KEY, algorithm="RS256", headers={"kid": "cluster-1"}))


@pytest.fixture
async def sts_server(upstream: Callable) -> AsyncIterator[Callable[..., Any]]:
    """The mock with the cluster trusted; every token it issues joins the log scan."""
    apps: list[web.Application] = []

    async def start(**options: Any) -> tuple[str, mock.OAuth2State, sts.AssertionState]:
        app = mock.make_app(clients=[mock.Client(CLIENT, secret=CLIENT_SECRET)], **options)
        app[sts.ASSERTIONS].trust(CLUSTER_ISS, CLUSTER_PUBLIC, STS_AUD)
        apps.append(app)
        return await upstream(app), app[mock.STATE], app[sts.ASSERTIONS]

    yield start
    for app in apps:
        for value in app[mock.STATE].access:
            secret(value)


def service(base: str, token_file: Path, **auth: Any) -> dict[str, Any]:
    return {
        "upstream": base + mock.API_PATH,
        "auth": {"scheme": "oauth2", "grant": "token_exchange", "token_url": base + mock.TOKEN_PATH, "subject_token_file": str(token_file), **auth},
    }


async def api(p: Any, path: str) -> tuple[int, Any]:
    async with p.request("GET", path) as r:
        return r.status, json.loads(await r.read())


def write_in_place(path: Path, token: str) -> None:
    """Rotate the token file in place (same inode), trailing newline as the kubelet leaves it."""
    with open(path, "r+") as f:
        f.seek(0)
        f.truncate()
        f.write(token + "\n")


async def test_subject_token_file_rotated_in_place_is_read_at_every_exchange(sts_server, proxy, tmp_path):
    base, st, ast = await sts_server()
    token_file = tmp_path / "token"
    first = k8s_token("system:serviceaccount:team:first")
    token_file.write_text(first + "\n")
    p = await proxy({"services": {"wi": service(base, token_file, client_auth="none")}})
    status, got = await api(p, "/wi/v1/things")
    assert status == 200 and got["client_id"] == "system:serviceaccount:team:first", got
    second = k8s_token("system:serviceaccount:team:second")
    write_in_place(token_file, second)
    st.revoke_access_tokens()  # the API answers 401: authproxy exchanges again and replays
    status, got = await api(p, "/wi/v1/things")
    assert status == 200 and got["client_id"] == "system:serviceaccount:team:second", got
    assert [e.subject_token for e in ast.exchanges] == [first, second]  # newline stripped, re-read
    assert all(e.subject_token_type == "urn:ietf:params:oauth:token-type:jwt" for e in ast.exchanges)
    assert all(e.client_id == sts.ANONYMOUS.client_id for e in ast.exchanges)  # client_auth: none, no client_id
    assert "client_id" not in st.token_params[0]
    assert st.token_requests == {sts.TOKEN_EXCHANGE: 2} and not st.token_errors


async def test_actor_audience_resources_and_requested_type_reach_the_server_exactly(sts_server, proxy, tmp_path):
    base, st, ast = await sts_server()
    (tmp_path / "subject").write_text(k8s_token() + "\n")
    actor = k8s_token("system:serviceaccount:infra:gateway")
    (tmp_path / "actor").write_text(actor)
    resources = ["https://api.example.test/v1", "urn:example:billing"]
    auth = {
        "client_id": CLIENT,
        "client_auth": "client_secret_basic",
        "client_secret": CLIENT_SECRET,
        "actor_token_file": str(tmp_path / "actor"),
        "actor_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
        "audience": "billing-api",
        "resource": resources,
        "requested_token_type": ACCESS_TYPE,
        "scope": "read write",
    }
    p = await proxy({"services": {"wi": service(base, tmp_path / "subject", **auth)}})
    status, got = await api(p, "/wi/x")
    assert status == 200 and got["scope"] == "read write", got
    (ex,) = ast.exchanges
    assert ex.client_id == CLIENT  # authenticated with HTTP Basic
    assert ex.actor_token == actor and ex.actor_token_type == "urn:ietf:params:oauth:token-type:jwt"
    assert ex.subject_token_type == "urn:ietf:params:oauth:token-type:id_token"
    assert ex.audience == ["billing-api"] and ex.resource == resources  # repeated parameters, in order
    assert ex.requested_token_type == ACCESS_TYPE and ex.scope == "read write"


async def test_token_type_n_a_is_accepted_and_anything_else_is_a_credential_error(sts_server, proxy, tmp_path):
    (tmp_path / "t").write_text(k8s_token())
    n_a_base, _, n_a = await sts_server()
    n_a.token_type = "N_A"  # RFC 8693 §2.2.1: not an access token; still sent as a Bearer
    n_a.issued_token_type = "urn:ietf:params:oauth:token-type:jwt"
    mac_base, _, mac = await sts_server()
    mac.token_type = "mac"
    p = await proxy({"services": {"na": service(n_a_base, tmp_path / "t", client_auth="none"), "mac": service(mac_base, tmp_path / "t", client_auth="none")}})
    assert (await api(p, "/na/x"))[0] == 200

    async def mac_failed() -> Any:
        status, doc = await p.get_json("/-/readyz")
        return doc["services"]["mac"] if doc["services"]["mac"]["last_error"] else None

    got = await wait_for(mac_failed)
    assert got["state"] == "error" and "issued a token of type 'mac'" in got["last_error"], got
    status, body = await api(p, "/mac/x")
    assert status == 503 and body["error"] == "token_unavailable"


async def test_a_refused_or_unreadable_subject_token_backs_off_and_no_token_is_shown(sts_server, proxy, tmp_path):
    base, st, ast = await sts_server()
    expired = k8s_token(expires_in=-120)
    (tmp_path / "expired").write_text(expired + "\n")
    forged = k8s_token(key=_keypair()[0])
    (tmp_path / "forged").write_text(forged)
    echoed = k8s_token()
    (tmp_path / "echoed").write_text(echoed)
    (tmp_path / "empty").write_text("\n")  # the kubelet has not written it yet
    echo_base, echo_st, _ = await sts_server()
    echo_st.fail(400, {"error": "invalid_request", "error_description": f"cannot parse {echoed}"}, times=100)
    services = {
        "expired": service(base, tmp_path / "expired", client_auth="none"),
        "forged": service(base, tmp_path / "forged", client_auth="none"),
        "echo": service(echo_base, tmp_path / "echoed", client_auth="none"),
        "empty": service(base, tmp_path / "empty", client_auth="none"),
    }
    p = await proxy({"services": services})

    async def all_failed() -> Any:
        status, doc = await p.get_json("/-/readyz")
        got = doc["services"]
        return got if status == 503 and all(got[n]["last_error"] for n in services) else None

    got = await wait_for(all_failed)
    assert all(got[n]["state"] == "backoff" for n in services), got
    assert "400 invalid_grant: subject_token has expired" in got["expired"]["last_error"]
    assert "invalid_grant: subject_token signature is invalid" in got["forged"]["last_error"]
    assert "invalid_request: cannot parse ***" in got["echo"]["last_error"]
    assert got["empty"]["last_error"] == f"subject_token_file: {tmp_path / 'empty'} is empty"
    with pytest.raises(CredentialError, match="subject_token_file: .*gone does not exist"):
        read_token_file(str(tmp_path / "gone"), "subject_token_file")  # a volume being remounted
    shown = json.dumps(got) + "\n".join(CAPTURED)
    for token in (expired, forged, echoed):
        assert token not in shown
    status, body = await api(p, "/expired/x")
    assert status == 503 and body["error"] == "token_unavailable"
    assert ast.refusals["subject_token has expired"] >= 1


async def test_authproxy_token_exchanges_with_the_real_cli(sts_server, tmp_path):
    base, st, ast = await sts_server()
    subject = k8s_token()
    (tmp_path / "token").write_text(subject + "\n")
    cfg = write_config(
        tmp_path / "c.yaml",
        {"state_dir": str(tmp_path / "state"), "services": {"wi": service(base, Path("token"), client_auth="none", audience="api")}},
    )
    out = await asyncio.to_thread(run_cli, "token", "wi", "-c", str(cfg), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in st.access
    assert ast.exchanges[0].subject_token == subject and ast.exchanges[0].audience == ["api"]
    assert subject not in out.stderr


def test_config_errors_exit_2_via_authproxy_check(tmp_path):
    (tmp_path / "t").write_text("x")
    base = "https://sts.example.test"

    def svc(**auth: Any) -> dict[str, Any]:
        return {"upstream": base, "auth": {"scheme": "oauth2", "token_url": base + "/token", **auth}}

    cases = {
        "nofile": (svc(grant="token_exchange", client_auth="none"), "auth.subject_token_file: required with grant: token_exchange"),
        "actor": (svc(grant="token_exchange", client_auth="none", subject_token_file="t", actor_token_file="t"), "auth.actor_token_type: actor_token_file and actor_token_type go together"),
        "aud": (svc(client_id="c", client_secret="s", audience="api"), "auth.audience: only used with grant: token_exchange"),
        "res": (svc(grant="token_exchange", client_auth="none", subject_token_file="t", resource=["https://ok.example", "https://x.example/#frag"]), "auth.resource[1]: an absolute URI without a fragment"),
        "type": (svc(grant="token_exchange", client_auth="none", subject_token_file="t", subject_token_type="jwt"), "auth.subject_token_type: a token type URI"),
        "public": (svc(client_id="c", client_auth="none"), "auth.client_auth: none (a public client) works only with grant: authorization_code"),
        "noid": (svc(grant="token_exchange", client_auth="client_secret_post", client_secret="s", subject_token_file="t"), "auth.client_id: required"),
        "missing": (svc(grant="token_exchange", client_auth="none", subject_token_file="absent"), "auth.subject_token_file: file"),
    }
    cfg = write_config(tmp_path / "bad.yaml", {"state_dir": str(tmp_path / "state"), "services": {n: s for n, (s, _) in cases.items()}})
    out = run_cli("check", "-c", str(cfg), cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    for name, (_, message) in cases.items():
        assert f"services.{name}.{message}" in out.stderr, (name, out.stderr)


async def test_mock_sts_is_strict(sts_server):
    """What the scheme's tests rely on: a client bug fails here."""
    base, st, ast = await sts_server()
    url = base + mock.TOKEN_PATH

    async def post(**form: str) -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as s:
            async with s.post(url, data={"grant_type": sts.TOKEN_EXCHANGE, **form}) as r:
                return r.status, await r.json()

    jwt_type = "urn:ietf:params:oauth:token-type:jwt"
    good = k8s_token()
    assert (await post(subject_token=good, subject_token_type=jwt_type))[0] == 200
    for form, error, why in [
        ({"subject_token": k8s_token(aud="elsewhere"), "subject_token_type": jwt_type}, "invalid_grant", "audience does not match"),
        ({"subject_token": good, "subject_token_type": ACCESS_TYPE}, "invalid_request", "is not supported"),
        ({"subject_token": good}, "invalid_request", "are required"),
        ({"subject_token": good, "subject_token_type": jwt_type, "actor_token": good}, "invalid_request", "go together"),
        ({"subject_token": "not-a-jwt", "subject_token_type": jwt_type}, "invalid_grant", "is not a JWT"),
        ({"subject_token": good, "subject_token_type": jwt_type, "client_id": "nobody"}, "invalid_client", "unknown client"),
    ]:
        status, body = await post(**form)
        assert body["error"] == error and why in body["error_description"], (form, body)
    # A client_credentials request still needs client authentication: only the open grants do not.
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data={"grant_type": "client_credentials"}) as r:
            assert r.status == 401 and (await r.json())["error"] == "invalid_client"
