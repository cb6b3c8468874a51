"""Breaker rules per instance, driven through the pool as requests drive them.

Time is a fake monotonic clock: open -> half-open is stepped, never slept.
"""

from __future__ import annotations

import pytest
from support.fakes import FakeClock

from proxy.config import BreakerConfig, RetryBudgetConfig, UpstreamConfig
from proxy.model import Address, CatalogAnswer, Endpoint
from proxy.outcomes import CONNECT_FAILURE, RESET, STATUS_503, TIMEOUT
from proxy.upstream.manager import UpstreamRuntime


def make_runtime(n: int, *, failures: int = 3, reset: float = 10.0,
                 budget: RetryBudgetConfig | None = None) -> tuple[UpstreamRuntime, FakeClock]:
    clock = FakeClock()
    cfg = UpstreamConfig(name="web", listen=Address("127.0.0.1", 1),
                         breaker=BreakerConfig(failures=failures, reset_timeout=reset),
                         retry_budget=budget or RetryBudgetConfig())
    rt = UpstreamRuntime(cfg, monotonic=clock)
    rt.on_catalog_answer(CatalogAnswer(tuple(
        Endpoint(id=f"i{k}", address="127.0.0.1", port=9000 + k) for k in range(n))))
    return rt, clock


def fail(rt: UpstreamRuntime, host_id: str, times: int) -> None:
    for _ in range(times):
        rt.hosts[host_id].on_failure()


def test_consecutive_failures_open_the_breaker_and_remove_the_host_from_picks() -> None:
    rt, _ = make_runtime(2, failures=3)
    fail(rt, "i0", 2)
    assert rt.hosts["i0"].state == "healthy"
    fail(rt, "i0", 1)
    assert rt.hosts["i0"].state == "open"
    picks = {rt.pick(()).id for _ in range(10)}  # type: ignore[union-attr]
    assert picks == {"i1"}  # works in a pool of two: the other instance takes everything
    assert rt.breaker_transitions == {"open": 1}


def test_a_success_resets_the_consecutive_count() -> None:
    rt, _ = make_runtime(1, failures=3)
    fail(rt, "i0", 2)
    rt.hosts["i0"].on_success(200)
    fail(rt, "i0", 2)
    assert rt.hosts["i0"].state == "healthy"


def test_open_becomes_half_open_after_reset_timeout_with_one_trial_at_a_time() -> None:
    rt, clock = make_runtime(2, failures=1, reset=10.0)
    fail(rt, "i0", 1)
    clock.now += 9.9
    assert all(rt.pick(()).id == "i1" for _ in range(4))  # type: ignore[union-attr]
    clock.now += 0.2
    trial = [rt.pick(()) for _ in range(4)]
    ids = [h.id for h in trial if h is not None]
    assert ids.count("i0") == 1, ids  # exactly one trial while it is in flight
    assert rt.hosts["i0"].state == "half_open"


@pytest.mark.parametrize("trial_succeeds, final", [(True, "healthy"), (False, "open")])
def test_the_trial_outcome_closes_or_reopens(trial_succeeds: bool, final: str) -> None:
    rt, clock = make_runtime(2, failures=1, reset=5.0)
    fail(rt, "i0", 1)
    clock.now += 5.0
    while (host := rt.pick(())) is not None and host.id != "i0":
        pass
    assert host is not None and host.id == "i0"
    if trial_succeeds:
        host.on_success(200)
    else:
        host.on_failure()
    assert host.state == final
    if not trial_succeeds:  # re-opened: it waits a whole reset_timeout again
        assert all(rt.pick(()).id == "i1" for _ in range(4))  # type: ignore[union-attr]


def test_panic_rule_lets_trials_through_when_every_breaker_is_open() -> None:
    rt, _ = make_runtime(2, failures=1, reset=60.0)
    fail(rt, "i0", 1)
    fail(rt, "i1", 1)
    host = rt.pick(())
    assert host is not None
    assert rt.panic_picks == 1
    assert host.state == "half_open"  # the pick is a trial: its outcome decides
    host.on_success(200)
    assert host.state == "healthy"


def test_no_panic_while_a_closed_host_exists_even_if_already_tried() -> None:
    rt, _ = make_runtime(2, failures=1)
    fail(rt, "i0", 1)
    assert rt.pick((rt.hosts["i1"],)) is None
    assert rt.panic_picks == 0


def test_breaker_state_survives_a_catalog_refresh() -> None:
    rt, _ = make_runtime(2, failures=1)
    fail(rt, "i0", 1)
    rt.on_catalog_answer(CatalogAnswer((
        Endpoint(id="i0", address="127.0.0.1", port=9000),
        Endpoint(id="i1", address="127.0.0.1", port=9001),
        Endpoint(id="i2", address="127.0.0.1", port=9002))))
    assert rt.hosts["i0"].state == "open"
    assert {h.id for h in rt.available} == {"i1", "i2"}


@pytest.mark.parametrize("in_flight, retries_in_flight, allowed", [
    (0, 0, True), (0, 2, True), (0, 3, False),  # the floor: min_concurrency = 3
    (100, 19, True), (100, 20, False),  # 20 % of requests in flight
])
def test_retry_budget(in_flight: int, retries_in_flight: int, allowed: bool) -> None:
    rt, _ = make_runtime(1, budget=RetryBudgetConfig(percent=20.0, min_concurrency=3))
    rt.in_flight = in_flight
    rt.retries_in_flight = retries_in_flight
    assert rt.retry_allowed(RESET) is allowed
    assert rt.budget_exhausted == (0 if allowed else 1)


@pytest.mark.parametrize("kind", [RESET, TIMEOUT, STATUS_503])
def test_retry_budget_applies_to_work_an_instance_may_have_done(kind: int) -> None:
    rt, _ = make_runtime(1, budget=RetryBudgetConfig(percent=20.0, min_concurrency=3))
    rt.retries_in_flight = 3
    assert not rt.retry_allowed(kind)


def test_a_failed_connect_is_retried_whatever_the_budget() -> None:
    """Its request reached no instance: the retry adds no work, and refusing it would
    fail requests just when an instance dies under load."""
    rt, _ = make_runtime(1, budget=RetryBudgetConfig(percent=20.0, min_concurrency=3))
    rt.retries_in_flight = 50
    assert rt.retry_allowed(CONNECT_FAILURE)
    assert rt.budget_exhausted == 0
