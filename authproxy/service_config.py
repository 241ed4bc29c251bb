"""The ``services:`` section: one service's upstream, prefix, forward-proxy hosts, allow rules and scheme.

A service's ``auth`` block is read with the dataclass its scheme declares
(``Scheme.Config``, looked up in :data:`authproxy.schemes.SCHEMES`), by the
same loader as the rest of the file (:mod:`authproxy.settings`), so a scheme's
settings get the same checks and error messages as authproxy's own.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from authproxy.proxy.policy import Policy, Rule, RuleError, compile_rule
from authproxy.settings import INVALID, FieldError, FilePath, SectionLoader, child_node

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")


@dataclass(frozen=True)
class TimeoutConfig:
    connect: float = 10.0
    total: float = 300.0

    def check(self) -> None:
        if self.connect <= 0:
            raise FieldError("connect", "must be greater than 0")
        if self.total <= 0:
            raise FieldError("total", "must be greater than 0")


class _EncryptedKey(Exception):
    """Raised from the key's password callback: an encrypted key is refused, never prompted for."""


def _no_password() -> bytes:
    raise _EncryptedKey


@dataclass(frozen=True)
class TlsClientConfig:
    """``tls: {cert_file, key_file}``: the client certificate (mTLS) this service presents
    on every TLS connection it makes — proxied requests and credential requests alike
    (see :func:`authproxy.runtime.ssl_context`).

    The pair is loaded here, at config load, so that ``authproxy check`` and a SIGHUP
    refuse a certificate and key that do not belong together (or a key that is
    encrypted: there is nobody to type its passphrase) instead of the first request
    failing. Errors name the files and OpenSSL's reason, never their content.
    """

    cert_file: FilePath | None = None  # PEM: the certificate, then any intermediates
    key_file: FilePath | None = None  # PEM, unencrypted
    # The files' (mtime, size) when read: compared, so that a certificate renewed in
    # place (same paths) makes the service new on SIGHUP and is presented from then on.
    stamp: tuple[int, ...] = field(default=(), init=False, repr=False)

    def check(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            raise FieldError(missing, "required: tls needs both cert_file and key_file")
        if self.cert_file is None or self.key_file is None:
            return
        try:
            with open(self.cert_file, "rb") as f:
                pem = f.read()
            if b"-----BEGIN CERTIFICATE-----" not in pem:
                raise FieldError("cert_file", f"{self.cert_file} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(self.cert_file, self.key_file, password=_no_password)
        except _EncryptedKey:
            raise FieldError("key_file", f"{self.key_file} is encrypted; give an unencrypted PEM key (e.g. openssl pkey -in KEY -out PLAIN)") from None
        except ssl.SSLError as e:
            if e.reason == "KEY_VALUES_MISMATCH":
                why = f"is not the key of the certificate in {self.cert_file}"
            else:
                detail = f" ({e.reason})" if e.reason else ""
                why = f"cannot be used with {self.cert_file}: not an unencrypted PEM private key{detail}"
            raise FieldError("key_file", f"{self.key_file} {why}") from None
        except OSError as e:
            raise FieldError("cert_file", f"{self.cert_file}: {e.strerror or e}") from None
        stats = [os.stat(p) for p in (self.cert_file, self.key_file)]
        object.__setattr__(self, "stamp", tuple(n for st in stats for n in (st.st_mtime_ns, st.st_size)))


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
    # Key paths of its k_file / k_command secrets (e.g. auth.token_command): read again when
    # the upstream rejects what they built (authproxy.proxy.reread).
    secret_sources: tuple[str, ...] = field(default=(), compare=False)
    tls: TlsClientConfig | None = None  # the client certificate of every TLS connection (mTLS)


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


# --------------------------------------------------------------------------- reading the section


def load_services(loader: SectionLoader, node: yaml.Node | None) -> dict[str, ServiceConfig] | Any:
    """The ``services`` mapping, or INVALID; each problem is one of ``loader.errors``."""
    # Imported on first use, not with this module, so that `authproxy --version` and the
    # like do not load every scheme and aiohttp. (Not for a cycle: the schemes import
    # authproxy.settings and authproxy.secrets_source, never the product's config.)
    from authproxy.schemes import SCHEMES  # the schemes declare their own settings

    if node is None:
        return {}
    if not isinstance(node, yaml.MappingNode):
        loader.err(node, "services", "expected a mapping of service name to settings")
        return INVALID
    out: dict[str, ServiceConfig] = {}
    prefixes: dict[str, str] = {}
    hosts: dict[str, str] = {}  # forward-proxy host name → service
    for knode, vnode in node.value:
        name = knode.value if isinstance(knode, yaml.ScalarNode) else None
        kp = f"services.{name}"
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            loader.err(knode, kp, "service names are lower-case letters, digits and '-', starting with a letter or digit")
            continue
        if name in out:
            loader.err(knode, kp, "given twice")
            continue
        svc = loader.section(_ServiceSection, vnode, kp, skip=("auth",))
        auth_node = next((v for k, v in getattr(vnode, "value", []) if isinstance(k, yaml.ScalarNode) and k.value == "auth"), None)
        if auth_node is None:
            if isinstance(vnode, yaml.MappingNode):
                loader.err(vnode, f"{kp}.auth", "required")
            continue
        scheme_name, auth = _auth(loader, auth_node, f"{kp}.auth", SCHEMES)
        if svc is INVALID:
            continue
        try:
            upstream = parse_upstream(svc.upstream)
        except ValueError as e:
            loader.err(child_node(vnode, "upstream"), f"{kp}.upstream", str(e))
            upstream = None
        prefix = svc.prefix if svc.prefix is not None else f"/{name}"
        if not prefix.startswith("/") or (prefix != "/" and prefix.endswith("/")) or "?" in prefix or "#" in prefix or "//" in prefix:
            loader.err(child_node(vnode, "prefix"), f"{kp}.prefix", "must start with '/' and not end with '/' (e.g. /fogbugz)")
            continue
        if prefix.startswith("/-/") or prefix == "/-":
            loader.err(child_node(vnode, "prefix"), f"{kp}.prefix", "/-/ is reserved for authproxy's own endpoints")
            continue
        if prefix in prefixes:
            loader.err(child_node(vnode, "prefix") or vnode, f"{kp}.prefix", f"{prefix} is already the prefix of service {prefixes[prefix]}")
            continue
        taken = [(i, h) for i, h in enumerate(svc.hosts) if h in hosts]
        for i, h in taken:
            seq = child_node(vnode, "hosts")
            where = seq.value[i] if isinstance(seq, yaml.SequenceNode) and i < len(seq.value) else vnode
            loader.err(where, f"{kp}.hosts[{i}]", f"{h} is already a host of service {hosts[h]}")
        if auth is INVALID or upstream is None or taken or not _tls_fits(loader, vnode, kp, svc.tls, upstream, auth):
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
            tls=svc.tls,
        )
    return out


#: Credential URLs a scheme's settings may name: with one of them https, ``tls`` is used
#: even when the upstream is plain http.
_CREDENTIAL_URLS = ("token_url", "revocation_url", "api_url")


def _tls_fits(loader: SectionLoader, vnode: yaml.Node, kp: str, tls: "TlsClientConfig | None", upstream: Upstream, auth: Any) -> bool:
    """Strict on purpose: a client certificate that no connection would present, or a
    ``client_auth`` that needs one that is not there, is an error, not a surprise later."""
    if tls is None:
        if getattr(auth, "uses_client_certificate", False):
            where = child_node(child_node(vnode, "auth"), "client_auth")
            loader.err(where, f"{kp}.auth.client_auth", f"{getattr(auth, 'client_auth', 'this scheme')} authenticates with the service's client certificate: give the service tls: {{cert_file, key_file}}")
            return False
        return True
    if upstream.scheme == "https" or any(str(getattr(auth, k, None) or "").startswith("https://") for k in _CREDENTIAL_URLS):
        return True
    loader.err(child_node(vnode, "tls"), f"{kp}.tls", "not used: the upstream is plain http and no credential URL (token_url) is https")
    return False


def _auth(loader: SectionLoader, node: yaml.Node, keypath: str, schemes: Mapping[str, Any]) -> tuple[str, Any]:
    if not isinstance(node, yaml.MappingNode):
        loader.err(node, keypath, "expected a mapping with a scheme key")
        return "", INVALID
    scheme_node = child_node(node, "scheme")
    if scheme_node is None:
        loader.err(node, f"{keypath}.scheme", f"required (one of {', '.join(sorted(schemes))})")
        return "", INVALID
    name = loader.scalar(scheme_node, f"{keypath}.scheme")
    if name not in schemes:
        loader.err(scheme_node, f"{keypath}.scheme", f"unknown scheme {name!r}; one of {', '.join(sorted(schemes))}")
        return "", INVALID
    return name, loader.section(schemes[name].Config, node, keypath, skip=("scheme",))


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
    tls: TlsClientConfig | None = None

    def check(self) -> None:
        if self.tls is not None and self.tls.cert_file is None:
            object.__setattr__(self, "tls", None)  # tls: {cert_file: null, key_file: null} is no tls
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
