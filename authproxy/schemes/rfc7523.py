"""RFC 7523 — a signed JWT as the client's credential (``private_key_jwt``).

The client proves who it is with a short-lived assertion signed by its private
key instead of a shared secret: ``iss`` = ``sub`` = client_id, ``aud`` = the
token endpoint, ``iat``/``nbf``/``exp`` bounding it, and a fresh random ``jti``
so that a captured assertion cannot be replayed. The key's contents are secret:
no message here ever includes them.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Literal, Union

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from authproxy.secret import Secret

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
