"""Least connections (`balance = "least_conn"`): the candidate with the fewest in flight.

Order of preference among the candidates not tried:
1. fewest `Host.active` (requests in http mode, connections in tcp mode);
2. on equal `active`, the lowest weight-normalised load `(active + 1) / weight`, i.e. the
   heavier host (HAProxy's leastconn key; the `+ 1` counts the request being placed, so
   the rule also separates idle hosts, where `active / weight` would be 0 for all);
3. on a full tie, a uniformly random one (reservoir sampling with the injected
   `random.Random`), so that equal idle hosts do not all queue on the first in the list.

Stateless between picks: the only input is `active`, which lives on `Host` and so
survives snapshot swaps. One pass, no allocation; the rng is used only on ties.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from proxy.upstream.host import Host


class LeastConnections:
    __slots__ = ("rng",)

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def pick(self, hosts: Sequence[Host], tried: Collection[Host],
             key: bytes | None = None) -> Host | None:
        best: Host | None = None
        best_active = 0
        best_weight = 0
        ties = 0
        for host in hosts:
            if tried and host in tried:
                continue
            active = host.active
            if best is not None:
                if active > best_active:
                    continue
                if active == best_active:
                    # Same active: (active + 1) / weight orders like -weight.
                    weight = host.endpoint.weight
                    if weight < best_weight:
                        continue
                    if weight == best_weight:
                        ties += 1
                        if self.rng.random() * ties < 1.0:  # keep each with 1/ties
                            best = host
                        continue
                    best, best_weight, ties = host, weight, 1
                    continue
            best, best_active, best_weight, ties = host, active, host.endpoint.weight, 1
        return best
