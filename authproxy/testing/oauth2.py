"""A strict OAuth 2.0 authorization server and protected resource, for tests and the demo.

Modelled on Bugfender's token endpoint (``POST /auth/token``, form-encoded,
``{"access_token", "token_type": "bearer", "expires_in": 3600}``) and on the RFCs
a certified server enforces, so that a client bug shows up here rather than in
production:

- client authentication (RFC 6749 §2.3): secret in the body, HTTP Basic with
  each part form-urlencoded (§2.3.1), or an RFC 7523 JWT assertion checked
  against the registered public key (signature, ``iss``/``sub``, ``aud``, ``exp``,
  ``nbf``/``iat``, lifetime ≤ 120 s, ``jti`` never seen before); never more than one;
- ``authorization_code`` with PKCE S256 (RFC 7636), ``state`` passed through and
  ``iss`` in the authorization response (RFC 9207); the authorization endpoint
  approves at once (there is no person to ask) and redirects;
- refresh-token rotation where presenting a rotated-out refresh token revokes
  the whole grant (RFC 9700 §4.14.2);
- revocation (RFC 7009) and metadata (RFC 8414);
- a protected resource under ``/api/`` that answers 401 with
  ``WWW-Authenticate: Bearer error="invalid_token"`` for a bad or expired token.

``app[STATE]`` holds the counters and switches tests use.
Run it alone: ``python -m authproxy.testing oauth2 --port 9103`` (demo clients
below; set ``OAUTH2_MOCK_PUBLIC_KEY=public-key.pem`` to register
``demo-jwt-client`` for private_key_jwt).
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from aiohttp import web

from authproxy.testing import DemoService, TourStep
from authproxy.testing import oauth2_assertions, oauth2_device
from authproxy.testing.oauth2_client_auth import authenticate, issuer as _issuer
from authproxy.testing.oauth2_grants import GRANTS, scope_for as _scope
from authproxy.testing.oauth2_model import *  # noqa: F403 - the mock's data is part of its API
from authproxy.testing.oauth2_model import (
    API_PATH,
    AUTHORIZE_PATH,
    CODE_LIFETIME,
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    LOOPBACK_HOSTS,
    OOB,
    REVOKE_PATH,
    SECRET_PARAMS,
    STATE,
    TOKEN_PATH,
    Client,
    Code,
    OAuth2State,
    OAuthFail,
)


# --------------------------------------------------------------------------- the token endpoint


async def _token(request: web.Request) -> web.Response:
    st = request.app[STATE]
    st.arrivals.append(request.transport.get_extra_info("peername") if request.transport else None)
    if st.token_delay:
        # A busy server: the request waits before it is read. A client that went away
        # meanwhile (killed, timed out) left nothing to process — its refresh token
        # was never presented, so it is not rotated either.
        await asyncio.sleep(st.token_delay)
        if request.transport is None or request.transport.is_closing():
            st.token_requests_abandoned += 1
            return web.Response(status=499, text="client closed the request\n")
    if request.method != "POST":
        return web.Response(status=405, headers={"Allow": "POST"}, text="POST only\n")
    try:
        form = await _form(request)
    except OAuthFail as e:
        return _failed(st, e)
    grant = form.get("grant_type", "")
    st.token_requests[grant or "(none)"] += 1
    st.token_params.append({k: "***" if k in SECRET_PARAMS else v for k, v in form.items()})
    if st.fail_next:
        status, body, ctype = st.fail_next.pop(0)
        return web.Response(status=status, text=body, content_type=ctype)
    try:
        client, method = oauth2_assertions.unauthenticated(request, grant, form) or authenticate(request, form)
        handler = GRANTS.get(grant)
        if handler is None:
            raise OAuthFail("unsupported_grant_type", f"grant_type {grant!r} is not supported")
        if client.grants is not None and grant not in client.grants:
            raise OAuthFail("unauthorized_client", f"this client may not use {grant}")
        reply = await handler(request, st, client, form)
    except OAuthFail as e:
        return _failed(st, e)
    return web.json_response(reply, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


async def _form(request: web.Request) -> dict[str, str]:
    if request.content_type != "application/x-www-form-urlencoded":
        raise OAuthFail("invalid_request", "the body must be application/x-www-form-urlencoded")
    if request.query_string:
        raise OAuthFail("invalid_request", "token request parameters belong in the body, not the URL")
    pairs = parse_qsl(await request.text(), keep_blank_values=True)
    request[oauth2_assertions.FORM_PAIRS] = pairs  # repeatable parameters, as sent
    names = [k for k, _ in pairs]
    for name in names:
        if names.count(name) > 1 and name not in oauth2_assertions.REPEATABLE_PARAMS:
            raise OAuthFail("invalid_request", f"parameter {name} is repeated (RFC 6749 §3.2)")
    return dict(pairs)


def _failed(st: OAuth2State, e: OAuthFail) -> web.Response:
    st.token_errors[e.error] += 1
    return e.response()


# --------------------------------------------------------------------------- authorization endpoint


def _redirect_allowed(client: Client, uri: str) -> bool:
    parts = urlsplit(uri)
    for registered in client.redirect_uris:
        if registered == uri:
            return True
        reg = urlsplit(registered.rstrip("*"))
        if parts.scheme != "http" or reg.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS:
            continue
        if parts.hostname != reg.hostname or parts.query or parts.fragment:
            continue
        # RFC 8252 §7.3: any port on a loopback redirect.
        if parts.path == reg.path or (registered.endswith("*") and parts.path.startswith(reg.path)):
            return True
    return False


async def _authorize(request: web.Request) -> web.Response:
    st = request.app[STATE]
    st.authorize_requests += 1
    q = request.query
    if len(set(q)) != len(q):
        return _page(400, "Bad request", "A parameter is repeated.")
    client = st.clients.get(q.get("client_id", ""))
    if client is None:
        return _page(400, "Unknown client", "client_id is not registered.")
    redirect_uri = q.get("redirect_uri", "")
    if not redirect_uri or not _redirect_allowed(client, redirect_uri):
        # Never redirect to an unregistered address (RFC 6749 §4.1.2.1).
        return _page(400, "Bad redirect_uri", "redirect_uri is missing or not registered for this client.")

    def error(code: str, description: str) -> web.Response:
        return _respond(request, redirect_uri, {"error": code, "error_description": description})

    if q.get("response_type") != "code":
        return error("unsupported_response_type", "only response_type=code is supported")
    if client.grants is not None and "authorization_code" not in client.grants:
        return error("unauthorized_client", "this client may not use authorization_code")
    try:
        scope = _scope(client, q.get("scope"), None)
    except OAuthFail as e:
        return error(e.error, e.description)
    challenge = q.get("code_challenge")
    if challenge is not None:
        if q.get("code_challenge_method") != "S256":
            return error("invalid_request", "code_challenge_method must be S256")
        if len(challenge) != 43 or not all(c.isalnum() or c in "-_" for c in challenge):
            return error("invalid_request", "code_challenge is not a base64url SHA-256")
    elif client.public:
        return error("invalid_request", "PKCE is required for public clients")
    if st.authorize_error:
        return error(st.authorize_error, "the resource owner denied the request")
    code = secrets.token_urlsafe(24)
    st.codes[code] = Code(client.client_id, redirect_uri, scope, challenge, time.time() + CODE_LIFETIME)
    return _respond(request, redirect_uri, {"code": code})


def _respond(request: web.Request, redirect_uri: str, params: dict[str, str]) -> web.Response:
    st = request.app[STATE]
    state = request.query.get("state")
    if state is not None:
        params["state"] = state
    if st.send_iss:
        params["iss"] = st.iss_override or _issuer(request)
    if redirect_uri == OOB:
        if "code" in params:
            return _page(200, "Authorization code", "Copy this code into the application:", code=params["code"])
        return _page(400, "Authorization failed", f"{params['error']}: {params.get('error_description', '')}")
    sep = "&" if "?" in redirect_uri else "?"
    return web.Response(status=302, headers={"Location": redirect_uri + sep + urlencode(params, quote_via=quote), "Cache-Control": "no-store"})


def _page(status: int, title: str, text: str, code: str | None = None) -> web.Response:
    body = f"<!doctype html><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>"
    if code is not None:
        body += f'<p><input id="code" readonly size="40" value="{html.escape(code)}"></p>'
    return web.Response(status=status, text=body + "\n", content_type="text/html", headers={"Cache-Control": "no-store"})


# --------------------------------------------------------------------------- revocation, metadata, resource


async def _revoke(request: web.Request) -> web.Response:
    st = request.app[STATE]
    try:
        form = await _form(request)
        client, _ = authenticate(request, form)
        token = form.get("token")
        if not token:
            raise OAuthFail("invalid_request", "token is required")
        hint = form.get("token_type_hint", "")
        if hint not in ("", "refresh_token", "access_token"):
            raise OAuthFail("unsupported_token_type", f"token_type_hint {hint!r} is not supported")
    except OAuthFail as e:
        return e.response()
    rt = st.refresh.get(token)
    at = st.access.get(token)
    owner = rt.client_id if rt else at.client_id if at else None
    if owner is not None and owner != client.client_id:
        return OAuthFail("invalid_request", "the token was issued to another client").response()
    st.revocations.append(hint)
    if rt is not None:
        st._kill(st.grants[rt.grant_id])
    elif at is not None:
        at.revoked = True
    return web.Response(status=200, headers={"Cache-Control": "no-store"})  # unknown tokens too (RFC 7009 §2.2)


async def _metadata(request: web.Request) -> web.Response:
    base = f"{request.scheme}://{request.host}"
    return web.json_response(
        {
            "issuer": _issuer(request),
            "authorization_endpoint": base + AUTHORIZE_PATH,
            "token_endpoint": base + TOKEN_PATH,
            "revocation_endpoint": base + REVOKE_PATH,
            "device_authorization_endpoint": base + oauth2_device.DEVICE_PATH,
            "grant_types_supported": sorted(GRANTS),
            "response_types_supported": ["code"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic", "private_key_jwt", "tls_client_auth", "none"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS256", "ES256"],
            "code_challenge_methods_supported": ["S256"],
            "authorization_response_iss_parameter_supported": True,
        }
    )


async def _api(request: web.Request) -> web.Response:
    st = request.app[STATE]
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        st.api_rejected += 1
        return _unauthorized(None)
    info = st.access.get(token.strip())
    if info is None or info.revoked or (info.expires_at is not None and info.expires_at <= time.time()):
        st.api_rejected += 1
        return _unauthorized("The access token is invalid, revoked or expired")
    st.api_ok += 1
    return web.json_response(
        {
            "ok": True,
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "client_id": info.client_id,
            "scope": info.scope,
            "token_serial": info.serial,
        }
    )


def _unauthorized(description: str | None) -> web.Response:
    challenge = 'Bearer realm="mock-api"'
    if description is not None:
        challenge += f', error="invalid_token", error_description="{description}"'
    return web.json_response({"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": challenge})


# --------------------------------------------------------------------------- the app


def demo_clients(public_key_pem: bytes | None = None) -> list[Client]:
    """The clients of the stand-alone mock and the demo (no real secrets)."""
    clients = [
        Client(DEMO_CLIENT_ID, secret=DEMO_CLIENT_SECRET),
        Client("demo-public", methods=frozenset({"none"}), grants=frozenset({"authorization_code", "refresh_token"})),
    ]
    if public_key_pem is not None:
        clients.append(Client("demo-jwt-client", public_key_pem=public_key_pem, methods=frozenset({"private_key_jwt"})))
    return clients


def make_app(
    *,
    clients: Iterable[Client] | None = None,
    token_lifetime: int | None = 3600,
    issuer: str | None = None,
    rotate_refresh_tokens: bool = True,
    public_key_file: str | None = None,
) -> web.Application:
    """``clients``: the registrations (default: :func:`demo_clients`, with ``demo-jwt-client``
    when ``public_key_file`` or ``$OAUTH2_MOCK_PUBLIC_KEY`` names a PEM public key)."""
    if clients is None:
        path = public_key_file or os.environ.get("OAUTH2_MOCK_PUBLIC_KEY")
        pem = Path(path).read_bytes() if path else None
        clients = demo_clients(pem)
    app = web.Application()
    app[STATE] = OAuth2State(
        clients={c.client_id: c for c in clients},
        issuer=issuer,
        token_lifetime=token_lifetime,
        rotate_refresh_tokens=rotate_refresh_tokens,
    )
    app.router.add_route("*", TOKEN_PATH, _token)
    app.router.add_route("GET", AUTHORIZE_PATH, _authorize)
    app.router.add_post(REVOKE_PATH, _revoke)
    app.router.add_get("/.well-known/oauth-authorization-server", _metadata)
    app.router.add_route("*", API_PATH + "/{tail:.*}", _api)
    oauth2_device.install(app)  # RFC 8628: /auth/device, /device and the device_code grant
    oauth2_assertions.install(app)  # RFC 8693 token exchange, RFC 7523 §2.1 JWT-bearer
    return app


# --------------------------------------------------------------------------- authproxy demo


def demo() -> DemoService:
    app = make_app(clients=demo_clients())
    st = app[STATE]

    def config(base: str) -> dict[str, Any]:
        return {
            "upstream": base + API_PATH,
            "auth": {
                "scheme": "oauth2",
                "token_url": base + TOKEN_PATH,
                "client_id": DEMO_CLIENT_ID,
                "client_auth": "client_secret_basic",
                "client_secret": DEMO_CLIENT_SECRET,
                "scope": "read",
            },
        }

    def show(status: int, headers: dict[str, str], body: bytes) -> str:
        try:
            doc = json.loads(body)
            return f"{doc['path']} served with access token #{doc['token_serial']} ({doc['client_id']}, scope {doc['scope']})"
        except (ValueError, KeyError, TypeError):
            return f"{body[:120].decode('utf-8', 'replace')}"

    tour = [
        TourStep("first request: authproxy gets an access token (client_credentials, HTTP Basic) and sends it as a Bearer", path="/bugfender/v1/apps", show=show),
        TourStep("the next request reuses the cached token: no new token request", path="/bugfender/v1/devices?limit=5", show=show),
        TourStep(
            "a client's own Authorization header is replaced, never forwarded",
            path="/bugfender/v1/apps",
            headers={"Authorization": "Bearer made-up-by-the-client"},
            show=show,
        ),
        TourStep("the server revokes every access token (as on a signing-key rotation)", action=st.revoke_access_tokens),
        TourStep("the API answers 401 invalid_token: authproxy gets a new token and replays the request once", path="/bugfender/v1/apps", show=show),
    ]

    def summary() -> str:
        grants = ", ".join(f"{k}={v}" for k, v in sorted(st.token_requests.items())) or "none"
        return f"token requests: {grants}; API requests served: {st.api_ok}, rejected with 401: {st.api_rejected}"

    return DemoService("bugfender", app, config, tour, summary)
