"""``authproxy rotate`` for the App-Token scheme: a new app token made, proved and stored.

A new app token is made with the service user's token, then proved before
anything depends on it: a login with it (whose token is expired at once), or,
with a fixed user token, an authenticated read of that token's own record. Only
then is it stored — durably, since with ``--expire-old`` it becomes the only
working one — where it takes precedence over the configured ``app_token``. A new
token that fails its proof, or cannot be stored, is expired again at once: none
is left valid that nobody will use. One rotation runs at a time per store (under
its lock). No token is ever printed.

:class:`AppTokenRotation` is the ``Rotatable`` capability of
:class:`~authproxy.schemes.app_token.AppTokenScheme`, which reads the stored
token back (``_reload_app_token``) and provides the requests it makes
(``_login``, ``_with_service_token``, ``_expire``, ``_headers``,
``_service_credential``, ``_token_in``, ``_failure``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING
from urllib.parse import quote

from authproxy.observe import log_event
from authproxy.schemes.base import CliIO, CredentialError, NotSupported, Rotatable
from authproxy.secret import Secret
from authproxy.store.base import StoreError

if TYPE_CHECKING:
    from authproxy.schemes.app_token import AppTokenScheme

APP_TOKEN_DOC = "app_token"  # the rotated app token, in the service's corner of the state dir
DEFAULT_APP_TOKEN_SECONDS = 31_536_000  # `rotate` without --seconds: one year


class AppTokenRotation(Rotatable):
    """Mixed into :class:`~authproxy.schemes.app_token.AppTokenScheme` (see above)."""

    async def rotate(self: "AppTokenScheme", cli: CliIO, seconds: int | None, expire_old: bool) -> None:
        """Create a new app token, prove it works, store it; with ``expire_old``, expire
        the one it replaces. Never prints a token."""
        seconds = DEFAULT_APP_TOKEN_SECONDS if seconds is None else seconds
        if seconds <= 0:
            raise NotSupported("--seconds must be greater than 0")
        try:
            async with self.ctx.store.lock(APP_TOKEN_DOC):  # one rotation at a time per store
                await self._rotate(cli, seconds, expire_old)
        except StoreError as e:
            raise CredentialError(str(e)) from None

    async def _rotate(self: "AppTokenScheme", cli: CliIO, seconds: int, expire_old: bool) -> None:
        name = self.ctx.service.name
        await self._reload_app_token()
        old, old_source = self._app_token, self._app_token_source
        new = await self._create_app_token(seconds)
        try:
            proof = await self._prove(new)
        except CredentialError as e:
            await self._discard(new, old)
            raise CredentialError(f"the new app token did not work ({e.message}); it was expired again and not stored — the current one stays in use") from None
        try:
            until = await self._store_app_token(new, seconds)
        except StoreError:
            await self._discard(new, old)  # a token nobody will ever use again must not stay valid
            raise
        cli.say(f"{name}: created a new app token, valid for {_duration(seconds)} (until {until}); {proof}.")
        cli.say(f"{name}: stored it in {self.ctx.store.where}; it now takes precedence over the configured app_token.")
        cli.say(f"{name}: a running proxy uses it after SIGHUP (kill -HUP PID, systemctl reload authproxy) or at its next login.")
        if not expire_old:
            cli.say(f"{name}: the previous app token ({_source(old_source)}) was left valid; --expire-old expires it.")
            return
        user = await self._service_credential()
        await self._expire(self.config.app_tokens_path, old, auth=user.token, app=new, what="expire the previous app token")
        cli.say(f"{name}: expired the previous app token ({_source(old_source)}).")
        if old_source == "config":
            cli.say(
                f"{name}: the configured app_token no longer works: the state dir now holds the only working one. "
                f"Keep the state dir, or put the new token into your configuration (`authproxy token {name} --json` shows it)."
            )

    async def _store_app_token(self: "AppTokenScheme", new: Secret, seconds: int) -> str:
        """Write the new app token durably (it may become the only working one) and use
        it from now on; returns its expiry, for people."""
        now = time.time()
        doc = {"identity": self.ctx.service.upstream.url, "app_token": new.reveal(), "created_at": now, "expires_at": now + seconds}
        await self.ctx.store.put(APP_TOKEN_DOC, doc)
        await self._reload_app_token()
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(now + seconds))

    async def _create_app_token(self: "AppTokenScheme", seconds: int) -> Secret:
        reply = await self._with_service_token("create app token", self._app_tokens_url, {"seconds_until_expire": seconds})
        if reply.status // 100 != 2:
            raise self._failure("create app token", reply)
        return self._token_in(reply, "app_token", "create app token")

    async def _prove(self: "AppTokenScheme", new: Secret) -> str:
        """Show that the upstream accepts ``new``: a login with it (the token that login
        makes is expired at once), or, with a fixed user token, reading that token's
        own record with it. Returns what proved it."""
        if self.config.token is None:
            reply = await self._login(new)
            if reply.status // 100 != 2:
                raise self._failure("login with the new app token", reply)
            token = self._token_in(reply, "token", "login with the new app token")
            try:
                await self._expire(self.config.tokens_path, token, auth=token, app=new, what="expire the test login's token")
            except CredentialError as e:
                log_event(self.ctx.log, logging.WARNING, "token_revoke_failed", service=self.ctx.service.name, error=e.message)
            return "a login with it succeeded"
        fixed = self.config.token
        quoted = quote(fixed.reveal(), safe="")
        url = self.ctx.upstream_url(self.config.tokens_path.rstrip("/") + f"/{quoted}/")
        try:
            reply = await self.ctx.request("GET", url, what="check the new app token", headers=self._headers(fixed, new))
        except CredentialError as e:
            raise CredentialError(self.ctx.error_text(e.message, fixed, quoted)) from None
        if reply.status // 100 != 2:
            raise self._failure("an authenticated GET with the new app token", reply, fixed, quoted)
        return "an authenticated request with it succeeded"

    async def _discard(self: "AppTokenScheme", new: Secret, old: Secret) -> None:
        """Best effort: expire a new app token that will not be used."""
        try:
            user = await self._service_credential()
            await self._expire(self.config.app_tokens_path, new, auth=user.token, app=old, what="expire the unused app token")
        except CredentialError as e:
            log_event(self.ctx.log, logging.WARNING, "token_revoke_failed", service=self.ctx.service.name, error=e.message)


def _source(source: str) -> str:
    return "the configured app_token" if source == "config" else "the one stored by the last rotate"


def _duration(seconds: int) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = seconds // size
            return f"{n} {unit}{'' if n == 1 else 's'}"
    return f"{seconds} s"
