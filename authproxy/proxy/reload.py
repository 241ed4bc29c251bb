"""Reloading the configuration on SIGHUP without dropping a request.

A new file is read in a thread; an invalid one changes nothing (the errors are
logged). Services whose resolved config is unchanged keep their runtime, and so
their credentials and connections; the others get a new runtime, and the old
one is retired: it finishes its in-flight requests (bounded by
``shutdown_timeout``) and then revokes what it created — unless its successor
holds the same account and reuses the recorded credentials. ``listen`` is never
changed by a reload (that needs a restart). A store replaced by a reload is
closed once the runtimes using it have retired.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from authproxy import systemd
from authproxy.access import access_log
from authproxy.config import Config, ConfigError, load_config
from authproxy.observe import log_event, setup_logging
from authproxy.runtime import REVOKE_BUDGET
from authproxy.schemes.base import Stateful

if TYPE_CHECKING:
    from authproxy.proxy.app import ProxyServer
    from authproxy.runtime import ServiceRuntime
    from authproxy.store import Store

log = logging.getLogger("authproxy.proxy")


async def reload(server: "ProxyServer", path: str) -> bool:
    """SIGHUP: apply a new config; services whose resolved config is unchanged keep
    their credentials. An invalid file changes nothing; a service whose k_file /
    k_command secret cannot be read goes to ``error`` alone, the rest applies."""
    systemd.reloading()
    try:
        access_log.reopen()  # logrotate's postrotate: also when the new file is invalid
        try:
            # A service whose secret cannot be read goes to `error` alone (proxy/reread.py).
            new = await asyncio.to_thread(load_config, path, tolerant=True)
        except ConfigError as e:
            log_event(log, logging.ERROR, "reload_failed", config=path, errors=e.errors)
            return False
        if new.listen != server.config.listen:
            log_event(log, logging.WARNING, "reload_listen_ignored", reason="changing listen needs a restart", listen=str(server.config.listen))
        new = _replace_listen(new, server.config.listen)
        same_store = (new.store, new.state_dir) == (server.config.store, server.config.state_dir)
        unread = server.config.unreadable  # services in error for want of their secret: never kept
        keep = {n: rt for n, rt in server.runtimes.items() if same_store and n in new.services and new.services[n] == rt.config and n not in unread}
        old = server.runtimes
        old_log = server.config.log
        runtimes = server._build(new, keep)
        server._install(new, runtimes)
        access_log.open_audit(new.log.audit_file)
        if new.log != old_log and access_log.stream is not None:
            setup_logging(new.log.level, new.log.format)  # only where this process set logging up
        for name, rt in runtimes.items():
            if name in keep:
                if isinstance(rt.scheme, Stateful):
                    await rt.scheme.reload()
            else:
                rt.creds.start()
        for name, rt in old.items():
            successor = runtimes.get(name)
            if successor is not rt:
                # Same account (e.g. only a timeout changed): the successor reuses the
                # recorded credentials, so the old runtime must not revoke them.
                same = successor is not None and successor.scheme.identity() == rt.scheme.identity()
                retire(server, rt, revoke=not same)
        changed = sorted(n for n in runtimes if n not in keep)
        removed = sorted(n for n in old if n not in runtimes)
        log_event(log, logging.INFO, "reloaded", config=path, kept=len(keep), started=",".join(changed) or None, stopped=",".join(removed) or None)
        return True
    finally:
        systemd.notify("READY=1")


def close_later(server: "ProxyServer", store: "Store") -> None:
    """A store replaced by a reload: closed once the runtimes using it have retired."""

    async def run() -> None:
        await asyncio.sleep(server.config.shutdown_timeout + REVOKE_BUDGET)
        with contextlib.suppress(Exception):
            await store.close()

    task = asyncio.ensure_future(run())
    server._retiring.add(task)
    task.add_done_callback(server._retiring.discard)


def retire(server: "ProxyServer", rt: "ServiceRuntime", revoke: bool = True) -> None:
    """A runtime a reload replaced: its in-flight requests finish (bounded), then it
    closes, revoking what it created when ``revoke`` (bounded by ``REVOKE_BUDGET``)."""

    async def run() -> None:
        await rt.wait_idle(server.config.shutdown_timeout)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(rt.close(revoke=revoke), REVOKE_BUDGET)

    task = asyncio.ensure_future(run())
    server._retiring.add(task)
    task.add_done_callback(server._retiring.discard)


def _replace_listen(cfg: Config, listen: Any) -> Config:
    return dataclasses.replace(cfg, listen=listen)
