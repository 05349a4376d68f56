"""Prometheus metrics of one node, in a registry of its own.

Counters and histograms are updated where events happen; gauges that
mirror the store (counts, map size, queue depths and their limits) are read
at scrape time by a collector, so they cannot drift from the truth.

The per-request series (requests by route and status, their latency, and
client commands by result) are plain counts kept by the event loop and
turned into metric families at scrape time, which runs on the same loop.
A prometheus_client child takes a lock for every update, and its histogram
looks for the bucket in a Python loop.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# The *_created series double every counter's output and nothing here uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0
)  # fmt: skip
COMMAND_RESULTS = ("created", "replayed", "key_reused", "invalid", "redirected")
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)

GaugeValue = float | list[tuple[dict[str, str], float]]
"""One value, or (labels, value) pairs for a labelled gauge."""


class _GaugeCollector(Collector):
    """Reads current values from the node at each scrape."""

    def __init__(self, read: Callable[[], dict[str, tuple[str, GaugeValue]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, (help_text, value) in self._read().items():
            if isinstance(value, list):
                labels = sorted(value[0][0]) if value else []
                family = GaugeMetricFamily(name, help_text, labels=labels)
                for label_values, sample in value:
                    family.add_metric([label_values[key] for key in labels], sample)
                yield family
            else:
                yield GaugeMetricFamily(name, help_text, value=value)


class _RequestCollector(Collector):
    """The per-request counts, rendered as metric families at scrape time.

    Updates and scrapes must come from one thread, the event loop's.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        """Requests by (method, route, status)."""
        self.latency: dict[str, list[float]] = {}
        """Per route: the count in each bucket of `LATENCY_BUCKETS_S`, then
        the count above them all, then the sum of the durations."""
        self.commands = dict.fromkeys(COMMAND_RESULTS, 0)

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily(
            "cmdlog_http_requests",
            "HTTP requests handled, by route and status",
            labels=["method", "route", "status"],
        )
        for (method, route, status), count in self.requests.items():
            requests.add_metric([method, route, str(status)], count)
        yield requests
        latency = HistogramMetricFamily(
            "cmdlog_http_request_duration_seconds",
            "Time from request start to response, by route",
            labels=["route"],
        )
        bounds = [*map(floatToGoString, LATENCY_BUCKETS_S), "+Inf"]
        for route, counts in self.latency.items():
            cumulative = 0.0
            buckets = []
            for bound, in_bucket in zip(bounds, counts[:-1], strict=True):
                cumulative += in_bucket
                buckets.append((bound, cumulative))
            latency.add_metric([route], buckets, sum_value=counts[-1])
        yield latency
        commands = CounterMetricFamily(
            "cmdlog_client_commands",
            "Client commands by result: " + ", ".join(COMMAND_RESULTS),
            labels=["result"],
        )
        for result, count in self.commands.items():
            commands.add_metric([result], count)
        yield commands


class Metrics:
    """The node's metrics and the registry that exposes them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = _RequestCollector()
        self.registry.register(self._requests)
        self.commits = Counter(
            "cmdlog_commits", "Durable group commits", registry=self.registry
        )
        stream_entries = Counter(
            "cmdlog_replication_stream_entries",
            "Log entries the streams this node serves covered: sent, or skipped "
            "because the reader sent them here",
            ["result"],
            registry=self.registry,
        )
        self._stream_sent = stream_entries.labels("sent")
        self._stream_skipped = stream_entries.labels("skipped")

    def count_stream_entries(self, *, sent: int, skipped: int) -> None:
        """Count the log entries one stream frame covered."""
        self._stream_sent.inc(sent)
        self._stream_skipped.inc(skipped)

    def count_commands(self, result: str, count: int = 1) -> None:
        """Count client commands by result, one of `COMMAND_RESULTS`."""
        self._requests.commands[result] += count

    def observe_request(
        self, method: str, route: str, status: int, duration_s: float
    ) -> None:
        """Count one handled request and record its duration."""
        if method not in HTTP_METHODS:
            method = "other"  # a client picks the method, so keep the label set small
        key = (method, route, status)
        requests = self._requests.requests
        requests[key] = requests.get(key, 0) + 1
        counts = self._requests.latency.get(route)
        if counts is None:
            counts = self._requests.latency[route] = [0.0] * (
                len(LATENCY_BUCKETS_S) + 2
            )
        # A bucket counts the durations up to and including its bound.
        counts[bisect_left(LATENCY_BUCKETS_S, duration_s)] += 1
        counts[-1] += duration_s

    def add_gauges(self, read: Callable[[], dict[str, tuple[str, GaugeValue]]]) -> None:
        """Register a function returning `{name: (help, value)}` read at scrape time."""
        self.registry.register(_GaugeCollector(read))
