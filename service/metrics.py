"""Prometheus metrics, one registry per app (no module globals: two apps in one process, e.g.
in tests, never share counters)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from service.engine.residency import Residency

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _ResidencyCollector(Collector):
    """Reads residency counters at scrape time (they live in the engine, not here)."""

    def __init__(self, residency: Callable[[], Residency | None]) -> None:
        self.residency = residency

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        r = self.residency()
        if r is None:
            return
        s = r.stats
        for name, value, doc in (
            ("hits", s.hits, "requests served by a resident checkpoint"),
            ("misses", s.misses, "requests that found their checkpoint cold"),
            ("loads", s.loads, "checkpoint versions loaded and materialized"),
            ("load_failures", s.load_failures, "loads refused by validation or the store"),
            ("swaps", s.swaps, "hot swaps to a newly activated version"),
            ("swap_failures", s.swap_failures, "activated versions refused; old one kept"),
            ("evictions", s.evictions, "resident versions dropped from memory"),
        ):
            yield CounterMetricFamily(f"promptserve_residency_{name}", doc, value=value)
        health = r.health()
        yield GaugeMetricFamily(
            "promptserve_resident_checkpoints", "checkpoint versions in memory", health["resident"]
        )
        yield GaugeMetricFamily(
            "promptserve_store_up", "1 when the store answers", 1 if health["store"] == "ok" else 0
        )


class Metrics:
    """The service's metrics and its own registry."""

    def __init__(self, residency: Callable[[], Residency | None] = lambda: None) -> None:
        self.registry = CollectorRegistry()
        # Labels take only values we define: never a checkpoint name or anything a client sends
        # (thousands of checkpoints would be thousands of series per bucket).
        self.latency = Histogram(
            "promptserve_request_seconds",
            "request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "promptserve_batch_images",
            "images per encoder batch",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "promptserve_queue_depth", "requests waiting for the batcher", registry=self.registry
        )
        self.errors = Counter(
            "promptserve_errors", "error responses by code", ["code"], registry=self.registry
        )
        self.in_progress = Gauge(
            "promptserve_requests_in_progress",
            "classify and embed requests admitted and not yet answered",
            registry=self.registry,
        )
        self.disconnects = Counter(
            "promptserve_client_disconnects",
            "clients that hung up before their request was answered (not errors of ours)",
            registry=self.registry,
        )
        self.receiving = Gauge(
            "promptserve_requests_receiving",
            "requests whose body is still arriving (not yet admitted; many: slow clients)",
            registry=self.registry,
        )
        self.registry.register(_ResidencyCollector(residency))
