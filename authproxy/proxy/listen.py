"""Where the proxy listens: the sockets systemd passed, a unix socket, or a TCP address.

A socket passed by systemd obeys the same loopback rule as ``listen``. A unix
socket file left by a crashed run is removed first; one a live process serves
never is.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from typing import TYPE_CHECKING

from authproxy import systemd

if TYPE_CHECKING:
    from authproxy.config import Config
    from authproxy.http1.server import Server


#: In a worker of ``workers: N``: the listening sockets its supervising parent opened
#: (:func:`bind_listeners`) and handed down; every worker accepts on the same ones.
handed: list[socket.socket] = []


async def open_listeners(server: Server, config: Config) -> None:
    """Listen where ``config.listen`` says, or on the sockets systemd passed (``LISTEN_FDS``)."""
    if handed:
        for sock in handed:
            await server.listen_socket(sock)
        return
    listen = config.listen
    inherited = systemd.listen_fds() if os.environ.get("LISTEN_FDS") else []
    if inherited:
        for sock in inherited:
            check_inherited(sock, config)
            await server.listen_socket(sock)
    elif listen.kind == "unix":
        clear_stale_socket(listen.path)
        await server.listen_unix(listen.path)
        os.chmod(listen.path, 0o660)
    else:
        await server.listen_tcp(listen.host, listen.port, backlog=1024)


def bind_listeners(config: Config) -> list[socket.socket]:
    """The supervising parent of ``workers: N``: the same sockets, with the same checks,
    as :func:`open_listeners`, opened once here and handed to every worker."""
    from authproxy.http1.listener import bind_tcp, bind_unix

    listen = config.listen
    inherited = systemd.listen_fds() if os.environ.get("LISTEN_FDS") else []
    if inherited:
        try:
            for sock in inherited:
                check_inherited(sock, config)
        except OSError:
            for sock in inherited:
                sock.close()
            raise
        return inherited
    if listen.kind == "unix":
        clear_stale_socket(listen.path)
        sock = bind_unix(listen.path, 1024)
        os.chmod(listen.path, 0o660)
        return [sock]
    return bind_tcp(listen.host, listen.port, 1024, False)


def check_inherited(sock: socket.socket, config: Config) -> None:
    """A socket passed by systemd obeys the same rule as ``listen``: serving other
    machines needs ``inbound.allow_remote`` and inbound keys."""
    addr = sock.getsockname()
    if not isinstance(addr, tuple):
        return  # a unix socket
    try:
        loopback = ipaddress.ip_address(addr[0]).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not (config.inbound.allow_remote and config.inbound.keys):
        raise OSError(
            f"the socket passed by systemd listens on {addr[0]}, not a loopback address; "
            "set inbound.allow_remote: true and inbound.keys to serve other machines"
        )


def clear_stale_socket(path: str) -> None:
    """Remove a socket file left by a crashed run — but never one a live process serves."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise OSError(f"{path} is in use by another process")
    finally:
        probe.close()

