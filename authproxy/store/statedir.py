"""The state dir as a :class:`~authproxy.store.base.DocStore`: one machine.

Documents are the JSON files :mod:`authproxy.state` writes atomically (0600 in a
0700 folder). Locks are ``flock`` on a file beside them, so the proxy, its
workers and a CLI command on the same state dir take turns; a process that dies
drops its locks with its file descriptors. A waiter blocks in ``flock`` (in a
thread of its own, not on the event loop nor in the loop's default executor) and
wakes the moment the holder lets go. A tagged write and a compare-and-delete take
a short second lock (``.NAME.cas``), so the compare and the delete are one step
for every process.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import threading
import time
from typing import Any, AsyncIterator

from authproxy.state import FILE_MODE, ServiceStore, StateDir, StateError, _ensure_dir
from authproxy.store.base import StoreError


class StateDirDocs:
    """One service's documents in the state dir."""

    def __init__(self, files: ServiceStore) -> None:
        self.files = files
        self.path = files.path  # the service's folder in the state dir
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
            with self._cas(name):  # not between another process's compare and its delete
                self.files.put(name, value)
        except StateError as e:
            raise StoreError(str(e)) from None

    async def delete(self, name: str, *, if_tag: str | None = None) -> bool:
        if if_tag is None:
            existed = self.files.mtime(name) is not None
            self.files.delete(name)
            return existed
        # Compare and delete as one step: without the lock, a new document written by
        # another process between the two would be deleted in place of the rejected one.
        with self._cas(name):
            try:
                current = self.files.get(name)
            except StateError:
                current = None
            if not isinstance(current, dict) or current.get("__tag") != if_tag:
                return False
            self.files.delete(name)
            return True

    async def version(self, name: str) -> Any:
        """The file's inode and mtime: every write is a rename of a new file, so the
        inode changes even when two writes fall in one tick of a coarse file clock."""
        try:
            st = os.stat(self.files._file(name))
        except OSError:
            return None
        return f"{st.st_ino}-{st.st_mtime_ns}"

    @contextlib.contextmanager
    def _cas(self, name: str) -> Any:
        """A short exclusive lock for a compare-and-delete or a write, taken on the loop
        (its holders only read, write or unlink one small file)."""
        self.files._file(name)  # the name is checked before it becomes a path
        try:
            _ensure_dir(self.files.path, self.files.root)
            fd = os.open(self.files.path / f".{name}.cas", os.O_RDWR | os.O_CREAT, FILE_MODE)
        except (StateError, OSError) as e:
            raise StoreError(f"cannot lock {name} in {self.where}: {getattr(e, 'strerror', None) or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # drops the flock

    @contextlib.asynccontextmanager
    async def lock(self, name: str, wait: float | None = None) -> AsyncIterator[None]:
        self.files._file(name)  # the name is checked before it becomes a path
        try:
            _ensure_dir(self.files.path, self.files.root)
            fd = os.open(self.files.path / f".{name}.lock", os.O_RDWR | os.O_CREAT, FILE_MODE)
        except (StateError, OSError) as e:
            raise StoreError(f"cannot lock {name} in {self.where}: {getattr(e, 'strerror', None) or e}") from None
        await _flock(fd, name, wait, self.where)  # on failure it has closed fd (or handed it on)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def fingerprint(self, value: str) -> str:
        return hashlib.sha256(value.encode()).hexdigest()[:24]


async def _flock(fd: int, name: str, wait: float | None, where: str) -> None:
    """Take the lock at once if it is free; else wait for it in a thread. A bounded wait
    polls the non-blocking form instead (flock has no timeout) — rare and gentle.
    Returns holding the lock on ``fd``; on any exception ``fd`` is closed (or left to
    the thread still blocked on it, which closes it)."""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if wait is None:
            await _flock_in_thread(fd)
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
    except _HandedOff:
        raise asyncio.CancelledError from None
    except OSError as e:
        os.close(fd)
        raise StoreError(f"cannot lock {name} in {where}: {e.strerror or e}") from None
    except BaseException:
        os.close(fd)
        raise


class _HandedOff(Exception):
    """The waiter was cancelled while its thread is still in flock: the thread closes fd."""


async def _flock_in_thread(fd: int) -> None:
    """Block in ``flock`` in a daemon thread of its own. Not ``asyncio.to_thread``: the
    default executor has a handful of threads (min(32, CPUs + 4)) that DNS lookups
    and upstream connects need too, and a process waiting for another's locks must
    keep serving; nor may a blocked thread hold up the process's exit. A waiter
    cancelled mid-wait leaves ``fd`` to the thread, which closes it — dropping the
    lock if it got it — so the descriptor number is never reused under it."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[BaseException | None] = loop.create_future()
    mutex = threading.Lock()
    state = {"done": False, "abandoned": False}

    def settle(err: BaseException | None) -> None:
        if not fut.done():
            fut.set_result(err)

    def run() -> None:
        err: BaseException | None = None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            err = e
        with mutex:
            state["done"] = True
            if state["abandoned"]:
                os.close(fd)
                return
        try:
            loop.call_soon_threadsafe(settle, err)
        except RuntimeError:  # the loop is gone: nobody will use the lock
            os.close(fd)

    threading.Thread(target=run, name="authproxy-flock", daemon=True).start()
    try:
        err = await asyncio.shield(fut)
    except asyncio.CancelledError:
        with mutex:
            if not state["done"]:
                state["abandoned"] = True
                raise _HandedOff from None
        raise  # the thread is done: fd is ours to close (the caller does)
    if err is not None:
        raise err


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
