"""The state dir as a DocStore: documents, ttl, compare-and-delete, versions, and its
flock-based lock across tasks and processes (bounded waits, a killed holder, many
waiters at once)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from authproxy.store.base import StoreError
from authproxy.store.statedir import StateDirStore
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path: Path) -> StateDirStore:
    return StateDirStore(str(tmp_path / "state"), shared=True)


async def test_round_trip(store: StateDirStore) -> None:
    assert store.shared and not store.fleet
    await store.ping()
    docs = store.service("svc")
    assert await docs.get("current") is None
    assert await docs.version("current") is None
    doc = {"token": "abc", "list": [1, "é", None]}
    await docs.put("current", doc)
    assert await docs.get("current") == doc
    assert await store.service("other").get("current") is None
    versions = []
    for i in range(5):  # back to back, well within one tick of a coarse file-system clock
        await docs.put("current", {"i": i})
        versions.append(await docs.version("current"))
    assert len(set(versions)) == 5, versions
    assert await docs.delete("current") is True
    assert await docs.delete("current") is False
    assert await docs.version("current") is None
    await docs.put("plain", "text")
    assert (os.stat(Path(store.where) / "svc" / "plain.json").st_mode & 0o777) == 0o600


async def test_ttl(store: StateDirStore) -> None:
    docs = store.service("svc")
    await docs.put("short", {"a": 1}, ttl=0.2)
    await docs.put("long", {"a": 2}, ttl=300)
    assert await docs.get("short") == {"a": 1}
    t0 = time.monotonic()
    await wait_for(lambda: _is_none(docs.get("short")), timeout=5)
    assert time.monotonic() - t0 < 3
    assert await docs.get("long") == {"a": 2}


async def _is_none(aw: Any) -> bool:
    return (await aw) is None


async def test_compare_and_delete(store: StateDirStore) -> None:
    docs = store.service("svc")
    await docs.put("current", {"t": 1}, tag="one")
    assert await docs.delete("current", if_tag="two") is False
    assert await docs.get("current") == {"t": 1}
    assert await docs.delete("current", if_tag="one") is True
    assert await docs.get("current") is None
    assert await docs.delete("current", if_tag="one") is False
    await docs.put("current", {"t": 2}, tag="one")
    await docs.put("current", {"t": 3})  # no tag now
    assert await docs.delete("current", if_tag="one") is False
    assert await docs.get("current") == {"t": 3}
    fp = docs.fingerprint("tok")
    assert fp == docs.fingerprint("tok") != docs.fingerprint("other") and "tok" not in fp


async def test_lock_between_tasks_and_bad_names(store: StateDirStore) -> None:
    docs = store.service("svc")
    async with docs.lock("current"):
        with pytest.raises(StoreError, match="stayed locked"):
            async with docs.lock("current", wait=0.1):
                pytest.fail("two holders")
        async with docs.lock("other", wait=0):
            pass
    async with docs.lock("current", wait=0):
        pass
    with pytest.raises((ValueError, StoreError)):
        async with docs.lock("../escape"):
            pass
    assert not (Path(store.where) / ".escape.lock").exists()


HOLDER = r"""
import asyncio, sys
from authproxy.store.statedir import StateDirStore

async def main() -> None:
    st = StateDirStore(sys.argv[1], shared=True)
    async with st.service("svc").lock("current"):
        print("HELD", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    print("RELEASED", flush=True)

asyncio.run(main())
"""


async def _holder(path: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, path, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT
    )
    line = await asyncio.wait_for(proc.stdout.readline(), 30)  # type: ignore[union-attr]
    assert line == b"HELD\n", line
    return proc


async def test_lock_across_processes_with_a_bounded_wait(store: StateDirStore) -> None:
    docs = store.service("svc")
    proc = await _holder(store.where)
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="stayed locked.*0.3s") as e:
            async with docs.lock("current", wait=0.3):
                pytest.fail("two holders")
        assert 0.3 <= time.monotonic() - t0 < 1.0
        assert store.where in str(e.value)
        acquired: list[float] = []

        async def waiter() -> None:
            async with docs.lock("current"):  # unbounded: wakes when the holder lets go
                acquired.append(time.monotonic())

        task = asyncio.create_task(waiter())
        await asyncio.sleep(0)
        t1 = time.monotonic()
        proc.stdin.write(b"go\n")  # type: ignore[union-attr]
        await asyncio.wait_for(task, 10)
        assert acquired[0] - t1 < 1.0
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_a_killed_holder_frees_the_lock_at_once(store: StateDirStore) -> None:
    docs = store.service("svc")
    proc = await _holder(store.where)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    async with docs.lock("current", wait=2):
        pass


async def test_many_waiters_do_not_starve_the_default_executor(store: StateDirStore) -> None:
    """Threads blocked in flock must not fill the loop's default executor: DNS lookups
    (getaddrinfo) and other to_thread work run there, and a worker waiting for another
    process's locks must still reach its upstreams."""
    docs = store.service("svc")
    proc = await _holder(store.where)
    loop = asyncio.get_running_loop()
    try:
        waiters = [asyncio.create_task(_hold(docs, "current")) for _ in range(40)]
        await asyncio.sleep(0.05)
        assert await asyncio.wait_for(loop.run_in_executor(None, lambda: 42), 2) == 42
        await asyncio.wait_for(loop.getaddrinfo("127.0.0.1", 80), 2)
        proc.stdin.write(b"go\n")  # type: ignore[union-attr]
        await asyncio.wait_for(asyncio.gather(*waiters), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def _hold(docs: Any, name: str) -> None:
    async with docs.lock(name):
        pass


async def test_a_cancelled_waiter_does_not_keep_the_lock(store: StateDirStore) -> None:
    docs = store.service("svc")
    proc = await _holder(store.where)
    try:
        task = asyncio.create_task(_hold(docs, "current"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        proc.stdin.write(b"go\n")  # type: ignore[union-attr]
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"RELEASED\n"  # type: ignore[union-attr]
        # the cancelled waiter's thread may take the lock as the holder goes; it must let go
        async with docs.lock("current", wait=5):
            pass
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
