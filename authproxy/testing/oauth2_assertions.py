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

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

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
