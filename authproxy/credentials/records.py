"""The record of credentials authproxy created, kept in the store.

A FogBugz logon token never expires and an App-Token user or on-behalf-of token
lives a day: each one authproxy makes is written down, so a restart reuses it
instead of making another, and an exit or ``authproxy logout`` revokes exactly
those still valid. Several processes may share the record (workers, ``authproxy
token`` beside a running proxy, replicas on Redis), so a save merges what the
others recorded since, under the store's lock: overwriting would drop their
tokens, which then would never be revoked.
"""

from __future__ import annotations

import logging
from typing import Callable

from authproxy.observe import log_event
from authproxy.schemes.base import Credential
from authproxy.store.base import DocStore, StoreError

log = logging.getLogger("authproxy.credentials")

RECORDS = "credentials"
LOCK_WAIT = 30.0  # seconds a save waits for another process's save


class CreatedRecords:
    def __init__(self, name: str, store: DocStore, identity: str, enabled: bool, clock: Callable[[], float]) -> None:
        self.name = name
        self.store = store
        self.identity = identity
        self.enabled = enabled  # the scheme's persist_created
        self.clock = clock
        self.created: dict[str, Credential] = {}  # token → credential, for revocation
        self._forgotten: set[str] = set()  # removed here since the last save (revoked, rejected, expired)

    @property
    def dirty(self) -> bool:
        return bool(self._forgotten)

    def add(self, cred: Credential) -> None:
        if self.enabled and cred.created:
            self.created[cred.token.reveal()] = cred

    def has(self, cred: Credential) -> bool:
        return cred.token.reveal() in self.created

    def forget(self, token: str) -> bool:
        if self.created.pop(token, None) is None:
            return False
        self._forgotten.add(token)
        return True

    def still_valid(self) -> list[Credential]:
        now = self.clock()
        return [c for c in self.created.values() if c.expires_at is None or c.expires_at > now]

    async def load(self) -> dict[str | None, Credential]:
        """Read the record; returns the newest still-valid credential per key."""
        if not self.enabled:
            return {}
        try:
            doc = await self.store.get(RECORDS) or {}
        except StoreError as e:
            log_event(log, logging.WARNING, "state_unreadable", service=self.name, error=str(e))
            return {}
        if not isinstance(doc, dict):
            return {}
        if doc.get("identity") != self.identity:
            if doc.get("credentials"):
                log_event(log, logging.WARNING, "state_ignored", service=self.name, reason="made for another configuration")
            return {}
        now = self.clock()
        newest: dict[str | None, Credential] = {}
        for rec in doc.get("credentials", []):
            try:
                cred = Credential.from_record(rec)
            except (KeyError, TypeError, ValueError):
                continue
            if cred.expires_at is not None and cred.expires_at <= now:
                continue
            self.created[cred.token.reveal()] = cred
            best = newest.get(cred.key)
            if best is None or cred.obtained_at > best.obtained_at:
                newest[cred.key] = cred
        return newest

    async def save(self) -> None:
        if not self.enabled:
            return
        now = self.clock()
        try:
            async with self.store.lock(RECORDS, wait=LOCK_WAIT):
                try:
                    doc = await self.store.get(RECORDS) or {}
                except StoreError:
                    doc = {}
                records = {c.token.reveal(): c.to_record() for c in self.created.values()}
                if isinstance(doc, dict) and doc.get("identity") == self.identity:
                    for rec in doc.get("credentials", []):
                        token = rec.get("token") if isinstance(rec, dict) else None
                        if isinstance(token, str) and token not in records and token not in self._forgotten:
                            records[token] = rec
                live = [r for r in records.values() if r.get("expires_at") is None or float(r["expires_at"]) > now]
                if live:
                    await self.store.put(RECORDS, {"identity": self.identity, "credentials": live})
                else:
                    await self.store.delete(RECORDS)
            self._forgotten.clear()
        except (StoreError, OSError, TypeError, ValueError) as e:
            log_event(log, logging.ERROR, "state_write_failed", service=self.name, error=str(e))

    async def clear(self) -> None:
        self.created.clear()
        self._forgotten.clear()
        await self.store.delete(RECORDS)
