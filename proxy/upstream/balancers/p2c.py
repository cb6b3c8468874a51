"""Power of two choices over a latency-and-load cost (`balance = "p2c"`).

Each pick draws two distinct candidates and sends the request to the cheaper one. Two
random choices already remove almost all of the queueing imbalance of one random choice
(Mitzenmacher), while never herding every client onto the same "best" host the way a
global least-cost scan does when many proxies share stale views.

Drawing. The first candidate is drawn with probability weight / total, the second
uniformly among the others. Then a pair {a, b} is drawn with probability proportional to
w_a + w_b, and a tie is resolved for a with probability w_a / (w_a + w_b), so hosts of
equal cost receive exactly weight / total of the picks (sum over b of
(w_a + w_b) * w_a / (w_a + w_b) is proportional to w_a), while the two candidates are
always distinct (a weighted draw of both, with or without replacement, loses one or the
other of these properties).

Cost, the expected time a new request would take there:

    cost = L * (1 + active * mean_weight / weight)

- `active * mean_weight / weight` is the queue per unit of capacity: a host of average
  weight is read as serving one request at a time, one of twice that weight two, so the
  new request waits behind that many, then takes L. With equal weights this is exactly
  Finagle/Linkerd's peak-EWMA load `rtt * (pending + 1)`; dividing by the mean keeps it
  free of the weights' scale (Consul weights are relative: 10 and 30 mean 1 and 3), and
  like Envoy's least-request (`weight / (active + 1)`) it makes a heavier host absorb
  proportionally more in flight. Under load it equalises in-flight requests per unit of
  weight; idle, it compares latency alone, and at equal cost the tie rule above splits
  by weight. In between, a light host that is idle beats a busy heavy one, so with equal
  latencies the lightest host gets up to ~1.6x its share at about one request in flight
  per host, ~1.1x at ten (the simulation in the tests measures this).
- `L` is the host's latency EWMA (`Host.ewma`, time to the response head), except:
  - unmeasured (ewma 0) and idle: L = 0, it wins its comparison, so a new instance is
    tried at once (Finagle gives an unmeasured idle node cost 0 too);
  - unmeasured and busy: L = the typical latency (mean EWMA of the measured, healthy
    candidates), so it is treated as an average host and is not flooded while its first
    answers are still out (Finagle's answer is a huge penalty; ours keeps tcp mode, where
    nothing is ever measured, a plain weighted least-load P2C);
  - after consecutive failures: L = max(ewma, typical) * (1 + FAILURE_PENALTY * n).
    An instance that fails fast (an instant 503, a refused connect) has a tiny EWMA and
    would otherwise look like the best host and attract traffic until its breaker
    opens; its EWMA is lifted to at least the typical latency, and each failure in a
    row adds that again (a success resets the count, `Host.on_success`). Except when
    its breaker is half-open and it is idle: then it costs 0 like a new instance, as
    the breaker wants the one trial that closes or re-opens it (with the penalty it
    would lose every comparison and stay half-open for good).
  With nothing measured the typical latency is DEFAULT_LATENCY; it is only computed (one
  pass over the candidates) when a drawn candidate needs it and the other does not
  share the same unknown.
- An EWMA not refreshed for EWMA_FORGET_AFTER (10 s, the decay time of Finagle's and Linkerd's
  peak EWMA) is forgotten: the host is read as unmeasured, so it is tried again. Without
  this, one slow answer (a GC pause) would price a host out of every comparison, and a
  host that is never picked is never measured again: it would stay out for good. With
  it, such a host gets one request per EWMA_FORGET_AFTER, and that answer starts its EWMA
  afresh (`Host.record_latency`): fast, it is back; slow, it is out for another round.
  Forgetting rather than fading (Finagle's exp(-age / 10 s)) keeps the weights: under
  light load a lighter host is measured less often, and a fading price would make it
  look cheaper than it is (twice its share at one request per 200 ms, in the tests'
  simulation); no host in use goes 10 s without a measurement.

State: none of its own; `ewma`, `active` and `consecutive_failures` live on `Host` and
survive snapshot swaps. A first attempt costs two or three `random()` calls, a bisect
and a few float operations; a retry filters the candidates (one small list).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Sequence
from typing import Final

from proxy.upstream.balancers.random_pick import WeightedSampler
from proxy.upstream.breaker import HALF_OPEN
from proxy.upstream.host import Host

FAILURE_PENALTY: Final = 1.0  # each consecutive failure adds one typical latency
DEFAULT_LATENCY: Final = 0.05  # seconds; the typical latency while nothing is measured


def latency_now(host: Host, now: float | None) -> float:
    """The host's EWMA as of `now` (`Host.latency_at`), or as last measured (None)."""
    return host.ewma if now is None else host.latency_at(now)


def typical_latency(hosts: Sequence[Host], now: float | None = None) -> float:
    """Mean latency EWMA of the measured hosts that did not just fail."""
    total = 0.0
    count = 0
    for host in hosts:
        ewma = latency_now(host, now)
        if ewma > 0.0 and not host.consecutive_failures:
            total += ewma
            count += 1
    return total / count if count else DEFAULT_LATENCY


def cost(host: Host, typical: float, mean_weight: float = 1.0,
         now: float | None = None) -> float:
    """The module docstring's formula; `typical` as `typical_latency` gives it,
    `mean_weight` the mean weight of the candidates, `now` the time the EWMA is read at
    (None: as last measured)."""
    ewma = latency_now(host, now)
    active = host.active
    failures = host.consecutive_failures
    if failures:
        if not active and host.breaker.state == HALF_OPEN:
            return 0.0  # its breaker wants a trial: probe it, or it stays half-open
        latency = max(ewma, typical) * (1.0 + FAILURE_PENALTY * failures)
    elif ewma > 0.0:
        latency = ewma
    elif active:
        latency = typical
    else:
        return 0.0
    return latency * (1.0 + active * mean_weight / (host.endpoint.weight or 1))


def _uses_typical(host: Host, ewma: float) -> bool:
    return bool(host.consecutive_failures) or (ewma == 0.0 and host.active > 0)


class PowerOfTwoChoices:
    __slots__ = ("_sampler", "clock", "rng")

    def __init__(self, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rng = rng or random.Random()
        self.clock = clock  # the clock Host.record_latency's `now` is read on
        self._sampler = WeightedSampler(self.rng)

    def pick(self, hosts: Sequence[Host], tried: Collection[Host],
             key: bytes | None = None) -> Host | None:
        candidates = hosts
        if tried:
            candidates = [h for h in hosts if h not in tried]
        n = len(candidates)
        if n <= 1:
            return candidates[0] if n else None
        rng = self.rng
        sampler = self._sampler
        first = sampler.index(candidates)
        second = int(rng.random() * (n - 1))
        if second >= first:
            second += 1
        a = candidates[first]
        b = candidates[second]
        now = self.clock()
        ewma_a = a.latency_at(now)
        ewma_b = b.latency_at(now)
        if _uses_typical(a, ewma_a) or _uses_typical(b, ewma_b):
            if (not a.consecutive_failures and not b.consecutive_failures
                    and ewma_a == 0.0 and ewma_b == 0.0):
                typical = 1.0  # both unmeasured: the common L cancels out
            else:
                typical = typical_latency(hosts, now)
        else:
            typical = DEFAULT_LATENCY  # unused by either cost
        mean_weight = sampler.last_total / n or 1.0
        cost_a = cost(a, typical, mean_weight, now)
        cost_b = cost(b, typical, mean_weight, now)
        if cost_a < cost_b:
            return a
        if cost_b < cost_a:
            return b
        weight_a = a.endpoint.weight or 1
        weight_b = b.endpoint.weight or 1
        return a if rng.random() * (weight_a + weight_b) < weight_a else b
