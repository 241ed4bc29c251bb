"""systemd integration: sd_notify datagrams, socket activation, the unit file,
and the real CLI speaking the notify protocol through start, reload and stop.

Everything runs on loopback and AF_UNIX sockets in temporary directories; every
wait is a poll against a deadline, and every subprocess is killed in a finally.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from authproxy import systemd

REPO = Path(__file__).resolve().parent.parent
UNIT_DIR = REPO / "systemd"

# How long the real CLI may take for one step (start, reload, stop). Generous
# for a loaded CI machine; a healthy run takes well under a second per step.
STEP_TIMEOUT = 30.0


# --------------------------------------------------------------------------
# helpers


def _short_dir(tmp_path: Path) -> Path:
    """A directory whose socket paths fit in sun_path (108 bytes)."""
    if len(str(tmp_path)) < 80:
        return tmp_path
    return Path(tempfile.mkdtemp(prefix="ap-"))


class NotifyListener:
    """The manager's end of $NOTIFY_SOCKET: a bound AF_UNIX datagram socket
    with SO_PASSCRED, so each datagram's sender pid is known (systemd uses it
    for NotifyAccess=main)."""

    def __init__(self, address: str | bytes):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.received: list[tuple[int | None, list[str]]] = []
        self._next = 0

    def close(self) -> None:
        self.sock.close()

    def _recv(self, timeout: float) -> tuple[int | None, list[str]] | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(
                65536, socket.CMSG_SPACE(struct.calcsize("3i")))
        except (TimeoutError, socket.timeout, BlockingIOError):
            return None
        pid = None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[:struct.calcsize("3i")])[0]
        item = (pid, data.decode().split("\n"))
        self.received.append(item)
        return item

    def pending(self) -> list[list[str]]:
        """Datagrams already queued, without waiting."""
        out = []
        while (item := self._recv(0.001)) is not None:
            out.append(item[1])
        return out

    def wait_for(self, state: str, deadline: float,
                 proc: subprocess.Popen | None = None,
                 log_files: tuple[Path, ...] = ()) -> tuple[int | None, list[str]]:
        """Return the next datagram (after those earlier calls returned or
        skipped) with the line ``state``, polling until ``deadline``
        (time.monotonic()); fail early if ``proc`` exits without sending it."""
        while True:
            while self._next < len(self.received):
                item = self.received[self._next]
                self._next += 1
                if state in item[1]:
                    return item
            if proc is not None and proc.poll() is not None:
                if self.pending():
                    continue  # it sent more before exiting: look at that first
                how = f"exited ({proc.returncode})"
                if proc.returncode < 0:
                    how = (f"was killed by {signal.Signals(-proc.returncode).name} (the default "
                           f"action: was READY=1 sent before its handler was installed?)")
                pytest.fail(f"process {how} before sending {state!r}; "
                            f"got {self.received!r}" + _logs(log_files))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no {state!r} from NOTIFY_SOCKET in time; got {self.received!r}"
                            + _logs(log_files))
            self._recv(min(remaining, 0.2))


def _logs(files: tuple[Path, ...]) -> str:
    text = ""
    for f in files:
        if f.exists():
            text += f"\n--- {f.name} ---\n" + f.read_text(errors="replace")[-4000:]
    return text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET without any proxy from the environment (http_proxy would capture
    even 127.0.0.1)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# --------------------------------------------------------------------------
# notify()


@pytest.fixture
def listener(tmp_path, monkeypatch):
    path = _short_dir(tmp_path) / "notify.sock"
    lst = NotifyListener(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield lst
    lst.close()


def test_notify_unset_does_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.reloading() is False


def test_notify_sends_one_datagram(listener):
    assert systemd.notify("READY=1", "STATUS=serving 3 services") is True
    pid, lines = listener.wait_for("READY=1", time.monotonic() + 5)
    assert lines == ["READY=1", "STATUS=serving 3 services"]
    assert pid == os.getpid()
    assert listener.pending() == []


def test_notify_each_call_is_its_own_datagram(listener):
    assert systemd.notify("READY=1")
    assert systemd.notify("STOPPING=1")
    listener.wait_for("STOPPING=1", time.monotonic() + 5)
    assert [lines for _pid, lines in listener.received] == [["READY=1"], ["STOPPING=1"]]


def test_notify_newline_in_state_cannot_inject_assignments(listener):
    assert systemd.notify("STATUS=bad\nREADY=1")
    _pid, lines = listener.wait_for("STATUS=bad READY=1", time.monotonic() + 5)
    assert lines == ["STATUS=bad READY=1"]


def test_notify_abstract_socket(monkeypatch):
    name = f"authproxy-test-{os.getpid()}-{secrets.token_hex(8)}"
    lst = NotifyListener(b"\0" + name.encode())
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("READY=1") is True
        _pid, lines = lst.wait_for("READY=1", time.monotonic() + 5)
        assert lines == ["READY=1"]
    finally:
        lst.close()


def test_reloading_carries_monotonic_usec(listener):
    before = _monotonic_usec()
    assert systemd.reloading() is True
    after = _monotonic_usec()
    _pid, lines = listener.wait_for("RELOADING=1", time.monotonic() + 5)
    assert len(lines) == 2 and lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_notify_send_error_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(_short_dir(tmp_path) / "nobody-listens.sock"))
    with caplog.at_level(logging.WARNING, logger="authproxy.systemd"):
        assert systemd.notify("READY=1") is False
    assert any(r.name == "authproxy.systemd" and r.levelno == logging.WARNING
               for r in caplog.records)


def test_notify_rejects_relative_path(monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/notify.sock")
    with caplog.at_level(logging.WARNING, logger="authproxy.systemd"):
        assert systemd.notify("READY=1") is False
    assert caplog.records


# --------------------------------------------------------------------------
# listen_fds()


def _set_listen_env(monkeypatch, pid: str, fds: str, names: str | None = "http") -> None:
    monkeypatch.setenv("LISTEN_PID", pid)
    monkeypatch.setenv("LISTEN_FDS", fds)
    if names is not None:
        monkeypatch.setenv("LISTEN_FDNAMES", names)


def _assert_listen_env_gone() -> None:
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        assert var not in os.environ, var


def test_listen_fds_unset(monkeypatch):
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(var, raising=False)
    assert systemd.listen_fds() == []


def test_listen_fds_for_another_pid_are_not_taken(monkeypatch):
    # The descriptors were meant for some other process (e.g. our parent):
    # take none, but still scrub the variables.
    _set_listen_env(monkeypatch, str(os.getpid() + 1), "1")
    assert systemd.listen_fds() == []
    _assert_listen_env_gone()


def test_listen_fds_malformed(monkeypatch, caplog):
    _set_listen_env(monkeypatch, str(os.getpid()), "lots")
    with caplog.at_level(logging.WARNING, logger="authproxy.systemd"):
        assert systemd.listen_fds() == []
    _assert_listen_env_gone()
    assert caplog.records


def test_listen_fds_zero(monkeypatch):
    _set_listen_env(monkeypatch, str(os.getpid()), "0", names=None)
    assert systemd.listen_fds() == []
    _assert_listen_env_gone()


# Started as `python -c WRAPPER FDS NAMES ARGV...`: moves the inherited
# descriptors FDS (comma-separated) to 3, 4, ... exactly as systemd does,
# sets LISTEN_PID to its own pid, LISTEN_FDS and LISTEN_FDNAMES, and execs
# ARGV: exec keeps the pid, so LISTEN_PID names the process that ends up
# running ARGV -- which is how systemd starts a socket-activated service.
ACTIVATE = r"""
import fcntl, os, sys
fds = [int(x) for x in sys.argv[1].split(",")]
# Park the sources above the target range first so no dup2 clobbers one.
parked = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(parked):
    os.dup2(fd, 3 + i, inheritable=True)
    os.close(fd)
env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)),
           LISTEN_FDNAMES=sys.argv[2])
os.execve(sys.executable, [sys.executable] + sys.argv[3:], env)
"""

# Runs in the activated process: reports what listen_fds() returned, then
# serves one connection on the TCP socket to prove it is the real listener.
CHILD = r"""
import json, os, socket
from authproxy import systemd
socks = systemd.listen_fds()
report = {
    "env": {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")},
    "sockets": [
        {"fd": s.fileno(), "family": s.family.name, "type": s.type.name,
         "blocking": s.getblocking(), "inheritable": s.get_inheritable(),
         "name": s.getsockname()}
        for s in socks
    ],
}
print(json.dumps(report), flush=True)
tcp = next(s for s in socks if s.family == socket.AF_INET)
tcp.settimeout(20)
conn, _ = tcp.accept()
conn.sendall(b"served by fd %d" % tcp.fileno())
conn.close()
"""


def _activate_argv(fds: list[int], names: str, *argv: str) -> list[str]:
    return [sys.executable, "-c", ACTIVATE, ",".join(map(str, fds)), names, *argv]


def test_listen_fds_in_an_activated_process(tmp_path):
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = None
    try:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(8)
        port = tcp.getsockname()[1]
        unix_path = str(_short_dir(tmp_path) / "activated.sock")
        unix.bind(unix_path)
        unix.listen(8)

        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen(
            _activate_argv([tcp.fileno(), unix.fileno()], "http:unix", "-c", CHILD),
            pass_fds=(tcp.fileno(), unix.fileno()), env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
            client.settimeout(20)
            chunks = []
            while chunk := client.recv(1024):
                chunks.append(chunk)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err.decode()
        assert b"".join(chunks) == b"served by fd 3"

        report = json.loads(out.decode().splitlines()[0])
        assert report["env"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}
        socks = report["sockets"]
        assert [s["fd"] for s in socks] == [3, 4]
        assert [(s["family"], s["type"]) for s in socks] == [
            ("AF_INET", "SOCK_STREAM"), ("AF_UNIX", "SOCK_STREAM")]
        assert all(s["blocking"] is False and s["inheritable"] is False for s in socks)
        assert socks[0]["name"] == ["127.0.0.1", port]
        assert socks[1]["name"] == unix_path
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        tcp.close()
        unix.close()


# --------------------------------------------------------------------------
# the unit files


def _verify_units(tmp_path: Path, *names: str) -> None:
    """Run `systemd-analyze verify` on copies of the units whose ExecStart
    points at this interpreter: verify insists the binary exists, and the
    installed path (/usr/local/bin/authproxy) does not on a build machine.
    Everything else is checked exactly as shipped."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed; cannot verify unit files")
    for name in names:
        text = (UNIT_DIR / name).read_text()
        if name.endswith(".service"):
            text, n = re.subn(r"(?m)^ExecStart=/usr/local/bin/authproxy ",
                              f"ExecStart={sys.executable} -m authproxy ", text)
            assert n == 1, "ExecStart should run /usr/local/bin/authproxy"
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", *[str(tmp_path / n) for n in names]],
        capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    # verify exits 0 on unknown keys or bad values and only warns: any line
    # about our units is a defect.
    complaints = [line for line in output.splitlines() if "authproxy" in line]
    assert result.returncode == 0 and not complaints, output


def test_service_unit_verifies(tmp_path):
    _verify_units(tmp_path, "authproxy.service")


def test_socket_unit_verifies(tmp_path):
    _verify_units(tmp_path, "authproxy.service", "authproxy.socket")


def _unit_settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (UNIT_DIR / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key, []).append(value)
    return settings


def test_service_unit_contract():
    s = _unit_settings("authproxy.service")
    assert s["Type"] == ["notify"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["KillSignal"] == ["SIGTERM"]
    assert s["DynamicUser"] == ["yes"]
    assert s["StateDirectory"] == ["authproxy"]
    assert s["StateDirectoryMode"] == ["0700"]
    assert s["UMask"] == ["0077"]
    # shutdown_timeout (10 s default) + 5 s of logoff/expire must fit.
    timeout = s["TimeoutStopSec"][0]
    assert timeout.isdigit() and int(timeout) > 10 + 5
    for key in ("ProtectSystem", "ProtectHome", "NoNewPrivileges", "PrivateTmp",
                "PrivateDevices", "MemoryDenyWriteExecute", "RestrictAddressFamilies",
                "SystemCallFilter", "CapabilityBoundingSet"):
        assert key in s, key
    assert s["CapabilityBoundingSet"] == [""]
    assert s["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]


def test_service_unit_security_score(tmp_path):
    """`systemd-analyze security --offline` works without a running systemd
    (v250+); keep the unit in the "OK" band."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = re.sub(r"(?m)^ExecStart=/usr/local/bin/authproxy ",
                  f"ExecStart={sys.executable} -m authproxy ",
                  (UNIT_DIR / "authproxy.service").read_text())
    unit = tmp_path / "authproxy.service"
    unit.write_text(text)
    result = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    if match is None:
        pytest.skip(f"this systemd-analyze cannot rate units offline: {result.stderr.strip()}")
    assert float(match.group(1)) <= 2.0, result.stdout


# --------------------------------------------------------------------------
# the real CLI under a pretend service manager


TOKENS: dict[str, str] = {}


def _write_config(tmp: Path, port: int, extra: str = "") -> Path:
    """A one-service config; its generated token is in ``TOKENS[path]``."""
    cfg = tmp / "config.yaml"
    token = TOKENS[str(cfg)] = secrets.token_urlsafe(16)
    cfg.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"state_dir: {tmp / 'state'}\n"
        f"shutdown_timeout: 2\n"
        f"services:\n"
        f"  echo:\n"
        f"    upstream: http://127.0.0.1:{_free_port()}\n"
        f"    auth: {{scheme: bearer, token: {token}}}\n"
        + extra)
    return cfg


def _child_env(notify_path: str) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "STATE_DIRECTORY",
                "AUTHPROXY_CONFIG"):
        env.pop(var, None)
    env["NOTIFY_SOCKET"] = notify_path
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


def test_cli_notifies_ready_reload_and_stopping(tmp_path):
    tmp = _short_dir(tmp_path)
    port = _free_port()
    cfg = _write_config(tmp, port)
    notify_path = str(tmp / "notify.sock")
    lst = NotifyListener(notify_path)
    out, err = tmp / "stdout.log", tmp / "stderr.log"
    proc = None
    try:
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.Popen([sys.executable, "-m", "authproxy", "run", "-c", str(cfg)],
                                    env=_child_env(notify_path), cwd=tmp, stdout=o, stderr=e,
                                    stdin=subprocess.DEVNULL)
        logs = (out, err)

        # READY=1 from the main process, and only once it really listens.
        pid, _lines = lst.wait_for("READY=1", time.monotonic() + STEP_TIMEOUT, proc, logs)
        assert pid == proc.pid, "NotifyAccess=main: notifications must come from the main pid"
        status, body = _http_get(f"http://127.0.0.1:{port}/-/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})

        # SIGHUP: RELOADING=1 (with MONOTONIC_USEC taken at that moment), then READY=1.
        before = _monotonic_usec()
        proc.send_signal(signal.SIGHUP)
        pid, lines = lst.wait_for("RELOADING=1", time.monotonic() + STEP_TIMEOUT, proc, logs)
        assert pid == proc.pid
        usec = [int(line.split("=", 1)[1]) for line in lines if line.startswith("MONOTONIC_USEC=")]
        assert len(usec) == 1 and before <= usec[0] <= _monotonic_usec(), lines
        lst.wait_for("READY=1", time.monotonic() + STEP_TIMEOUT, proc, logs)
        status, _ = _http_get(f"http://127.0.0.1:{port}/-/healthz")
        assert status == 200

        # SIGTERM: STOPPING=1, then a clean exit.
        proc.send_signal(signal.SIGTERM)
        lst.wait_for("STOPPING=1", time.monotonic() + STEP_TIMEOUT, proc, logs)
        assert proc.wait(timeout=STEP_TIMEOUT) == 0, _logs(logs)

        states = [line.split("=")[0] for _p, lines in lst.received for line in lines
                  if line in ("READY=1", "RELOADING=1", "STOPPING=1")]
        assert states == ["READY", "RELOADING", "READY", "STOPPING"], lst.received
        assert TOKENS[str(cfg)] not in _logs(logs), "the token leaked into the output"
    finally:
        _stop(proc)
        lst.close()


def test_cli_failed_reload_still_returns_to_ready(tmp_path):
    """An invalid config on SIGHUP is logged and the old one kept -- and
    systemd must still get READY=1, or `systemctl reload` hangs until it
    times out and the unit is left in "reloading".

    SIGHUP is sent the moment READY=1 arrives, as `systemctl start x &&
    systemctl reload x` does: the signal handlers must be in place before
    READY=1 is sent, or the default action (terminate) kills the service."""
    tmp = _short_dir(tmp_path)
    port = _free_port()
    cfg = _write_config(tmp, port)
    notify_path = str(tmp / "notify.sock")
    lst = NotifyListener(notify_path)
    out, err = tmp / "stdout.log", tmp / "stderr.log"
    proc = None
    try:
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.Popen([sys.executable, "-m", "authproxy", "run", "-c", str(cfg)],
                                    env=_child_env(notify_path), cwd=tmp, stdout=o, stderr=e,
                                    stdin=subprocess.DEVNULL)
        logs = (out, err)
        lst.wait_for("READY=1", time.monotonic() + STEP_TIMEOUT, proc, logs)

        cfg.write_text(cfg.read_text() + "no_such_key: true\n")
        proc.send_signal(signal.SIGHUP)
        lst.wait_for("RELOADING=1", time.monotonic() + STEP_TIMEOUT, proc, logs)
        lst.wait_for("READY=1", time.monotonic() + STEP_TIMEOUT, proc, logs)
        assert proc.poll() is None, "an invalid reload must not stop the proxy"
        status, _ = _http_get(f"http://127.0.0.1:{port}/-/healthz")
        assert status == 200

        proc.send_signal(signal.SIGTERM)
        lst.wait_for("STOPPING=1", time.monotonic() + STEP_TIMEOUT, proc, logs)
        assert proc.wait(timeout=STEP_TIMEOUT) == 0, _logs(logs)
    finally:
        _stop(proc)
        lst.close()


def test_cli_uses_socket_from_activation(tmp_path):
    """Started by authproxy.socket: the proxy serves on the socket systemd
    passed (fd 3) instead of binding `listen:` itself -- which here names the
    same address, as in the shipped units, so binding it again would fail."""
    tmp = _short_dir(tmp_path)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    notify_path = str(tmp / "notify.sock")
    lst = NotifyListener(notify_path)
    out, err = tmp / "stdout.log", tmp / "stderr.log"
    proc = None
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        port = sock.getsockname()[1]
        cfg = _write_config(tmp, port)
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.Popen(
                _activate_argv([sock.fileno()], "authproxy.socket",
                               "-m", "authproxy", "run", "-c", str(cfg)),
                pass_fds=(sock.fileno(),), env=_child_env(notify_path), cwd=tmp,
                stdout=o, stderr=e, stdin=subprocess.DEVNULL)
        logs = (out, err)
        sock.close()  # the child holds the listener now, as a service does
        lst.wait_for("READY=1", time.monotonic() + STEP_TIMEOUT, proc, logs)
        status, body = _http_get(f"http://127.0.0.1:{port}/-/healthz", timeout=STEP_TIMEOUT)
        assert (status, json.loads(body)) == (200, {"status": "ok"})

        proc.send_signal(signal.SIGTERM)
        lst.wait_for("STOPPING=1", time.monotonic() + STEP_TIMEOUT, proc, logs)
        assert proc.wait(timeout=STEP_TIMEOUT) == 0, _logs(logs)
    finally:
        _stop(proc)
        sock.close()
        lst.close()


# --------------------------------------------------------------------------
# MemoryDenyWriteExecute=yes in the unit, checked for real: Linux 6.3+ offers
# the same restriction to any process as prctl(PR_SET_MDWE), inherited across
# execve, so the proxy can be run under it here without systemd.

PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
MDWE = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(%d, %d, 0, 0, 0) != 0:
    sys.exit(77)
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
""" % (PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)


def _require_mdwe() -> None:
    probe = subprocess.run(
        [sys.executable, "-c", MDWE, "-c",
         "import mmap\n"
         "try:\n"
         "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
         "except OSError:\n"
         "    raise SystemExit(0)\n"
         "raise SystemExit(1)\n"],
        capture_output=True, timeout=60)
    if probe.returncode == 77:
        pytest.skip("this kernel has no prctl(PR_SET_MDWE) (Linux < 6.3)")
    assert probe.returncode == 0, "PR_SET_MDWE set but W+X mappings still allowed"


def test_dependencies_work_under_memory_deny_write_execute():
    """Every authproxy module imports, and the crypto the schemes use (RS256
    and ES256 client assertions) works, with W+X memory refused."""
    _require_mdwe()
    code = r"""
import importlib, pkgutil, jwt
import authproxy
for mod in pkgutil.walk_packages(authproxy.__path__, "authproxy."):
    if mod.name != "authproxy.__main__":  # importing that runs the CLI
        importlib.import_module(mod.name)
from cryptography.hazmat.primitives.asymmetric import ec, rsa
for alg, key in (("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
                 ("ES256", ec.generate_private_key(ec.SECP256R1()))):
    token = jwt.encode({"iss": "x"}, key, algorithm=alg)
    assert jwt.decode(token, key.public_key(), algorithms=[alg]) == {"iss": "x"}
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", MDWE, "-c", code], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_cli_runs_under_memory_deny_write_execute(tmp_path):
    _require_mdwe()
    tmp = _short_dir(tmp_path)
    port = _free_port()
    cfg = _write_config(tmp, port)
    notify_path = str(tmp / "notify.sock")
    lst = NotifyListener(notify_path)
    out, err = tmp / "stdout.log", tmp / "stderr.log"
    proc = None
    try:
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.Popen(
                [sys.executable, "-c", MDWE, "-m", "authproxy", "run", "-c", str(cfg)],
                env=_child_env(notify_path), cwd=tmp, stdout=o, stderr=e,
                stdin=subprocess.DEVNULL)
        logs = (out, err)
        lst.wait_for("READY=1", time.monotonic() + STEP_TIMEOUT, proc, logs)
        status, _ = _http_get(f"http://127.0.0.1:{port}/-/healthz")
        assert status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STEP_TIMEOUT) == 0, _logs(logs)
    finally:
        _stop(proc)
        lst.close()
