"""``workers: N``: the real CLI as a supervising parent and its workers, on loopback.

Every wait polls against a deadline; every process of a group (the parent and
each worker pid it logged) is checked gone at the end of a test and, if a test
failed half-way, killed by pid.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from authproxy import worker_stats
from authproxy.testing import echo
from authproxy.testing import oauth2 as mock
from tests.conftest import CliProcess, free_port, http_get, secret, write_config
from tests.test_systemd import NotifyListener, _activate_argv, _short_dir

STEP = 30.0  # seconds one step may take (start, reload, stop) on a loaded machine
_STARTED = re.compile(r"worker_started pid=(\d+) worker=(\d+)")


def config(tmp_path: Path, port: int, upstream: str = "http://127.0.0.1:1", **extra: Any) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{port}",
        "state_dir": str(tmp_path / "state"),
        "workers": 2,
        "shutdown_timeout": 3,
        "services": {"echo": {"upstream": upstream, "auth": {"scheme": "bearer", "token": secret("workers-s3cret")}}},
        **extra,
    }


class Group:
    """A parent and its workers, as the parent's log names them."""

    def __init__(self, proc: CliProcess) -> None:
        self.proc = proc
        self.parent = proc.proc.pid

    def workers(self) -> dict[int, int]:
        """The latest pid of each worker index."""
        return {int(i): int(p) for p, i in _STARTED.findall(self.proc.log())}

    def all_pids(self) -> set[int]:
        return {self.parent, *(int(p) for p, _ in _STARTED.findall(self.proc.log()))}

    def wait_ready(self) -> dict[int, int]:
        self.proc.wait_log("workers_ready", STEP)
        return self.workers()

    def wait_gone(self, pids: set[int], timeout: float = STEP) -> None:
        deadline = time.monotonic() + timeout
        while alive := {p for p in pids if _alive(p)}:
            if time.monotonic() > deadline:
                raise AssertionError(f"still running: {sorted(alive)}\n{self.proc.log()[-3000:]}")
            self.proc.proc.poll()  # reap the parent if it is ours to reap
            time.sleep(0.02)

    def kill_all(self) -> None:
        for pid in self.all_pids():
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for its parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def healthz(port: int) -> dict[str, Any]:
    """On a fresh connection (urllib sends Connection: close), so any worker may answer."""
    status, body = http_get(f"http://127.0.0.1:{port}/-/healthz")
    assert status == 200
    return json.loads(body)


def pids_answering(port: int, want: set[int], timeout: float = STEP) -> set[int]:
    """Ask on fresh connections until every pid in ``want`` has answered."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while not want <= seen:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {sorted(seen)} answered, wanted {sorted(want)}")
        seen.add(healthz(port)["pid"])
    return seen


@pytest.fixture
def group(tmp_path: Path, cli: Any) -> Any:
    started: list[Group] = []

    def start(cfg: dict[str, Any], env: dict[str, str] | None = None) -> Group:
        run = tmp_path / "run"
        run.mkdir(exist_ok=True)
        path = write_config(tmp_path / "c.yaml", cfg)
        g = Group(cli("run", "-c", str(path), env={"RUNTIME_DIRECTORY": str(run), **(env or {})}))
        started.append(g)
        return g

    yield start
    for g in started:
        g.kill_all()  # after a failure only: a passing test has checked them gone


def stop(g: Group) -> None:
    pids = g.all_pids()
    g.proc.signal(signal.SIGTERM)
    assert g.proc.wait(STEP) == 0, g.proc.log()[-3000:]
    g.wait_gone(pids)


# ---------------------------------------------------------------------------- the group


def test_two_workers_serve_and_sigterm_leaves_nothing(tmp_path, group):
    port = free_port()
    g = group(config(tmp_path, port))
    workers = g.wait_ready()
    assert sorted(workers) == [0, 1]
    for pid in workers.values():
        assert _alive(pid) and _ppid(pid) == g.parent
    pids_answering(port, set(workers.values()))
    run_dirs = list((tmp_path / "run").iterdir())
    assert len(run_dirs) == 1 and run_dirs[0].stat().st_mode & 0o777 == 0o700
    stop(g)
    assert list((tmp_path / "run").iterdir()) == []  # the parent removed its run directory
    log = g.proc.log()
    assert log.count("worker_exited") == 2 and "stopped" in log


def test_unix_listener_shared_and_removed_at_exit(tmp_path, group):
    path = _short_dir(tmp_path) / "ap.sock"
    g = group({**config(tmp_path, 0), "listen": f"unix:{path}"})
    g.wait_ready()
    assert path.stat().st_mode & 0o777 == 0o660
    for _ in range(4):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(path))
            s.sendall(b"GET /-/healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and b'"worker"' in reply
    stop(g)
    assert not path.exists()


class _Activated(CliProcess):
    """``authproxy run`` started the way a systemd .socket unit starts it: the listening
    socket as fd 3, ``LISTEN_FDS=1``, ``LISTEN_PID`` its own pid."""

    def __init__(self, sock: socket.socket, config_path: Path, cwd: Path) -> None:
        import subprocess

        self.log_path = cwd / f"stderr-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        argv = _activate_argv([sock.fileno()], "http", "-m", "authproxy", "run", "-c", str(config_path))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RUNTIME_DIRECTORY": str(cwd / "run")}
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, pass_fds=(sock.fileno(),), stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL)


def test_workers_share_the_socket_systemd_passed(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    (tmp_path / "run").mkdir()
    cfg = write_config(tmp_path / "c.yaml", config(tmp_path, free_port()))  # listen: ignored for the passed socket
    g = Group(_Activated(sock, cfg, tmp_path))
    sock.close()  # only the group holds it now
    try:
        workers = g.wait_ready()
        assert "address=127.0.0.1:%d" % port in g.proc.log()
        pids_answering(port, set(workers.values()))
        stop(g)
    finally:
        g.kill_all()
        g.proc.stop()


def test_killed_worker_comes_back_and_serves(tmp_path, group):
    port = free_port()
    g = group(config(tmp_path, port))
    old = g.wait_ready()
    os.kill(old[0], signal.SIGKILL)
    g.proc.wait_log(f"worker_exited pid={old[0]} worker=0 status=\"signal SIGKILL\"", STEP)
    deadline = time.monotonic() + STEP
    while (new := g.workers())[0] == old[0]:
        assert time.monotonic() < deadline, g.proc.log()
        time.sleep(0.02)
    assert new[1] == old[1] and _ppid(new[0]) == g.parent
    pids_answering(port, {new[0], new[1]})
    stop(g)
    assert not _alive(old[0])


def test_parent_killed_workers_exit_on_their_own(tmp_path, group):
    port = free_port()
    g = group(config(tmp_path, port))
    workers = g.wait_ready()
    os.kill(g.parent, signal.SIGKILL)
    g.proc.wait(STEP)
    g.wait_gone(set(workers.values()))
    assert g.proc.log().count("parent_gone") == 2


def test_sighup_reloads_every_worker(tmp_path, group):
    port = free_port()
    cfg = config(tmp_path, port)
    g = group(cfg)
    workers = g.wait_ready()
    status, _ = http_get(f"http://127.0.0.1:{port}/second/x")
    assert status == 404
    cfg["services"]["second"] = {"upstream": "http://127.0.0.1:1", "auth": {"scheme": "header", "headers": {"X-K": "v"}}}
    write_config(tmp_path / "c.yaml", cfg)
    g.proc.signal(signal.SIGHUP)
    deadline = time.monotonic() + STEP
    while g.proc.log().count("started=second") < 2:
        assert time.monotonic() < deadline, g.proc.log()
        time.sleep(0.02)
    # Every worker now routes /second (502: nothing listens upstream, but no longer 404).
    seen: set[int] = set()
    while seen != set(workers.values()):
        assert time.monotonic() < deadline
        seen.add(healthz(port)["pid"])
        assert http_get(f"http://127.0.0.1:{port}/second/x")[0] == 502
    assert g.workers() == workers  # reloaded, not restarted
    stop(g)


def test_systemd_hears_only_the_parent(tmp_path, group):
    sock_path = _short_dir(tmp_path) / "notify.sock"
    listener = NotifyListener(str(sock_path))
    try:
        port = free_port()
        g = group(config(tmp_path, port), env={"NOTIFY_SOCKET": str(sock_path)})
        deadline = time.monotonic() + STEP
        pid, states = listener.wait_for("READY=1", deadline, g.proc.proc, (g.proc.log_path,))
        assert pid == g.parent
        assert g.proc.log().count("listening") == 2  # every worker listened first
        g.proc.signal(signal.SIGHUP)
        assert listener.wait_for("RELOADING=1", deadline)[0] == g.parent
        assert listener.wait_for("READY=1", deadline)[0] == g.parent
        assert g.proc.log().count("reloaded") == 2  # READY=1 once both had reloaded
        stop(g)
        assert listener.wait_for("STOPPING=1", time.monotonic() + 5)[0] == g.parent
        listener.pending()
        assert {p for p, _ in listener.received} == {g.parent}
        assert sum("READY=1" in s for _, s in listener.received) == 2  # start and the reload
    finally:
        listener.close()


async def test_metrics_are_summed_over_workers_and_survive_a_restart(tmp_path, upstream, group):
    up = await upstream(echo.make_app())
    port = free_port()
    g = group(config(tmp_path, port, up))
    workers = await asyncio.to_thread(g.wait_ready)
    k = 40
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for _ in range(k):
            async with s.get(f"http://127.0.0.1:{port}/echo/x") as r:
                assert r.status == 200

        async def echo_total() -> float:
            async with s.get(f"http://127.0.0.1:{port}/-/metrics") as r:
                text = await r.text()
            m = re.search(r'authproxy_requests_total\{code="200",service="echo"\} (\S+)', text)
            return float(m.group(1)) if m else 0.0

        async def steady(n: int) -> None:
            """``n`` scrapes in a row (on fresh connections: either worker) all say k."""
            deadline = time.monotonic() + STEP
            streak = 0
            while streak < n:
                assert time.monotonic() < deadline, "metrics never summed to k"
                total = await echo_total()
                assert total <= k
                streak = streak + 1 if total == k else 0
                if total != k:
                    await asyncio.sleep(0.05)

        await steady(10)
        os.kill(workers[1], signal.SIGKILL)  # its counts are carried, not lost
        await asyncio.to_thread(g.proc.wait_log, "worker_started pid=", STEP)
        deadline = time.monotonic() + STEP
        while (await asyncio.to_thread(g.workers))[1] == workers[1]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await steady(10)
    await asyncio.to_thread(stop, g)


async def test_readyz_reports_a_service_in_its_worst_state(tmp_path, group):
    port = free_port()
    g = group(config(tmp_path, port))
    await asyncio.to_thread(g.wait_ready)
    assert (await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/-/readyz"))[0] == 200
    # A third worker's latest snapshot, as the workers write them: its service is in error.
    (run_dir,) = (tmp_path / "run").iterdir()
    broken = {"pid": 999999, "worker": 2, "metrics": {}, "services": {"echo": {"state": "error", "expires_in": None, "last_error": "refused"}}}
    (run_dir / "w-999999.json").write_text(json.dumps(broken))
    for _ in range(6):  # whichever worker answers
        status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/-/readyz")
        assert status == 503 and json.loads(body)["services"]["echo"]["state"] == "error"
    (run_dir / "w-999999.json").unlink()
    assert (await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/-/readyz"))[0] == 200
    await asyncio.to_thread(stop, g)


async def test_200_concurrent_first_requests_make_one_token_request(tmp_path, upstream, group):
    """Needs the credential manager's shared state dir (one fetch for every worker)."""
    app = mock.make_app(clients=[mock.Client("workers-client", secret=secret("workers-client-s3cret"))])
    st = app[mock.STATE]
    st.token_delay = 0.3  # every worker is waiting while the one request is out
    base = await upstream(app)
    port = free_port()
    svc = {"upstream": base + mock.API_PATH, "auth": {"scheme": "oauth2", "token_url": base + mock.TOKEN_PATH, "client_id": "workers-client", "client_secret": "workers-client-s3cret"}}
    g = group({**config(tmp_path, port), "services": {"api": svc}})
    await asyncio.to_thread(g.proc.wait_log, "supervising", STEP)  # the parent listens: requests queue
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as s:

            async def one(i: int) -> int:
                async with s.get(f"http://127.0.0.1:{port}/api/item/{i}", timeout=aiohttp.ClientTimeout(total=STEP)) as r:
                    await r.read()
                    return r.status

            statuses = await asyncio.gather(*(one(i) for i in range(200)))
        assert statuses == [200] * 200
        assert sum(st.token_requests.values()) == 1, dict(st.token_requests)
    finally:
        for value in [*st.access, *st.refresh]:
            secret(value)
    await asyncio.to_thread(stop, g)


# ---------------------------------------------------------------------------- the pieces


def test_worst_state_order_and_soonest_expiry():
    a = {"state": "ready", "expires_in": 300, "last_error": None}
    for worse in ("pending", "backoff", "login_required", "error"):
        b = {"state": worse, "expires_in": 100, "last_error": worse}
        assert worker_stats.worst(a, b)["state"] == worse == worker_stats.worst(b, a)["state"]
        a = worker_stats.worst(a, b)
    assert a == {"state": "error", "expires_in": 100, "last_error": "error"}


def test_retired_counts_are_carried_exactly_once(tmp_path):
    snap = {"requests": [["s", 200, 3]], "hist": {"s": [1.0, 2.0]}, "fetches": [["s", "ok", 1]], "retries": []}
    (tmp_path / "w-11.json").write_text(json.dumps({"pid": 11, "metrics": snap, "services": {}}))
    (tmp_path / "w-12.json").write_text(json.dumps({"pid": 12, "metrics": snap, "services": {}}))
    live, retired = worker_stats.read_all(str(tmp_path))
    assert len(live) == 2 and retired == {}
    worker_stats.retire(str(tmp_path), 11)
    assert not (tmp_path / "w-11.json").exists()
    live, retired = worker_stats.read_all(str(tmp_path))
    total = worker_stats.merge(retired, live[0]["metrics"])
    assert total["requests"] == [["s", 200, 6]] and total["hist"]["s"] == [2.0, 4.0] and total["fetches"] == [["s", "ok", 2]]
    # A reader that listed w-11 before it went, reading retired.json after: not counted twice.
    (tmp_path / "w-11.json").write_text(json.dumps({"pid": 11, "metrics": snap, "services": {}}))
    live, _ = worker_stats.read_all(str(tmp_path))
    assert [s["pid"] for s in live] == [12]
