"""OpenTelemetry tracing: optional (``pip install 'authproxy[otel]'``) and off by default.

It is on when the ``otel`` extra is installed and ``OTEL_EXPORTER_OTLP_ENDPOINT``
(or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set — and ``OTEL_SDK_DISABLED`` is
not ``true`` nor ``OTEL_TRACES_EXPORTER`` ``none``. The standard ``OTEL_*``
variables configure the rest: the OTLP/HTTP exporter (headers, timeout,
certificates, compression), the batch processor (``OTEL_BSP_*``), the sampler
(``OTEL_TRACES_SAMPLER``, default: parent-based always-on), the propagators
(``OTEL_PROPAGATORS``, default W3C ``traceparent`` and baggage) and the resource
(``OTEL_SERVICE_NAME``, default ``authproxy``; ``OTEL_RESOURCE_ATTRIBUTES``).

What is traced, per request:

- a SERVER span, named ``METHOD /prefix`` (the service's prefix, never the full
  path), whose parent is the client's own ``traceparent`` if it sent one;
- a CLIENT child span per upstream attempt (at most two: the one replay after a
  rejected credential), whose context goes upstream as ``traceparent``; it ends
  when the upstream's response head has arrived;
- an INTERNAL span per credential fetch (a child of the request that caused it;
  a background refresh is a trace of its own).

No attribute ever holds a secret: the path is the access record's masked path
without its query, the upstream is named by host and port only (a scheme may put
the credential in the upstream query), and a failure is named by its code or
exception class, never by its message.

Off, nothing of OpenTelemetry is imported, and each hook on the request path is
one attribute check (``if tracing.enabled:``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

if TYPE_CHECKING:
    from authproxy.config import Config
    from authproxy.http1.server import Exchange
    from authproxy.schemes.base import Outgoing
    from authproxy.service_config import Upstream

log = logging.getLogger("authproxy.tracing")

T = TypeVar("T")

FLUSH_BUDGET = 5.0  # seconds the last spans may take to export at shutdown
# Methods a span name may carry (OpenTelemetry's HTTP conventions); any other is "HTTP".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY"})
RESERVED_ROUTES = frozenset({"/-/healthz", "/-/readyz", "/-/metrics"})


def wanted(env: Any = os.environ) -> bool:
    """Whether the environment asks for tracing (the extra may still be missing)."""
    if not (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return False
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() != "none"


class Tracing:
    """The process's tracer. Disabled (``enabled`` false), callers skip every hook;
    :meth:`setup` turns it on for the process, shared by every proxy server in it
    (tests run several): the last :meth:`shutdown` flushes and stops the exporter."""

    def __init__(self) -> None:
        self.enabled = False  # an instance attribute: the cheapest lookup for the hot-path check
        self._users = 0
        self._provider: Any = None
        self._tracer: Any = None
        self._propagator: Any = None
        self._ot: Any = None  # the OpenTelemetry names used per request, imported by setup

    # ------------------------------------------------------------------ lifecycle
    def setup(self) -> bool:
        """Turn tracing on if the environment asks for it and the extra is installed.
        True: the caller holds a reference and must call :meth:`shutdown` once."""
        if self.enabled:
            self._users += 1
            return True
        if not wanted():
            return False
        try:
            self._install()
        except ImportError as e:
            log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but tracing is off: the otel extra is not installed (pip install 'authproxy[otel]'): %s", e)
            return False
        self._users = 1
        self.enabled = True
        return True

    def _install(self) -> None:
        from types import SimpleNamespace

        from opentelemetry import context, propagate, trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, StatusCode

        from authproxy import __version__

        for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            proto = os.environ.get(var)
            if proto and proto.strip() != "http/protobuf":
                log.warning("%s=%s is not supported: authproxy exports traces with OTLP over HTTP (http/protobuf)", var, proto)
                break
        resource = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: "authproxy"}))
        # No atexit hook and not the global provider: shutdown() flushes (bounded), and an
        # application embedding authproxy keeps its own tracing set-up.
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self._provider = provider
        self._tracer = provider.get_tracer("authproxy", __version__)
        self._propagator = propagate.get_global_textmap()  # OTEL_PROPAGATORS
        self._ot = SimpleNamespace(
            attach=context.attach,
            detach=context.detach,
            in_context=trace.set_span_in_context,
            SERVER=SpanKind.SERVER,
            CLIENT=SpanKind.CLIENT,
            INTERNAL=SpanKind.INTERNAL,
            ERROR=StatusCode.ERROR,
        )

    async def shutdown(self) -> None:
        """Release a :meth:`setup` reference; the last one flushes the spans not yet
        exported and stops the exporter, within FLUSH_BUDGET (an unreachable collector
        must not hold the exit)."""
        if not self.enabled:
            return
        self._users -= 1
        if self._users > 0:
            return
        provider = self._provider
        self.enabled = False
        self._provider = self._tracer = self._propagator = self._ot = None
        done = asyncio.get_running_loop().create_future()

        def run() -> None:
            try:
                provider.shutdown()
            except Exception as e:  # pragma: no cover - the SDK logs its own failures
                log.warning("tracing shutdown failed: %s", e)
            finally:
                if not done.done():
                    done.get_loop().call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        # A daemon thread: should the export hang past the budget, the process still exits.
        threading.Thread(target=run, name="authproxy-tracing-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(done), FLUSH_BUDGET)
        except asyncio.TimeoutError:
            log.warning("tracing: the last spans were not exported within %.0f s", FLUSH_BUDGET)

    # ------------------------------------------------------------------ the request (app.py)
    def start_request(self, ex: "Exchange") -> Any:
        """The SERVER span of one request, current until :meth:`end_request` (so the
        attempts and a fetch it causes are its children)."""
        ot = self._ot
        parent = self._propagator.extract(ex.headers)  # the client's traceparent, if any
        span = self._tracer.start_span(_method(ex.method), context=parent, kind=ot.SERVER)
        return span, ot.attach(ot.in_context(span, parent))

    def end_request(
        self, started: Any, method: str, path: str, status: int, service: str | None, decision: str, request_id: str, config: "Config"
    ) -> None:
        """``path``: the access record's masked path; its query is left out."""
        span, token = started
        ot = self._ot
        if ot is not None:  # (tracing was shut down while this request was in flight)
            ot.detach(token)
        path = path.partition("?")[0]
        if "://" in path[:12]:  # absolute-form (forward-proxy mode): the path only
            path = "/" + path.partition("://")[2].partition("/")[2]
        svc = config.services.get(service) if service else None
        route = svc.prefix if svc is not None else path if path in RESERVED_ROUTES else None
        name = _method(method)
        if route:
            span.update_name(f"{name} {route}")
        if span.is_recording():
            span.set_attributes(
                {
                    "http.request.method": method if method in KNOWN_METHODS else "_OTHER",
                    "url.path": path,
                    "http.response.status_code": status,
                    "authproxy.service": service or "",
                    "authproxy.decision": decision,
                    "authproxy.request_id": request_id,
                }
            )
            if method not in KNOWN_METHODS:
                span.set_attribute("http.request.method_original", method)
            if route:
                span.set_attribute("http.route", route)
            if status >= 500 and ot is not None:
                span.set_attribute("error.type", str(status))
                span.set_status(ot.ERROR)
        span.end()

    # ------------------------------------------------------------------ an upstream attempt (forward.py)
    async def upstream_attempt(
        self,
        send: Callable[..., Awaitable[T]],
        service: str,
        upstream: "Upstream",
        attempt: int,
        method: str,
        target: str,
        out: "Outgoing",
        *rest: Any,
    ) -> T:
        """``send(method, target, out, *rest)`` as a CLIENT span, its ``traceparent``
        set in ``out.headers`` first (replacing the client's). Ends at the response head."""
        ot = self._ot
        attrs: dict[str, Any] = {
            "http.request.method": method if method in KNOWN_METHODS else "_OTHER",
            "server.address": upstream.host,
            "server.port": upstream.port,
            "url.scheme": upstream.scheme,
            "authproxy.service": service,
            "authproxy.attempt": attempt,
        }
        if attempt > 1:
            attrs["http.request.resend_count"] = attempt - 1
        span = self._tracer.start_span(_method(method), kind=ot.CLIENT, attributes=attrs)
        self._propagator.inject(out.headers, context=ot.in_context(span))
        try:
            resp = await send(method, target, out, *rest)
        except BaseException as e:
            span.set_attribute("error.type", getattr(e, "code", None) or type(e).__qualname__)
            span.set_status(ot.ERROR)
            span.end()
            raise
        status = getattr(resp, "status", 0)
        span.set_attribute("http.response.status_code", status)
        if status >= 400:
            span.set_attribute("error.type", str(status))
            span.set_status(ot.ERROR)
        span.end()
        return resp

    # ------------------------------------------------------------------ a credential fetch (credentials.py)
    async def credential_fetch(self, obtain: Awaitable[T], service: str, scheme: str) -> T:
        """Await ``obtain`` (the scheme fetching a credential) as an INTERNAL span."""
        ot = self._ot
        span = self._tracer.start_span("credential fetch", kind=ot.INTERNAL, attributes={"authproxy.service": service, "authproxy.scheme": scheme})
        try:
            cred = await obtain
        except BaseException as e:
            span.set_attributes({"authproxy.result": "error", "error.type": type(e).__qualname__})
            span.set_status(ot.ERROR)
            span.end()
            raise
        span.set_attribute("authproxy.result", "ok")
        span.end()
        return cred


def _method(method: str) -> str:
    return method if method in KNOWN_METHODS else "HTTP"


tracing = Tracing()
