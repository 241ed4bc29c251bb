"""``scheme: oauth2`` settings: the dataclass and its cross-field rules.

A key that would be silently ignored for the chosen ``grant`` or
``client_auth`` is an error, so a configuration says what it does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from authproxy.schemes import rfc8705
from authproxy.schemes.rfc6749 import RESERVED_PARAMS, ClientAuthMethod
from authproxy.schemes.rfc7523 import MAX_LIFETIME, KeyFileError, load_private_key
from authproxy.schemes.rfc8252 import OOB, parse_loopback
from authproxy.secret import Secret
from authproxy.settings import FieldError, FilePath


@dataclass(frozen=True)
class OAuth2Config:
    token_url: str
    client_id: str
    grant: Literal["client_credentials", "authorization_code"] = "client_credentials"
    client_auth: ClientAuthMethod = "client_secret_post"
    client_secret: Secret | None = None
    private_key_file: FilePath | None = None
    jwt_alg: Literal["RS256", "ES256"] = "RS256"
    jwt_lifetime: int = 60
    scope: str | None = None
    extra_params: dict[str, str] = field(default_factory=dict)
    authorize_url: str | None = None
    redirect_uri: str = OOB
    pkce: bool = True
    revocation_url: str | None = None
    issuer: str | None = None
    refresh_margin: float = 60.0

    def check(self) -> None:
        """Cross-field rules: a setting that would be silently ignored is an error too."""
        for key in ("token_url", "authorize_url", "revocation_url"):
            value = getattr(self, key)
            if value is not None:
                _check_url(key, value)
        if not self.client_id.strip():
            raise FieldError("client_id", "must not be empty")
        if not 0 < self.jwt_lifetime <= MAX_LIFETIME:
            raise FieldError("jwt_lifetime", f"must be 1..{MAX_LIFETIME} seconds (an assertion is a short-lived password)")
        if self.refresh_margin < 0:
            raise FieldError("refresh_margin", "must not be negative")
        self._check_client_auth()
        self._check_grant()
        if self.scope is not None and (not self.scope.strip() or not all(0x21 <= ord(c) <= 0x7E or c == " " for c in self.scope)):
            raise FieldError("scope", "space-separated scope names of visible ASCII characters (RFC 6749 §3.3)")
        for name in self.extra_params:
            if name in RESERVED_PARAMS:
                raise FieldError("extra_params", f"{name} is set by authproxy itself; use the matching setting instead")

    @property
    def uses_client_certificate(self) -> bool:
        """True when the service's ``tls`` certificate is this client's credential (the
        service section checks that ``tls`` is given: this section cannot see it)."""
        return self.client_auth == rfc8705.TLS_CLIENT_AUTH

    def _check_client_auth(self) -> None:
        method = self.client_auth
        if method in ("client_secret_post", "client_secret_basic"):
            if not self.client_secret:
                raise FieldError("client_secret", f"required with client_auth: {method} (give client_secret or client_secret_file)")
            if self.private_key_file is not None:
                raise FieldError("private_key_file", "only used with client_auth: private_key_jwt")
            return
        if self.client_secret is not None:
            raise FieldError("client_secret", f"not used with client_auth: {method}")
        if method == "private_key_jwt":
            if self.private_key_file is None:
                raise FieldError("private_key_file", "required with client_auth: private_key_jwt (a PEM private key)")
            try:
                load_private_key(self.private_key_file, self.jwt_alg)
            except KeyFileError as e:
                raise FieldError("private_key_file", str(e)) from None
            return
        if self.private_key_file is not None:
            raise FieldError("private_key_file", "only used with client_auth: private_key_jwt")
        if method == rfc8705.TLS_CLIENT_AUTH:  # the service's tls certificate: see uses_client_certificate
            bad = rfc8705.plain_http({"token_url": self.token_url, "revocation_url": self.revocation_url})
            if bad is not None:
                raise FieldError(bad, rfc8705.NEEDS_HTTPS)
            return
        if self.grant != "authorization_code":
            raise FieldError("client_auth", "none (a public client) works only with grant: authorization_code")
        if not self.pkce:
            raise FieldError("pkce", "a public client (client_auth: none) must use PKCE")

    def _check_grant(self) -> None:
        if self.grant == "authorization_code":
            if self.authorize_url is None:
                raise FieldError("authorize_url", "required with grant: authorization_code")
            if self.redirect_uri != OOB:
                try:
                    parse_loopback(self.redirect_uri)
                except ValueError as e:
                    raise FieldError("redirect_uri", str(e)) from None
            return
        for key in ("authorize_url", "issuer"):
            if getattr(self, key) is not None:
                raise FieldError(key, "only used with grant: authorization_code")
        if self.redirect_uri != OOB:
            raise FieldError("redirect_uri", "only used with grant: authorization_code")


def _check_url(key: str, value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FieldError(key, "must be an absolute http(s) URL, e.g. https://auth.example.com/oauth/token")
    if parts.fragment or parts.username or parts.password:
        raise FieldError(key, "must not contain user info or a fragment")
