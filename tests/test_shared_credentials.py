"""Credentials shared by several processes through a store (workers, replicas).

Each ServiceCredentials here stands for one process: its own memory, its own
scheme object, the same store. The scheme counts what reaches the "upstream", so
the fleet-wide promises are checked exactly: one credential request however many
processes need one, one new fetch for a burst of rejections of one token, one
refresh when it falls due. The same tests run on the state dir (workers on one
machine) and on a real redis-server (replicas).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from authproxy.credentials import ServiceCredentials, Unavailable
from authproxy.schemes.base import Credential, Scheme
from authproxy.secret import Secret
from authproxy.store.statedir import StateDirStore


class Clock:
    """Wall-clock time that a test can move forward (every 'process' reads this one)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Upstream:
    """What the token endpoint saw, shared by every 'process'."""

    def __init__(self, lifetime: float | None = 100.0) -> None:
        self.clock = Clock()
        self.calls = 0
        self.lifetime = lifetime
        self.gate: asyncio.Event | None = None
        self.revoked: list[str] = []


class _Ctx:
    def __init__(self, store: Any) -> None:
        class _Timeout:
            total = 5.0

        class _Svc:
            name = "svc"
            scheme = "fake"
            timeout = _Timeout()

            class upstream:  # noqa: N801 - identity() reads upstream.url
                url = "http://fake"

        self.service = _Svc()
        self.store = store


class FleetScheme(Scheme):
    persist_created = True

    def __init__(self, store: Any, upstream: Upstream) -> None:
        self.ctx = _Ctx(store)  # type: ignore[assignment]
        self.config = None
        self.up = upstream

    @property
    def refresh_margin(self) -> float:
        return 10.0

    async def obtain(self, key: str | None) -> Credential:
        self.up.calls += 1
        n = self.up.calls
        if self.up.gate is not None:
            await self.up.gate.wait()
        now = self.up.clock()
        expires = None if self.up.lifetime is None else now + self.up.lifetime
        return Credential(token=Secret(f"tok-{key}-{n}-{os.urandom(4).hex()}"), expires_at=expires, created=True, obtained_at=now)

    def apply(self, out: Any, cred: Credential) -> None:  # pragma: no cover - not used here
        pass

    async def revoke(self, cred: Credential) -> None:
        self.up.revoked.append(cred.token.reveal())


@pytest.fixture(params=["statedir", "redis"])
async def make_store(request: pytest.FixtureRequest, tmp_path: Path):
    """A factory of stores that share their contents: one per 'process'."""
    made: list[Any] = []
    if request.param == "statedir":

        def make() -> Any:
            st = StateDirStore(str(tmp_path / "state"), shared=True)
            made.append(st)
            return st

    else:
        server = request.getfixturevalue("redis_server")
        from authproxy.config import StoreConfig
        from authproxy.store.redis import RedisStore

        key = tmp_path / "store.key"
        key.write_bytes(os.urandom(32).hex().encode())
        prefix = f"t{os.urandom(4).hex()}:"

        def make() -> Any:
            st = RedisStore(StoreConfig(url=server.url, key_file=str(key), prefix=prefix))  # type: ignore[arg-type]
            made.append(st)
            return st

    yield make
    for st in made:
        await st.close()


def _process(make_store: Any, upstream: Upstream) -> ServiceCredentials:
    store = make_store()
    return ServiceCredentials("svc", FleetScheme(store.service("svc"), upstream), shared=True, clock=upstream.clock)


async def _close(*procs: ServiceCredentials) -> None:
    for p in procs:
        await p.stop()


async def test_many_processes_make_one_credential_request(make_store):
    up = Upstream()
    up.gate = asyncio.Event()
    procs = [_process(make_store, up) for _ in range(4)]
    waiters = [asyncio.ensure_future(p.get()) for p in procs for _ in range(50)]
    # Let every process reach the store before the first fetch may finish.
    deadline = asyncio.get_running_loop().time() + 5
    while up.calls == 0 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    up.gate.set()
    got = await asyncio.gather(*waiters)
    assert up.calls == 1
    assert len({c.token.reveal() for c in got}) == 1
    await _close(*procs)


async def test_a_burst_of_rejections_of_one_token_makes_one_new_fetch(make_store):
    up = Upstream()
    procs = [_process(make_store, up) for _ in range(3)]
    first = [await p.get() for p in procs]
    assert up.calls == 1 and len({c.token.reveal() for c in first}) == 1
    for p, cred in zip(procs, first):
        p.rejected(cred)
        p.rejected(cred)  # twice in one process: still one
    for p in procs:
        await p.settled()
    second = await asyncio.gather(*(p.get() for p in procs))
    assert up.calls == 2
    assert len({c.token.reveal() for c in second}) == 1
    assert second[0].token != first[0].token
    await _close(*procs)


async def test_a_restarted_process_adopts_the_stored_credential(make_store):
    up = Upstream(lifetime=None)  # a FogBugz logon token: never expires
    a = _process(make_store, up)
    cred = await a.get()
    await a.shutdown()  # a shared store: the exit revokes nothing
    assert up.revoked == []
    b = _process(make_store, up)
    assert (await b.get()).token == cred.token
    assert up.calls == 1
    await _close(b)


async def test_logout_revokes_for_every_process(make_store):
    up = Upstream(lifetime=None)
    a, b = _process(make_store, up), _process(make_store, up)
    cred = await a.get()
    assert (await b.get()).token == cred.token
    assert await b.logout() == 1
    assert up.revoked == [cred.token.reveal()]
    c = _process(make_store, up)
    new = await c.get()  # nothing left to adopt
    assert new.token != cred.token and up.calls == 2
    await _close(a, c)


async def test_a_record_from_before_is_never_brought_back_after_it_was_replaced(make_store):
    """A process that started with a recorded credential (reusable once, if the store
    had none) must not fall back on it later: by then it may have been rejected and
    replaced elsewhere, and the replacement logged out."""
    up = Upstream(lifetime=None)
    a = _process(make_store, up)
    first = await a.get()
    b = _process(make_store, up)  # starts with `first` in its records
    b_first = await b.get()
    assert b_first.token == first.token  # adopted from the store
    a.rejected(first)
    b.rejected(b_first)
    await a.settled()
    await b.settled()
    second = await a.get()
    assert second.token != first.token and up.calls == 2
    b_second = await b.get()
    assert b_second.token == second.token  # adopted
    c = _process(make_store, up)
    await c.logout()  # `second` revoked and forgotten for everyone
    b.rejected(b_second)
    await b.settled()
    third = await b.get()
    assert third.token not in (first.token, second.token) and up.calls == 3
    await _close(a, b, c)


async def test_a_credential_due_for_renewal_is_renewed_once(make_store):
    up = Upstream(lifetime=100.0)
    procs = [_process(make_store, up) for _ in range(3)]
    for p in procs:
        await p.get()
    assert up.calls == 1
    up.clock.offset = 95  # past expires_at - refresh_margin, still valid
    # Each process finds it due: the first renews under the lock, the others adopt its result.
    got = await asyncio.gather(*(p._start_fetch(None) for p in procs))
    assert up.calls == 2
    assert len({c.token.reveal() for c in got}) == 1
    await _close(*procs)


async def test_store_unreachable_fails_closed_and_keeps_what_is_held(tmp_path):
    up = Upstream()
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")  # the state dir cannot be made here
    store = StateDirStore(str(blocked / "state"), shared=True)
    p = ServiceCredentials("svc", FleetScheme(store.service("svc"), up), shared=True)
    with pytest.raises(Unavailable) as e:
        await p.get()
    assert e.value.code == "token_unavailable" and "store" in e.value.message
    assert up.calls == 0
    st = p.status()
    assert st.state == "backoff" and "store" in (st.last_error or "")
    await p.stop()
