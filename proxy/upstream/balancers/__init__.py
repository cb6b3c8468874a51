"""Balancers, one algorithm per module, registered under the name the config uses.

A balancer picks one host among the routable hosts of the current snapshot, skipping
those this request already tried. Its per-host state lives on `Host`, so it survives
snapshot swaps (the anti-example is a counter kept in the table that resets on swap).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Protocol

from proxy.upstream.host import Host


class Balancer(Protocol):
    def pick(self, hosts: Sequence[Host], tried: Collection[Host],
             key: bytes | None = None) -> Host | None:
        """One of `hosts` not in `tried`, or None. `key` is the request's hash key
        (only `hash` uses it; see `hash_key`)."""


def _round_robin() -> Balancer:
    from proxy.upstream.balancers.round_robin import SmoothWeightedRoundRobin

    return SmoothWeightedRoundRobin()


BALANCERS: dict[str, Callable[[], Balancer]] = {
    "round_robin": _round_robin,
}


def make_balancer(name: str) -> Balancer:
    # Later balancers (least_conn, random, p2c, hash) register here; until they land an
    # unknown name falls back to round robin rather than refusing to start.
    return BALANCERS.get(name, _round_robin)()
