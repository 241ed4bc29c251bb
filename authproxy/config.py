"""authproxy's configuration file → frozen dataclasses.

This module holds the product's own sections (``listen``, ``state_dir``,
``log``, ``inbound`` and its keys, ``forward_proxy``), :class:`Config` that
gathers them, and :func:`load_config`. The rest is one idea a module, so that
a scheme declares its settings as a dataclass in its own module and gets the
same treatment as everything else without importing this one:

* :mod:`authproxy.settings`: the generic reader: dataclass fields, types,
  defaults, unknown keys rejected, every error naming the file, the line and
  the key path; errors collected rather than raised at the first one, so that
  one run of ``authproxy check`` shows everything that is wrong.
* :mod:`authproxy.secrets_source`: ``${VAR}`` / ``${VAR:-default}`` /
  ``${file:PATH}`` interpolation, ``k_file`` and ``k_command`` for secret keys,
  and the record of the variables secrets come from.
* :mod:`authproxy.service_config`: the ``services:`` section, each service's
  ``auth`` read with its scheme's own dataclass.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping
from urllib.parse import urlsplit

import yaml

from authproxy.secret import Secret
from authproxy.secrets_source import SecretLoader
from authproxy.secrets_source import interpolate as interpolate  # re-exported: part of the config's API
from authproxy.service_config import ServiceConfig, load_services
from authproxy.service_config import parse_upstream as parse_upstream  # re-exported: part of the config's API
from authproxy.store.base import StoreError
from authproxy.store.crypto import read_key_file
from authproxy.settings import INVALID, ConfigError, FieldError, FilePath, child_node, join_keypath, key_lines, line_suffix, resolve_path

KEY_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
COMMAND_TIMEOUT = 10.0  # seconds a k_command may take
DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_STATE_DIR = "~/.local/state/authproxy"
DEFAULT_CONFIG_FILE = "authproxy.yaml"
MAX_WORKERS = 256


# --------------------------------------------------------------------------- sections


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


@dataclass(frozen=True)
class Config:
    path: str
    listen: Listen
    state_dir: str
    log: LogConfig
    shutdown_timeout: float
    inbound: InboundConfig
    services: Mapping[str, ServiceConfig] = field(default_factory=dict)
    # Names of the environment variables a secret is read from (``${VAR}`` in a secret
    # key's value, file path or command): ``authproxy exec`` removes them from CMD's environment.
    secret_env: frozenset[str] = field(default=frozenset(), compare=False)
    forward_proxy: ForwardProxyConfig = field(default_factory=ForwardProxyConfig)
    workers: int = 1  # processes serving the listener ("auto" in the file: one per CPU)
    store: StoreConfig | None = None  # None: the state dir (one machine)


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


# --------------------------------------------------------------------------- the loader


class _Loader(SecretLoader):
    """The whole document: the top-level sections, ``inbound.keys``, the services."""

    def __init__(self, path: str, env: Mapping[str, str]) -> None:
        super().__init__(path, env, command_timeout=COMMAND_TIMEOUT)
        self.service_names: list[str] = []

    # ---- inbound.keys
    def inbound_keys(self, parts: dict[str, tuple[yaml.Node, yaml.Node]], keypath: str) -> Any:
        """``keys`` (plain strings and named mappings), then ``keys_file`` and
        ``keys_command`` lines: unnamed keys are ``key1``, ``key2``, ... in that order."""
        entries: list[tuple[str | None, Secret, yaml.Node, str, tuple[str, ...] | None]] = []
        ok = True
        if "keys" in parts:
            kp = join_keypath(keypath, "keys")
            vnode = parts["keys"][1]
            if isinstance(vnode, yaml.ScalarNode) and vnode.tag == "tag:yaml.org,2002:null":
                pass
            elif not isinstance(vnode, yaml.SequenceNode):
                self.err(vnode, kp, "expected a list of keys, or of {name, key, services} mappings")
                ok = False
            else:
                for i, item in enumerate(vnode.value):
                    ikp = f"{kp}[{i}]"
                    if isinstance(item, yaml.MappingNode):
                        named = self.section(_NamedKeySection, item, ikp)
                        if named is INVALID or not self.known_services(named.services, item, ikp):
                            ok = False
                            continue
                        entries.append((named.name, named.key, item, ikp, named.services))
                        continue
                    self.note_secret_env(item)
                    value = self.scalar(item, ikp)
                    if value is INVALID:
                        ok = False
                    elif not isinstance(value, (str, int)) or isinstance(value, bool) or str(value) == "":
                        self.err(item, ikp, "expected a key (a non-empty string) or a {name, key, services} mapping")
                        ok = False
                    else:
                        entries.append((None, Secret(str(value)), item, ikp, None))
        for key in ("keys_file", "keys_command"):
            if key in parts:
                kp = join_keypath(keypath, key)
                content = self.secret_source(key, parts[key][1], kp)
                if content is INVALID:
                    ok = False
                    continue
                entries.extend((None, Secret(ln), parts[key][1], kp, None) for ln in key_lines(content))
        if not ok:
            return INVALID
        out: list[InboundKey] = []
        names: dict[str, str] = {}
        values: dict[str, tuple[str, bool]] = {}  # key → (its name, named)
        n = 0
        for name, secret, node, kp, services in entries:
            named = name is not None
            if name is None:
                n += 1
                name = f"key{n}"
            if name in names:
                self.err(child_node(node, "name") or node, f"{kp}.name" if named else kp, f"the key name {name} is already used by {names[name]}")
                ok = False
                continue
            names[name] = kp
            other = values.get(secret.reveal())
            # The same key under two names would be logged as the first one, with its
            # services: an error once a named key is involved (duplicate plain keys are harmless).
            if other is not None and (named or other[1]):
                self.err(node, kp, f"the same key as {other[0]}: each key must be different")
                ok = False
                continue
            values.setdefault(secret.reveal(), (name, named))
            out.append(InboundKey(name, secret, services))
        return tuple(out) if ok else INVALID

    def known_services(self, services: tuple[str, ...] | None, node: yaml.Node, kp: str) -> bool:
        ok = True
        for j, svc in enumerate(services or ()):
            if svc not in self.service_names:
                seq = child_node(node, "services")
                where = seq.value[j] if isinstance(seq, yaml.SequenceNode) and j < len(seq.value) else node
                known = ", ".join(self.service_names) or "none"
                self.err(where, f"{kp}.services[{j}]", f"unknown service {svc!r} (configured: {known})")
                ok = False
        return ok

    # ---- the document
    def load(self, text: str) -> Config:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError([f"{self.path}{line}: not valid YAML: {getattr(e, 'problem', None) or e}"]) from None
        if root is None:
            root = yaml.MappingNode("tag:yaml.org,2002:map", [], yaml.Mark(self.path, 0, 0, 0, "", 0), None)
        services_node = next((v for k, v in getattr(root, "value", []) if isinstance(k, yaml.ScalarNode) and k.value == "services"), None)
        if isinstance(services_node, yaml.MappingNode):  # for inbound.keys[].services, read before the services are
            self.service_names = [k.value for k, _ in services_node.value if isinstance(k, yaml.ScalarNode) and isinstance(k.value, str)]
        top = self.section(_TopSection, root, "", skip=("services",))
        services = load_services(self, services_node)
        if self.errors or top is INVALID or services is INVALID:
            raise ConfigError(self.errors or [f"{self.path}: invalid configuration"])
        return self.assemble(top, services, root)

    def assemble(self, top: "_TopSection", services: dict[str, ServiceConfig], root: yaml.Node) -> Config:
        try:
            listen = parse_listen(top.listen)
        except ValueError as e:
            raise ConfigError([f"{self.path}{line_suffix(child_node(root, 'listen'))}: listen: {e}"]) from None
        inbound = top.inbound
        if not listen.is_loopback and not (inbound.allow_remote and inbound.keys):
            raise ConfigError(
                [
                    f"{self.path}{line_suffix(child_node(root, 'listen'))}: listen: {listen} is not a loopback address; "
                    "set inbound.allow_remote: true and inbound.keys (or keys_file) to serve other machines"
                ]
            )
        if top.state_dir:
            state_dir = top.state_dir
        elif self.env.get("STATE_DIRECTORY"):
            state_dir = self.env["STATE_DIRECTORY"].split(":")[0]
        else:
            state_dir = DEFAULT_STATE_DIR
        if top.shutdown_timeout < 0:
            raise ConfigError([f"{self.path}{line_suffix(child_node(root, 'shutdown_timeout'))}: shutdown_timeout: must not be negative"])
        workers = parse_workers(top.workers)
        if workers is None:
            raise ConfigError([f"{self.path}{line_suffix(child_node(root, 'workers'))}: workers: must be a whole number from 1 to {MAX_WORKERS}, or auto"])
        fwd = top.forward_proxy
        if fwd.ca_dir:
            fwd = dataclasses.replace(fwd, ca_dir=str(resolve_path(fwd.ca_dir, self.base_dir)))
        return Config(
            path=self.path,
            listen=listen,
            state_dir=os.path.expanduser(state_dir),
            log=top.log,
            shutdown_timeout=top.shutdown_timeout,
            inbound=inbound,
            services=services,
            secret_env=frozenset(self.secret_env),
            forward_proxy=fwd,
            workers=workers,
            store=top.store,
        )


@dataclass(frozen=True)
class _TopSection:
    listen: str = DEFAULT_LISTEN
    state_dir: str | None = None
    log: LogConfig = field(default_factory=LogConfig)
    shutdown_timeout: float = 10.0
    inbound: InboundConfig = field(default_factory=InboundConfig)
    forward_proxy: ForwardProxyConfig = field(default_factory=ForwardProxyConfig)
    workers: str = "1"  # N or auto
    store: StoreConfig | None = None


@dataclass(frozen=True)
class _NamedKeySection:
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


# --------------------------------------------------------------------------- entry points


def config_path(explicit: str | None, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return explicit or env.get("AUTHPROXY_CONFIG") or DEFAULT_CONFIG_FILE


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    path = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the configuration file: {e.strerror or e}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: the configuration file is not UTF-8 text"]) from None
    return _Loader(path, os.environ if env is None else env).load(text)


def load_config_text(text: str, env: Mapping[str, str] | None = None, path: str = "<string>") -> Config:
    return _Loader(path, os.environ if env is None else env).load(text)
