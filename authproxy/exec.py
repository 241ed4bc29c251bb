"""``authproxy exec -- CMD [ARG...]``: run an unmodified tool with its HTTP clients
routed through authproxy in forward-proxy mode, and ``authproxy ca``.

CMD gets ``HTTPS_PROXY`` & co. pointing at a proxy (the one running at the
config's ``listen`` when its ``/-/healthz`` answers and the config turns
forward-proxy mode on; else one started here on a free loopback port for CMD's
lifetime), a CA bundle that holds authproxy's CA, and an environment without the
variables the config reads secrets from, so CMD never holds a real credential.
CMD's standard streams are its own; SIGINT, SIGTERM and SIGHUP are passed on;
exec exits with CMD's status (128+N if signal N killed it), 127 if CMD cannot
be started.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import json
import logging
import os
import re
import signal
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import quote

from authproxy.config import Config, Listen
from authproxy.observe import log_event
from authproxy.state import StateDir, StateError

log = logging.getLogger("authproxy.exec")

EXIT_CANNOT_START = 127
PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")
BUNDLE_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO")
NO_PROXY_LOOPBACK = ("localhost", "127.0.0.1", "::1")
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
BUNDLE_NAME = "ca-bundle.pem"  # in the state dir: the system's CAs + authproxy's
FALLBACK_CA_FILE = "/etc/ssl/certs/ca-certificates.crt"
HEALTHZ_TIMEOUT = 2.0
# Variables of the systemd protocols are CMD's, not this process's proxy's.
_SYSTEMD_VARS = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
_PEM_RE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+?-----END CERTIFICATE-----")
_HASHED_NAME = re.compile(r"[0-9a-f]{8}\.\d+")


class ExecError(Exception):
    """exec could not prepare CMD's environment (exit 1)."""


# --------------------------------------------------------------------------- the CA


def ca_dir(config: Config) -> Path:
    from authproxy.proxy.ca import default_ca_dir

    configured = config.forward_proxy.ca_dir
    return Path(os.path.expanduser(configured)) if configured else default_ca_dir(config.state_dir)


def load_ca(config: Config):  # -> CertificateAuthority
    """authproxy's CA (made on first need); the state dir is made 0700 first when the CA lives in it."""
    from authproxy.proxy.ca import CertificateAuthority

    if not config.forward_proxy.ca_dir:
        StateDir(config.state_dir).ensure()
    return CertificateAuthority.load_or_create(ca_dir(config))


def system_certificates() -> list[bytes]:
    """The PEM certificates tools trust without exec: the OS store (which honours a
    ``SSL_CERT_FILE`` already set) and certifi's bundle when it is installed; the
    Debian bundle path when neither yields any."""
    files: list[Path] = []
    paths = ssl.get_default_verify_paths()
    if paths.cafile:
        files.append(Path(paths.cafile))
    elif paths.capath and os.path.isdir(paths.capath):
        files.extend(sorted(p for p in Path(paths.capath).iterdir() if _HASHED_NAME.fullmatch(p.name)))
    with contextlib.suppress(ImportError):
        import certifi  # type: ignore[import-not-found]

        files.append(Path(certifi.where()))
    certs = _read_pems(files)
    return certs or _read_pems([Path(FALLBACK_CA_FILE)])


def _read_pems(files: Sequence[Path]) -> list[bytes]:
    seen: dict[bytes, None] = {}
    for f in files:
        with contextlib.suppress(OSError):
            for block in _PEM_RE.findall(f.read_bytes()):
                seen.setdefault(block.replace(b"\r", b""), None)
    return list(seen)


def write_bundle(state_dir: str, ca_pem: Path) -> Path:
    """``<state_dir>/ca-bundle.pem`` (0644): the system's CAs plus authproxy's CA.
    Replaced atomically (and only when it changes): another exec's CMD may be reading it."""
    certs = system_certificates()
    own = _read_pems([ca_pem])
    if not own:
        raise ExecError(f"{ca_pem} holds no certificate")
    data = b"\n".join(c for c in certs if c not in own) + b"\n" + own[0] + b"\n"
    target = StateDir(state_dir).ensure() / BUNDLE_NAME
    with contextlib.suppress(OSError):
        if target.read_bytes() == data and target.stat().st_mode & 0o777 == 0o644:
            return target
    fd, tmp = tempfile.mkstemp(prefix=f".{BUNDLE_NAME}.", dir=target.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


# --------------------------------------------------------------------------- the proxy


def running_proxy(config: Config) -> str | None:
    """``host:port`` of the proxy at the config's TCP ``listen`` when its ``/-/healthz``
    answers ok and the config serves forward-proxy requests; else None."""
    listen = config.listen
    if listen.kind != "tcp" or not listen.port or not config.forward_proxy.enabled:
        return None
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1", "localhost": "127.0.0.1"}.get(listen.host, listen.host)
    conn = http.client.HTTPConnection(host, listen.port, timeout=HEALTHZ_TIMEOUT)
    try:
        conn.request("GET", "/-/healthz", headers={"Host": "localhost"})
        resp = conn.getresponse()
        ok = resp.status == 200 and json.loads(resp.read(4096)).get("status") == "ok"
    except (OSError, http.client.HTTPException, ValueError, AttributeError):
        return None
    finally:
        conn.close()
    return str(Listen("tcp", host=host, port=listen.port)) if ok else None


def own_config(config: Config) -> Config:
    """exec's own proxy: a free loopback port, forward-proxy mode on."""
    forward = dataclasses.replace(config.forward_proxy, enabled=True)
    return dataclasses.replace(config, listen=Listen("tcp", host="127.0.0.1", port=0), forward_proxy=forward)


def exec_log_level(config: Config) -> str:
    """exec's own proxy logs at the config's level, but ``info`` (the default) is raised to
    ``warning``: an access line per request would drown CMD's own output."""
    return "warning" if config.log.level == "info" else config.log.level


# --------------------------------------------------------------------------- CMD's environment


def proxy_url(config: Config, address: str) -> str:
    """``http://[authproxy:KEY@]address``: with inbound keys, the first key that may use
    every service (else the first key), percent-encoded."""
    keys = config.inbound.keys
    if not keys:
        return f"http://{address}"
    key = next((k for k in keys if all(k.may_use(s) for s in config.services)), keys[0])
    return f"http://authproxy:{quote(key.key.reveal(), safe='')}@{address}"


def child_env(base: Mapping[str, str], config: Config, url: str, bundle: Path, ca_pem: Path) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in config.secret_env}
    for name in PROXY_VARS:
        env[name] = url
    entries: list[str] = []
    for name in ("NO_PROXY", "no_proxy"):
        entries.extend(e.strip() for e in base.get(name, "").split(","))
    entries.extend(NO_PROXY_LOOPBACK)
    env["NO_PROXY"] = env["no_proxy"] = ",".join(dict.fromkeys(e for e in entries if e))
    for name in BUNDLE_VARS:
        env[name] = str(bundle)
    env["NODE_EXTRA_CA_CERTS"] = str(ca_pem)
    return env


# --------------------------------------------------------------------------- running CMD


def _foreground_of_terminal() -> bool:
    """True when this process's group is its terminal's foreground group: a Ctrl-C
    there is delivered by the terminal to CMD (same group) already."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


async def run_exec(config: Config, argv: Sequence[str]) -> int:
    """Prepare CMD's environment and proxy, run CMD, return its exit status."""
    loop = asyncio.get_running_loop()
    base_env = dict(os.environ)
    for name in _SYSTEMD_VARS:  # CMD's to use; this process's proxy must not
        os.environ.pop(name, None)
    child: asyncio.subprocess.Process | None = None
    early: list[int] = []  # signals that came before CMD started

    def forward(sig: int) -> None:
        if child is None:
            early.append(sig)
        elif child.returncode is None:
            if sig == signal.SIGINT and _foreground_of_terminal():
                return  # the terminal sent it to CMD too; a second one would be a double Ctrl-C
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(sig)

    for sig in FORWARDED_SIGNALS:
        loop.add_signal_handler(sig, forward, sig)
    server = None
    try:
        try:
            ca = await asyncio.to_thread(load_ca, config)
            bundle = await asyncio.to_thread(write_bundle, config.state_dir, ca.cert_path)
        except (OSError, ValueError, ExecError, StateError) as e:
            print(f"authproxy exec: cannot prepare authproxy's CA: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
            return 1
        address = await asyncio.to_thread(running_proxy, config)
        if address is not None:
            log_event(log, logging.INFO, "exec_uses_running_proxy", address=address)
        else:
            from authproxy.proxy.app import ProxyServer

            server = ProxyServer(own_config(config))
            try:
                await server.start()
            except OSError as e:
                print(f"authproxy exec: cannot start the proxy: {e.strerror or e}", file=sys.stderr)
                return 1
            address = server.addresses()[0]
        if early:
            return 128 + early[0]
        env = child_env(base_env, config, proxy_url(config, address), bundle, ca.cert_path)
        try:
            child = await asyncio.create_subprocess_exec(*argv, env=env)
        except OSError as e:
            print(f"authproxy exec: {argv[0]}: {e.strerror or e}", file=sys.stderr)
            return EXIT_CANNOT_START
        for sig in early:  # arrived while CMD was being started
            forward(sig)
        status = await child.wait()
        return 128 - status if status < 0 else status
    finally:
        if server is not None:
            from authproxy.proxy.app import REVOKE_BUDGET

            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.shutdown(), config.shutdown_timeout + REVOKE_BUDGET + 5)
        for sig in FORWARDED_SIGNALS:
            loop.remove_signal_handler(sig)
