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
import base64
import binascii
import hmac
import html
import json
import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import parse_qsl, quote, unquote_plus, urlencode, urlsplit

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from authproxy.schemes import rfc7636
from authproxy.testing import DemoService, TourStep

STATE: web.AppKey["OAuth2State"] = web.AppKey("oauth2_state")

TOKEN_PATH = "/auth/token"
AUTHORIZE_PATH = "/auth/authorize"
REVOKE_PATH = "/auth/revoke"
API_PATH = "/api"
OOB = "urn:ietf:wg:oauth:2.0:oob"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_LIFETIME = 120
LEEWAY = 5  # seconds of clock skew allowed on assertion times
CODE_LIFETIME = 60
SECRET_METHODS = frozenset({"client_secret_post", "client_secret_basic"})
ALL_GRANTS = frozenset({"client_credentials", "authorization_code", "refresh_token"})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
SECRET_PARAMS = frozenset({"client_secret", "client_assertion", "refresh_token", "code", "code_verifier", "token"})

# The clients `python -m authproxy.testing oauth2` and `authproxy demo` know.
DEMO_CLIENT_ID = "demo-client"
DEMO_CLIENT_SECRET = "demo-secret"
DEMO_REDIRECTS = (
    OOB,
    "http://127.0.0.1/callback",
    "http://localhost/callback",
    "http://[::1]/callback",
    "http://127.0.0.1/-/callback/*",
    "http://localhost/-/callback/*",
    "http://[::1]/-/callback/*",
)


# --------------------------------------------------------------------------- registrations and records


@dataclass
class Client:
    """A registered client. ``redirect_uris``: exact, except that a loopback one
    matches on any port (RFC 8252 §7.3) and one ending in ``*`` matches a path prefix."""

    client_id: str
    secret: str | None = None
    public_key_pem: bytes | None = None
    methods: frozenset[str] = SECRET_METHODS
    grants: frozenset[str] = ALL_GRANTS
    redirect_uris: tuple[str, ...] = DEMO_REDIRECTS
    scopes: frozenset[str] = frozenset({"read", "write", "offline_access"})
    default_scope: str = "read"

    @property
    def public(self) -> bool:
        return self.methods == frozenset({"none"})


@dataclass
class Grant:
    grant_id: str
    client_id: str
    scope: str
    active: bool = True


@dataclass
class AccessToken:
    client_id: str
    scope: str
    expires_at: float | None
    serial: int
    grant_id: str | None = None
    revoked: bool = False


@dataclass
class RefreshToken:
    client_id: str
    grant_id: str
    rotated: bool = False  # replaced by a newer one: presenting it again is reuse


@dataclass
class Code:
    client_id: str
    redirect_uri: str
    scope: str
    challenge: str | None
    expires_at: float
    used: bool = False
    grant_id: str | None = None


@dataclass
class OAuth2State:
    clients: dict[str, Client]
    issuer: str | None = None  # None: http://HOST of the request
    token_lifetime: int | None = 3600  # None: replies carry no expires_in
    rotate_refresh_tokens: bool = True
    token_type: str = "bearer"
    send_iss: bool = True  # iss in authorization responses (RFC 9207)
    iss_override: str | None = None  # send this iss instead (a mix-up attack)
    authorize_error: str | None = None  # e.g. access_denied: the person said no
    token_delay: float = 0.0  # seconds every token request takes
    fail_next: list[tuple[int, str, str]] = field(default_factory=list)  # (status, body, content type)
    # counters
    token_requests: Counter[str] = field(default_factory=Counter)  # by grant_type
    token_errors: Counter[str] = field(default_factory=Counter)  # by error code
    token_params: list[dict[str, str]] = field(default_factory=list)  # each request's form, secret values as ***
    refresh_tokens_presented: list[str] = field(default_factory=list)
    refresh_reuse: int = 0  # rotated-out refresh tokens presented (each kills a grant)
    token_requests_abandoned: int = 0  # its client went away during token_delay: never processed
    arrivals: list[Any] = field(default_factory=list)  # the client address of each token request, on arrival
    revocations: list[str] = field(default_factory=list)  # token_type_hint of each revocation
    authorize_requests: int = 0
    api_ok: int = 0
    api_rejected: int = 0
    # records
    access: dict[str, AccessToken] = field(default_factory=dict)
    refresh: dict[str, RefreshToken] = field(default_factory=dict)
    grants: dict[str, Grant] = field(default_factory=dict)
    codes: dict[str, Code] = field(default_factory=dict)
    jtis: dict[str, float] = field(default_factory=dict)
    assertions: list[str] = field(default_factory=list)  # every client assertion received
    serial: int = 0

    # ---- switches for tests and the demo
    def revoke_access_tokens(self) -> None:
        """Every access token issued so far is now invalid (as after a signing-key rotation)."""
        for tok in self.access.values():
            tok.revoked = True

    def revoke_grants(self) -> None:
        """Every grant is revoked: refresh tokens get invalid_grant (a person must log in again)."""
        for grant in self.grants.values():
            self._kill(grant)

    def fail(self, status: int, body: str | dict[str, Any], times: int = 1, content_type: str | None = None) -> None:
        """Answer the next ``times`` token requests with this reply."""
        text = json.dumps(body) if isinstance(body, dict) else body
        ctype = content_type or ("application/json" if isinstance(body, dict) else "text/html")
        self.fail_next.extend([(status, text, ctype)] * times)

    def valid_refresh_tokens(self) -> list[str]:
        return [t for t, r in self.refresh.items() if not r.rotated and self.grants[r.grant_id].active]

    # ---- internals
    def _kill(self, grant: Grant) -> None:
        grant.active = False
        for tok in self.access.values():
            if tok.grant_id == grant.grant_id:
                tok.revoked = True

    def _issue(self, client: Client, scope: str, grant: Grant | None, with_refresh: bool = True) -> dict[str, Any]:
        self.serial += 1
        token = f"at-{secrets.token_urlsafe(24)}"
        lifetime = self.token_lifetime
        expires_at = None if lifetime is None else time.time() + lifetime
        self.access[token] = AccessToken(client.client_id, scope, expires_at, self.serial, grant.grant_id if grant else None)
        reply: dict[str, Any] = {"access_token": token, "token_type": self.token_type}
        if lifetime is not None:
            reply["expires_in"] = lifetime
        if grant is not None and with_refresh:
            rt = f"rt-{secrets.token_urlsafe(32)}"
            self.refresh[rt] = RefreshToken(client.client_id, grant.grant_id)
            reply["refresh_token"] = rt
        reply["scope"] = scope
        return reply


class OAuthFail(Exception):
    """An RFC 6749 §5.2 error reply."""

    def __init__(self, error: str, description: str, status: int = 400, basic: bool = False) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        self.basic = basic

    def response(self) -> web.Response:
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        if self.basic:
            headers["WWW-Authenticate"] = 'Basic realm="mock-oauth2", charset="UTF-8"'
        return web.json_response({"error": self.error, "error_description": self.description}, status=self.status, headers=headers)


# --------------------------------------------------------------------------- client authentication


def _token_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}{TOKEN_PATH}"


def _issuer(request: web.Request) -> str:
    st = request.app[STATE]
    return st.issuer or f"{request.scheme}://{request.host}"


def authenticate(request: web.Request, form: dict[str, str]) -> tuple[Client, str]:
    """Who is calling, by exactly one method (RFC 6749 §2.3) → (client, method)."""
    st = request.app[STATE]
    header = request.headers.get("Authorization")
    used = [m for m, present in (
        ("client_secret_basic", header is not None),
        ("client_secret_post", "client_secret" in form),
        ("private_key_jwt", "client_assertion" in form or "client_assertion_type" in form),
    ) if present]
    if len(used) > 1:
        raise OAuthFail("invalid_request", "more than one client authentication method was used (RFC 6749 §2.3)")
    method = used[0] if used else "none"
    if method == "client_secret_basic":
        client_id, secret = _basic(header or "")
        if "client_id" in form and form["client_id"] != client_id:
            raise OAuthFail("invalid_request", "client_id in the body differs from the Basic credentials")
        client = st.clients.get(client_id)
        if client is None or client.secret is None or not hmac.compare_digest(client.secret.encode(), secret.encode()):
            raise OAuthFail("invalid_client", "client authentication failed", 401, basic=True)
    elif method == "client_secret_post":
        client = st.clients.get(form.get("client_id", ""))
        if client is None or client.secret is None or not hmac.compare_digest(client.secret.encode(), form["client_secret"].encode()):
            raise OAuthFail("invalid_client", "client authentication failed", 401)
    elif method == "private_key_jwt":
        client = _verify_assertion(request, form)
    else:
        client = st.clients.get(form.get("client_id", ""))
        if client is None:
            raise OAuthFail("invalid_client", "unknown client or no client authentication", 401)
        if not client.public:
            raise OAuthFail("invalid_client", "this client must authenticate", 401)
    if method not in client.methods:
        raise OAuthFail("invalid_client", f"this client is not registered for {method}", 401, basic=method == "client_secret_basic")
    return client, method


def _basic(header: str) -> tuple[str, str]:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        raise OAuthFail("invalid_client", "unsupported Authorization scheme", 401, basic=True)
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise OAuthFail("invalid_client", "malformed Basic credentials", 401, basic=True) from None
    if ":" not in decoded:
        raise OAuthFail("invalid_client", "malformed Basic credentials", 401, basic=True)
    raw_id, _, raw_secret = decoded.partition(":")
    # RFC 6749 §2.3.1: both parts were form-urlencoded before base64.
    return unquote_plus(raw_id), unquote_plus(raw_secret)


def _verify_assertion(request: web.Request, form: dict[str, str]) -> Client:
    st = request.app[STATE]

    def fail(why: str) -> OAuthFail:
        return OAuthFail("invalid_client", f"client assertion rejected: {why}", 401)

    if form.get("client_assertion_type") != ASSERTION_TYPE:
        raise fail(f"client_assertion_type must be {ASSERTION_TYPE}")
    assertion = form.get("client_assertion", "")
    st.assertions.append(assertion)
    try:
        header = jwt.get_unverified_header(assertion)
        unverified = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise fail("not a JWT") from None
    alg = header.get("alg")
    if alg not in ("RS256", "ES256"):
        raise fail(f"alg {alg!r} is not accepted")
    iss = unverified.get("iss")
    client = st.clients.get(iss) if isinstance(iss, str) else None
    if client is None or client.public_key_pem is None:
        raise fail("iss is not a client registered with a public key")
    if unverified.get("sub") != iss:
        raise fail("sub must equal iss (the client_id)")
    if "client_id" in form and form["client_id"] != iss:
        raise fail("client_id differs from the assertion's iss")
    key = serialization.load_pem_public_key(client.public_key_pem)
    if (alg == "RS256") != isinstance(key, rsa.RSAPublicKey) or (alg == "ES256") != isinstance(key, ec.EllipticCurvePublicKey):
        raise fail(f"alg {alg} does not match the registered key")
    try:
        claims = jwt.decode(
            assertion,
            key,  # type: ignore[arg-type]
            algorithms=[alg],
            audience=[_token_url(request), _issuer(request)],
            leeway=LEEWAY,
            options={"require": ["iss", "sub", "aud", "exp", "iat", "nbf", "jti"]},
        )
    except jwt.InvalidSignatureError:
        raise fail("bad signature") from None
    except jwt.PyJWTError as e:
        raise fail(str(e)) from None
    if claims["exp"] - claims["iat"] > MAX_ASSERTION_LIFETIME:
        raise fail(f"lives longer than {MAX_ASSERTION_LIFETIME} s")
    now = time.time()
    for jti, exp in list(st.jtis.items()):
        if exp + LEEWAY < now:
            del st.jtis[jti]
    jti = str(claims["jti"])
    if jti in st.jtis:
        raise fail("jti seen before (replayed assertion)")
    st.jtis[jti] = float(claims["exp"])
    return client


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
        client, method = authenticate(request, form)
        if grant not in ALL_GRANTS:
            raise OAuthFail("unsupported_grant_type", f"grant_type {grant!r} is not supported")
        if grant not in client.grants or (grant == "client_credentials" and client.public):
            raise OAuthFail("unauthorized_client", f"this client may not use {grant}")
        if grant == "client_credentials":
            reply = st._issue(client, _scope(client, form.get("scope"), None), None)
        elif grant == "authorization_code":
            reply = _code_grant(st, client, form)
        else:
            reply = _refresh_grant(st, client, form)
    except OAuthFail as e:
        return _failed(st, e)
    return web.json_response(reply, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


async def _form(request: web.Request) -> dict[str, str]:
    if request.content_type != "application/x-www-form-urlencoded":
        raise OAuthFail("invalid_request", "the body must be application/x-www-form-urlencoded")
    if request.query_string:
        raise OAuthFail("invalid_request", "token request parameters belong in the body, not the URL")
    pairs = parse_qsl(await request.text(), keep_blank_values=True)
    names = [k for k, _ in pairs]
    for name in names:
        if names.count(name) > 1:
            raise OAuthFail("invalid_request", f"parameter {name} is repeated (RFC 6749 §3.2)")
    return dict(pairs)


def _failed(st: OAuth2State, e: OAuthFail) -> web.Response:
    st.token_errors[e.error] += 1
    return e.response()


def _scope(client: Client, requested: str | None, allowed: str | None) -> str:
    if requested is None:
        return allowed if allowed is not None else client.default_scope
    wanted = set(requested.split())
    limit = set(allowed.split()) if allowed is not None else client.scopes
    if not wanted or not wanted <= limit:
        raise OAuthFail("invalid_scope", f"scope {requested!r} is not allowed")
    return " ".join(sorted(wanted))


def _code_grant(st: OAuth2State, client: Client, form: dict[str, str]) -> dict[str, Any]:
    code = st.codes.get(form.get("code", ""))
    if code is None or code.client_id != client.client_id:
        raise OAuthFail("invalid_grant", "unknown authorization code")
    if code.used:
        if code.grant_id in st.grants:  # RFC 6749 §4.1.2: a code used twice revokes what it gave
            st._kill(st.grants[code.grant_id])
        raise OAuthFail("invalid_grant", "authorization code already used")
    code.used = True
    if time.time() > code.expires_at:
        raise OAuthFail("invalid_grant", "authorization code expired")
    if form.get("redirect_uri") != code.redirect_uri:
        raise OAuthFail("invalid_grant", "redirect_uri differs from the authorization request")
    verifier = form.get("code_verifier")
    if code.challenge is None:
        if verifier is not None:
            raise OAuthFail("invalid_grant", "code_verifier given but the authorization request had no code_challenge")
    else:
        if verifier is None:
            raise OAuthFail("invalid_grant", "code_verifier required (PKCE)")
        if not rfc7636.valid_verifier(verifier) or not hmac.compare_digest(rfc7636.challenge(verifier), code.challenge):
            raise OAuthFail("invalid_grant", "code_verifier does not match the code_challenge")
    grant = Grant(secrets.token_hex(8), client.client_id, code.scope)
    st.grants[grant.grant_id] = grant
    code.grant_id = grant.grant_id
    return st._issue(client, code.scope, grant)


def _refresh_grant(st: OAuth2State, client: Client, form: dict[str, str]) -> dict[str, Any]:
    presented = form.get("refresh_token", "")
    st.refresh_tokens_presented.append(presented)
    rec = st.refresh.get(presented)
    if rec is None or rec.client_id != client.client_id:
        raise OAuthFail("invalid_grant", "unknown refresh token")
    grant = st.grants[rec.grant_id]
    if rec.rotated:
        st.refresh_reuse += 1
        st._kill(grant)
        raise OAuthFail("invalid_grant", "refresh token already used; the grant is revoked")
    if not grant.active:
        raise OAuthFail("invalid_grant", "the grant has been revoked")
    scope = _scope(client, form.get("scope"), grant.scope)
    reply = st._issue(client, scope, grant, with_refresh=st.rotate_refresh_tokens)
    if st.rotate_refresh_tokens:
        rec.rotated = True
    return reply


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
    if "authorization_code" not in client.grants:
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
            "grant_types_supported": sorted(ALL_GRANTS),
            "response_types_supported": ["code"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic", "private_key_jwt", "none"],
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
