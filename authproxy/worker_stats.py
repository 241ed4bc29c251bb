"""What one worker of ``workers: N`` knows about the others: summed metrics, worst readiness.

A scrape or a probe reaches one worker, picked by whoever accepts first, so
each worker must answer for the whole group. The workers share no memory;
instead each writes a snapshot of its counters and of its services' states
to a private run directory (0700, made and removed by the supervising parent)
about once a second and at every scrape, and the worker that is asked reads
everyone's latest one. Files rather than a socket to the parent: a scrape
costs a few small reads, and no process waits on another's event loop.

Counters never go backwards when a worker dies: the parent folds the dead
worker's last snapshot into ``retired.json`` (which lists the pids it holds)
before it removes the worker's file. What the dead worker counted after its
last snapshot (under a second's worth) is lost, never counted twice.

Readiness: a service is reported in its worst state over the live workers,
in the order ``ready < pending < backoff < login_required < error``: an
``error`` (a refused credential) needs an operator, ``login_required`` a
person, ``backoff`` only time, so the least recoverable state wins and a probe
sees a broken worker. Another worker's state is at most ~1 s old.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from authproxy.proxy.app import ProxyServer

__all__ = ["WorkerStats", "current", "merge", "retire", "worst"]

SNAPSHOT_EVERY = 1.0  # seconds between a worker's snapshots (and at every scrape)
RETIRED = "retired.json"
_KEEP_PIDS = 256  # pids remembered in retired.json (a reader that misses one retries)
STATE_ORDER = {"ready": 0, "pending": 1, "backoff": 2, "login_required": 3, "error": 4}

#: Set in a worker process (``workers: N``): the endpoints answer for every worker.
current: WorkerStats | None = None


class WorkerStats:
    """One worker's side: writes its snapshots, reads the others' when asked."""

    def __init__(self, run_dir: str, index: int, server: ProxyServer) -> None:
        self.run_dir = run_dir
        self.index = index
        self.pid = os.getpid()
        self.server = server  # its runtimes and metrics change on reload: read them each time
        self._path = os.path.join(run_dir, f"w-{self.pid}.json")

    def snapshot(self) -> dict[str, Any]:
        services = {}
        for name, rt in self.server.runtimes.items():
            st = rt.creds.status()
            services[name] = {"state": st.state, "expires_in": st.expires_in, "last_error": st.last_error}
        return {"pid": self.pid, "worker": self.index, "metrics": self.server.metrics.snapshot(), "services": services}

    def write(self) -> dict[str, Any]:
        """Write this worker's snapshot now (atomically); returns it."""
        snap = self.snapshot()
        _write_json(self._path, snap)
        return snap

    async def run(self) -> None:
        """Write a snapshot about once a second until cancelled; a failed write is retried
        at the next tick (the endpoints then show this worker's previous one)."""
        while True:
            with contextlib.suppress(OSError):
                self.write()
            await asyncio.sleep(SNAPSHOT_EVERY)

    def readiness(self) -> dict[str, dict[str, Any]]:
        """Every service in its worst state over the live workers (this one fresh)."""
        own = self.write()
        live, _ = read_all(self.run_dir, exclude=self.pid)
        merged: dict[str, dict[str, Any]] = {}
        for snap in (own, *live):
            for name, st in snap.get("services", {}).items():
                merged[name] = worst(merged.get(name), st)
        return merged

    def render_metrics(self) -> bytes:
        """The Prometheus text of every worker's counters summed, the dead ones' included."""
        from authproxy.metrics import Metrics

        own = self.write()
        live, retired = read_all(self.run_dir, exclude=self.pid)
        total = retired
        for snap in (own, *live):
            total = merge(total, snap.get("metrics", {}))
        m = Metrics()
        m.absorb(total)
        states: dict[str, dict[str, Any]] = {}
        for snap in (own, *live):
            for name, st in snap.get("services", {}).items():
                states[name] = worst(states.get(name), st)
        for name, st in states.items():
            m.set_ready(name, st["state"] == "ready")
        return m.render()

    def close(self, orphaned: bool) -> None:
        """At exit. A worker whose parent vanished (kill -9) also tidies the run directory
        the parent would have removed: the last worker out removes it."""
        if not orphaned:
            return  # the parent retires our snapshot (our counters stay in the sum)
        with contextlib.suppress(OSError):
            os.unlink(self._path)
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.run_dir, RETIRED))
        with contextlib.suppress(OSError):
            os.rmdir(self.run_dir)


def worst(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """The worse of two states of one service (see the module's order); ``expires_in``
    is the soonest either worker's credential expires."""
    if a is None:
        return dict(b)
    pick = b if STATE_ORDER.get(b.get("state", ""), 2) > STATE_ORDER.get(a.get("state", ""), 2) else a
    out = dict(pick)
    times = [t for t in (a.get("expires_in"), b.get("expires_in")) if t is not None]
    out["expires_in"] = min(times) if times else None
    return out


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The sum of two metrics snapshots (:meth:`Metrics.snapshot`'s shape)."""
    out: dict[str, Any] = {}
    for key in ("requests", "fetches", "retries"):
        sums: dict[tuple[Any, ...], float] = {}
        for row in (*a.get(key, ()), *b.get(key, ())):
            k = tuple(row[:-1])
            sums[k] = sums.get(k, 0) + row[-1]
        out[key] = [[*k, n] for k, n in sorted(sums.items())]
    hist: dict[str, list[float]] = {}
    for src in (a.get("hist", {}), b.get("hist", {})):
        for service, h in src.items():
            have = hist.get(service)
            hist[service] = list(h) if have is None else [x + y for x, y in zip(have, h)]
    out["hist"] = hist
    return out


def read_all(run_dir: str, exclude: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The live workers' latest snapshots (but ``exclude``'s) and the retired workers' sum.

    The directory is listed before ``retired.json`` is read, and the parent writes
    ``retired.json`` before it removes a dead worker's file: so a file that is listed
    is either still there or already in the retired sum we read — unless it vanished
    between the two reads, and then we read again."""
    for _ in range(5):
        try:
            names = [n for n in os.listdir(run_dir) if n.startswith("w-") and n.endswith(".json")]
        except OSError:
            return [], {}
        retired = _read_json(os.path.join(run_dir, RETIRED)) or {}
        gone = set(retired.get("pids", ()))
        live: list[dict[str, Any]] = []
        vanished = False
        for name in names:
            pid = int(name[2:-5]) if name[2:-5].isdigit() else -1
            if pid == exclude or pid in gone:
                continue
            snap = _read_json(os.path.join(run_dir, name))
            if snap is None:
                vanished = True
                break
            live.append(snap)
        if not vanished:
            return live, retired.get("metrics", {})
    return live, retired.get("metrics", {})


def retire(run_dir: str, pid: int) -> None:
    """The parent, once worker ``pid`` has exited: its last counters join the retired sum,
    then its snapshot goes (so its services' states no longer count for readiness)."""
    path = os.path.join(run_dir, f"w-{pid}.json")
    snap = _read_json(path)
    if snap is not None:
        rpath = os.path.join(run_dir, RETIRED)
        retired = _read_json(rpath) or {}
        pids = [*retired.get("pids", ()), pid][-_KEEP_PIDS:]
        _write_json(rpath, {"pids": pids, "metrics": merge(retired.get("metrics", {}), snap.get("metrics", {}))})
    with contextlib.suppress(OSError):
        os.unlink(path)


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _write_json(path: str, doc: dict[str, Any]) -> None:
    tmp = f"{path}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(doc, separators=(",", ":")).encode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
