"""Smooth weighted round robin (nginx's algorithm).

Each pick adds every candidate's weight to its running value, takes the largest, and
subtracts the total from the winner. Over a cycle every host gets picks in proportion
to its weight, spread out rather than in bursts (weights 5,1,1 give a a b a c a a).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from proxy.upstream.host import Host


class SmoothWeightedRoundRobin:
    def pick(self, hosts: Sequence[Host], tried: Collection[Host],
             key: bytes | None = None) -> Host | None:
        best: Host | None = None
        total = 0
        for host in hosts:
            if tried and host in tried:
                continue
            weight = host.endpoint.weight
            host.sw_current += weight
            total += weight
            if best is None or host.sw_current > best.sw_current:
                best = host
        if best is not None:
            best.sw_current -= total
        return best
