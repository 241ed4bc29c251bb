"""The product's own sections of the configuration file, as frozen dataclasses.

``listen``, ``log``, ``inbound`` and its keys, ``forward_proxy``, ``store`` and
the top level itself: what :mod:`authproxy.config` reads them into. Kept apart
from the loader so that each side stays small enough to read at once; the
names are re-exported by :mod:`authproxy.config`, where the rest of authproxy
imports them from.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from authproxy.secret import Secret
from authproxy.settings import FieldError, FilePath
from authproxy.store.base import StoreError
from authproxy.store.crypto import read_key_file

KEY_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
DEFAULT_LISTEN = "127.0.0.1:8080"
MAX_WORKERS = 256


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    audit_file: str | None = None  # the access records also as JSON lines in this file (0600; reopened on SIGHUP)


@dataclass(frozen=True)
class InboundKey:
    """An inbound key: its name (logged, never the key) and the services it may use."""

    name: str
    key: Secret
    services: tuple[str, ...] | None = None  # None: every service

    def may_use(self, service: str) -> bool:
        return self.services is None or service in self.services


@dataclass(frozen=True)
class InboundConfig:
    allow_remote: bool = False
    # Plain strings (named key1, key2, ...), keys_file / keys_command lines (numbered on),
    # and {name, key | key_file | key_command, services} mappings: see _Loader.inbound_keys.
    keys: tuple[InboundKey, ...] = field(default=(), metadata={"load": "inbound_keys"})
    hosts: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ()
    idle_timeout: float = 75.0  # an idle keep-alive client connection is closed after this
    header_timeout: float = 10.0  # a request head must arrive whole within this of its first byte
    max_connections: int = 4096  # past it, new connections wait in the kernel's backlog

    def check(self) -> None:
        for name in ("idle_timeout", "header_timeout"):
            if getattr(self, name) <= 0:
                raise FieldError(name, "must be greater than 0")
        if self.max_connections < 1:
            raise FieldError("max_connections", "must be at least 1")


@dataclass(frozen=True)
class ForwardProxyConfig:
    """Forward-proxy mode (CONNECT and absolute-form requests on the same listener)."""

    enabled: bool = False
    unmapped: Literal["refuse", "tunnel"] = "refuse"  # a host no service names: 403, or a blind relay
    ca_dir: str | None = None  # None: <state_dir>/ca (authproxy.proxy.ca.default_ca_dir)


@dataclass(frozen=True)
class StoreConfig:
    """``store:``: where credentials live when every process and replica shares them (Redis)."""

    url: str  # redis://HOST:PORT/DB, rediss://HOST:PORT/DB, unix:///path/redis.sock?db=N
    key_file: FilePath | None = None  # required: the AES-GCM key is derived from this file's content
    prefix: str = "authproxy:"
    username: str | None = None
    password: Secret | None = None  # or password_file / password_command
    ca_file: FilePath | None = None  # rediss:// only: the CA bundle the server's certificate is checked against
    timeout: float = 2.0  # seconds to connect, and for each command

    def check(self) -> None:
        scheme = urlsplit(self.url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise FieldError("url", "must be redis://HOST:PORT/DB, rediss://HOST:PORT/DB or unix:///path/to/redis.sock")
        if urlsplit(self.url).password:
            raise FieldError("url", "must not hold a password: use password_file (or password, password_command)")
        if self.key_file is None:
            raise FieldError("key_file", "required with a store: the credentials kept there are encrypted with a key derived from this file")
        try:
            read_key_file(self.key_file)  # an empty or short key would seal what no other replica opens
        except StoreError as e:
            raise FieldError("key_file", str(e).removeprefix("store.key_file ")) from None
        if self.ca_file is not None and scheme != "rediss":
            raise FieldError("ca_file", "only used with a rediss:// url")
        if not self.prefix or any(c.isspace() for c in self.prefix):
            raise FieldError("prefix", "must be a non-empty string without spaces")
        if self.timeout <= 0:
            raise FieldError("timeout", "must be greater than 0")


@dataclass(frozen=True)
class Listen:
    kind: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_loopback(self) -> bool:
        if self.kind == "unix":
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


# --------------------------------------------------------------------------- parsing helpers


def parse_listen(value: str) -> Listen:
    if value.startswith("unix:"):
        path = value[5:]
        if not path:
            raise ValueError("unix: needs a socket path")
        return Listen("unix", path=os.path.expanduser(path))
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", value)
    if not m:
        raise ValueError("expected host:port, [v6addr]:port or unix:/path")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError("port out of range")
    return Listen("tcp", host=host, port=port)


def parse_workers(value: str) -> int | None:
    """``workers``: a whole number, or ``auto`` (one per CPU this process may run on)."""
    value = str(value).strip().lower()
    if value == "auto":
        try:
            return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
        except (AttributeError, OSError):
            return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    if not re.fullmatch(r"\d+", value):
        return None
    n = int(value)
    return n if 1 <= n <= MAX_WORKERS else None



# --------------------------------------------------------------------------- the top level and a named key


@dataclass(frozen=True)
class TopSection:
    listen: str = DEFAULT_LISTEN
    state_dir: str | None = None
    log: LogConfig = field(default_factory=LogConfig)
    shutdown_timeout: float = 10.0
    inbound: InboundConfig = field(default_factory=InboundConfig)
    forward_proxy: ForwardProxyConfig = field(default_factory=ForwardProxyConfig)
    workers: str = "1"  # N or auto
    store: StoreConfig | None = None


@dataclass(frozen=True)
class NamedKeySection:
    name: str
    key: Secret | None = None  # or key_file / key_command
    services: tuple[str, ...] | None = None  # None: every service

    def check(self) -> None:
        if not KEY_NAME_RE.fullmatch(self.name):
            raise FieldError("name", "key names are lower-case letters, digits, '_', '.' and '-', starting with a letter or digit")
        if self.key is None:
            raise FieldError("key", "required (or key_file, key_command)")
        if not self.key:
            raise FieldError("key", "must not be empty")
        if self.services is not None and not self.services:
            raise FieldError("services", "must not be empty (leave services out for every service)")
