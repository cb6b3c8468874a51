"""proxy.upstream.manager.UpstreamRuntime (and host.IdlePool): catalog answers reconciled
by endpoint id into hosts, published as snapshots; draining; staleness on a fake clock.
"""

from __future__ import annotations

import logging

import pytest
from support.fakes import FakeClock

from proxy.config import UpstreamConfig
from proxy.model import Address, CatalogAnswer, Endpoint
from proxy.upstream.host import DRAINING, Host, IdlePool
from proxy.upstream.manager import EMPTY, LATENCY_BUCKETS, LatencyHistogram, UpstreamRuntime


class FakeConn:
    """An idle upstream connection as IdlePool sees it."""

    def __init__(self, name: str, usable: bool = True) -> None:
        self.name = name
        self.usable = usable
        self.closed = False

    def is_usable(self) -> bool:
        return self.usable and not self.closed

    def close(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        return f"FakeConn({self.name})"


def ep(hid: str, address: str = "10.0.0.1", port: int = 0, **kw: object) -> Endpoint:
    return Endpoint(id=hid, address=address, port=port or 8000 + ord(hid[0]),
                    **kw)  # type: ignore[arg-type]


A, B, C = ep("a"), ep("b"), ep("c")


def answer(*eps: Endpoint, index: int | None = 1) -> CatalogAnswer:
    return CatalogAnswer(tuple(eps), index)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rt(clock: FakeClock) -> UpstreamRuntime:
    return UpstreamRuntime(UpstreamConfig(name="web", listen=Address("127.0.0.1", 8081)),
                           clock=clock, monotonic=FakeClock(50.0))


def ids(hosts: object) -> list[str]:
    return [h.id for h in hosts]  # type: ignore[attr-defined]


def use(host: Host, *, active: int = 0, requests: int = 0, conns: int = 0) -> list[FakeConn]:
    """Give `host` some runtime state; return the idle connections put in its pool."""
    host.active = active
    host.requests = requests
    host.on_success(200)
    host.on_failure(503)
    host.sw_current = 7
    pooled = [FakeConn(f"{host.id}{i}") for i in range(conns)]
    for conn in pooled:
        assert host.pool.put(conn)
    return pooled


# -- first answer ---------------------------------------------------------------------------


def test_before_any_answer(rt: UpstreamRuntime) -> None:
    assert rt.answered is False
    assert rt.current is EMPTY and rt.current.hosts == ()
    assert rt.pick(()) is None
    assert rt.all_hosts() == []
    assert rt.stale_seconds() == 0.0


def test_first_answer_publishes_hosts_in_answer_order(rt: UpstreamRuntime) -> None:
    rt.on_catalog_answer(answer(C, A, B, index=42))
    assert rt.answered is True
    assert ids(rt.current.hosts) == ["c", "a", "b"]
    assert rt.current.index == 42 and rt.catalog_index == 42
    assert [h.endpoint for h in rt.current.hosts] == [C, A, B]
    assert set(rt.hosts) == {"a", "b", "c"} and rt.draining == {}
    assert not any(h.draining for h in rt.current.hosts)


def test_empty_first_answer_still_counts_as_answered(rt: UpstreamRuntime) -> None:
    rt.on_catalog_answer(answer())
    assert rt.answered is True
    assert rt.current.hosts == () and rt.pick(()) is None


def test_errors_do_not_count_as_answered(rt: UpstreamRuntime) -> None:
    rt.on_catalog_error("connection refused")
    rt.on_catalog_error("connection refused")
    assert rt.answered is False
    assert (rt.catalog_errors, rt.last_error) == (2, "connection refused")
    rt.on_catalog_answer(answer(A))
    assert rt.answered is True and rt.catalog_updates == 1


# -- reconcile by id ------------------------------------------------------------------------


def test_kept_hosts_are_the_same_objects_with_their_state(rt: UpstreamRuntime) -> None:
    rt.on_catalog_answer(answer(A, B))
    host_a, host_b = rt.hosts["a"], rt.hosts["b"]
    pooled = use(host_a, active=1, requests=10, conns=2)
    rt.on_catalog_answer(answer(A, B, C, index=2))
    assert rt.hosts["a"] is host_a and rt.hosts["b"] is host_b
    assert (host_a.active, host_a.requests, host_a.failures, host_a.sw_current) == (1, 10, 1, 7)
    assert host_a.status_counts == {200: 1, 503: 1}
    assert len(host_a.pool) == 2 and not any(c.closed for c in pooled)


def test_new_ids_get_fresh_hosts(rt: UpstreamRuntime) -> None:
    rt.on_catalog_answer(answer(A))
    rt.on_catalog_answer(answer(A, C, index=2))
    host_c = rt.hosts["c"]
    assert host_c.endpoint == C
    assert (host_c.active, host_c.requests, host_c.failures, host_c.sw_current) == (0, 0, 0, 0)
    assert ids(rt.current.hosts) == ["a", "c"]


def test_removed_idle_host_leaves_at_once_and_its_pool_closes(rt: UpstreamRuntime) -> None:
    rt.on_catalog_answer(answer(A, B))
    host_b = rt.hosts["b"]
    pooled = use(host_b, active=0, conns=3)
    rt.on_catalog_answer(answer(A, index=2))
    assert ids(rt.current.hosts) == ["a"]
    assert "b" not in rt.hosts
    assert ids(rt.all_hosts()) == ["a"]
    assert host_b.draining and host_b.state == DRAINING
    assert all(c.closed for c in pooled) and len(host_b.pool) == 0
    assert all(rt.pick(()) is rt.hosts["a"] for _ in range(5))


def test_removed_busy_host_drains_until_released(rt: UpstreamRuntime) -> None:
    rt.on_catalog_answer(answer(A, B))
    host_b = rt.hosts["b"]
    pooled = use(host_b, active=2, conns=1)
    rt.on_catalog_answer(answer(A, index=2))
    # no new work, idle connections closed at once, still listed while requests run
    assert host_b not in rt.current.hosts and "b" not in rt.hosts
    assert all(c.closed for c in pooled) and len(host_b.pool) == 0
    assert ids(rt.all_hosts()) == ["a", "b"]
    assert rt.all_hosts()[1] is host_b and host_b.state == DRAINING
    assert {rt.pick(()) for _ in range(6)} == {rt.hosts["a"]}
    rt.release(host_b)
    assert host_b.active == 1 and ids(rt.all_hosts()) == ["a", "b"]
    rt.release(host_b)
    assert host_b.active == 0 and ids(rt.all_hosts()) == ["a"]
    assert rt.draining == {}


def test_release_of_a_routable_host_only_counts_down(rt: UpstreamRuntime) -> None:
    rt.on_catalog_answer(answer(A))
    host_a = rt.hosts["a"]
    host_a.active = 1
    rt.release(host_a)
    assert host_a.active == 0 and rt.hosts["a"] is host_a
    assert rt.current.hosts == (host_a,)


@pytest.mark.parametrize("same", [
    pytest.param(lambda: answer(A, B, C, index=1), id="same-index"),
    pytest.param(lambda: answer(A, B, C, index=99), id="new-index"),
    pytest.param(lambda: answer(C, B, A, index=2), id="reordered"),
    pytest.param(lambda: answer(ep("a"), ep("b"), ep("c"), index=3), id="equal-copies"),
])
def test_identical_answer_keeps_the_snapshot(rt: UpstreamRuntime, same: object,
                                             caplog: pytest.LogCaptureFixture) -> None:
    rt.on_catalog_answer(answer(A, B, C, index=1))
    snapshot, hosts = rt.current, dict(rt.hosts)
    with caplog.at_level(logging.INFO, logger="sdproxy.upstream"):
        rt.on_catalog_answer(same())  # type: ignore[operator]
    assert rt.current is snapshot
    assert rt.hosts == hosts and all(rt.hosts[k] is v for k, v in hosts.items())
    assert "pool_change" not in caplog.text


def test_a_change_swaps_in_a_new_snapshot_and_logs_the_diff(
        rt: UpstreamRuntime, caplog: pytest.LogCaptureFixture) -> None:
    rt.on_catalog_answer(answer(A, B))
    old = rt.current
    with caplog.at_level(logging.INFO, logger="sdproxy.upstream"):
        rt.on_catalog_answer(answer(A, ep("b", weight=3), C, index=2))
    assert rt.current is not old
    assert ids(old.hosts) == ["a", "b"], "a published snapshot is never mutated"
    assert ids(rt.current.hosts) == ["a", "b", "c"]
    (record,) = [r for r in caplog.records if "pool_change" in r.getMessage()]
    msg = record.getMessage()
    assert "upstream=web" in msg and "added=c" in msg and "removed=-" in msg
    assert "changed=b" in msg and "size=3" in msg


@pytest.mark.parametrize("moved", [
    pytest.param(ep("a", address="10.0.0.9"), id="new-address"),
    pytest.param(ep("a", port=9999), id="new-port"),
])
def test_same_id_new_address_gets_a_fresh_host(rt: UpstreamRuntime, moved: Endpoint) -> None:
    rt.on_catalog_answer(answer(A, B))
    old_a = rt.hosts["a"]
    pooled = use(old_a, active=1, requests=5, conns=2)
    rt.on_catalog_answer(answer(moved, B, index=2))
    new_a = rt.hosts["a"]
    assert new_a is not old_a
    assert new_a.endpoint == moved and not new_a.draining
    assert (new_a.requests, new_a.failures, new_a.sw_current, len(new_a.pool)) == (0, 0, 0, 0)
    # the old instance's connections are useless: closed; its in-flight work drains
    assert old_a.draining and all(c.closed for c in pooled)
    assert new_a in rt.current.hosts and old_a not in rt.current.hosts
    assert rt.all_hosts().count(old_a) == 1
    rt.release(old_a)
    assert old_a not in rt.all_hosts() and rt.hosts["a"] is new_a


def test_host_returning_while_draining_is_routable_again_with_its_state(
        rt: UpstreamRuntime) -> None:
    rt.on_catalog_answer(answer(A, B))
    host_b = rt.hosts["b"]
    use(host_b, active=1, requests=4)
    rt.on_catalog_answer(answer(A, index=2))
    assert host_b.draining
    rt.on_catalog_answer(answer(A, B, index=3))
    assert rt.hosts["b"] is host_b and not host_b.draining
    assert host_b in rt.current.hosts and rt.draining == {}
    assert (host_b.requests, host_b.failures, host_b.sw_current) == (4, 1, 7)
    assert rt.all_hosts().count(host_b) == 1
    rt.release(host_b)  # its last old request ends: it stays routable
    assert rt.hosts["b"] is host_b and host_b in rt.current.hosts


def test_host_returning_after_it_drained_is_routable(rt: UpstreamRuntime) -> None:
    rt.on_catalog_answer(answer(A, B))
    rt.on_catalog_answer(answer(A, index=2))
    rt.on_catalog_answer(answer(A, B, index=3))
    host_b = rt.hosts["b"]
    assert not host_b.draining and host_b in rt.current.hosts
    assert ids(rt.all_hosts()) == ["a", "b"]


@pytest.mark.parametrize("changed", [
    pytest.param(ep("a", weight=5), id="weight"),
    pytest.param(ep("a", status="warning"), id="status"),
    pytest.param(ep("a", tags=("v2",)), id="tags"),
    pytest.param(ep("a", meta=(("zone", "b"),)), id="meta"),
    pytest.param(ep("a", node="n2", datacenter="dc2"), id="node"),
])
def test_endpoint_change_updates_the_host_in_place(rt: UpstreamRuntime,
                                                    changed: Endpoint) -> None:
    rt.on_catalog_answer(answer(A, B))
    host_a = rt.hosts["a"]
    pooled = use(host_a, active=1, requests=3, conns=1)
    old = rt.current
    rt.on_catalog_answer(answer(changed, B, index=2))
    assert rt.hosts["a"] is host_a and host_a.endpoint == changed
    assert host_a.weight == changed.weight
    assert (host_a.requests, host_a.sw_current, len(host_a.pool)) == (3, 7, 1)
    assert not pooled[0].closed and not host_a.draining
    assert rt.current is not old and rt.current.hosts == (host_a, rt.hosts["b"])


def test_everything_removed_leaves_an_empty_pool(rt: UpstreamRuntime) -> None:
    rt.on_catalog_answer(answer(A, B))
    rt.on_catalog_answer(answer(index=2))
    assert rt.current.hosts == () and rt.pick(()) is None
    assert rt.answered is True


def test_two_busy_retired_hosts_with_one_id_both_drain(rt: UpstreamRuntime) -> None:
    rt.on_catalog_answer(answer(A))
    first = rt.hosts["a"]
    first.active = 1
    rt.on_catalog_answer(answer(ep("a", address="10.0.0.2"), index=2))  # moved while busy
    second = rt.hosts["a"]
    second.active = 1
    rt.on_catalog_answer(answer(index=3))  # and then left, still busy
    assert first in rt.all_hosts() and second in rt.all_hosts()
    rt.release(first)
    assert second in rt.all_hosts(), "still has a request in flight"


# -- staleness (injected clock) -------------------------------------------------------------


def test_stale_seconds_follows_the_catalog(rt: UpstreamRuntime, clock: FakeClock) -> None:
    rt.on_catalog_answer(answer(A))  # t=1000
    clock.advance(50)
    assert rt.stale_seconds() == 0.0, "no error: fresh however long the blocking query"
    rt.on_catalog_error("timeout")  # t=1050
    assert rt.stale_seconds() == 50.0, "counted from the last good answer"
    clock.advance(30)
    rt.on_catalog_error("timeout")  # a second error does not restart the count
    assert rt.stale_seconds() == 80.0
    clock.advance(20)
    assert rt.stale_seconds() == 100.0
    rt.on_catalog_answer(answer(A, index=2))  # t=1100
    assert rt.stale_seconds() == 0.0 and rt.last_update == 1100.0
    clock.advance(10)
    assert rt.stale_seconds() == 0.0


def test_stale_seconds_before_any_answer(rt: UpstreamRuntime, clock: FakeClock) -> None:
    rt.on_catalog_error("connection refused")  # t=1000, never answered
    clock.advance(12.5)
    assert rt.stale_seconds() == 12.5
    assert rt.current.hosts == ()  # SPEC: an upstream never seen yet has an empty pool


def test_alive_without_change_resets_staleness(rt: UpstreamRuntime, clock: FakeClock) -> None:
    rt.on_catalog_answer(answer(A))
    snapshot = rt.current
    rt.on_catalog_error("503 from consul")
    clock.advance(40)
    assert rt.stale_seconds() == 40.0
    rt.on_catalog_alive()
    assert rt.stale_seconds() == 0.0 and rt.last_update == 1040.0
    assert rt.current is snapshot


def test_last_known_pool_keeps_serving_while_the_catalog_fails(
        rt: UpstreamRuntime, clock: FakeClock) -> None:
    rt.on_catalog_answer(answer(A, B))
    snapshot = rt.current
    for _ in range(3):
        clock.advance(5)
        rt.on_catalog_error("unreachable")
    assert rt.current is snapshot
    assert {rt.pick(()).id for _ in range(4)} == {"a", "b"}  # type: ignore[union-attr]


# -- latency histogram ----------------------------------------------------------------------


@pytest.mark.parametrize("seconds,bucket", [
    (0.0, 0),
    (0.0001, 0),
    (0.0005, 0),  # a bound belongs to its own bucket: Prometheus `le`
    (0.00051, 1),
    (0.001, 1),
    (0.003, 3),
    (0.1, 7),
    (0.1000001, 8),
    (1.0, 10),
    (30.0, 14),
    (30.0001, 15),  # +Inf
    (3600.0, 15),
])
def test_latency_bucket(seconds: float, bucket: int) -> None:
    hist = LatencyHistogram()
    hist.observe(seconds)
    assert hist.counts.index(1) == bucket and sum(hist.counts) == 1
    assert bucket == len(LATENCY_BUCKETS) or seconds <= LATENCY_BUCKETS[bucket]
    assert bucket == 0 or seconds > LATENCY_BUCKETS[bucket - 1]


def test_latency_histogram_totals() -> None:
    hist = LatencyHistogram()
    assert hist.counts == [0] * (len(LATENCY_BUCKETS) + 1)
    for seconds in (0.002, 0.002, 0.3, 45.0):
        hist.observe(seconds)
    assert hist.count == 4
    assert hist.total == pytest.approx(45.304)
    assert hist.counts[2] == 2 and hist.counts[9] == 1 and hist.counts[-1] == 1


def test_latency_buckets_are_sorted() -> None:
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))


# -- IdlePool -------------------------------------------------------------------------------


def test_idle_pool_is_most_recently_used_first() -> None:
    pool = IdlePool()
    c1, c2, c3 = FakeConn("1"), FakeConn("2"), FakeConn("3")
    for conn in (c1, c2, c3):
        assert pool.put(conn)
    assert [pool.take(), pool.take(), pool.take(), pool.take()] == [c3, c2, c1, None]


def test_idle_pool_skips_unusable_connections() -> None:
    pool = IdlePool()
    good, dead, closed = FakeConn("good"), FakeConn("dead", usable=False), FakeConn("closed")
    for conn in (good, dead, closed):
        pool.put(conn)
    closed.close()
    assert pool.take() is good
    assert len(pool) == 0


def test_idle_pool_limit_and_discard() -> None:
    pool = IdlePool(limit=2)
    c1, c2, c3 = FakeConn("1"), FakeConn("2"), FakeConn("3")
    assert pool.put(c1) and pool.put(c2)
    assert pool.put(c3) is False and len(pool) == 2
    pool.discard(c1)
    pool.discard(c3)  # not pooled: no error
    assert len(pool) == 1 and pool.take() is c2


def test_idle_pool_close_all() -> None:
    pool = IdlePool()
    conns = [FakeConn(str(i)) for i in range(3)]
    for conn in conns:
        pool.put(conn)
    pool.close_all()
    assert all(c.closed for c in conns)
    assert len(pool) == 0 and pool.take() is None


class _Parked:
    def __init__(self, idle_since: float) -> None:
        self.idle_since = idle_since
        self.closed = False

    def is_usable(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self.closed = True


def test_idle_pool_expires_only_connections_parked_too_long() -> None:
    pool = IdlePool()
    old, fresh = _Parked(10.0), _Parked(50.0)
    pool.put(old)
    pool.put(fresh)
    pool.expire(before=30.0)
    assert old.closed and not fresh.closed
    assert len(pool) == 1 and pool.take() is fresh
