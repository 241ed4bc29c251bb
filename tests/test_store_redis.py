"""The Redis store against a real redis-server: documents, ttl, compare-and-delete,
the fleet lock (across stores, processes, a SIGKILLed holder), a Redis stopped and
restarted, what a dump holds, and what errors say (never a password)."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import secrets
import signal
import sys
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest

from authproxy.config import StoreConfig
from authproxy.secret import Secret
from authproxy.store import redis as redis_store
from authproxy.store.base import StoreError
from authproxy.store.crypto import StoreCipher, read_key_file
from authproxy.store.redis import RedisStore
from tests.conftest import secret, wait_for

ROOT = Path(__file__).resolve().parent.parent


def key_file(tmp_path: Path, name: str = "store.key") -> Path:
    p = tmp_path / name
    p.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    return p


def unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}:"


@pytest.fixture
async def make_store(tmp_path: Path) -> AsyncIterator[Callable[..., RedisStore]]:
    """``make_store(server_or_url, prefix=..., key=..., **StoreConfig fields)``; closed after the test."""
    stores: list[RedisStore] = []
    default_key = key_file(tmp_path)

    def make(server: Any, prefix: str, key: Path | None = None, **kw: Any) -> RedisStore:
        url = server if isinstance(server, str) else server.url
        cfg = StoreConfig(url=url, key_file=str(key or default_key), prefix=prefix, **kw)  # type: ignore[arg-type]
        cfg.check()
        st = RedisStore(cfg)
        stores.append(st)
        return st

    yield make
    for st in stores:
        await st.close()


# --------------------------------------------------------------------------- documents


async def test_round_trip(redis_server: Any, make_store: Any) -> None:
    prefix = unique_prefix()
    st = make_store(redis_server, prefix)
    assert st.shared and st.fleet
    assert st.where == f"{redis_server.url} prefix {prefix}"
    docs = st.service("svc")
    other = st.service("other")
    assert docs.where == f"{redis_server.url} {prefix}svc"
    assert await docs.get("current") is None
    assert await docs.version("current") is None
    doc = {"token": "abc", "n": 3, "list": [1, "é", None], "nested": {"x": True}}
    await docs.put("current", doc)
    assert await docs.get("current") == doc
    assert await other.get("current") is None  # services do not see each other's documents
    v1 = await docs.version("current")
    await docs.put("current", doc)
    v2 = await docs.version("current")
    assert v1 and v2 and v1 != v2  # every write is a new version, even of the same content
    await docs.put("plain", "just a string")
    assert await docs.get("plain") == "just a string"
    assert await docs.delete("current") is True
    assert await docs.delete("current") is False
    assert await docs.get("current") is None and await docs.version("current") is None
    with pytest.raises(ValueError):
        await docs.get("../x")
    await st.ping()


async def test_ttl_is_the_keys_expiry(redis_server: Any, make_store: Any) -> None:
    prefix = unique_prefix()
    docs = make_store(redis_server, prefix).service("svc")
    await docs.put("short", {"a": 1}, ttl=0.3)
    await docs.put("long", {"a": 2})
    pttl = int(redis_server.command("PTTL", f"{prefix}svc:short")[1:])
    assert 0 < pttl <= 300
    assert redis_server.command("PTTL", f"{prefix}svc:long") == b":-1\r\n"  # no ttl: kept
    t0 = time.monotonic()
    await wait_for(lambda: docs.get("short"), timeout=5)  # present now
    await wait_for(lambda: _is_none(docs.get("short")), timeout=5)
    assert time.monotonic() - t0 < 3
    assert await docs.get("long") == {"a": 2}
    await docs.put("long", {"a": 3}, ttl=0)  # already expired: nothing is left
    assert await docs.get("long") is None


async def _is_none(aw: Any) -> bool:
    return (await aw) is None


async def test_compare_and_delete(redis_server: Any, make_store: Any) -> None:
    docs = make_store(redis_server, unique_prefix()).service("svc")
    await docs.put("current", {"t": 1}, tag="tag-one")
    assert await docs.delete("current", if_tag="tag-two") is False
    assert await docs.get("current") == {"t": 1}
    assert await docs.delete("current", if_tag="tag-one") is True
    assert await docs.get("current") is None
    assert await docs.delete("current", if_tag="tag-one") is False
    await docs.put("current", {"t": 2}, tag="tag-one")
    await docs.put("current", {"t": 3})  # rewritten without a tag: the old tag is gone with it
    assert await docs.delete("current", if_tag="tag-one") is False
    assert await docs.get("current") == {"t": 3}
    fp = docs.fingerprint("some-token")
    assert fp == docs.fingerprint("some-token") != docs.fingerprint("other-token")
    assert "some-token" not in fp and len(fp) == 24


# --------------------------------------------------------------------------- the lock


async def test_lock_is_exclusive_across_stores(redis_server: Any, make_store: Any) -> None:
    prefix = unique_prefix()
    a = make_store(redis_server, prefix).service("svc")
    b = make_store(redis_server, prefix).service("svc")
    async with a.lock("current"):
        t0 = time.monotonic()
        with pytest.raises(StoreError) as e:
            async with b.lock("current", wait=0.3):
                pytest.fail("two holders")
        assert 0.25 < time.monotonic() - t0 < 2
        assert "stayed locked" in str(e.value) and prefix in str(e.value)
        async with b.lock("other", wait=0):  # another name is another lock
            pass
    async with b.lock("current", wait=0):
        pass


async def test_waiter_wakes_on_release_not_by_polling(redis_server: Any, make_store: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(redis_store, "SAFETY_NET", 30.0)  # only the release message can wake it in time
    prefix = unique_prefix()
    a_store, b_store = make_store(redis_server, prefix), make_store(redis_server, prefix)
    a, b = a_store.service("svc"), b_store.service("svc")
    acquired: list[float] = []

    async def waiter() -> None:
        async with b.lock("current", wait=20):
            acquired.append(time.monotonic())

    async with a.lock("current"):
        task = asyncio.create_task(waiter())
        await wait_for(lambda: b_store.releases._waiters, timeout=5)
        t0 = time.monotonic()
    await asyncio.wait_for(task, 5)
    assert acquired[0] - t0 < 0.5, acquired[0] - t0


async def test_cancelled_waiter_leaves_nothing_behind(redis_server: Any, make_store: Any) -> None:
    prefix = unique_prefix()
    a_store, b_store = make_store(redis_server, prefix), make_store(redis_server, prefix)
    async with a_store.service("svc").lock("x"):
        task = asyncio.create_task(_hold(b_store.service("svc"), "x"))
        await wait_for(lambda: b_store.releases._waiters, timeout=5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert b_store.releases._waiters == {}
    async with b_store.service("svc").lock("x", wait=0):
        pass


async def _hold(docs: Any, name: str) -> None:
    async with docs.lock(name):
        pass


async def test_cancellation_is_never_lost(redis_server: Any, make_store: Any, monkeypatch: Any) -> None:
    """redis-py sometimes swallows a cancellation that lands mid-command (a few in a
    hundred, here): a caller's cancel must still end its wait, and a lock's renewer
    must still stop, or its lock would never be released."""
    monkeypatch.setattr(redis_store, "LOCK_TTL", 0.03)  # a renewal every 10 ms
    rng = random.Random(1)
    docs = make_store(redis_server, unique_prefix()).service("svc")
    await docs.put("x", {"t": 1})

    async def reads() -> None:
        while True:
            await docs.get("x")

    async def holds() -> None:
        while True:
            async with docs.lock("l"):
                await asyncio.sleep(rng.random() * 0.03)

    for body in [reads] * 200 + [holds] * 100:
        task = asyncio.create_task(body())
        await asyncio.sleep(rng.random() * 0.004)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=3)
        assert done and task.cancelled(), f"a cancellation was lost ({body.__name__})"
    async with docs.lock("l", wait=2):  # nothing kept renewing it
        pass


HOLDER = r"""
import asyncio, sys
from authproxy.config import StoreConfig
from authproxy.store import redis as rs

async def main() -> None:
    url, prefix, key, ttl = sys.argv[1:5]
    rs.LOCK_TTL = float(ttl)
    st = rs.RedisStore(StoreConfig(url=url, key_file=key, prefix=prefix))
    async with st.service("svc").lock("current"):
        print("HELD", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    print("RELEASED", flush=True)
    await st.close()

asyncio.run(main())
"""


async def _holder(url: str, prefix: str, key: Path, ttl: float) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, url, prefix, str(key), str(ttl),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    line = await asyncio.wait_for(proc.stdout.readline(), 30)  # type: ignore[union-attr]
    assert line == b"HELD\n", line
    return proc


async def test_lock_is_exclusive_across_processes(redis_server: Any, make_store: Any, tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(redis_store, "SAFETY_NET", 30.0)
    prefix, key = unique_prefix(), key_file(tmp_path, "k")
    docs = make_store(redis_server, prefix, key=key).service("svc")
    proc = await _holder(redis_server.url, prefix, key, 10.0)
    try:
        with pytest.raises(StoreError):
            async with docs.lock("current", wait=0.2):
                pytest.fail("two holders")
        acquired: list[float] = []

        async def waiter() -> None:
            async with docs.lock("current", wait=20):
                acquired.append(time.monotonic())

        task = asyncio.create_task(waiter())
        await wait_for(lambda: docs.store.releases._waiters, timeout=5)
        t0 = time.monotonic()
        proc.stdin.write(b"release\n")  # type: ignore[union-attr]
        await asyncio.wait_for(task, 10)
        assert acquired[0] - t0 < 0.8, acquired[0] - t0  # the release message, not the 30 s retry
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"RELEASED\n"  # type: ignore[union-attr]
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_killed_holder_loses_the_lock_to_its_expiry(redis_server: Any, make_store: Any, tmp_path: Path) -> None:
    prefix, key = unique_prefix(), key_file(tmp_path, "k")
    docs = make_store(redis_server, prefix, key=key).service("svc")
    proc = await _holder(redis_server.url, prefix, key, 1.0)  # the holder's LOCK_TTL
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    t0 = time.monotonic()
    async with docs.lock("current", wait=10):
        waited = time.monotonic() - t0
    # at most the lock's ttl (1 s) plus one safety-net retry (1 s): no message comes from the dead
    assert waited < 1.0 + redis_store.SAFETY_NET + 0.7, waited


async def test_renewal_keeps_a_lock_held_past_its_ttl(redis_server: Any, make_store: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(redis_store, "LOCK_TTL", 0.3)
    prefix = unique_prefix()
    a = make_store(redis_server, prefix).service("svc")
    b = make_store(redis_server, prefix).service("svc")
    async with a.lock("current"):
        held_until = time.monotonic() + 4 * 0.3
        while time.monotonic() < held_until:
            with pytest.raises(StoreError):
                async with b.lock("current", wait=0):
                    pytest.fail("the renewed lock was taken")
            await asyncio.sleep(0.05)
    async with b.lock("current", wait=0):
        pass


async def test_lock_lost_at_release_is_a_warning(redis_server: Any, make_store: Any, caplog: Any) -> None:
    prefix = unique_prefix()
    docs = make_store(redis_server, prefix).service("svc")
    with caplog.at_level(logging.WARNING, logger="authproxy.store"):
        async with docs.lock("current"):
            redis_server.command("DEL", f"{prefix}lock:svc:current")  # as if it had expired
    assert [r for r in caplog.records if "expired" in r.getMessage()]


# --------------------------------------------------------------------------- Redis down, restarted


async def test_store_down_is_a_store_error_naming_the_store(redis_factory: Any, make_store: Any) -> None:
    password = secret(f"pw-{secrets.token_hex(8)}")
    server = redis_factory(password=password)
    prefix = unique_prefix()
    st = make_store(server, prefix, password=Secret(password), timeout=0.5)
    docs = st.service("svc")
    await docs.put("current", {"t": 1})
    server.stop()
    for op in (lambda: docs.get("current"), lambda: docs.put("current", {}), st.ping, lambda: _hold(docs, "current")):
        t0 = time.monotonic()
        with pytest.raises(StoreError) as e:
            await op()
        assert time.monotonic() - t0 < 2 * 0.5 + 0.5
        msg = str(e.value)
        assert "unreachable" in msg and server.url in msg and prefix in msg, msg
        assert password not in msg and password not in repr(e.value)


async def test_recovers_after_a_redis_restart(redis_factory: Any, make_store: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(redis_store, "SAFETY_NET", 30.0)
    server = redis_factory()
    prefix = unique_prefix()
    a_store, b_store = make_store(server, prefix, timeout=1.0), make_store(server, prefix, timeout=1.0)
    a, b = a_store.service("svc"), b_store.service("svc")
    await a.put("current", {"t": 1})
    async with a.lock("x"):  # b's release listener starts (b waits once)
        task = asyncio.create_task(_hold(b, "x"))
        await wait_for(lambda: b_store.releases._waiters, timeout=5)
    await asyncio.wait_for(task, 5)

    server.restart()  # every connection dropped, the data and the loaded scripts gone

    assert await a.get("current") is None  # the same RedisStore, no new one
    await a.put("current", {"t": 2}, tag="g")
    assert await b.get("current") == {"t": 2}
    assert await b.delete("current", if_tag="g") is True  # the Lua script is loaded again
    # b's listener subscribed again by itself: a release wakes b at once
    await wait_for(lambda: server.command("PUBSUB", "NUMPAT") == b":1\r\n", timeout=10)
    acquired: list[float] = []

    async def waiter() -> None:
        async with b.lock("x", wait=20):
            acquired.append(time.monotonic())

    async with a.lock("x"):
        task = asyncio.create_task(waiter())
        await wait_for(lambda: b_store.releases._waiters, timeout=5)
        t0 = time.monotonic()
    await asyncio.wait_for(task, 10)
    assert acquired[0] - t0 < 0.5, acquired[0] - t0


# --------------------------------------------------------------------------- secrets


async def test_a_redis_dump_holds_no_clear_secret(redis_factory: Any, make_store: Any) -> None:
    server = redis_factory()
    token = secret(f"tok/{secrets.token_urlsafe(24)}+=&x")
    docs = make_store(server, unique_prefix()).service("svc")
    await docs.put("current", {"credential": {"token": token, "kind": "bearer"}}, ttl=300, tag=docs.fingerprint(token))
    dump = server.dump()
    forms = {
        token.encode(),
        base64.b64encode(token.encode()).rstrip(b"="),
        base64.urlsafe_b64encode(token.encode()).rstrip(b"="),
        urllib.parse.quote(token, safe="").encode(),
        urllib.parse.quote_plus(token).encode(),
        token.encode().hex().encode(),
    }
    for form in forms:
        assert form not in dump, form
    assert docs.fingerprint(token).encode() in dump  # the dump is read right: the tag is there
    # and the scan would see a clear secret: write one plainly, dump again
    server.command("SET", "plain", token)
    assert token.encode() in server.dump()


async def test_another_key_file_cannot_decrypt(redis_server: Any, make_store: Any, tmp_path: Path) -> None:
    prefix = unique_prefix()
    a = make_store(redis_server, prefix, key=key_file(tmp_path, "a")).service("svc")
    b = make_store(redis_server, prefix, key=key_file(tmp_path, "b")).service("svc")
    await a.put("current", {"t": 1})
    with pytest.raises(StoreError, match="cannot decrypt.*a different store.key_file"):
        await b.get("current")
    assert await a.get("current") == {"t": 1}  # the reader's failure changed nothing
    # a ciphertext moved under another name does not open either (AAD = the key name)
    redis_server.command("COPY", f"{prefix}svc:current", f"{prefix}svc:moved")
    with pytest.raises(StoreError, match="cannot decrypt"):
        await a.get("moved")


def test_key_file_is_checked(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    short = tmp_path / "short"
    short.write_bytes(b"0123456789\n")
    for path, words in ((empty, "is empty"), (short, "fewer than 16"), (tmp_path / "missing", "cannot read")):
        with pytest.raises(StoreError, match=words) as e:
            RedisStore(StoreConfig(url="redis://127.0.0.1:1/0", key_file=str(path)))  # type: ignore[arg-type]
        assert "head -c 32 /dev/urandom" in str(e.value) or words == "cannot read"
    ok = tmp_path / "ok"
    ok.write_bytes(b"x" * 16 + b"\n")
    assert read_key_file(str(ok)) == b"x" * 16


def test_cipher(tmp_path: Path) -> None:
    material = os.urandom(32)
    c = StoreCipher(material)
    assert material.hex() not in repr(c) and "hidden" in repr(c)
    blob = c.seal(b"hello", b"k1")
    assert b"hello" not in blob and c.seal(b"hello", b"k1") != blob  # a fresh nonce each time
    assert c.open(blob, b"k1") == b"hello"
    with pytest.raises(StoreError, match="cannot decrypt k2"):
        c.open(blob, b"k2")
    with pytest.raises(StoreError, match="cannot decrypt"):
        c.open(blob[:-1] + bytes([blob[-1] ^ 1]), b"k1")
    with pytest.raises(StoreError, match="cannot decrypt"):
        c.open(b"short", b"k1")
    assert c.fingerprint("t") != StoreCipher(os.urandom(32)).fingerprint("t")  # keyed, not a bare hash


async def test_wrong_password_is_named_without_the_password(redis_factory: Any, make_store: Any) -> None:
    right = secret(f"right-{secrets.token_hex(8)}")
    wrong = secret(f"wrong-{secrets.token_hex(8)}")
    server = redis_factory(password=right)
    prefix = unique_prefix()
    good = make_store(server, prefix, password=Secret(right))
    await good.service("svc").put("current", {"t": 1})
    for st in (make_store(server, prefix, password=Secret(wrong)), make_store(server, prefix)):
        with pytest.raises(StoreError) as e:
            await st.service("svc").get("current")
        msg = str(e.value)
        assert server.url in msg and wrong not in msg and right not in msg, msg
        assert wrong not in repr(st) and wrong not in st.where


async def test_no_io_before_use_and_no_password_in_where(make_store: Any) -> None:
    st = make_store("redis://127.0.0.1:1/0", unique_prefix(), timeout=0.3)  # nothing listens there
    # a url with a password (the config refuses one; never trusted to)
    assert redis_store._public_url("redis://user:hunter2@h:6379/0") == "redis://user@h:6379/0"
    assert redis_store._public_url("unix:///run/redis.sock?db=2") == "unix:///run/redis.sock?db=2"
    with pytest.raises(StoreError, match="unreachable"):
        await st.ping()
    await st.close()
    with pytest.raises(StoreError, match="closed"):
        await st.ping()


# --------------------------------------------------------------------------- other transports


async def test_rediss_checks_the_server_against_ca_file(redis_factory: Any, make_store: Any, tmp_path: Path) -> None:
    import trustme

    ca, other_ca = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file_ = tmp_path / "server.pem", tmp_path / "server.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file_))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    other_ca.cert_pem.write_to_path(str(tmp_path / "other.pem"))
    server = redis_factory(tls=(str(cert_file), str(key_file_)))
    assert server.url.startswith("rediss://")
    prefix = unique_prefix()
    docs = make_store(server, prefix, ca_file=str(tmp_path / "ca.pem")).service("svc")
    await docs.put("current", {"t": 1})
    assert await docs.get("current") == {"t": 1}
    wrong = make_store(server, prefix, ca_file=str(tmp_path / "other.pem"), timeout=1.0)
    with pytest.raises(StoreError, match="unreachable") as e:
        await wrong.ping()
    assert server.url in str(e.value)


async def test_unix_socket_url(redis_server: Any, make_store: Any) -> None:
    prefix = unique_prefix()
    st = make_store(redis_server.unix_url, prefix)
    assert st.where == f"{redis_server.unix_url} prefix {prefix}"
    await st.service("svc").put("current", {"t": 1})
    # the same database as over TCP
    assert await make_store(redis_server, prefix).service("svc").get("current") == {"t": 1}


async def test_a_hung_redis_is_a_store_error_within_the_timeout(make_store: Any) -> None:
    import socket

    with socket.socket() as hung:  # connections complete in the kernel; nothing ever answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        port = hung.getsockname()[1]
        st = make_store(f"redis://127.0.0.1:{port}/0", unique_prefix(), timeout=0.3)
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="unreachable") as e:
            await st.service("svc").get("current")
        assert time.monotonic() - t0 < 2 * 0.3 + 0.4
        assert f"127.0.0.1:{port}" in str(e.value)
