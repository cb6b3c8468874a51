"""Per-upstream pool: reconcile catalog answers into hosts, publish immutable snapshots.

Owns, for one upstream, the hosts keyed by endpoint id and `current`, the snapshot that
requests read once. A catalog answer is reconciled by id (kept hosts keep their state),
a new snapshot is built off to the side and swapped in one assignment; an unchanged
answer changes nothing. Removed hosts are marked draining: they get no new work, their
idle connections close at once, and they leave the listing when their last request ends.

Who may get new work (`available`): hosts in the catalog, not drained by an operator
(`set_operator_drain`), not ejected by sdproxy's own health checks (`on_probe_result`,
rules in health_state.py), whose breaker is not open. The panic rule (Envoy's panic
mode with a threshold of 0): when no host is both in rotation and closed (every one
ejected or open), requests go to any host an operator has not drained, as trials,
rather than the upstream switching itself off; a health-check path that fails
everywhere, or an outage of every instance at once, then degrades to "try them all".
An operator's drain is never overridden: draining every instance means 503.

The listing (`listing()`, what /upstreams shows) adds to the hosts the instances the
catalog reports as not passing (`on_catalog_down`), state "down" with the check's output.

The request side (`begin_attempt`, `end_attempt`, `should_retry`) is the one place HTTP
and TCP count attempts and decide retries: never the same instance twice for one request,
`host.active`/`host.requests`/`retries_in_flight` balanced whatever the outcome, the retry
budget, failovers counted once per retry made.

The snapshot (`current`) is the one source of routing truth: the hosts and everything
derived from them and their breakers (who may be picked, the panic view, the next trial
due) are built together by `routing_snapshot` and published in one assignment, so a
request never sees hosts of one version and derived sets of another.

Knows nothing of sockets or the event loop. Two injected clocks: `monotonic` for every
decision (breaker trials, the breakers' own opened-at), `clock` (wall time) only for what
is shown (timestamps, staleness).
"""

from __future__ import annotations

import bisect
import functools
import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from proxy.config import UpstreamConfig
from proxy.l7.exchange import may_retry
from proxy.model import CatalogAnswer, Endpoint
from proxy.outcomes import CONNECT_FAILURE, LABELS, mask_of
from proxy.upstream.balancers import Balancer, make_balancer
from proxy.upstream.breaker import CLOSED, HALF_OPEN, OPEN, HostBreaker
from proxy.upstream.health_state import EJECTED, HealthState, ProbeResult
from proxy.upstream.host import DOWN, Host

LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0)

log = logging.getLogger("sdproxy.upstream")


INFINITY: Final = float("inf")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The hosts of one upstream at one catalog version, with who may be picked among
    them as their states were when it was built. Never mutated: any change (catalog,
    breaker, health, operator) builds a new one (`routing_snapshot`)."""

    hosts: tuple[Host, ...]
    index: int | None = None
    # In rotation (Host.in_rotation) and breaker not open: the balancer's candidates.
    available: tuple[Host, ...] = ()
    # Some host in `available` is half-open: only its free trial may be picked.
    half_open: bool = False
    # Monotonic time when the first open breaker may try again.
    next_trial_at: float = INFINITY
    # Empty, except in panic (no host both in rotation and closed): then every host an
    # operator has not drained, each may be picked as a trial.
    panic_hosts: tuple[Host, ...] = ()


def routing_snapshot(hosts: tuple[Host, ...], index: int | None) -> Snapshot:
    """`hosts` with the routing view derived from their current states."""
    in_rotation = [h for h in hosts if h.in_rotation]
    available = tuple(h for h in in_rotation if h.breaker.state != OPEN)
    half_open = any(h.breaker.state == HALF_OPEN for h in available)
    next_trial_at = min((h.breaker.opened_at + h.breaker.reset_timeout
                         for h in hosts if h.breaker.state == OPEN), default=INFINITY)
    panic_hosts: tuple[Host, ...] = ()
    if not any(h.breaker.state == CLOSED for h in in_rotation):
        panic_hosts = tuple(h for h in hosts if not h.operator_drained)
    return Snapshot(hosts, index, available, half_open, next_trial_at, panic_hosts)


EMPTY: Final = Snapshot(())


class Listed(NamedTuple):
    """One row of the listing: a host, or (host None) an instance the catalog lists as
    not passing."""

    host: Host | None
    endpoint: Endpoint
    state: str
    reason: str


@dataclass(slots=True)
class OperatorView:
    """What an operator sees and decides beyond the routable pool (one attribute on the
    runtime: see the note on UpstreamRuntime's attributes)."""

    # Instances the catalog lists as not passing, with why: (endpoint, check output).
    down: tuple[tuple[Endpoint, str], ...] = ()
    # Ids an operator drained; kept by id so that an instance that leaves the catalog and
    # comes back is still drained until enabled.
    drained_ids: set[str] = field(default_factory=set)


def utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


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

    # Compiled by mypyc (setup.py's HOT_MODULES); slots keep the interpreted fallback
    # fast (CPython 3.11 reads instance-dict attributes fast only while an object has
    # fewer than 30) and as strict as the compiled class: no attribute outside this
    # list, no method replaced on one instance.
    __slots__ = (
        "_config",
        "answered",
        "balancer",
        "breaker_transitions",
        "budget_exhausted",
        "bytes_in",
        "bytes_out",
        "catalog_errors",
        "catalog_index",
        "catalog_updates",
        "clock",
        "current",
        "draining",
        "failing_since",
        "failovers",
        "hosts",
        "in_flight",
        "last_error",
        "last_update",
        "latency",
        "monotonic",
        "name",
        "no_host_responses",
        "operator_view",
        "panic_picks",
        "responses",
        "retries_in_flight",
        "retry_on",
    )


    def __init__(self, config: UpstreamConfig, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 balancer: Balancer | None = None) -> None:
        self._config = config
        self.retry_on = mask_of(config.retry_on)  # an outcome bit set (outcomes.mask_of)
        self.name = config.name
        self.clock = clock
        self.monotonic = monotonic
        self.balancer = balancer or make_balancer(config.balance, clock=monotonic)
        self.current: Snapshot = EMPTY
        self.hosts: dict[str, Host] = {}  # in the catalog, by endpoint id
        # Removed hosts with work still in flight, by identity: one id may have several
        # (an instance that moved address while busy, then left).
        self.draining: dict[int, Host] = {}
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
        self.breaker_transitions: dict[str, int] = {}  # by new state
        self.panic_picks = 0  # picks made although every breaker was open
        self.in_flight = 0  # requests (http) or connections (tcp) being served
        self.retries_in_flight = 0
        self.budget_exhausted = 0  # retries refused by the retry budget
        # What clients got: responses by status (an instance's or sdproxy's own) and
        # bytes each way (proxy.protocols count them, relay.Traffic).
        self.responses: dict[int, int] = {}
        self.bytes_in = 0
        self.bytes_out = 0
        self.operator_view = OperatorView()  # read by the admin API, not by requests

    @property
    def config(self) -> UpstreamConfig:
        return self._config

    @config.setter
    def config(self, config: UpstreamConfig) -> None:
        """A reload sets it: the retry rules change with it."""
        self._config = config
        self.retry_on = mask_of(config.retry_on)

    # -- the routing view, all read from the one snapshot (admin API and tests) ----------
    @property
    def available(self) -> tuple[Host, ...]:
        return self.current.available

    @property
    def panic_hosts(self) -> tuple[Host, ...]:
        return self.current.panic_hosts

    @property
    def panic(self) -> bool:
        return bool(self.current.panic_hosts)

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
            host = old.get(ep.id) or self._revive(ep.id)
            if host is None or (host.endpoint.address, host.endpoint.port) != (ep.address, ep.port):
                if host is not None:  # same id, new address: the old connections are useless
                    self._retire(host)
                host = self._new_host(ep)
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
        self._publish(tuple(new.values()), index)
        if added or removed or changed:
            log.info("event=pool_change upstream=%s added=%s removed=%s changed=%s size=%d",
                     self.name, ",".join(added) or "-", ",".join(removed) or "-",
                     ",".join(changed) or "-", len(new))

    def _retire(self, host: Host) -> None:
        host.draining = True
        host.pool.close_all()
        if host.active:
            self.draining[id(host)] = host

    def _revive(self, host_id: str) -> Host | None:
        """A draining host whose id came back to the catalog (the latest one retired)."""
        for key, host in reversed(self.draining.items()):
            if host.id == host_id:
                return self.draining.pop(key)
        return None

    def _new_host(self, ep: Endpoint) -> Host:
        cfg = self.config.breaker
        breaker = HostBreaker(f"{self.name}/{ep.id}", cfg.failures, cfg.reset_timeout,
                              clock=self.monotonic)
        host = Host(ep, breaker)
        breaker.on_change = functools.partial(self._on_breaker_change, host)
        host.operator_drained = ep.id in self.operator_view.drained_ids
        return host

    # -- breakers -----------------------------------------------------------------------
    def _on_breaker_change(self, host: Host, breaker: HostBreaker, old: str,
                           new: str) -> None:
        """pybreaker's listener: a host's breaker moved; recompute who may be picked."""
        self.breaker_transitions[new] = self.breaker_transitions.get(new, 0) + 1
        if new == OPEN:
            cause = (f"the trial request failed: {host.last_failure}" if old == HALF_OPEN
                     else f"{self.config.breaker.failures} consecutive failures, the last: "
                          f"{host.last_failure}")
            host.open_reason = f"breaker opened at {utc(self.clock())} after {cause}"
        log.info("event=breaker_change upstream=%s instance=%s from=%s to=%s failures=%d",
                 self.name, host.id, old, new, breaker.failures)
        self._refresh_available()

    def _refresh_available(self) -> None:
        """A host's state changed (breaker, health, operator): rebuild the routing view."""
        current = self.current
        self._publish(current.hosts, current.index)

    def _publish(self, hosts: tuple[Host, ...], index: int | None) -> None:
        snapshot = routing_snapshot(hosts, index)
        was_panic = bool(self.current.panic_hosts)
        self.current = snapshot  # the swap: one assignment
        if bool(snapshot.panic_hosts) != was_panic:
            log.warning("event=panic_mode upstream=%s on=%s hosts=%d", self.name,
                        str(not was_panic).lower(), len(snapshot.panic_hosts))

    def _start_due_trials(self, now: float) -> None:
        for host in self.current.hosts:
            if host.breaker.due_for_trial(now):
                host.breaker.to_half_open()  # -> listener -> _refresh_available

    # -- request side: attempts and retries, for HTTP and TCP alike ---------------------
    def begin_attempt(self, tried: list[Host], key: bytes | None = None) -> Host | None:
        """Start the next attempt of one request (or TCP connection): an instance not in
        `tried` (`pick`), appended to `tried` and counted busy until `end_attempt`; a
        retry (`tried` was not empty) also counts in `retries_in_flight`. None when no
        instance may be picked: counted as a response for want of an instance."""
        snapshot = self.current
        candidates = snapshot.available
        if snapshot.next_trial_at == INFINITY and not snapshot.half_open and candidates:
            # pick(tried, key), written out for the usual snapshot (no trial due, no
            # half-open breaker): this runs once per request
            host = self.balancer.pick(candidates, tried, key)
            if host is None:
                host = self._panic_pick(snapshot.panic_hosts, tried, key)
                if host is not None and host.breaker.state == HALF_OPEN:
                    host.breaker.on_attempt()
        else:
            host = self.pick(tried, key)
        if host is None:
            self.no_host_responses += 1
            return None
        if tried:
            self.retries_in_flight += 1
        tried.append(host)
        host.active += 1
        host.requests += 1
        return host

    def end_attempt(self, host: Host, tried: Sequence[Host], *, holds_host: bool = False) -> None:
        """The attempt on `host` (the last of `tried`) ended: exactly once per attempt
        `begin_attempt` began, whatever its outcome. `holds_host`: a TCP connection was
        established and is relayed; the attempt is over (no longer a retry in flight)
        but the instance stays busy with it until `release(host)`."""
        if host is not tried[0]:  # never the same instance twice: a retry
            self.retries_in_flight -= 1
        if not holds_host:  # release(host), written out: this runs on every request
            host.active -= 1
            if host.draining and host.active <= 0:
                self.draining.pop(id(host), None)

    def should_retry(self, outcome: int, method: bytes, replayable: bool,
                     tried: Collection[Host]) -> bool:
        """Whether the request whose attempt number `len(tried)` ended with `outcome`
        (proxy.outcomes) gets another attempt: the retry rules (`l7.exchange.may_retry`,
        with `retries` and `retry_on`), an instance left untried, and the retry budget.
        A yes is counted as a failover by `outcome`; the caller then calls
        `begin_attempt`. `method` is b"" in TCP mode (only connect failures retry)."""
        if not may_retry(outcome, method=method, replayable=replayable, attempt=len(tried),
                         retries=self._config.retries, retry_on=self.retry_on):
            return False
        if not self.has_untried(tried) or not self.retry_allowed(outcome):
            return False
        label = LABELS[outcome]
        failovers = self.failovers
        failovers[label] = failovers.get(label, 0) + 1
        return True

    def pick(self, tried: Collection[Host], key: bytes | None = None) -> Host | None:
        """A host for the next attempt: in rotation with a closed breaker or a free half-open
        trial, or (when no host in rotation is closed) any host not drained by an operator,
        as a trial: the panic rule, so that an upstream whose instances all failed recently
        is probed rather than switched off. Counts nothing: see `begin_attempt`."""
        snapshot = self.current
        if snapshot.next_trial_at != INFINITY:
            now = self.monotonic()
            if snapshot.next_trial_at <= now:
                self._start_due_trials(now)  # publishes a new snapshot
                snapshot = self.current
        candidates = snapshot.available
        if snapshot.half_open:
            candidates = tuple(h for h in candidates if h.breaker.allows())
        host = self.balancer.pick(candidates, tried, key) if candidates else None
        if host is None:
            host = self._panic_pick(snapshot.panic_hosts, tried, key)
        if host is not None and host.breaker.state == HALF_OPEN:
            host.breaker.on_attempt()
        return host

    def has_untried(self, tried: Collection[Host]) -> bool:
        """Would `pick(tried)` find a host? (without moving any balancer or breaker state)"""
        snapshot = self.current
        if any(h not in tried and h.breaker.allows() for h in snapshot.available):
            return True
        return any(h not in tried for h in snapshot.panic_hosts)

    def _panic_pick(self, panic_hosts: tuple[Host, ...], tried: Collection[Host],
                    key: bytes | None) -> Host | None:
        if not panic_hosts:
            return None
        host = self.balancer.pick(panic_hosts, tried, key)
        if host is not None:
            self.panic_picks += 1
            if host.breaker.state == OPEN:
                host.breaker.to_half_open()
        return host

    def retry_allowed(self, outcome: int) -> bool:
        """The retry budget: retries in flight stay within max(min, percent of requests).

        It bounds the extra work retries put on instances, so a failed connect is always
        allowed: its request reached no instance, and its retry is the first time any
        instance works on it. Refusing it would fail requests exactly when an instance
        dies under load and several connects fail at once.
        """
        if outcome == CONNECT_FAILURE:
            return True
        budget = self._config.retry_budget
        limit = max(budget.min_concurrency, self.in_flight * budget.percent / 100.0)
        if self.retries_in_flight < limit:
            return True
        self.budget_exhausted += 1
        return False

    def release(self, host: Host) -> None:
        """The work on `host` ended (`end_attempt` calls it; TCP once its relay ends)."""
        host.active -= 1
        if host.draining and host.active <= 0:
            self.draining.pop(id(host), None)

    def all_hosts(self) -> list[Host]:
        return [*self.hosts.values(), *self.draining.values()]

    def count_response(self, status: int) -> None:
        """A response with `status` went to a client."""
        responses = self.responses
        responses[status] = responses.get(status, 0) + 1

    # -- what an operator sees and does ---------------------------------------------------
    def on_catalog_down(self, down: Iterable[tuple[Endpoint, str]]) -> None:
        """The catalog's instances that are not passing, each with its check's output.
        Listed only: they never become hosts, so nothing can route to them."""
        self.operator_view.down = tuple(down)

    def listing(self) -> list[Listed]:
        """Every instance to show, hosts first: a removed host still finishing its work
        whose id the catalog now lists as down shows once, as down."""
        rows = [Listed(h, h.endpoint, h.state, h.reason) for h in self.all_hosts()]
        down = self.operator_view.down
        if down:
            leaving = {row.endpoint.id: i for i, row in enumerate(rows)
                       if row.host is not None and row.host.draining}
            for ep, why in down:
                i = leaving.get(ep.id)
                if i is None:
                    rows.append(Listed(None, ep, DOWN, why))
                else:
                    rows[i] = rows[i]._replace(state=DOWN, reason=why)
        return rows

    def knows(self, endpoint_id: str) -> bool:
        return (any(h.id == endpoint_id for h in self.all_hosts())
                or any(ep.id == endpoint_id for ep, _ in self.operator_view.down))

    def set_operator_drain(self, endpoint_id: str, drained: bool) -> bool:
        """Take an instance out of rotation (`drained`) or put it back; in-flight work
        finishes either way. False when no instance has that id."""
        if not self.knows(endpoint_id):
            return False
        drained_ids = self.operator_view.drained_ids
        if drained:
            drained_ids.add(endpoint_id)
        else:
            drained_ids.discard(endpoint_id)
        for host in self.all_hosts():
            if host.id == endpoint_id:
                host.operator_drained = drained
                if drained:
                    host.pool.close_all()  # idle connections would only age
        self._refresh_available()
        log.info("event=operator_%s upstream=%s instance=%s", "drain" if drained else "enable",
                 self.name, endpoint_id)
        return True

    def apply_operator_drains(self, drained_ids: Collection[str]) -> None:
        """Make exactly `drained_ids` the drained ones (drains an operator made through
        another worker's admin); ids not in the catalog yet are kept for when they come."""
        wanted = set(drained_ids)
        view = self.operator_view
        if wanted == view.drained_ids:
            return
        for eid in sorted(wanted ^ view.drained_ids):
            log.info("event=operator_%s upstream=%s instance=%s via=shared",
                     "drain" if eid in wanted else "enable", self.name, eid)
        view.drained_ids = wanted
        for host in self.all_hosts():
            drained = host.id in wanted
            if drained and not host.operator_drained:
                host.pool.close_all()
            host.operator_drained = drained
        self._refresh_available()

    # -- active health checks (sdproxy's own probes; proxy.upstream.health) --------------
    def on_probe_result(self, host: Host, result: ProbeResult) -> None:
        cfg = self.config.health
        if cfg is None:
            return  # checks were turned off while this probe ran
        health = host.health
        if health is None:
            health = host.health = HealthState()
        health.counts[result.kind] = health.counts.get(result.kind, 0) + 1
        change = health.record(result, fall=cfg.fall, rise=cfg.rise, now=self.clock())
        if change is None:
            return
        if change == EJECTED:
            host.pool.close_all()
            log.warning('event=health_ejected upstream=%s instance=%s reason="%s" fall=%d',
                        self.name, host.id, health.reason, cfg.fall)
        else:
            log.info('event=health_restored upstream=%s instance=%s last="%s" rise=%d',
                     self.name, host.id, health.last, cfg.rise)
        self._refresh_available()

    def clear_health(self) -> None:
        """Health checks were turned off: nothing stays ejected on their word."""
        for host in self.all_hosts():
            host.health = None
        self._refresh_available()
