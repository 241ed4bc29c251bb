"""The proxy process: start, the request pipeline, shutdown.

It runs on authproxy's own HTTP/1.1 engine (:mod:`authproxy.http1`): a request
goes guard → router → forwarder in straight-line code, which is both the
cheapest path per request and the easiest to read. Where it listens is
:mod:`authproxy.proxy.listen`; its own ``/-/`` endpoints are
:mod:`authproxy.proxy.endpoints`; a reload on SIGHUP is
:mod:`authproxy.proxy.reload`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import signal
import time

from authproxy import systemd
from authproxy.access import AccessRecord, access_log
from authproxy.config import Config
from authproxy.metrics import Metrics
from authproxy.observe import log_event, set_log_redactor
from authproxy.http1.listener import raise_nofile_limit
from authproxy.http1.server import Exchange, Server, ServerLimits
from authproxy.proxy.endpoints import answer_reserved
from authproxy.proxy.errors import ProxyError, error_parts, reason
from authproxy.proxy.forward import Forwarder, Passthrough
from authproxy.proxy.forward_proxy import ForwardProxy, Via
from authproxy.proxy.headers import RESPONSE_DROP
from authproxy.proxy.guard import Guard
from authproxy.proxy import listen as listeners
from authproxy.proxy.listen import open_listeners
from authproxy.proxy.policy import Policy
from authproxy.proxy.reload import close_later
from authproxy.proxy.reload import reload as reload_config
from authproxy.proxy.reread import Rereader
from authproxy.proxy.routing import Router
from authproxy.runtime import ServiceRuntime
from authproxy.secret import CALLBACK_PARAMS, Redactor, UrlMasker, collect_secrets
from authproxy.store import Store, StoreError, open_store
from authproxy.tracing import tracing

log = logging.getLogger("authproxy.proxy")

from authproxy.runtime import REVOKE_BUDGET
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


class ProxyServer:
    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.runtimes: dict[str, ServiceRuntime] = {}
        self.forwarders: dict[str, Forwarder] = {}
        self.router: Router[Forwarder] = Router([])
        self.guard = Guard(config.inbound, config.listen)
        self.policies: dict[str, Policy] = {}  # services with allow rules (compiled at config load)
        self.forward_proxy: ForwardProxy | None = None  # CONNECT and absolute-form requests (built at config load)
        self.rereads = Rereader(self)  # k_file / k_command secrets read again after a rejection
        self._server: Server | None = None
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._retiring: set[asyncio.Task[None]] = set()
        self.store: Store | None = None  # where credentials live (built with the runtimes)
        # Logged URLs: each service's credential parameters and every configured secret
        # (in any encoding) masked; built once per config load, not per request.
        self._url_maskers: dict[str, UrlMasker] = {}
        self._url_masker = UrlMasker()
        self._callback_masker = UrlMasker(CALLBACK_PARAMS)
        self.stopping = False
        # Request ids: a random per-process prefix and a counter — unique, and no syscall per request.
        self._rid_prefix = os.urandom(5).hex() + "-"
        self._rid_counter = itertools.count(1)
        self._traced = False  # holds a reference to the process's tracing (OpenTelemetry)

    # ------------------------------------------------------------------ building
    def _build(self, config: Config, keep: dict[str, ServiceRuntime]) -> dict[str, ServiceRuntime]:
        if self.store is None or (config.store, config.state_dir) != (self.config.store, self.config.state_dir):
            # One store per configuration of it (a reload that keeps it keeps its connections).
            if self.store is not None:
                close_later(self, self.store)
            self.store = open_store(config)
        runtimes: dict[str, ServiceRuntime] = {}
        for name, svc in config.services.items():
            runtimes[name] = keep.get(name) or self.rereads.runtime(svc, config)
        return runtimes

    def _install(self, config: Config, runtimes: dict[str, ServiceRuntime]) -> None:
        self.config = config
        self.runtimes = runtimes
        self.forwarders = {n: self.forwarders.get(n) if self.forwarders.get(n) and self.forwarders[n].rt is rt else Forwarder(rt, self.metrics) for n, rt in runtimes.items()}  # type: ignore[misc]
        self.router = Router((f.prefix, f) for f in self.forwarders.values())
        self.guard = Guard(config.inbound, config.listen)
        self.policies = {n: svc.allow for n, svc in config.services.items() if svc.allow is not None}
        own = lambda: self._server.addresses() if self._server is not None else ()  # noqa: E731
        self.forward_proxy = ForwardProxy(config, self.forwarders, self.guard, self.handle, own, self.forward_proxy)
        # One redactor for every service's secrets: a secret of service A in a request
        # to service B (or in any log line) is still a leak.
        everyone = Redactor(collect_secrets(config))
        self._url_maskers = {n: UrlMasker(rt.scheme.secret_params, everyone) for n, rt in runtimes.items()}
        self._url_masker = UrlMasker((), everyone)
        self._callback_masker = UrlMasker(CALLBACK_PARAMS, everyone)
        set_log_redactor(everyone)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._traced = self._traced or tracing.setup()
        self._install(self.config, self._build(self.config, {}))
        await self._check_store()
        access_log.open_audit(self.config.log.audit_file)
        _, open_files = raise_nofile_limit()
        inbound = self.config.inbound
        limits = ServerLimits(
            idle_timeout=inbound.idle_timeout,
            header_timeout=inbound.header_timeout,
            max_connections=inbound.max_connections,
        )
        self._server = server = Server(self.handle, self._framing_error, limits)
        await open_listeners(server, self.config)
        for rt in self.runtimes.values():
            rt.creds.start()
        log_event(log, logging.INFO, "listening", address=", ".join(self.addresses()), services=len(self.runtimes), open_files=open_files)
        systemd.notify("READY=1", f"STATUS=serving {len(self.runtimes)} services")

    async def _check_store(self) -> None:
        """A shared store is reached once before serving: the connection is warm for the
        first fetch, and an unreachable store is said at once rather than at the first
        request. Not fatal: held credentials are none yet, new ones fail closed until it answers."""
        if self.store is None or not self.store.fleet:
            return
        try:
            await self.store.ping()
        except StoreError as e:
            log_event(log, logging.WARNING, "store_unreachable", error=str(e))
        else:
            log_event(log, logging.INFO, "store_connected", store=self.store.where)

    def addresses(self) -> list[str]:
        out: list[str] = []
        for addr in self._server.addresses() if self._server is not None else ():
            if isinstance(addr, tuple):
                host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
                out.append(f"{host}:{addr[1]}")
            else:
                out.append(f"unix:{addr}")
        return out

    @property
    def port(self) -> int:
        """The bound TCP port (for listen ports given as 0)."""
        for a in self.addresses():
            if not a.startswith("unix:"):
                return int(a.rsplit(":", 1)[1])
        raise RuntimeError("not listening on TCP")

    async def reload(self, path: str) -> bool:
        """SIGHUP: apply a new config (:func:`authproxy.proxy.reload.reload`)."""
        return await reload_config(self, path)

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), revoke (bounded), close."""
        self.stopping = True
        systemd.notify("STOPPING=1")
        log_event(log, logging.INFO, "stopping", inflight=self._inflight)
        if self._server is not None:
            self._server.stop_accepting()  # established connections go on
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.config.shutdown_timeout)
        if self._inflight:
            log_event(log, logging.WARNING, "shutdown_timeout", abandoned=self._inflight)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError, Exception):
                await self._server.close(2.0)
        all_rts = list(self.runtimes.values())
        for t in list(self._retiring):
            t.cancel()
        try:
            await asyncio.wait_for(asyncio.gather(*(rt.creds.shutdown() for rt in all_rts), return_exceptions=True), REVOKE_BUDGET)
        except asyncio.TimeoutError:
            log_event(log, logging.WARNING, "revoke_timeout", budget=REVOKE_BUDGET)
        for rt in all_rts:
            with contextlib.suppress(Exception):
                await rt.pool.close()
            with contextlib.suppress(Exception):
                await rt.session.close()
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.close()
        if self.config.listen.kind == "unix" and not listeners.handed:  # a worker's parent removes it
            with contextlib.suppress(OSError):
                os.unlink(self.config.listen.path)
        if self._traced:
            self._traced = False
            await tracing.shutdown()  # the spans not yet exported, bounded
        log_event(log, logging.INFO, "stopped")
        access_log.flush()

    # ------------------------------------------------------------------ the request pipeline
    async def handle(self, ex: Exchange, via: Via | None = None) -> None:
        """One request. ``via``: a request inside a CONNECT tunnel that forward-proxy
        mode intercepted (its service is the CONNECT's target's, not a prefix's)."""
        started = time.perf_counter()
        self._inflight += 1
        self._idle.clear()
        raw = ex.target
        rid = ex.headers.get("X-Request-Id")
        if rid is None or not _REQUEST_ID.match(rid):
            rid = f"{self._rid_prefix}{next(self._rid_counter):06x}"
        service: str | None = None
        key: str | None = None  # the inbound key's name, for the access record
        status = 500
        decision: str | None = None
        upstream_status: int | None = None
        scrubbed = 0
        credential: str | None = None
        span = tracing.start_request(ex) if tracing.enabled else None
        try:
            if via is None and raw.startswith("/-/"):
                status = await answer_reserved(ex, raw, self.guard, self.runtimes, self.metrics, self.stopping)
            else:
                guard = self.guard
                headers = ex.headers
                fp = self.forward_proxy
                direct = fp is not None and fp.wants(ex, via)
                if direct:  # forward-proxy mode: no Host rule, the key as Proxy-Authorization (407), route by host
                    key = fp.admit(ex, via)  # type: ignore[union-attr]
                    hop = await fp.route(ex, via, key)  # type: ignore[union-attr]
                    service = hop.service
                    if hop.fwd is None:  # a CONNECT or an unmapped target's tunnel, answered there
                        status, decision = hop.status, hop.decision
                        return
                    fwd, rest, query = hop.fwd, hop.rest, hop.query
                else:
                    guard.check_method(ex.method)
                    Guard.check_target(raw)
                    guard.check_host(headers)
                    guard.check_origin(headers)
                    key = guard.check_key(headers)
                    path, _, query = raw.partition("?")
                    match = self.router.match(path)
                    if match is None:
                        raise ProxyError("no_route", "no service is configured for this path")
                    fwd, rest = match
                service = fwd.name
                # Least privilege, before the forwarder asks for (or waits on) a credential.
                if key is not None:
                    guard.check_key_service(key, service, ex.method, rest or "/")
                policy = self.policies.get(service)
                if policy is not None and not policy.allows(ex.method, rest):
                    raise ProxyError("not_allowed", f"service {service} does not allow {ex.method} {rest or '/'} (no allow rule matches)", service)
                rt = fwd.rt
                rt.enter()
                try:
                    done = await fwd.forward(ex, rest, query, rid, direct, "https" if via is not None else "http")
                finally:
                    rt.leave()
                upstream_status, scrubbed, credential = done.upstream_status, done.scrubbed, done.credential
                decision = "replayed" if done.replayed else "forwarded"
                status = ex.status or 502
        except ProxyError as e:
            service = service or e.service
            decision = e.code
            status = await self._refuse(ex, e, rid)
        except Passthrough as e:
            decision = "local"  # the scheme's own reply, or the credential endpoint's
            scrubbed = e.scrubbed
            r = e.reply
            headers = [(k, v) for k, v in r.headers.items() if k.lower() not in RESPONSE_DROP]
            status = r.status
            await ex.respond(r.status, reason(r.status), headers, r.body)
        except BaseException as exc:  # one that escapes handle(): the record still says what happened
            decision = decision or ("client_closed" if isinstance(exc, ConnectionError) else "internal_error" if isinstance(exc, Exception) else "aborted")
            raise
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.request(service or "-", status, elapsed)
            if raw.startswith("/-/callback/"):
                masker = self._callback_masker
            else:
                masker = self._url_maskers.get(service, self._url_masker) if service else self._url_masker
            if decision is None:
                decision = "local" if raw.startswith("/-/") else "forwarded"
            logged = masker(raw)
            access_log.record(
                AccessRecord(rid, ex.peer, ex.method, logged, service, status, elapsed, key, decision, upstream_status, ex.bytes_in, ex.bytes_out, credential, scrubbed)
            )
            if span is not None:
                tracing.end_request(span, ex.method, logged, status, service, decision, rid, self.config)
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def _refuse(self, ex: Exchange, err: ProxyError, rid: str) -> int:
        if ex.status is not None:
            ex.abort()  # a response had already begun: the client must see it broken
            return ex.status
        status, headers, body = error_parts(err)
        headers.append(("X-Request-Id", rid))
        await ex.respond(status, reason(status), headers, body)
        return status

    def _framing_error(self, why: str, ex: Exchange | None) -> tuple[int, list[tuple[str, str]], bytes]:
        """A request the engine refused as malformed: one log line, the JSON error."""
        peer = ex.peer if ex is not None else None
        log_event(log, logging.WARNING, "bad_request", client=peer, reason=why)
        self.metrics.request("-", 400, 0.0)
        if ex is None or getattr(ex._conn, "_task", None) is None:
            # No handler runs for this request (its head did not parse, or its body broke
            # in the very read that brought the head), so its access record is made here.
            rid = ex.headers.get("X-Request-Id") if ex is not None else None
            if rid is None or not _REQUEST_ID.match(rid):
                rid = f"{self._rid_prefix}{next(self._rid_counter):06x}"
            service = None
            path = "-"
            if ex is not None:
                match = self.router.match(ex.target.partition("?")[0])
                service = match[0].name if match is not None else None
                path = self._url_maskers.get(service, self._url_masker)(ex.target) if service else self._url_masker(ex.target)
            access_log.record(
                AccessRecord(rid, peer, ex.method if ex is not None else "-", path, service, 400, 0.0, None, "bad_request", None, ex.bytes_in if ex is not None else 0)
            )
        return error_parts(ProxyError("bad_request", f"malformed request: {why}"))


async def serve(config: Config, config_path: str, stop: asyncio.Event | None = None, server: ProxyServer | None = None) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads. Returns the exit code.

    Signal handlers go in before the listener opens (and so before READY=1):
    ``systemctl start x && systemctl reload x`` sends SIGHUP the moment READY=1
    arrives, and the default action would terminate the service."""
    server = server or ProxyServer(config)  # a worker of workers: N brings its own (authproxy.workers)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[bool]] = set()
    started = asyncio.Event()

    async def reload() -> bool:
        await started.wait()
        return await server.reload(config_path)

    def on_hup() -> None:
        t = asyncio.ensure_future(reload())
        reloads.add(t)
        t.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        try:
            await server.start()
        except OSError as e:
            log_event(log, logging.ERROR, "listen_failed", listen=str(config.listen), error=e.strerror or str(e))
            await server.shutdown()
            return 1
        started.set()
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    for t in list(reloads):
        t.cancel()
    log_event(log, logging.INFO, "signal_received", action="shutdown")
    budget = config.shutdown_timeout + REVOKE_BUDGET + 5
    try:
        await asyncio.wait_for(server.shutdown(), budget)
    except asyncio.TimeoutError:
        log_event(log, logging.WARNING, "shutdown_forced", after=budget)
    return 0

