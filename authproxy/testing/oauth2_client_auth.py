"""The strict OAuth 2.0 mock's client authentication (RFC 6749 §2.3, RFC 7523 §2.2,
RFC 8705 §2.1): exactly one method per request, each checked the way a certified
server does. A client certificate is no method by itself (a connection may carry
one for other reasons): it authenticates only a client registered for
``tls_client_auth``, which is then the method."""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from urllib.parse import unquote_plus

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from authproxy.testing.oauth2_model import (
    ASSERTION_TYPE,
    LEEWAY,
    MAX_ASSERTION_LIFETIME,
    STATE,
    TOKEN_PATH,
    Client,
    OAuthFail,
)


def token_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}{TOKEN_PATH}"


def issuer(request: web.Request) -> str:
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
        if "tls_client_auth" in client.methods:
            _verify_certificate(request, client)
            method = "tls_client_auth"
        elif not client.public:
            raise OAuthFail("invalid_client", "this client must authenticate", 401)
    if method not in client.methods:
        raise OAuthFail("invalid_client", f"this client is not registered for {method}", 401, basic=method == "client_secret_basic")
    return client, method


def _verify_certificate(request: web.Request, client: Client) -> None:
    """RFC 8705 §2.1.2: the certificate of this TLS connection (chain-verified by the
    server's context against its trusted CA) must carry the client's registered name."""
    st = request.app[STATE]
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        st.client_certs.append(None)
        raise OAuthFail("invalid_client", "tls_client_auth: no client certificate was presented in the TLS handshake", 401)
    cert = x509.load_der_x509_certificate(der)
    subject = cert.subject.rfc4514_string()
    st.client_certs.append(subject)
    kind, expected = client.tls_client_auth or ("", "")
    if kind == "tls_client_auth_subject_dn":
        ok = subject == expected
    else:
        san_type = {"tls_client_auth_san_dns": x509.DNSName, "tls_client_auth_san_uri": x509.UniformResourceIdentifier,
                    "tls_client_auth_san_email": x509.RFC822Name}.get(kind)  # fmt: skip
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            names = None
        ok = san_type is not None and names is not None and expected in names.get_values_for_type(san_type)
    if not ok:
        raise OAuthFail("invalid_client", f"tls_client_auth: the client certificate ({subject}) is not the one registered for this client", 401)


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
            audience=[token_url(request), issuer(request)],
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


