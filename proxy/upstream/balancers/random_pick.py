"""Weighted random (`balance = "random"`): each host with probability weight / total.

Owns `WeightedSampler`, the weighted draw that `p2c` (its first candidate) and `hash` (a
request without a key) reuse. Randomness comes from the injected `random.Random`, so
tests seed it. Knows nothing of latency, load or breakers; the runtime passes only
routable candidates.

Invariants: a host in `tried` is never returned; None only when every candidate is
tried (or there is none). Weights are positive (discovery drops weight 0); should every
remaining weight be 0 anyway, the draw is uniform rather than empty.

Cost: the cumulative weights are cached for the candidate tuple last seen. The runtime
publishes a new tuple whenever the hosts or their weights change (a weight change
replaces `Host.endpoint` and republishes), so a first attempt is one `random()` and one
`bisect` with no allocation. A retry (non-empty `tried`) walks the candidates twice.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Collection, Sequence

from proxy.upstream.host import Host


class WeightedSampler:
    """Draws a host, or its index, with probability proportional to its weight."""

    __slots__ = ("_cumulative", "_hosts", "_total", "last_total", "rng")

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.last_total = 0  # total positive weight of the hosts `index` last drew from
        self._hosts: Sequence[Host] = ()
        self._cumulative: list[int] = []
        self._total = 0

    def index(self, hosts: Sequence[Host]) -> int:
        """Index into non-empty `hosts`, nothing excluded."""
        if hosts is not self._hosts:
            if type(hosts) is not tuple:
                # Only a tuple's identity stands for its contents: a list may change
                # under us, so it is walked (and does not evict the cached tuple).
                return self._walk(hosts)
            cumulative: list[int] = []
            total = 0
            for host in hosts:
                weight = host.endpoint.weight
                if weight > 0:
                    total += weight
                cumulative.append(total)
            self._hosts, self._cumulative, self._total = hosts, cumulative, total
        total = self.last_total = self._total
        if total <= 0:
            return int(self.rng.random() * len(hosts))
        return bisect_right(self._cumulative, self.rng.random() * total)

    def _walk(self, hosts: Sequence[Host]) -> int:
        total = 0
        for host in hosts:
            weight = host.endpoint.weight
            if weight > 0:
                total += weight
        self.last_total = total
        if total <= 0:
            return int(self.rng.random() * len(hosts))
        point = self.rng.random() * total
        last = 0
        for i, host in enumerate(hosts):
            weight = host.endpoint.weight
            if weight > 0:
                last = i
                point -= weight
                if point < 0:
                    return i
        return last  # float rounding at the very end of the range

    def pick(self, hosts: Sequence[Host], tried: Collection[Host]) -> Host | None:
        if not tried:
            return hosts[self.index(hosts)] if hosts else None
        total = 0
        left = 0
        for host in hosts:
            if host not in tried:
                left += 1
                weight = host.endpoint.weight
                if weight > 0:
                    total += weight
        if not left:
            return None
        if total <= 0:  # only weight-0 hosts left: uniform
            nth = int(self.rng.random() * left)
            for host in hosts:
                if host not in tried:
                    if not nth:
                        return host
                    nth -= 1
        point = self.rng.random() * total
        last = None
        for host in hosts:
            if host in tried:
                continue
            weight = host.endpoint.weight
            if weight > 0:
                last = host
                point -= weight
                if point < 0:
                    return host
        return last  # float rounding at the very end of the range


class WeightedRandom:
    __slots__ = ("_sampler",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self._sampler = WeightedSampler(rng or random.Random())

    def pick(self, hosts: Sequence[Host], tried: Collection[Host],
             key: bytes | None = None) -> Host | None:
        return self._sampler.pick(hosts, tried)
