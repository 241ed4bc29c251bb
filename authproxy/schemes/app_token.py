"""``App-Token`` + ``Token`` headers (Enfix LP-style REST APIs).

Every request carries a long-lived application token and a user token. The user
token comes from a form-encoded login that never says how long the token lives,
so the configured ``token_lifetime`` stands in for an expiry and the credential
manager logs in again ahead of it. A client may ask for a request to be made on
behalf of another user (``X-Authproxy-On-Behalf-Of``): that user's token is
created with the service user's token, once per user, and cached until it
expires.

Every token this scheme creates is marked ``created``: the manager records it in
the state dir (a restart reuses it), and expires it (``PATCH {"seconds_until_expire":
-1}``) when it is replaced early, at exit, and on ``authproxy logout``. Tokens
authproxy was given (``token:``) are never expired.

``authproxy rotate`` makes a new app token and stores it in the state dir, where
it takes precedence over the configured one; the running proxy reads it on
SIGHUP and before every login. Making, proving and storing one is
:mod:`authproxy.schemes.app_token_rotate`; reading the stored one is here.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import quote

from authproxy.observe import log_event
from authproxy.schemes.base import (
    MASK_WINDOW,
    Credential,
    CredentialError,
    Forbidden,
    Outgoing,
    Reply,
    Keyed,
    Scheme,
    Stateful,
    SchemeContext,
    UpstreamReply,
)
from authproxy.schemes.app_token_rotate import APP_TOKEN_DOC, AppTokenRotation
from authproxy.secret import Secret
from authproxy.settings import FieldError
from authproxy.store.base import StoreError

ON_BEHALF_OF = "X-Authproxy-On-Behalf-Of"
MAX_USER_ID = 256
MAX_SENT = 10_000  # tokens remembered per key (see _still_good); as many as the manager caches
_HEADER_UNSAFE = ("\r", "\n", "\0")


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class OboConfig:
    """``obo:`` — on-behalf-of tokens; absent = no client may ask for one."""

    allow_users: tuple[str, ...] = ()  # user ids a client may ask for; ["*"] = any
    seconds_until_expire: int = 86400

    def check(self) -> None:
        if self.seconds_until_expire <= 0:
            raise FieldError("seconds_until_expire", "must be greater than 0")
        for user in self.allow_users:
            if user != "*" and not _plausible_user_id(user):
                raise FieldError("allow_users", f"{user!r} is not a user id (no blanks or control characters, at most {MAX_USER_ID} characters)")


@dataclass(frozen=True)
class AppTokenConfig:
    app_token: Secret
    login_path: str = "/api/v1/token/"
    username: str | None = None
    password: Secret | None = None
    token: Secret | None = None  # a fixed user token instead of logging in
    token_lifetime: float = 86400.0
    refresh_margin: float = 300.0
    tokens_path: str = "/api/v1/tokens/"
    app_tokens_path: str = "/api/v1/app_tokens/"
    obo: OboConfig | None = None
    expire_on_exit: bool = True

    def check(self) -> None:
        if not self.app_token:
            raise FieldError("app_token", "is empty")
        for key in ("app_token", "token"):
            value = getattr(self, key)
            if value is not None and any(c in value.reveal() for c in _HEADER_UNSAFE):
                raise FieldError(key, "contains a line break; it is sent as a header value")
        if self.token is not None:
            if not self.token:
                raise FieldError("token", "is empty")
            if self.username is not None or self.password is not None:
                raise FieldError("token", "give either a fixed token or username and password, not both")
        else:
            if not self.username:
                raise FieldError("username", "required (or give a fixed user token as token)")
            if not self.password:
                raise FieldError("password", "required (or give a fixed user token as token)")
        if self.token_lifetime <= 0:
            raise FieldError("token_lifetime", "must be greater than 0")
        if self.refresh_margin < 0:
            raise FieldError("refresh_margin", "must not be negative")
        for key in ("login_path", "tokens_path", "app_tokens_path"):
            path = getattr(self, key)
            if not path.startswith("/") or "?" in path or "#" in path:
                raise FieldError(key, "must be a path starting with '/', relative to the upstream (e.g. /api/v1/token/)")


def _plausible_user_id(user: str) -> bool:
    return 0 < len(user) <= MAX_USER_ID and user.isprintable() and not any(c.isspace() for c in user)


# --------------------------------------------------------------------------- the scheme


class AppTokenScheme(Scheme, Keyed, AppTokenRotation, Stateful):
    Config = AppTokenConfig
    revoke_replaced = True  # a user token replaced by an early re-login is expired at once
    consumed_headers = (ON_BEHALF_OF,)
    persist_created = True  # created user and OBO tokens survive a restart (and kill -9)

    config: AppTokenConfig

    def __init__(self, ctx: SchemeContext) -> None:
        super().__init__(ctx)
        self._login_url = ctx.upstream_url(self.config.login_path)
        self._tokens_url = ctx.upstream_url(self.config.tokens_path)
        self._app_tokens_url = ctx.upstream_url(self.config.app_tokens_path)
        # The app token in use: the rotated one from the state dir, else the configured one.
        self._app_token: Secret = self.config.app_token
        self._app_token_source = "config"
        self._app_token_expires: float | None = None
        self._app_token_seen: float | None = -1.0  # the state doc's mtime last read (-1: never)
        self._app_generation = 0  # +1 each time the app token in use changes
        self._sent: dict[str | None, tuple[Credential, int]] = {}  # key → (token last sent, with which app token)

    async def prepare(self) -> None:
        await self._reload_app_token(initial=True)

    # ------------------------------------------------------------------ what a scheme says
    async def obtain(self, key: str | None) -> Credential:
        await self._reload_app_token()  # a rotated app token is used from the next login on
        kept = self._still_good(key)
        if kept is not None:
            return kept
        if key is None:
            return await self._user_token()
        return await self._obo_token(key)

    def apply(self, out: Outgoing, cred: Credential) -> None:
        out.headers["App-Token"] = self._app_token.reveal()
        out.headers["Token"] = cred.token.reveal()
        if len(self._sent) > MAX_SENT:
            self._sent.clear()
        self._sent[cred.key] = (cred, self._app_generation)

    def _still_good(self, key: str | None) -> Credential | None:
        """A token last sent with an app token that has changed since: the 401 that
        brought us here was the old app token's (`rotate --expire-old` under a proxy not
        yet sent SIGHUP), so the token is still good with the new one. Reusing it saves
        a login and leaves no valid token behind; if it fails again, it is replaced."""
        cred, generation = self._sent.get(key, (None, self._app_generation))
        if cred is None or generation == self._app_generation or not cred.created:
            return None
        if self.ctx.credentials is not None and self.ctx.credentials.current(key) is cred:
            return None  # not rejected, just due for renewal: renew it
        if cred.expires_at is not None and cred.expires_at <= time.time() + 1:
            return None
        self._sent[key] = (cred, self._app_generation)
        log_event(self.ctx.log, logging.INFO, "token_kept", service=self.ctx.service.name, key=key, reason="app token changed")
        return cred

    @property
    def revoke_on_exit(self) -> bool:
        return self.config.expire_on_exit

    def identity(self) -> str:
        """Recorded tokens are reused only for the same upstream and user."""
        who = f"login={self.config.login_path} user={self.config.username}" if self.config.token is None else "fixed-token"
        return f"{self.ctx.service.upstream.url} {who}"

    def credential_key(self, headers: Mapping[str, str]) -> str | None:
        values = _all(headers, ON_BEHALF_OF)
        if not values:
            return None
        name = self.ctx.service.name
        obo = self.config.obo
        if obo is None:
            raise Forbidden("obo_forbidden", f"service {name} does not issue on-behalf-of tokens")
        users = {v.strip() for v in values}
        if len(users) != 1:
            raise Forbidden("obo_forbidden", f"give one {ON_BEHALF_OF} header, not several")
        user = users.pop()
        if not _plausible_user_id(user):
            raise Forbidden("obo_forbidden", f"{ON_BEHALF_OF} is not a user id")
        if "*" not in obo.allow_users and user not in obo.allow_users:
            raise Forbidden("obo_forbidden", f"service {name} may not act on behalf of user {user} (obo.allow_users)")
        return user

    async def revoke(self, cred: Credential) -> None:
        """Expire a created user or OBO token, authenticated as itself (so expiring the
        service user's token at exit never races the OBO tokens it made)."""
        await self._expire(self.config.tokens_path, cred.token, auth=cred.token, app=self._app_token, what="expire token")

    async def reload(self) -> None:
        await self._reload_app_token()

    # ------------------------------------------------------------------ the user token
    async def _user_token(self) -> Credential:
        cfg = self.config
        if cfg.token is not None:
            return Credential(token=cfg.token)  # given, not created: never expired by authproxy
        assert cfg.username is not None and cfg.password is not None  # check() made sure
        reply = await self._login(self._app_token)
        if reply.status // 100 != 2:
            raise self._failure("login", reply)
        now = time.time()
        token = self._token_in(reply, "token", "login")
        return Credential(token=token, expires_at=now + cfg.token_lifetime, created=True, obtained_at=now)

    async def _login(self, app_token: Secret) -> Reply:
        cfg = self.config
        assert cfg.username is not None and cfg.password is not None
        return await self.ctx.request(
            "POST",
            self._login_url,
            what="login",
            data={"username": cfg.username, "password": cfg.password.reveal()},
            headers={"App-Token": app_token.reveal()},
        )

    async def _service_credential(self) -> Credential:
        """The service user's own token, through the manager (cache, single-flight, persistence)."""
        if self.ctx.credentials is None:  # pragma: no cover - the manager always sets it
            raise CredentialError("app_token: no credential manager")
        return await self.ctx.credentials.get(None)

    # ------------------------------------------------------------------ on-behalf-of tokens
    async def _obo_token(self, user: str) -> Credential:
        obo = self.config.obo
        if obo is None:
            raise CredentialError(f"service {self.ctx.service.name} does not issue on-behalf-of tokens")
        body = {"seconds_until_expire": obo.seconds_until_expire, "user": user}
        reply = await self._with_service_token("on-behalf-of token", self._tokens_url, body)
        if reply.status // 100 == 2:
            now = time.time()
            token = self._token_in(reply, "token", "on-behalf-of token")
            return Credential(token=token, expires_at=now + obo.seconds_until_expire, created=True, key=user, obtained_at=now)
        if 400 <= reply.status < 500 and reply.status not in (401, 408, 429):
            # The client asked for something the upstream will not do (a malformed or
            # unknown id): its own answer goes back to the client, and nothing is cached.
            headers = {"Content-Type": reply.headers.get("Content-Type", "application/json")}
            raise UpstreamReply(reply.status, headers, reply.body)
        raise self._failure("on-behalf-of token", reply)

    async def _with_service_token(self, what: str, url: str, body: dict[str, Any], app: Secret | None = None) -> Reply:
        """POST a JSON body with the service user's token; a 401 means that token died
        upstream, so drop it, get a fresh one (one login for all waiting) and try once more."""
        reply: Reply | None = None
        for attempt in range(2):
            service = await self._service_credential()
            reply = await self.ctx.request("POST", url, what=what, json_body=body, headers=self._headers(service.token, app))
            if reply.status != 401 or attempt or self.ctx.credentials is None:
                break
            self.ctx.credentials.rejected(service)
        assert reply is not None
        return reply

    def _headers(self, token: Secret, app: Secret | None = None) -> dict[str, str]:
        return {"App-Token": (app or self._app_token).reveal(), "Token": token.reveal()}

    # ------------------------------------------------------------------ expiring tokens
    async def _expire(self, base_path: str, target: Secret, *, auth: Secret, app: Secret, what: str) -> None:
        """PATCH {base_path}{target}/ with {"seconds_until_expire": -1}. A token the
        upstream no longer knows (404) or no longer accepts as itself (401) is dead already."""
        raw = target.reveal()
        quoted = quote(raw, safe="")
        url = self.ctx.upstream_url(base_path.rstrip("/") + f"/{quoted}/")
        try:
            reply = await self.ctx.request(
                "PATCH", url, what=what, json_body={"seconds_until_expire": -1}, headers=self._headers(auth, app)
            )
        except CredentialError as e:  # its message names the URL, which holds the token
            raise CredentialError(self.ctx.error_text(e.message, target, quoted, auth), refused=e.refused) from None
        if reply.status // 100 == 2 or reply.status == 404 or (reply.status == 401 and auth == target):
            return
        raise self._failure(what, reply, target, quoted, auth)

    # ------------------------------------------------------------------ the rotated app token
    async def _reload_app_token(self, initial: bool = False) -> bool:
        """Use the app token `authproxy rotate` stored (made for this upstream, not
        expired), else the configured one. Cheap when nothing changed: one stat."""
        try:
            mtime = await self.ctx.store.version(APP_TOKEN_DOC)
        except StoreError as e:
            log_event(self.ctx.log, logging.WARNING, "app_token_unreadable", service=self.ctx.service.name, error=str(e))
            return False
        lapsed = self._app_token_expires is not None and time.time() >= self._app_token_expires
        if mtime == self._app_token_seen and not lapsed:
            return False
        self._app_token_seen = mtime
        token, source, expires = self.config.app_token, "config", None
        if mtime is not None:
            stored = await self._stored_app_token()
            if stored is not None:
                token, source, expires = stored
        changed = token != self._app_token
        self._app_token, self._app_token_source, self._app_token_expires = token, source, expires
        if changed:
            self._app_generation += 1
            event = "app_token_in_use" if initial else "app_token_changed"
            log_event(self.ctx.log, logging.INFO, event, service=self.ctx.service.name, source=source)
        return changed and not initial

    async def _stored_app_token(self) -> tuple[Secret, str, float | None] | None:
        name = self.ctx.service.name
        try:
            doc = await self.ctx.store.get(APP_TOKEN_DOC)
        except StoreError as e:
            log_event(self.ctx.log, logging.WARNING, "app_token_unreadable", service=name, error=str(e))
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("app_token"), str) or not doc["app_token"]:
            return None
        if doc.get("identity") != self.ctx.service.upstream.url:
            log_event(self.ctx.log, logging.WARNING, "app_token_ignored", service=name, reason="stored for another upstream")
            return None
        expires = doc.get("expires_at")
        if isinstance(expires, (int, float)) and expires <= time.time():
            log_event(self.ctx.log, logging.WARNING, "app_token_expired", service=name, using="config")
            return None
        return Secret(doc["app_token"]), "state", float(expires) if isinstance(expires, (int, float)) else None

    # ------------------------------------------------------------------ replies
    def _token_in(self, reply: Reply, field: str, what: str) -> Secret:
        doc = reply.json()
        value = doc.get(field) if isinstance(doc, dict) else None
        if not isinstance(value, str) or not value or any(c in value for c in _HEADER_UNSAFE):
            raise CredentialError(f"{what}: the reply (HTTP {reply.status}) has no usable {field!r}")
        return Secret(value)

    def _failure(self, what: str, reply: Reply, *more: Secret | str | None) -> CredentialError:
        """A credential endpoint said no (4xx: refused, back off hard) or failed (5xx):
        its own message, with anything of ours it echoes masked."""
        refused = 400 <= reply.status < 500 and reply.status not in (408, 429)
        detail = self.ctx.error_text(_detail(reply), self._app_token, *more)[:200]  # masked whole, then cut
        verb = "refused" if refused else "failed"
        return CredentialError(f"{what} {verb}: HTTP {reply.status}: {detail}", refused=refused)


def _detail(reply: Reply) -> str:
    """DRF errors: ``{"detail": ...}``, ``{"errors": {...}}``, ``{"field": [...]}``."""
    try:
        doc = json.loads(reply.body)
    except ValueError:
        return reply.text(MASK_WINDOW) or "(no body)"
    if isinstance(doc, dict) and isinstance(doc.get("detail"), str):
        return doc["detail"][:MASK_WINDOW]
    return json.dumps(doc)[:MASK_WINDOW]


def _all(headers: Mapping[str, str], name: str) -> list[str]:
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return list(getall(name, ()))
    value = next((v for k, v in headers.items() if k.lower() == name.lower()), None)
    return [] if value is None else [value]

