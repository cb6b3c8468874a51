"""Merge the readings of several workers into one answer (SPEC "Workers").

Under `--workers N` each worker reads its own state (proxy.admin.views: a *reading*, plain
JSON-ready dicts) and publishes it; whichever worker an admin request reaches merges them
all here. Pure: dicts in, dicts out, no I/O.

Rules:
- Counters (requests, failures, responses by code, catalog updates, bytes, ...) are summed
  over every reading, those of dead workers included: a worker's counts do not vanish
  when it is killed, so a sum never goes down (Prometheus would read a drop as a reset).
  A dead worker's counts are kept only for upstreams and instances a live worker still
  has, so an upstream removed by a reload, or an instance gone from the catalog, leaves.
- Gauges (connections, requests in flight, active requests) come from live workers only:
  /upstreams sums them and lists each worker's under `workers` ({"0": {...}, ...});
  /metrics gives them per worker (proxy.admin.collector).
- An instance's `state` is the most severe any live worker has for it (an open breaker
  in one worker is worth seeing), with each worker's state, reason and active requests
  under `workers`; its other fields come from the worker whose state was taken.
- Catalog freshness (`stale_seconds`, `last_update`, `catalog_index`, `last_error`) is the
  stalest worker's; `answered` holds only when every live worker's catalog answered.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Upstream fields that count events (summed over every reading, dead ones included) and
# that hold a level now (summed over live readings).
UPSTREAM_COUNTERS = ("catalog_updates", "catalog_errors", "rejected_connections",
                     "no_instance_responses", "bytes_in", "bytes_out")
UPSTREAM_COUNTER_MAPS = ("failovers", "responses")
UPSTREAM_GAUGES = ("connections",)
ENDPOINT_COUNTERS = ("requests", "failures")
ENDPOINT_COUNTER_MAPS = ("responses", "health_checks")
ENDPOINT_GAUGES = ("active",)

# What each worker's entry under `workers` shows, when its reading has it.
UPSTREAM_PER_WORKER = ("answered", "stale_seconds", "connections")
ENDPOINT_PER_WORKER = ("state", "reason", "active")

# Most severe first; a state not listed counts as the most severe (it is new: show it).
STATE_SEVERITY = {state: rank for rank, state in enumerate(
    ("down", "ejected", "open", "half_open", "draining", "healthy"), start=1)}


@dataclass(frozen=True, slots=True)
class Reading:
    """One process's reading of every upstream (proxy.admin.views.process_reading)."""

    worker: int | None  # None: a process that runs alone (no supervisor)
    pid: int
    live: bool  # False: the worker has exited; only its counters still count
    upstreams: list[dict[str, Any]]


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def sum_maps(maps: Iterable[Mapping[str, Any] | None]) -> dict[str, int]:
    """{"200": 3} + {"200": 1, "502": 2} -> {"200": 4, "502": 2}, keys sorted."""
    total: dict[str, int] = {}
    for counts in maps:
        for key, n in (counts or {}).items():
            total[key] = total.get(key, 0) + _int(n)
    return dict(sorted(total.items()))


def severity(state: Any) -> int:
    return STATE_SEVERITY.get(str(state), 0)


def by_upstream(readings: Iterable[Reading]) -> tuple[
        list[str], dict[str, list[tuple[int, dict[str, Any]]]], dict[str, list[dict[str, Any]]]]:
    """(names in the live workers' order, live parts by name as (worker, upstream), dead
    parts by name, only for names some live worker has)."""
    order: list[str] = []
    live: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    dead: dict[str, list[dict[str, Any]]] = {}
    ordered = sorted(readings, key=lambda r: (r.worker or 0, r.pid))
    for reading in ordered:
        if reading.live:
            for up in reading.upstreams:
                name = str(up.get("name"))
                if name not in live:
                    order.append(name)
                    live[name] = []
                live[name].append((reading.worker or 0, up))
    for reading in ordered:
        if not reading.live:
            for up in reading.upstreams:
                name = str(up.get("name"))
                if name in live:
                    dead.setdefault(name, []).append(up)
    return order, live, dead


def merge_views(readings: Iterable[Reading]) -> list[dict[str, Any]]:
    """The /upstreams answer for every worker: one view per upstream, config order."""
    order, live, dead = by_upstream(readings)
    return [merge_upstream(live[name], dead.get(name, [])) for name in order]


def merge_upstream(parts: list[tuple[int, dict[str, Any]]],
                   dead: list[dict[str, Any]]) -> dict[str, Any]:
    """One upstream's view from the live workers' `parts` and the dead workers' views."""
    ups = [up for _, up in parts]
    # The stalest worker speaks for the catalog (ties: the lowest worker number).
    _, stalest = max(parts, key=lambda p: (float(p[1].get("stale_seconds") or 0.0), -p[0]))
    merged = {k: v for k, v in stalest.items() if k != "metrics"}
    merged["answered"] = all(bool(up.get("answered")) for up in ups)
    for key in UPSTREAM_COUNTERS:
        merged[key] = sum(_int(up.get(key)) for up in [*ups, *dead])
    for key in UPSTREAM_COUNTER_MAPS:
        merged[key] = sum_maps(up.get(key) for up in [*ups, *dead])
    for key in UPSTREAM_GAUGES:
        merged[key] = sum(_int(up.get(key)) for up in ups)
    merged["workers"] = {str(w): _pick(up, UPSTREAM_PER_WORKER) for w, up in parts}
    merged["endpoints"] = merge_endpoints(parts, dead)
    merged["routes"] = merge_routes(ups, dead)
    return merged


def _route_key(route: Mapping[str, Any]) -> tuple[str, str, str, str]:
    return (str(route.get("listen")), str(route.get("host")), str(route.get("path_prefix")),
            str(route.get("upstream")))


def merge_routes(ups: list[dict[str, Any]], dead: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A routed listener's routes as the live workers have them, each with its requests
    summed over every worker (a dead one's too, for routes a live one still has)."""
    merged: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for up in ups:
        for route in up.get("routes") or ():
            merged.setdefault(_route_key(route), {**route, "requests": 0})
    for up in [*ups, *dead]:
        for route in up.get("routes") or ():
            entry = merged.get(_route_key(route))
            if entry is not None:
                entry["requests"] += _int(route.get("requests"))
    return list(merged.values())


def _pick(entry: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: entry[k] for k in keys if k in entry}


def _endpoint_key(ep: Mapping[str, Any]) -> tuple[str, str, str]:
    # Address and port too: an instance that moved keeps its id while the old Host drains.
    return str(ep.get("id")), str(ep.get("address")), str(ep.get("port"))


def merge_endpoints(parts: list[tuple[int, dict[str, Any]]],
                    dead: list[dict[str, Any]]) -> list[dict[str, Any]]:
    live: dict[tuple[str, str, str], list[tuple[int, dict[str, Any]]]] = {}
    for worker, up in parts:
        for ep in up.get("endpoints") or ():
            live.setdefault(_endpoint_key(ep), []).append((worker, ep))
    gone: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for up in dead:
        for ep in up.get("endpoints") or ():
            key = _endpoint_key(ep)
            if key in live:
                gone.setdefault(key, []).append(ep)
    merged = []
    for key, entries in live.items():
        _, chosen = min(entries, key=lambda e: (severity(e[1].get("state")), e[0]))
        eps = [ep for _, ep in entries]
        everyone = [*eps, *gone.get(key, [])]
        out = dict(chosen)
        for field in ENDPOINT_COUNTERS:
            out[field] = sum(_int(ep.get(field)) for ep in everyone)
        for field in ENDPOINT_COUNTER_MAPS:
            out[field] = sum_maps(ep.get(field) for ep in everyone)
        for field in ENDPOINT_GAUGES:
            out[field] = sum(_int(ep.get(field)) for ep in eps)
        out["workers"] = {str(w): _pick(ep, ENDPOINT_PER_WORKER) for w, ep in entries}
        merged.append(out)
    return merged
