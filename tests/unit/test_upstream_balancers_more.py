"""proxy.upstream.balancers: least_conn, random, p2c and hash (round robin has its own file).

Every test is deterministic: balancers get a seeded `random.Random`, and the load
simulations below run on a virtual clock (a heap of completion times), not on sockets.
Distribution checks use bounds wide enough for any seed of the size used (chi-square at
p = 0.001, or relative errors several standard deviations wide), so they test the
algorithm rather than one lucky draw.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import config
from proxy.config import UpstreamConfig
from proxy.l7.hashkey import key_function
from proxy.l7.message import MessageHead
from proxy.model import Address, CatalogAnswer, Endpoint
from proxy.upstream.balancers import BALANCERS, Balancer, make_balancer
from proxy.upstream.balancers.hash import ConsistentHash, key_hash
from proxy.upstream.balancers.least_conn import LeastConnections
from proxy.upstream.balancers.p2c import PowerOfTwoChoices, cost
from proxy.upstream.balancers.random_pick import WeightedRandom
from proxy.upstream.balancers.round_robin import SmoothWeightedRoundRobin
from proxy.upstream.breaker import HALF_OPEN, OPEN
from proxy.upstream.host import EWMA_FORGET_AFTER, Host
from proxy.upstream.manager import UpstreamRuntime

MINE = ("least_conn", "random", "p2c", "hash")

# chi-square critical values at p = 0.001 by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def endpoint(hid: str, weight: int = 1, port: int = 0, address: str = "10.0.0.1") -> Endpoint:
    return Endpoint(id=hid, address=address, port=port or 9000 + sum(map(ord, hid)),
                    weight=weight)


def pool(**weights: int) -> tuple[Host, ...]:
    return tuple(Host(endpoint(hid, w)) for hid, w in weights.items())


def named_pool(n: int, weight: int = 1, prefix: str = "web") -> tuple[Host, ...]:
    return tuple(Host(endpoint(f"{prefix}-{i}", weight, port=9000 + i)) for i in range(n))


def balancer(name: str, seed: int = 1) -> Balancer:
    return make_balancer(name, random.Random(seed))


def chi_square(counts: Counter[str], expected: dict[str, float]) -> float:
    return sum((counts[k] - e) ** 2 / e for k, e in expected.items())


def keys(n: int, seed: int = 3) -> list[bytes]:
    rng = random.Random(seed)
    return [b"user-%d" % rng.getrandbits(48) for _ in range(n)]


# -- registry -----------------------------------------------------------------------------


@pytest.mark.parametrize("name,cls", [
    ("round_robin", SmoothWeightedRoundRobin),
    ("least_conn", LeastConnections),
    ("random", WeightedRandom),
    ("p2c", PowerOfTwoChoices),
    ("hash", ConsistentHash),
])
def test_registered_under_the_config_name(name: str, cls: type) -> None:
    assert isinstance(make_balancer(name), cls)
    assert isinstance(make_balancer(name, random.Random(0)), cls)


def test_registry_matches_the_config_names() -> None:
    assert tuple(BALANCERS) == config.BALANCERS


def test_unknown_name_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown balancer 'fastest'"):
        make_balancer("fastest")


@pytest.mark.parametrize("name", MINE)
def test_same_seed_same_picks(name: str) -> None:
    hosts = named_pool(5)
    runs = []
    for _ in range(2):
        b = balancer(name, seed=42)
        runs.append([b.pick(hosts, (), None).id for _ in range(200)])  # type: ignore[union-attr]
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 1, "spreads at all"


# -- every balancer: tried is excluded, None when nothing is left -------------------------


@pytest.mark.parametrize("name", MINE)
@pytest.mark.parametrize("key", [None, b"k1", b"another key"])
def test_every_subset_of_tried_is_excluded(name: str, key: bytes | None) -> None:
    hosts = pool(a=1, b=2, c=1, d=3)
    b = balancer(name)
    for r in range(len(hosts) + 1):
        for tried in itertools.combinations(hosts, r):
            for as_type in (list, tuple, set):
                got = {b.pick(hosts, as_type(tried), key) for _ in range(30)}
                if r == len(hosts):
                    assert got == {None}
                else:
                    assert None not in got and not got & set(tried)


@pytest.mark.parametrize("name", MINE)
@pytest.mark.parametrize("empty", [(), []])
def test_empty_pool_gives_none(name: str, empty: Sequence[Host]) -> None:
    assert balancer(name).pick(empty, ()) is None
    assert balancer(name).pick(empty, (), b"key") is None


@pytest.mark.parametrize("name", MINE)
def test_single_host(name: str) -> None:
    hosts = pool(only=1)
    b = balancer(name)
    assert [b.pick(hosts, (), b"x") for _ in range(5)] == [hosts[0]] * 5
    assert b.pick(hosts, [hosts[0]], b"x") is None


@settings(max_examples=150, deadline=None, database=None)
@given(name=st.sampled_from(MINE),
       weights=st.lists(st.integers(1, 50), min_size=1, max_size=12),
       tried_mask=st.integers(0, 2**12 - 1),
       actives=st.lists(st.integers(0, 5), min_size=12, max_size=12),
       key=st.one_of(st.none(), st.binary(max_size=20)),
       seed=st.integers(0, 2**32))
def test_never_a_tried_host_and_none_only_when_all_tried(
        name: str, weights: list[int], tried_mask: int, actives: list[int],
        key: bytes | None, seed: int) -> None:
    hosts = tuple(Host(endpoint(f"h{i}", w, port=9000 + i)) for i, w in enumerate(weights))
    for host, active in zip(hosts, actives):
        host.active = active
    tried = [h for i, h in enumerate(hosts) if tried_mask >> i & 1]
    b = balancer(name, seed)
    for _ in range(5):
        got = b.pick(hosts, tried, key)
        if len(tried) == len(hosts):
            assert got is None
        else:
            assert got is not None and got in hosts and got not in tried


# -- least_conn ---------------------------------------------------------------------------


@pytest.mark.parametrize("actives,weights,winners", [
    ((0, 1, 2), (1, 1, 1), "a"),
    ((3, 1, 2), (1, 1, 1), "b"),
    ((5, 5, 4), (1, 1, 1), "c"),
    ((1, 1, 1), (1, 1, 1), "abc"),  # full tie: spread
    ((2, 2, 3), (1, 1, 1), "ab"),
    ((2, 2, 0), (1, 5, 1), "c"),  # fewest active first, whatever the weights
    ((2, 2, 3), (1, 5, 9), "b"),  # equal active: the heavier, (active + 1) / weight
    ((0, 0, 0), (1, 3, 3), "bc"),  # idle: heavier wins, then the tie spreads
    ((4, 4, 4), (2, 2, 1), "ab"),
])
def test_least_conn_picks_the_least_loaded(actives: tuple[int, ...], weights: tuple[int, ...],
                                          winners: str) -> None:
    hosts = tuple(Host(endpoint(hid, w)) for hid, w in zip("abc", weights))
    for host, active in zip(hosts, actives):
        host.active = active
    b = LeastConnections(random.Random(5))
    got = Counter(b.pick(hosts, ()).id for _ in range(600))  # type: ignore[union-attr]
    assert set(got) == set(winners)
    for hid in winners:  # ties are spread evenly, not all on the first
        assert got[hid] == pytest.approx(600 / len(winners), rel=0.2)


def test_least_conn_ties_are_uniform() -> None:
    hosts = named_pool(5)
    b = LeastConnections(random.Random(9))
    counts = Counter(b.pick(hosts, ()).id for _ in range(20_000))  # type: ignore[union-attr]
    assert chi_square(counts, {h.id: 4000 for h in hosts}) < CHI2_999[4]


def test_least_conn_fills_hosts_evenly_as_requests_stay_in_flight() -> None:
    hosts = named_pool(4)
    b = LeastConnections(random.Random(2))
    for round_ in range(1, 6):
        for _ in range(4):
            host = b.pick(hosts, ())
            assert host is not None
            host.active += 1
        assert [h.active for h in hosts] == [round_] * 4


def test_least_conn_skips_a_tried_idle_host() -> None:
    hosts = pool(a=1, b=1, c=1)
    hosts[1].active, hosts[2].active = 3, 7
    assert LeastConnections(random.Random(1)).pick(hosts, [hosts[0]]) is hosts[1]


# -- random -------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [
    {"a": 1, "b": 1},
    {"a": 1, "b": 2, "c": 3, "d": 4},
    {"a": 10, "b": 1},
    {"a": 5, "b": 1, "c": 1, "d": 1, "e": 1, "f": 1},
    {"a": 100, "b": 37, "c": 3},
])
@pytest.mark.parametrize("seed", [1, 2])
def test_random_follows_weights(weights: dict[str, int], seed: int) -> None:
    hosts = pool(**weights)
    b = WeightedRandom(random.Random(seed))
    n = 20_000
    counts = Counter(b.pick(hosts, ()).id for _ in range(n))  # type: ignore[union-attr]
    total = sum(weights.values())
    expected = {hid: n * w / total for hid, w in weights.items()}
    assert chi_square(counts, expected) < CHI2_999[len(weights) - 1]


@pytest.mark.parametrize("tried_ids", ["a", "d", "bd"])
def test_random_with_tried_follows_the_weights_of_the_rest(tried_ids: str) -> None:
    weights = {"a": 1, "b": 2, "c": 3, "d": 4}
    hosts = pool(**weights)
    tried = [h for h in hosts if h.id in tried_ids]
    b = WeightedRandom(random.Random(4))
    n = 20_000
    counts = Counter(b.pick(hosts, tried).id for _ in range(n))  # type: ignore[union-attr]
    rest = {hid: w for hid, w in weights.items() if hid not in tried_ids}
    expected = {hid: n * w / sum(rest.values()) for hid, w in rest.items()}
    assert set(counts) == set(rest)
    assert chi_square(counts, expected) < CHI2_999[len(rest) - 1]


def test_random_sees_a_new_candidate_tuple() -> None:
    """The cumulative weights are cached per tuple; a new tuple (a pool change) is read."""
    b = WeightedRandom(random.Random(1))
    first = pool(a=1, b=1)
    assert {b.pick(first, ()).id for _ in range(100)} == {"a", "b"}  # type: ignore[union-attr]
    second = pool(c=1, d=3)
    counts = Counter(b.pick(second, ()).id for _ in range(4000))  # type: ignore[union-attr]
    assert set(counts) == {"c", "d"} and counts["d"] == pytest.approx(3000, rel=0.06)


def test_random_reads_a_list_afresh_each_time() -> None:
    b = WeightedRandom(random.Random(1))
    hosts = list(pool(a=1, b=1))
    b.pick(hosts, ())
    hosts[1] = Host(endpoint("z"))
    assert {b.pick(hosts, ()).id for _ in range(100)} == {"a", "z"}  # type: ignore[union-attr]


# -- p2c: the cost ------------------------------------------------------------------------


def host_with(hid: str = "h", *, ewma: float = 0.0, active: int = 0, weight: int = 1,
              failures: int = 0) -> Host:
    host = Host(endpoint(hid, weight))
    host.ewma, host.active, host.consecutive_failures = ewma, active, failures
    host.ewma_at = time.monotonic()  # measured just now, on the clock p2c reads by default
    return host


T = 0.040  # a typical latency


@pytest.mark.parametrize("kw,expected", [
    ({"ewma": 0.010}, 0.010),
    ({"ewma": 0.010, "active": 1}, 0.020),
    ({"ewma": 0.010, "active": 3}, 0.040),
    ({"ewma": 0.010, "active": 3, "weight": 3}, 0.020),  # queue per unit of capacity
    ({"ewma": 0.010, "active": 0, "weight": 3}, 0.010),  # idle: latency alone
    ({}, 0.0),  # unmeasured and idle: probe it
    ({"active": 1}, 2 * T),  # unmeasured and busy: an average host
    ({"ewma": 0.001, "failures": 1}, 2 * T),  # fails fast: lifted to typical, x (1 + 1)
    ({"ewma": 0.001, "failures": 3}, 4 * T),
    ({"ewma": 0.100, "failures": 1}, 0.200),  # slow and failing: its own latency, x 2
    ({"failures": 2, "active": 1}, 3 * T * 2),  # connect failures: nothing measured
])
def test_p2c_cost(kw: dict[str, float], expected: float) -> None:
    assert cost(host_with(**kw), T) == pytest.approx(expected)  # type: ignore[arg-type]


def test_p2c_cost_of_an_idle_half_open_host_is_zero() -> None:
    host = host_with(ewma=0.001, failures=5)
    for _ in range(5):
        host.breaker.record_failure()
    assert host.breaker.state == OPEN
    host.breaker.to_half_open()
    assert host.breaker.state == HALF_OPEN
    assert cost(host, T) == 0.0  # its one trial is due: otherwise it would never get it
    host.active = 1
    assert cost(host, T) == pytest.approx(0.040 * 6 * 2)


# -- p2c: simulated load on a virtual clock -----------------------------------------------


def simulate(b: Balancer, hosts: Sequence[Host], latency: dict[str, float], *,
             failing: Collection[str] = (), requests: int = 20_000, interval: float = 0.005,
             seed: int = 7, jitter: bool = True) -> dict[str, float]:
    """Poisson arrivals every `interval` on average; a request to host h takes
    latency[h] (exponentially distributed when `jitter`), then reports its latency and
    its outcome as the proxy does (record_latency, on_success / on_failure). Returns the
    share of requests each host received."""
    rng = random.Random(seed)
    in_flight: list[tuple[float, int, Host, float]] = []
    counts: Counter[str] = Counter()
    now = 0.0
    if isinstance(b, PowerOfTwoChoices):
        b.clock = lambda: now  # p2c reads EWMA ages on the simulation's clock
    for seq in range(requests):
        now += rng.expovariate(1.0 / interval)
        while in_flight and in_flight[0][0] <= now:
            end, _seq, done, start = heapq.heappop(in_flight)
            done.active -= 1
            done.record_latency(end - start, end)
            if done.id in failing:
                done.on_failure(503)
            else:
                done.on_success(200)
        host = b.pick(hosts, ())
        assert host is not None
        host.active += 1
        counts[host.id] += 1
        took = latency[host.id] * (rng.expovariate(1.0) if jitter else 1.0)
        heapq.heappush(in_flight, (now + took, seq, host, now))
    return {h.id: counts[h.id] / requests for h in hosts}


@pytest.mark.parametrize("latency,interval,fast_at_least,slow_between", [
    ({"fast": 0.010, "slow": 0.050}, 0.005, 0.90, (0.003, 0.10)),
    ({"fast": 0.010, "slow": 0.050}, 0.002, 0.80, (0.02, 0.20)),  # busier: slow helps more
    ({"fast": 0.010, "mid": 0.020, "slow": 0.050}, 0.005, 0.50, (0.01, 0.15)),
])
def test_p2c_prefers_the_faster_host_but_still_uses_the_slower(
        latency: dict[str, float], interval: float, fast_at_least: float,
        slow_between: tuple[float, float]) -> None:
    hosts = tuple(Host(endpoint(hid)) for hid in latency)
    share = simulate(PowerOfTwoChoices(random.Random(1)), hosts, latency, interval=interval)
    assert share["fast"] >= fast_at_least
    assert slow_between[0] <= share["slow"] <= slow_between[1]
    if "mid" in share:
        assert share["fast"] > share["mid"] > share["slow"]


def test_p2c_avoids_a_host_that_fails_fast() -> None:
    """The bad instance answers 503 in 1 ms; the good ones take 20 ms. By latency alone it
    looks best; least_conn (which does not look at failures) sends it most requests."""
    latency = {"bad": 0.001, "good1": 0.020, "good2": 0.020}
    share = simulate(PowerOfTwoChoices(random.Random(1)), pool(bad=1, good1=1, good2=1),
                     latency, failing={"bad"})
    assert share["bad"] < 0.01
    assert share["good1"] == pytest.approx(0.5, abs=0.05)
    naive = simulate(LeastConnections(random.Random(1)), pool(bad=1, good1=1, good2=1),
                     latency, failing={"bad"})
    assert naive["bad"] > 0.5


def test_p2c_lets_a_host_that_failed_once_back() -> None:
    """A failure in a row is a penalty, not a ban: after a success it competes again."""
    latency = {"flaky": 0.010, "steady": 0.020}
    hosts = pool(flaky=1, steady=1)
    b = PowerOfTwoChoices(random.Random(3))
    share = simulate(b, hosts, latency)
    hosts[0].on_failure(503)
    assert b.pick(hosts, ()) is hosts[1]  # penalised: 2 x max(ewma, typical)
    hosts[0].on_success(200)
    assert b.pick(hosts, ()) is hosts[0]
    assert share["flaky"] > 0.6


@pytest.mark.parametrize("weights", [{"a": 1, "b": 3}, {"a": 1, "b": 2, "c": 3, "d": 4}])
def test_p2c_honours_weights_at_equal_cost(weights: dict[str, int]) -> None:
    """Idle and unmeasured (or equally fast): every comparison is a tie, and ties are
    resolved so that the picks follow the weights exactly."""
    hosts = pool(**weights)
    b = PowerOfTwoChoices(random.Random(8))
    n = 20_000
    counts = Counter(b.pick(hosts, ()).id for _ in range(n))  # type: ignore[union-attr]
    total = sum(weights.values())
    expected = {hid: n * w / total for hid, w in weights.items()}
    assert chi_square(counts, expected) < CHI2_999[len(weights) - 1]
    for host in hosts:
        host.ewma = 0.02
    counts = Counter(b.pick(hosts, ()).id for _ in range(n))  # type: ignore[union-attr]
    assert chi_square(counts, expected) < CHI2_999[len(weights) - 1]


@pytest.mark.parametrize("interval,low,high", [
    (0.2, 0.8, 1.3),  # ~0.1 in flight: mostly ties, split by weight
    (0.01, 0.75, 1.7),  # ~2 in flight: an idle light host beats a busy heavy one
    (0.0005, 0.9, 1.15),  # ~40 in flight: in-flight per unit of weight is equalised
])
def test_p2c_honours_weights_under_load(interval: float, low: float, high: float) -> None:
    """Equal latency: each host's share over weight / total stays within [low, high], and
    the shares keep the order of the weights (p2c.py's docstring quotes these bounds)."""
    weights = {"a": 1, "b": 2, "c": 3, "d": 4}
    share = simulate(PowerOfTwoChoices(random.Random(1)), pool(**weights),
                     {hid: 0.02 for hid in weights}, interval=interval, jitter=False)
    ratios = {hid: share[hid] / (w / 10) for hid, w in weights.items()}
    assert all(low <= r <= high for r in ratios.values()), ratios
    assert share["a"] < share["b"] < share["c"] < share["d"]


def test_p2c_weights_are_relative() -> None:
    """Consul weights 10/20/30/40 mean what 1/2/3/4 mean, also when latencies differ."""
    latency = {"a": 0.01, "b": 0.02, "c": 0.03, "d": 0.04}
    small = simulate(PowerOfTwoChoices(random.Random(1)), pool(a=1, b=2, c=3, d=4), latency,
                     interval=0.002)
    large = simulate(PowerOfTwoChoices(random.Random(1)), pool(a=10, b=20, c=30, d=40),
                     latency, interval=0.002)
    assert small == large


def test_p2c_tries_a_new_host_early_without_flooding_it() -> None:
    """Three measured hosts with two requests in flight each, and a new one (ewma 0): the
    new one is picked at once (idle and unmeasured costs 0), and then treated as an
    average host, so it gets no more than its share while its answers are out."""
    hosts = tuple(host_with(hid, ewma=0.02, active=2) for hid in "abc") + (host_with("new"),)
    b = PowerOfTwoChoices(random.Random(6))
    first_pick = None
    for n in range(1, 61):
        host = b.pick(hosts, ())
        assert host is not None
        host.active += 1
        if host.id == "new" and first_pick is None:
            first_pick = n
    assert first_pick is not None and first_pick <= 4
    actives = {h.id: h.active for h in hosts}
    assert actives["new"] <= max(actives[hid] for hid in "abc") + 1, actives
    assert sum(actives.values()) == 6 + 60


def test_p2c_tcp_mode_nothing_measured_is_least_loaded() -> None:
    """tcp mode never records latency: p2c is then a weighted least-load choice."""
    hosts = pool(a=1, b=1, c=1, d=1)
    for host, active in zip(hosts, (9, 0, 9, 9)):
        host.active = active
    b = PowerOfTwoChoices(random.Random(1))
    got = Counter(b.pick(hosts, ()).id for _ in range(3000))  # type: ignore[union-attr]
    # b wins every comparison it is in (half the pairs); the other pairs tie
    assert got["b"] == pytest.approx(1500, rel=0.1)
    assert got["b"] > max(got["a"], got["c"], got["d"])


def test_p2c_cost_forgets_an_old_measurement() -> None:
    host = host_with(ewma=0.5)
    measured = host.ewma_at
    assert cost(host, T, now=measured + EWMA_FORGET_AFTER / 2) == pytest.approx(0.5)
    assert cost(host, T, now=measured + EWMA_FORGET_AFTER + 1) == 0.0  # idle: probe it again
    host.active = 1
    assert cost(host, T, now=measured + EWMA_FORGET_AFTER + 1) == pytest.approx(2 * T)


def test_p2c_takes_back_a_host_priced_out_by_one_slow_answer() -> None:
    """Three equally fast hosts; one answered once in 1 s (a pause) just before the run.
    Its price would keep it out of every comparison, and unpicked it is never measured
    again; once forgotten it is tried, measures fast, and gets its share back."""
    hosts = pool(a=1, b=1, paused=1)
    hosts[2].record_latency(1.0, 0.0)
    latency = {"a": 0.01, "b": 0.01, "paused": 0.01}
    share = simulate(PowerOfTwoChoices(random.Random(2)), hosts, latency, interval=0.02,
                     requests=10_000)  # 200 s of virtual time
    print(f"shares {share}")
    assert share["paused"] > 0.25  # out for at most EWMA_FORGET_AFTER of 200 s


def test_p2c_with_tried_compares_the_rest() -> None:
    hosts = (host_with("fast", ewma=0.01), host_with("mid", ewma=0.02),
             host_with("slow", ewma=0.05))
    b = PowerOfTwoChoices(random.Random(1))
    assert {b.pick(hosts, [hosts[0]]) for _ in range(50)} == {hosts[1]}
    assert {b.pick(hosts, hosts[:2]) for _ in range(5)} == {hosts[2]}


# -- hash ---------------------------------------------------------------------------------


def owner_map(b: Balancer, hosts: Sequence[Host], ks: Sequence[bytes]) -> dict[bytes, str]:
    out = {}
    for k in ks:
        host = b.pick(hosts, (), k)
        assert host is not None
        out[k] = host.id
    return out


def test_hash_same_key_same_host() -> None:
    hosts = named_pool(7)
    b = ConsistentHash(random.Random(1))
    ks = keys(500)
    first = owner_map(b, hosts, ks)
    assert owner_map(b, hosts, ks) == first
    assert owner_map(b, tuple(reversed(hosts)), ks) == first, "order does not matter"
    assert owner_map(ConsistentHash(random.Random(99)), hosts, ks) == first, "nor the rng"


GOLDEN = {b"alice": "d", b"bob": "b", b"carol": "c", b"dave": "d", b"erin": "e",
          b"frank": "b", b"grace": "e", b"heidi": "e"}


def test_hash_is_stable_across_processes() -> None:
    """blake2b, not Python's salted hash(): these values hold in every process, worker
    and sdproxy instance (recorded from the first implementation; a change here
    re-shuffles every sticky client in a rolling upgrade)."""
    assert key_hash(b"alice") == 0x89DA54CE0CECEA4D
    assert key_hash(b"") == 0xB4B2797457A0A6E4
    hosts = pool(a=1, b=1, c=1, d=1, e=1)
    b = ConsistentHash()
    assert {k: b.pick(hosts, (), k).id for k in GOLDEN} == GOLDEN  # type: ignore[union-attr]


@pytest.mark.parametrize("weights", [
    [1, 1, 1],
    [1, 1, 1, 1, 1],
    [1, 1, 1, 1, 1, 1, 1, 1],
    [1, 2, 3],
    [2, 2, 1, 1],
])
def test_hash_spreads_keys_by_weight(weights: list[int]) -> None:
    hosts = tuple(Host(endpoint(f"web-{i}", w, port=9000 + i)) for i, w in enumerate(weights))
    b = ConsistentHash(random.Random(1))
    n = 10_000
    counts = Counter(owner_map(b, hosts, keys(n)).values())
    total = sum(weights)
    for host in hosts:
        fair = n * host.weight / total
        assert counts[host.id] == pytest.approx(fair, rel=0.15), (counts, host.id, fair)


@pytest.mark.parametrize("n", [2, 3, 5, 8, 12])
def test_hash_join_moves_about_one_share_all_to_the_new_host(n: int) -> None:
    before_hosts = named_pool(n)
    after_hosts = before_hosts + (Host(endpoint("joiner", port=9999)),)
    b = ConsistentHash(random.Random(1))
    ks = keys(10_000)
    before = owner_map(b, before_hosts, ks)
    after = owner_map(b, after_hosts, ks)
    moved = [k for k in ks if before[k] != after[k]]
    assert {after[k] for k in moved} == {"joiner"}
    assert 0.5 / (n + 1) <= len(moved) / len(ks) <= 1.6 / (n + 1)


@pytest.mark.parametrize("n", [3, 5, 8])
def test_hash_leave_moves_only_the_leavers_keys(n: int) -> None:
    hosts = named_pool(n)
    b = ConsistentHash(random.Random(1))
    ks = keys(10_000)
    before = owner_map(b, hosts, ks)
    leaver = hosts[1]
    after = owner_map(b, hosts[:1] + hosts[2:], ks)
    moved = {k for k in ks if before[k] != after[k]}
    assert moved == {k for k in ks if before[k] == leaver.id}
    assert 0.5 / n <= len(moved) / len(ks) <= 1.6 / n


def test_hash_weight_change_moves_only_keys_to_or_from_that_host() -> None:
    ks = keys(10_000)
    b = ConsistentHash(random.Random(1))
    hosts = named_pool(4)
    before = owner_map(b, hosts, ks)
    heavier = hosts[:3] + (Host(endpoint("web-3", 2, port=9003)),)
    after = owner_map(b, heavier, ks)
    moved = [k for k in ks if before[k] != after[k]]
    assert moved and {after[k] for k in moved} == {"web-3"}
    # web-3's share goes from 1/4 to 2/5: 0.15 of the keys move, all to web-3
    assert len(moved) / len(ks) == pytest.approx(2 / 5 - 1 / 4, abs=0.05)


def test_hash_retry_goes_where_the_key_would_go_without_that_host() -> None:
    hosts = named_pool(6)
    b = ConsistentHash(random.Random(1))
    for k in keys(300):
        first = b.pick(hosts, (), k)
        assert first is not None
        retry = b.pick(hosts, [first], k)
        without = b.pick(tuple(h for h in hosts if h is not first), (), k)
        assert retry is not None and retry is without and retry is not first
        third = b.pick(hosts, [first, retry], k)
        assert third is not None and third not in (first, retry)


def test_hash_without_key_is_weighted_random() -> None:
    hosts = pool(a=1, b=3)
    b = ConsistentHash(random.Random(2))
    counts = Counter(b.pick(hosts, ()).id for _ in range(20_000))  # type: ignore[union-attr]
    assert chi_square(counts, {"a": 5000, "b": 15000}) < CHI2_999[1]


def test_hash_ring_is_built_once_per_host_set() -> None:
    b = ConsistentHash(random.Random(1))
    hosts = named_pool(5)
    for k in keys(200):
        b.pick(hosts, (), k)
    assert b.rings_built == 1
    # a new tuple of the same ids and weights (a swap that changed nothing we hash on,
    # or a Host re-created under the same id): the cached ring
    again = tuple(Host(h.endpoint) for h in hosts)
    for k in keys(50):
        b.pick(again, (), k)
        b.pick(list(again), (), k)
    assert b.rings_built == 1
    # a breaker opening and closing again: two sets, each built once
    for _ in range(5):
        b.pick(hosts[1:], (), b"k")
        b.pick(hosts, (), b"k")
    assert b.rings_built == 2
    # a weight change is a new set
    b.pick(hosts[:4] + (Host(endpoint("web-4", 3, port=9004)),), (), b"k")
    assert b.rings_built == 3


def test_hash_keeps_keys_when_a_host_is_recreated_under_its_id() -> None:
    b = ConsistentHash(random.Random(1))
    hosts = named_pool(4)
    ks = keys(400)
    before = owner_map(b, hosts, ks)
    recreated = tuple(Host(endpoint(h.id, port=h.endpoint.port, address="10.9.9.9"))
                      for h in hosts)
    assert owner_map(b, recreated, ks) == before


@pytest.mark.parametrize("hash_key,heads,same", [
    ("header:X-User",
     [MessageHead(method=b"GET", target=b"/a", headers=[(b"X-User", b"alice")]),
      MessageHead(method=b"POST", target=b"/b", headers=[(b"x-user", b"alice"),
                                                        (b"Host", b"h")])], True),
    ("cookie:sid",
     [MessageHead(method=b"GET", target=b"/", headers=[(b"Cookie", b"a=1; sid=s3cr3t")]),
      MessageHead(method=b"GET", target=b"/x", headers=[(b"cookie", b"sid=s3cr3t; b=2")])],
     True),
    ("path",
     [MessageHead(method=b"GET", target=b"/cart?x=1"),
      MessageHead(method=b"GET", target=b"/cart?y=2"),
      MessageHead(method=b"GET", target=b"/cart")], True),
])
def test_request_keys_give_stable_picks(hash_key: str, heads: list[MessageHead],
                                        same: bool) -> None:
    key_of = key_function("hash", hash_key)
    hosts = named_pool(6)
    b = ConsistentHash(random.Random(1))
    picks = set()
    for head in heads:
        key = key_of(head, b"192.0.2.7")
        assert key is not None
        for _ in range(3):
            picks.add(b.pick(hosts, (), key))
    assert len(picks) == 1


def test_request_keys_spread_different_users() -> None:
    key_of = key_function("hash", "header:X-User")
    hosts = named_pool(4)
    b = ConsistentHash(random.Random(1))
    got: Counter[str] = Counter()
    for i in range(4000):
        head = MessageHead(method=b"GET", target=b"/", headers=[(b"X-User", b"u%d" % i)])
        got[b.pick(hosts, (), key_of(head, b"192.0.2.7")).id] += 1  # type: ignore[union-attr]
    assert all(c == pytest.approx(1000, rel=0.15) for c in got.values()) and len(got) == 4


def test_request_without_the_header_falls_back_to_random() -> None:
    key_of = key_function("hash", "header:X-User")
    head = MessageHead(method=b"GET", target=b"/")
    assert key_of(head, b"192.0.2.7") is None
    hosts = named_pool(3)
    b = ConsistentHash(random.Random(1))
    assert len({b.pick(hosts, (), key_of(head, b"192.0.2.7")) for _ in range(100)}) == 3


def test_source_ip_key() -> None:
    key_of = key_function("hash", "source_ip")
    hosts = named_pool(5)
    b = ConsistentHash(random.Random(1))
    head = MessageHead(method=b"GET", target=b"/")
    a = {b.pick(hosts, (), key_of(head, b"198.51.100.1")) for _ in range(5)}
    assert len(a) == 1


# -- state survives snapshot swaps (through UpstreamRuntime) ------------------------------


def runtime(balance: str, *eps: Endpoint, seed: int = 1) -> UpstreamRuntime:
    rt = UpstreamRuntime(UpstreamConfig(name="web", listen=Address("127.0.0.1", 8081),
                                        balance=balance),
                         clock=lambda: 1000.0, monotonic=lambda: 50.0,
                         balancer=make_balancer(balance, random.Random(seed)))
    rt.on_catalog_answer(CatalogAnswer(eps, index=1))
    return rt


def rt_owners(rt: UpstreamRuntime, ks: Sequence[bytes]) -> dict[bytes, str]:
    out = {}
    for k in ks:
        host = rt.pick((), k)
        assert host is not None
        out[k] = host.id
    return out


EPS = tuple(endpoint(f"web-{i}", port=9000 + i) for i in range(5))


def test_runtime_hash_default_balancer_is_the_ring() -> None:
    rt = UpstreamRuntime(UpstreamConfig(name="web", listen=Address("127.0.0.1", 8081),
                                        balance="hash"))
    assert isinstance(rt.balancer, ConsistentHash)


def test_p2c_reads_latency_on_the_runtimes_own_monotonic_clock() -> None:
    """One clock for every routing decision: a runtime built with an injected clock
    gives it to its p2c balancer (latency EWMAs decay on that clock, not the machine's)."""
    def ticks() -> float:
        return 123.0

    rt = UpstreamRuntime(UpstreamConfig(name="web", listen=Address("127.0.0.1", 8081),
                                        balance="p2c"), monotonic=ticks)
    assert isinstance(rt.balancer, PowerOfTwoChoices) and rt.balancer.clock is ticks


def test_runtime_hash_across_swaps() -> None:
    rt = runtime("hash", *EPS)
    balancer = rt.balancer
    assert isinstance(balancer, ConsistentHash)
    ks = keys(2000)
    before = rt_owners(rt, ks)
    assert balancer.rings_built == 1
    rt.on_catalog_answer(CatalogAnswer(EPS, index=2))  # unchanged
    assert rt_owners(rt, ks) == before and balancer.rings_built == 1
    # same ids, one instance moved address: a new Host, the same keys
    moved_ep = endpoint("web-2", port=9102)
    rt.on_catalog_answer(CatalogAnswer(EPS[:2] + (moved_ep,) + EPS[3:], index=3))
    assert rt_owners(rt, ks) == before and balancer.rings_built == 1
    # a join: only keys moving to the joiner move
    joined = EPS + (endpoint("web-9", port=9009),)
    rt.on_catalog_answer(CatalogAnswer(joined, index=4))
    after = rt_owners(rt, ks)
    moved = [k for k in ks if after[k] != before[k]]
    assert {after[k] for k in moved} == {"web-9"}
    assert 0.5 / 6 <= len(moved) / len(ks) <= 1.6 / 6
    # and it leaves again: back to the first mapping, from the cached ring
    rt.on_catalog_answer(CatalogAnswer(EPS, index=5))
    assert rt_owners(rt, ks) == before
    assert balancer.rings_built == 2


def test_runtime_hash_breaker_open_moves_only_that_hosts_keys() -> None:
    rt = runtime("hash", *EPS)
    ks = keys(2000)
    before = rt_owners(rt, ks)
    sick = rt.hosts["web-3"]
    for _ in range(rt.config.breaker.failures):
        sick.on_failure()
    assert sick.breaker.state == OPEN and sick not in rt.available
    during = rt_owners(rt, ks)
    assert {k for k in ks if during[k] != before[k]} == {k for k in ks if before[k] == "web-3"}
    sick.breaker.to_half_open()
    sick.on_success(200)  # the trial succeeded: closed again
    assert rt_owners(rt, ks) == before


def test_runtime_p2c_keeps_latency_across_swaps() -> None:
    rt = runtime("p2c", *EPS[:3])
    fast = rt.hosts["web-0"]
    for host in rt.current.hosts:
        host.record_latency(0.005 if host is fast else 0.050, time.monotonic())
    rt.on_catalog_answer(CatalogAnswer(EPS[:3] + (endpoint("web-7", port=9007),), index=2))
    assert rt.hosts["web-0"] is fast and fast.ewma == pytest.approx(0.005)
    newcomer = rt.hosts["web-7"]
    newcomer.record_latency(0.050, time.monotonic())
    got = Counter(rt.pick(()).id for _ in range(4000))  # type: ignore[union-attr]
    # fast wins every pair it is in: 1 - (3/4 * 2/3) = half the picks
    assert got["web-0"] == pytest.approx(2000, rel=0.08)


def test_runtime_least_conn_keeps_active_across_swaps() -> None:
    rt = runtime("least_conn", *EPS[:3])
    for host, active in zip(rt.current.hosts, (4, 0, 4)):
        host.active = active
    rt.on_catalog_answer(CatalogAnswer(EPS[:3] + (endpoint("web-7", port=9007),), index=2))
    rt.hosts["web-7"].active = 4
    assert {rt.pick(()).id for _ in range(20)} == {"web-1"}  # type: ignore[union-attr]


@pytest.mark.parametrize("name", MINE)
def test_runtime_retries_never_repeat_a_host(name: str) -> None:
    rt = runtime(name, *EPS)
    for k in keys(50):
        tried: list[Host] = []
        while (host := rt.pick(tried, k)) is not None:
            assert host not in tried
            tried.append(host)
        assert len(tried) == len(EPS)


# -- shape of the hot path ----------------------------------------------------------------


@pytest.mark.parametrize("name", MINE)
def test_pick_does_not_touch_hosts_it_does_not_return(name: str) -> None:
    """Balancers read Host state; only round robin writes (its running weight)."""
    hosts = named_pool(4)
    snapshot: Callable[[], list[tuple[int, float, int, int]]] = lambda: [
        (h.active, h.ewma, h.consecutive_failures, h.sw_current) for h in hosts]
    before = snapshot()
    b = balancer(name)
    for k in keys(20):
        b.pick(hosts, (), k)
    assert snapshot() == before
