"""The strict OAuth 2.0 mock's assertion grants: RFC 8693 token exchange and
RFC 7523 §2.1 JWT-bearer (Google's service-account flow).

Both are checked the way the real servers check them, so that a client bug shows
up here rather than in production:

- token exchange (as a cloud STS trading a Kubernetes service-account token): the
  subject token is a JWT signed by a *cluster* key this server trusts
  (:meth:`AssertionState.trust`), with that cluster's ``iss``, this server's
  ``aud`` and an ``exp`` in the future; ``subject_token_type`` must be a JWT
  type; an actor token, when sent, comes with its type and is checked the same
  way. A bad subject token is ``invalid_grant`` — as Google's STS answers (RFC
  8693 §2.2.2 says ``invalid_request``; clients must cope with both, and
  authproxy treats either as a failure to back off from). The reply echoes
  ``issued_token_type``; ``token_type`` can be switched (``N_A``, or something
  invalid) to test the client;
- JWT-bearer, Google-like: the assertion's ``iss`` is a registered service
  account (:meth:`AssertionState.add_service_account`), its signature verifies
  with the key its ``kid`` names, ``aud`` is this token endpoint, ``exp - iat ≤
  3600``, not expired, ``iat`` not in the future, a ``scope`` claim, and a
  ``jti`` never seen before; refusals use Google's words
  (``{"error": "invalid_grant", "error_description": "Invalid JWT Signature."}``).

Both grants may be used without any client authentication (Google uses none; a
workload-identity STS often none): :func:`unauthenticated` tells the token
endpoint so. A request that names or authenticates a client is checked as usual.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from authproxy.testing import DemoService, TourStep
from authproxy.testing.oauth2_client_auth import token_url
from authproxy.testing.oauth2_grants import GRANTS
from authproxy.testing.oauth2_model import LEEWAY, Client, OAuth2State, OAuthFail

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
TOKEN_TYPE_ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
TOKEN_TYPE_ACCESS = "urn:ietf:params:oauth:token-type:access_token"
SUBJECT_TOKEN_TYPES = frozenset({TOKEN_TYPE_JWT, TOKEN_TYPE_ID_TOKEN})
OPEN_GRANTS = frozenset({TOKEN_EXCHANGE, JWT_BEARER})  # usable with no client authentication at all
REPEATABLE_PARAMS = frozenset({"resource", "audience"})  # RFC 8693 §2.1: may be given more than once
FORM_PAIRS = "oauth2_form_pairs"  # request key: the form's (name, value) pairs in order, repeats kept
GOOGLE_MAX_LIFETIME = 3600
ANONYMOUS = Client("(no client authentication)", methods=frozenset({"none"}), grants=OPEN_GRANTS)

# Google's words (oauth2.googleapis.com/token), so that docs and tests show what users will see.
BAD_SIGNATURE = "Invalid JWT Signature."
BAD_TIMES = (
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
    "Check your iat and exp values in the JWT claim."
)
NO_ACCOUNT = "Invalid grant: account not found"
BAD_SCOPE = "Invalid OAuth scope or ID token audience provided."


@dataclass
class Cluster:
    """An issuer of workload tokens this server accepts as subject or actor tokens."""

    issuer: str
    public_key_pem: bytes
    audience: str  # the aud its tokens must carry to be exchanged here


@dataclass
class ServiceAccount:
    client_email: str
    keys: dict[str, bytes] = field(default_factory=dict)  # private_key_id → public key PEM


@dataclass
class Exchange:
    """One token exchange request as it arrived (accepted or not)."""

    client_id: str
    subject_token: str
    subject_token_type: str | None
    actor_token: str | None
    actor_token_type: str | None
    audience: list[str]
    resource: list[str]
    requested_token_type: str | None
    scope: str | None


@dataclass
class AssertionState:
    clusters: dict[str, Cluster] = field(default_factory=dict)
    service_accounts: dict[str, ServiceAccount] = field(default_factory=dict)
    token_type: str | None = None  # answer token exchanges with this token_type (e.g. "N_A", "mac")
    issued_token_type: str | None = None  # default: the requested_token_type, else an access token
    # what tests read
    exchanges: list[Exchange] = field(default_factory=list)
    assertions: list[str] = field(default_factory=list)  # every JWT-bearer assertion received
    accepted_assertions: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)  # (header, claims)
    refusals: Counter[str] = field(default_factory=Counter)  # error_description of each refusal
    jtis: dict[str, float] = field(default_factory=dict)

    def trust(self, issuer: str, public_key_pem: bytes, audience: str) -> None:
        """Accept tokens from ``issuer`` signed by this key and addressed to ``audience``."""
        self.clusters[issuer] = Cluster(issuer, public_key_pem, audience)

    def add_service_account(self, client_email: str, private_key_id: str, public_key_pem: bytes) -> None:
        self.service_accounts.setdefault(client_email, ServiceAccount(client_email)).keys[private_key_id] = public_key_pem


ASSERTIONS: web.AppKey[AssertionState] = web.AppKey("oauth2_assertions_state")


def install(app: web.Application, state: AssertionState | None = None) -> None:
    """Give the mock app the state of these grants (empty: nothing is trusted yet)."""
    app[ASSERTIONS] = state or AssertionState()


def unauthenticated(request: web.Request, grant: str, form: dict[str, str]) -> tuple[Client, str] | None:
    """(ANONYMOUS, "none") for a request of an open grant that neither names nor
    authenticates a client; None otherwise (then the usual client authentication runs)."""
    if grant not in OPEN_GRANTS or "Authorization" in request.headers:
        return None
    if any(k in form for k in ("client_id", "client_secret", "client_assertion", "client_assertion_type")):
        return None
    return ANONYMOUS, "none"


def _refuse(ast: AssertionState, error: str, description: str) -> OAuthFail:
    ast.refusals[description] += 1
    return OAuthFail(error, description)


def _matches(alg: Any, key: Any) -> bool:
    return (alg == "RS256" and isinstance(key, rsa.RSAPublicKey)) or (alg == "ES256" and isinstance(key, ec.EllipticCurvePublicKey))


# --------------------------------------------------------------------------- RFC 8693


def _verify_workload_token(ast: AssertionState, token: str, what: str) -> dict[str, Any]:
    """A cluster-issued JWT: trusted issuer, its key's signature, this server's aud, not expired."""
    try:
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise _refuse(ast, "invalid_grant", f"{what} is not a JWT") from None
    cluster = ast.clusters.get(unverified.get("iss")) if isinstance(unverified.get("iss"), str) else None
    if cluster is None:
        raise _refuse(ast, "invalid_grant", f"{what} was not issued by a trusted issuer")
    key = serialization.load_pem_public_key(cluster.public_key_pem)
    alg = header.get("alg")
    if not _matches(alg, key):
        raise _refuse(ast, "invalid_grant", f"{what} signature is invalid")
    try:
        return jwt.decode(
            token, key, algorithms=[alg], audience=cluster.audience, leeway=LEEWAY,  # type: ignore[arg-type]
            options={"require": ["iss", "sub", "aud", "exp"]},
        )
    except jwt.ExpiredSignatureError:
        raise _refuse(ast, "invalid_grant", f"{what} has expired") from None
    except jwt.InvalidSignatureError:
        raise _refuse(ast, "invalid_grant", f"{what} signature is invalid") from None
    except jwt.InvalidAudienceError:
        raise _refuse(ast, "invalid_grant", f"{what} audience does not match this server ({cluster.audience})") from None
    except jwt.PyJWTError as e:
        raise _refuse(ast, "invalid_grant", f"{what} is not acceptable: {e}") from None


async def _token_exchange(request: web.Request, st: OAuth2State, client: Client, form: dict[str, str]) -> dict[str, Any]:
    ast = request.app[ASSERTIONS]
    pairs: list[tuple[str, str]] = request.get(FORM_PAIRS) or list(form.items())
    subject, subject_type = form.get("subject_token"), form.get("subject_token_type")
    actor, actor_type = form.get("actor_token"), form.get("actor_token_type")
    ast.exchanges.append(
        Exchange(
            client.client_id, subject or "", subject_type, actor, actor_type,
            [v for k, v in pairs if k == "audience"], [v for k, v in pairs if k == "resource"],
            form.get("requested_token_type"), form.get("scope"),
        )
    )
    if not subject or not subject_type:
        raise _refuse(ast, "invalid_request", "subject_token and subject_token_type are required (RFC 8693 §2.1)")
    if subject_type not in SUBJECT_TOKEN_TYPES:
        raise _refuse(ast, "invalid_request", f"subject_token_type {subject_type} is not supported")
    if (actor is None) != (actor_type is None):
        raise _refuse(ast, "invalid_request", "actor_token and actor_token_type go together (RFC 8693 §2.1)")
    claims = _verify_workload_token(ast, subject, "subject_token")
    if actor is not None:
        if actor_type not in SUBJECT_TOKEN_TYPES:
            raise _refuse(ast, "invalid_request", f"actor_token_type {actor_type} is not supported")
        _verify_workload_token(ast, actor, "actor_token")
    for uri in ast.exchanges[-1].resource:
        if not urlsplit(uri).scheme or urlsplit(uri).fragment:
            raise _refuse(ast, "invalid_target", f"resource {uri} is not an absolute URI without a fragment")
    requested = form.get("requested_token_type")
    reply = st._issue(Client(str(claims["sub"])), form.get("scope") or "read", None)
    reply["issued_token_type"] = ast.issued_token_type or requested or TOKEN_TYPE_ACCESS
    if ast.token_type is not None:
        reply["token_type"] = ast.token_type
    return reply


# --------------------------------------------------------------------------- RFC 7523 §2.1, as Google


def _verify_google_assertion(request: web.Request, ast: AssertionState, assertion: str) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        header = jwt.get_unverified_header(assertion)
        unverified = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise _refuse(ast, "invalid_grant", BAD_SIGNATURE) from None
    iss = unverified.get("iss")
    account = ast.service_accounts.get(iss) if isinstance(iss, str) else None
    if account is None:
        raise _refuse(ast, "invalid_grant", NO_ACCOUNT)
    kid, alg = header.get("kid"), header.get("alg")
    pems = [account.keys[kid]] if kid in account.keys else [] if kid is not None else list(account.keys.values())
    for pem in pems:
        key = serialization.load_pem_public_key(pem)
        if not _matches(alg, key):
            continue
        try:
            claims = jwt.decode(assertion, key, algorithms=[alg], options={"verify_aud": False, "verify_exp": False, "verify_iat": False, "verify_nbf": False})  # type: ignore[arg-type]
            break
        except jwt.PyJWTError:
            continue
    else:
        raise _refuse(ast, "invalid_grant", BAD_SIGNATURE)
    now = time.time()
    iat, exp = claims.get("iat"), claims.get("exp")
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in (iat, exp)):
        raise _refuse(ast, "invalid_grant", BAD_TIMES)
    if not (iat < exp and exp - iat <= GOOGLE_MAX_LIFETIME and iat <= now + LEEWAY and exp > now - LEEWAY):
        raise _refuse(ast, "invalid_grant", BAD_TIMES)
    audience = token_url(request)
    if claims.get("aud") != audience:
        raise _refuse(ast, "invalid_grant", f"Invalid JWT: Failed audience check. The right audience is {audience}")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti:
        raise _refuse(ast, "invalid_grant", "Invalid JWT: a jti is required")
    for seen, until in list(ast.jtis.items()):
        if until + LEEWAY < now:
            del ast.jtis[seen]
    if jti in ast.jtis:
        raise _refuse(ast, "invalid_grant", "Invalid JWT: jti has been used before (replayed assertion)")
    ast.jtis[jti] = float(exp)
    scope = claims.get("scope")
    if not isinstance(scope, str) or not scope.strip():
        raise _refuse(ast, "invalid_scope", BAD_SCOPE)
    return header, claims


async def _jwt_bearer(request: web.Request, st: OAuth2State, client: Client, form: dict[str, str]) -> dict[str, Any]:
    ast = request.app[ASSERTIONS]
    assertion = form.get("assertion")
    if not assertion:
        raise _refuse(ast, "invalid_request", "assertion is required (RFC 7523 §2.1)")
    ast.assertions.append(assertion)
    header, claims = _verify_google_assertion(request, ast, assertion)
    ast.accepted_assertions.append((header, claims))
    return st._issue(Client(str(claims.get("sub") or claims["iss"])), " ".join(sorted(claims["scope"].split())), None)


GRANTS[TOKEN_EXCHANGE] = _token_exchange  # the token endpoint's registry: one grant, one entry
GRANTS[JWT_BEARER] = _jwt_bearer


# --------------------------------------------------------------------------- authproxy demo


class DemoFiles:
    """The files a demo service writes at start (keys, tokens): each 0600, in a private
    0700 folder made on first use and removed when its mock app is cleaned up (at the
    demo's exit), or at interpreter exit at the latest."""

    def __init__(self, app: web.Application, prefix: str) -> None:
        self.prefix = prefix
        self.folder: Path | None = None
        self._remove: weakref.finalize | None = None
        app.on_cleanup.append(self._cleanup)  # before the app starts: its signals freeze then

    async def _cleanup(self, _app: web.Application) -> None:
        if self._remove is not None:
            self._remove()

    def write(self, name: str, text: str) -> Path:
        """Create the file, or rewrite it in place (same inode, as the kubelet rotates a token)."""
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix=self.prefix))  # mode 0700
            self._remove = weakref.finalize(self, shutil.rmtree, self.folder, True)
        path = self.folder / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)
            f.truncate()
            f.write(text)
        return path


def rsa_keypair() -> tuple[rsa.RSAPrivateKey, str, bytes]:
    """(key, private PKCS#8 PEM, public PEM), made now."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    return key, private, key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def served(status: int, headers: dict[str, str], body: bytes) -> str:
    """A tour reply of the mock API: which access token (by serial) served whom; never a token."""
    try:
        doc = json.loads(body)
        return f"{doc['path']} served with access token #{doc['token_serial']} ({doc['client_id']}, scope {doc['scope']})"
    except (ValueError, KeyError, TypeError):
        return body[:120].decode("utf-8", "replace")


DEMO_ACCOUNT = "authproxy-demo@demo-project.iam.gserviceaccount.com"
DEMO_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def demo() -> DemoService:
    """A Google service account: a key file in Google's format, made at demo start, whose
    public key the mock registers under its ``private_key_id``."""
    from authproxy.testing import oauth2 as mock  # it imports this module

    app = mock.make_app(clients=[])
    st, ast = app[mock.STATE], app[ASSERTIONS]
    files = DemoFiles(app, "authproxy-demo-gcp-")
    _, private_pem, public_pem = rsa_keypair()
    kid = uuid.uuid4().hex + uuid.uuid4().hex[:8]
    ast.add_service_account(DEMO_ACCOUNT, kid, public_pem)

    def config(base: str) -> dict[str, Any]:
        key_file = {
            "type": "service_account",
            "project_id": "demo-project",
            "private_key_id": kid,
            "private_key": private_pem,
            "client_email": DEMO_ACCOUNT,
            "client_id": "100000000000000000001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": base + mock.TOKEN_PATH,  # the mock plays oauth2.googleapis.com/token
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "universe_domain": "googleapis.com",
        }
        path = files.write("service-account.json", json.dumps(key_file, indent=2))
        auth = {"scheme": "oauth2", "grant": "jwt_bearer", "service_account_file": str(path), "assertion_claims": {"scope": DEMO_SCOPE}}
        return {"upstream": base + mock.API_PATH, "auth": auth}

    tour = [
        TourStep(
            "first request: authproxy signs a JWT with the key file's private key (kid, iss, aud = its token_uri) "
            "and trades it for an access token (RFC 7523 JWT-bearer grant, no client authentication)",
            path="/gcp/v1/projects/demo-project/buckets",
            show=served,
        ),
        TourStep("the next request reuses the cached token: no new assertion", path="/gcp/v1/projects/demo-project/instances", show=served),
    ]

    def summary() -> str:
        refused = ", ".join(f"{k} ×{v}" for k, v in ast.refusals.items()) or "none"
        return (
            f"JWT-bearer grants: {st.token_requests.get(JWT_BEARER, 0)} ({len(ast.accepted_assertions)} accepted, refused: {refused}); "
            f"API requests served: {st.api_ok}, rejected with 401: {st.api_rejected}"
        )

    return DemoService("gcp", app, config, tour, summary)
