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
from typing import AsyncContextManager, Callable

from authproxy.schemes.base import Credential
from authproxy.store.base import DocStore

CURRENT = "current"


class SharedSlots:
    def __init__(self, store: DocStore, identity: str, clock: Callable[[], float]) -> None:
        self.store = store
        self.identity = identity
        self.clock = clock

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
