"""Runtime state of one instance, keyed by its endpoint id; survives catalog refreshes.

`Endpoint` (model.py) is what the catalog says; `Host` is what sdproxy learned by using
the instance: requests in flight, counters, its balancer weight state and its idle
keep-alive connections. A refresh that keeps the id keeps the Host (Envoy's
HostDescription vs Host). Counters are plain ints, read by the metrics collector at
scrape time, so the request path never touches a metrics library.
"""

from __future__ import annotations

from typing import Final, Protocol

from proxy.model import Endpoint
from proxy.upstream.breaker import CLOSED, STATE_NAMES, HostBreaker

# Weight of the newest sample in the latency EWMA: about the last 10 attempts count.
EWMA_ALPHA: Final = 0.2
# An EWMA not refreshed for this long no longer counts (p2c.py says why): the next
# measurement starts it afresh.
EWMA_FORGET_AFTER: Final = 10.0

HEALTHY: Final = "healthy"
DRAINING: Final = "draining"


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
        "id",
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
        self.draining = False
        self.sw_current = 0  # smooth weighted round robin's running weight
        self.ewma = 0.0  # latency of recent attempts, seconds (p2c); 0 until measured
        self.ewma_at = 0.0  # monotonic time of the last measurement
        self.pool = IdlePool()
        self.breaker = breaker or HostBreaker(endpoint.id, failures=5, reset_timeout=10.0)

    @property
    def weight(self) -> int:
        return self.endpoint.weight

    @property
    def state(self) -> str:
        return DRAINING if self.draining else STATE_NAMES[self.breaker.state]

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

    def latency_at(self, now: float) -> float:
        """The latency EWMA as of monotonic `now`: 0 (unmeasured) once forgotten."""
        return 0.0 if now - self.ewma_at > EWMA_FORGET_AFTER else self.ewma

    def record_latency(self, seconds: float, now: float) -> None:
        """An attempt's time to its response head (http), measured at monotonic `now`."""
        ewma = self.latency_at(now)
        self.ewma = seconds if ewma == 0.0 else ewma + EWMA_ALPHA * (seconds - ewma)
        self.ewma_at = now

    def on_failure(self, status: int = 0) -> None:
        """`status` 0 means no response (connect failure, reset, timeout)."""
        self.failures += 1
        self.consecutive_failures += 1
        self.breaker.record_failure()
        if status:
            counts = self.status_counts
            counts[status] = counts.get(status, 0) + 1

    def __repr__(self) -> str:
        return f"Host({self.id} {self.endpoint.hostport} {self.state})"
