"""Reading a service's ``k_file`` / ``k_command`` secrets again while the proxy runs.

A secret kept in a password manager, a keyring or a file is rotated there, not
in authproxy's configuration. So when the upstream rejects the credential
built from such a secret (the manager's ``on_refused``: a credential rejected,
or a token request refused), the proxy reads the configuration file again —
in a thread, each command bounded by its 10 s limit — at most once a minute
per service, and if the service's resolved ``auth`` changed it swaps in a fresh
runtime for that service, exactly as SIGHUP does for a changed service. The
request that was rejected gets the rejection (a static value is not replayed:
the same one would come back); the next request uses the new secret.

A read that fails (the command's exit status and the last line of its
standard error, never its standard output; a file that cannot be read; a file
no longer valid) puts the service in ``error``: it gets a runtime whose scheme
(:class:`Unreadable`) refuses every fetch with that reason — readyz 503, its
requests 503 ``token_unavailable`` — and whose refusals keep asking for a
read, so a later successful one (or a SIGHUP) brings the service back. Only
the service's ``auth`` is taken from the re-read file; every other edit waits
for SIGHUP, which the operator asked for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Callable, Mapping

from authproxy.config import Config, ConfigError, load_config
from authproxy.credentials import ServiceCredentials
from authproxy.observe import log_event
from authproxy.proxy.reload import retire
from authproxy.runtime import ServiceRuntime
from authproxy.schemes.base import Credential, CredentialError, Outgoing, Scheme
from authproxy.service_config import ServiceConfig

if TYPE_CHECKING:
    from authproxy.proxy.app import ProxyServer

log = logging.getLogger("authproxy.proxy")

REREAD_INTERVAL = 60.0  # seconds: a service's secrets are read again at most this often


class Unreadable(Scheme):
    """The scheme of a service whose secret could not be read: every fetch is refused
    with the reason (state ``error``), and nothing is ever sent upstream. It keeps
    the real scheme's identity, so the credentials that scheme recorded are neither
    revoked by the swap nor lost to the next good read."""

    def __init__(self, inner: Scheme, reason: str) -> None:
        super().__init__(inner.ctx)
        self.inner = inner
        self.reason = reason
        self.secret_params = inner.secret_params  # type: ignore[misc]  # still masked in logged URLs

    @property
    def message(self) -> str:
        return f"its secret cannot be read: {self.reason}"

    async def obtain(self, key: str | None) -> Credential:
        raise CredentialError(self.message, refused=True)

    def apply(self, out: Outgoing, cred: Credential) -> None:  # pragma: no cover - obtain never succeeds
        raise CredentialError("no credential")

    def is_rejection(self, status: int, headers: Mapping[str, str], body: bytes | None) -> bool:
        return False

    def identity(self) -> str:
        return self.inner.identity()


class Rereader:
    """The re-reads of one proxy: which service may be read again when, and the swap.
    ``clock`` and ``interval`` are attributes so that tests can move time."""

    def __init__(self, server: "ProxyServer") -> None:
        self.server = server
        self.clock: Callable[[], float] = time.monotonic
        self.interval = REREAD_INTERVAL
        self._last: dict[str, float] = {}  # service → when its last re-read started
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.runs = 0  # re-reads started (for tests and the curious)

    # ------------------------------------------------------------------ building runtimes
    def runtime(self, svc: ServiceConfig, config: Config) -> ServiceRuntime:
        """A new runtime for ``svc`` (ProxyServer._build): an :class:`Unreadable` one when
        its secret could not be read; with the re-read hook when it has secrets to re-read."""
        server = self.server
        assert server.store is not None
        rt = ServiceRuntime(svc, server.store, server.metrics)
        reason = config.unreadable.get(svc.name)
        if reason is not None:
            # Not shared: a credential another process stored must not make it look ready.
            scheme = rt.scheme = Unreadable(rt.scheme, reason)
            rt.creds = ServiceCredentials(svc.name, scheme, server.metrics, shared=False)
            # In error from the first moment (not `pending` until its first fetch fails).
            rt.creds.health.failed(scheme.message, "error", refused=True)
            log_event(log, logging.WARNING, "secret_unreadable", service=svc.name, error=reason)
            self._last[svc.name] = self.clock()  # just read: its first refusal does not read again at once
        if svc.secret_sources or reason is not None:
            rt.creds.on_refused = lambda name=svc.name: self.refused(name)
        return rt

    # ------------------------------------------------------------------ the trigger
    def refused(self, name: str) -> None:
        """The upstream refused what the service's secrets built: read them again, unless
        that was done less than ``interval`` ago (or is under way)."""
        now = self.clock()
        last = self._last.get(name)
        if name in self._tasks or (last is not None and now - last < self.interval):
            return
        rt = self.server.runtimes.get(name)
        path = self.server.config.path
        if rt is None or path == "<string>":  # a config given as text has no file to read again
            return
        self._last[name] = now
        self.runs += 1
        task = asyncio.ensure_future(self._reread(name, rt, path))
        self._tasks[name] = task
        task.add_done_callback(lambda _t, name=name: self._tasks.pop(name, None))

    async def _reread(self, name: str, rt: ServiceRuntime, path: str) -> None:
        log_event(log, logging.INFO, "secret_reread", service=name, sources=",".join(rt.config.secret_sources) or None)
        try:
            new: Config | None = await asyncio.to_thread(load_config, path, tolerant=True)
            assert new is not None
            reason = new.unreadable.get(name)
        except ConfigError as e:
            new, reason = None, _about(name, e.errors)
        if self.server.stopping or self.server.runtimes.get(name) is not rt:
            return  # shutting down, or a SIGHUP came first and read the file itself
        fresh = new.services.get(name) if new is not None else None
        if reason is None and (fresh is None or fresh.scheme != rt.config.scheme):
            # Gone from the file, or another scheme: that is a SIGHUP's change to make.
            log_event(log, logging.WARNING, "secret_reread_skipped", service=name, reason="the service changed in the file: send SIGHUP")
            return
        if reason is not None and isinstance(rt.scheme, Unreadable) and rt.scheme.reason == reason:
            return  # failing as before: the runtime in error stays
        svc = rt.config if fresh is None else dataclasses.replace(rt.config, auth=fresh.auth)
        if reason is None and svc == rt.config and not isinstance(rt.scheme, Unreadable):
            log_event(log, logging.INFO, "secret_unchanged", service=name)
            return
        self._swap(name, rt, svc, reason)

    def _swap(self, name: str, old: ServiceRuntime, svc: ServiceConfig, reason: str | None) -> None:
        """One service's new runtime, installed as a reload installs a changed service."""
        server = self.server
        cur = server.config
        unreadable = {n: r for n, r in cur.unreadable.items() if n != name}
        if reason is not None:
            unreadable[name] = reason
        config = dataclasses.replace(cur, services={**cur.services, name: svc}, unreadable=unreadable)
        keep = {n: r for n, r in server.runtimes.items() if n != name}
        runtimes = server._build(config, keep)
        server._install(config, runtimes)  # also the log redactor: the new secret is masked from now on
        new = runtimes[name]
        new.creds.start()
        retire(server, old, revoke=new.scheme.identity() != old.scheme.identity())
        if reason is None:
            log_event(log, logging.INFO, "secret_renewed", service=name)


def _about(name: str, errors: list[str]) -> str:
    """The errors of a file that became invalid which concern ``name`` (else all of them)."""
    mine = [e for e in errors if f"services.{name}." in e or f"services.{name}:" in e]
    return "the configuration file is no longer valid: " + "; ".join(mine or errors)
