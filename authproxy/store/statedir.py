"""The state dir as a :class:`~authproxy.store.base.DocStore`: one machine.

Documents are the JSON files :mod:`authproxy.state` writes atomically (0600 in a
0700 folder). Locks are ``flock`` on a file beside them, so the proxy, its
workers and a CLI command on the same state dir take turns; a process that dies
drops its locks with its file descriptors. A waiter blocks in ``flock`` (in a
thread, not on the event loop) and wakes the moment the holder lets go.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import time
from typing import Any, AsyncIterator

from authproxy.state import FILE_MODE, ServiceStore, StateDir, StateError, _ensure_dir
from authproxy.store.base import StoreError


class StateDirDocs:
    """One service's documents in the state dir."""

    def __init__(self, files: ServiceStore) -> None:
        self.files = files
        self.where = str(files.path)

    async def get(self, name: str) -> Any | None:
        try:
            wrapped = self.files.get(name)
        except StateError as e:
            raise StoreError(str(e)) from None
        if isinstance(wrapped, dict) and "__expires_at" in wrapped:
            if wrapped["__expires_at"] is not None and wrapped["__expires_at"] <= time.time():
                return None
            return wrapped.get("doc")
        return wrapped

    async def put(self, name: str, doc: Any, *, ttl: float | None = None, tag: str | None = None) -> None:
        value = doc
        if ttl is not None or tag is not None:
            value = {"__expires_at": None if ttl is None else time.time() + ttl, "__tag": tag, "doc": doc}
        try:
            self.files.put(name, value)
        except StateError as e:
            raise StoreError(str(e)) from None

    async def delete(self, name: str, *, if_tag: str | None = None) -> bool:
        if if_tag is not None:
            try:
                current = self.files.get(name)
            except StateError:
                current = None
            if not isinstance(current, dict) or current.get("__tag") != if_tag:
                return False
        existed = self.files.mtime(name) is not None
        self.files.delete(name)
        return existed

    async def version(self, name: str) -> Any:
        return self.files.mtime(name)

    @contextlib.asynccontextmanager
    async def lock(self, name: str, wait: float | None = None) -> AsyncIterator[None]:
        try:
            _ensure_dir(self.files.path, self.files.root)
            fd = os.open(self.files.path / f".{name}.lock", os.O_RDWR | os.O_CREAT, FILE_MODE)
        except (StateError, OSError) as e:
            raise StoreError(f"cannot lock {name} in {self.where}: {getattr(e, 'strerror', None) or e}") from None
        try:
            await _flock(fd, name, wait, self.where)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def fingerprint(self, value: str) -> str:
        return hashlib.sha256(value.encode()).hexdigest()[:24]


async def _flock(fd: int, name: str, wait: float | None, where: str) -> None:
    """Take the lock at once if it is free; else wait for it in a thread. A bounded wait
    polls the non-blocking form instead (flock has no timeout) — rare and gentle."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    if wait is None:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + wait
    delay = 0.01
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise StoreError(f"{name} in {where} stayed locked by another process for {wait:g}s") from None
            await asyncio.sleep(delay)
            delay = min(0.2, delay * 2)


class StateDirStore:
    """Every service's documents in the state dir. ``shared`` when several workers
    serve one listener: they then share credentials through these files."""

    fleet = False

    def __init__(self, path: str, shared: bool = False) -> None:
        self.state = StateDir(path)
        self.where = str(path)
        self.shared = shared

    def service(self, name: str) -> StateDirDocs:
        return StateDirDocs(self.state.service(name))

    async def ping(self) -> None:
        try:
            self.state.ensure()
        except StateError as e:
            raise StoreError(str(e)) from None

    async def close(self) -> None:
        pass
