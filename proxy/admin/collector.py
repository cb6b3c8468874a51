"""Prometheus collector: turns the plain int counters of the live state into families.

The request path only increments ints on `Host` and `UpstreamRuntime`; this collector
reads them when Prometheus scrapes, so metrics cost nothing per request. Names, kinds,
labels and help text come from `proxy.metrics` (declared once there). The registry is
private to one state object (`build_registry`), never the process-global default, so
tests and reloads cannot collide on names.

Invariants: one sample per label set. A host id may appear twice for a while (the catalog
moved an instance to a new address: the old Host drains under the same id), so
per-endpoint counters of such a pair are summed and its breaker state is the routable
host's. `collect()` never raises on None values (an upstream not answered yet).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric as Family
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy import metrics as m
from proxy.admin.state import AppState, listener_counts, upstreams_of
from proxy.upstream.host import Host
from proxy.upstream.manager import LATENCY_BUCKETS, LatencyHistogram, UpstreamRuntime

# Bucket bounds rendered once, the way prometheus_client renders its own histograms.
_LE: tuple[str, ...] = tuple(
    floatToGoString(b) for b in LATENCY_BUCKETS)  # type: ignore[no-untyped-call]


def _family(spec: m.Metric) -> Any:
    # Any: each family kind has its own add_metric signature, chosen by spec.kind.
    labels = list(spec.labels)
    if spec.kind == "counter":
        return CounterMetricFamily(spec.name, spec.help, labels=labels)
    if spec.kind == "gauge":
        return GaugeMetricFamily(spec.name, spec.help, labels=labels)
    return HistogramMetricFamily(spec.name, spec.help, labels=labels)


def cumulative_buckets(hist: LatencyHistogram) -> list[tuple[str, float]]:
    """(le, cumulative count) pairs ending with +Inf, from the non-cumulative counts."""
    counts = list(hist.counts)  # one read; the last entry is the +Inf overflow
    out: list[tuple[str, float]] = []
    running = 0
    for le, n in zip(_LE, counts):
        running += n
        out.append((le, running))
    running += sum(counts[len(_LE):])
    out.append(("+Inf", running))
    return out


@dataclass
class _EndpointTotals:
    state: str
    active: int = 0
    requests: int = 0
    failures: int = 0
    status_counts: dict[int, int] = field(default_factory=dict)

    def add(self, host: Host) -> None:
        self.active += host.active
        self.requests += host.requests
        self.failures += host.failures
        for code, n in host.status_counts.items():
            self.status_counts[code] = self.status_counts.get(code, 0) + n


def _by_endpoint(hosts: Iterable[Host]) -> dict[str, _EndpointTotals]:
    totals: dict[str, _EndpointTotals] = {}
    for host in hosts:  # routable hosts first, so a shared id takes the routable state
        t = totals.get(host.id)
        if t is None:
            t = totals[host.id] = _EndpointTotals(state=str(host.state))
        t.add(host)
    return totals


class SdproxyCollector(Collector):
    """Reads `state` at every scrape; holds no counters of its own."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def describe(self) -> Iterator[Family]:
        # Names without reading the state: the registry checks clashes at register time.
        for spec in m.ALL:
            yield _family(spec)

    def collect(self) -> Iterator[Family]:
        families: dict[str, Any] = {spec.name: _family(spec) for spec in m.ALL}
        for rt in upstreams_of(self.state):
            self._collect_upstream(rt, families)
        yield from families.values()

    def _collect_upstream(self, rt: UpstreamRuntime, f: dict[str, Any]) -> None:
        up = rt.name
        connections, rejected = listener_counts(self.state, up)
        f[m.CONNECTIONS.name].add_metric([up], connections)
        f[m.REJECTED_CONNECTIONS.name].add_metric([up], rejected)

        for reason, n in sorted(rt.failovers.items()):
            f[m.FAILOVERS.name].add_metric([up, reason], n)
        f[m.NO_INSTANCE_RESPONSES.name].add_metric([up], rt.no_host_responses)
        f[m.REQUESTS_IN_FLIGHT.name].add_metric([up], rt.in_flight)
        f[m.RETRIES_IN_FLIGHT.name].add_metric([up], rt.retries_in_flight)
        f[m.RETRY_BUDGET_EXHAUSTED.name].add_metric([up], rt.budget_exhausted)
        for state in m.BREAKER_STATES:
            f[m.BREAKER_TRANSITIONS.name].add_metric(
                [up, state], rt.breaker_transitions.get(state.replace("_", "-"), 0))
        f[m.PANIC_PICKS.name].add_metric([up], rt.panic_picks)
        hist = rt.latency
        f[m.REQUEST_DURATION.name].add_metric(
            [up], buckets=cumulative_buckets(hist), sum_value=hist.total)

        f[m.CATALOG_UPDATES.name].add_metric([up], rt.catalog_updates)
        f[m.CATALOG_ERRORS.name].add_metric([up], rt.catalog_errors)
        f[m.CATALOG_STALE.name].add_metric([up], rt.stale_seconds())
        f[m.CATALOG_ANSWERED.name].add_metric([up], 1 if rt.answered else 0)
        if rt.last_update is not None:  # a 1970 timestamp would read as "very stale"
            f[m.CATALOG_LAST_UPDATE.name].add_metric([up], rt.last_update)

        hosts = rt.all_hosts()
        # Every known state is reported, zeros included, so a graph shows "0 open"
        # rather than a gap; a state this module does not know yet is still counted.
        by_state = dict.fromkeys(m.HOST_STATES, 0)
        for host in hosts:
            s = str(host.state)
            by_state[s] = by_state.get(s, 0) + 1
        for s, n in by_state.items():
            f[m.ENDPOINTS.name].add_metric([up, s], n)

        for eid, t in _by_endpoint(hosts).items():
            f[m.ENDPOINT_REQUESTS.name].add_metric([up, eid], t.requests)
            f[m.ENDPOINT_FAILURES.name].add_metric([up, eid], t.failures)
            f[m.ACTIVE_REQUESTS.name].add_metric([up, eid], t.active)
            for code, n in sorted(t.status_counts.items()):
                f[m.REQUESTS.name].add_metric([up, eid, str(code)], n)
            current = m.BREAKER_STATE_OF_HOST.get(t.state, "closed")
            for b in m.BREAKER_STATES:
                f[m.BREAKER_STATE.name].add_metric([up, eid, b], 1 if b == current else 0)


def build_registry(state: AppState, *, process: bool = True) -> CollectorRegistry:
    """A private registry holding the sdproxy collector (and process/platform metrics)."""
    registry = CollectorRegistry()
    registry.register(SdproxyCollector(state))
    if process:
        ProcessCollector(registry=registry)  # RSS, CPU, open fds, start time
        PlatformCollector(registry=registry)  # python_info
    return registry
