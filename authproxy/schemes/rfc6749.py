"""RFC 6749 — the token endpoint: client authentication, token requests, replies and errors.

Every grant ends in the same form-encoded POST, so this module is the one
place that knows how a client authenticates (§2.3: secret in the body, HTTP
Basic with each part form-urlencoded first, or an RFC 7523 assertion), how a
successful reply (§5.1) is read, and how an error reply (§5.2) — or a reply that
is no OAuth reply at all — becomes a message a person can act on, with every
secret that was sent masked out of whatever the server echoed.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence
from urllib.parse import quote_plus, urlencode

from authproxy.schemes.base import CredentialError, Reply
from authproxy.schemes import rfc8705
from authproxy.schemes.rfc7523 import ASSERTION_TYPE, AssertionSigner
from authproxy.secret import Secret

if TYPE_CHECKING:
    from authproxy.schemes.base import SchemeContext

ClientAuthMethod = Literal["client_secret_post", "client_secret_basic", "private_key_jwt", "tls_client_auth", "none"]

#: Errors that mean "the server will keep saying no until someone changes the config".
REFUSALS = frozenset({"invalid_client", "unauthorized_client", "invalid_scope", "unsupported_grant_type"})
#: Parameters authproxy sets itself; ``extra_params`` may not override them.
RESERVED_PARAMS = frozenset(
    {
        "grant_type",
        "client_id",
        "client_secret",
        "client_assertion",
        "client_assertion_type",
        "code",
        "code_verifier",
        "redirect_uri",
        "refresh_token",
        "scope",
        "token",
        "token_type_hint",
    }
)
BEARER = frozenset({"bearer"})
#: token_type values a grant's reply may carry besides Bearer (compared lower-case). RFC 8693
#: §2.2.1: a token exchange may issue something that is not an access token ("N_A"); it is
#: still sent as a Bearer token.
TOKEN_TYPES = {"urn:ietf:params:oauth:grant-type:token-exchange": frozenset({"bearer", "n_a"})}
_VISIBLE = re.compile(r"^[\x21-\x7e]+$")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


class OAuthError(CredentialError):
    """The server's RFC 6749 §5.2 error (``error`` is its code, e.g. ``invalid_grant``)."""

    def __init__(self, message: str, *, error: str | None, status: int, refused: bool) -> None:
        super().__init__(message, refused=refused)
        self.error = error
        self.status = status


@dataclass(eq=False)
class TokenReply:
    """A successful token response (RFC 6749 §5.1). ``repr`` shows no token."""

    access_token: Secret
    token_type: str
    expires_in: float | None
    refresh_token: Secret | None
    scope: str | None


class ClientAuth:
    """How this client proves who it is at the token and revocation endpoints."""

    def __init__(
        self,
        method: ClientAuthMethod,
        client_id: str | None,  # None: a client that does not name itself (jwt_bearer, token_exchange with none)
        secret: Secret | None = None,
        signer: AssertionSigner | None = None,
    ) -> None:
        if method in ("client_secret_post", "client_secret_basic") and not secret:
            raise ValueError(f"{method} needs a client secret")
        if method == "private_key_jwt" and signer is None:
            raise ValueError("private_key_jwt needs a signing key")
        self.method = method
        self.client_id = client_id
        self._secret = secret
        self._signer = signer

    def __repr__(self) -> str:
        return f"ClientAuth({self.method}, client_id={self.client_id!r})"

    def apply(self, form: dict[str, str], headers: dict[str, str]) -> list[Secret]:
        """Add the client's credentials to a request; returns what was secret in them
        (to mask in whatever the server echoes back)."""
        if self.method == "client_secret_basic":
            assert self._secret is not None
            # §2.3.1: each part is application/x-www-form-urlencoded before joining with ':'.
            pair = f"{quote_plus(self.client_id, safe='')}:{quote_plus(self._secret.reveal(), safe='')}"
            encoded = base64.b64encode(pair.encode("utf-8")).decode("ascii")
            headers["Authorization"] = f"Basic {encoded}"
            return [self._secret, Secret(quote_plus(self._secret.reveal(), safe="")), Secret(encoded)]
        if self.method == rfc8705.TLS_CLIENT_AUTH:
            form.update(rfc8705.form_params(self.client_id))  # the certificate, in the handshake, is the proof
            return []
        if self.client_id is not None:
            form["client_id"] = self.client_id
        if self.method == "client_secret_post":
            assert self._secret is not None
            form["client_secret"] = self._secret.reveal()
            return [self._secret, Secret(quote_plus(self._secret.reveal(), safe=""))]
        if self.method == "private_key_jwt":
            assert self._signer is not None
            assertion = self._signer.sign()
            form["client_assertion_type"] = ASSERTION_TYPE
            form["client_assertion"] = assertion.reveal()
            return [assertion]
        return []  # none: a public client only names itself


class TokenEndpoint:
    """Token requests of every grant, sent the same way and read the same way."""

    def __init__(self, ctx: "SchemeContext", url: str, auth: ClientAuth, extra_params: Mapping[str, str]) -> None:
        self.ctx = ctx
        self.url = url
        self.auth = auth
        self.extra_params = dict(extra_params)

    async def request(self, params: Mapping[str, str | Sequence[str]], *, what: str, secrets: tuple[Secret, ...] = ()) -> TokenReply:
        """POST one token request; returns the reply or raises CredentialError/OAuthError."""
        reply, masks = await self.post(self.url, {**self.extra_params, **params}, what=what, secrets=secrets)
        if reply.status != 200:
            raise oauth_error(self.ctx, reply, what, masks)
        return parse_token_reply(self.ctx, reply, what, masks, TOKEN_TYPES.get(str(params.get("grant_type")), BEARER))

    async def post(
        self, url: str, params: Mapping[str, str | Sequence[str]], *, what: str, secrets: tuple[Secret, ...] = ()
    ) -> tuple[Reply, list[Secret]]:
        """A client-authenticated form POST (token and revocation endpoints alike)."""
        form = dict(params)
        headers = {"Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded"}
        masks = [*secrets, *self.auth.apply(form, headers)]
        body = urlencode(form, doseq=True).encode("ascii")  # a list value: repeated parameter (RFC 8693 resource)
        reply = await self.ctx.request("POST", url, what=what, data=body, headers=headers)
        return reply, masks


def parse_token_reply(
    ctx: "SchemeContext", reply: Reply, what: str, masks: list[Secret], token_types: frozenset[str] = frozenset({"bearer"})
) -> TokenReply:
    doc = _json_object(reply)
    if doc is None:
        raise CredentialError(f"{what}: {reply.url} answered 200 with a body that is not a JSON object")
    token = doc.get("access_token")
    if not isinstance(token, str) or not token:
        raise CredentialError(f"{what}: {reply.url} answered 200 without an access_token")
    if not _VISIBLE.fullmatch(token):
        raise CredentialError(f"{what}: {reply.url} answered with an access_token that cannot be sent in a header")
    token_type = doc.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() not in token_types:
        shown = clean_text(str(token_type), 40)
        raise CredentialError(
            f"{what}: {reply.url} issued a token of type {shown!r}; authproxy sends only Bearer tokens (RFC 6750)",
            refused=True,
        )
    refresh = doc.get("refresh_token")
    if refresh is not None and (not isinstance(refresh, str) or not refresh):
        raise CredentialError(f"{what}: {reply.url} answered with a refresh_token that is not a string")
    scope = doc.get("scope")
    return TokenReply(
        access_token=Secret(token),
        token_type="Bearer",
        expires_in=_expires_in(doc.get("expires_in"), reply, what),
        refresh_token=Secret(refresh) if refresh else None,
        scope=scope if isinstance(scope, str) else None,
    )


def _expires_in(value: Any, reply: Reply, what: str) -> float | None:
    """Seconds from now (a number, or a numeric string as some servers send); None if absent."""
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        seconds = float(value)
    except (TypeError, ValueError):
        raise CredentialError(f"{what}: {reply.url} answered with an expires_in that is not a number") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise CredentialError(f"{what}: {reply.url} answered with expires_in {value!r}, not a positive number")
    return seconds


def oauth_error(ctx: "SchemeContext", reply: Reply, what: str, masks: list[Secret]) -> CredentialError:
    """An error reply made into a message: the server's ``error`` and ``error_description``
    when it sent an RFC 6749 §5.2 body, else its status and the start of its body."""
    doc = _json_object(reply)
    code = doc.get("error") if doc is not None else None

    def safe(text: str, limit: int) -> str:
        # Mask first, then shorten: a cut through a secret would leave part of it readable.
        return clean_text(ctx.error_text(text, *masks), limit)

    if isinstance(code, str) and code:
        code = safe(code, 60)
        desc = doc.get("error_description") if doc is not None else None
        text = f"{what}: {reply.url} answered {reply.status} {code}"
        if isinstance(desc, str) and desc.strip():
            text += f": {safe(desc, 300)}"
        refused = code in REFUSALS or reply.status == 401
        return OAuthError(text, error=code, status=reply.status, refused=refused)
    snippet = safe(reply.body.decode("utf-8", "replace"), 200)
    text = f"{what}: {reply.url} answered HTTP {reply.status}"
    if reply.status < 500:
        text += " without an OAuth 2.0 error"
    if snippet:
        text += f": {snippet}"
    return OAuthError(text, error=None, status=reply.status, refused=reply.status == 401)


def _json_object(reply: Reply) -> dict[str, Any] | None:
    try:
        doc = reply.json()
    except CredentialError:
        return None
    return doc if isinstance(doc, dict) else None


def clean_text(text: str, limit: int) -> str:
    """Server text made fit for one log line: control characters collapsed, length capped."""
    text = _UNPRINTABLE.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"
