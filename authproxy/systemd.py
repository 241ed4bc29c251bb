"""systemd integration: readiness notification (sd_notify) and socket activation.

Both protocols are tiny and stable, so they are implemented here directly
instead of depending on libsystemd or a binding package: authproxy must also
run on machines (containers, macOS laptops) where neither exists, and there
every function below is a cheap no-op.

* ``notify()`` / ``reloading()`` speak the ``$NOTIFY_SOCKET`` datagram
  protocol of sd_notify(3).  ``Type=notify`` units need ``READY=1`` before
  systemd considers the service started (so units ordered after it, and
  ``systemctl start``, wait until the proxy really listens), and
  ``RELOADING=1``/``READY=1`` let ``systemctl reload`` wait for a reload to
  finish.
* ``listen_fds()`` takes over sockets passed by a ``.socket`` unit, per
  sd_listen_fds(3), so systemd can own the listening port (privileged ports,
  start on first connection, restarts without refused connections).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable

__all__ = ["LISTEN_FDS_START", "listen_fds", "notify", "reloading"]

log = logging.getLogger("authproxy.systemd")

#: The first file descriptor systemd passes (SD_LISTEN_FDS_START): 0-2 are stdio.
LISTEN_FDS_START = 3

# A notification is a handful of bytes and systemd drains its socket
# continuously; the timeout only bounds the pathological case (a wedged
# manager) so that the event loop is never blocked for long.
_SEND_TIMEOUT = 2.0

#: In a worker of ``workers: N`` (:mod:`authproxy.workers`): where notifications go
#: instead — to the supervising parent, the one process systemd hears from.
relay: Callable[[tuple[str, ...]], bool] | None = None


def _notify_address(value: str) -> str | bytes | None:
    """Translate ``$NOTIFY_SOCKET`` into an address for ``socket.sendto``.

    A leading ``@`` names a socket in the Linux abstract namespace, which on
    the wire starts with a NUL byte.  Like libsystemd, only absolute paths and
    abstract names are accepted: anything else (e.g. the ``vsock:`` form used
    by VMs) is not something a local proxy is started with.
    """
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``, ``"STATUS=..."``) to ``$NOTIFY_SOCKET``.

    The states are sent as one datagram, newline-separated, which systemd
    applies atomically (``RELOADING=1`` must arrive with its
    ``MONOTONIC_USEC=``).  A newline inside a state would split it into two
    assignments, so it is replaced by a space.

    Returns True when the datagram was sent.  Returns False, doing nothing,
    when the variable is unset (not started by systemd, or by a plain
    ``Type=simple`` unit).  A failed send is logged and returns False: being
    unable to tell systemd about a state change must never take the proxy
    down.  A socket is opened per call rather than cached: notifications are
    rare, and a cached socket would leak into forks and survive a change of
    the variable.
    """
    if relay is not None:
        return relay(states) if states else False
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    address = _notify_address(target)
    if address is None:
        log.warning("NOTIFY_SOCKET=%r is not a socket path or abstract name; not notifying", target)
        return False
    if not states:
        return False
    message = "\n".join(state.replace("\n", " ") for state in states).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("could not notify systemd (%s) via NOTIFY_SOCKET=%s: %s",
                    ", ".join(s.partition("=")[0] for s in states), target, exc)
        return False
    return True


def reloading() -> bool:
    """Tell systemd a configuration reload has started.

    systemd 253+ (``Type=notify-reload``) only accepts ``RELOADING=1`` with a
    ``MONOTONIC_USEC=`` taken from CLOCK_MONOTONIC at that moment, so it can
    tell this reload from an older one; older versions ignore the extra field.
    Follow it with ``notify("READY=1")`` once the new configuration is in
    effect (or was rejected and the old one kept).
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def listen_fds() -> list[socket.socket]:
    """Return the sockets systemd passed to this process, or ``[]``.

    Follows sd_listen_fds(3): the sockets are file descriptors 3, 4, ...,
    ``$LISTEN_FDS`` of them, and they are meant for this process only when
    ``$LISTEN_PID`` is our pid (a child inheriting the environment must not
    grab descriptors that are not what it thinks).  The three variables are
    removed from the environment in every case, so that nothing this process
    spawns mistakes them for its own.

    The sockets come back non-blocking (ready for asyncio) and close-on-exec
    (systemd hands them over inheritable); their family and type are read
    from the descriptors themselves.  A passed descriptor that is not a
    socket (e.g. a ``ListenFIFO=``) is skipped with a warning.
    """
    pid_text = os.environ.pop("LISTEN_PID", None)
    count_text = os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid_text is None or count_text is None:
        return []
    try:
        pid = int(pid_text)
        count = int(count_text)
    except ValueError:
        log.warning("ignoring malformed LISTEN_PID=%r / LISTEN_FDS=%r", pid_text, count_text)
        return []
    if pid != os.getpid():
        return []
    if count < 0:
        log.warning("ignoring negative LISTEN_FDS=%d", count)
        return []

    sockets: list[socket.socket] = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count):
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning("passed file descriptor %d is not a usable socket: %s", fd, exc)
            continue
        sock.setblocking(False)
        sockets.append(sock)
    return sockets
