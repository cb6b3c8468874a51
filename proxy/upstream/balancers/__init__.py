"""Balancers, one algorithm per module, registered under the name the config uses.

A balancer picks one host among the routable hosts of the current snapshot, skipping
those this request already tried. Its per-host state lives on `Host` (or, for `hash`,
in a cache keyed by host id and weight), so it survives snapshot swaps (the
anti-example is a counter kept in the table that resets on swap). The object lives as
long as its upstream. Randomness comes from an injected `random.Random`, so tests seed
it. `pick` runs on every attempt: no logging, no allocation beyond what a retry needs.

| name          | module          | picks                                                 |
|---------------|-----------------|-------------------------------------------------------|
| `round_robin` | round_robin.py  | nginx's smooth weighted round robin                   |
| `least_conn`  | least_conn.py   | fewest in flight; heavier host, then random, on ties  |
| `random`      | random_pick.py  | weighted random                                       |
| `p2c`         | p2c.py          | best of two by latency EWMA x load, failures penalised |
| `hash`        | hash.py         | consistent hash ring on the request key               |
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Sequence
from typing import Final, Protocol

from proxy.upstream.host import Host

Clock = Callable[[], float]


class Balancer(Protocol):
    def pick(self, hosts: Sequence[Host], tried: Collection[Host],
             key: bytes | None = None) -> Host | None:
        """One of `hosts` not in `tried`, or None. `key` is the request's hash key
        (only `hash` uses it; see `hash_key`)."""


def _round_robin(rng: random.Random, clock: Clock) -> Balancer:
    from proxy.upstream.balancers.round_robin import SmoothWeightedRoundRobin

    return SmoothWeightedRoundRobin()  # deterministic: no randomness to inject


def _least_conn(rng: random.Random, clock: Clock) -> Balancer:
    from proxy.upstream.balancers.least_conn import LeastConnections

    return LeastConnections(rng)


def _random(rng: random.Random, clock: Clock) -> Balancer:
    from proxy.upstream.balancers.random_pick import WeightedRandom

    return WeightedRandom(rng)


def _p2c(rng: random.Random, clock: Clock) -> Balancer:
    from proxy.upstream.balancers.p2c import PowerOfTwoChoices

    return PowerOfTwoChoices(rng, clock)  # the runtime's monotonic clock, not its own


def _hash(rng: random.Random, clock: Clock) -> Balancer:
    from proxy.upstream.balancers.hash import ConsistentHash

    return ConsistentHash(rng)


BALANCERS: Final[dict[str, Callable[[random.Random, Clock], Balancer]]] = {
    "round_robin": _round_robin,
    "least_conn": _least_conn,
    "random": _random,
    "p2c": _p2c,
    "hash": _hash,
}


def make_balancer(name: str, rng: random.Random | None = None,
                  clock: Clock = time.monotonic) -> Balancer:
    """The balancer registered as `name` (config.py validates names against the same
    list); `rng` defaults to a fresh, OS-seeded `random.Random` per balancer; `clock` is
    the upstream runtime's monotonic clock (one clock for every routing decision)."""
    try:
        factory = BALANCERS[name]
    except KeyError:
        raise ValueError(f"unknown balancer {name!r}; one of {', '.join(BALANCERS)}") from None
    return factory(rng if rng is not None else random.Random(), clock)
