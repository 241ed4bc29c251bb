"""Prometheus metrics: what an operator scrapes from ``/-/metrics``.

Each proxy process has a registry of its own (so tests and the demo can run
several proxies in one process). Requests are counted on the hot path as plain
ints, turned into Prometheus families only when the endpoint is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

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

    def snapshot(self) -> dict[str, Any]:
        """The counters as plain JSON data, for ``workers: N`` (each worker's are summed
        at scrape time, :mod:`authproxy.worker_stats`)."""
        return {
            "requests": [[s, c, n] for (s, c), n in self._counts.items()],
            "hist": {s: list(h) for s, h in self._hist.items()},
            "fetches": [[*s.labels.values(), s.value] for s in _samples(self._fetches)],
            "retries": [[*s.labels.values(), s.value] for s in _samples(self._retries)],
        }

    def absorb(self, snap: dict[str, Any]) -> None:
        """Add a :meth:`snapshot` (another worker's, or a sum of them) to these counters."""
        for service, code, n in snap.get("requests", ()):
            self._counts[(service, int(code))] = self._counts.get((service, int(code)), 0) + int(n)
        for service, h in snap.get("hist", {}).items():
            mine = self._hist.setdefault(service, [0.0] * (len(DURATION_BUCKETS) + 2))
            for i, x in enumerate(h[: len(mine)]):
                mine[i] += x
        for service, result, n in snap.get("fetches", ()):
            self._fetches.labels(service, result).inc(n)
        for service, n in snap.get("retries", ()):
            self._retries.labels(service).inc(n)


def _samples(counter: Counter) -> list[Any]:
    """A labelled counter's ``*_total`` samples."""
    return [s for fam in counter.collect() for s in fam.samples if s.name.endswith("_total")]


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
