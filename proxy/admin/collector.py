"""Prometheus collector: turns the plain int counters of the live state into families.

The request path only increments ints on `Host` and `UpstreamRuntime`; this collector
reads them when Prometheus scrapes, so metrics cost nothing per request. Names, kinds,
labels and help text come from `proxy.metrics` (declared once there). The registry is
private to one state object (`build_registry`), never the process-global default, so
tests and reloads cannot collide on names.

It folds *readings* (proxy.admin.views): this process's alone, or under `--workers N`
every worker's (proxy.admin.merge says how): counters and histograms summed over the
workers, dead ones included, gauges per live worker with the `worker` label, and the
process metrics (memory, CPU, descriptors) of each live worker read from /proc.

Invariants: one sample per label set. A host id may appear twice for a while (the catalog
moved an instance to a new address: the old Host drains under the same id), so
per-endpoint counters of such a pair are summed and its breaker state is the routable
host's. `collect()` never raises on None values (an upstream not answered yet).
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Iterator, Sequence
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

from proxy import __version__
from proxy import metrics as m
from proxy.admin.merge import Reading, by_upstream, merge_routes, sum_maps
from proxy.admin.state import AppState
from proxy.admin.views import readings
from proxy.upstream.health_state import HEALTH_CHECKS
from proxy.upstream.host import DOWN
from proxy.upstream.manager import LATENCY_BUCKETS, LatencyHistogram

# Every family this collector yields: the catalogue, and metrics declared next to their
# component.
FAMILIES: tuple[m.Metric, ...] = (*m.ALL, HEALTH_CHECKS)
# Instance states always reported (zeros included), "down" (catalog) among them.
LISTED_STATES = (*m.HOST_STATES, DOWN)

# Bucket bounds rendered once, the way prometheus_client renders its own histograms.
_LE: tuple[str, ...] = tuple(
    floatToGoString(b) for b in LATENCY_BUCKETS)  # type: ignore[no-untyped-call]


def _family(spec: m.Metric, per_worker: bool = False) -> Any:
    # Any: each family kind has its own add_metric signature, chosen by spec.kind.
    labels = list(spec.labels)
    if spec.kind == "counter":
        return CounterMetricFamily(spec.name, spec.help, labels=labels)
    if per_worker and spec.name in m.PER_WORKER:
        labels.append(m.WORKER_LABEL)
    if spec.kind == "gauge":
        return GaugeMetricFamily(spec.name, spec.help, labels=labels)
    return HistogramMetricFamily(spec.name, spec.help, labels=labels)


def _cumulative(counts: Sequence[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    running = 0
    for le, n in zip(_LE, counts):
        running += n
        out.append((le, running))
    running += sum(counts[len(_LE):])
    out.append(("+Inf", running))
    return out


def cumulative_buckets(hist: LatencyHistogram) -> list[tuple[str, float]]:
    """(le, cumulative count) pairs ending with +Inf, from the non-cumulative counts."""
    return _cumulative(list(hist.counts))  # one read; the last entry is the +Inf overflow


def _sum_lists(lists: Sequence[Sequence[int]]) -> list[int]:
    width = max((len(x) for x in lists), default=0)
    return [sum(x[i] for x in lists if i < len(x)) for i in range(width)]


def build_info() -> tuple[str, str, str]:
    """(version, python, parser) for sdproxy_build_info."""
    import httptools

    return __version__, platform.python_version(), f"httptools {httptools.__version__}"


class SdproxyCollector(Collector):
    """Reads `state` at every scrape; holds no counters of its own. `process_metrics`:
    under a supervisor, also every worker's process metrics."""

    def __init__(self, state: AppState, *, process_metrics: bool = True) -> None:
        self.state = state
        self.process_metrics = process_metrics

    def describe(self) -> Iterator[Family]:
        # Names without reading the state: the registry checks clashes at register time.
        for spec in FAMILIES:
            yield _family(spec)

    def collect(self) -> Iterator[Family]:
        found = readings(self.state)
        per_worker = any(r.worker is not None for r in found)
        families: dict[str, Any] = {spec.name: _family(spec, per_worker)
                                    for spec in FAMILIES}
        order, live, dead = by_upstream(found)
        for name in order:
            self._counters([up for _, up in live[name]], dead.get(name, []), families)
            for worker, up in live[name]:
                self._gauges(up, [str(worker)] if per_worker else [], families)
        families[m.BUILD_INFO.name].add_metric(list(build_info()), 1)
        if per_worker:
            exits: dict[int, int] = {}
            for r in found:
                if not r.live and r.worker is not None:
                    exits[r.worker] = exits.get(r.worker, 0) + 1
            for number, n in sorted(exits.items()):
                families[m.WORKER_EXITS.name].add_metric([str(number)], n)
        yield from families.values()
        if per_worker and self.process_metrics:
            yield from _process_families(found)

    def _counters(self, ups: list[dict[str, Any]], dead: list[dict[str, Any]],
                  f: dict[str, Any]) -> None:
        """Counters of one upstream, summed over the live readings and the dead ones
        (of a dead reading, only the instances some live one still has)."""
        name = str(ups[0].get("name"))
        live_ids = {str(ep.get("id")) for up in ups for ep in up.get("endpoints") or ()}
        everyone = [*ups, *dead]
        metrics = [up.get("metrics") or {} for up in everyone]

        def total(key: str) -> int:
            return sum(int(up.get(key) or 0) for up in everyone)

        def total_metric(key: str) -> int:
            return sum(int(x.get(key) or 0) for x in metrics)

        f[m.REJECTED_CONNECTIONS.name].add_metric([name], total("rejected_connections"))
        for reason, n in sum_maps(up.get("failovers") for up in everyone).items():
            f[m.FAILOVERS.name].add_metric([name, reason], n)
        f[m.NO_INSTANCE_RESPONSES.name].add_metric([name], total("no_instance_responses"))
        f[m.RETRY_BUDGET_EXHAUSTED.name].add_metric([name], total_metric("budget_exhausted"))
        transitions = sum_maps(x.get("breaker_transitions") for x in metrics)
        for state in m.BREAKER_STATES:
            f[m.BREAKER_TRANSITIONS.name].add_metric(
                [name, state], transitions.get(state.replace("_", "-"), 0))
        f[m.PANIC_PICKS.name].add_metric([name], total_metric("panic_picks"))
        counts = _sum_lists([x.get("latency_counts") or [] for x in metrics])
        f[m.REQUEST_DURATION.name].add_metric(
            [name], buckets=_cumulative(counts),
            sum_value=sum(float(x.get("latency_sum") or 0.0) for x in metrics))
        f[m.CATALOG_UPDATES.name].add_metric([name], total("catalog_updates"))
        f[m.CATALOG_ERRORS.name].add_metric([name], total("catalog_errors"))
        for code, n in sum_maps(up.get("responses") for up in everyone).items():
            f[m.RESPONSES.name].add_metric([name, code], n)
        f[m.BYTES_IN.name].add_metric([name], total("bytes_in"))
        f[m.BYTES_OUT.name].add_metric([name], total("bytes_out"))
        for route in merge_routes(ups, dead):
            f[m.ROUTE_REQUESTS.name].add_metric(
                [str(route.get("listen")), str(route.get("host")),
                 str(route.get("path_prefix")), str(route.get("upstream"))],
                int(route.get("requests") or 0))

        # Per instance id: a draining twin's counts join its id's (one sample per label
        # set), a dead reading's only while a live worker still has the instance.
        requests: dict[str, int] = {}
        failures: dict[str, int] = {}
        codes: dict[str, list[dict[str, Any]]] = {}
        probes: dict[str, list[dict[str, Any]]] = {}
        for up in everyone:
            for ep in up.get("endpoints") or ():
                eid = str(ep.get("id"))
                if eid not in live_ids:
                    continue
                requests[eid] = requests.get(eid, 0) + int(ep.get("requests") or 0)
                failures[eid] = failures.get(eid, 0) + int(ep.get("failures") or 0)
                codes.setdefault(eid, []).append(ep.get("responses") or {})
                probes.setdefault(eid, []).append(ep.get("health_checks") or {})
        for eid, n in requests.items():
            f[m.ENDPOINT_REQUESTS.name].add_metric([name, eid], n)
            f[m.ENDPOINT_FAILURES.name].add_metric([name, eid], failures[eid])
            for code, c in sum_maps(codes[eid]).items():
                f[m.REQUESTS.name].add_metric([name, eid, code], c)
            for result, c in sum_maps(probes[eid]).items():
                f[HEALTH_CHECKS.name].add_metric([name, eid, result], c)

    def _gauges(self, up: dict[str, Any], worker: list[str], f: dict[str, Any]) -> None:
        """Gauges of one upstream in one live reading; `worker` is [] or [its number]."""
        name = str(up.get("name"))
        x = up.get("metrics") or {}
        f[m.CONNECTIONS.name].add_metric([name, *worker], int(up.get("connections") or 0))
        f[m.REQUESTS_IN_FLIGHT.name].add_metric([name, *worker], int(x.get("in_flight") or 0))
        f[m.RETRIES_IN_FLIGHT.name].add_metric(
            [name, *worker], int(x.get("retries_in_flight") or 0))
        f[m.CATALOG_STALE.name].add_metric(
            [name, *worker], float(up.get("stale_seconds") or 0.0))
        f[m.CATALOG_ANSWERED.name].add_metric([name, *worker], 1 if up.get("answered") else 0)
        last_update = up.get("last_update")
        if last_update is not None:  # a 1970 timestamp would read as "very stale"
            f[m.CATALOG_LAST_UPDATE.name].add_metric([name, *worker], float(last_update))

        endpoints = up.get("endpoints") or []
        # Every known state is reported, zeros included, so a graph shows "0 open"
        # rather than a gap; a state this module does not know yet is still counted.
        by_state = dict.fromkeys(LISTED_STATES, 0)
        for ep in endpoints:
            s = str(ep.get("state"))
            by_state[s] = by_state.get(s, 0) + 1
        for s, n in by_state.items():
            f[m.ENDPOINTS.name].add_metric([name, s, *worker], n)

        active: dict[str, int] = {}
        state_of: dict[str, str] = {}
        for ep in endpoints:  # routable hosts first, so a shared id takes the routable state
            eid = str(ep.get("id"))
            active[eid] = active.get(eid, 0) + int(ep.get("active") or 0)
            state_of.setdefault(eid, str(ep.get("state")))
        for eid, n in active.items():
            f[m.ACTIVE_REQUESTS.name].add_metric([name, eid, *worker], n)
            current = m.BREAKER_STATE_OF_HOST.get(state_of[eid], "closed")
            for b in m.BREAKER_STATES:
                f[m.BREAKER_STATE.name].add_metric(
                    [name, eid, b, *worker], 1 if b == current else 0)


def _process_families(found: list[Reading]) -> Iterator[Family]:
    """The standard process metrics of every live worker, labelled with its number: the
    process that answers a scrape changes from one scrape to the next, so its own would
    jump between workers. A worker whose /proc cannot be read is left out."""
    merged: dict[str, Family] = {}
    for r in sorted((r for r in found if r.live and r.worker is not None),
                    key=lambda r: r.worker or 0):
        # A collector per worker: it reads /proc/<pid>; registry=None keeps it unregistered.
        reader = ProcessCollector(pid=functools.partial(int, r.pid), registry=None)
        for family in reader.collect():
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Family(family.name, family.documentation,
                                                      family.type, family.unit)
            for sample in family.samples:
                labels = {**sample.labels, m.WORKER_LABEL: str(r.worker)}
                target.add_sample(sample.name, labels, sample.value)
    yield from merged.values()


def build_registry(state: AppState, *, process: bool = True) -> CollectorRegistry:
    """A private registry holding the sdproxy collector (and process/platform metrics:
    this process's, or under a supervisor every worker's, from the collector itself)."""
    registry = CollectorRegistry()
    registry.register(SdproxyCollector(state, process_metrics=process))
    if process:
        if getattr(state, "workers", None) is None:
            ProcessCollector(registry=registry)  # RSS, CPU, open fds, start time
        PlatformCollector(registry=registry)  # python_info
    return registry
