"""Redis as a :class:`~authproxy.store.base.DocStore`: one set of credentials for a fleet.

Every process of every replica configured with the same ``store`` shares what is
kept here. Nothing here is readable without ``store.key_file`` (see
:mod:`authproxy.store.crypto`): a Redis dump or a ``MONITOR`` shows key names,
non-secret tags and ciphertext only.

Key layout (``P`` is ``store.prefix``, default ``authproxy:``; service names are
``[a-z0-9-]+`` and document/lock names ``[A-Za-z0-9_-]+``, so no two kinds collide):

``P{service}:{name}`` — a hash, one document:
    ``ct``  nonce || AES-256-GCM(JSON of the document), AAD = this key's name;
    ``tag`` the caller's non-secret tag (an HMAC fingerprint), for compare-and-delete;
    ``ver`` random hex, new on every write: what :meth:`RedisDocs.version` returns.
    A document written with a ttl has it as the key's expiry (set in the same
    MULTI/EXEC as the write, so no reader ever sees it without one).
``P lock:{service}:{name}`` (no space) — a string, a lock held: redis-py's
    :class:`redis.asyncio.lock.Lock` (SET NX PX with a random owner token; renewed
    by the holder every ``LOCK_TTL / 3``; released by compare-and-delete, only by
    its owner). A holder killed with ``kill -9`` loses it when it expires, within
    ``LOCK_TTL``.
pub/sub channel ``Preleased:{service}:{name}`` — published after each release.
    Each :class:`RedisStore` keeps one connection pattern-subscribed to
    ``Preleased:*`` (from the first time it has to wait) and wakes its waiters from
    it, so waiting costs no polling; a waiter still retries every
    ``SAFETY_NET`` seconds, for the holder that died without a word.

Every failure (refused, timed out, wrong password, a script gone after a restart
that cannot be reloaded) becomes a :class:`StoreError` naming the store by its
URL without credentials; the password is never in a message. The client
reconnects by itself after a Redis restart (one retry of a command on a broken
connection), and the pub/sub listener subscribes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockError, LockNotOwnedError, RedisError

from authproxy.config import StoreConfig
from authproxy.store.base import StoreError
from authproxy.store.crypto import StoreCipher
from authproxy.store.redis_release import ReleaseListener, consume, stop_task, wait_event

log = logging.getLogger("authproxy.store")

LOCK_TTL = 10.0  # seconds a lock lives without renewal: a dead holder's lock is free within this
SAFETY_NET = 1.0  # seconds a waiter waits for a release message before trying again anyway
HEALTH_CHECK_INTERVAL = 15  # seconds idle before a pooled connection is PINGed before use

_NAME = re.compile(r"[A-Za-z0-9_-]+\Z")
_DELETE_IF_TAG = """
if redis.call('HGET', KEYS[1], 'tag') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_FAILURES = (RedisError, OSError, asyncio.TimeoutError)
T = TypeVar("T")


def _public_url(url: str) -> str:
    """``url`` without a password (the config refuses one there, but never trust that)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = (f"{parts.username}@" if parts.username else "") + host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"bad store document name {name!r}")
    return name


class RedisStore:
    """Every service's documents in one Redis database under ``cfg.prefix``. Creating
    it does no network I/O: the client connects on first use, so this may be made
    before the event loop runs or inside it."""

    shared = True
    fleet = True

    def __init__(self, cfg: StoreConfig) -> None:
        if cfg.key_file is None:
            raise StoreError("store.key_file is required with a store")
        self.cfg = cfg
        self.prefix = cfg.prefix
        self.url = _public_url(cfg.url)
        self.where = f"{self.url} prefix {cfg.prefix}"
        self.cipher = StoreCipher.from_file(str(cfg.key_file))
        self._password = cfg.password.reveal() if cfg.password else None
        self._redis: Redis | None = None
        self._delete_if_tag: Any = None
        # one pub/sub connection, started the first time a lock must be waited for
        self.releases = ReleaseListener(self)
        self._closed = False

    def __repr__(self) -> str:
        return f"RedisStore({self.where!r})"

    # ----------------------------------------------------------------- plumbing

    def client(self) -> Redis:
        """The client, made on first use (no I/O: connections are opened per command)."""
        if self._closed:
            raise StoreError(f"store {self.where} is closed")
        if self._redis is None:
            extra: dict[str, Any] = {}
            if urlsplit(self.cfg.url).scheme == "rediss" and self.cfg.ca_file:
                extra["ssl_ca_certs"] = str(self.cfg.ca_file)
            self._redis = Redis.from_url(
                self.cfg.url,
                username=self.cfg.username,
                password=self._password,
                socket_timeout=self.cfg.timeout,
                socket_connect_timeout=self.cfg.timeout,
                health_check_interval=HEALTH_CHECK_INTERVAL,
                # One retry on a broken connection: after a Redis restart the pooled
                # connections are dead, and the first command must not fail for that.
                # Never on a timeout (that would double every wait for a dead server).
                retry=Retry(NoBackoff(), 1),
                retry_on_error=[RedisConnectionError],
                decode_responses=False,
                **extra,
            )
            self._delete_if_tag = self._redis.register_script(_DELETE_IF_TAG)
        return self._redis

    def reason(self, e: BaseException) -> str:
        """Why an operation failed, in a few words: never the password."""
        if isinstance(e, asyncio.TimeoutError) and not str(e):
            reason = f"no answer within {self._budget():g}s"
        else:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if self._password:
            reason = reason.replace(self._password, "***")
        return reason

    def failure(self, e: BaseException) -> StoreError:
        """A StoreError naming the store and, briefly, why."""
        return StoreError(f"store {self.where} unreachable: {self.reason(e)}")

    def _budget(self) -> float:
        # connect + one command (+ the one reconnect, when the first was refused at once)
        return 2 * self.cfg.timeout

    async def call(self, aw: Awaitable[T], abandoned: Callable[["asyncio.Task[T]"], None] | None = None) -> T:
        """Await a Redis operation within the budget; any failure becomes StoreError.

        The operation runs in a task of its own, shielded: redis-py (5.x to 8.x, on
        Python 3.11) sometimes swallows a cancellation that lands mid-command, and the
        caller's cancellation (a client gone, shutdown, our own lock renewer) must
        never be lost. A cancelled caller leaves the operation to finish within the
        budget; ``abandoned`` is then called with its task when it is done."""
        inner = asyncio.get_running_loop().create_task(self._bounded(aw))
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            inner.cancel()  # best effort; it ends within the budget anyway
            inner.add_done_callback(abandoned or consume)
            raise

    async def _bounded(self, aw: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._budget()):
                return await aw
        except (StoreError, LockError):  # LockError: the lock's owner check, for the caller
            raise
        except _FAILURES as e:
            raise self.failure(e) from None

    def service(self, name: str) -> "RedisDocs":
        return RedisDocs(self, name)

    async def ping(self) -> None:
        await self.call(self.client().ping())

    async def close(self) -> None:
        self._closed = True
        await self.releases.close()
        if self._redis is not None:
            r, self._redis = self._redis, None
            with contextlib.suppress(*_FAILURES):
                await (r.aclose() if hasattr(r, "aclose") else r.close())


class RedisDocs:
    """One service's documents in Redis (see the module docstring for the layout)."""

    def __init__(self, store: RedisStore, service: str) -> None:
        self.store = store
        self.service = service
        self.where = f"{store.url} {store.prefix}{service}"

    def key(self, name: str) -> str:
        return f"{self.store.prefix}{self.service}:{_check_name(name)}"

    async def get(self, name: str) -> Any | None:
        key = self.key(name)
        ct, _tag = await self.store.call(self.store.client().hmget(key, [b"ct", b"tag"]))
        if ct is None:
            return None
        plain = self.store.cipher.open(ct, key.encode())
        try:
            return json.loads(plain)
        except ValueError:
            raise StoreError(f"{key} in store {self.store.where} is not valid JSON") from None

    async def put(self, name: str, doc: Any, *, ttl: float | None = None, tag: str | None = None) -> None:
        key = self.key(name)
        if ttl is not None and ttl <= 0:  # already expired: what a reader would see is nothing
            await self.store.call(self.store.client().delete(key))
            return
        fields = {
            b"ct": self.store.cipher.seal(json.dumps(doc, separators=(",", ":"), sort_keys=True).encode(), key.encode()),
            b"ver": secrets.token_hex(8).encode(),
        }
        if tag is not None:
            fields[b"tag"] = tag.encode()

        async def write() -> None:
            async with self.store.client().pipeline(transaction=True) as pipe:
                pipe.delete(key)  # no field of an older version (its tag) survives
                pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
                if ttl is not None:
                    pipe.pexpire(key, max(1, int(ttl * 1000)))
                await pipe.execute()

        await self.store.call(write())

    async def delete(self, name: str, *, if_tag: str | None = None) -> bool:
        key = self.key(name)
        client = self.store.client()
        if if_tag is None:
            return bool(await self.store.call(client.delete(key)))
        return bool(await self.store.call(self.store._delete_if_tag(keys=[key], args=[if_tag])))

    async def version(self, name: str) -> Any:
        ver = await self.store.call(self.store.client().hget(self.key(name), b"ver"))
        return None if ver is None else ver.decode()

    def fingerprint(self, value: str) -> str:
        return self.store.cipher.fingerprint(value)

    @contextlib.asynccontextmanager
    async def lock(self, name: str, wait: float | None = None) -> AsyncIterator[None]:
        """Hold ``{prefix}lock:{service}:{name}`` (see the module docstring). Raises
        StoreError when the store is unreachable or ``wait`` runs out."""
        st = self.store
        lock_name = f"{st.prefix}lock:{self.service}:{_check_name(name)}"
        channel = f"{st.prefix}released:{self.service}:{name}".encode()
        ttl = LOCK_TTL  # read now: tests make it short
        lock = Lock(st.client(), lock_name, timeout=ttl, blocking=False, thread_local=False)
        await self._acquire(lock, lock_name, channel, wait)
        lost, done = asyncio.Event(), asyncio.Event()
        renewer = asyncio.get_running_loop().create_task(self._renew(lock, lock_name, ttl, lost, done), name="authproxy-store-renew")
        try:
            yield
        finally:
            done.set()  # stops the renewer at its next turn even if what follows is cancelled
            await stop_task(renewer)
            await self._release(lock, lock_name, channel, lost)

    async def _try(self, lock: Lock) -> bool:
        def abandoned(task: "asyncio.Task[bool]") -> None:
            # the caller was cancelled while SET NX was in flight: a lock got for nobody
            # is given back rather than left to expire
            if not task.cancelled() and task.exception() is None and task.result():
                task.get_loop().create_task(self.store.call(lock.release())).add_done_callback(consume)

        return bool(await self.store.call(lock.acquire(blocking=False, token=secrets.token_hex(16)), abandoned))

    async def _acquire(self, lock: Lock, lock_name: str, channel: bytes, wait: float | None) -> None:
        if await self._try(lock):
            return
        loop = asyncio.get_running_loop()
        deadline = None if wait is None else loop.time() + wait
        await self.store.releases.ensure()
        with self.store.releases.waiting(channel) as released:
            while True:
                released.clear()  # before trying: a release after the try must wake us
                if await self._try(lock):
                    return
                left = SAFETY_NET if deadline is None else min(SAFETY_NET, deadline - loop.time())
                if left <= 0:
                    raise StoreError(f"{lock_name} in store {self.store.where} stayed locked by another process for {wait:g}s")
                await wait_event(released, left)

    async def _renew(self, lock: Lock, lock_name: str, ttl: float, lost: asyncio.Event, done: asyncio.Event) -> None:
        """Keep the lock while it is held: reset its expiry every ttl/3. A renewal that
        fails for a moment is tried again; one that finds the lock gone says so once."""
        while True:
            await asyncio.sleep(ttl / 3)
            if done.is_set():
                return
            try:
                await self.store.call(lock.reacquire())
            except (LockNotOwnedError, LockError):
                log.warning("store %s: lock %s expired while held (another process may hold it now)", self.store.where, lock_name)
                lost.set()
                return
            except StoreError as e:
                log.warning("store %s: could not renew lock %s: %s", self.store.where, lock_name, e)

    async def _release(self, lock: Lock, lock_name: str, channel: bytes, lost: asyncio.Event) -> None:
        """Release if still ours (compare-and-delete), then tell the waiters. A lock that
        expired meanwhile is logged once, never raised: the work under it is done."""
        try:
            await self.store.call(lock.release())
        except (LockNotOwnedError, LockError):
            if not lost.is_set():
                log.warning("store %s: lock %s had expired when released (held longer than its ttl without renewal)", self.store.where, lock_name)
            return
        except StoreError as e:
            # It expires by itself within LOCK_TTL; failing the caller's finished work helps no one.
            log.warning("store %s: could not release lock %s (it expires by itself): %s", self.store.where, lock_name, e)
            return
        with contextlib.suppress(StoreError):
            await self.store.call(self.store.client().publish(channel, b"1"))
