"""authproxy's own endpoints, under ``/-/``: health, readiness, metrics, the OAuth callback.

``/-/`` is never a service's prefix (the config refuses it), so these answer
before any routing, and only GET and HEAD. Each has its own rule: ``healthz``
answers whoever reaches the listener; ``callback/NAME`` obeys the Host rule
only (the browser coming back from an authorization server carries no inbound
key); ``readyz`` and ``metrics`` obey the Origin rule and need an inbound key
when keys are configured.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import parse_qsl

from authproxy import worker_stats
from authproxy.proxy.errors import ProxyError, reason
from authproxy.schemes.base import Interactive

if TYPE_CHECKING:
    from authproxy.http1.server import Exchange
    from authproxy.metrics import Metrics
    from authproxy.proxy.guard import Guard
    from authproxy.runtime import ServiceRuntime

NOT_READY = ("backoff", "login_required", "error")  # a service in one of these makes /-/readyz 503


async def answer_reserved(ex: Exchange, raw: str, guard: Guard, runtimes: Mapping[str, ServiceRuntime], metrics: Metrics, stopping: bool) -> int:
    """Answer a request for ``raw`` (a target under ``/-/``); returns the status sent.
    A refusal is raised as a :class:`ProxyError`. ``stopping``: the proxy is shutting
    down (readyz says 503)."""
    path, _, query = raw.partition("?")
    if ex.method not in ("GET", "HEAD"):
        raise ProxyError("bad_request", f"{path} answers GET only", status=405)
    if path == "/-/healthz":
        group = worker_stats.current  # workers: N — say which worker answered
        return await _json(ex, 200, {"status": "ok"} if group is None else {"status": "ok", "worker": group.index, "pid": group.pid})
    if path.startswith("/-/callback/"):
        guard.check_host(ex.headers)
        name = path[len("/-/callback/"):]
        rt = runtimes.get(name)
        if rt is None:
            raise ProxyError("no_route", "no such service", name)
        pairs = parse_qsl(query, keep_blank_values=True)
        params = dict(pairs)
        if len(params) != len(pairs):
            raise ProxyError("bad_request", "a parameter is repeated in the callback (RFC 6749 §3.1)", name)
        if not isinstance(rt.scheme, Interactive):
            raise ProxyError("no_route", f"service {name} has no login callback", name)
        status, text = await rt.scheme.callback(params)
        await ex.respond(status, reason(status), [("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store")], text.encode())
        return status
    guard.check_origin(ex.headers)
    guard.check_key(ex.headers)
    if path == "/-/readyz":
        services: dict[str, Any] = {}
        ready = True
        for name, rt in runtimes.items():
            st = rt.creds.status()
            services[name] = {"state": st.state, "expires_in": st.expires_in, "last_error": st.last_error}
            ready = ready and st.state not in NOT_READY
        if worker_stats.current is not None:  # workers: N — each service's worst state over the workers
            services = worker_stats.current.readiness()
            ready = all(s["state"] not in NOT_READY for s in services.values())
        return await _json(ex, 200 if ready and not stopping else 503, {"services": services})
    if path == "/-/metrics":
        if worker_stats.current is not None:  # workers: N — the sum over every worker
            await ex.respond(200, "OK", [("Content-Type", metrics.content_type)], worker_stats.current.render_metrics())
            return 200
        for name, rt in runtimes.items():
            metrics.set_ready(name, rt.creds.status().state == "ready")
        await ex.respond(200, "OK", [("Content-Type", metrics.content_type)], metrics.render())
        return 200
    raise ProxyError("no_route", f"{path} is not an authproxy endpoint")


async def _json(ex: Exchange, status: int, doc: Any) -> int:
    headers = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
    await ex.respond(status, reason(status), headers, json.dumps(doc).encode())
    return status

