"""The credential manager: everything about time and concurrency, for every scheme.

Like Vault Agent's auto-auth, one object per service owns the cached
credential(s), single-flight fetching (one request upstream however many
clients wait), proactive refresh before expiry, exponential backoff with jitter
after failures, the service's visible state, the record of credentials
authproxy created (:mod:`.records`: a restart reuses them, an exit revokes
them), and shutdown. Schemes never see any of this.

When several processes serve (``workers: N``, replicas on Redis) the credential
is shared through the store (:mod:`.shared`): a fetch first reads what another
process stored, and otherwise obtains under the store's lock, so the whole
fleet makes one credential request where one process would. With a shared
store a process's exit revokes nothing: the credentials are everyone's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import traceback
from typing import Any, Callable

from cachetools import TLRUCache

from authproxy.credentials.access import CredentialDoor, mask
from authproxy.credentials.health import Health, Status, Unavailable
from authproxy.credentials.records import CreatedRecords
from authproxy.credentials.revocation import Revocations
from authproxy.credentials.shared import SharedSlots
from authproxy.metrics import Metrics
from authproxy.observe import log_event
from authproxy.schemes.base import Credential, CredentialError, LoginRequired, Scheme, Stateful, UpstreamReply
from authproxy.store.base import StoreError
from authproxy.tracing import tracing

log = logging.getLogger("authproxy.credentials")

MAX_KEYED = 10_000  # on-behalf-of users kept in memory at once
LOCK_SLACK = 15.0  # a shared fetch waits for another process's fetch up to its timeout plus this


class ServiceCredentials:
    def __init__(
        self,
        name: str,
        scheme: Scheme,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        shared: bool = False,
    ) -> None:
        self.name = name
        self.scheme = scheme
        self.metrics = metrics
        self.clock = clock
        self._cache: TLRUCache[str | None, Credential] = TLRUCache(
            maxsize=MAX_KEYED, ttu=self._ttu, timer=clock
        )
        self._svc: Credential | None = None  # the service's own credential, mirrored for the hot path
        self._inflight: dict[str | None, asyncio.Future[Credential]] = {}
        self.health = Health(name, clock)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._revocations: set[asyncio.Task[None]] = set()
        self._closed = False
        self._identity = scheme.identity()
        store = scheme.ctx.store
        self.records = CreatedRecords(name, store, self._identity, scheme.persist_created, clock)
        # Several processes share the credentials: read what they stored, fetch under the lock.
        self.shared = SharedSlots(name, store, self._identity, clock) if shared else None
        self._loaded: asyncio.Future[None] | None = None
        self.revocations = Revocations(name, scheme, self.records, self.shared, self.mask, clock)
        # Set by the proxy when the service's secrets come from files or commands: called
        # when the upstream refuses what they built, to read them again (proxy/reread.py).
        self.on_refused: Callable[[], None] | None = None
        scheme.ctx.credentials = CredentialDoor(self)  # what a scheme may ask of its sibling credentials

    async def _ensure_loaded(self) -> None:
        """Read what the store keeps (once): the scheme's documents, then the record of
        created credentials, whose newest valid one per key is used again."""
        if self._loaded is None:
            self._loaded = asyncio.ensure_future(self._load())
        await asyncio.shield(self._loaded)

    async def _load(self) -> None:
        if isinstance(self.scheme, Stateful):
            await self.scheme.prepare()
        newest = await self.records.load()
        if self.shared is not None:
            self.shared.reusable = newest  # the store's current one comes first
            return
        for key, cred in newest.items():
            self._put(key, cred)
        if newest:
            log_event(log, logging.INFO, "state_reused", service=self.name, credentials=len(newest))

    # ------------------------------------------------------------------ cache helpers
    @staticmethod
    def _ttu(key: Any, cred: Credential, now: float) -> float:
        return math.inf if cred.expires_at is None else cred.expires_at

    def _refresh_at(self, cred: Credential) -> float | None:
        if cred.expires_at is None:
            return None
        lifetime = max(0.0, cred.expires_at - cred.obtained_at)
        return cred.expires_at - min(self.scheme.refresh_margin, lifetime / 2)

    def _due(self, cred: Credential) -> bool:
        refresh_at = self._refresh_at(cred)
        return refresh_at is not None and refresh_at <= self.clock()

    def current(self, key: str | None = None) -> Credential | None:
        return self._cache.get(key)

    # ------------------------------------------------------------------ the request path
    def _put(self, key: str | None, cred: Credential) -> None:
        self._cache[key] = cred
        if key is None:
            self._svc = cred

    def _drop(self, key: str | None) -> None:
        self._cache.pop(key, None)
        if key is None:
            self._svc = None

    def ready(self, key: str | None) -> Credential | None:
        """The cached credential when it can be used as is, without a coroutine: the
        common case on the hot path. None means: ask :meth:`get`."""
        if key is None:
            # The service's own credential is one attribute, not a cache lookup (this
            # runs on every proxied request).
            cred = self._svc
            if cred is not None and (cred.expires_at is None or cred.expires_at > self.clock()):
                return cred
            return None
        cred = self._cache.get(key)
        if cred is None or cred.expires_at is None:
            return cred
        if key is not None:
            refresh_at = self._refresh_at(cred)
            if refresh_at is not None and self.clock() >= refresh_at:
                return None  # let get() start the refresh
        return cred

    async def get(self, key: str | None = None) -> Credential:
        """The credential to use now: cached, or fetched once for all who wait."""
        if self._loaded is None or not self._loaded.done():
            await self._ensure_loaded()
        cred = self._cache.get(key)
        if cred is not None:
            refresh_at = self._refresh_at(cred)
            if key is not None and refresh_at is not None and self.clock() >= refresh_at and key not in self._inflight:
                self._start_fetch(key)  # refresh ahead of expiry; this request still uses the valid one
            return cred
        fut = self._inflight.get(key)
        if fut is None:
            wait = self.health.backing_off() if key is None else None
            if wait is not None:
                raise Unavailable("token_unavailable", self.health.unavailable_message(), wait)
            fut = self._start_fetch(key)
        try:
            return await asyncio.shield(fut)
        except LoginRequired as e:
            raise Unavailable("login_required", self._login_message(e), None) from None
        except CredentialError as e:
            retry = self.health.retry_after() if key is None else 1.0
            raise Unavailable("token_unavailable", f"{self.name}: {self.mask(e.message, key)}", retry) from None

    def rejected(self, cred: Credential) -> None:
        """The upstream refused ``cred``: forget it, so the next ``get`` fetches anew.
        Only the exact credential is dropped, so a burst of rejections of one token
        causes one new fetch, not one each."""
        key = cred.key
        if self._cache.get(key) is cred:
            self._drop(key)
            if isinstance(self.scheme, Stateful):
                self.scheme.on_rejected(cred)
            if self.shared is not None:
                self.shared.rejected(key, cred)
                self._background(self.shared.invalidate_quietly(key, cred))
        if self.records.forget(cred.token.reveal()):
            self._background(self.records.save())
        log_event(log, logging.INFO, "credential_rejected", service=self.name, key=key)
        if key is None and self.on_refused is not None:
            self.on_refused()

    # ------------------------------------------------------------------ fetching
    def _start_fetch(self, key: str | None) -> asyncio.Future[Credential]:
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self._fetch(key))
            self._inflight[key] = fut
            fut.add_done_callback(lambda f, k=key: self._fetch_done(k, f))
        return fut

    def _fetch_done(self, key: str | None, fut: asyncio.Future[Credential]) -> None:
        if self._inflight.get(key) is fut:
            del self._inflight[key]
        if not fut.cancelled():
            fut.exception()  # mark retrieved: waiters (if any) got it already

    async def _fetch(self, key: str | None) -> Credential:
        old = self._cache.get(key)
        started = self.clock()
        adopted = False
        try:
            if self.shared is None:
                cred = await self._obtain(key)
            else:
                wait = self.scheme.ctx.service.timeout.total + LOCK_SLACK
                cred, adopted = await self.shared.obtain(key, lambda: self._obtain(key), self._due, wait)
        except UpstreamReply:
            self._count("error")
            raise
        except LoginRequired as e:
            self._count("error")
            if key is None:
                self._fail(e, "login_required")
            raise
        except CredentialError as e:
            self._count("error")
            if key is None:
                self._fail(e, "error" if e.refused else "backoff")
            else:
                log_event(log, logging.WARNING, "token_fetch_failed", service=self.name, key=key, error=self.mask(e.message, key))
            raise
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a scheme bug must not wedge the service
            # The traceback is logged masked: an exception's text may hold what a scheme handled.
            trace = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            log.error("unexpected error obtaining a credential for %s\n%s", self.name, self.mask(trace, key).rstrip())
            err = CredentialError(f"internal error: {type(e).__name__}")
            self._count("error")
            if key is None:
                self._fail(err, "backoff")
            raise err from None
        cred.key = key
        if not adopted:
            self._count("ok")
        self._put(key, cred)
        if cred.created and self.scheme.persist_created and not self.records.has(cred):
            self.records.add(cred)
            if not adopted:  # the process that made it recorded it
                await self.records.save()
        if key is None:
            self.health.recovered()
            self._wake.set()
        log_event(
            log,
            logging.INFO,
            "token_adopted" if adopted else "token_fetched" if old is None else "token_refreshed",
            service=self.name,
            key=key,
            expires_in=None if cred.expires_at is None else round(cred.expires_at - self.clock()),
            duration_ms=round((self.clock() - started) * 1000, 1),
        )
        if old is not None and old is not cred:
            self._retire(old)
        return cred

    async def _obtain(self, key: str | None) -> Credential:
        if tracing.enabled:  # an INTERNAL span, a child of the request that caused the fetch
            return await tracing.credential_fetch(self.scheme.obtain(key), self.name, type(self.scheme).__name__)
        return await self.scheme.obtain(key)

    async def settled(self) -> None:
        """Wait for the background work started so far (record saves, revocations)."""
        while self._revocations:
            await asyncio.gather(*list(self._revocations), return_exceptions=True)

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._revocations.add(task)
        task.add_done_callback(self._revocations.discard)

    def _fail(self, e: CredentialError, state: str) -> None:
        self.health.failed(self.mask(e.message), state, e.refused)
        self._wake.set()
        if state == "error" and self.on_refused is not None:  # the upstream refused what it was configured with
            self.on_refused()

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.token_fetch(self.name, result)

    def _retire(self, old: Credential) -> None:
        self.revocations.retire(old, self._background)

    # ------------------------------------------------------------------ background refresh
    def start(self) -> None:
        """Fetch the service credential in the background now, and refresh it before it expires."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    def _next_due(self) -> float | None:
        due = self.health.next_due()
        if due is not NotImplemented:
            return due
        cred = self._cache.get(None)
        if cred is None:
            return self.clock()
        return self._refresh_at(cred)

    async def _run(self) -> None:
        with contextlib.suppress(Exception):
            await self._ensure_loaded()
        while not self._closed:
            due = self._next_due()
            self._wake.clear()
            timeout = None if due is None else max(0.0, due - self.clock())
            if timeout is None or timeout > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                    continue  # something changed: recompute
            if self._closed:
                return
            if None in self._inflight:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._inflight[None])
                continue
            with contextlib.suppress(CredentialError, UpstreamReply):
                await self._start_fetch(None)
            await asyncio.sleep(0)

    # ------------------------------------------------------------------ visible state
    def status(self) -> Status:
        cred = self._cache.get(None)
        expires_in = None if cred is None or cred.expires_at is None else max(0, round(cred.expires_at - self.clock()))
        return self.health.status(expires_in, cred is not None)

    def _login_message(self, e: CredentialError) -> str:
        return f"{self.name} needs a person to log in: run `authproxy login {self.name}` ({self.mask(e.message)})"

    # ------------------------------------------------------------------ masking
    def mask(self, text: str, key: str | None = None, *more: Credential) -> str:
        """A message made safe to show anywhere (readyz, a 503 body, a log line): see
        :func:`authproxy.credentials.access.mask`."""
        held = (self._svc, self._cache.get(None), self._cache.get(key) if key is not None else None, *more)
        return mask(text, self.scheme, held)

    # ------------------------------------------------------------------ shutdown and logout
    async def revoke_created(self) -> int:
        """Revoke every still-valid credential authproxy created; returns how many."""
        await self._ensure_loaded()

        def forget(cred: Credential) -> None:
            if self._cache.get(cred.key) is cred:
                self._drop(cred.key)

        return await self.revocations.revoke_all(forget)

    async def stop(self) -> None:
        """Stop the background refresh and pending fetches (the credentials stay recorded)."""
        self._closed = True
        self._wake.set()
        tasks = [t for t in (self._task, self._loaded, *self._inflight.values(), *self._revocations) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        self._task = None
        if self.records.dirty:  # a forget whose save was cancelled above
            await self.records.save()

    async def shutdown(self, revoke: bool = True) -> None:
        """At exit: stop, then revoke what the scheme revokes at exit — unless the store is
        shared (workers, replicas): then the credentials are everyone's, and the
        supervisor (:func:`authproxy.runtime.revoke_at_exit`) or ``logout`` revokes them."""
        await self.stop()
        if revoke and self.scheme.revoke_on_exit and self.shared is None:
            await self.revoke_created()
        if isinstance(self.scheme, Stateful):
            await self.scheme.close()

    async def logout(self) -> int:
        """Revoke and forget every credential of the service, for every process sharing the store."""
        await self.stop()
        n = await self.revoke_created()
        if isinstance(self.scheme, Stateful):
            n += await self.scheme.logout()
        if self.shared is not None:
            with contextlib.suppress(StoreError):
                await self.scheme.ctx.store.delete(self.shared.doc_name(None))
        self._cache.clear()
        self._svc = None
        await self.records.clear()
        return n

