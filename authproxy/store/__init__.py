"""Where credentials live: the state dir (one machine) or Redis (a fleet).

:func:`open_store` picks the one a configuration asks for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from authproxy.store.base import DocStore, Store, StoreError
from authproxy.store.statedir import StateDirStore

if TYPE_CHECKING:
    from authproxy.config import Config


def open_store(config: "Config") -> Store:
    """The store for ``config``: Redis when ``store:`` is set, else the state dir (shared
    by the workers when there are several)."""
    if config.store is not None:
        from authproxy.store.redis import RedisStore

        return RedisStore(config.store)
    return StateDirStore(config.state_dir, shared=config.workers > 1)


__all__ = ["DocStore", "Store", "StoreError", "StateDirStore", "open_store"]
