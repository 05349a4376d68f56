"""Tests of the node's request metrics against prometheus_client's own types."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cmdlog.metrics import COMMAND_RESULTS, LATENCY_BUCKETS_S, Metrics

ROUTES = ("/commands", "/commands/batch", "/healthz")
METHODS = ("GET", "POST", "BREW")
# Durations on a bucket bound, where an off-by-one would show, or anywhere in 0-10 s.
DURATIONS = st.one_of(
    st.sampled_from(LATENCY_BUCKETS_S),
    st.floats(min_value=0.0, max_value=10.0, allow_nan=False),
)
REQUESTS = st.lists(
    st.tuples(
        st.sampled_from(METHODS),
        st.sampled_from(ROUTES),
        st.sampled_from((200, 201, 400, 503)),
        DURATIONS,
    ),
    max_size=40,
)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    """Return every sample of the registry's text output by name and labels."""
    text = generate_latest(registry).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def reference(
    requests: list[tuple[str, str, int, float]], commands: list[str]
) -> CollectorRegistry:
    """Record the same events with prometheus_client's Counter and Histogram."""
    registry = CollectorRegistry()
    counter = Counter(
        "cmdlog_http_requests",
        "",
        ["method", "route", "status"],
        registry=registry,
    )
    histogram = Histogram(
        "cmdlog_http_request_duration_seconds",
        "",
        ["route"],
        buckets=LATENCY_BUCKETS_S,
        registry=registry,
    )
    results = Counter("cmdlog_client_commands", "", ["result"], registry=registry)
    for result in COMMAND_RESULTS:
        results.labels(result)
    for method, route, status, duration_s in requests:
        label = method if method != "BREW" else "other"
        counter.labels(label, route, str(status)).inc()
        histogram.labels(route).observe(duration_s)
    for result in commands:
        results.labels(result).inc()
    return registry


@given(REQUESTS, st.lists(st.sampled_from(COMMAND_RESULTS), max_size=10))
def test_request_metrics_match_prometheus_client(
    requests: list[tuple[str, str, int, float]], commands: list[str]
) -> None:
    metrics = Metrics()
    for method, route, status, duration_s in requests:
        metrics.observe_request(method, route, status, duration_s)
    for result in commands:
        metrics.count_commands(result)

    ours = samples(metrics.registry)
    expected = samples(reference(requests, commands))
    for key, value in expected.items():
        assert key in ours, key
        assert abs(ours[key] - value) <= 1e-9 * max(1.0, abs(value)), key
    names = {name for name, _ in expected}
    assert {key for key in ours if key[0] in names} == set(expected)
