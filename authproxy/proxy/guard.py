"""Who may use the proxy: the checks that run before any routing or credential.

A credential-injecting listener on localhost is reachable by every web page the
user opens (cross-site requests, DNS rebinding), so browsers are refused unless
an operator allowed an origin, and a Host that is not ours is refused outright.
Nothing here knows about schemes; of services only which ones a named inbound key
may use.
"""

from __future__ import annotations

import base64
import hmac
import re
from typing import Mapping
from urllib.parse import unquote

from authproxy.config import InboundConfig, Listen
from authproxy.proxy.errors import ProxyError

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
KEY_HEADER = "X-Authproxy-Key"
_SEGMENT_SPLIT = re.compile(r"[/\\]")


def split_host(value: str) -> tuple[str, str | None]:
    """``Host`` value → (lower-case host, port or None); IPv6 keeps its brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return value, None
        host, rest = value[: end + 1], value[end + 1 :]
        return host, rest[1:] if rest.startswith(":") else None
    host, sep, port = value.rpartition(":")
    if sep and port.isdigit():
        return host, port
    return value, None


class Guard:
    def __init__(self, inbound: InboundConfig, listen: Listen) -> None:
        self.inbound = inbound
        allowed_any_port = set(LOCAL_HOSTS)
        allowed_exact: set[str] = set()
        if listen.kind == "tcp":
            h = f"[{listen.host}]" if ":" in listen.host else listen.host
            allowed_any_port.add(h.lower())
        for entry in inbound.hosts:
            host, port = split_host(entry)
            if port is None:
                allowed_any_port.add(host)
            else:
                allowed_exact.add(f"{host}:{port}")
        self._hosts = frozenset(allowed_any_port)
        self._hosts_exact = frozenset(allowed_exact)
        self._origins = frozenset(o.rstrip("/").lower() for o in inbound.allow_origins)
        self._keys = tuple((k.name, k.key.reveal().encode()) for k in inbound.keys)
        self._key_services = {k.name: None if k.services is None else frozenset(k.services) for k in inbound.keys}
        self._seen_hosts: set[str] = set()

    @staticmethod
    def check_method(method: str) -> None:
        """``TRACE`` would make an upstream that reflects requests hand back the
        injected credential; ``CONNECT`` is only for forward-proxy mode."""
        if method == "TRACE" or method == "CONNECT":
            raise ProxyError("bad_request", f"{method} is not proxied", status=405)

    @staticmethod
    def check_target(raw_path: str) -> None:
        """``bad_request`` for what must never be forwarded: absolute-form or authority
        targets, and dot-segments that could climb out of a service's base path."""
        if not raw_path.startswith("/"):
            raise ProxyError("bad_request", "the request target must be a path (absolute-form and authority-form are not proxied)")
        path = raw_path.split("?", 1)[0]
        if "#" in raw_path or "\\" in path or "\0" in path:
            raise ProxyError("bad_request", "the path contains a character that is not allowed")
        if ("/." in path or "%" in path) and _climbs(path):  # a dot segment starts right after a '/' (a backslash is refused above)
            raise ProxyError("bad_request", "the path must not contain '.' or '..' segments (plain or percent-encoded)")

    def check_host(self, headers: Mapping[str, str]) -> None:
        value = headers.get("Host")
        if value is None or value in self._seen_hosts:
            return  # no Host: not a browser (every browser sends one)
        host, port = split_host(value)
        if host in self._hosts or (port is not None and f"{host}:{port}" in self._hosts_exact):
            if len(self._seen_hosts) < 64:
                self._seen_hosts.add(value)  # clients send the same few values: remember the allowed ones
            return
        raise ProxyError("host_not_allowed", "the Host header names a host this proxy does not serve; add it to inbound.hosts")

    def check_origin(self, headers: Mapping[str, str]) -> None:
        origin = headers.get("Origin")
        if origin is not None:
            if origin.rstrip("/").lower() in self._origins:
                return
            raise ProxyError("origin_forbidden", "browser requests from this origin are not allowed (see inbound.allow_origins)")
        site = headers.get("Sec-Fetch-Site")
        if site is not None and site.lower() in ("cross-site", "same-site"):
            raise ProxyError("origin_forbidden", "cross-site browser requests are not allowed")

    def check_key(self, headers: Mapping[str, str]) -> str | None:
        """The name of the inbound key the request carries (None when no keys are
        configured); ``inbound_key_required`` without a valid one."""
        if not self._keys:
            return None
        given = headers.get(KEY_HEADER)
        if given is not None:
            found = self._key_named(given.encode("utf-8", "surrogateescape"))
            if found is not None:
                return found
        raise ProxyError("inbound_key_required", f"this proxy requires a valid {KEY_HEADER} header")

    def _key_named(self, raw: bytes) -> str | None:
        found: str | None = None
        for name, key in self._keys:  # compare with every key, in constant time each
            if hmac.compare_digest(raw, key) and found is None:
                found = name
        return found

    def check_proxy_key(self, headers: Mapping[str, str]) -> str | None:
        """Forward-proxy requests: the key as ``Proxy-Authorization: Basic
        base64(ANY-NAME:KEY)`` (``HTTPS_PROXY=http://name:KEY@host:port``) or
        ``X-Authproxy-Key``; without a valid one, 407 ``inbound_key_required``."""
        if not self._keys:
            return None
        auth = headers.get("Proxy-Authorization")
        if auth is not None:
            kind, _, b64 = auth.strip().partition(" ")
            if kind.lower() == "basic":
                try:
                    _, sep, key = base64.b64decode(b64.strip(), validate=True).partition(b":")
                except ValueError:
                    sep = key = b""
                found = self._key_named(key) if sep else None
                if found is not None:
                    return found
        given = headers.get(KEY_HEADER)
        if given is not None:
            found = self._key_named(given.encode("utf-8", "surrogateescape"))
            if found is not None:
                return found
        raise ProxyError("inbound_key_required", "this proxy requires a valid key in Proxy-Authorization (http://NAME:KEY@host:port)", status=407)

    def key_still_valid(self, name: str | None) -> bool:
        """A key name admitted earlier (a CONNECT's, for the requests inside its tunnel)
        still names a configured key (keys may change on SIGHUP)."""
        return not self._keys or name in self._key_services

    def check_key_service(self, key: str | None, service: str, method: str, path: str) -> None:
        """``not_allowed`` when a named key's ``services`` leave out this service."""
        if key is None:
            return
        services = self._key_services.get(key)
        if services is not None and service not in services:
            raise ProxyError("not_allowed", f"key {key} may not use service {service}: {method} {path} refused", service)

    def allows_origin_header(self, origin: str | None) -> bool:
        return origin is not None and origin.rstrip("/").lower() in self._origins


def _climbs(path: str) -> bool:
    """A path that, with its escapes decoded once, has a ``.``/``..`` segment (split on
    ``/`` or ``\\``) or a segment starting ``..;``: an upstream that decodes it, or a
    servlet container that strips ``;`` parameters, would leave the base path."""
    for seg in _SEGMENT_SPLIT.split(unquote(path)):
        if seg == "." or seg == ".." or seg.startswith("..;"):
            return True
    return False
