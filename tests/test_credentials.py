"""The credential manager on its own: single-flight, expiry, refresh, backoff, persistence.

A small scheme whose obtain() is driven by the test stands in for a real one;
the manager's clock is injected, so no test waits for real time to pass.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

from authproxy.credentials import BACKOFF_CAP, ServiceCredentials, Unavailable, backoff_delay
from authproxy.schemes.base import Credential, CredentialError, LoginRequired, Scheme
from authproxy.secret import Secret
from authproxy.store.statedir import StateDirStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class _Svc:
    name: str = "svc"
    auth: object = None
    scheme: str = "fake"

    @property
    def upstream(self):  # identity() uses it
        class U:
            url = "http://fake"

        return U()


class _Ctx:
    def __init__(self, store) -> None:
        self.service = _Svc()
        self.store = store


class FakeScheme(Scheme):
    persist_created = True
    revoke_replaced = True

    def __init__(self, store, clock: Clock, lifetime: float | None = 100, margin: float = 10) -> None:
        self.ctx = _Ctx(store)  # type: ignore[assignment]
        self.config = None
        self.clock = clock
        self.lifetime = lifetime
        self.margin = margin
        self.calls = 0
        self.gate: asyncio.Event | None = None
        self.fail: list[Exception] = []
        self.revoked: list[str] = []
        self.exit_revoke = True

    @property
    def refresh_margin(self) -> float:
        return self.margin

    @property
    def revoke_on_exit(self) -> bool:
        return self.exit_revoke

    async def obtain(self, key):
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise self.fail.pop(0)
        now = self.clock()
        return Credential(
            token=Secret(f"tok-{key}-{self.calls}"),
            expires_at=None if self.lifetime is None else now + self.lifetime,
            created=True,
            obtained_at=now,
        )

    def apply(self, out, cred) -> None:  # pragma: no cover - not used here
        pass

    async def revoke(self, cred) -> None:
        self.revoked.append(cred.token.reveal())


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path):
    return StateDirStore(str(tmp_path / "state")).service("svc")


async def test_single_flight_for_many_waiters(store, clock):
    scheme = FakeScheme(store, clock)
    scheme.gate = asyncio.Event()
    creds = ServiceCredentials("svc", scheme, clock=clock)
    waiters = [asyncio.ensure_future(creds.get()) for _ in range(500)]
    await asyncio.sleep(0)
    assert creds.status().state == "pending"
    scheme.gate.set()
    got = await asyncio.gather(*waiters)
    assert scheme.calls == 1
    assert len({id(c) for c in got}) == 1
    assert creds.status().state == "ready"
    assert creds.status().expires_in == 100


async def test_per_key_single_flight(store, clock):
    scheme = FakeScheme(store, clock)
    creds = ServiceCredentials("svc", scheme, clock=clock)
    results = await asyncio.gather(*(creds.get(k) for k in ["u1", "u2", "u3"] * 100))
    assert scheme.calls == 3
    assert len({r.token.reveal() for r in results}) == 3


async def test_expiry_and_on_demand_refresh_of_keys(store, clock):
    scheme = FakeScheme(store, clock, lifetime=100, margin=10)
    creds = ServiceCredentials("svc", scheme, clock=clock)
    first = await creds.get("u")
    clock.now += 85  # before the refresh point (90 s)
    assert await creds.get("u") is first and scheme.calls == 1
    clock.now += 6  # past it: the valid one is served while a new one is fetched
    assert await creds.get("u") is first
    await asyncio.sleep(0.01)
    second = await creds.get("u")
    assert second is not first and scheme.calls == 2
    await asyncio.sleep(0.01)
    assert scheme.revoked == [first.token.reveal()]  # replaced while still valid → revoked


async def test_refresh_margin_capped_at_half_lifetime(store, clock):
    scheme = FakeScheme(store, clock, lifetime=10, margin=300)
    creds = ServiceCredentials("svc", scheme, clock=clock)
    cred = await creds.get()
    assert creds._refresh_at(cred) == cred.obtained_at + 5


async def test_background_refresh_before_expiry(store):
    import time

    scheme = FakeScheme(store, time.time, lifetime=0.4, margin=10)  # type: ignore[arg-type]
    creds = ServiceCredentials("svc", scheme)
    creds.start()
    try:
        from tests.conftest import wait_for

        await wait_for(lambda: scheme.calls >= 3, timeout=5)
        assert creds.status().state == "ready"
    finally:
        await creds.stop()


async def test_backoff_after_failure_then_recovery(store, clock):
    scheme = FakeScheme(store, clock)
    scheme.fail = [CredentialError("connection refused")]
    creds = ServiceCredentials("svc", scheme, clock=clock)
    with pytest.raises(Unavailable) as e:
        await creds.get()
    assert e.value.code == "token_unavailable" and e.value.retry_after >= 0.8
    st = creds.status()
    assert st.state == "backoff" and st.last_error == "connection refused"
    # during backoff, requests do not cause fetches
    for _ in range(10):
        with pytest.raises(Unavailable):
            await creds.get()
    assert scheme.calls == 1
    clock.now += 2
    assert (await creds.get()).token.reveal() == "tok-None-2"
    assert creds.status().state == "ready" and creds.status().last_error is None


async def test_refusal_is_error_state_with_longer_backoff(store, clock):
    scheme = FakeScheme(store, clock)
    scheme.fail = [CredentialError("bad password", refused=True)] * 3
    creds = ServiceCredentials("svc", scheme, clock=clock)
    with pytest.raises(Unavailable):
        await creds.get()
    assert creds.status().state == "error"
    assert creds.health.retry_at - clock.now >= 8


def test_backoff_schedule() -> None:
    assert backoff_delay(1, False, rng=lambda: 0.5) == 1.0
    assert backoff_delay(4, False, rng=lambda: 0.5) == 8.0
    assert backoff_delay(30, False, rng=lambda: 1.0) == BACKOFF_CAP
    assert backoff_delay(1, True, rng=lambda: 0.5) == 10.0
    # a wrong password: at most a few attempts in the first minute
    t, attempts = 0.0, 1
    while True:
        t += backoff_delay(attempts, True, rng=lambda: 0.0)
        if t > 60:
            break
        attempts += 1
    assert attempts <= 4


async def test_login_required_does_not_back_off(store, clock):
    scheme = FakeScheme(store, clock)
    scheme.fail = [LoginRequired("refresh token rejected"), LoginRequired("refresh token rejected")]
    creds = ServiceCredentials("svc", scheme, clock=clock)
    with pytest.raises(Unavailable) as e:
        await creds.get()
    assert e.value.code == "login_required" and "authproxy login svc" in e.value.message
    assert creds.status().state == "login_required"
    with pytest.raises(Unavailable):
        await creds.get()
    assert (await creds.get()).token  # a login happened elsewhere: the next obtain succeeds
    assert creds.status().state == "ready"


async def test_rejection_drops_only_that_credential(store, clock):
    scheme = FakeScheme(store, clock)
    creds = ServiceCredentials("svc", scheme, clock=clock)
    a = await creds.get()
    creds.rejected(a)
    b = await creds.get()
    creds.rejected(a)  # a late rejection of the old one must not drop the new one
    assert await creds.get() is b and scheme.calls == 2


async def test_created_credentials_persist_and_are_revoked_at_exit(store, clock):
    scheme = FakeScheme(store, clock)
    creds = ServiceCredentials("svc", scheme, clock=clock)
    a = await creds.get()
    u = await creds.get("user1")
    assert (store.path / "credentials.json").stat().st_mode & 0o777 == 0o600
    assert store.path.stat().st_mode & 0o777 == 0o700
    # a new process on the same state dir reuses them without obtaining
    scheme2 = FakeScheme(store, clock)
    creds2 = ServiceCredentials("svc", scheme2, clock=clock)
    assert (await creds2.get()).token == a.token
    assert (await creds2.get("user1")).token == u.token
    assert scheme2.calls == 0
    await creds2.shutdown()
    assert sorted(scheme2.revoked) == sorted([a.token.reveal(), u.token.reveal()])
    assert (await store.get("credentials")) is None


async def test_expired_records_are_not_reused(store, clock):
    scheme = FakeScheme(store, clock, lifetime=50)
    creds = ServiceCredentials("svc", scheme, clock=clock)
    await creds.get()
    clock.now += 60
    scheme2 = FakeScheme(store, clock)
    creds2 = ServiceCredentials("svc", scheme2, clock=clock)
    await creds2.get()
    assert scheme2.calls == 1


async def test_logout_revokes_and_forgets(store, clock):
    scheme = FakeScheme(store, clock)
    scheme.exit_revoke = False
    creds = ServiceCredentials("svc", scheme, clock=clock)
    a = await creds.get()
    await creds.shutdown()  # not revoked at exit when the scheme says so
    assert scheme.revoked == []
    creds2 = ServiceCredentials("svc", FakeScheme(store, clock), clock=clock)
    assert await creds2.logout() == 1
    assert creds2.scheme.revoked == [a.token.reveal()]  # type: ignore[attr-defined]
    assert (await store.get("credentials")) is None


def test_credential_repr_hides_secret() -> None:
    c = Credential(token=Secret("very-secret-value"))
    assert "very-secret-value" not in repr(c) and "very-secret-value" not in str(c)
    assert f"{Secret('x-secret')}" == "***"


async def test_records_of_two_processes_are_merged_not_overwritten(store, clock):
    """``authproxy token`` beside a running proxy: neither drops the other's token."""
    proxy_side = ServiceCredentials("svc", FakeScheme(store, clock), clock=clock)
    cli_side = ServiceCredentials("svc", FakeScheme(store, clock), clock=clock)
    a = await proxy_side.get("u1")
    b = await cli_side.get("u2")
    c = await proxy_side.get("u3")  # saved after the CLI's write: must keep b
    tokens = {r["token"] for r in (await store.get("credentials"))["credentials"]}
    assert tokens == {a.token.reveal(), b.token.reveal(), c.token.reveal()}
    proxy_side.rejected(a)  # forgotten here: not brought back from the file
    await proxy_side.settled()
    tokens = {r["token"] for r in (await store.get("credentials"))["credentials"]}
    assert tokens == {b.token.reveal(), c.token.reveal()}
