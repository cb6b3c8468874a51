"""proxy.upstream.balancers.round_robin: nginx's smooth weighted round robin.

Sequences are checked pick by pick against what nginx documents (ngx_http_upstream_round_robin,
commit 52327e0627f4: "weights {a:5, b:1, c:1} ... a, a, b, a, c, a, a"). The balancer's
only state is `Host.sw_current`, so it must carry over when the runtime swaps snapshots.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import UpstreamConfig
from proxy.model import Address, CatalogAnswer, Endpoint
from proxy.upstream.balancers import make_balancer
from proxy.upstream.balancers.round_robin import SmoothWeightedRoundRobin
from proxy.upstream.host import Host
from proxy.upstream.manager import UpstreamRuntime


def endpoint(hid: str, weight: int = 1, port: int = 0) -> Endpoint:
    return Endpoint(id=hid, address="10.0.0.1", port=port or 8000 + ord(hid[0]), weight=weight)


def hosts(**weights: int) -> list[Host]:
    return [Host(endpoint(hid, w)) for hid, w in weights.items()]


def picks(balancer: SmoothWeightedRoundRobin, pool: Sequence[Host], n: int,
          tried: Sequence[Host] = ()) -> str:
    out = []
    for _ in range(n):
        host = balancer.pick(pool, tried)
        out.append("-" if host is None else host.id)
    return " ".join(out)


@pytest.mark.parametrize("weights,sequence", [
    ({"a": 1}, "a a a"),
    ({"a": 1, "b": 1}, "a b a b"),
    ({"a": 1, "b": 1, "c": 1}, "a b c a b c"),
    ({"a": 3, "b": 3, "c": 3}, "a b c a b c"),
    ({"a": 5, "b": 1, "c": 1}, "a a b a c a a"),  # nginx's documented example
    ({"a": 5, "b": 1, "c": 1, "_": 0}, "a a b a c a a"),  # weight 0: never while others live
    ({"a": 2, "b": 1}, "a b a"),
    ({"a": 1, "b": 2}, "b a b"),
    ({"a": 4, "b": 2, "c": 1}, "a b a c a b a"),
])
def test_sequence(weights: dict[str, int], sequence: str) -> None:
    balancer = SmoothWeightedRoundRobin()
    pool = hosts(**weights)
    cycle = sequence.split()
    # two full cycles: the running values return to where they started after each
    assert picks(balancer, pool, 2 * len(cycle)) == " ".join(cycle * 2)
    assert [h.sw_current for h in pool] == [0] * len(pool)


def test_equal_weights_spread_evenly() -> None:
    balancer = SmoothWeightedRoundRobin()
    pool = hosts(a=1, b=1, c=1, d=1)
    counts = Counter(picks(balancer, pool, 400).split())
    assert counts == {"a": 100, "b": 100, "c": 100, "d": 100}


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=8))
def test_one_cycle_gives_each_host_its_weight(weights: list[int]) -> None:
    """Over sum(weights) picks each host is picked exactly weight times, and the running
    values are back at zero, so the next cycle repeats the same order."""
    balancer = SmoothWeightedRoundRobin()
    pool = [Host(endpoint(f"h{i}", w, port=9000 + i)) for i, w in enumerate(weights)]
    total = sum(weights)
    seq = [balancer.pick(pool, ()) for _ in range(total)]
    counts = Counter(h.id for h in seq if h is not None)
    assert counts == {h.id: h.weight for h in pool}
    assert all(h.sw_current == 0 for h in pool)
    assert [balancer.pick(pool, ()) for _ in range(total)] == seq


@pytest.mark.parametrize("tried_ids,sequence", [
    ("a", "b c b c"),
    ("b", "a a a c a a"),
    ("ab", "c c c"),
    ("abc", "- - -"),
])
def test_tried_hosts_are_skipped(tried_ids: str, sequence: str) -> None:
    balancer = SmoothWeightedRoundRobin()
    pool = hosts(a=5, b=1, c=1)
    tried = [h for h in pool if h.id in tried_ids]
    assert picks(balancer, pool, len(sequence.split()), tried) == sequence
    assert all(h.sw_current == 0 for h in tried), "skipped hosts' state untouched"


def test_tried_accepts_any_collection() -> None:
    balancer = SmoothWeightedRoundRobin()
    pool = hosts(a=1, b=1)
    for tried in ([pool[0]], (pool[0],), {pool[0]}, frozenset([pool[0]])):
        assert balancer.pick(pool, tried) is pool[1]


def test_empty_pool_gives_none() -> None:
    assert SmoothWeightedRoundRobin().pick([], ()) is None
    assert SmoothWeightedRoundRobin().pick((), []) is None


def test_registered_as_round_robin() -> None:
    assert isinstance(make_balancer("round_robin"), SmoothWeightedRoundRobin)


# -- state across snapshot swaps (Fabio's anti-example resets here) -------------------------


def runtime_with(*eps: Endpoint) -> UpstreamRuntime:
    rt = UpstreamRuntime(UpstreamConfig(name="web", listen=Address("127.0.0.1", 8081)),
                         clock=lambda: 1000.0, monotonic=lambda: 50.0)
    rt.on_catalog_answer(CatalogAnswer(eps, index=1))
    return rt


def rt_picks(rt: UpstreamRuntime, n: int) -> str:
    out = []
    for _ in range(n):
        host = rt.pick(())
        out.append("-" if host is None else host.id)
    return " ".join(out)


A, B, C, D = endpoint("a", 5), endpoint("b", 1), endpoint("c", 1), endpoint("d", 1)


def test_unchanged_answer_keeps_the_sequence_going() -> None:
    rt = runtime_with(A, B, C)
    assert rt_picks(rt, 2) == "a a"
    before = {h.id: (h, h.sw_current) for h in rt.current.hosts}
    rt.on_catalog_answer(CatalogAnswer((A, B, C), index=2))
    assert {h.id: (h, h.sw_current) for h in rt.current.hosts} == before
    assert rt_picks(rt, 5) == "b a c a a"  # a reset would start again with "a a"


def test_changed_answer_keeps_running_weights_of_kept_hosts() -> None:
    rt = runtime_with(A, B, C)
    assert rt_picks(rt, 2) == "a a"  # sw_current: a=-4 b=2 c=2
    kept = {h.id: h for h in rt.current.hosts}
    rt.on_catalog_answer(CatalogAnswer((A, B, C, D), index=2))
    assert [h.id for h in rt.current.hosts] == ["a", "b", "c", "d"]
    assert all(rt.hosts[hid] is host for hid, host in kept.items())
    assert [h.sw_current for h in rt.current.hosts] == [-4, 2, 2, 0]
    # a b c d = 5 1 1 1 from (-4, 2, 2, 0): b wins the tie with c; after a reset a would win
    assert rt_picks(rt, 3) == "b a c"


def test_weight_change_takes_effect_without_reset() -> None:
    rt = runtime_with(A, B)  # 5, 1
    assert rt_picks(rt, 3) == "a a a"  # a=-3, b=3
    host_a = rt.hosts["a"]
    rt.on_catalog_answer(CatalogAnswer((endpoint("a", 1), B), index=2))
    assert rt.hosts["a"] is host_a and host_a.weight == 1
    assert (host_a.sw_current, rt.hosts["b"].sw_current) == (-3, 3)
    assert rt_picks(rt, 4) == "b b b a"


def test_removed_host_is_never_picked_again() -> None:
    rt = runtime_with(A, B, C)
    rt.on_catalog_answer(CatalogAnswer((B, C), index=2))
    assert set(rt_picks(rt, 10).split()) == {"b", "c"}
