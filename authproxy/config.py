"""The YAML configuration file → frozen dataclasses.

One generic loader walks the dataclass fields of each section, so a scheme's
settings are declared once, as a dataclass in the scheme's own module, and get
the same treatment as everything else: ``${VAR}`` / ``${VAR:-default}`` /
``${file:PATH}`` interpolation, ``k_file`` and ``k_command`` for secret keys,
defaults, unknown keys rejected, and every error naming the file, the line and
the key path.
Errors are collected rather than raised at the first one, so that one run of
``authproxy check`` shows everything that is wrong.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import signal
import subprocess
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from authproxy.proxy.policy import Policy, Rule, RuleError, compile_rule
from authproxy.secret import Secret

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
KEY_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
COMMAND_TIMEOUT = 10.0  # seconds a k_command may take
DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_STATE_DIR = "~/.local/state/authproxy"
DEFAULT_CONFIG_FILE = "authproxy.yaml"


class ConfigError(Exception):
    """A configuration that cannot be used. ``str()`` lists every problem, one a line."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


class FieldError(Exception):
    """Raised by a section's ``check()`` to blame one of its keys (``index``: one item of a list)."""

    def __init__(self, key: str | None, message: str, index: int | None = None) -> None:
        self.key = key
        self.message = message
        self.index = index
        super().__init__(message)


class FilePath(str):
    """A path to a file that must exist; relative paths are taken from the config file's folder."""


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
class TimeoutConfig:
    connect: float = 10.0
    total: float = 300.0

    def check(self) -> None:
        if self.connect <= 0:
            raise FieldError("connect", "must be greater than 0")
        if self.total <= 0:
            raise FieldError("total", "must be greater than 0")


@dataclass(frozen=True)
class Upstream:
    """The parsed ``upstream`` URL: requests only ever go to this origin."""

    scheme: str
    host: str
    port: int
    base_path: str  # '' or '/x/y' without a trailing slash

    @property
    def origin(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}" + ("" if self.port == default else f":{self.port}")

    @property
    def authority(self) -> str:
        """The ``Host`` header value for this origin (no port when it is the default)."""
        return self.origin.split("://", 1)[1]

    @property
    def url(self) -> str:
        return self.origin + self.base_path

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    upstream: Upstream
    prefix: str
    timeout: TimeoutConfig
    ca_file: str | None
    max_replay_body: int
    scheme: str
    auth: Any  # the scheme's own Config dataclass
    # Least privilege: None = every request. Not compared: changing the rules on
    # SIGHUP keeps the service's credentials.
    allow: Policy | None = field(default=None, compare=False)
    scrub_responses: bool = True  # injected secrets masked in responses (authproxy.proxy.scrub)
    hosts: tuple[str, ...] = field(default=(), compare=False)  # forward-proxy mode: lower-case host names that are this service's


@dataclass(frozen=True)
class ForwardProxyConfig:
    """Forward-proxy mode (CONNECT and absolute-form requests on the same listener)."""

    enabled: bool = False
    unmapped: Literal["refuse", "tunnel"] = "refuse"  # a host no service names: 403, or a blind relay
    ca_dir: str | None = None  # None: <state_dir>/ca (authproxy.proxy.ca.default_ca_dir)


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


def parse_upstream(value: str) -> Upstream:
    m = re.fullmatch(r"(https?)://(\[[0-9a-fA-F:.]+\]|[^/:?#\[\]@]+)(?::(\d+))?(/[^?#]*)?", value)
    if not m:
        raise ValueError("expected scheme://host[:port][/base-path] with scheme http or https, no query or fragment")
    scheme, host, port, path = m.group(1), m.group(2), m.group(3), m.group(4) or ""
    host = host[1:-1] if host.startswith("[") else host.lower()
    port_n = int(port) if port else (443 if scheme == "https" else 80)
    if not 0 < port_n <= 65535:
        raise ValueError("port out of range")
    return Upstream(scheme, host, port_n, path.rstrip("/"))


_VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VAR_REF_RE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")  # ${VAR}, ${VAR:-...}, nested too


def interpolate(text: str, env: Mapping[str, str], base_dir: Path) -> str:
    """Expand ``${VAR}``, ``${VAR:-default}`` and ``${file:PATH}`` (nestable); ``$${`` is a literal ``${``."""
    if "$" not in text:
        return text
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text.startswith("$${", i):
            out.append("${")
            i += 3
            continue
        if text.startswith("${", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("${", j):
                    depth += 1
                    j += 2
                    continue
                if text[j] == "}":
                    depth -= 1
                j += 1
            if depth:
                raise ValueError("unterminated ${...}")
            out.append(_expand(text[i + 2 : j - 1], env, base_dir))
            i = j
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def _expand(expr: str, env: Mapping[str, str], base_dir: Path) -> str:
    if expr.startswith("file:"):
        path = interpolate(expr[5:], env, base_dir)
        return read_secret_file(path, base_dir)
    name, sep, default = expr.partition(":-")
    if not _VAR_RE.fullmatch(name):
        raise ValueError(f"bad variable reference ${{{name}}}")
    if name in env and (env[name] != "" or not sep):
        return env[name]
    if sep:
        return interpolate(default, env, base_dir)
    raise ValueError(f"environment variable {name} is not set")


def resolve_path(path: str, base_dir: Path) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else base_dir / p


def read_secret_file(path: str, base_dir: Path) -> str:
    p = resolve_path(path, base_dir)
    try:
        return p.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as e:
        raise ValueError(f"cannot read file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"file {p} is not UTF-8 text") from None


def run_secret_command(argv: tuple[str, ...] | list[str], base_dir: Path, env: Mapping[str, str] | None = None) -> str:
    """A ``k_command`` secret: run without a shell (in the config file's folder); its
    standard output, trailing newline stripped, is the value. A failure names the
    program, its exit status and the last line of its standard error, never its
    standard output."""
    prog = argv[0]
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=base_dir,
            env=dict(os.environ if env is None else env),
            start_new_session=True,  # a timeout kills the command's children too
        )
    except FileNotFoundError:
        raise ValueError(f"command {prog} not found") from None
    except OSError as e:
        raise ValueError(f"cannot run command {prog}: {e.strerror or e}") from None
    try:
        out, err = proc.communicate(timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        try:
            proc.communicate(timeout=2)
        except subprocess.TimeoutExpired:  # pragma: no cover - a pipe held open elsewhere
            pass
        raise ValueError(f"command {prog} did not finish within {COMMAND_TIMEOUT:g} s") from None
    lines = [ln.strip() for ln in err.decode("utf-8", "replace").splitlines() if ln.strip()]
    last = f": {lines[-1][:300]}" if lines else ""
    if proc.returncode != 0:
        rc = proc.returncode
        status = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
        raise ValueError(f"command {prog} failed ({status}){last}")
    try:
        value = out.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError(f"command {prog} printed something that is not UTF-8 text") from None
    if not value:
        raise ValueError(f"command {prog} printed nothing{last}")
    return value


def _key_lines(content: str) -> list[str]:
    """A keys file or command output: one key a line; blank lines and # comments ignored."""
    lines = [ln.strip() for ln in content.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


# --------------------------------------------------------------------------- the loader


class _Loader:
    def __init__(self, path: str, env: Mapping[str, str]) -> None:
        self.path = path
        self.env = env
        self.base_dir = Path(path).resolve().parent if path != "<string>" else Path.cwd()
        self.errors: list[str] = []
        self.service_names: list[str] = []
        self.secret_env: set[str] = set()

    def note_secret_env(self, node: yaml.Node) -> None:
        """Remember the variables a secret's value, file path or command refers to."""
        if isinstance(node, yaml.ScalarNode) and isinstance(node.value, str):
            self.secret_env.update(_VAR_REF_RE.findall(node.value))
        for item in node.value if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)) else ():
            for sub in item if isinstance(item, tuple) else (item,):
                self.note_secret_env(sub)

    # ---- error helpers
    def err(self, node: yaml.Node | None, keypath: str, message: str) -> None:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        self.errors.append(f"{self.path}{line}: {keypath}: {message}" if keypath else f"{self.path}{line}: {message}")

    # ---- scalars
    def scalar(self, node: yaml.Node, keypath: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.err(node, keypath, "expected a single value")
            return _INVALID
        value = _CONSTRUCTOR.construct_object(node)
        if isinstance(value, str):
            try:
                return interpolate(value, self.env, self.base_dir)
            except ValueError as e:
                self.err(node, keypath, str(e))
                return _INVALID
        return value

    def convert(self, tp: Any, node: yaml.Node, keypath: str) -> Any:
        if _strip_optional(tp) is Secret:
            self.note_secret_env(node)
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (typing.Union, types.UnionType):
            inner = [a for a in args if a is not type(None)]
            if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
                return None
            return self.convert(inner[0], node, keypath)
        if origin is tuple:
            if not isinstance(node, yaml.SequenceNode):
                self.err(node, keypath, "expected a list")
                return _INVALID
            items = [self.convert(args[0], item, f"{keypath}[{i}]") for i, item in enumerate(node.value)]
            return _INVALID if any(x is _INVALID for x in items) else tuple(items)
        if origin is dict:
            if not isinstance(node, yaml.MappingNode):
                self.err(node, keypath, "expected a mapping")
                return _INVALID
            out = {}
            for knode, vnode in node.value:
                key = self.scalar(knode, keypath)
                if not isinstance(key, str):
                    self.err(knode, keypath, "keys must be strings")
                    continue
                out[key] = self.convert(args[1], vnode, f"{keypath}.{key}")
            return _INVALID if any(v is _INVALID for v in out.values()) else out
        if origin is Literal:
            value = self.scalar(node, keypath)
            if value is _INVALID:
                return value
            if value not in args:
                self.err(node, keypath, f"must be one of {', '.join(map(str, args))}")
                return _INVALID
            return value
        if dataclasses.is_dataclass(tp):
            return self.section(tp, node, keypath)
        value = self.scalar(node, keypath)
        if value is _INVALID:
            return value
        return self.coerce(tp, value, node, keypath)

    def coerce(self, tp: Any, value: Any, node: yaml.Node, keypath: str) -> Any:
        try:
            if tp is bool:
                if isinstance(value, bool):
                    return value
                if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                    return value.lower() in ("true", "yes", "on", "1")
                raise ValueError("expected true or false")
            if tp is int:
                if isinstance(value, bool):
                    raise ValueError("expected an integer")
                if isinstance(value, int):
                    return value
                if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
                    return int(value)
                raise ValueError("expected an integer")
            if tp is float:
                if isinstance(value, bool):
                    raise ValueError("expected a number")
                if isinstance(value, (int, float)):
                    return float(value)
                if isinstance(value, str):
                    return float(value)
                raise ValueError("expected a number")
            if tp in (str, FilePath, Secret):
                if value is None:
                    raise ValueError("expected a value")
                if isinstance(value, (dict, list)):
                    raise ValueError("expected a string")
                text = value if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
                if tp is Secret:
                    return Secret(text)
                if tp is FilePath:
                    p = resolve_path(text, self.base_dir)
                    if not p.is_file():
                        raise ValueError(f"file {p} does not exist")
                    if not os.access(p, os.R_OK):
                        raise ValueError(f"file {p} is not readable")
                    return FilePath(str(p))
                return text
        except ValueError as e:
            self.err(node, keypath, str(e) if "expected" in str(e) or "file" in str(e) else "expected a number")
            return _INVALID
        raise TypeError(f"unsupported config type {tp!r}")  # a programming error

    def section(self, cls: type, node: yaml.Node, keypath: str, skip: tuple[str, ...] = ()) -> Any:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            node = yaml.MappingNode("tag:yaml.org,2002:map", [], node.start_mark, node.end_mark)
        if not isinstance(node, yaml.MappingNode):
            self.err(node, keypath, "expected a mapping")
            return _INVALID
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        given: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for knode, vnode in node.value:
            key = knode.value if isinstance(knode, yaml.ScalarNode) else None
            if not isinstance(key, str):
                self.err(knode, keypath, "keys must be strings")
                continue
            if key in given:
                self.err(knode, _join(keypath, key), "given twice")
                continue
            given[key] = (knode, vnode)
        values: dict[str, Any] = {}
        bad = False
        custom = {n: f.metadata["load"] for n, f in fields.items() if "load" in f.metadata}
        for key, (knode, vnode) in given.items():
            if key in skip:
                continue
            kp = _join(keypath, key)
            name, _ = _source_of(key)
            if key in custom or name in custom:
                continue  # below
            if name in fields and key not in fields and _is_secret(hints[name]):
                forms = [k for k in (name, f"{name}_file", f"{name}_command") if k in given]
                if len(forms) > 1:
                    if key == next(k for k in forms if k != name and k not in fields):  # said once
                        either = f"either {forms[0]} or {forms[1]}, not both" if len(forms) == 2 else f"only one of {', '.join(forms)}"
                        self.err(knode, kp, f"give {either}")
                    bad = True
                    continue
                content = self.secret_source(key, vnode, kp)
                if content is _INVALID:
                    bad = True
                elif typing.get_origin(_strip_optional(hints[name])) is tuple:
                    values[name] = tuple(Secret(ln) for ln in _key_lines(content))
                else:
                    values[name] = Secret(content)
                continue
            if key not in fields:
                self.err(knode, kp, "unknown key")
                bad = True
                continue
            value = self.convert(hints[key], vnode, kp)
            if value is _INVALID:
                bad = True
            else:
                values[key] = value
        for name, method in custom.items():
            parts = {k: given[k] for k in (name, f"{name}_file", f"{name}_command") if k in given and k not in skip}
            if parts:
                value = getattr(self, method)(parts, keypath)
                if value is _INVALID:
                    bad = True
                else:
                    values[name] = value
        for name, f in fields.items():
            if name in values or name in skip:
                continue
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
                if not bad:
                    self.err(node, _join(keypath, name), "required")
                bad = True
        if bad:
            return _INVALID
        try:
            obj = cls(**values)
            check = getattr(obj, "check", None)
            if check is not None:
                check()
        except FieldError as e:
            where = given.get(e.key, (None, node))[1] if e.key else node
            key = e.key
            if e.index is not None and key:
                key = f"{key}[{e.index}]"
                if isinstance(where, yaml.SequenceNode) and e.index < len(where.value):
                    where = where.value[e.index]
            self.err(where, _join(keypath, key) if key else keypath, e.message)
            return _INVALID
        return obj

    # ---- secrets from files and commands
    def secret_source(self, key: str, vnode: yaml.Node, kp: str) -> Any:
        """The text of a ``k_file`` or ``k_command`` secret, or _INVALID (the error said)."""
        self.note_secret_env(vnode)
        if key.endswith("_command"):
            if not isinstance(vnode, yaml.SequenceNode) or not vnode.value:
                self.err(vnode, kp, "expected a list [PROGRAM, ARG...] (run without a shell)")
                return _INVALID
            argv = self.convert(tuple[str, ...], vnode, kp)
            if argv is _INVALID:
                return _INVALID
            env = self.env if self.env is os.environ else {**os.environ, **self.env}
            try:
                return run_secret_command(argv, self.base_dir, env)
            except ValueError as e:
                self.err(vnode, kp, str(e))
                return _INVALID
        path = self.scalar(vnode, kp)
        if path is _INVALID:
            return _INVALID
        if not isinstance(path, str):
            self.err(vnode, kp, "expected a file path")
            return _INVALID
        try:
            return read_secret_file(path, self.base_dir)
        except ValueError as e:
            self.err(vnode, kp, str(e))
            return _INVALID

    # ---- inbound.keys
    def inbound_keys(self, parts: dict[str, tuple[yaml.Node, yaml.Node]], keypath: str) -> Any:
        """``keys`` (plain strings and named mappings), then ``keys_file`` and
        ``keys_command`` lines: unnamed keys are ``key1``, ``key2``, ... in that order."""
        entries: list[tuple[str | None, Secret, yaml.Node, str, tuple[str, ...] | None]] = []
        ok = True
        if "keys" in parts:
            kp = _join(keypath, "keys")
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
                        if named is _INVALID or not self.known_services(named.services, item, ikp):
                            ok = False
                            continue
                        entries.append((named.name, named.key, item, ikp, named.services))
                        continue
                    self.note_secret_env(item)
                    value = self.scalar(item, ikp)
                    if value is _INVALID:
                        ok = False
                    elif not isinstance(value, (str, int)) or isinstance(value, bool) or str(value) == "":
                        self.err(item, ikp, "expected a key (a non-empty string) or a {name, key, services} mapping")
                        ok = False
                    else:
                        entries.append((None, Secret(str(value)), item, ikp, None))
        for key in ("keys_file", "keys_command"):
            if key in parts:
                kp = _join(keypath, key)
                content = self.secret_source(key, parts[key][1], kp)
                if content is _INVALID:
                    ok = False
                    continue
                entries.extend((None, Secret(ln), parts[key][1], kp, None) for ln in _key_lines(content))
        if not ok:
            return _INVALID
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
                self.err(_child(node, "name") or node, f"{kp}.name" if named else kp, f"the key name {name} is already used by {names[name]}")
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
        return tuple(out) if ok else _INVALID

    def known_services(self, services: tuple[str, ...] | None, node: yaml.Node, kp: str) -> bool:
        ok = True
        for j, svc in enumerate(services or ()):
            if svc not in self.service_names:
                seq = _child(node, "services")
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
        services = self.services(services_node)
        if self.errors or top is _INVALID or services is _INVALID:
            raise ConfigError(self.errors or [f"{self.path}: invalid configuration"])
        return self.assemble(top, services, root)

    def services(self, node: yaml.Node | None) -> dict[str, ServiceConfig] | object:
        from authproxy.schemes import SCHEMES  # the schemes declare their own settings

        if node is None:
            return {}
        if not isinstance(node, yaml.MappingNode):
            self.err(node, "services", "expected a mapping of service name to settings")
            return _INVALID
        out: dict[str, ServiceConfig] = {}
        prefixes: dict[str, str] = {}
        hosts: dict[str, str] = {}  # forward-proxy host name → service
        for knode, vnode in node.value:
            name = knode.value if isinstance(knode, yaml.ScalarNode) else None
            kp = f"services.{name}"
            if not isinstance(name, str) or not NAME_RE.fullmatch(name):
                self.err(knode, kp, "service names are lower-case letters, digits and '-', starting with a letter or digit")
                continue
            if name in out:
                self.err(knode, kp, "given twice")
                continue
            svc = self.section(_ServiceSection, vnode, kp, skip=("auth",))
            auth_node = next((v for k, v in getattr(vnode, "value", []) if isinstance(k, yaml.ScalarNode) and k.value == "auth"), None)
            if auth_node is None:
                if isinstance(vnode, yaml.MappingNode):
                    self.err(vnode, f"{kp}.auth", "required")
                continue
            scheme_name, auth = self.auth(auth_node, f"{kp}.auth", SCHEMES)
            if svc is _INVALID:
                continue
            try:
                upstream = parse_upstream(svc.upstream)
            except ValueError as e:
                self.err(_child(vnode, "upstream"), f"{kp}.upstream", str(e))
                upstream = None
            prefix = svc.prefix if svc.prefix is not None else f"/{name}"
            if not prefix.startswith("/") or (prefix != "/" and prefix.endswith("/")) or "?" in prefix or "#" in prefix or "//" in prefix:
                self.err(_child(vnode, "prefix"), f"{kp}.prefix", "must start with '/' and not end with '/' (e.g. /fogbugz)")
                continue
            if prefix.startswith("/-/") or prefix == "/-":
                self.err(_child(vnode, "prefix"), f"{kp}.prefix", "/-/ is reserved for authproxy's own endpoints")
                continue
            if prefix in prefixes:
                self.err(_child(vnode, "prefix") or vnode, f"{kp}.prefix", f"{prefix} is already the prefix of service {prefixes[prefix]}")
                continue
            taken = [(i, h) for i, h in enumerate(svc.hosts) if h in hosts]
            for i, h in taken:
                seq = _child(vnode, "hosts")
                where = seq.value[i] if isinstance(seq, yaml.SequenceNode) and i < len(seq.value) else vnode
                self.err(where, f"{kp}.hosts[{i}]", f"{h} is already a host of service {hosts[h]}")
            if auth is _INVALID or upstream is None or taken:
                continue
            prefixes[prefix] = name
            hosts.update((h, name) for h in svc.hosts)
            out[name] = ServiceConfig(
                name=name,
                upstream=upstream,
                prefix=prefix,
                timeout=svc.timeout,
                ca_file=svc.ca_file,
                max_replay_body=svc.max_replay_body,
                scheme=scheme_name,
                auth=auth,
                allow=svc.policy(),
                scrub_responses=svc.scrub_responses,
                hosts=svc.hosts,
            )
        return out

    def auth(self, node: yaml.Node, keypath: str, schemes: Mapping[str, Any]) -> tuple[str, Any]:
        if not isinstance(node, yaml.MappingNode):
            self.err(node, keypath, "expected a mapping with a scheme key")
            return "", _INVALID
        scheme_node = _child(node, "scheme")
        if scheme_node is None:
            self.err(node, f"{keypath}.scheme", f"required (one of {', '.join(sorted(schemes))})")
            return "", _INVALID
        name = self.scalar(scheme_node, f"{keypath}.scheme")
        if name not in schemes:
            self.err(scheme_node, f"{keypath}.scheme", f"unknown scheme {name!r}; one of {', '.join(sorted(schemes))}")
            return "", _INVALID
        return name, self.section(schemes[name].Config, node, keypath, skip=("scheme",))

    def assemble(self, top: "_TopSection", services: dict[str, ServiceConfig], root: yaml.Node) -> Config:
        try:
            listen = parse_listen(top.listen)
        except ValueError as e:
            raise ConfigError([f"{self.path}{_line(_child(root, 'listen'))}: listen: {e}"]) from None
        inbound = top.inbound
        if not listen.is_loopback and not (inbound.allow_remote and inbound.keys):
            raise ConfigError(
                [
                    f"{self.path}{_line(_child(root, 'listen'))}: listen: {listen} is not a loopback address; "
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
            raise ConfigError([f"{self.path}{_line(_child(root, 'shutdown_timeout'))}: shutdown_timeout: must not be negative"])
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
        )


@dataclass(frozen=True)
class _TopSection:
    listen: str = DEFAULT_LISTEN
    state_dir: str | None = None
    log: LogConfig = field(default_factory=LogConfig)
    shutdown_timeout: float = 10.0
    inbound: InboundConfig = field(default_factory=InboundConfig)
    forward_proxy: ForwardProxyConfig = field(default_factory=ForwardProxyConfig)


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


@dataclass(frozen=True)
class _AllowRule:
    paths: tuple[str, ...]
    methods: tuple[str, ...] | None = None  # None: any method
    compiled: Rule | None = field(default=None, init=False, compare=False, repr=False)

    def check(self) -> None:
        try:
            rule = compile_rule(self.methods, self.paths)
        except RuleError as e:
            key, _, index = e.where.partition("[")
            raise FieldError(key, e.message, int(index[:-1]) if index else None) from None
        object.__setattr__(self, "compiled", rule)


@dataclass(frozen=True)
class _ServiceSection:
    upstream: str
    prefix: str | None = None
    timeout: TimeoutConfig = field(default_factory=TimeoutConfig)
    ca_file: FilePath | None = None
    max_replay_body: int = 1048576
    allow: tuple[_AllowRule, ...] | None = None
    scrub_responses: bool = True
    hosts: tuple[str, ...] = ()  # forward-proxy mode; exact names, case-insensitive

    def check(self) -> None:
        if self.max_replay_body < 0:
            raise FieldError("max_replay_body", "must not be negative")
        names = tuple(h.strip().lower().rstrip(".") for h in self.hosts)
        for i, h in enumerate(names):
            if not _HOST_RE.fullmatch(h) and not _is_ip(h):
                raise FieldError("hosts", "expected a host name (e.g. api.github.com) or an IP address, without port or scheme", i)
            if h in names[:i]:
                raise FieldError("hosts", f"{h} is listed twice", i)
        object.__setattr__(self, "hosts", names)
        if self.allow is not None and not self.allow:
            raise FieldError("allow", "an empty list would refuse every request (leave allow out to allow every request)")

    def policy(self) -> Policy | None:
        if self.allow is None:
            return None
        return Policy(tuple(r.compiled for r in self.allow if r.compiled is not None))


_HOST_RE = re.compile(r"(?=.{1,253}\Z)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _Invalid:
    def __repr__(self) -> str:
        return "<invalid>"


_INVALID: Any = _Invalid()
_CONSTRUCTOR = yaml.SafeLoader("")


def _join(keypath: str, key: str | None) -> str:
    return f"{keypath}.{key}" if keypath and key else (key or keypath)


def _child(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    return next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == key), None)


def _line(node: yaml.Node | None) -> str:
    return f":{node.start_mark.line + 1}" if node is not None else ""


def _source_of(key: str) -> tuple[str, str | None]:
    """``token_file`` → (token, file); ``token_command`` → (token, command); else (key, None)."""
    for suffix in ("_file", "_command"):
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], suffix[1:]
    return key, None


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _is_secret(tp: Any) -> bool:
    tp = _strip_optional(tp)
    if tp is Secret:
        return True
    return typing.get_origin(tp) is tuple and typing.get_args(tp)[0] is Secret


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
