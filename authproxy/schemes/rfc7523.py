"""RFC 7523 — signed JWTs: as the client's credential (§2.2, ``private_key_jwt``) and
as the grant itself (§2.1, ``grant: jwt_bearer``, Google service accounts).

§2.2: the client proves who it is with a short-lived assertion signed by its
private key instead of a shared secret: ``iss`` = ``sub`` = client_id, ``aud`` =
the token endpoint, ``iat``/``nbf``/``exp`` bounding it, and a fresh random
``jti`` so that a captured assertion cannot be replayed.

§2.1: the JWT *is* the authorization grant — ``iss`` the account, ``sub`` whom
it acts for, ``aud`` the token endpoint, and whatever the server wants as claims
(Google: ``scope``). The key comes from a PEM file or a Google service-account
key file (:mod:`authproxy.schemes.google_service_account`), read again for each
token request so that a key rotated under the same name is picked up.

The key's contents are secret: no message here ever includes them.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Mapping, Union

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from authproxy.schemes.credential import CredentialError
from authproxy.schemes.google_service_account import ServiceAccountFileError, read_service_account
from authproxy.secret import Secret
from authproxy.settings import FieldError

if TYPE_CHECKING:
    from authproxy.schemes.oauth2 import OAuth2Scheme
    from authproxy.schemes.oauth2_config import OAuth2Config

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_LIFETIME = 120  # seconds, exp - iat: a longer-lived assertion is a replayable password
MIN_RSA_BITS = 2048  # RFC 7518 §3.3

Alg = Literal["RS256", "ES256"]
PrivateKey = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey]


class KeyFileError(ValueError):
    """The private key file cannot be used; the message says why and never shows the key."""


def load_private_key(path: str | Path, alg: Alg) -> PrivateKey:
    """Read a PEM private key (RSA as PKCS#1 or PKCS#8; EC P-256 as SEC1 or PKCS#8)
    and check that it suits ``alg``."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise KeyFileError(f"cannot read {path}: {e.strerror or e}") from None
    if b"-----BEGIN" not in data:
        raise KeyFileError(f"{path} is not a PEM file (expected a PEM block such as 'BEGIN PRIVATE KEY', 'BEGIN RSA PRIVATE KEY' or 'BEGIN EC PRIVATE KEY')")
    if b"ENCRYPTED" in data:
        raise KeyFileError(
            f"{path} is encrypted with a passphrase; authproxy needs it unencrypted "
            "(openssl pkey -in KEY -out private-key.pem), kept readable only by authproxy"
        )
    return parse_private_key(data, alg, path)


def parse_private_key(data: bytes, alg: Alg, path: str | Path) -> PrivateKey:
    """A PEM private key's bytes (read from ``path``, named in errors) checked against ``alg``."""
    if b"PRIVATE KEY" not in data:
        raise KeyFileError(f"{path} holds no private key (a public key or certificate?); give the private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path} is not a readable PEM private key") from None
    except Exception:  # cryptography raises its own errors for unsupported encodings
        raise KeyFileError(f"{path} is not a supported private key") from None
    _check_alg(key, alg, path)
    return key  # type: ignore[return-value]


def _check_alg(key: object, alg: Alg, path: str | Path) -> None:
    if alg == "RS256":
        if isinstance(key, ec.EllipticCurvePrivateKey):
            raise KeyFileError(f"{path} is an EC key; RS256 needs an RSA key (or set jwt_alg: ES256)")
        if not isinstance(key, rsa.RSAPrivateKey):
            raise KeyFileError(f"{path} is a {type(key).__name__.removesuffix('PrivateKey')} key; RS256 needs an RSA key")
        if key.key_size < MIN_RSA_BITS:
            raise KeyFileError(f"{path} is a {key.key_size}-bit RSA key; RS256 needs at least {MIN_RSA_BITS} bits")
        return
    if isinstance(key, rsa.RSAPrivateKey):
        raise KeyFileError(f"{path} is an RSA key; ES256 needs an EC P-256 key (or set jwt_alg: RS256)")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{path} is a {type(key).__name__.removesuffix('PrivateKey')} key; ES256 needs an EC P-256 key")
    if not isinstance(key.curve, ec.SECP256R1):
        raise KeyFileError(f"{path} is an EC key on curve {key.curve.name}; ES256 needs P-256 (prime256v1)")


class AssertionSigner:
    """Makes one client assertion per token request; never reuses a ``jti``."""

    def __init__(self, key: PrivateKey, alg: Alg, client_id: str, audience: str, lifetime: int) -> None:
        if not 0 < lifetime <= MAX_LIFETIME:
            raise ValueError(f"assertion lifetime must be 1..{MAX_LIFETIME} seconds")
        self._key = key
        self.alg = alg
        self.client_id = client_id
        self.audience = audience
        self.lifetime = lifetime

    def __repr__(self) -> str:
        return f"AssertionSigner(alg={self.alg}, client_id={self.client_id!r}, aud={self.audience!r})"

    def sign(self, now: float | None = None) -> Secret:
        issued = int(time.time() if now is None else now)
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.audience,
            "iat": issued,
            "nbf": issued,
            "exp": issued + self.lifetime,
            "jti": secrets.token_urlsafe(24),
        }
        return Secret(jwt.encode(claims, self._key, algorithm=self.alg, headers={"typ": "JWT"}))


# --------------------------------------------------------------------------- §2.1: the JWT is the grant

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: exp - iat of a grant assertion: RFC 7523 leaves it to the server; Google refuses more than
#: an hour. authproxy signs a fresh one for every token request, so the default stays short.
MAX_GRANT_LIFETIME = 3600
GRANT_CLAIMS = ("iss", "sub", "aud", "scope")  # what assertion_claims may set; iat, exp, jti are made each time
#: Settings only ``grant: jwt_bearer`` reads: with another grant they would be ignored, so they are errors.
GRANT_KEYS = ("assertion_claims", "service_account_file")


class GrantSigner:
    """Makes the grant assertion of one token request: the configured claims plus
    ``iat``, ``exp`` = ``iat`` + lifetime and a fresh ``jti``; ``kid`` in the header
    when the key has an id (Google's ``private_key_id``)."""

    def __init__(self, key: PrivateKey, alg: Alg, claims: Mapping[str, str], lifetime: int, kid: str | None = None) -> None:
        if not 0 < lifetime <= MAX_GRANT_LIFETIME:
            raise ValueError(f"grant assertion lifetime must be 1..{MAX_GRANT_LIFETIME} seconds")
        if not claims.get("iss") or not claims.get("aud"):
            raise ValueError("a grant assertion needs iss and aud")
        self._key = key
        self.alg = alg
        self.claims = dict(claims)
        self.lifetime = lifetime
        self.kid = kid

    def __repr__(self) -> str:
        return f"GrantSigner(alg={self.alg}, iss={self.claims['iss']!r}, aud={self.claims['aud']!r}, kid={self.kid!r})"

    def sign(self, now: float | None = None) -> Secret:
        issued = int(time.time() if now is None else now)
        claims = {**self.claims, "iat": issued, "exp": issued + self.lifetime, "jti": secrets.token_urlsafe(24)}
        headers = {"typ": "JWT", **({"kid": self.kid} if self.kid else {})}
        return Secret(jwt.encode(claims, self._key, algorithm=self.alg, headers=headers))


def grant_signer(cfg: "OAuth2Config") -> GrantSigner:
    """The signer for ``grant: jwt_bearer``: the key from ``service_account_file`` (its
    ``client_email`` as ``iss``, ``private_key_id`` as ``kid``) or ``private_key_file``
    (with ``assertion_claims.iss``); ``aud`` defaults to the token endpoint.
    Raises KeyFileError (or ServiceAccountFileError) naming the file, never its content."""
    claims = dict(cfg.assertion_claims)
    kid = None
    if cfg.service_account_file is not None:
        account = read_service_account(cfg.service_account_file)
        key = parse_private_key(account.private_key.reveal().encode("utf-8"), cfg.jwt_alg, f"{account.path} (private_key)")
        claims = {"iss": account.client_email, **claims}
        kid = account.private_key_id
    else:
        assert cfg.private_key_file is not None  # the config's check
        key = load_private_key(cfg.private_key_file, cfg.jwt_alg)
    assert cfg.token_url is not None
    claims.setdefault("aud", cfg.token_url)
    return GrantSigner(key, cfg.jwt_alg, claims, cfg.jwt_lifetime, kid)


async def jwt_bearer_params(scheme: "OAuth2Scheme") -> dict[str, str]:
    """RFC 7523 §2.1 token request parameters, with an assertion signed now. A key file
    that became unreadable is a refusal: it stays broken until someone fixes it."""
    cfg: OAuth2Config = scheme.config
    source = "service_account_file" if cfg.service_account_file is not None else "private_key_file"
    try:
        signer = await asyncio.to_thread(grant_signer, cfg)
    except (KeyFileError, ServiceAccountFileError) as e:
        raise CredentialError(f"{source}: {e}", refused=True) from None
    params = {"grant_type": JWT_BEARER_GRANT, "assertion": signer.sign().reveal()}
    if cfg.scope:  # RFC 7523 §2.1 / RFC 6749 §3.3 scope parameter; Google wants the claim instead
        params["scope"] = cfg.scope
    return params


def check_jwt_bearer(cfg: "OAuth2Config") -> None:
    """The rules of ``grant: jwt_bearer``: one key source, an issuer, only known claims,
    and a key that can sign (loaded now, so ``authproxy check`` finds a bad one)."""
    for name, value in cfg.assertion_claims.items():
        if name not in GRANT_CLAIMS:
            raise FieldError(
                "assertion_claims", f"{name}: not a claim authproxy sets ({', '.join(GRANT_CLAIMS)}; iat, exp and jti are made for each assertion)"
            )
        if not value.strip():
            raise FieldError("assertion_claims", f"{name}: must not be empty")
    uses_client_key = cfg.client_auth == "private_key_jwt"  # private_key_file then signs the client assertion
    if cfg.service_account_file is not None:
        if cfg.private_key_file is not None and not uses_client_key:
            raise FieldError("private_key_file", "give either service_account_file or private_key_file (with assertion_claims), not both")
        if "iss" in cfg.assertion_claims:
            raise FieldError("assertion_claims", "iss comes from service_account_file (its client_email); do not set it here")
        try:
            grant_signer(cfg)
        except (KeyFileError, ServiceAccountFileError) as e:
            raise FieldError("service_account_file", str(e)) from None
        return
    if cfg.private_key_file is None:
        raise FieldError("private_key_file", "required with grant: jwt_bearer (a PEM private key), or give service_account_file")
    if "iss" not in cfg.assertion_claims:
        raise FieldError("assertion_claims", "iss is required with private_key_file (whom the assertion is from)")
    try:
        grant_signer(cfg)
    except KeyFileError as e:
        raise FieldError("private_key_file", str(e)) from None
