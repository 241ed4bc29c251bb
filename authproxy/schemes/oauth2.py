"""OAuth 2.0 (``scheme: oauth2``): ``Authorization: Bearer`` from a token endpoint.

Two grants. ``client_credentials``: the service account asks the token endpoint
for an access token whenever it needs one (no refresh token). ``authorization_code``:
a person runs ``authproxy login SERVICE`` once; the refresh token it yields is kept
in the state dir and the proxy trades it for access tokens from then on.

Refresh tokens rotate: the reply to a refresh may carry a new one, and the old
one is then dead — some servers revoke the whole grant if a dead one is ever
presented again. So a refresh reads the stored token, presents it and stores the
new one durably *before* the access token is used, all under a lock shared with
every authproxy process on the same state dir (the proxy, ``authproxy token``,
``authproxy login``), and never presents a token it has not just re-read.

The protocol pieces live in modules named after their RFCs: :mod:`rfc6749`
(token endpoint, client authentication), :mod:`rfc7523` (JWT assertions),
:mod:`rfc7636` (PKCE), :mod:`rfc7009` (revocation), :mod:`rfc8252` (loopback
redirect). This module is the scheme: configuration, the grants, login, logout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import html
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit

from authproxy.config import FieldError, FilePath
from authproxy.observe import log_event
from authproxy.schemes import rfc7009, rfc7636
from authproxy.schemes.base import (
    CliIO,
    Credential,
    CredentialError,
    LoginRequired,
    NotSupported,
    Outgoing,
    Scheme,
    SchemeContext,
)
from authproxy.schemes.rfc6749 import (
    RESERVED_PARAMS,
    ClientAuth,
    ClientAuthMethod,
    OAuthError,
    TokenEndpoint,
    TokenReply,
    clean_text,
)
from authproxy.schemes.rfc7523 import MAX_LIFETIME, AssertionSigner, KeyFileError, load_private_key
from authproxy.schemes.rfc8252 import OOB, LoopbackAddress, LoopbackReceiver, parse_loopback
from authproxy.secret import Secret
from authproxy.state import StateError

LOGIN_TIMEOUT = 300.0  # seconds a login waits for the browser to come back
POLL_INTERVAL = 0.2  # how often login checks the state dir while the proxy completes it
REFRESH_DOC = "refresh"  # the stored refresh token (and the lock around using it)
LOGIN_DOC = "login"  # a login in progress that the running proxy may complete
WATCH_INTERVAL = 2.0  # while login_required: how often the state dir is checked for a new login


# --------------------------------------------------------------------------- configuration


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


# --------------------------------------------------------------------------- a login in progress


@dataclass
class PendingLogin:
    """What the exchange of a code needs: written to the state dir when the running
    proxy is to receive the redirect. ``repr`` shows neither state nor verifier."""

    state: str = field(repr=False)
    verifier: str | None = field(repr=False)
    redirect_uri: str
    identity: str
    expires_at: float
    status: str = "pending"  # pending | exchanging | done | failed
    error: str | None = None

    @classmethod
    def new(cls, redirect_uri: str, pkce: bool, identity: str) -> "PendingLogin":
        verifier = rfc7636.make_verifier() if pkce else None
        return cls(secrets.token_urlsafe(32), verifier, redirect_uri, identity, time.time() + LOGIN_TIMEOUT)

    @classmethod
    def from_doc(cls, doc: Any) -> "PendingLogin | None":
        if not isinstance(doc, dict):
            return None
        try:
            return cls(
                state=str(doc["state"]),
                verifier=doc.get("verifier"),
                redirect_uri=str(doc["redirect_uri"]),
                identity=str(doc.get("identity", "")),
                expires_at=float(doc["expires_at"]),
                status=str(doc.get("status", "pending")),
                error=doc.get("error"),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def to_doc(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "verifier": self.verifier if self.status in ("pending", "exchanging") else None,
            "redirect_uri": self.redirect_uri,
            "identity": self.identity,
            "expires_at": self.expires_at,
            "status": self.status,
            "error": self.error,
        }

    def matches(self, state: str | None) -> bool:
        return state is not None and hmac.compare_digest(state.encode(), self.state.encode())

    @property
    def expired(self) -> bool:
        return time.time() > self.expires_at


# --------------------------------------------------------------------------- the scheme


class OAuth2Scheme(Scheme):
    Config = OAuth2Config

    def __init__(self, ctx: SchemeContext) -> None:
        super().__init__(ctx)
        self.name = ctx.service.name
        self._setup_error: str | None = None
        self.endpoint = TokenEndpoint(ctx, self.config.token_url, self._client_auth(), self.config.extra_params)
        # (mtime of the stored refresh token, why it cannot be used): while the store
        # is unchanged, obtain() answers login_required without touching the network.
        self._dead: tuple[float | None, str] | None = None
        self._unsaved: Secret | None = None  # a rotated refresh token the state dir refused
        self._handoff: Credential | None = None  # the access token a login in this process got
        self._creds: Any = None  # the service's credential manager (see bind)
        self._watcher: asyncio.Task[None] | None = None
        self._nudge: asyncio.Task[None] | None = None

    def _client_auth(self) -> ClientAuth:
        cfg: OAuth2Config = self.config
        signer = None
        if cfg.client_auth == "private_key_jwt":
            try:
                key = load_private_key(str(cfg.private_key_file), cfg.jwt_alg)
            except KeyFileError as e:
                self._setup_error = f"private_key_file: {e}"
                return ClientAuth("none", cfg.client_id)
            signer = AssertionSigner(key, cfg.jwt_alg, cfg.client_id, cfg.token_url, cfg.jwt_lifetime)
        self._setup_error = None
        return ClientAuth(cfg.client_auth, cfg.client_id, cfg.client_secret, signer)

    # ------------------------------------------------------------------ the Scheme interface
    def identity(self) -> str:
        """A stored refresh token is only used by the configuration it was made for."""
        cfg: OAuth2Config = self.config
        return json.dumps(["oauth2", cfg.token_url, cfg.client_id, cfg.scope or ""])

    async def obtain(self, key: str | None) -> Credential:
        if self._setup_error is not None:
            raise CredentialError(self._setup_error, refused=True)
        if self.config.grant == "client_credentials":
            return await self._client_credentials()
        try:
            return await self._refreshed()
        except LoginRequired:
            self._watch_store()
            raise

    def apply(self, out: Outgoing, cred: Credential) -> None:
        out.headers["Authorization"] = "Bearer " + cred.token.reveal()

    def bind(self, credentials: Any) -> None:
        self._creds = credentials

    async def close(self) -> None:
        for task in (self._watcher, self._nudge):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._watcher = self._nudge = None

    def _watch_store(self) -> None:
        """While a person must log in, watch the state dir: once a login (from any
        process) stores a refresh token, fetch at once, so readiness does not wait for a request."""
        if self._creds is not None and (self._watcher is None or self._watcher.done()):
            self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while self._dead is not None:
            await asyncio.sleep(WATCH_INTERVAL)
            dead = self._dead
            if dead is not None and self.ctx.store.mtime(REFRESH_DOC) != dead[0]:
                await self._fetch_now()

    async def _fetch_now(self) -> None:
        with contextlib.suppress(Exception):
            await self._creds.get(None)

    def on_reload(self) -> None:
        """SIGHUP: re-read the key file (rotated under the same name) and the state dir."""
        self.endpoint.auth = self._client_auth()
        self._dead = None

    async def logout(self) -> None:
        """Revoke the stored refresh token (RFC 7009) when a revocation_url is set, then
        forget it. If the server cannot be reached nothing is deleted, so logout can be run again."""
        cfg: OAuth2Config = self.config
        store = self.ctx.store
        async with store.alocked(REFRESH_DOC):
            doc = self._read(REFRESH_DOC) or {}
            token = _stored_token(doc) if doc.get("identity") == self.identity() and not doc.get("rejected") else None
            if token is not None and cfg.revocation_url:
                try:
                    await rfc7009.revoke(self.endpoint, cfg.revocation_url, token, "refresh_token")
                except CredentialError as e:
                    raise CredentialError(
                        f"{e.message}; nothing was deleted, run `authproxy logout {self.name}` again once the server answers"
                    ) from None
                log_event(self.ctx.log, logging.INFO, "refresh_token_revoked", service=self.name)
            elif token is not None:
                log_event(
                    self.ctx.log,
                    logging.WARNING,
                    "refresh_token_forgotten",
                    service=self.name,
                    note="no revocation_url: it stays valid at the server until it expires or is revoked there",
                )
            store.delete(REFRESH_DOC)
            store.delete(LOGIN_DOC)
        self._dead = None
        self._unsaved = None
        self._handoff = None

    # ------------------------------------------------------------------ client_credentials
    async def _client_credentials(self) -> Credential:
        params = {"grant_type": "client_credentials"}
        if self.config.scope:
            params["scope"] = self.config.scope
        started = time.time()
        reply = await self.endpoint.request(params, what="token request")
        return _credential(reply, started)

    # ------------------------------------------------------------------ refresh_token
    async def _refreshed(self) -> Credential:
        handoff, self._handoff = self._handoff, None
        if handoff is not None and (handoff.expires_at is None or handoff.expires_at > time.time() + 1):
            return handoff
        if self._dead is not None and self.ctx.store.mtime(REFRESH_DOC) == self._dead[0]:
            raise LoginRequired(self._dead[1])
        async with self.ctx.store.alocked(REFRESH_DOC):
            token = self._usable_refresh_token()
            started = time.time()
            try:
                reply = await self.endpoint.request(
                    {"grant_type": "refresh_token", "refresh_token": token.reveal()}, what="token refresh", secrets=(token,)
                )
            except OAuthError as e:
                if e.error == "invalid_grant":
                    self._mark_rejected(e.message)
                    raise LoginRequired(e.message) from None
                raise
            if reply.refresh_token is not None and reply.refresh_token != token:
                self._store_refresh_token(reply.refresh_token)  # durable before the access token is used
        return _credential(reply, started)

    def _usable_refresh_token(self) -> Secret:
        """The refresh token to present now, re-read inside the lock: another process may
        have rotated it since. Raises LoginRequired (and remembers why) when there is none."""
        if self._unsaved is not None:
            self._store_refresh_token(self._unsaved)
        mtime = self.ctx.store.mtime(REFRESH_DOC)  # before reading: a later change must not look seen
        doc = self._read(REFRESH_DOC)
        reason: str | None = None
        token = _stored_token(doc)
        if doc is None:
            reason = "not logged in yet"
        elif doc.get("identity") != self.identity():
            reason = "the stored login was made for another token_url, client_id or scope"
        elif doc.get("rejected"):
            reason = f"the stored refresh token was refused ({doc['rejected']})"
        elif token is None:
            reason = "the stored login holds no refresh token"
        if reason is not None:
            self._dead = (mtime, reason)
            raise LoginRequired(reason)
        self._dead = None
        assert token is not None
        return token

    def _store_refresh_token(self, token: Secret) -> None:
        """Write the refresh token durably (temp file, fsync, rename, 0600). If the state
        dir refuses, keep it in memory and hold the access token back: handing out
        access while the only valid refresh token lives in RAM would lose the grant on exit."""
        doc = {"identity": self.identity(), "refresh_token": token.reveal(), "stored_at": time.time(), "rejected": None}
        try:
            self.ctx.store.put(REFRESH_DOC, doc)
        except StateError as e:
            self._unsaved = token
            raise CredentialError(f"cannot store the new refresh token ({e}); retrying") from None
        self._unsaved = None
        self._dead = None

    def _mark_rejected(self, message: str) -> None:
        """Record in the state dir that the stored refresh token is dead, so that no
        process presents it again (a restart, ``authproxy token``) until a new login."""
        doc = self._read_quiet(REFRESH_DOC) if self._unsaved is None else None
        if isinstance(doc, dict):
            doc["rejected"] = message
            try:
                self.ctx.store.put(REFRESH_DOC, doc)
            except StateError:
                pass
        self._dead = (self.ctx.store.mtime(REFRESH_DOC), f"the stored refresh token was refused ({message})")

    def _read(self, name: str) -> dict[str, Any] | None:
        try:
            doc = self.ctx.store.get(name)
        except StateError as e:
            raise CredentialError(str(e)) from None
        return doc if isinstance(doc, dict) else None

    # ------------------------------------------------------------------ authorization_code: login
    async def login(self, cli: CliIO) -> None:
        cfg: OAuth2Config = self.config
        if cfg.grant != "authorization_code":
            raise NotSupported(
                f"login is for grant: authorization_code; {self.name} uses {cfg.grant}, which needs no login "
                f"(`authproxy token {self.name}` shows it working)"
            )
        if self._setup_error is not None:
            raise CredentialError(self._setup_error)
        pending = PendingLogin.new(cfg.redirect_uri, cfg.pkce, self.identity())
        url = self.authorize_url(pending)
        if cfg.redirect_uri == OOB:
            await self._login_oob(cli, pending, url)
        else:
            await self._login_loopback(cli, pending, url, parse_loopback(cfg.redirect_uri))
        cli.say(
            f"Logged in: {self.name}'s refresh token is stored in {self.ctx.store.path} (0600).\n"
            f"A running proxy uses it from its next request; `authproxy token {self.name}` prints an access token."
        )

    def authorize_url(self, pending: PendingLogin) -> str:
        cfg: OAuth2Config = self.config
        query = {"response_type": "code", "client_id": cfg.client_id, "redirect_uri": pending.redirect_uri}
        if cfg.scope:
            query["scope"] = cfg.scope
        query["state"] = pending.state
        if pending.verifier is not None:
            query["code_challenge"] = rfc7636.challenge(pending.verifier)
            query["code_challenge_method"] = rfc7636.METHOD
        assert cfg.authorize_url is not None
        return cfg.authorize_url + ("&" if "?" in cfg.authorize_url else "?") + urlencode(query)

    def _show_url(self, cli: CliIO, url: str) -> None:
        cli.say(f"To log in to {self.name}, open this URL in a browser and approve access:\n\n  {url}\n")

    async def _login_oob(self, cli: CliIO, pending: PendingLogin, url: str) -> None:
        self._show_url(cli, url)
        try:
            answer = (await cli.prompt("Then paste the authorization code the server shows: ")).strip()
        except EOFError:
            raise CredentialError("login cancelled: no code was entered") from None
        if not answer:
            raise CredentialError("login cancelled: no code was entered")
        params = _pasted_response(answer)
        if "state" in params and not pending.matches(params["state"]):
            raise CredentialError("the pasted response belongs to another login (state mismatch); run login again")
        _, _, error = await self._finish(params, pending)
        if error is not None:
            raise CredentialError(f"login failed: {error}")

    async def _login_loopback(self, cli: CliIO, pending: PendingLogin, url: str, addr: LoopbackAddress) -> None:
        outcome: dict[str, str | None] = {}

        async def on_redirect(params: dict[str, str]) -> tuple[int, str, bool]:
            if not pending.matches(params.get("state")):
                return 400, _html("Not this login", "This is not the response to the login in progress (state mismatch); it was ignored."), False
            status, page, error = await self._finish(params, pending)
            outcome["error"] = error
            return status, page, True

        receiver = LoopbackReceiver(addr, on_redirect)
        try:
            await receiver.start()
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise CredentialError(f"cannot listen on {addr.display} (redirect_uri): {e.strerror or e}") from None
            await self._login_via_proxy(cli, pending, url, addr)
            return
        try:
            self._show_url(cli, url)
            cli.say(f"Waiting up to {LOGIN_TIMEOUT / 60:g} minutes for the browser to come back to {pending.redirect_uri} (Ctrl-C to cancel)...")
            try:
                await asyncio.wait_for(asyncio.shield(receiver.done), LOGIN_TIMEOUT)
            except asyncio.TimeoutError:
                raise CredentialError(f"no authorization response arrived within {LOGIN_TIMEOUT / 60:g} minutes; run login again") from None
        finally:
            await receiver.close()
        if outcome.get("error") is not None:
            raise CredentialError(f"login failed: {outcome['error']}")

    async def _login_via_proxy(self, cli: CliIO, pending: PendingLogin, url: str, addr: LoopbackAddress) -> None:
        """The redirect address is taken: if the running proxy owns it, its
        ``/-/callback/NAME`` completes the login from the pending record we leave it."""
        own_path = f"/-/callback/{self.name}"
        if addr.path != own_path:
            raise CredentialError(
                f"{addr.display} (redirect_uri) is in use by another program. If that is the running authproxy, "
                f"set redirect_uri to {addr.origin}{own_path} (and register it with the server); "
                "otherwise stop that program or pick another port"
            )
        if not await self._proxy_answers(addr):
            raise CredentialError(f"{addr.display} (redirect_uri) is in use by a program that is not authproxy; stop it or pick another port")
        store = self.ctx.store
        async with store.alocked(LOGIN_DOC):
            try:
                store.put(LOGIN_DOC, pending.to_doc())
            except StateError as e:
                raise CredentialError(str(e)) from None
        try:
            self._show_url(cli, url)
            cli.say(
                f"The running authproxy on {addr.display} receives the redirect; waiting up to "
                f"{LOGIN_TIMEOUT / 60:g} minutes for it to complete the login (Ctrl-C to cancel)..."
            )
            await self._await_proxy(pending)
        finally:
            async with store.alocked(LOGIN_DOC):
                current = PendingLogin.from_doc(self._read_quiet(LOGIN_DOC))
                if current is not None and current.state == pending.state:
                    store.delete(LOGIN_DOC)

    async def _await_proxy(self, pending: PendingLogin) -> None:
        deadline = time.monotonic() + LOGIN_TIMEOUT
        while time.monotonic() < deadline:
            current = PendingLogin.from_doc(self._read_quiet(LOGIN_DOC))
            if current is None or current.state != pending.state:
                raise CredentialError("the login was replaced by another `authproxy login` or a logout")
            if current.status == "done":
                return
            if current.status == "failed":
                raise CredentialError(f"login failed: {current.error}")
            await asyncio.sleep(POLL_INTERVAL)
        raise CredentialError(f"the running proxy received no authorization response within {LOGIN_TIMEOUT / 60:g} minutes; run login again")

    async def _proxy_answers(self, addr: LoopbackAddress) -> bool:
        try:
            reply = await asyncio.wait_for(
                self.ctx.request("GET", f"{addr.origin}/-/healthz", what="checking the redirect address"), 5
            )
            return reply.status == 200 and reply.json() == {"status": "ok"}
        except (CredentialError, asyncio.TimeoutError):
            return False

    def _read_quiet(self, name: str) -> Any:
        try:
            return self.ctx.store.get(name)
        except StateError:
            return None

    # ------------------------------------------------------------------ authorization_code: the redirect
    async def callback(self, params: Mapping[str, str]) -> tuple[int, str]:
        """``GET /-/callback/NAME`` on the running proxy: complete the login that
        ``authproxy login NAME`` left pending in the state dir."""
        if self.config.grant != "authorization_code":
            return 404, _html("No login here", f"{self.name} uses grant {self.config.grant}, which has no login.")
        try:
            claimed = await self._claim_pending(params.get("state"))
            if isinstance(claimed, tuple):
                return claimed
            status, page, error = await self._finish(params, claimed)
            await self._settle_pending(claimed, error)
        except StateError as e:
            return 500, _html("State dir unusable", str(e))
        if error is None and self._creds is not None:
            self._nudge = asyncio.ensure_future(self._fetch_now())  # use the new login now, not at the next request
        return status, page

    async def _claim_pending(self, state: str | None) -> PendingLogin | tuple[int, str]:
        """The pending login this response answers, marked as being exchanged so that a
        second delivery cannot present the code again; or the page refusing it."""
        store = self.ctx.store
        async with store.alocked(LOGIN_DOC):
            pending = PendingLogin.from_doc(store.get(LOGIN_DOC))
            if pending is None or pending.expired:
                return 400, _html("No login in progress", f"No `authproxy login {self.name}` is waiting for this response. Run it, then try again.")
            if not pending.matches(state):
                return 400, _html("Not this login", "This is not the response to the login in progress (state mismatch); it was ignored.")
            if pending.status != "pending":
                return 409, _html("Already handled", "This login has already been completed or is being completed.")
            if pending.identity != self.identity():
                pending.status = "failed"
                pending.error = "the running proxy's configuration of this service differs from the one `authproxy login` used; reload the proxy (SIGHUP) first"
                store.put(LOGIN_DOC, pending.to_doc())
                return 409, _html("Configuration differs", pending.error)
            pending.status = "exchanging"
            store.put(LOGIN_DOC, pending.to_doc())
            return pending

    async def _settle_pending(self, pending: PendingLogin, error: str | None) -> None:
        """Tell the waiting ``authproxy login`` how it went (it polls the record)."""
        store = self.ctx.store
        async with store.alocked(LOGIN_DOC):
            current = PendingLogin.from_doc(store.get(LOGIN_DOC))
            if current is not None and current.state == pending.state:
                current.status, current.error = ("failed", error) if error else ("done", None)
                store.put(LOGIN_DOC, current.to_doc())

    async def _finish(self, params: Mapping[str, str], pending: PendingLogin) -> tuple[int, str, str | None]:
        """Check an authorization response whose state matched, exchange its code and
        store the refresh token. → (HTTP status, page for the browser, error or None)."""
        cfg: OAuth2Config = self.config
        iss = params.get("iss")
        if cfg.issuer and iss is not None and iss != cfg.issuer:
            error = (
                f"the authorization response names issuer {clean_text(iss, 120)!r}, not the configured {cfg.issuer!r} "
                "(RFC 9207: a possible mix-up attack); its code was not used"
            )
            return 400, _html("Login failed", error), error
        if params.get("error"):
            mask = self.ctx.error_text
            error = f"the authorization server answered {clean_text(mask(params['error']), 60)}"
            if params.get("error_description"):
                error += f": {clean_text(mask(params['error_description']), 300)}"
            return 400, _html("Login failed", error), error
        code = params.get("code")
        if not code:
            error = "the authorization response carries no code"
            return 400, _html("Login failed", error), error
        try:
            await self._exchange(Secret(code), pending)
        except CredentialError as e:
            return 502, _html("Login failed", e.message), e.message
        return 200, _html("Logged in", f"authproxy is logged in to {self.name}. You can close this window."), None

    async def _exchange(self, code: Secret, pending: PendingLogin) -> None:
        params = {"grant_type": "authorization_code", "code": code.reveal(), "redirect_uri": pending.redirect_uri}
        masks = [code]
        if pending.verifier is not None:
            params["code_verifier"] = pending.verifier
            masks.append(Secret(pending.verifier))
        started = time.time()
        reply = await self.endpoint.request(params, what="code exchange", secrets=tuple(masks))
        if reply.refresh_token is None:
            raise CredentialError(
                "the server issued no refresh token, so authproxy could not renew access once this one expires "
                "(some servers want an offline_access scope, or refresh tokens enabled for the client)"
            )
        async with self.ctx.store.alocked(REFRESH_DOC):
            old = self._read_quiet(REFRESH_DOC)
            self._store_refresh_token(reply.refresh_token)
        self._handoff = _credential(reply, started)
        replaced = _stored_token(old) if isinstance(old, dict) and old.get("identity") == self.identity() else None
        if replaced is not None and replaced != reply.refresh_token and self.config.revocation_url and not old.get("rejected"):
            await self._revoke_quietly(replaced)

    async def _revoke_quietly(self, token: Secret) -> None:
        """The refresh token of the previous login is no longer used: revoke it, best effort."""
        try:
            await rfc7009.revoke(self.endpoint, self.config.revocation_url, token, "refresh_token")
        except CredentialError as e:
            log_event(self.ctx.log, logging.WARNING, "refresh_token_revoke_failed", service=self.name, error=e.message)


# --------------------------------------------------------------------------- helpers


def _credential(reply: TokenReply, started: float) -> Credential:
    """An access token; its lifetime counts from before the request was sent."""
    expires_at = None if reply.expires_in is None else started + reply.expires_in
    meta = {"scope": reply.scope} if reply.scope else {}
    return Credential(token=reply.access_token, expires_at=expires_at, created=True, obtained_at=started, meta=meta)


def _stored_token(doc: Any) -> Secret | None:
    value = doc.get("refresh_token") if isinstance(doc, dict) else None
    return Secret(value) if isinstance(value, str) and value else None


def _pasted_response(answer: str) -> dict[str, str]:
    """The oob prompt takes the bare code, or the whole redirect URL / query if that is what was copied."""
    if "code=" in answer or "error=" in answer:
        query = answer.split("?", 1)[1] if "?" in answer else answer
        return dict(parse_qsl(query.split("#", 1)[0], keep_blank_values=True))
    return {"code": answer}


def _html(title: str, message: str) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>authproxy: "
        f"{html.escape(title)}</title></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(message)}</p></body></html>\n"
    )
