"""What the admin API reads: the application state, as a structural type.

The composition root owns the state object; the admin only reads it, at request time,
never caching it (a SIGHUP reload may replace `upstreams` or `listeners` wholesale).
Reads are defensive: a listener that is not open yet, or an object without one of the
counters, reads as 0 rather than failing a scrape.

Under `--workers N` the state also has `workers` (a `WorkerReadings`): how this worker
publishes what it reads and gathers its siblings' readings (proxy.admin.readings).
Without it, the admin answers for this process alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from proxy.config import AdminConfig
from proxy.upstream.manager import UpstreamRuntime

if TYPE_CHECKING:
    from proxy.admin.merge import Reading


class AppState(Protocol):
    @property
    def upstreams(self) -> Mapping[str, UpstreamRuntime]: ...  # in config order

    @property
    def listeners(self) -> Mapping[str, object]: ...  # by upstream name; see listener_counts

    @property
    def started_at(self) -> float: ...  # unix time


class WorkerReadings(Protocol):
    def gather(self, own: list[dict[str, Any]]) -> list[Reading]:
        """Publish `own` (this worker's reading, just taken) and return every worker's
        latest: this one's, the live siblings' and the dead ones'."""


def workers_of(state: AppState) -> WorkerReadings | None:
    """The state's `workers`, or None for a process that runs alone."""
    workers: WorkerReadings | None = getattr(state, "workers", None)
    return workers


def admin_config(state: AppState) -> AdminConfig:
    """The running config's `[admin]` (read per request: a reload may change the token);
    the defaults for a state that carries no config."""
    admin = getattr(getattr(state, "config", None), "admin", None)
    return admin if isinstance(admin, AdminConfig) else AdminConfig()


def upstreams_of(state: AppState) -> list[UpstreamRuntime]:
    """The upstreams, copied: the handler then iterates a list a reload cannot change."""
    return list(getattr(state, "upstreams", {}).values())


def routes_of(state: AppState, name: str) -> list[dict[str, Any]]:
    """The routes of the routed listener published under `name` (`listener ADDR`), in
    table order, each with the requests it took; [] for anything else."""
    listener = getattr(state, "listeners", {}).get(name)
    table = getattr(listener, "routes", None)
    if table is None:
        return []
    listen = str(getattr(getattr(getattr(listener, "runtime", None), "config", None),
                         "listen", ""))
    return [{"listen": listen, "host": e.route.host, "path_prefix": e.route.path_prefix,
             "upstream": e.route.upstream, "strip_prefix": e.strip, "source": e.route.source,
             "requests": int(e.requests)}
            for e in list(getattr(table, "entries", ()))]


def listener_counts(state: AppState, name: str) -> tuple[int, int]:
    """(open client connections, rejected connections) of the upstream's listener."""
    listener = getattr(state, "listeners", {}).get(name)
    if listener is None:
        return 0, 0
    return (int(getattr(listener, "connections", 0) or 0),
            int(getattr(listener, "rejected_connections", 0) or 0))
