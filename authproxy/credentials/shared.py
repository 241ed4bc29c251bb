"""A service's current credentials in a store several processes share.

With ``workers: N`` or a Redis ``store``, one credential per service (and per
on-behalf-of user) serves every process: the first process to need one takes
the store's lock, looks again (another may have fetched it meanwhile), and only
then asks the upstream, writing the result with its expiry as the document's
ttl. A rejection deletes the stored credential only if it is still the rejected
one (a compare on its fingerprint), so a burst of rejections of one token, seen
by any number of processes, makes one new fetch.
"""

from __future__ import annotations

import hashlib
import logging
from typing import AsyncContextManager, Awaitable, Callable

from authproxy.observe import log_event
from authproxy.schemes.base import Credential, CredentialError
from authproxy.store.base import DocStore, StoreError

log = logging.getLogger("authproxy.credentials")

CURRENT = "current"


class SharedSlots:
    def __init__(self, name: str, store: DocStore, identity: str, clock: Callable[[], float]) -> None:
        self.name = name
        self.store = store
        self.identity = identity
        self.clock = clock
        self._rejected: dict[str | None, str] = {}  # key → fingerprint of the token last rejected here
        #: Recorded credentials from before the store was shared: used once, if the store has none.
        self.reusable: dict[str | None, Credential] = {}

    async def obtain(
        self,
        key: str | None,
        fetch: Callable[[], Awaitable[Credential]],
        due: Callable[[Credential], bool],
        wait: float,
    ) -> tuple[Credential, bool]:
        """The credential for ``key``: one another process stored, when it is usable;
        else, under the store's lock and after looking again (it may have been fetched
        while we waited), ``fetch()``'s, written for the others.
        → (credential, whether it was adopted rather than fetched here)."""

        def adoptable(cred: Credential | None) -> bool:
            # Not the one just rejected here, and not yet due for renewal (else renew it).
            return cred is not None and self._rejected.get(key) != self.fingerprint(cred) and not due(cred)

        # A credential recorded before the store was shared is a candidate on this process's
        # first fetch for the key only: later it may have been revoked or rejected elsewhere.
        kept = self.reusable.pop(key, None)
        try:
            cred = await self.read(key)
            if adoptable(cred):
                self._rejected.pop(key, None)
                return cred, True  # type: ignore[return-value]
            async with self.lock(key, wait):
                cred = await self.read(key)
                if adoptable(cred):
                    self._rejected.pop(key, None)
                    return cred, True  # type: ignore[return-value]
                if adoptable(kept) and (kept.expires_at is None or kept.expires_at > self.clock()):  # type: ignore[union-attr]
                    new = kept
                else:
                    new = await fetch()
                    new.key = key
                try:
                    await self.write(key, new)
                except StoreError as e:  # it still works here; the others will fetch their own
                    log_event(log, logging.WARNING, "store_write_failed", service=self.name, key=key, error=str(e))
                self._rejected.pop(key, None)
                return new, new is kept  # type: ignore[return-value]
        except StoreError as e:
            raise CredentialError(f"credential store: {e}") from None

    def rejected(self, key: str | None, cred: Credential) -> None:
        """``cred`` was rejected here: never adopt it again (even before the
        compare-and-delete of :meth:`invalidate` reaches the store)."""
        self._rejected[key] = self.fingerprint(cred)

    async def invalidate_quietly(self, key: str | None, cred: Credential) -> None:
        try:
            if await self.invalidate(key, cred):
                log_event(log, logging.INFO, "shared_credential_invalidated", service=self.name, key=key)
        except StoreError as e:
            log_event(log, logging.WARNING, "store_write_failed", service=self.name, key=key, error=str(e))

    @staticmethod
    def doc_name(key: str | None) -> str:
        if key is None:
            return CURRENT
        # A user id is the client's text: hashed, it is always a safe, bounded name.
        return f"{CURRENT}-{hashlib.sha256(key.encode()).hexdigest()[:32]}"

    def fingerprint(self, cred: Credential) -> str:
        return self.store.fingerprint(cred.token.reveal())

    def lock(self, key: str | None, wait: float) -> AsyncContextManager[None]:
        return self.store.lock(self.doc_name(key), wait=wait)

    async def read(self, key: str | None) -> Credential | None:
        """The stored credential for ``key`` if it was made for this configuration and
        has not expired. Raises StoreError when the store cannot be read."""
        doc = await self.store.get(self.doc_name(key))
        if not isinstance(doc, dict) or doc.get("identity") != self.identity:
            return None
        try:
            cred = Credential.from_record(doc["credential"])
        except (KeyError, TypeError, ValueError):
            return None
        if cred.key != key or (cred.expires_at is not None and cred.expires_at <= self.clock()):
            return None
        return cred

    async def write(self, key: str | None, cred: Credential) -> None:
        ttl = None if cred.expires_at is None else cred.expires_at - self.clock()
        if ttl is not None and ttl <= 0:
            return
        doc = {"identity": self.identity, "credential": cred.to_record()}
        await self.store.put(self.doc_name(key), doc, ttl=ttl, tag=self.fingerprint(cred))

    async def invalidate(self, key: str | None, cred: Credential) -> bool:
        """Delete the stored credential if it is still ``cred``."""
        return await self.store.delete(self.doc_name(key), if_tag=self.fingerprint(cred))
