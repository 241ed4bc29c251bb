"""Client certificates (mTLS): the service ``tls`` key and ``client_auth: tls_client_auth`` (RFC 8705 §2.1).

Against servers that refuse what real ones refuse: an API whose TLS handshake
fails without a client certificate from the test CA (and sends the TLS alert,
as nginx does), and the strict OAuth 2.0 mock served over TLS asking for an
optional client certificate and matching it to the client's registered subject
DN. Through the in-process proxy, the real CLI (``run`` and ``check``), and the
service runtime for the one case the configuration rules make impossible to
set up (a tls_client_auth request without a certificate).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import ssl
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import yaml
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from authproxy.config import load_config_text
from authproxy.runtime import ServiceRuntime
from authproxy.schemes.rfc6749 import OAuthError
from authproxy.store.statedir import StateDirStore
from authproxy.testing import oauth2 as mock
from tests.conftest import CAPTURED, free_port, http_get, run_cli, secret, wait_for, write_config
from tests.tls_servers import ClientCert, MtlsApi, Pki, start_tls

CLIENT = "mtls-client"
TOKEN = secret("mtls-static-token-value")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    folder = tmp_path / "pki"
    folder.mkdir()
    return Pki(folder)


@pytest.fixture
def cert(pki: Pki) -> ClientCert:
    """This client's certificate; a line of its key joins the log scan."""
    c = pki.client(CLIENT)
    secret(c.key_file.read_text().strip().splitlines()[1])
    return c


@pytest.fixture
def api(pki: Pki) -> Any:
    """The mTLS API (handshake refused without a certificate from the test CA)."""
    with MtlsApi(pki.server_context(ssl.CERT_REQUIRED)) as server:
        yield server


@pytest.fixture
async def token_server(pki: Pki) -> AsyncIterator[Callable[..., Any]]:
    """The strict OAuth 2.0 mock over TLS (client certificate optional at the TLS level:
    the mock answers a missing or foreign one with invalid_client). Its tokens join the log scan."""
    runners: list[web.AppRunner] = []
    apps: list[web.Application] = []

    async def start(subject_dn: str) -> tuple[str, mock.OAuth2State]:
        registered = mock.Client(CLIENT, methods=frozenset({"tls_client_auth"}), tls_client_auth=("tls_client_auth_subject_dn", subject_dn))
        app = mock.make_app(clients=[registered])
        apps.append(app)
        return await start_tls(app, pki.server_context(ssl.CERT_OPTIONAL), runners), app[mock.STATE]

    yield start
    for app in apps:
        for value in app[mock.STATE].access:
            secret(value)
    for r in runners:
        await r.cleanup()


def bearer_service(api_url: str, pki: Pki, cert: ClientCert | None) -> dict[str, Any]:
    svc: dict[str, Any] = {"upstream": api_url, "ca_file": str(pki.ca_file), "auth": {"scheme": "bearer", "token": TOKEN}}
    if cert is not None:
        svc["tls"] = cert.tls()
    return svc


def oauth2_service(api_url: str, token_base: str, pki: Pki, cert: ClientCert | None) -> dict[str, Any]:
    auth = {"scheme": "oauth2", "token_url": token_base + mock.TOKEN_PATH, "client_id": CLIENT, "client_auth": "tls_client_auth"}
    svc: dict[str, Any] = {"upstream": api_url, "ca_file": str(pki.ca_file), "auth": auth}
    if cert is not None:
        svc["tls"] = cert.tls()
    return svc


# --------------------------------------------------------------------------- the upstream


async def test_the_upstream_sees_the_client_certificate(proxy, pki, cert, api):
    p = await proxy({"services": {"svc": bearer_service(api.url, pki, cert)}})
    for path in ("/svc/a", "/svc/b"):  # the second on the kept-alive connection
        status, got = await p.get_json(path)
        assert status == 200 and got["client_subject"] == cert.subject_dn
    assert api.seen == [(cert.subject_dn, f"Bearer {TOKEN}")] * 2 and api.handshake_errors == []


async def test_without_tls_the_upstream_handshake_fails_with_a_clear_502(proxy, pki, api):
    seen = len(CAPTURED)  # the session's log so far: other tests log tracebacks on purpose
    p = await proxy({"services": {"svc": bearer_service(api.url, pki, None)}})
    status, got = await p.get_json("/svc/a")
    assert status == 502 and got["error"] == "upstream_unreachable", got
    assert api.url in got["message"] and "certificate required" in got["message"], got
    # the server's thread records the failed handshake on its own time: wait for it, bounded
    await wait_for(lambda: api.handshake_errors, timeout=10)
    assert api.seen == [] and "did not return a certificate" in api.handshake_errors[0]
    assert not [line for line in CAPTURED[seen:] if "Traceback" in line]


# --------------------------------------------------------------------------- tls_client_auth


async def test_tls_client_auth_gets_a_token_and_the_upstream_sees_the_same_certificate(proxy, pki, cert, api, token_server):
    base, st = await token_server(cert.subject_dn)
    p = await proxy({"services": {"svc": oauth2_service(api.url, base, pki, cert)}})
    status, got = await p.get_json("/svc/items")
    assert status == 200 and got["client_subject"] == cert.subject_dn, got
    assert st.client_certs == [cert.subject_dn]
    assert st.token_params == [{"grant_type": "client_credentials", "client_id": CLIENT}]  # no secret of any kind
    (token,) = st.access
    assert api.seen == [(cert.subject_dn, f"Bearer {token}")]


async def test_tls_client_auth_with_another_clients_certificate_is_an_error(proxy, pki, api, token_server):
    other = pki.client("another-client")
    base, st = await token_server(pki.client(CLIENT).subject_dn)
    p = await proxy({"services": {"svc": oauth2_service(api.url, base, pki, other)}})

    async def failed() -> Any:
        status, doc = await p.get_json("/-/readyz")
        return doc["services"]["svc"] if doc["services"]["svc"]["last_error"] else None

    got = await wait_for(failed)
    assert got["state"] == "error", got
    assert "401 invalid_client" in got["last_error"] and "is not the one registered for this client" in got["last_error"]
    assert st.client_certs == [other.subject_dn]
    status, body = await p.get_json("/svc/items")
    assert status == 503 and body["error"] == "token_unavailable" and api.seen == []


async def test_tls_client_auth_without_a_certificate_gets_the_servers_words(tmp_path, pki, cert, token_server):
    """The rules refuse tls_client_auth without tls, so the service is loaded with it and
    then stripped of it: the token request goes out with no certificate."""
    base, st = await token_server(cert.subject_dn)
    doc = {"state_dir": str(tmp_path / "state"), "services": {"svc": oauth2_service("https://127.0.0.1:1", base, pki, cert)}}
    cfg = load_config_text(yaml.safe_dump(doc), env={}).services["svc"]
    rt = ServiceRuntime(dataclasses.replace(cfg, tls=None), StateDirStore(tmp_path / "state"))
    try:
        with pytest.raises(OAuthError) as e:
            await rt.scheme.obtain(None)
    finally:
        await rt.close(revoke=False)
    assert e.value.refused and e.value.error == "invalid_client" and e.value.status == 401
    assert "tls_client_auth: no client certificate was presented in the TLS handshake" in e.value.message
    assert st.client_certs == [None] and st.access == {}


# --------------------------------------------------------------------------- the real CLI


async def test_cli_run_presents_the_certificate_upstream_and_to_the_token_endpoint(tmp_path, cli, pki, cert, api, token_server):
    base, st = await token_server(cert.subject_dn)
    port = free_port()
    cfg = write_config(
        tmp_path / "authproxy.yaml",
        {"listen": f"127.0.0.1:{port}", "state_dir": str(tmp_path / "state"), "shutdown_timeout": 2,
         "services": {"svc": oauth2_service(api.url, base, pki, cert), "plain": {**bearer_service(api.url, pki, None), "prefix": "/plain"}}},
    )  # fmt: skip
    proc = cli("run", "-c", str(cfg))
    await asyncio.to_thread(proc.wait_log, "listening")
    status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/svc/x", 10)
    assert status == 200 and json.loads(body)["client_subject"] == cert.subject_dn
    assert st.client_certs == [cert.subject_dn] and "client_secret" not in st.token_params[0]
    status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/plain/x", 10)
    assert status == 502 and "certificate required" in json.loads(body)["message"]
    proc.stop()
    assert proc.proc.returncode == 0 and "Traceback" not in proc.log()


def encrypted_key(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pass-phrase")))
    return path


def test_cli_check_refuses_every_unusable_tls_setting(tmp_path, pki, cert):
    """One run of ``authproxy check`` names each problem (exit 2), and no key's content."""
    other = pki.client("other")
    https, http = "https://127.0.0.1:1", "http://127.0.0.1:1"
    token = {"scheme": "oauth2", "token_url": https + "/token", "client_id": CLIENT, "client_auth": "tls_client_auth"}
    static = {"scheme": "bearer", "token": TOKEN}
    services = {
        "no-tls": {"upstream": https, "auth": token},
        "mismatch": {"upstream": https, "tls": {"cert_file": str(cert.cert_file), "key_file": str(other.key_file)}, "auth": static},
        "no-key": {"upstream": https, "tls": {"cert_file": str(cert.cert_file), "key_file": str(tmp_path / "gone.key")}, "auth": static},
        "half": {"upstream": https, "tls": {"cert_file": str(cert.cert_file)}, "auth": static},
        "encrypted": {"upstream": https, "tls": {"cert_file": str(cert.cert_file), "key_file": str(encrypted_key(tmp_path / "enc.key"))}, "auth": static},
        "not-a-key": {"upstream": https, "tls": {"cert_file": str(cert.cert_file), "key_file": str(cert.cert_file)}, "auth": static},
        "plain": {"upstream": http, "tls": cert.tls(), "auth": static},
        "http-token": {"upstream": https, "tls": cert.tls(), "auth": {**token, "token_url": http + "/token"}},
        "with-secret": {"upstream": https, "tls": cert.tls(), "auth": {**token, "client_secret": secret("tls-client-auth-unused-secret")}},
    }
    cfg = write_config(tmp_path / "bad.yaml", {"services": services})
    r = run_cli("check", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    expect = {
        "no-tls.auth.client_auth": "tls_client_auth authenticates with the service's client certificate: give the service tls",
        "mismatch.tls.key_file": f"{other.key_file} is not the key of the certificate in {cert.cert_file}",
        "no-key.tls.key_file": "does not exist",
        "half.tls.key_file": "required",
        "encrypted.tls.key_file": "is encrypted; give an unencrypted PEM key",
        "not-a-key.tls.key_file": "not an unencrypted PEM private key",
        "plain.tls": "not used: the upstream is plain http and no credential URL (token_url) is https",
        "http-token.auth.token_url": "must be an https URL with client_auth: tls_client_auth",
        "with-secret.auth.client_secret": "not used with client_auth: tls_client_auth",
    }
    lines = r.stderr.splitlines()
    for where, message in expect.items():
        assert [ln for ln in lines if f"services.{where}: " in ln and message in ln], (where, r.stderr)
    for key_file in (cert.key_file, other.key_file):
        body = "".join(key_file.read_text().strip().splitlines()[1:-1])
        assert body[:40] not in r.stderr + r.stdout
    assert "Traceback" not in r.stderr

    good = write_config(tmp_path / "good.yaml", {"services": {"svc": {"upstream": http, "tls": cert.tls(), "auth": token}}})
    r = run_cli("check", "-c", str(good), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
