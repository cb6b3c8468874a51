"""Runtime state of one instance, keyed by its endpoint id; survives catalog refreshes.

`Endpoint` (model.py) is what the catalog says; `Host` is what sdproxy learned by using
the instance: requests in flight, counters, its balancer weight state and its idle
keep-alive connections, its health as sdproxy's own probes see it, and an operator's
drain. A refresh that keeps the id keeps the Host (Envoy's HostDescription vs Host).
Counters are plain ints, read by the metrics collector at scrape time, so the request
path never touches a metrics library. `state` and `reason` are what /upstreams shows.
"""

from __future__ import annotations

from typing import Final, Protocol

from proxy.model import Endpoint
from proxy.upstream.breaker import CLOSED, HALF_OPEN, OPEN, STATE_NAMES, HostBreaker
from proxy.upstream.health_state import HealthState

NO_RESPONSE: Final = "no response (connect failure, reset or timeout)"

# Weight of the newest sample in the latency EWMA: about the last 10 attempts count.
EWMA_ALPHA: Final = 0.2
# An EWMA not refreshed for this long no longer counts (p2c.py says why): the next
# measurement starts it afresh.
EWMA_FORGET_AFTER: Final = 10.0

# Instance states as /upstreams shows them, besides the breaker's (STATE_NAMES).
HEALTHY: Final = "healthy"
DRAINING: Final = "draining"  # left the catalog, or drained by an operator: no new work
EJECTED: Final = "ejected"  # sdproxy's own health checks failed `fall` times
DOWN: Final = "down"  # listed by the catalog as not passing (never a Host: manager.listing)

# The `reason` of a draining host.
LEFT_CATALOG: Final = "removed from the catalog"
OPERATOR: Final = "operator"


class IdleConnection(Protocol):
    idle_since: float  # loop time when it was parked

    def is_usable(self) -> bool: ...

    def close(self) -> None: ...


class IdlePool:
    """Idle keep-alive connections to one host, most recently used first."""

    __slots__ = ("_idle", "limit")

    def __init__(self, limit: int = 256) -> None:
        self._idle: list[IdleConnection] = []
        self.limit = limit

    def take(self) -> IdleConnection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.is_usable():
                return conn
        return None

    def put(self, conn: IdleConnection) -> bool:
        if len(self._idle) >= self.limit:
            return False
        self._idle.append(conn)
        return True

    def discard(self, conn: IdleConnection) -> None:
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def expire(self, before: float) -> None:
        """Close the connections parked before `before` (idle longer than allowed)."""
        idle = self._idle
        if idle and idle[0].idle_since < before:  # oldest first: most are fresh
            self._idle = [c for c in idle if c.idle_since >= before]
            for conn in idle:
                if conn.idle_since < before:
                    conn.close()

    def close_all(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __len__(self) -> int:
        return len(self._idle)


class Host:
    __slots__ = (
        "active",
        "breaker",
        "consecutive_failures",
        "draining",
        "endpoint",
        "ewma",
        "ewma_at",
        "failures",
        "health",
        "id",
        "last_failure",
        "open_reason",
        "operator_drained",
        "pool",
        "requests",
        "status_counts",
        "sw_current",
    )

    def __init__(self, endpoint: Endpoint, breaker: HostBreaker | None = None) -> None:
        self.endpoint = endpoint
        self.id = endpoint.id
        self.active = 0  # requests (http) or connections (tcp) in flight
        self.requests = 0  # attempts sent to this host
        self.failures = 0  # attempts that failed (connect, reset, timeout, listed 5xx)
        self.consecutive_failures = 0
        self.status_counts: dict[int, int] = {}
        self.draining = False  # left the catalog; in-flight work finishing
        self.operator_drained = False  # taken out of rotation by an operator (admin API)
        self.health: HealthState | None = None  # set once sdproxy's own probes ran
        self.last_failure = ""  # what the latest failed attempt was (for `reason`)
        self.open_reason = ""  # why the breaker last opened, with when (for `reason`)
        self.sw_current = 0  # smooth weighted round robin's running weight
        self.ewma = 0.0  # latency of recent attempts, seconds (p2c); 0 until measured
        self.ewma_at = 0.0  # monotonic time of the last measurement
        self.pool = IdlePool()
        self.breaker = breaker or HostBreaker(endpoint.id, failures=5, reset_timeout=10.0)

    @property
    def weight(self) -> int:
        return self.endpoint.weight

    @property
    def ejected(self) -> bool:
        health = self.health
        return health is not None and health.ejected

    @property
    def in_rotation(self) -> bool:
        """May get new work when its breaker allows: in the catalog, not drained by an
        operator, not ejected by the health checks."""
        return not (self.draining or self.operator_drained or self.ejected)

    @property
    def state(self) -> str:
        """The one state /upstreams shows; the first that applies: draining (catalog, then
        operator), ejected, the breaker's (open, half_open), healthy."""
        if self.draining or self.operator_drained:
            return DRAINING
        if self.ejected:
            return EJECTED
        return STATE_NAMES[self.breaker.state]

    @property
    def reason(self) -> str:
        """Why `state` is what it is; "" when healthy."""
        if self.draining:
            return LEFT_CATALOG
        if self.operator_drained:
            return OPERATOR
        if self.health is not None and self.health.ejected:
            return self.health.reason
        state = self.breaker.state
        if state == OPEN:
            return self.open_reason
        if state == HALF_OPEN:
            return f"trial requests one at a time; {self.open_reason}"
        return ""

    def on_success(self, status: int) -> None:
        # A closed breaker with no failure since the last success has nothing to reset
        # (every failure passes through on_failure): the common case skips the breaker.
        breaker = self.breaker
        if self.consecutive_failures or breaker.state != CLOSED:
            self.consecutive_failures = 0
            breaker.record_success()
        if status:  # 0: a success without an HTTP status (a TCP connection established)
            counts = self.status_counts
            counts[status] = counts.get(status, 0) + 1

    def answered(self, status: int, seconds: float, now: float) -> None:
        """A response head `status` after `seconds`, at monotonic `now`, not counted as a
        failure: record_latency and on_success in one call (once per request)."""
        ewma = 0.0 if now - self.ewma_at > EWMA_FORGET_AFTER else self.ewma
        self.ewma = seconds if ewma == 0.0 else ewma + EWMA_ALPHA * (seconds - ewma)
        self.ewma_at = now
        if self.consecutive_failures or self.breaker.state != CLOSED:
            self.consecutive_failures = 0
            self.breaker.record_success()
        counts = self.status_counts
        counts[status] = counts.get(status, 0) + 1

    def latency_at(self, now: float) -> float:
        """The latency EWMA as of monotonic `now`: 0 (unmeasured) once forgotten."""
        return 0.0 if now - self.ewma_at > EWMA_FORGET_AFTER else self.ewma

    def record_latency(self, seconds: float, now: float) -> None:
        """An attempt's time to its response head (http), measured at monotonic `now`."""
        # latency_at(now), written out: this runs once per request
        ewma = 0.0 if now - self.ewma_at > EWMA_FORGET_AFTER else self.ewma
        self.ewma = seconds if ewma == 0.0 else ewma + EWMA_ALPHA * (seconds - ewma)
        self.ewma_at = now

    def on_failure(self, status: int = 0, what: str = "") -> None:
        """`status` 0 means no response (connect failure, reset, timeout); `what` names
        the failure when the caller knows it (an outcome such as "connect-failure")."""
        self.failures += 1
        self.consecutive_failures += 1
        # Set before the breaker hears of it: opening reads it for `reason`.
        self.last_failure = f"HTTP {status}" if status else (what or NO_RESPONSE)
        self.breaker.record_failure()
        if status:
            counts = self.status_counts
            counts[status] = counts.get(status, 0) + 1

    def __repr__(self) -> str:
        return f"Host({self.id} {self.endpoint.hostport} {self.state})"
