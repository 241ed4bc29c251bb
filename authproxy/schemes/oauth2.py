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
redirect); :mod:`oauth2_login` is the authorization-code login. This module is
the scheme: configuration, the grants, the stored refresh token, logout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

from authproxy.observe import log_event
from authproxy.schemes import rfc7009, rfc8628
from authproxy.schemes.base import CliIO, Credential, CredentialError, Interactive, LoginRequired, Outgoing, Scheme, SchemeContext, Stateful
from authproxy.schemes.oauth2_login import LOGIN_DOC, CodeLogin
from authproxy.schemes.oauth2_config import OAuth2Config
from authproxy.schemes.rfc6749 import ClientAuth, OAuthError, TokenEndpoint, TokenReply
from authproxy.schemes.rfc7523 import AssertionSigner, KeyFileError, jwt_bearer_params, load_private_key
from authproxy.schemes.rfc8693 import token_exchange_params
from authproxy.secret import Secret
from authproxy.store.base import StoreError

REFRESH_DOC = "refresh"  # the stored refresh token (and the lock around using it)
WATCH_INTERVAL = 2.0  # while login_required: how often the state dir is checked for a new login


# --------------------------------------------------------------------------- the scheme


class OAuth2Scheme(Scheme, Interactive, Stateful):
    Config = OAuth2Config

    def __init__(self, ctx: SchemeContext) -> None:
        super().__init__(ctx)
        self.name = ctx.service.name
        self.setup_error: str | None = None
        self.endpoint = TokenEndpoint(ctx, self.config.token_url, self._client_auth(), self.config.extra_params)
        # (mtime of the stored refresh token, why it cannot be used): while the store
        # is unchanged, obtain() answers login_required without touching the network.
        self._dead: tuple[float | None, str] | None = None
        self._unsaved: Secret | None = None  # a rotated refresh token the state dir refused
        self._handoff: Credential | None = None  # the access token a login in this process got
        self._watcher: asyncio.Task[None] | None = None
        self._nudge: asyncio.Task[None] | None = None
        self._login = CodeLogin(self)

    def _client_auth(self) -> ClientAuth:
        cfg: OAuth2Config = self.config
        signer = None
        if cfg.client_auth == "private_key_jwt":
            try:
                key = load_private_key(str(cfg.private_key_file), cfg.jwt_alg)
            except KeyFileError as e:
                self.setup_error = f"private_key_file: {e}"
                return ClientAuth("none", cfg.client_id)
            signer = AssertionSigner(key, cfg.jwt_alg, cfg.client_id, cfg.token_url, cfg.jwt_lifetime)
        self.setup_error = None
        return ClientAuth(cfg.client_auth, cfg.client_id, cfg.client_secret, signer)

    # ------------------------------------------------------------------ the Scheme interface
    def identity(self) -> str:
        """A stored refresh token is only used by the configuration it was made for."""
        cfg: OAuth2Config = self.config
        return json.dumps(["oauth2", cfg.token_url, cfg.client_id, cfg.scope or ""])

    async def obtain(self, key: str | None) -> Credential:
        if self.setup_error is not None:
            raise CredentialError(self.setup_error, refused=True)
        direct = DIRECT_GRANTS.get(self.config.grant)
        if direct is not None:  # one token request per access token
            started = time.time()
            params = await direct(self)
            reply = await self.endpoint.request(params, what="token request", secrets=_secret_values(params))
            return _credential(reply, started)
        try:  # a person logged in once (code or device flow): trade the stored refresh token
            return await self._refreshed()
        except LoginRequired:
            self._watch_store()
            raise

    def apply(self, out: Outgoing, cred: Credential) -> None:
        out.headers["Authorization"] = "Bearer " + cred.token.reveal()

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
        if self.ctx.credentials is not None and (self._watcher is None or self._watcher.done()):
            self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while self._dead is not None:
            await asyncio.sleep(WATCH_INTERVAL)
            dead = self._dead
            try:
                changed = dead is not None and await self._version() != dead[0]
            except CredentialError:
                continue  # the store is unreachable: look again later
            if changed:
                await self._fetch_now()

    async def _fetch_now(self) -> None:
        with contextlib.suppress(Exception):
            await self.ctx.credentials.get(None)  # type: ignore[union-attr]

    async def reload(self) -> None:
        """SIGHUP: re-read the key file (rotated under the same name) and the store."""
        self.endpoint.auth = self._client_auth()
        self._dead = None

    async def logout(self) -> int:
        """Revoke the stored refresh token (RFC 7009) when a revocation_url is set, then
        forget it. If the server cannot be reached nothing is deleted, so logout can be run
        again. Returns how many tokens were revoked upstream."""
        revoked = 0
        cfg: OAuth2Config = self.config
        store = self.ctx.store
        async with self._locked(REFRESH_DOC):
            doc = await self._read(REFRESH_DOC) or {}
            token = _stored_token(doc) if doc.get("identity") == self.identity() and not doc.get("rejected") else None
            if token is not None and cfg.revocation_url:
                try:
                    await rfc7009.revoke(self.endpoint, cfg.revocation_url, token, "refresh_token")
                except CredentialError as e:
                    raise CredentialError(
                        f"{e.message}; nothing was deleted, run `authproxy logout {self.name}` again once the server answers"
                    ) from None
                revoked = 1
                log_event(self.ctx.log, logging.INFO, "refresh_token_revoked", service=self.name)
            elif token is not None:
                log_event(
                    self.ctx.log,
                    logging.WARNING,
                    "refresh_token_forgotten",
                    service=self.name,
                    note="no revocation_url: it stays valid at the server until it expires or is revoked there",
                )
            await store.delete(REFRESH_DOC)
            await store.delete(LOGIN_DOC)
        self._dead = None
        self._unsaved = None
        self._handoff = None
        return revoked

    # ------------------------------------------------------------------ client_credentials
    # ------------------------------------------------------------------ refresh_token
    async def _refreshed(self) -> Credential:
        handoff, self._handoff = self._handoff, None
        if handoff is not None and (handoff.expires_at is None or handoff.expires_at > time.time() + 1):
            return handoff
        if self._dead is not None and await self._version() == self._dead[0]:
            raise LoginRequired(self._dead[1])
        stored = _stored_access(await self._read(REFRESH_DOC), self.identity())
        if stored is not None:  # a login that got no refresh token: its access token, until it expires
            return stored
        async with self._locked(REFRESH_DOC):
            token = await self._usable_refresh_token()
            started = time.time()
            try:
                reply = await self.endpoint.request(
                    {"grant_type": "refresh_token", "refresh_token": token.reveal()}, what="token refresh", secrets=(token,)
                )
            except OAuthError as e:
                if e.error == "invalid_grant":
                    await self._mark_rejected(e.message)
                    raise LoginRequired(e.message) from None
                raise
            if reply.refresh_token is not None and reply.refresh_token != token:
                await self._store_refresh_token(reply.refresh_token)  # durable before the access token is used
        return _credential(reply, started)

    async def _usable_refresh_token(self) -> Secret:
        """The refresh token to present now, re-read inside the lock: another process may
        have rotated it since. Raises LoginRequired (and remembers why) when there is none."""
        if self._unsaved is not None:
            await self._store_refresh_token(self._unsaved)
        mtime = await self._version()  # before reading: a later change must not look seen
        doc = await self._read(REFRESH_DOC)
        reason: str | None = None
        token = _stored_token(doc)
        if doc is None:
            reason = "not logged in yet"
        elif doc.get("identity") != self.identity():
            reason = "the stored login was made for another token_url, client_id or scope"
        elif doc.get("rejected"):
            reason = f"the stored refresh token was refused ({doc['rejected']})"
        elif token is None:
            reason = "the stored login holds no refresh token" + (" and its access token has expired" if doc.get("access_token") else "")
        if reason is not None:
            self._dead = (mtime, reason)
            raise LoginRequired(reason)
        self._dead = None
        assert token is not None
        return token

    async def _store_refresh_token(self, token: Secret) -> None:
        """Write the refresh token durably (temp file, fsync, rename, 0600). If the state
        dir refuses, keep it in memory and hold the access token back: handing out
        access while the only valid refresh token lives in RAM would lose the grant on exit."""
        doc = {"identity": self.identity(), "refresh_token": token.reveal(), "stored_at": time.time(), "rejected": None}
        try:
            await self.ctx.store.put(REFRESH_DOC, doc)
        except StoreError as e:
            self._unsaved = token
            raise CredentialError(f"cannot store the new refresh token ({e}); retrying") from None
        self._unsaved = None
        self._dead = None

    async def _store_access_only(self, cred: Credential) -> None:
        doc = {"identity": self.identity(), "refresh_token": None, "access_token": cred.token.reveal(), "expires_at": cred.expires_at, "stored_at": time.time(), "rejected": None}
        try:
            await self.ctx.store.put(REFRESH_DOC, doc)
        except StoreError as e:
            raise CredentialError(f"cannot store the login's access token ({e})") from None
        self._dead = None

    async def _mark_rejected(self, message: str) -> None:
        """Record in the state dir that the stored refresh token is dead, so that no
        process presents it again (a restart, ``authproxy token``) until a new login."""
        doc = await self.read_quiet(REFRESH_DOC) if self._unsaved is None else None
        if isinstance(doc, dict):
            doc["rejected"] = message
            try:
                await self.ctx.store.put(REFRESH_DOC, doc)
            except StoreError:
                pass
        self._dead = (await self._version(), f"the stored refresh token was refused ({message})")

    async def _version(self) -> Any:
        try:
            return await self.ctx.store.version(REFRESH_DOC)
        except StoreError as e:
            raise CredentialError(str(e)) from None

    @contextlib.asynccontextmanager
    async def _locked(self, name: str) -> AsyncIterator[None]:
        """The store's lock on ``name``; a store that cannot be reached is a credential failure."""
        try:
            async with self.ctx.store.lock(name):
                yield
        except StoreError as e:
            raise CredentialError(str(e)) from None

    async def _read(self, name: str) -> dict[str, Any] | None:
        try:
            doc = await self.ctx.store.get(name)
        except StoreError as e:
            raise CredentialError(str(e)) from None
        return doc if isinstance(doc, dict) else None

    # ------------------------------------------------------------------ authorization_code: login
    async def login(self, cli: CliIO, device: bool = False) -> None:
        if device or self.config.grant == "device_code":
            await rfc8628.login(self, cli)  # RFC 8628: no browser on this machine
            return
        await self._login.login(cli)

    async def callback(self, params: Mapping[str, str]) -> tuple[int, str]:
        return await self._login.callback(params)

    async def store_login(self, reply: TokenReply, started: float, keep_access: bool = False) -> None:
        """Keep what a code exchange brought: the refresh token, stored durably before
        anything else; the access token, handed to the next obtain() in this process;
        and the previous login's refresh token is revoked (best effort). ``keep_access``
        (the device flow): a reply without a refresh token stores its access token
        instead, for every process to use until it expires (then login_required)."""
        if reply.refresh_token is None and not keep_access:
            raise CredentialError(
                "the server issued no refresh token, so authproxy could not renew access once this one expires "
                "(some servers want an offline_access scope, or refresh tokens enabled for the client)"
            )
        async with self._locked(REFRESH_DOC):
            old = await self.read_quiet(REFRESH_DOC)
            if reply.refresh_token is not None:
                await self._store_refresh_token(reply.refresh_token)
            else:
                await self._store_access_only(_credential(reply, started))
        self._handoff = _credential(reply, started)
        if not isinstance(old, dict) or old.get("identity") != self.identity() or old.get("rejected"):
            return
        replaced = _stored_token(old)
        if replaced is not None and replaced != reply.refresh_token and self.config.revocation_url:
            await self._revoke_quietly(replaced)

    def use_login_now(self) -> None:
        """A login completed in this process (the proxy's callback): fetch now, so the
        service is ready at once rather than at its next request."""
        if self.ctx.credentials is not None:
            self._nudge = asyncio.ensure_future(self._fetch_now())

    async def read_quiet(self, name: str) -> Any:
        try:
            return await self.ctx.store.get(name)
        except StoreError:
            return None

    async def _revoke_quietly(self, token: Secret) -> None:
        """The refresh token of the previous login is no longer used: revoke it, best effort."""
        try:
            await rfc7009.revoke(self.endpoint, self.config.revocation_url, token, "refresh_token")
        except CredentialError as e:
            log_event(self.ctx.log, logging.WARNING, "refresh_token_revoke_failed", service=self.name, error=e.message)


# --------------------------------------------------------------------------- grants without a login


async def _client_credentials(scheme: OAuth2Scheme) -> dict[str, str]:
    """RFC 6749 §4.4: the client's own account."""
    params = {"grant_type": "client_credentials"}
    if scheme.config.scope:
        params["scope"] = scheme.config.scope
    return params


#: grant → the token request's parameters (client authentication is added by the
#: endpoint). A grant whose tokens come from a person's login is not here: those
#: trade the stored refresh token (authorization_code, device_code).
DIRECT_GRANTS: dict[str, Callable[[OAuth2Scheme], Awaitable[Mapping[str, str | list[str]]]]] = {
    "client_credentials": _client_credentials,
    "token_exchange": token_exchange_params,  # RFC 8693
    "jwt_bearer": jwt_bearer_params,  # RFC 7523 §2.1
}


# --------------------------------------------------------------------------- helpers


def _secret_values(params: Mapping[str, str | list[str]]) -> tuple[Secret, ...]:
    """Values a grant sends that are secrets of their own (an assertion, a subject
    token): masked in any error text that echoes them."""
    return tuple(Secret(v) for k, v in params.items() if k in GRANT_SECRETS and v)


GRANT_SECRETS = frozenset({"assertion", "subject_token", "actor_token", "device_code"})


def _credential(reply: TokenReply, started: float) -> Credential:
    """An access token; its lifetime counts from before the request was sent."""
    expires_at = None if reply.expires_in is None else started + reply.expires_in
    meta = {"scope": reply.scope} if reply.scope else {}
    return Credential(token=reply.access_token, expires_at=expires_at, created=True, obtained_at=started, meta=meta)


def _stored_access(doc: Any, identity: str) -> Credential | None:
    """The access token a login stored because the server issued no refresh token,
    while it lives (counted from now, so the manager re-reads it, ever closer to its end)."""
    if not isinstance(doc, dict) or doc.get("identity") != identity or doc.get("refresh_token") or doc.get("rejected"):
        return None
    token, expires_at, now = doc.get("access_token"), doc.get("expires_at"), time.time()
    if not isinstance(token, str) or not token or (isinstance(expires_at, (int, float)) and expires_at <= now + 1):
        return None
    expires = float(expires_at) if isinstance(expires_at, (int, float)) else None
    return Credential(token=Secret(token), expires_at=expires, created=True, obtained_at=now)


def _stored_token(doc: Any) -> Secret | None:
    value = doc.get("refresh_token") if isinstance(doc, dict) else None
    return Secret(value) if isinstance(value, str) and value else None
