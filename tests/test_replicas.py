"""A fleet: several ``authproxy run`` processes sharing credentials through a real redis-server.

Each replica is the real CLI as a subprocess with a state dir of its own (as on
separate machines); only the store is shared. The strict mocks run in the test
process and count what reaches them, so "one credential for the fleet" is
checked exactly. A replica killed mid-refresh is found by the token request it
has in flight (its TCP connection to the mock, traced to its pid through /proc).
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import aiohttp
import pytest
import yaml

from authproxy.config import load_config_text
from authproxy.runtime import ServiceRuntime
from authproxy.schemes.base import CliIO
from authproxy.store import open_store
from authproxy.testing import fogbugz as fogbugz_mock
from authproxy.testing import oauth2 as oauth2_mock
from tests.conftest import free_port, run_cli, secret, wait_for, write_config
from tests.test_oauth2 import CLIENT, SECRET, URL_RE, code_service, fetch_oob_code
from tests.test_oauth2 import service as oauth2_service

#: How long the rotating-refresh-token soak runs; the release check runs it for 120 s.
SOAK_SECONDS = float(os.environ.get("AUTHPROXY_SOAK_SECONDS", "12"))
EMAIL, PASSWORD = "fleet@example.com", secret("fleet password 1")
ENFIX_APP_TOKEN, ENFIX_USER, ENFIX_PASSWORD = secret("fleet-app-token-4c1d"), "fleet-user", secret("fleet-pa55-9x")


def store_config(tmp_path: Path, url: str, prefix: str) -> dict[str, Any]:
    """The ``store:`` section every replica of a test shares, with a key file made now."""
    key = tmp_path / "store.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    os.chmod(key, 0o600)
    return {"url": url, "key_file": str(key), "prefix": prefix}


@pytest.fixture
def store(tmp_path: Path, redis_server: Any) -> dict[str, Any]:
    return store_config(tmp_path, redis_server.url, f"fleet{os.urandom(4).hex()}:")


class Fleet:
    def __init__(self, tmp_path: Path, cli: Any, store: dict[str, Any], services: dict[str, Any]) -> None:
        self.tmp_path, self.cli, self.store, self.services = tmp_path, cli, store, services
        self.replicas: list[tuple[Any, str]] = []

    def config(self, i: int, port: int) -> Path:
        doc = {
            "listen": f"127.0.0.1:{port}",
            "state_dir": str(self.tmp_path / f"replica{i}"),
            "store": self.store,
            "services": self.services,
        }
        return write_config(self.tmp_path / f"replica{i}.yaml", doc)

    async def start(self, n: int) -> list[str]:
        started = []
        for i in range(len(self.replicas), len(self.replicas) + n):
            port = free_port()
            proc = self.cli("run", "-c", str(self.config(i, port)))
            started.append((proc, f"http://127.0.0.1:{port}"))
        for proc, _ in started:
            await asyncio.to_thread(proc.wait_log, "listening")
        self.replicas.extend(started)
        return [base for _, base in started]

    async def stop_all(self) -> None:
        for proc, _ in self.replicas:
            if proc.proc.poll() is None:
                proc.signal(signal.SIGTERM)
        for proc, _ in self.replicas:
            assert await asyncio.to_thread(proc.wait, 30) in (0, -signal.SIGKILL)
        self.replicas = []


@pytest.fixture
def fleet(tmp_path: Path, cli: Any, store: dict[str, Any]) -> Callable[[dict[str, Any]], Fleet]:
    return lambda services: Fleet(tmp_path, cli, store, services)


async def get(session: aiohttp.ClientSession, url: str, **kw: Any) -> int:
    async with session.get(url, **kw) as r:
        await r.read()
        return r.status


def _pid_of_client(port: int, pids: list[int]) -> int | None:
    """The pid (among ``pids``) owning the loopback TCP socket bound to ``port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with_link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if with_link.startswith("socket:[") and with_link[8:-1] in inodes:
                    return pid
        except OSError:
            continue
    return None


# --------------------------------------------------------------------------- one token for the fleet


async def test_four_replicas_and_1000_concurrent_first_requests_make_one_token_request(upstream, fleet):
    app = oauth2_mock.make_app(clients=[oauth2_mock.Client(CLIENT, secret=SECRET)])
    st = app[oauth2_mock.STATE]
    st.token_delay = 0.5  # every replica reaches the store while the first fetch runs
    base = await upstream(app)
    f = fleet({"api": oauth2_service(base, client_secret=SECRET)})
    bases = await f.start(4)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        codes = await asyncio.gather(*(get(s, f"{b}/api/things") for b in bases for _ in range(250)))
    assert codes == [200] * 1000
    assert sum(st.token_requests.values()) == 1
    assert st.api_ok == 1000
    for t in st.access:
        secret(t)
    await f.stop_all()


async def test_fogbugz_two_replicas_one_logon_restart_none_and_one_new_token_after_a_kill(upstream, fleet, tmp_path):
    app = fogbugz_mock.make_app(email=EMAIL, password=PASSWORD)
    st = app[fogbugz_mock.STATE]
    up = await upstream(app)
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD)
    services = {"fb": {"upstream": up, "auth": {"scheme": "fogbugz", "email": EMAIL, "password_file": str(pw)}}}
    f = fleet(services)
    url = "/fb/api.asp?cmd=search&q=x"
    async with aiohttp.ClientSession() as s:
        bases = await f.start(2)
        assert await asyncio.gather(*(get(s, b + url) for b in bases for _ in range(20))) == [200] * 40
        assert st.logons == 1
        await f.stop_all()  # with a store, an exit logs nothing off: the token is the fleet's
        assert st.logoffs == 0
        bases = await f.start(2)
        assert await asyncio.gather(*(get(s, b + url) for b in bases for _ in range(20))) == [200] * 40
        assert st.logons == 1  # the restarted fleet reused it
        st.kill_all_tokens()  # every replica now sees "not logged on"
        assert await asyncio.gather(*(get(s, b + url) for b in bases for _ in range(20))) == [200] * 40
        assert st.logons == 2  # one new token for the whole fleet
        # `authproxy logout` from any machine logs the fleet's token off and forgets it
        out = await asyncio.to_thread(run_cli, "logout", "fb", "-c", str(tmp_path / "replica0.yaml"), cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert st.logoffs == 1
        assert await get(s, bases[0] + url) == 200  # a replica then logs on anew, once
        assert st.logons == 3
    for t in st.issued:
        secret(t)
    await f.stop_all()


async def test_app_token_two_replicas_one_login_and_one_obo_token_per_user(upstream, fleet):
    from authproxy.testing import enfix

    app = enfix.make_app(app_token=ENFIX_APP_TOKEN, users={ENFIX_USER: ENFIX_PASSWORD}, login_delay=0.3, obo_delay=0.3)
    st = app[enfix.STATE]
    url = await upstream(app)
    users = ["a1" * 12, "b2" * 12, "c3" * 12]
    auth = {"scheme": "app_token", "app_token": ENFIX_APP_TOKEN, "username": ENFIX_USER, "password": ENFIX_PASSWORD,
            "obo": {"allow_users": users, "seconds_until_expire": 600}}
    f = fleet({"enfix": {"upstream": url, "auth": auth}})
    bases = await f.start(2)
    async with aiohttp.ClientSession() as s:
        calls = [get(s, f"{b}/enfix/api/v1/me/", headers={"X-Authproxy-On-Behalf-Of": u}) for b in bases for u in users for _ in range(30)]
        assert await asyncio.gather(*calls) == [200] * len(calls)
    assert st.logins == 1
    assert dict(st.obo_created) == {u: 1 for u in users}
    await f.stop_all()  # the fleet's tokens are not expired by a replica's exit
    assert st.expired == []
    for value in [*st.tokens, *st.app_tokens]:
        secret(value)


# --------------------------------------------------------------------------- rotating refresh tokens


async def _login(tmp_path: Path, store: dict[str, Any], services: dict[str, Any], name: str) -> None:
    """`authproxy login` (oob) once, for the whole fleet: the refresh token goes to Redis."""
    cfg = load_config_text(yaml.safe_dump({"state_dir": str(tmp_path / "login"), "store": store, "services": services}), env={})
    st = open_store(cfg)
    rt = ServiceRuntime(cfg.services[name], st)
    printed: list[str] = []

    def ask(prompt: str) -> str:
        url = next(m.group(0) for line in printed for m in [URL_RE.search(line)] if m)
        return fetch_oob_code(url)

    try:
        await rt.scheme.login(CliIO(out=printed.append, ask=ask))
    finally:
        await rt.close(revoke=False)
        await st.close()


async def _steady_traffic(bases: Callable[[], list[str]], seconds: float, path: str) -> tuple[int, list[Any], int]:
    """Six clients, each sending requests one after another to the live replicas in
    turn; → (ok, failures, requests lost with a replica that was killed under them)."""
    ok, lost, failed = 0, 0, []
    deadline = time.monotonic() + seconds

    async def one_client(i: int) -> None:
        nonlocal ok, lost
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            n = i
            while time.monotonic() < deadline:
                live = bases()
                target = live[n % len(live)]
                n += 1
                try:
                    status = await get(s, target + path)
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    if target in bases():
                        failed.append(repr(e))
                    else:
                        lost += 1  # a connection to the replica that was just killed
                    continue
                if status == 200:
                    ok += 1
                else:
                    failed.append(status)
                await asyncio.sleep(0.05)

    await asyncio.gather(*(one_client(i) for i in range(6)))
    return ok, failed, lost


def _code_fleet(base: str) -> dict[str, Any]:
    return {"api": code_service(base)}


async def _logged_in_fleet(upstream: Any, fleet: Any, tmp_path: Path, store: dict[str, Any], token_lifetime: int) -> tuple[Any, Fleet, list[str]]:
    """The strict mock, one `authproxy login` for the fleet, then three replicas."""
    app = oauth2_mock.make_app(clients=[oauth2_mock.Client(CLIENT, secret=SECRET)], token_lifetime=token_lifetime)
    services = _code_fleet(await upstream(app))
    await _login(tmp_path, store, services, "api")
    f = fleet(services)
    return app[oauth2_mock.STATE], f, await f.start(3)


def _register(st: Any) -> None:
    for value in [*st.access, *st.refresh, *st.codes]:
        secret(value)


@pytest.mark.timeout(SOAK_SECONDS + 120)
async def test_three_replicas_share_one_rotating_grant_without_reuse(upstream, fleet, tmp_path, store):
    """3 s access tokens, each refresh rotates the refresh token and the mock kills the
    grant if a rotated one is ever presented again: steady traffic through three
    replicas must see no invalid_grant and no failed request."""
    st, f, bases = await _logged_in_fleet(upstream, fleet, tmp_path, store, token_lifetime=3)
    ok, failed, lost = await _steady_traffic(lambda: bases, SOAK_SECONDS, "/api/things")
    _register(st)
    await f.stop_all()
    print(f"soak {SOAK_SECONDS:g}s: {ok} requests ok, {len(failed)} failed, {st.token_requests['refresh_token']} refreshes")
    assert failed == [] and lost == 0 and ok > 0
    assert st.refresh_reuse == 0 and not st.token_errors
    assert st.token_requests["refresh_token"] >= SOAK_SECONDS // 3  # it really rotated, all along
    assert len(st.valid_refresh_tokens()) == 1


@pytest.mark.timeout(max(SOAK_SECONDS, 25.0) + 120)
async def test_a_replica_killed_mid_refresh_loses_the_lock_and_the_grant_survives(upstream, fleet, tmp_path, store):
    """The token endpoint takes 2 s; the replica whose refresh is in flight is killed
    with SIGKILL. Its lock expires, another replica refreshes with the stored refresh
    token (the killed request was never processed), and the others' requests wait
    rather than fail."""
    st, f, bases = await _logged_in_fleet(upstream, fleet, tmp_path, store, token_lifetime=6)
    st.token_delay = 2.0
    pids = {proc.proc.pid: (proc, b) for proc, b in f.replicas}
    live = list(bases)
    killed: list[int] = []

    async def killer() -> None:
        seen = len(st.arrivals)
        # the next token request to arrive is a refresh (the login is done): find its replica
        await wait_for(lambda: len(st.arrivals) > seen, timeout=30, interval=0.02)
        peer = st.arrivals[seen]
        pid = _pid_of_client(peer[1], list(pids))
        assert pid is not None, f"no replica owns {peer}"
        pids[pid][0].signal(signal.SIGKILL)
        live.remove(pids[pid][1])
        killed.append(pid)

    kill = asyncio.ensure_future(killer())
    ok, failed, lost = await _steady_traffic(lambda: live, max(SOAK_SECONDS, 25.0), "/api/things")
    await kill
    from collections import Counter

    print(f"kill -9 mid-refresh: {ok} requests ok, {len(failed)} failed {dict(Counter(map(str, failed)))}, {lost} lost with the killed replica")
    _register(st)
    await f.stop_all()
    assert len(killed) == 1
    assert st.token_requests_abandoned >= 1  # the killed replica's refresh was never processed
    assert st.refresh_reuse == 0 and not st.token_errors
    assert failed == [] and ok > 0


async def test_store_restarted_mid_run_holds_what_it_has_fails_closed_then_recovers(upstream, cli, tmp_path, redis_factory):
    server = redis_factory()
    store = store_config(tmp_path, server.url, "restart:")
    app = oauth2_mock.make_app(clients=[oauth2_mock.Client(CLIENT, secret=SECRET)], token_lifetime=3600)
    st = app[oauth2_mock.STATE]
    base = await upstream(app)
    f = Fleet(tmp_path, cli, store, {"api": oauth2_service(base, client_secret=SECRET)})
    (b,) = await f.start(1)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        assert await get(s, b + "/api/things") == 200
        server.stop()
        assert await get(s, b + "/api/things") == 200  # the token it holds keeps serving
        st.revoke_access_tokens()  # a new one is needed now, and the store is down
        status = await get(s, b + "/api/things")
        assert status == 503
        async with s.get(b + "/-/readyz") as r:
            body = await r.json()
        assert r.status == 503 and body["services"]["api"]["state"] == "backoff"
        assert "store" in body["services"]["api"]["last_error"] and str(server.port) in body["services"]["api"]["last_error"]
        assert sum(st.token_requests.values()) == 1  # fail closed: nothing fetched without the store
        server.restart()

        async def served() -> bool:
            return await get(s, b + "/api/things") == 200

        await wait_for(served, timeout=30, interval=0.2)  # recovered without a restart
        assert sum(st.token_requests.values()) == 2
    for t in st.access:
        secret(t)
    proc = f.replicas[0][0]
    await f.stop_all()
    assert "Traceback" not in proc.log()


async def test_dump_of_the_store_holds_no_clear_text_credential(upstream, cli, tmp_path, redis_factory):
    """Every kind of credential in Redis (an access token, a rotating refresh token, a
    FogBugz logon token), then SAVE: the dump holds none of them in any encoding."""
    server = redis_factory()
    store = store_config(tmp_path, server.url, "dump:")
    oapp = oauth2_mock.make_app(clients=[oauth2_mock.Client(CLIENT, secret=SECRET)], token_lifetime=3600)
    ost = oapp[oauth2_mock.STATE]
    obase = await upstream(oapp)
    fapp = fogbugz_mock.make_app(email=EMAIL, password=PASSWORD)
    fst = fapp[fogbugz_mock.STATE]
    fbase = await upstream(fapp)
    pw = tmp_path / "pw"
    pw.write_text(PASSWORD)
    services = {
        "cc": oauth2_service(obase, client_secret=SECRET),
        "code": code_service(obase),
        "fb": {"upstream": fbase, "auth": {"scheme": "fogbugz", "email": EMAIL, "password_file": str(pw)}},
    }
    await _login(tmp_path, store, services, "code")
    f = Fleet(tmp_path, cli, store, services)
    (b,) = await f.start(1)
    async with aiohttp.ClientSession() as s:
        for path in ("/cc/x", "/code/x", "/fb/api.asp?cmd=search&q=x"):
            assert await get(s, b + path) == 200
    dump = server.dump()
    values = [*ost.access, *ost.refresh, *fst.issued, PASSWORD, SECRET]
    assert len(ost.refresh) >= 1 and len(fst.issued) >= 1
    for v in values:
        secret(v)
        for form in (v, base64.b64encode(v.encode()).decode(), quote(v, safe=""), v[: len(v) // 2 + 4]):
            assert form.encode() not in dump, "a credential in clear text in the Redis dump"
    await f.stop_all()
