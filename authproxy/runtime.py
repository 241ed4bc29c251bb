"""One configured service made live: its connection pool, scheme and credential manager.

Shared by the proxy and the CLI commands (``token``, ``login``, ``logout``,
``rotate``), so a token printed by ``authproxy token`` comes from exactly the
code path the proxy uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

import aiohttp

from typing import TYPE_CHECKING

from authproxy.service_config import ServiceConfig, TlsClientConfig
from authproxy.credentials import ServiceCredentials
from authproxy.metrics import Metrics
from authproxy.http1.pool import Pool
from authproxy.schemes import SCHEMES
from authproxy.schemes.base import Scheme, SchemeContext, Stateful
from authproxy.store.base import Store

REVOKE_BUDGET = 5.0  # seconds for all logoff/expire steps at shutdown
if TYPE_CHECKING:
    from authproxy.config import Config

POOL_LIMIT = 512  # connections per upstream; beyond this requests queue for one
KEEPALIVE = 30.0


def ssl_context(ca_file: str | None, tls: TlsClientConfig | None = None) -> ssl.SSLContext:
    """The system's trust store, plus the service's own CA bundle when it names one, and
    the service's client certificate when it has one: one context for the upstream pool
    and the credential session, so every TLS connection of the service presents it."""
    ctx = ssl.create_default_context()
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    if tls is not None and tls.cert_file and tls.key_file:
        # Checked at config load (TlsClientConfig); never prompt for a passphrase here.
        ctx.load_cert_chain(tls.cert_file, tls.key_file, password=lambda: b"")
    return ctx


def make_session(cfg: ServiceConfig, tls: ssl.SSLContext | None) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=POOL_LIMIT,
        limit_per_host=POOL_LIMIT,
        keepalive_timeout=KEEPALIVE,
        ssl=tls if tls is not None else True,
        ttl_dns_cache=60,
        enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # bodies pass through byte for byte
        cookie_jar=aiohttp.DummyCookieJar(),  # an upstream's cookies are the client's business
        timeout=aiohttp.ClientTimeout(total=cfg.timeout.total, sock_connect=cfg.timeout.connect),
        read_bufsize=256 * 1024,
        trust_env=False,  # never route a credential through an ambient HTTP(S)_PROXY
    )


class ServiceRuntime:
    def __init__(self, cfg: ServiceConfig, store: Store, metrics: Metrics | None = None) -> None:
        self.config = cfg
        self.name = cfg.name
        needs = cfg.upstream.scheme == "https" or cfg.ca_file or cfg.tls
        self.tls = ssl_context(cfg.ca_file, cfg.tls) if needs else None
        self.session = make_session(cfg, self.tls)  # credential requests
        up = cfg.upstream
        self.pool = Pool(  # proxied requests: the engine's keep-alive client
            up.host,
            up.port,
            ssl=self.tls if up.scheme == "https" else None,
            server_hostname=up.host if up.scheme == "https" else None,
            connect_timeout=cfg.timeout.connect,
            total_timeout=cfg.timeout.total,
            limit=POOL_LIMIT,
            idle_timeout=KEEPALIVE,
            host_header=up.authority,
        )
        self.ctx = SchemeContext(
            cfg,
            self.session,
            store.service(cfg.name),
            logging.getLogger(f"authproxy.scheme.{cfg.scheme}"),
            self.tls,
        )
        scheme_cls = SCHEMES[cfg.scheme]
        self.scheme: Scheme = scheme_cls(self.ctx)
        self.creds = ServiceCredentials(cfg.name, self.scheme, metrics, shared=store.shared)
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def close(self, revoke: bool = True) -> None:
        """Stop refreshing; revoke what the scheme revokes at exit (when ``revoke``); close the pool."""
        try:
            if revoke:
                await self.creds.shutdown()
            else:
                await self.creds.stop()
                if isinstance(self.scheme, Stateful):
                    await self.scheme.close()
        finally:
            await self.pool.close()
            await self.session.close()



async def revoke_at_exit(config: "Config") -> None:
    """The exit steps of a set of workers sharing the state dir, run by their supervisor
    once every worker has stopped: log off / expire what they created (bounded to
    REVOKE_BUDGET in all). With a Redis store this does nothing: those credentials
    belong to the fleet, and ``authproxy logout`` revokes them."""
    if config.store is not None:
        return
    from authproxy.store.statedir import StateDirStore

    store = StateDirStore(config.state_dir, shared=True)
    runtimes = [ServiceRuntime(svc, store) for svc in config.services.values()]
    try:
        todo = [rt.creds.revoke_created() for rt in runtimes if rt.scheme.revoke_on_exit]
        if todo:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*todo, return_exceptions=True), REVOKE_BUDGET)
    finally:
        for rt in runtimes:
            with contextlib.suppress(Exception):
                await rt.close(revoke=False)
