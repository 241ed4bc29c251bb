"""authproxy's configuration file → frozen dataclasses.

This module holds :class:`Config` (the whole file), the loader of the whole
document (the top level, ``inbound.keys``) and :func:`load_config`; the names
of the product's sections are re-exported from here. The rest is one idea a
module, so that a scheme declares its settings as a dataclass in its own module
and gets the same treatment as everything else without importing this one:

* :mod:`authproxy.config_sections`: the product's own sections (``listen``,
  ``log``, ``inbound`` and its keys, ``forward_proxy``, ``store``).

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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from authproxy.config_sections import DEFAULT_LISTEN as DEFAULT_LISTEN  # re-exported, like every section name below
from authproxy.config_sections import KEY_NAME_RE as KEY_NAME_RE
from authproxy.config_sections import MAX_WORKERS as MAX_WORKERS
from authproxy.config_sections import ForwardProxyConfig as ForwardProxyConfig
from authproxy.config_sections import InboundConfig as InboundConfig
from authproxy.config_sections import InboundKey as InboundKey
from authproxy.config_sections import Listen as Listen
from authproxy.config_sections import LogConfig as LogConfig
from authproxy.config_sections import NamedKeySection, TopSection
from authproxy.config_sections import StoreConfig as StoreConfig
from authproxy.config_sections import parse_listen as parse_listen
from authproxy.config_sections import parse_workers as parse_workers
from authproxy.secret import Secret
from authproxy.secrets_source import SecretLoader
from authproxy.secrets_source import interpolate as interpolate  # re-exported: part of the config's API
from authproxy.service_config import ServiceConfig, load_services
from authproxy.service_config import parse_upstream as parse_upstream  # re-exported: part of the config's API
from authproxy.settings import INVALID, ConfigError, child_node, join_keypath, key_lines, line_suffix, resolve_path

COMMAND_TIMEOUT = 10.0  # seconds a k_command may take
DEFAULT_STATE_DIR = "~/.local/state/authproxy"
DEFAULT_CONFIG_FILE = "authproxy.yaml"


# --------------------------------------------------------------------------- the whole file


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
    # Read by a running proxy (tolerant): service → why its k_file / k_command secret could
    # not be read. Such a service is in `error` until a later read succeeds (proxy/reread.py).
    unreadable: Mapping[str, str] = field(default_factory=dict, compare=False)


# --------------------------------------------------------------------------- the loader


class _Loader(SecretLoader):
    """The whole document: the top-level sections, ``inbound.keys``, the services."""

    def __init__(self, path: str, env: Mapping[str, str], tolerant: bool = False) -> None:
        super().__init__(path, env, command_timeout=COMMAND_TIMEOUT)
        self.service_names: list[str] = []
        self.tolerant = tolerant

    def tolerate(self, keypath: str) -> str | None:
        """A running proxy re-reading its file: a service's secret that cannot be read
        puts that service alone in ``error`` (at start and in ``check`` it is an error)."""
        return keypath.split(".")[1] if self.tolerant and keypath.startswith("services.") else None

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
                        named = self.section(NamedKeySection, item, ikp)
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
        top = self.section(TopSection, root, "", skip=("services",))
        services = load_services(self, services_node)
        if self.errors or top is INVALID or services is INVALID:
            raise ConfigError(self.errors or [f"{self.path}: invalid configuration"])
        return self.assemble(top, services, root)

    def assemble(self, top: "TopSection", services: dict[str, ServiceConfig], root: yaml.Node) -> Config:
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
        # Which secrets to read again when the upstream rejects what they built.
        services = {n: dataclasses.replace(svc, secret_sources=self.sources_of(n)) for n, svc in services.items()}
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
            unreadable=dict(self.unreadable),
        )

    def sources_of(self, service: str) -> tuple[str, ...]:
        """The key paths (within the service) of its ``k_file`` / ``k_command`` secrets."""
        prefix = f"services.{service}."
        return tuple(kp[len(prefix) :] for kp in self.sources if kp.startswith(prefix))


# --------------------------------------------------------------------------- entry points


def config_path(explicit: str | None, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return explicit or env.get("AUTHPROXY_CONFIG") or DEFAULT_CONFIG_FILE


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None, *, tolerant: bool = False) -> Config:
    """Read the file. ``tolerant`` (a running proxy's SIGHUP and re-reads): a service's
    secret that cannot be read is named in ``Config.unreadable`` instead of an error."""
    path = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the configuration file: {e.strerror or e}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: the configuration file is not UTF-8 text"]) from None
    return _Loader(path, os.environ if env is None else env, tolerant).load(text)


def load_config_text(text: str, env: Mapping[str, str] | None = None, path: str = "<string>") -> Config:
    return _Loader(path, os.environ if env is None else env).load(text)
