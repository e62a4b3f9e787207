"""Prometheus metrics, one registry per app (no module globals: two apps in one process, e.g.
in tests, never share counters).

With `--frontends N` every process writes its counters and histograms to files in
PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode, set by the supervisor before
it starts any process), and any front end's /metrics sums them: a request counted by one front
end, or a batch by the engine, is counted once whichever front end is scraped. What is a state
rather than a count (queue depth, requests in progress, residency) is read live at scrape time
from one source (`Live`): the engine's own statistics and the admitted counts every front end
shares, never a per-process gauge summed across processes (which would keep stale values).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# name -> help of the residency counters the engine reports (`EngineClient.stats`)
RESIDENCY_COUNTERS = {
    "hits": "requests served by a resident checkpoint",
    "misses": "requests that found their checkpoint cold",
    "loads": "checkpoint versions loaded and materialized",
    "load_failures": "loads refused by validation or the store",
    "swaps": "hot swaps to a newly activated version",
    "swap_failures": "activated versions refused; old one kept",
    "evictions": "resident versions dropped from memory",
}

# What the live collector reads at scrape time: the engine's statistics (residency counters,
# `resident`, `store_up`, `queue_depth`) and `in_progress`; None while the engine is not ready.
Live = Callable[[], dict[str, float] | None]


def multiprocess() -> bool:
    """Whether this process writes its metrics for the other processes to sum."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def batch_histogram(registry: CollectorRegistry | None) -> Histogram:
    """Images per encoder batch: observed where the engine runs."""
    return Histogram(
        "promptserve_batch_images",
        "images per encoder batch",
        buckets=BATCH_BUCKETS,
        registry=registry,
    )


class _LiveCollector(Collector):
    def __init__(self, live: Live) -> None:
        self.live = live

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        values = self.live()
        if values is None:
            return
        for name, doc in RESIDENCY_COUNTERS.items():
            if name in values:
                yield CounterMetricFamily(f"promptserve_residency_{name}", doc, value=values[name])
        for name, key, doc in (
            ("promptserve_resident_checkpoints", "resident", "checkpoint versions in memory"),
            ("promptserve_store_up", "store_up", "1 when the store answers"),
            ("promptserve_queue_depth", "queue_depth", "requests waiting for the batcher"),
            (
                "promptserve_requests_in_progress",
                "in_progress",
                "classify and embed requests admitted and not yet answered",
            ),
        ):
            if key in values:
                yield GaugeMetricFamily(name, doc, value=values[key])


class Metrics:
    """The service's metrics and its own registry."""

    def __init__(self, live: Live = lambda: None) -> None:
        self.registry = CollectorRegistry()
        # In multiprocess mode the metrics write to files and the registry reads them all.
        own: CollectorRegistry | None = self.registry
        if multiprocess():
            MultiProcessCollector(self.registry)
            own = None
        # Labels take only values we define: never a checkpoint name or anything a client sends
        # (thousands of checkpoints would be thousands of series per bucket).
        self.latency = Histogram(
            "promptserve_request_seconds",
            "request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=own,
        )
        self.batch_size = batch_histogram(own)
        self.errors = Counter(
            "promptserve_errors", "error responses by code", ["code"], registry=own
        )
        self.disconnects = Counter(
            "promptserve_client_disconnects",
            "clients that hung up before their request was answered (not errors of ours)",
            registry=own,
        )
        self.receiving = Gauge(
            "promptserve_requests_receiving",
            "requests whose body is still arriving (not yet admitted; many: slow clients)",
            registry=own,
            multiprocess_mode="livesum",  # each process's own count; dead processes drop out
        )
        self.registry.register(_LiveCollector(live))
