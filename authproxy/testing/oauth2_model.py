"""The strict OAuth 2.0 mock's data: registrations, records, the state tests read,
and the RFC 6749 §5.2 error reply. See :mod:`authproxy.testing.oauth2`."""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

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
    grants: frozenset[str] | None = None  # None: every grant the mock knows
    redirect_uris: tuple[str, ...] = DEMO_REDIRECTS
    scopes: frozenset[str] = frozenset({"read", "write", "offline_access"})
    default_scope: str = "read"
    # RFC 8705 §2.1.2, for tls_client_auth: the one registered name the client certificate
    # must carry, e.g. ("tls_client_auth_subject_dn", "CN=a,O=b") or ("tls_client_auth_san_dns", "a.example").
    tls_client_auth: tuple[str, str] | None = None

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
    client_certs: list[str | None] = field(default_factory=list)  # tls_client_auth: each request's certificate subject
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




STATE: web.AppKey[OAuth2State] = web.AppKey("oauth2_state")
