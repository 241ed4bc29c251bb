"""``workers: N``: a supervising parent and N worker processes on one listener.

The parent opens the listener once (TCP, ``unix:``, or the sockets systemd
passed) and starts N ``python -m authproxy run -c FILE`` children that inherit
it; every worker accepts on that one socket. One shared socket rather than a
socket per worker with ``SO_REUSEPORT``: the kernel would keep hashing new
connections to a dead worker's socket until its successor is up (seconds, with
backoff), while a shared socket's backlog is drained by whichever worker is
alive — and a unix socket or a socket systemd passed is one socket anyway.

The parent serves nothing. It restarts a worker that dies (backoff 1 s doubling
to 30 s, back to 1 s once a worker has run 60 s), forwards SIGHUP and
SIGTERM/SIGINT, and is the only process systemd hears from: workers have no
``NOTIFY_SOCKET``; their notifications (:func:`authproxy.systemd.notify`) go to
the parent over a socket pair, and the parent sends ``READY=1`` once every
worker listens, ``RELOADING=1``/``READY=1`` around a reload of them all and
``STOPPING=1``. The same socket pair tells a worker that its parent is gone
(end of file, e.g. after ``kill -9``): it then shuts down by itself.

A worker learns all this from ``AUTHPROXY_WORKER`` (JSON: index, descriptors,
run directory), removed from its environment at once, so no user-visible flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from authproxy import systemd, worker_stats
from authproxy.config import Config, ConfigError, load_config
from authproxy.observe import log_event

log = logging.getLogger("authproxy.workers")

ENV = "AUTHPROXY_WORKER"
BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_RESET = 1.0, 30.0, 60.0  # seconds
RELOAD_WAIT = 60.0  # seconds the parent waits for every worker's reload before READY=1
KILL_GRACE = 2.0  # seconds past a worker's own shutdown budget before SIGKILL
_REVOKE_BUDGET = 5.0  # the workers' own revoke budget (runtime.REVOKE_BUDGET)


# ---------------------------------------------------------------------------- the worker


def is_worker() -> bool:
    """True in a process the supervisor started (checked before ``workers: N`` is obeyed)."""
    return ENV in os.environ


async def serve_worker(config: Config, config_path: str) -> int:
    """A worker: serve on the inherited sockets until SIGTERM/SIGINT or the parent vanishes."""
    from authproxy.proxy import listen
    from authproxy.proxy.app import ProxyServer, serve

    spec = json.loads(os.environ.pop(ENV))
    control = socket.socket(fileno=spec["control"])
    control.set_inheritable(False)
    listen.handed[:] = [_adopt(fd) for fd in spec["listen"]]

    def tell_parent(states: tuple[str, ...]) -> bool:
        try:
            control.sendall((json.dumps(list(states)) + "\n").encode())
            return True
        except OSError:
            return False

    systemd.relay = tell_parent
    server = ProxyServer(config)
    stats = worker_stats.WorkerStats(spec["run_dir"], spec["index"], server)
    worker_stats.current = stats
    stop = asyncio.Event()
    orphaned = False
    loop = asyncio.get_running_loop()

    def on_control() -> None:
        nonlocal orphaned
        try:
            data = control.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the parent is gone: no one would restart, reload or stop us
            loop.remove_reader(control.fileno())
            orphaned = True
            log_event(log, logging.WARNING, "parent_gone", action="shutdown")
            stop.set()

    control.setblocking(False)
    loop.add_reader(control.fileno(), on_control)
    writer = asyncio.ensure_future(stats.run())
    try:
        return await serve(config, config_path, stop, server=server)
    finally:
        writer.cancel()
        with contextlib.suppress(BaseException):
            await writer
        with contextlib.suppress(Exception):
            loop.remove_reader(control.fileno())
        if not orphaned:
            with contextlib.suppress(OSError):
                stats.write()  # the final counts, for the parent to carry
        stats.close(orphaned)
        systemd.relay = None
        control.close()


def _adopt(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(False)  # not for the programs a k_command runs
    sock.setblocking(False)
    return sock


# ---------------------------------------------------------------------------- the parent


@dataclass
class _Worker:
    index: int
    backoff: float = BACKOFF_FIRST
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    ready: bool = False  # sent READY=1 (its signal handlers are in: a SIGHUP is safe)
    hup_due: bool = False  # a reload it has yet to be told about (it was not ready)
    reloading: bool = False  # told to reload, no READY=1 since


class Supervisor:
    """The parent process of ``workers: N``."""

    def __init__(self, config: Config, config_path: str) -> None:
        self.config = config
        self.path = os.path.abspath(config_path)
        self.workers = [_Worker(i) for i in range(config.workers)]
        self.sockets: list[socket.socket] = []
        self.run_dir = ""
        self.stopping = False
        self.announced = False  # READY=1 sent to systemd
        self._reload_done: asyncio.Event | None = None
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._keepers: list[asyncio.Task[None]] = []
        self._made_unix = False

    async def run(self) -> int:
        from authproxy.proxy.listen import bind_listeners

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn_task(self._reload()))
        try:
            passed = bool(os.environ.get("LISTEN_FDS"))
            try:
                self.sockets = bind_listeners(self.config)
            except OSError as e:
                log_event(log, logging.ERROR, "listen_failed", listen=str(self.config.listen), error=e.strerror or str(e))
                return 1
            self._made_unix = self.config.listen.kind == "unix" and not passed
            self.run_dir = tempfile.mkdtemp(prefix="authproxy-workers-", dir=os.environ.get("RUNTIME_DIRECTORY") or None)
            log_event(log, logging.INFO, "supervising", workers=len(self.workers), address=", ".join(_address(s) for s in self.sockets))
            self._keepers = [asyncio.ensure_future(self._keep(w)) for w in self.workers]
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        await self._shutdown()
        return 0

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep(self, w: _Worker) -> None:
        """Run worker ``w`` until the parent stops, restarting it with backoff."""
        while not self.stopping:
            try:
                await self._start(w)
            except OSError as e:
                delay = _next_delay(w)
                log_event(log, logging.ERROR, "worker_start_failed", worker=w.index, error=e.strerror or str(e), restart_in=delay)
            else:
                status = await w.proc.wait()  # type: ignore[union-attr]
                delay = self._exited(w, status)
            if self.stopping:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def _start(self, w: _Worker) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            fds = [s.fileno() for s in self.sockets]
            env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")}
            env[ENV] = json.dumps({"index": w.index, "control": theirs.fileno(), "listen": fds, "run_dir": self.run_dir})
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "authproxy", "run", "-c", self.path,
                stdin=asyncio.subprocess.DEVNULL, env=env, pass_fds=[*fds, theirs.fileno()],
                # Its own session: a terminal's Ctrl-C (sent to the whole foreground group) must
                # not reach a worker besides the parent's forwarded SIGTERM — a second signal
                # during its drain would kill it. The parent forwards every signal itself.
                start_new_session=True,
            )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        w.started, w.ready, w.reloading = time.monotonic(), False, False
        w.hup_due = self._reload_done is not None and not self._reload_done.is_set()
        log_event(log, logging.INFO, "worker_started", pid=w.proc.pid, worker=w.index)
        if self.stopping:  # SIGTERM came while it was being started
            self._signal(w, signal.SIGTERM)
        self._spawn_task(self._listen_to(w, w.proc, mine))

    async def _listen_to(self, w: _Worker, proc: asyncio.subprocess.Process, sock: socket.socket) -> None:
        """Read worker ``w``'s notifications until it exits. Holding ``sock`` open is what
        tells the worker its parent is alive."""
        try:
            reader, writer = await asyncio.open_unix_connection(sock=sock)
        except OSError:
            sock.close()
            return
        try:
            while line := await reader.readline():
                if w.proc is not proc:
                    break
                with contextlib.suppress(ValueError):
                    self._notified(w, json.loads(line))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    def _notified(self, w: _Worker, states: list[str]) -> None:
        if "STOPPING=1" in states:
            w.ready = False
        if "READY=1" not in states or w.proc is None:
            return
        w.ready = True
        if w.hup_due:  # a reload came while it started: it may have read the old file
            w.hup_due, w.reloading = False, True
            self._signal(w, signal.SIGHUP)
        elif w.reloading and "RELOADING=1" not in states:
            w.reloading = False
        self._check_ready()

    def _check_ready(self) -> None:
        if not self.announced and all(w.ready for w in self.workers):
            self.announced = True
            log_event(log, logging.INFO, "workers_ready", workers=len(self.workers), pids=",".join(str(w.proc.pid) for w in self.workers if w.proc))
            systemd.notify("READY=1", f"STATUS=serving with {len(self.workers)} workers")
        done = self._reload_done
        if done is not None and not any(w.reloading or w.hup_due for w in self.workers):
            done.set()

    def _exited(self, w: _Worker, status: int) -> float:
        """Worker ``w`` has exited: log it, carry its counters; returns the restart delay."""
        delay = _next_delay(w)
        pid = w.proc.pid if w.proc else None
        w.proc, w.ready, w.reloading, w.hup_due = None, False, False, False
        how = f"signal {signal.Signals(-status).name}" if status < 0 else f"exit {status}"
        level = logging.INFO if self.stopping and status in (0, -signal.SIGTERM) else logging.WARNING
        log_event(log, level, "worker_exited", pid=pid, worker=w.index, status=how, restart_in=None if self.stopping else delay)
        if pid is not None and self.run_dir:
            with contextlib.suppress(OSError):
                worker_stats.retire(self.run_dir, pid)
        self._check_ready()
        return delay

    def _signal(self, w: _Worker, sig: int) -> None:
        if w.proc is not None and w.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(sig)

    async def _reload(self) -> None:
        """SIGHUP: every worker reloads; systemd hears READY=1 once they all have."""
        if self.stopping:
            return
        try:
            new = await asyncio.to_thread(load_config, self.path)
        except ConfigError:
            new = None  # each worker logs the errors and keeps its config
        if new is not None:
            if new.workers != self.config.workers:
                log_event(log, logging.WARNING, "reload_workers_ignored", reason="changing workers needs a restart", workers=self.config.workers)
            self.config = _keep_workers(new, self.config.workers)
        systemd.reloading()
        done = self._reload_done = asyncio.Event()
        for w in self.workers:
            if w.ready:
                w.reloading = True
                self._signal(w, signal.SIGHUP)
            elif w.proc is not None:
                w.hup_due = True  # its handler may not be in yet: told once it is ready
        self._check_ready()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), RELOAD_WAIT)
        if self._reload_done is done:
            systemd.notify("READY=1")

    async def _shutdown(self) -> None:
        """SIGTERM/SIGINT: every worker drains (shutdown_timeout), stragglers are killed, then
        the logoff/expire steps run once for them all (without a store)."""
        self.stopping = True
        systemd.notify("STOPPING=1")
        log_event(log, logging.INFO, "stopping", workers=sum(w.proc is not None for w in self.workers))
        for w in self.workers:
            self._signal(w, signal.SIGTERM)
        # A keeper returns once its worker has exited (one being started is told in _start).
        budget = self.config.shutdown_timeout + 2 * _REVOKE_BUDGET + KILL_GRACE
        _, pending = await asyncio.wait(self._keepers, timeout=budget) if self._keepers else (set(), set())
        if pending:
            log_event(log, logging.WARNING, "shutdown_forced", after=budget, workers=len(pending))
            for w in self.workers:
                self._signal(w, signal.SIGKILL)
            await asyncio.wait(pending, timeout=5)
        for t in [*pending, *self._tasks]:  # readers and a reload waiting on workers that are gone
            t.cancel()
        if self.config.store is None:
            await _revoke_at_exit(self.config)
        for s in self.sockets:
            s.close()
        if self._made_unix:
            with contextlib.suppress(OSError):
                os.unlink(self.config.listen.path)
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        log_event(log, logging.INFO, "stopped")


async def _revoke_at_exit(config: Config) -> None:
    """The logoff/expire steps for the credentials every worker recorded in the state dir,
    bounded (the lead's runtime.revoke_at_exit; absent in older trees)."""
    try:
        from authproxy.runtime import revoke_at_exit
    except ImportError:
        return
    try:
        await asyncio.wait_for(revoke_at_exit(config), _REVOKE_BUDGET + 1)
    except asyncio.TimeoutError:
        log_event(log, logging.WARNING, "revoke_timeout", budget=_REVOKE_BUDGET)
    except Exception as e:  # never a reason not to exit 0 after a clean stop
        log_event(log, logging.WARNING, "revoke_failed", error=type(e).__name__)


def _next_delay(w: _Worker) -> float:
    """Backoff before restarting ``w``: 1 s doubling to 30 s, from 1 s again once it ran 60 s."""
    if time.monotonic() - w.started >= BACKOFF_RESET:
        w.backoff = BACKOFF_FIRST
    delay, w.backoff = w.backoff, min(w.backoff * 2, BACKOFF_MAX)
    return delay


def _keep_workers(config: Config, workers: int) -> Config:
    import dataclasses

    return dataclasses.replace(config, workers=workers)


def _address(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        return f"[{name[0]}]:{name[1]}" if ":" in name[0] else f"{name[0]}:{name[1]}"
    return f"unix:{name.decode() if isinstance(name, bytes) else name}"


async def supervise(config: Config, config_path: str) -> int:
    """``authproxy run`` with ``workers`` > 1: returns the exit code."""
    return await Supervisor(config, config_path).run()
