"""Prometheus metrics of one node, in a registry of its own.

Counters and histograms are updated where events happen; gauges that
mirror the store (counts, map size, queue depths and their limits) are read
at scrape time by a collector, so they cannot drift from the truth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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


class Metrics:
    """The node's metrics and the registry that exposes them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "cmdlog_http_requests",
            "HTTP requests handled, by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "cmdlog_http_request_duration_seconds",
            "Time from request start to response, by route",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.commands = Counter(
            "cmdlog_client_commands",
            "Client commands by result: " + ", ".join(COMMAND_RESULTS),
            ["result"],
            registry=self.registry,
        )
        self._command_results = {
            result: self.commands.labels(result) for result in COMMAND_RESULTS
        }
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
        # labels() costs more than the update itself, so each request's
        # children are looked up once and kept.
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def count_stream_entries(self, *, sent: int, skipped: int) -> None:
        """Count the log entries one stream frame covered."""
        self._stream_sent.inc(sent)
        self._stream_skipped.inc(skipped)

    def count_commands(self, result: str, count: int = 1) -> None:
        """Count client commands by result, one of `COMMAND_RESULTS`."""
        self._command_results[result].inc(count)

    def observe_request(
        self, method: str, route: str, status: int, duration_s: float
    ) -> None:
        """Count one handled request and record its duration."""
        if method not in HTTP_METHODS:
            method = "other"  # a client picks the method, so keep the label set small
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self.http_requests.labels(method, route, str(status)),
                self.http_latency.labels(route),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(duration_s)

    def add_gauges(self, read: Callable[[], dict[str, tuple[str, GaugeValue]]]) -> None:
        """Register a function returning `{name: (help, value)}` read at scrape time."""
        self.registry.register(_GaugeCollector(read))
