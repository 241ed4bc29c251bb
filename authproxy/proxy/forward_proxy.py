"""Forward-proxy mode: ``CONNECT host:port`` and absolute-form requests on the same listener.

Tools that can only be given ``HTTPS_PROXY`` keep calling the real host; a target
whose host a service names (``services.X.hosts``) and whose port is that
upstream's is intercepted:

* ``CONNECT``: answered ``200``, then the client's TLS handshake is completed with
  a leaf certificate from authproxy's CA (:mod:`authproxy.proxy.ca`) and every
  HTTP/1.1 request inside the tunnel goes through the proxy's own pipeline for
  that service (the server's handler, bound to the CONNECT's target: see :class:`Via`);
* absolute-form ``METHOD http://host[:port]/path``: served directly the same way.

Either way the path must lie under the upstream's base path, and what follows it
is what allow rules see and what the forwarder appends to the base path. Any
other target is refused (``unmapped: refuse``) or relayed untouched, without a
credential (``unmapped: tunnel``), never to a loopback or link-local address
(unless that is a configured upstream) nor to authproxy itself.

The checks run in the SPEC's order: ``bad_request`` (the target), the Origin rule
(the Host rule does not apply: a proxy request's Host is the target's), the key
as ``Proxy-Authorization`` (407), then the target's mapping (``not_allowed``).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable, NamedTuple

from authproxy.http1.errors import ClientDisconnected, ResponseBodyError, UpstreamError, UpstreamTimeout
from authproxy.http1.pool import Pool
from authproxy.http1.tunnel import RawProtocol, relay
from authproxy.observe import log_event
from authproxy.proxy.ca import CertificateAuthority, default_ca_dir
from authproxy.proxy.errors import ProxyError
from authproxy.proxy.guard import Guard
from authproxy.proxy.headers import REQUEST_DROP, RESPONSE_DROP, end_to_end

if TYPE_CHECKING:
    from authproxy.config import Config
    from authproxy.http1.server import Exchange
    from authproxy.proxy.forward import Forwarder

log = logging.getLogger("authproxy.proxy")

TUNNEL_CONNECT_TIMEOUT = 10.0  # seconds to reach an unmapped target
TUNNEL_TOTAL_TIMEOUT = 300.0  # an unmapped absolute-form request, whole
_AUTHORITY = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")
_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(\d{1,5}))?([/?][^#]*)?")
_PLAIN_DROP = REQUEST_DROP - {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}  # relayed: the client's own X-Forwarded-* pass
_IPV4_THIS_NET = ipaddress.ip_network("0.0.0.0/8")


def is_forbidden_address(ip: str) -> bool:
    """A target address never relayed to (unless it is a configured upstream's):
    loopback, link-local, unspecified ("this host"), also as IPv4-mapped IPv6.

    A test seam too: tests run everything on loopback, so a test of
    ``unmapped: tunnel`` replaces this function to reach its loopback echo server."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback or addr.is_link_local or addr.is_unspecified or (addr.version == 4 and addr in _IPV4_THIS_NET)


class Via(NamedTuple):
    """An intercepted CONNECT: the requests inside its TLS tunnel belong to this
    target, and carry the key name the CONNECT presented."""

    host: str
    port: int
    key: str | None


class Hop(NamedTuple):
    """Where a proxy request goes. ``fwd`` set: through the forwarder, with ``rest``
    (the path after the upstream's base path) and ``query``. ``fwd`` None: already
    answered here (a CONNECT, a tunnel), with ``status`` and ``decision``."""

    service: str | None
    fwd: "Forwarder | None"
    rest: str = ""
    query: str = ""
    status: int = 0
    decision: str | None = None


Handle = Callable[..., Awaitable[None]]  # ProxyServer.handle(ex, via=...)


class ForwardProxy:
    """Built per config load (like the router); keeps the CA across reloads."""

    def __init__(
        self,
        config: "Config",
        forwarders: dict[str, "Forwarder"],
        guard: Guard,
        handle: Handle,
        own_addresses: Callable[[], Iterable[object]],
        previous: "ForwardProxy | None" = None,
    ) -> None:
        fp = config.forward_proxy
        self.enabled = fp.enabled
        self.unmapped = fp.unmapped
        self.ca_dir = Path(fp.ca_dir) if fp.ca_dir else default_ca_dir(config.state_dir)
        self.guard = guard
        self._handle = handle
        self._own_addresses = own_addresses
        self.hosts: dict[str, Forwarder] = {h: forwarders[n] for n, svc in config.services.items() for h in svc.hosts if n in forwarders}
        self.upstreams = frozenset((svc.upstream.host.lower(), svc.upstream.port) for svc in config.services.values())
        same_ca = previous is not None and previous.ca_dir == self.ca_dir
        self._ca: CertificateAuthority | None = previous._ca if same_ca else None  # type: ignore[union-attr]
        self._ca_loading: asyncio.Future[CertificateAuthority] | None = None

    def wants(self, ex: "Exchange", via: Via | None) -> bool:
        """A proxy request: inside an intercepted tunnel, or (in forward-proxy mode) a
        CONNECT or an absolute-form request."""
        return via is not None or (self.enabled and (ex.method == "CONNECT" or not ex.target.startswith("/")))

    # ------------------------------------------------------------------ checks
    def admit(self, ex: "Exchange", via: Via | None) -> str | None:
        """The checks before routing; returns the inbound key's name."""
        method = ex.method
        if method == "TRACE" or (method == "CONNECT" and via is not None):
            raise ProxyError("bad_request", f"{method} is not proxied", status=405)
        if via is not None:
            if not self.enabled:
                raise ProxyError("not_allowed", "forward-proxy mode is off")
            Guard.check_target(ex.target)
        elif method == "CONNECT":
            _authority(ex.target)
        else:
            _absolute(ex.target)
        self.guard.check_origin(ex.headers)
        if via is not None:
            if not self.guard.key_still_valid(via.key):
                raise ProxyError("inbound_key_required", "the key this tunnel was opened with is no longer configured", status=407)
            return via.key
        return self.guard.check_proxy_key(ex.headers)

    def mapped(self, host: str, port: int) -> "Forwarder | None":
        fwd = self.hosts.get(host)
        return fwd if fwd is not None and fwd.upstream.port == port else None

    # ------------------------------------------------------------------ routing
    async def route(self, ex: "Exchange", via: Via | None, key: str | None) -> Hop:
        if via is not None:
            fwd = self.mapped(via.host, via.port)
            if fwd is None:
                raise ProxyError("not_allowed", f"{via.host}:{via.port} is no longer a host any service names")
            path, _, query = ex.target.partition("?")
            return Hop(fwd.name, fwd, _under_base(fwd, ex.method, path), query)
        if ex.method == "CONNECT":
            host, port = _authority(ex.target)
            fwd = self.mapped(host, port)
            if fwd is not None:
                return await self._intercept(ex, fwd, Via(host, port, key))
            return await self._tunnel(ex, host, port)
        host, port, target = _absolute(ex.target)
        fwd = self.mapped(host, port)
        if fwd is not None:
            path, _, query = target.partition("?")
            return Hop(fwd.name, fwd, _under_base(fwd, ex.method, path), query)
        return await self._plain(ex, host, port, target)

    async def _intercept(self, ex: "Exchange", fwd: "Forwarder", via: Via) -> Hop:
        """Answer 200, complete the client's TLS handshake as ``via.host``, and serve the
        requests inside with the proxy's handler bound to this target."""
        ctx = (await self.ca()).server_context(via.host)
        await ex.respond(200, "Connection established", [])
        try:
            await ex.start_tls(ctx, functools.partial(self._handle, via=via))
        except ClientDisconnected as e:
            # Most often: the client does not trust authproxy's CA (see `authproxy ca`).
            log_event(log, logging.WARNING, "tls_handshake_failed", host=via.host, service=fwd.name, client=ex.peer, error=str(e), ca=str(self.ca_dir / "ca.pem"))
            return Hop(fwd.name, None, status=200, decision="tls_failed")
        return Hop(fwd.name, None, status=200, decision="intercepted")

    async def ca(self) -> CertificateAuthority:
        """The CA, loaded (or made) on first need, off the event loop, once."""
        if self._ca is not None:
            return self._ca
        if self._ca_loading is None:
            self._ca_loading = asyncio.ensure_future(asyncio.to_thread(CertificateAuthority.load_or_create, self.ca_dir))
        try:
            self._ca = await asyncio.shield(self._ca_loading)
        except (OSError, ValueError) as e:
            self._ca_loading = None
            log_event(log, logging.ERROR, "ca_unavailable", ca_dir=str(self.ca_dir), error=str(e))
            raise ProxyError("upstream_unreachable", f"authproxy's CA in {self.ca_dir} cannot be used: {e}") from None
        return self._ca

    # ------------------------------------------------------------------ unmapped targets
    async def _resolve(self, host: str, port: int) -> list[str]:
        """``unmapped: tunnel`` (else 403): the target's addresses, resolved once (the
        relay connects to what was checked), none loopback/link-local unless the
        target is a configured upstream, none authproxy's own listener."""
        if self.unmapped != "tunnel":
            raise ProxyError("not_allowed", f"{host}:{port} is not a host any service names (forward_proxy.unmapped: refuse)")
        try:
            ips = [str(ipaddress.ip_address(host))]
        except ValueError:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as e:
                raise ProxyError("upstream_unreachable", f"cannot resolve {host}: {e.strerror or e}") from None
            ips = list(dict.fromkeys(str(info[4][0]) for info in infos))
        upstream = (host, port) in self.upstreams or any((ip, port) in self.upstreams for ip in ips)
        for ip in ips:
            if self._is_self(ip, port) or (not upstream and is_forbidden_address(ip)):
                raise ProxyError("not_allowed", f"{host}:{port} is a loopback, link-local or authproxy's own address ({ip})")
        if not ips:
            raise ProxyError("upstream_unreachable", f"{host} has no address")
        return ips

    def _is_self(self, ip: str, port: int) -> bool:
        for addr in self._own_addresses():
            if not isinstance(addr, tuple) or addr[1] != port:
                continue
            own = ipaddress.ip_address(addr[0])
            if own.is_unspecified:  # listening on every address: is ip one of this machine's?
                return _is_local_address(ip)
            if ipaddress.ip_address(ip) == own:
                return True
        return False

    async def _tunnel(self, ex: "Exchange", host: str, port: int) -> Hop:
        """``CONNECT`` to an unmapped target: the bytes relayed untouched both ways."""
        ips = await self._resolve(host, port)
        loop = asyncio.get_running_loop()
        try:
            up_transport, proto = await asyncio.wait_for(loop.create_connection(RawProtocol, ips[0], port), TUNNEL_CONNECT_TIMEOUT)
        except asyncio.TimeoutError:
            raise ProxyError("upstream_timeout", f"{host}:{port} did not answer in time") from None
        except OSError as e:
            raise ProxyError("upstream_unreachable", f"cannot reach {host}:{port}: {e.strerror or e}") from None
        try:
            await ex.respond(200, "Connection established", [])
            client_transport, client_stream = ex.takeover()
        except BaseException:
            up_transport.close()
            raise
        sent, received = await relay(client_transport, client_stream, up_transport, proto.stream)  # type: ignore[arg-type]
        ex.bytes_in += sent
        ex.bytes_out += received
        return Hop(None, None, status=200, decision="tunnel")

    async def _plain(self, ex: "Exchange", host: str, port: int, target: str) -> Hop:
        """An absolute-form request to an unmapped target: sent on (hop-by-hop headers
        and the key removed, no credential), its reply streamed back, one connection
        each (a client's next request may be for another host)."""
        ips = await self._resolve(host, port)
        authority = f"[{host}]" if ":" in host else host
        pool = Pool(ips[0], port, limit=1, connect_timeout=TUNNEL_CONNECT_TIMEOUT, total_timeout=TUNNEL_TOTAL_TIMEOUT,
                    host_header=authority if port == 80 else f"{authority}:{port}")  # fmt: skip
        try:
            stream = _body(ex) if ex.has_body else None
            try:
                resp = await pool.request(ex.method, target, end_to_end(ex.headers, _PLAIN_DROP), stream=stream,
                                          content_length=ex.content_length if stream is not None else None)  # fmt: skip
            except UpstreamTimeout:
                raise ProxyError("upstream_timeout", f"{host}:{port} did not answer in time") from None
            except (UpstreamError, OSError) as e:
                raise ProxyError("upstream_unreachable", f"cannot reach {host}:{port}: {e}") from None
            try:
                headers = list(end_to_end(resp.headers, RESPONSE_DROP).items())
                await ex.start(resp.status, resp.reason, headers, content_length=resp.content_length)
                if ex.method != "HEAD" and resp.status not in (204, 304):
                    try:
                        while chunk := await resp.read():
                            await ex.write(chunk)
                    except (ResponseBodyError, UpstreamError):
                        ex.abort()  # broken, never short-but-complete-looking
                        return Hop(None, None, status=resp.status, decision="tunnel")
                await ex.end()
            finally:
                resp.release()
        finally:
            await pool.close()
        return Hop(None, None, status=resp.status, decision="tunnel")


def _authority(target: str) -> tuple[str, int]:
    """``CONNECT``'s authority-form target → (lower-case host without brackets, port)."""
    m = _AUTHORITY.fullmatch(target)
    port = int(m.group(2)) if m else 0
    if not m or not 0 < port <= 65535:
        raise ProxyError("bad_request", "CONNECT needs a host:port target")
    return _host(m.group(1)), port


def _absolute(target: str) -> tuple[str, int, str]:
    """``http://host[:port]/path?query`` → (host, port, origin-form target)."""
    m = _ABSOLUTE.fullmatch(target)
    if not m or m.group(1).lower() != "http":
        raise ProxyError("bad_request", "an absolute-form target must be http://host[:port]/path (https goes through CONNECT)")
    port = int(m.group(3)) if m.group(3) else 80
    if not 0 < port <= 65535:
        raise ProxyError("bad_request", "port out of range")
    rest = m.group(4) or "/"
    if rest.startswith("?"):
        rest = "/" + rest
    Guard.check_target(rest)
    return _host(m.group(2)), port, rest


def _host(value: str) -> str:
    return value.lower().removeprefix("[").removesuffix("]").rstrip(".")


def _under_base(fwd: "Forwarder", method: str, path: str) -> str:
    """The path after the upstream's base path (what allow rules match, what the
    forwarder appends to the base path); 403 for a path outside it."""
    base = fwd.base_path
    if not base:
        return path
    if path == base or path.startswith(base + "/"):
        return path[len(base):]
    raise ProxyError("not_allowed", f"service {fwd.name}: {method} {path} is not under the upstream's base path {base}", fwd.name)


def _is_local_address(ip: str) -> bool:
    """One of this machine's addresses (binding to it succeeds)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
    except OSError:
        return False
    return True


async def _body(ex: "Exchange"):  # type: ignore[no-untyped-def]
    while chunk := await ex.read():
        yield chunk
