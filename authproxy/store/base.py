"""Where credentials and the documents schemes keep live: the interface.

Two implementations: :mod:`authproxy.store.statedir` (files in the state dir,
one machine: the proxy, its workers and the CLI share them under file locks)
and :mod:`authproxy.store.redis` (a Redis server shared by every process of
every replica, encrypted). The credential manager and the schemes see only
:class:`DocStore`, one service's corner of the store, so none of them knows
which one is behind it — and the store never knows what a document means.
"""

from __future__ import annotations

import contextlib
from typing import Any, AsyncContextManager, Protocol


class StoreError(Exception):
    """The store could not be used (unreachable, refused, a corrupt document). The
    message names the store (a path, or the Redis address) and never a secret."""


class DocStore(Protocol):
    """One service's documents: small JSON-able values by name."""

    #: Human words for where the documents are (a folder, or ``redis://host:port/0 prefix:svc``).
    where: str

    async def get(self, name: str) -> Any | None:
        """The stored document, or None when there is none (or its ttl ran out). An
        unreadable one raises StoreError: silently dropping it could lose a refresh token."""

    async def put(self, name: str, doc: Any, *, ttl: float | None = None, tag: str | None = None) -> None:
        """Store ``doc`` durably; with ``ttl`` (seconds) it disappears after that. ``tag``
        is a non-secret fingerprint kept beside it for :meth:`delete`'s compare."""

    async def delete(self, name: str, *, if_tag: str | None = None) -> bool:
        """Delete the document (only if its tag is ``if_tag``, atomically, when given);
        True when something was deleted."""

    async def version(self, name: str) -> Any:
        """A value that changes whenever the document is written or deleted."""

    def lock(self, name: str, wait: float | None = None) -> AsyncContextManager[None]:
        """An exclusive lock on ``name`` shared with every process using the same store.
        Waiting is woken when the holder releases, not polled hard; ``wait`` bounds it
        (StoreError after that). A holder that dies loses the lock (file close; Redis
        lock expiry)."""

    def fingerprint(self, value: str) -> str:
        """A non-secret tag of a secret ``value``, for compare-and-delete."""


class Store(Protocol):
    """The whole store: one :class:`DocStore` per service."""

    #: True when the credentials in it are shared by several processes (workers, replicas):
    #: the credential manager then reads before it fetches and fetches under the store's lock.
    shared: bool
    #: True when the store belongs to a fleet (Redis): a process's exit revokes nothing.
    fleet: bool
    where: str

    def service(self, name: str) -> DocStore: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StoreError when the store cannot be used now."""


@contextlib.asynccontextmanager
async def no_lock() -> Any:  # pragma: no cover - a helper for stores without locking
    yield
