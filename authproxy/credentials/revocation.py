"""Revoking what authproxy created: a credential replaced while still valid (at
once, when the scheme wants that: an idle valid token is a liability), and every
still-valid one at exit or ``authproxy logout`` — and, with a shared store, so
that no other process picks up a revoked one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Awaitable, Callable

from authproxy.credentials.records import CreatedRecords
from authproxy.credentials.shared import SharedSlots
from authproxy.observe import log_event
from authproxy.schemes.base import Credential, CredentialError, Scheme
from authproxy.store.base import StoreError

log = logging.getLogger("authproxy.credentials")


class Revocations:
    def __init__(
        self,
        name: str,
        scheme: Scheme,
        records: CreatedRecords,
        shared: SharedSlots | None,
        mask: Callable[..., str],
        clock: Callable[[], float],
    ) -> None:
        self.name = name
        self.scheme = scheme
        self.records = records
        self.shared = shared
        self.mask = mask
        self.clock = clock

    def retire(self, old: Credential, background: Callable[[Awaitable[Any]], None]) -> None:
        """``old`` was replaced: revoke it now if authproxy made it, it is still valid and
        the scheme revokes replaced credentials; else just forget an expired one."""
        token = old.token.reveal()
        if not self.records.has(old):
            return
        still_valid = old.expires_at is None or old.expires_at > self.clock()
        if not (self.scheme.revoke_replaced and still_valid):
            if not still_valid and self.records.forget(token):
                background(self.records.save())
            return

        async def run() -> None:
            try:
                await self.scheme.revoke(old)
                self.records.forget(token)
                await self.records.save()
                log_event(log, logging.INFO, "token_revoked", service=self.name, key=old.key, reason="replaced")
            except CredentialError as e:
                log_event(log, logging.WARNING, "token_revoke_failed", service=self.name, key=old.key, error=self.mask(e.message, old.key, old))

        background(run())

    async def revoke_all(self, forget_cached: Callable[[Credential], None]) -> int:
        """Revoke every still-valid recorded credential; → how many were revoked."""
        todo = self.records.still_valid()
        done = 0

        async def one(cred: Credential) -> None:
            nonlocal done
            try:
                await self.scheme.revoke(cred)
            except CredentialError as e:
                log_event(log, logging.WARNING, "token_revoke_failed", service=self.name, key=cred.key, error=self.mask(e.message, cred.key, cred))
                return
            done += 1
            self.records.forget(cred.token.reveal())
            forget_cached(cred)
            if self.shared is not None:  # no process may pick up a revoked credential
                with contextlib.suppress(StoreError):
                    await self.shared.invalidate(cred.key, cred)

        try:
            await asyncio.gather(*(one(c) for c in todo))
        finally:
            await self.records.save()
        if todo:
            log_event(log, logging.INFO, "tokens_revoked", service=self.name, revoked=done, of=len(todo))
        return done
