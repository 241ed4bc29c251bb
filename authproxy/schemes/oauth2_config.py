"""``scheme: oauth2`` settings: the dataclass and its cross-field rules.

A key that would be silently ignored for the chosen ``grant`` or
``client_auth`` is an error, so a configuration says what it does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from authproxy.schemes import rfc8705
from authproxy.schemes import rfc8693
from authproxy.schemes.google_service_account import ServiceAccountFileError, read_service_account
from authproxy.schemes.rfc6749 import RESERVED_PARAMS, ClientAuthMethod
from authproxy.schemes.rfc7523 import GRANT_KEYS, MAX_GRANT_LIFETIME, MAX_LIFETIME, KeyFileError, check_jwt_bearer, load_private_key
from authproxy.schemes.rfc8252 import OOB, parse_loopback
from authproxy.secret import Secret
from authproxy.settings import FieldError, FilePath


@dataclass(frozen=True)
class OAuth2Config:
    token_url: str | None = None  # required, unless a service_account_file's token_uri gives it
    client_id: str | None = None  # required, unless client_auth: none with token_exchange or jwt_bearer
    grant: Literal["client_credentials", "authorization_code", "device_code", "token_exchange", "jwt_bearer"] = "client_credentials"
    client_auth: ClientAuthMethod | None = None  # default: none with jwt_bearer (Google's way), else client_secret_post
    client_secret: Secret | None = None
    private_key_file: FilePath | None = None
    jwt_alg: Literal["RS256", "ES256"] = "RS256"
    jwt_lifetime: int = 60
    scope: str | None = None
    extra_params: dict[str, str] = field(default_factory=dict)
    authorize_url: str | None = None
    device_authorization_url: str | None = None  # RFC 8628: device_code, or login --device on authorization_code
    redirect_uri: str = OOB
    pkce: bool = True
    revocation_url: str | None = None
    issuer: str | None = None
    refresh_margin: float = 60.0
    # grant: token_exchange (RFC 8693; see rfc8693.py)
    subject_token_file: FilePath | None = None  # read at every exchange: rotated in place
    subject_token_type: str | None = None  # default urn:ietf:params:oauth:token-type:jwt
    actor_token_file: FilePath | None = None
    actor_token_type: str | None = None
    audience: str | None = None
    resource: str | tuple[str, ...] | None = None  # one URI or a list (repeated parameters)
    requested_token_type: str | None = None
    # grant: jwt_bearer (RFC 7523 §2.1; see rfc7523.py)
    assertion_claims: dict[str, str] = field(default_factory=dict)  # iss, sub, aud, scope
    service_account_file: FilePath | None = None  # Google's JSON key: iss, key, kid, token_uri

    def __post_init__(self) -> None:
        if self.client_auth is None:  # a default that depends on the grant
            object.__setattr__(self, "client_auth", "none" if self.grant == "jwt_bearer" else "client_secret_post")

    def check(self) -> None:
        """Cross-field rules: a setting that would be silently ignored is an error too."""
        self._check_origin()
        for key in ("token_url", "authorize_url", "revocation_url", "device_authorization_url"):
            value = getattr(self, key)
            if value is not None:
                _check_url(key, value)
        if self.client_id is not None and not self.client_id.strip():
            raise FieldError("client_id", "must not be empty")
        limit = MAX_GRANT_LIFETIME if self.grant == "jwt_bearer" and self.client_auth != "private_key_jwt" else MAX_LIFETIME
        if not 0 < self.jwt_lifetime <= limit:
            raise FieldError("jwt_lifetime", f"must be 1..{limit} seconds (an assertion is a short-lived password)")
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
            if self.private_key_file is not None and self.grant != "jwt_bearer":
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
        if self.private_key_file is not None and self.grant != "jwt_bearer":
            raise FieldError("private_key_file", "only used with client_auth: private_key_jwt or grant: jwt_bearer")
        if method == rfc8705.TLS_CLIENT_AUTH:  # the service's tls certificate: see uses_client_certificate
            bad = rfc8705.plain_http({"token_url": self.token_url, "revocation_url": self.revocation_url})
            if bad is not None:
                raise FieldError(bad, rfc8705.NEEDS_HTTPS)
            return
        if self.grant not in ("authorization_code", "device_code", "token_exchange", "jwt_bearer"):
            raise FieldError("client_auth", "none (a public client) works only with grant: authorization_code, device_code, token_exchange or jwt_bearer")
        if not self.pkce and self.grant == "authorization_code":
            raise FieldError("pkce", "a public client (client_auth: none) must use PKCE")

    def _check_origin(self) -> None:
        """``token_url`` and ``client_id``: required, except where the grant supplies them."""
        if self.token_url is None and self.grant == "jwt_bearer" and self.service_account_file is not None:
            try:
                account = read_service_account(self.service_account_file)
            except ServiceAccountFileError as e:
                raise FieldError("service_account_file", str(e)) from None
            object.__setattr__(self, "token_url", account.token_uri)
        if self.token_url is None:
            hint = " (or a service_account_file with a token_uri)" if self.grant == "jwt_bearer" else ""
            raise FieldError("token_url", f"required{hint}")
        if self.client_id is None and not (self.client_auth == "none" and self.grant in ("token_exchange", "jwt_bearer")):
            raise FieldError("client_id", "required")

    def _check_grant(self) -> None:
        for grant, keys in (("token_exchange", rfc8693.KEYS), ("jwt_bearer", GRANT_KEYS)):
            for key in keys:
                if self.grant != grant and getattr(self, key):
                    raise FieldError(key, f"only used with grant: {grant}")
        if self.grant == "token_exchange":
            rfc8693.check_config(self)
        elif self.grant == "jwt_bearer":
            check_jwt_bearer(self)
        if self.device_authorization_url is None and self.grant == "device_code":
            raise FieldError("device_authorization_url", "required with grant: device_code (the RFC 8628 device authorization endpoint)")
        if self.device_authorization_url is not None and self.grant not in ("device_code", "authorization_code"):
            raise FieldError("device_authorization_url", "only used with grant: device_code or authorization_code (login --device)")
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
