"""A real ``redis-server`` for tests: a free loopback port, no persistence, stopped by PID.

Debian's ``redis-server`` package is installed once when it is missing and this
runs as root with apt-get (as on CI); anywhere else the tests that need it are
skipped with the reason. Waiting is always "poll until it answers, with a
deadline", never a fixed sleep.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

START_TIMEOUT = 15.0  # seconds for a started server to answer PING
STOP_TIMEOUT = 10.0  # seconds for SIGTERM before SIGKILL
_install_tried = False


def redis_server_binary() -> str:
    """The path of ``redis-server``, installing Debian's package once if we may; else skip."""
    global _install_tried
    found = shutil.which("redis-server")
    if found:
        return found
    if not _install_tried and os.geteuid() == 0 and shutil.which("apt-get"):
        _install_tried = True
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], env=env, capture_output=True, timeout=600)
        found = shutil.which("redis-server") or (os.path.exists("/usr/bin/redis-server") and "/usr/bin/redis-server") or None
        if found:
            return found
    pytest.skip("redis-server is not installed (Debian package redis-server; installed automatically only as root with apt-get)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One ``redis-server`` process in ``workdir`` on a loopback port.

    ``url`` is ``redis://127.0.0.1:PORT/0`` (no password in it: pass ``password``
    to the client separately, as the store config does); with ``tls=(cert, key)``
    files it is ``rediss://`` on a TLS-only port; ``unix_url`` is the same server
    on a unix socket."""

    def __init__(self, workdir: Path, password: str | None = None, tls: tuple[str, str] | None = None) -> None:
        self.binary = redis_server_binary()
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.tls = tls
        self.port = _free_port()
        self.url = f"{'rediss' if tls else 'redis'}://127.0.0.1:{self.port}/0"
        self.socket_path = self.dir / "redis.sock"
        self.unix_url = f"unix://{self.socket_path}?db=0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "redis.log"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> "RedisServer":
        args = [
            self.binary, "--bind", "127.0.0.1", "--save", "",
            "--unixsocket", str(self.socket_path), "--unixsocketperm", "700",
            "--appendonly", "no", "--dir", str(self.dir), "--dbfilename", "dump.rdb",
            "--daemonize", "no", "--logfile", str(self.log_path), "--protected-mode", "yes",
        ]  # fmt: skip
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.tls is not None:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls[0],
                     "--tls-key-file", self.tls[1], "--tls-auth-clients", "no"]  # fmt: skip
        else:
            args += ["--port", str(self.port)]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode} at start:\n{self._log_tail()}")
            try:
                reply = self.command("PING")
                if reply.startswith((b"+PONG", b"-NOAUTH")):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT}s:\n{self._log_tail()}")
            time.sleep(0.01)

    def stop(self) -> None:
        """SIGTERM to our PID, SIGKILL after a deadline."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self.proc = None

    def restart(self) -> "RedisServer":
        """Stop and start again on the same port (what "Redis restarted" looks like to
        clients: every connection dropped, data gone since nothing is persisted)."""
        self.stop()
        return self.start()

    def command(self, *args: str | bytes, timeout: float = 2.0) -> bytes:
        """Send one command (after AUTH when there is a password); the first reply line."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as raw:
            s = raw
            if self.tls is not None:  # this is the test's own server: no need to check it
                ctx = ssl.create_default_context()
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                s = ctx.wrap_socket(raw)
            f = s.makefile("rb")
            if self.password is not None:
                s.sendall(_resp("AUTH", self.password))
                f.readline()
            s.sendall(_resp(*args))
            return f.readline()

    def dump(self) -> bytes:
        """SAVE, then the bytes of dump.rdb: what a backup of this Redis would hold."""
        reply = self.command("SAVE", timeout=30)
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"SAVE failed: {reply!r}")
        return (self.dir / "dump.rdb").read_bytes()

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"


def _resp(*args: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)
