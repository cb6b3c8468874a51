"""Read one upstream's live state once into plain JSON-ready dicts.

`/upstreams` serialises these views and the dashboard renders them, so both show the
same numbers taken at the same moment (each upstream is read once per request). Values
may be None before the first catalog answer (`last_update`, `catalog_index`); they stay
None here and become JSON null. Nothing in this module raises on a missing value.

A *reading* is a view plus what only `/metrics` needs (under "metrics"): everything the
admin shows about one process. Under `--workers N` (`state.workers` set) each worker
publishes its readings and the admin merges them all (proxy.admin.merge), so /upstreams,
the dashboard and /metrics answer for every worker whichever one the request reached.
"""

from __future__ import annotations

import os
from typing import Any

from proxy.admin.merge import Reading, merge_views
from proxy.admin.operator import sync_operator_drains
from proxy.admin.rates import Counters, counters_from_views, counters_of
from proxy.admin.readings import read_all
from proxy.admin.state import AppState, listener_counts, routes_of, upstreams_of, workers_of
from proxy.upstream.host import Host
from proxy.upstream.manager import Listed, UpstreamRuntime


def endpoint_view(host: Host) -> dict[str, Any]:
    return listed_view(Listed(host, host.endpoint, str(host.state), host.reason))


def listed_view(row: Listed) -> dict[str, Any]:
    """One instance of the listing: a host, or an instance the catalog says is down."""
    ep, host = row.endpoint, row.host
    view: dict[str, Any] = {
        "id": ep.id,
        "address": ep.address,
        "port": ep.port,
        "node": ep.node,
        "datacenter": ep.datacenter,
        "tags": list(ep.tags),
        "weight": ep.weight,
        "state": row.state,
        "reason": row.reason,
        "active": host.active if host else 0,
        "requests": host.requests if host else 0,
        "failures": host.failures if host else 0,
        # JSON object keys are strings; sorted so the listing is stable between reads.
        "responses": ({str(code): n for code, n in sorted(host.status_counts.items())}
                      if host else {}),
        "health": None,  # sdproxy's own checks: null until they have probed it
        "health_checks": {},  # probes by result (pass, fail, timeout, error)
    }
    health = host.health if host else None
    if health is not None:
        view["health"] = {"ejected": health.ejected, "last": health.last,
                          "checked_at": health.checked_at}
        view["health_checks"] = dict(sorted(health.counts.items()))
    return view


def upstream_view(rt: UpstreamRuntime, connections: int = 0,
                  rejected_connections: int = 0) -> dict[str, Any]:
    cfg = rt.config
    return {
        "name": rt.name,
        "mode": cfg.mode,
        "listen": str(cfg.listen) if cfg.listen is not None else None,  # None: routes only
        "discovery": cfg.discovery,
        "balance": cfg.balance,
        "answered": bool(rt.answered),
        "catalog_index": rt.catalog_index,
        "last_update": rt.last_update,
        # Rounded: a reader wants milliseconds, not float noise.
        "stale_seconds": round(rt.stale_seconds(), 3),
        "catalog_updates": rt.catalog_updates,
        "catalog_errors": rt.catalog_errors,
        "last_error": rt.last_error or None,
        "connections": connections,
        "rejected_connections": rejected_connections,
        "no_instance_responses": rt.no_host_responses,
        "failovers": dict(sorted(rt.failovers.items())),
        # What clients got (getattr: counted by the protocols, 0 where they do not yet).
        "responses": {str(code): n for code, n in
                      sorted(getattr(rt, "responses", {}).items())},
        "bytes_in": int(getattr(rt, "bytes_in", 0)),
        "bytes_out": int(getattr(rt, "bytes_out", 0)),
        "health_checks": health_checks_view(rt),
        "endpoints": [listed_view(row) for row in rt.listing()],
    }


def upstream_reading(rt: UpstreamRuntime, connections: int = 0,
                     rejected_connections: int = 0) -> dict[str, Any]:
    """The view plus what only /metrics shows, under "metrics"."""
    reading = upstream_view(rt, connections, rejected_connections)
    hist = rt.latency
    reading["metrics"] = {
        "in_flight": rt.in_flight,
        "retries_in_flight": rt.retries_in_flight,
        "budget_exhausted": rt.budget_exhausted,
        "panic_picks": rt.panic_picks,
        "breaker_transitions": dict(rt.breaker_transitions),
        "latency_counts": list(hist.counts),  # per bucket, not cumulative; +Inf last
        "latency_sum": hist.total,
    }
    return reading


def process_reading(state: AppState) -> list[dict[str, Any]]:
    """This process's reading of every upstream, in config order. Under a supervisor a
    reading is also this worker's look at what its siblings share: it first takes up the
    drains an operator made through another worker's admin (proxy.admin.operator)."""
    sync_operator_drains(state)
    return [{**upstream_reading(rt, *listener_counts(state, rt.name)),
             "routes": routes_of(state, rt.name)} for rt in upstreams_of(state)]


def readings(state: AppState) -> list[Reading]:
    """What the admin answers for: this process alone, or every worker's latest reading
    (this one's taken now) when it runs under a supervisor."""
    own = process_reading(state)
    workers = workers_of(state)
    if workers is None:
        return [Reading(worker=None, pid=os.getpid(), live=True, upstreams=own)]
    return workers.gather(own)


def health_checks_view(rt: UpstreamRuntime) -> dict[str, Any] | None:
    """sdproxy's own checks of this upstream as configured; None when off."""
    cfg = rt.config.health
    if cfg is None:
        return None
    return {"check": "connect" if rt.config.mode == "tcp" else f"GET {cfg.path}",
            "interval": cfg.interval, "timeout": cfg.timeout, "fall": cfg.fall,
            "rise": cfg.rise, "expect": list(cfg.expect)}


def upstream_views(state: AppState) -> list[dict[str, Any]]:
    """Every upstream, in config order, each read once (under a supervisor: merged over
    the workers, see proxy.admin.merge)."""
    if workers_of(state) is not None:
        return merge_views(readings(state))
    return [{**upstream_view(rt, *listener_counts(state, rt.name)),
             "routes": routes_of(state, rt.name)} for rt in upstreams_of(state)]


def missing_upstreams(state: AppState) -> list[str]:
    """Names of the upstreams whose catalog has not answered yet (what /ready waits for);
    not those catalog routes made (`dynamic_upstreams`): they come and go with tags."""
    dynamic: frozenset[str] = getattr(state, "dynamic_upstreams", frozenset())
    return [rt.name for rt in upstreams_of(state) if not rt.answered and rt.name not in dynamic]


def rate_counters(state: AppState) -> dict[str, Counters]:
    """Per upstream, the cumulative counters the dashboard's rates are computed from:
    this process's runtimes read directly, or every worker's readings summed. Under
    workers the files are only read (each worker publishes its own every
    PUBLISH_INTERVAL already), so sampling adds no write and takes up no drain."""
    workers = workers_of(state)
    if workers is not None:
        directory = getattr(workers, "directory", None)
        found = read_all(directory) if directory is not None else readings(state)
        return counters_from_views(up for r in found for up in r.upstreams)
    return {rt.name: counters_of(rt.responses, rt.latency.counts) for rt in upstreams_of(state)}
