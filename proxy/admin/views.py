"""Read one upstream's live state once into plain JSON-ready dicts.

`/upstreams` serialises these views and the dashboard renders them, so both show the
same numbers taken at the same moment (each upstream is read once per request). Values
may be None before the first catalog answer (`last_update`, `catalog_index`); they stay
None here and become JSON null. Nothing in this module raises on a missing value.
"""

from __future__ import annotations

from typing import Any

from proxy.admin.state import AppState, listener_counts, upstreams_of
from proxy.upstream.host import Host
from proxy.upstream.manager import UpstreamRuntime


def endpoint_view(host: Host) -> dict[str, Any]:
    ep = host.endpoint
    return {
        "id": ep.id,
        "address": ep.address,
        "port": ep.port,
        "node": ep.node,
        "datacenter": ep.datacenter,
        "tags": list(ep.tags),
        "weight": ep.weight,
        "state": str(host.state),
        "active": host.active,
        "requests": host.requests,
        "failures": host.failures,
        # JSON object keys are strings; sorted so the listing is stable between reads.
        "responses": {str(code): n for code, n in sorted(host.status_counts.items())},
    }


def upstream_view(rt: UpstreamRuntime, connections: int = 0,
                  rejected_connections: int = 0) -> dict[str, Any]:
    cfg = rt.config
    return {
        "name": rt.name,
        "mode": cfg.mode,
        "listen": str(cfg.listen),
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
        "endpoints": [endpoint_view(h) for h in rt.all_hosts()],
    }


def upstream_views(state: AppState) -> list[dict[str, Any]]:
    """Every upstream, in config order, each read once."""
    return [upstream_view(rt, *listener_counts(state, rt.name)) for rt in upstreams_of(state)]


def missing_upstreams(state: AppState) -> list[str]:
    """Names of the upstreams whose catalog has not answered yet (what /ready waits for)."""
    return [rt.name for rt in upstreams_of(state) if not rt.answered]
