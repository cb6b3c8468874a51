"""Active health checks, the decisions: what a probe's answer means, when an instance is
ejected and when it returns, and when each instance is probed next.

Rules (SPEC "Active health checks", HAProxy's `check` with `fall`/`rise`):
- A new instance starts in the pool, not ejected: the catalog vouches for it.
- A probe passes when (http) the status matches `expect`, or (tcp) the connect succeeded.
  Any other status, a timeout, a refused or reset connection or a garbled answer fails.
- Counting: a good probe resets the failed count, a failed one the good count. `fall` consecutive failures eject an instance in the pool; `rise` consecutive
  good probes bring an ejected one back. Ejected, `reason` is the latest failed probe
  (`health: 500 on /health`); back in the pool it is "".
- Probes and requests are independent: nothing here touches the breaker, and only probes
  lift an ejection (a request's success does not).
- Scheduling: an instance's first probe comes at a random moment within its first
  interval (instances found together are not probed together); each next one `interval`
  +-10 % after the previous one ended, so one instance never has two probes at once and
  proxies started together drift apart instead of probing in lockstep.

Pure: no I/O, no clock, no global randomness; callers pass `now` and a `random.Random`.
Who probes is `proxy.upstream.health` (the I/O shell); what the pool does with an
ejection is `proxy.upstream.manager`'s.
"""

from __future__ import annotations

import heapq
import itertools
import random
import re
from collections.abc import Hashable, Iterable
from typing import Final, Generic, NamedTuple, TypeVar

from proxy.metrics import Metric

# Probe result kinds, also the `result` label of HEALTH_CHECKS.
PASS: Final = "pass"
FAIL: Final = "fail"  # answered, but not as `expect` says
TIMEOUT: Final = "timeout"
ERROR: Final = "error"  # refused, reset, closed early, not HTTP
RESULT_KINDS: Final = (PASS, FAIL, TIMEOUT, ERROR)

# What `HealthState.record` reports when the state changed.
EJECTED: Final = "ejected"
RESTORED: Final = "restored"

JITTER: Final = 0.10  # each interval is drawn from interval * [1 - JITTER, 1 + JITTER]

# Declared next to its component; collected by proxy.admin.collector.
HEALTH_CHECKS = Metric(
    "sdproxy_health_checks_total", "counter", ("upstream", "endpoint", "result"),
    "Active health-check probes by result: pass, fail (unexpected status), timeout, "
    "error (refused, reset, not HTTP).")


class ProbeResult(NamedTuple):
    kind: str  # one of RESULT_KINDS
    detail: str  # "200 on /health", "timeout 1s", "connection refused", "connected"

    @property
    def passed(self) -> bool:
        return self.kind == PASS

    @property
    def reason(self) -> str:
        return f"health: {self.detail}"


class StatusExpectation:
    """`expect` compiled: classes ("2xx") and single codes ("404")."""

    __slots__ = ("classes", "codes")

    def __init__(self, expect: Iterable[str]) -> None:
        entries = list(expect)
        self.classes = frozenset(int(e[0]) for e in entries if e.endswith("xx"))
        self.codes = frozenset(int(e) for e in entries if not e.endswith("xx"))

    def __call__(self, status: int) -> bool:
        return status in self.codes or status // 100 in self.classes


def http_result(status: int, path: str, expectation: StatusExpectation) -> ProbeResult:
    return ProbeResult(PASS if expectation(status) else FAIL, f"{status} on {path}")


def timeout_result(timeout: float) -> ProbeResult:
    return ProbeResult(TIMEOUT, f"timeout {timeout:g}s")


def error_result(detail: str) -> ProbeResult:
    return ProbeResult(ERROR, detail)


CONNECTED = ProbeResult(PASS, "connected")  # a tcp-mode probe that connected

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?:[ \t][^\r\n]*)?\r?\n?")


def parse_status_line(line: bytes) -> int | None:
    """The status code of an HTTP/1.x status line (RFC 9112 section 4), else None."""
    match = _STATUS_LINE.fullmatch(line)
    return int(match.group(1)) if match else None

class HealthState:
    """One instance's health as sdproxy's probes see it (lives on its `Host`)."""

    __slots__ = ("bad", "checked_at", "counts", "ejected", "good", "last", "reason")

    def __init__(self) -> None:
        self.ejected = False
        self.good = 0  # consecutive good probes
        self.bad = 0  # consecutive failed probes
        self.reason = ""  # why it is ejected; "" in the pool
        self.last = ""  # the latest probe's detail, whatever its result
        self.checked_at: float | None = None  # wall time of the latest probe
        self.counts: dict[str, int] = {}  # probes by result kind (HEALTH_CHECKS)

    def record(self, result: ProbeResult, *, fall: int, rise: int,
               now: float) -> str | None:
        """Count one probe; return EJECTED or RESTORED when the state changed."""
        self.last = result.detail
        self.checked_at = now
        if result.passed:
            self.good += 1
            self.bad = 0
            if self.ejected and self.good >= rise:
                self.ejected = False
                self.reason = ""
                return RESTORED
        else:
            self.bad += 1
            self.good = 0
            if self.ejected:
                self.reason = result.reason  # the latest failure says most
            elif self.bad >= fall:
                self.ejected = True
                self.reason = result.reason
                return EJECTED
        return None


K = TypeVar("K", bound=Hashable)


class ProbeSchedule(Generic[K]):
    """When each member (an instance) is probed next; at most one probe each at a time.

    A heap of (due, sequence, member) with lazy deletion: `due` holds the valid time of
    each waiting member, and a heap entry that disagrees with it is skipped. Taking the
    due members and finding the next due time cost O(log n), not a scan of the pool.
    """

    def __init__(self, interval: float, rng: random.Random) -> None:
        self.interval = interval
        self.rng = rng
        self.due: dict[K, float] = {}  # members waiting for their probe -> when it is due
        self.running: set[K] = set()  # members with a probe in flight
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()  # ties never compare members

    def _plan(self, key: K, at: float) -> None:
        self.due[key] = at
        heapq.heappush(self._heap, (at, next(self._seq), key))

    def sync(self, members: Iterable[K], now: float) -> None:
        """Follow the pool: newcomers get a first probe within an interval, leavers none."""
        wanted = set(members)
        for gone in [k for k in self.due if k not in wanted]:
            del self.due[gone]  # its heap entry is skipped when reached
        self.running &= wanted
        for key in wanted:
            if key not in self.due and key not in self.running:
                self._plan(key, now + self.rng.uniform(0.0, self.interval))
        if len(self._heap) > 2 * len(self.due) + 64:  # mostly stale entries: rebuild
            self._heap = [e for e in self._heap if self.due.get(e[2]) == e[0]]
            heapq.heapify(self._heap)

    def take_due(self, now: float) -> list[K]:
        """Members whose probe is due; they count as running until `finished`."""
        ready: list[K] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, _, key = heapq.heappop(heap)
            if self.due.get(key) == at:
                del self.due[key]
                self.running.add(key)
                ready.append(key)
        return ready

    def finished(self, key: K, now: float) -> None:
        """A probe of `key` ended at `now`: the next one is an interval +-JITTER later."""
        if key in self.running:  # else it left the pool meanwhile
            self.running.discard(key)
            self._plan(key, now + self.interval * self.rng.uniform(1.0 - JITTER, 1.0 + JITTER))

    def next_due(self) -> float | None:
        heap = self._heap
        while heap and self.due.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)  # stale: the member left or was planned again
        return heap[0][0] if heap else None

    def __len__(self) -> int:
        return len(self.due) + len(self.running)
