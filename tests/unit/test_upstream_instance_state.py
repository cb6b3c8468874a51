"""proxy.upstream.manager and host: what ejection, an operator's drain and the catalog's
down instances do to routing and to the listing (state and reason), on fake clocks."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
from support.fakes import T0, FakeClock

from proxy.config import BreakerConfig, HealthConfig, UpstreamConfig
from proxy.model import Address, CatalogAnswer, Endpoint
from proxy.upstream.health_state import ProbeResult
from proxy.upstream.host import DOWN, DRAINING, EJECTED, HEALTHY, Host
from proxy.upstream.manager import UpstreamRuntime

GOOD = ProbeResult("pass", "200 on /health")
BAD = ProbeResult("fail", "500 on /health")


def ep(hid: str, port: int, status: str = "passing") -> Endpoint:
    return Endpoint(id=hid, address="10.0.0.1", port=port, status=status)


A, B, C = ep("a", 1), ep("b", 2), ep("c", 3)


@pytest.fixture
def monotonic() -> FakeClock:
    return FakeClock(50.0)


def runtime(monotonic: FakeClock, *endpoints: Endpoint, fall: int = 2, rise: int = 2,
            failures: int = 2) -> UpstreamRuntime:
    cfg = UpstreamConfig(name="web", listen=Address("127.0.0.1", 8081),
                         health=HealthConfig(interval=1.0, fall=fall, rise=rise),
                         breaker=BreakerConfig(failures=failures, reset_timeout=10.0))
    rt = UpstreamRuntime(cfg, clock=FakeClock(T0), monotonic=monotonic)
    rt.on_catalog_answer(CatalogAnswer(endpoints or (A, B, C), 1))
    return rt


def probe(rt: UpstreamRuntime, hid: str, result: ProbeResult, times: int) -> None:
    for _ in range(times):
        rt.on_probe_result(rt.hosts[hid], result)


def picks(rt: UpstreamRuntime, n: int = 30) -> Counter[str]:
    out: Counter[str] = Counter()
    for _ in range(n):
        host = rt.pick(())
        out[host.id if host else "-"] += 1
        if host is not None:
            host.on_success(200)
    return out


def states(rt: UpstreamRuntime) -> dict[str, tuple[str, str]]:
    return {row.endpoint.id: (row.state, row.reason) for row in rt.listing()}


# -- ejection ----------------------------------------------------------------------------

def test_an_ejected_instance_gets_no_new_requests(monotonic: FakeClock) -> None:
    rt = runtime(monotonic)
    probe(rt, "a", BAD, 2)
    assert states(rt)["a"] == (EJECTED, "health: 500 on /health")
    assert set(picks(rt)) == {"b", "c"}
    assert not rt.panic


def test_requests_succeeding_do_not_lift_an_ejection_probes_do(monotonic: FakeClock) -> None:
    rt = runtime(monotonic)
    probe(rt, "a", BAD, 2)
    for _ in range(5):
        rt.hosts["a"].on_success(200)  # e.g. in-flight work that ended well
    assert rt.hosts["a"].state == EJECTED
    probe(rt, "a", GOOD, 1)
    assert rt.hosts["a"].state == EJECTED  # rise = 2
    probe(rt, "a", GOOD, 1)
    assert states(rt)["a"] == (HEALTHY, "")
    assert set(picks(rt)) == {"a", "b", "c"}


def test_probes_never_touch_the_breaker_or_the_request_counters(monotonic: FakeClock) -> None:
    rt = runtime(monotonic, failures=1)
    probe(rt, "a", BAD, 10)
    host = rt.hosts["a"]
    assert host.breaker.state == "closed" and host.breaker.failures == 0
    assert (host.requests, host.failures) == (0, 0)
    assert host.health is not None and host.health.counts == {"fail": 10}


def test_every_instance_ejected_panics_to_all_of_them(monotonic: FakeClock) -> None:
    rt = runtime(monotonic)
    for hid in "abc":
        probe(rt, hid, BAD, 2)
    assert rt.available == () and rt.panic
    assert set(picks(rt)) == {"a", "b", "c"}  # rather than 503 for everyone
    assert rt.panic_picks == 30
    probe(rt, "b", GOOD, 2)
    assert not rt.panic and set(picks(rt)) == {"b"}


def test_ejected_and_open_together_panic_too(monotonic: FakeClock) -> None:
    rt = runtime(monotonic, A, B, failures=1)
    probe(rt, "a", BAD, 2)
    rt.hosts["b"].on_failure(502)
    assert rt.hosts["b"].state == "open" and rt.panic
    assert rt.pick(()) is not None
    assert rt.has_untried(()) and rt.has_untried([rt.hosts["a"]])


def test_health_checks_turned_off_lift_every_ejection(monotonic: FakeClock) -> None:
    rt = runtime(monotonic)
    probe(rt, "a", BAD, 2)
    rt.clear_health()
    assert states(rt)["a"] == (HEALTHY, "") and rt.hosts["a"] in rt.available


def test_a_result_after_checks_were_turned_off_is_ignored(monotonic: FakeClock) -> None:
    rt = runtime(monotonic)
    rt.config = UpstreamConfig(name="web", listen=Address("127.0.0.1", 8081))
    probe(rt, "a", BAD, 5)
    assert rt.hosts["a"].health is None and rt.hosts["a"].state == HEALTHY


def test_ejection_and_return_are_logged(monotonic: FakeClock,
                                        caplog: pytest.LogCaptureFixture) -> None:
    rt = runtime(monotonic)
    with caplog.at_level(logging.INFO, logger="sdproxy.upstream"):
        probe(rt, "a", BAD, 2)
        probe(rt, "a", GOOD, 2)
    text = caplog.text
    assert 'event=health_ejected upstream=web instance=a reason="health: 500 on /health"' in text
    assert "event=health_restored upstream=web instance=a" in text


# -- operator drain ------------------------------------------------------------------------

def test_operator_drain_and_enable(monotonic: FakeClock) -> None:
    rt = runtime(monotonic)
    rt.hosts["a"].active = 2  # in flight: it finishes, nothing cuts it
    assert rt.set_operator_drain("a", True)
    assert states(rt)["a"] == (DRAINING, "operator")
    assert set(picks(rt)) == {"b", "c"}
    assert rt.hosts["a"].active == 2
    assert rt.set_operator_drain("a", False)
    assert states(rt)["a"] == (HEALTHY, "")
    assert set(picks(rt)) == {"a", "b", "c"}


def test_drain_of_an_unknown_id_is_refused(monotonic: FakeClock) -> None:
    rt = runtime(monotonic)
    assert not rt.set_operator_drain("zz", True)
    assert rt.operator_view.drained_ids == set()


def test_an_operator_drain_is_never_overridden_by_the_panic_rule(monotonic: FakeClock) -> None:
    rt = runtime(monotonic)
    for hid in "abc":
        rt.set_operator_drain(hid, True)
    assert rt.pick(()) is None and not rt.has_untried(())
    rt.set_operator_drain("c", False)
    probe(rt, "c", BAD, 2)  # the one left is ejected: panic, but only to c
    assert set(picks(rt)) == {"c"}


def test_a_drained_instance_stays_drained_when_it_comes_back_to_the_catalog(
        monotonic: FakeClock) -> None:
    rt = runtime(monotonic)
    rt.set_operator_drain("a", True)
    rt.on_catalog_answer(CatalogAnswer((B, C), 2))
    rt.on_catalog_answer(CatalogAnswer((A, B, C), 3))
    assert states(rt)["a"] == (DRAINING, "operator")
    assert "a" not in picks(rt)


def test_a_drained_instance_is_still_probed_and_shows_health_in_its_host(
        monotonic: FakeClock) -> None:
    rt = runtime(monotonic)
    rt.set_operator_drain("a", True)
    probe(rt, "a", BAD, 2)
    assert states(rt)["a"] == (DRAINING, "operator")  # the operator's word shows first
    rt.set_operator_drain("a", False)
    assert states(rt)["a"] == (EJECTED, "health: 500 on /health")  # enable is not a probe


# -- listing: removed, down ------------------------------------------------------------------

def test_removed_instances_say_so(monotonic: FakeClock) -> None:
    rt = runtime(monotonic)
    rt.hosts["c"].active = 1
    rt.on_catalog_answer(CatalogAnswer((A, B), 2))
    assert states(rt)["c"] == (DRAINING, "removed from the catalog")


def test_catalog_down_instances_are_listed_never_routed(monotonic: FakeClock) -> None:
    rt = runtime(monotonic, A, B)
    rt.on_catalog_down([(ep("x", 9, "critical"), "HTTP GET http://10.0.0.1:9/health: 500")])
    rows = rt.listing()
    assert [(r.endpoint.id, r.state) for r in rows] == [
        ("a", HEALTHY), ("b", HEALTHY), ("x", DOWN)]
    assert rows[-1].host is None and rows[-1].reason.endswith(": 500")
    assert "x" not in picks(rt)


def test_an_instance_turning_critical_with_work_in_flight_shows_once_as_down(
        monotonic: FakeClock) -> None:
    rt = runtime(monotonic, A, B)
    rt.hosts["b"].active = 1
    rt.on_catalog_down([(ep("b", 2, "critical"), "connection refused")])
    rt.on_catalog_answer(CatalogAnswer((A,), 2))
    rows = [r for r in rt.listing() if r.endpoint.id == "b"]
    assert [(r.state, r.reason) for r in rows] == [(DOWN, "connection refused")]
    assert rows[0].host is not None and rows[0].host.active == 1
    rt.release(rows[0].host)
    assert [(r.endpoint.id, r.host) for r in rt.listing()] == [("a", rt.hosts["a"]),
                                                               ("b", None)]


def test_a_down_instance_may_be_drained_before_it_returns(monotonic: FakeClock) -> None:
    rt = runtime(monotonic, A)
    rt.on_catalog_down([(ep("b", 2, "critical"), "maintenance")])
    assert rt.set_operator_drain("b", True)
    rt.on_catalog_down([])
    rt.on_catalog_answer(CatalogAnswer((A, B), 2))
    assert states(rt)["b"] == (DRAINING, "operator")


# -- breaker reasons ------------------------------------------------------------------------

def test_an_open_breaker_says_which_failure_opened_it_and_when(monotonic: FakeClock) -> None:
    rt = runtime(monotonic, A, B, failures=2)
    host: Host = rt.hosts["a"]
    host.on_failure()
    host.on_failure(503)
    state, reason = states(rt)["a"]
    assert state == "open"
    assert reason == ("breaker opened at 2023-11-14T22:13:20Z after 2 consecutive failures, "
                      "the last: HTTP 503")
    monotonic.advance(10.0)
    assert rt.pick([rt.hosts["b"]]) is host  # due: a trial
    state, reason = states(rt)["a"]
    assert state == "half_open" and reason.startswith("trial requests one at a time; breaker")
    host.on_failure(0, "timeout")
    assert states(rt)["a"][1].endswith("after the trial request failed: timeout")
