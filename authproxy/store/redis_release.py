"""Waiting for a Redis lock without polling: one pub/sub connection per store,
pattern-subscribed to ``{prefix}released:*``, wakes the waiters of each lock the
moment its holder releases it. Kept apart from :mod:`authproxy.store.redis` because
it is its own small protocol with its own failure handling (Redis restarted:
subscribe again, wake everyone, since messages may have been missed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from authproxy.store.redis import RedisStore

log = logging.getLogger("authproxy.store")

LISTEN_BACKOFF = (0.05, 1.0)  # the listener's reconnect delay: first, cap


def consume(task: "asyncio.Task[Any]") -> None:
    """Retrieve an abandoned task's outcome, so asyncio does not report it."""
    if not task.cancelled():
        task.exception()


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event`` at most ``timeout`` seconds. Not ``asyncio.wait_for``: on
    Python 3.11 it loses a cancellation that lands as the event is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


async def stop_task(task: "asyncio.Task[Any]", bound: float = 5.0) -> None:
    """Cancel ``task`` and wait for it, cancelling again while it runs on (a
    cancellation swallowed inside redis-py must not make this wait forever)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait([task], timeout=0.1)
    if task.done():
        consume(task)



class ReleaseListener:
    """The waiters of one store, by channel, and the task that wakes them."""

    def __init__(self, store: "RedisStore") -> None:
        self.store = store
        self._listener: asyncio.Task[None] | None = None
        self._subscribed: asyncio.Event | None = None
        self._waiters: dict[bytes, set[asyncio.Event]] = {}

    async def close(self) -> None:
        if self._listener is not None:
            await stop_task(self._listener)
            self._listener = None

    async def ensure(self) -> None:
        """Start the pub/sub listener if it is not running, and give it up to the
        timeout to be subscribed (if it is not, waiters still retry every SAFETY_NET)."""
        if self._subscribed is None:
            self._subscribed = asyncio.Event()
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._listen(), name="authproxy-store-released")
        await wait_event(self._subscribed, self.store.cfg.timeout)

    async def _listen(self) -> None:
        """Pattern-subscribe to every release of this prefix and wake the waiters of
        each; on any failure (Redis restarted, unreachable) subscribe again with
        backoff, waking every waiter once subscribed since messages may have been missed."""
        assert self._subscribed is not None
        pattern = f"{self.store.prefix}released:*".encode()
        delay = LISTEN_BACKOFF[0]
        warned = False
        while not self.store._closed:
            pubsub = self.store.client().pubsub()
            try:
                await pubsub.psubscribe(pattern)
                while not self.store._closed:  # (as well as cancel(): redis-py may swallow that)
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is None:
                        continue
                    if msg["type"] == "psubscribe":
                        # the first subscription, or redis-py's own re-subscription
                        self._subscribed.set()
                        self._wake_all()
                        delay, warned = LISTEN_BACKOFF[0], False
                    elif msg["type"] == "pmessage":
                        for ev in self._waiters.get(msg["channel"], ()):
                            ev.set()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - whatever broke, subscribe again
                self._subscribed.clear()
                if not warned:
                    log.warning("store %s: release messages interrupted (%s); subscribing again", self.store.where, self.store.reason(e))
                    warned = True
            finally:
                with contextlib.suppress(BaseException):
                    await (pubsub.aclose() if hasattr(pubsub, "aclose") else pubsub.reset())
            self._wake_all()
            await asyncio.sleep(delay)
            delay = min(LISTEN_BACKOFF[1], delay * 2)

    def _wake_all(self) -> None:
        for events in self._waiters.values():
            for ev in events:
                ev.set()

    @contextlib.contextmanager
    def waiting(self, channel: bytes) -> Any:
        ev = asyncio.Event()
        self._waiters.setdefault(channel, set()).add(ev)
        try:
            yield ev
        finally:
            events = self._waiters.get(channel)
            if events is not None:
                events.discard(ev)
                if not events:
                    del self._waiters[channel]
