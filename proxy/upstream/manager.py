"""Per-upstream pool: reconcile catalog answers into hosts, publish immutable snapshots.

Owns, for one upstream, the hosts keyed by endpoint id and `current`, the snapshot that
requests read once. A catalog answer is reconciled by id (kept hosts keep their state),
a new snapshot is built off to the side and swapped in one assignment; an unchanged
answer changes nothing. Removed hosts are marked draining: they get no new work, their
idle connections close at once, and they leave the listing when their last request ends.

Knows nothing of sockets or the event loop; `clock` is injected for tests.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from proxy.config import UpstreamConfig
from proxy.model import CatalogAnswer, Endpoint
from proxy.upstream.balancers import Balancer, make_balancer
from proxy.upstream.host import Host

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)

log = logging.getLogger("sdproxy.upstream")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The routable hosts of one upstream at one catalog version. Never mutated."""

    hosts: tuple[Host, ...]
    index: int | None = None


EMPTY = Snapshot(())


class LatencyHistogram:
    """Cumulative-at-scrape histogram; observing is one bisect and two additions."""

    __slots__ = ("count", "counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1


class UpstreamRuntime:
    """One upstream's live state: snapshot, hosts, catalog freshness and counters."""

    def __init__(self, config: UpstreamConfig, *, clock: Callable[[], float] = time.time,
                 balancer: Balancer | None = None) -> None:
        self.config = config
        self.name = config.name
        self.clock = clock
        self.balancer = balancer or make_balancer(config.balance)
        self.current: Snapshot = EMPTY
        self.hosts: dict[str, Host] = {}  # routable, by endpoint id
        self.draining: dict[str, Host] = {}  # removed, with work still in flight
        self.answered = False
        self.catalog_index: int | None = None
        self.last_update: float | None = None  # wall time of the last successful answer
        self.failing_since: float | None = None  # first error after the last success
        self.catalog_updates = 0
        self.catalog_errors = 0
        self.last_error = ""
        self.latency = LatencyHistogram()
        self.failovers: dict[str, int] = {}  # retries by reason
        self.no_host_responses = 0

    # -- catalog side -------------------------------------------------------------------
    def on_catalog_answer(self, answer: CatalogAnswer) -> None:
        now = self.clock()
        self.answered = True
        self.last_update = now
        self.failing_since = None
        self.catalog_index = answer.index
        self.catalog_updates += 1
        self.reconcile(answer.endpoints, answer.index)

    def on_catalog_error(self, error: str) -> None:
        self.catalog_errors += 1
        self.last_error = error
        if self.failing_since is None:
            self.failing_since = self.clock()

    def on_catalog_alive(self) -> None:
        """The catalog answered, unchanged: the pool is fresh."""
        self.last_update = self.clock()
        self.failing_since = None

    def stale_seconds(self) -> float:
        """0 while the catalog answers; seconds since the last good answer once it fails."""
        if self.failing_since is None:
            return 0.0
        since = self.last_update if self.last_update is not None else self.failing_since
        return max(0.0, self.clock() - since)

    def reconcile(self, endpoints: tuple[Endpoint, ...], index: int | None = None) -> None:
        old = self.hosts
        new: dict[str, Host] = {}
        added: list[str] = []
        changed: list[str] = []
        for ep in endpoints:
            host = old.get(ep.id) or self.draining.pop(ep.id, None)
            if host is None or (host.endpoint.address, host.endpoint.port) != (ep.address, ep.port):
                if host is not None:  # same id, new address: the old connections are useless
                    self._retire(host)
                host = Host(ep)
                added.append(ep.id)
            elif host.endpoint != ep:
                host.endpoint = ep
                changed.append(ep.id)
            if host.draining:
                host.draining = False
                added.append(ep.id)
            new[ep.id] = host
        removed = [hid for hid in old if hid not in new]
        for hid in removed:
            self._retire(old[hid])
        if not (added or removed or changed) and self.current.hosts:
            return  # same pool: skip the swap
        self.hosts = new
        self.current = Snapshot(tuple(new.values()), index)  # the swap: one assignment
        if added or removed or changed:
            log.info("event=pool_change upstream=%s added=%s removed=%s changed=%s size=%d",
                     self.name, ",".join(added) or "-", ",".join(removed) or "-",
                     ",".join(changed) or "-", len(new))

    def _retire(self, host: Host) -> None:
        host.draining = True
        host.pool.close_all()
        if host.active:
            self.draining[host.id] = host

    # -- request side -------------------------------------------------------------------
    def pick(self, tried: Collection[Host]) -> Host | None:
        return self.balancer.pick(self.current.hosts, tried)

    def release(self, host: Host) -> None:
        """Called when a request or connection on `host` ends."""
        host.active -= 1
        if host.draining and host.active <= 0:
            self.draining.pop(host.id, None)

    def all_hosts(self) -> list[Host]:
        return [*self.hosts.values(), *self.draining.values()]

    def count_failover(self, reason: str) -> None:
        self.failovers[reason] = self.failovers.get(reason, 0) + 1
