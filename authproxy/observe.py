"""Metrics and logs: what an operator sees of authproxy.

Logs are events with fields (``event=token_fetched service=x expires_in=3600``),
written as text for people or JSON lines for collectors, always to stderr.
Field values go through :func:`_render`, which prints a :class:`Secret` as ``***``
so that no code path can log a credential by accident; and, once the proxy has
called :func:`set_log_redactor` with every configured secret, every text a log
line carries (fields, message, traceback) has those masked in any encoding.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from authproxy.secret import MASK, Redactor, Secret

# --------------------------------------------------------------------------- metrics

disable_created_metrics()  # *_created series only add noise to a scrape

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """The metrics of one proxy process, on a registry of its own (so tests and the
    demo can run several proxies in one process)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Requests are counted on the hot path: plain ints in dicts (the event loop is one
        # thread), turned into Prometheus families only when /-/metrics is scraped.
        self._counts: dict[tuple[str, int], int] = {}
        self._hist: dict[str, list[float]] = {}  # service → per-bucket counts (non-cumulative) + [sum]
        self.registry.register(_RequestCollector(self))
        self._fetches = Counter(
            "authproxy_token_fetches_total",
            "Credential requests made upstream, by result.",
            ["service", "result"],
            registry=self.registry,
        )
        self._retries = Counter(
            "authproxy_auth_retries_total",
            "Requests replayed after the upstream rejected their credential.",
            ["service"],
            registry=self.registry,
        )
        self._ready = Gauge(
            "authproxy_service_ready",
            "1 when the service has a usable credential, else 0.",
            ["service"],
            registry=self.registry,
        )

    def request(self, service: str, code: int, seconds: float) -> None:
        key = (service, code)
        self._counts[key] = self._counts.get(key, 0) + 1
        h = self._hist.get(service)
        if h is None:
            h = self._hist[service] = [0.0] * (len(DURATION_BUCKETS) + 2)
        h[bisect_left(DURATION_BUCKETS, seconds)] += 1
        h[-1] += seconds

    def token_fetch(self, service: str, result: str) -> None:
        self._fetches.labels(service, result).inc()

    def auth_retry(self, service: str) -> None:
        self._retries.labels(service).inc()

    def set_ready(self, service: str, ready: bool) -> None:
        self._ready.labels(service).set(1 if ready else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _RequestCollector:
    """Exposes :class:`Metrics`' request counters and duration histogram."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        counts = CounterMetricFamily(
            "authproxy_requests",
            "Requests answered, by service and HTTP status (the proxy's own errors included).",
            labels=["service", "code"],
        )
        for (service, code), n in sorted(self.m._counts.items()):
            counts.add_metric([service, str(code)], n)
        yield counts
        hist = HistogramMetricFamily(
            "authproxy_request_duration_seconds",
            "Time from receiving a request to the end of its response.",
            labels=["service"],
        )
        for service, h in sorted(self.m._hist.items()):
            buckets, running = [], 0.0
            for bound, n in zip((*DURATION_BUCKETS, float("inf")), h[:-1]):
                running += n
                buckets.append((floatToGoString(bound), running))
            hist.add_metric([service], buckets, h[-1])
        yield hist


# --------------------------------------------------------------------------- logs


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log an event with fields; costs one check when the level is off."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields})


_redactor: Redactor | None = None


def set_log_redactor(redactor: Redactor | None) -> None:
    """The last line of defence for every log line but the access log (whose path the
    proxy masks per service): the secrets of every configured service, masked in
    whatever text a line carries. Set at config load; None turns it off."""
    global _redactor
    _redactor = redactor if redactor else None


def _masked(text: str) -> str:
    r = _redactor
    return r.redact(text) if r is not None else text


def _render(value: Any) -> Any:
    if isinstance(value, Secret):
        return MASK
    if isinstance(value, float):
        return round(value, 3)
    if _redactor is not None:
        if isinstance(value, str):
            return _redactor.redact(value)
        if isinstance(value, (list, tuple)):
            return [_render(v) for v in value]
        if isinstance(value, dict):
            return {k: _render(v) for k, v in value.items()}
    return value


class TextFormatter(logging.Formatter):
    """``2026-11-25T18:06:22.123Z INFO  event key=value …`` — one line, grep-able."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        fields = getattr(record, "fields", None)
        parts = [ts, f"{record.levelname:<5}", _masked(record.getMessage()) if fields is None else record.msg]
        if fields:
            for k, v in fields.items():
                if v is None:
                    continue
                v = _render(v)
                s = str(v)
                if not s or any(c in s for c in ' "=\n'):
                    s = json.dumps(s)
                parts.append(f"{k}={s}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + _masked(self.formatException(record.exc_info))
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, event, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.msg if fields is not None else "message",
            "logger": record.name,
        }
        if fields is None:
            doc["message"] = _masked(record.getMessage())
        else:
            for k, v in fields.items():
                if v is not None:
                    doc[k] = _render(v)
        if record.exc_info:
            doc["exception"] = _masked(self.formatException(record.exc_info))
        return json.dumps(doc, default=str)


class AccessLog:
    """One line per proxied request, written without the logging machinery.

    The access log is the only log line on the hot path, and going through
    ``logging`` (a LogRecord, handler locks, a formatter, a write and a flush per
    line) costs more CPU than the rest of the proxy's own work for a small
    request. Lines are formatted directly and written once per event-loop
    iteration, so a burst of requests costs one ``write`` call, not one each.
    When :func:`setup_logging` has not chosen a stream (a library user, the
    tests), lines go through ``logging`` like every other event.
    """

    def __init__(self) -> None:
        self.stream: Any = None
        self.json = False
        self.enabled = True
        self._buf: list[str] = []
        self._scheduled = False
        self._sec = -1
        self._prefix = ""
        self._logger = logging.getLogger("authproxy.access")

    def configure(self, stream: Any, fmt: str, level: int) -> None:
        self.flush()
        self.stream = stream
        self.json = fmt == "json"
        self.enabled = level <= logging.INFO

    def _ts(self, now: float) -> str:
        sec = int(now)
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._prefix}.{int((now - sec) * 1000):03d}Z"

    def log(self, request_id: str, client: str | None, method: str, path: str, service: str | None, status: int, seconds: float) -> None:
        if self.stream is None:
            if self._logger.isEnabledFor(logging.INFO):
                fields = {"request_id": request_id, "client": client, "method": method, "path": path, "service": service, "status": status, "duration_ms": round(seconds * 1000, 2)}
                self._logger.info("request", extra={"fields": fields})
            return
        if not self.enabled:
            return
        ts = self._ts(time.time())
        ms = round(seconds * 1000, 2)
        if self.json:
            doc = {"ts": ts, "level": "info", "event": "request", "logger": "authproxy.access", "request_id": request_id, "client": client, "method": method, "path": path, "status": status, "duration_ms": ms}
            if service is not None:
                doc["service"] = service
            line = json.dumps(doc)
        else:
            # A request target never holds a space (it would not parse); quote only a '"'.
            p = json.dumps(path) if '"' in path else path
            svc = f" service={service}" if service is not None else ""
            line = f"{ts} INFO  request request_id={request_id} client={client} method={method} path={p}{svc} status={status} duration_ms={ms}"
        self._buf.append(line)
        if not self._scheduled:
            self._scheduled = True
            try:
                import asyncio

                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if not self._buf or self.stream is None:
            self._buf.clear()
            return
        data = "\n".join(self._buf) + "\n"
        self._buf.clear()
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not take requests down with it


access_log = AccessLog()


def setup_logging(level: str = "info", fmt: str = "text", stream: Any = None) -> None:
    root = logging.getLogger("authproxy")
    stream = stream or sys.stderr
    access_log.configure(stream, fmt, logging.getLevelName(level.upper()))
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    # aiohttp's own loggers speak plain messages; route their warnings through ours.
    for name in ("aiohttp.server", "aiohttp.web", "aiohttp.client", "asyncio"):
        lg = logging.getLogger(name)
        lg.handlers = [handler]
        lg.setLevel(logging.WARNING)
        lg.propagate = False
