"""UpstreamRuntime's request side, with no sockets: `begin_attempt` / `end_attempt` /
`should_retry`, the one attempt bookkeeping and retry decision HTTP and TCP share, and the
snapshot they read (`routing_snapshot`).

Requests are driven the way protocols/http_exchange.py and protocols/tcp.py drive them:
begin an attempt, report its outcome to the host, end it, ask whether to retry.
"""

from __future__ import annotations

import ast
import random
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.fakes import FakeClock

from proxy.config import BreakerConfig, RetryBudgetConfig, UpstreamConfig
from proxy.l7 import exchange
from proxy.model import Address, CatalogAnswer, Endpoint
from proxy.outcomes import (
    ABORTED,
    BY_LABEL,
    BY_STATUS,
    CONNECT_FAILURE,
    DONE,
    LABELS,
    RESET,
    STATUS_502,
    STATUS_503,
    STATUS_504,
    TIMEOUT,
    mask_of,
)
from proxy.upstream.host import Host
from proxy.upstream.manager import Snapshot, UpstreamRuntime

PROXY = Path(__file__).resolve().parents[2] / "proxy"
FAILURES = (CONNECT_FAILURE, RESET, TIMEOUT, STATUS_502, STATUS_503, STATUS_504)


def make_runtime(n: int, *, retries: int = 2, failures: int = 1000,
                 budget: RetryBudgetConfig | None = None,
                 retry_on: tuple[str, ...] | None = None,
                 clock: FakeClock | None = None) -> UpstreamRuntime:
    cfg = UpstreamConfig(name="web", listen=Address("127.0.0.1", 1), retries=retries,
                         breaker=BreakerConfig(failures=failures, reset_timeout=10.0),
                         retry_budget=budget or RetryBudgetConfig())
    if retry_on is not None:
        cfg = replace(cfg, retry_on=retry_on)
    rt = UpstreamRuntime(cfg, monotonic=clock or FakeClock())
    rt.on_catalog_answer(CatalogAnswer(tuple(
        Endpoint(id=f"i{k}", address="127.0.0.1", port=9000 + k) for k in range(n))))
    return rt


def report(host: Host, outcome: int) -> None:
    """What the protocols tell the host of an attempt's outcome."""
    if outcome == DONE:
        host.on_success(200)
    elif outcome in BY_STATUS.values():
        host.on_failure(int(LABELS[outcome]))
    elif outcome != ABORTED:
        host.on_failure(what=LABELS[outcome])


def serve(rt: UpstreamRuntime, outcomes: list[int], method: bytes = b"GET",
          replayable: bool = True) -> list[Host]:
    """One request whose attempts end with `outcomes` in turn (DONE once they run out);
    returns the instances it tried."""
    tried: list[Host] = []
    for attempt in range(1, 100):  # bounded: retries end it long before
        host = rt.begin_attempt(tried)
        if host is None:
            break
        outcome = outcomes[attempt - 1] if attempt <= len(outcomes) else DONE
        report(host, outcome)
        rt.end_attempt(host, tried)
        if outcome in (DONE, ABORTED) or not rt.should_retry(outcome, method, replayable,
                                                              tried):
            break
    return tried


def assert_balanced(rt: UpstreamRuntime) -> None:
    assert rt.retries_in_flight == 0
    assert [h.active for h in rt.all_hosts()] == [0] * len(rt.all_hosts())


# -- outcomes ---------------------------------------------------------------------------


def test_outcome_labels_are_the_config_and_metric_names() -> None:
    from proxy.config import RETRY_ON

    assert {LABELS[code] for code in FAILURES} == set(RETRY_ON)
    assert all(BY_LABEL[LABELS[code]] == code for code in range(len(LABELS)))
    assert {LABELS[v]: k for k, v in BY_STATUS.items()} == {"502": 502, "503": 503,
                                                            "504": 504}
    # The labels the HTTP exchange still passes are the same names.
    assert (exchange.CONNECT_FAILURE, exchange.RESET, exchange.TIMEOUT) == (
        LABELS[CONNECT_FAILURE], LABELS[RESET], LABELS[TIMEOUT])
    assert mask_of(("reset", "503")) == (1 << RESET) | (1 << STATUS_503)


# -- never the same instance twice; counts balanced ------------------------------------


def test_a_request_never_tries_one_instance_twice_and_stops_when_none_is_left() -> None:
    rt = make_runtime(3, retries=5)
    tried = serve(rt, [RESET] * 10)
    assert len(tried) == 3 and len(set(tried)) == 3
    assert rt.failovers == {"reset": 2}  # two retries made; the third failure had none left
    assert rt.no_host_responses == 0
    assert_balanced(rt)


def test_retries_stop_at_the_configured_count() -> None:
    rt = make_runtime(5, retries=2)
    assert len(serve(rt, [CONNECT_FAILURE] * 10)) == 3
    assert rt.failovers == {"connect-failure": 2}
    assert sum(h.requests for h in rt.all_hosts()) == 3


def test_begin_attempt_counts_the_host_and_a_retry_until_end_attempt() -> None:
    rt = make_runtime(2)
    tried: list[Host] = []
    first = rt.begin_attempt(tried)
    assert first is not None and tried == [first]
    assert (first.active, first.requests, rt.retries_in_flight) == (1, 1, 0)
    rt.end_attempt(first, tried)
    second = rt.begin_attempt(tried)
    assert second is not None and second is not first and tried == [first, second]
    assert (second.active, rt.retries_in_flight) == (1, 1)
    rt.end_attempt(second, tried)
    assert_balanced(rt)


def test_a_relayed_tcp_connection_holds_its_host_after_its_attempt_ends() -> None:
    rt = make_runtime(2)
    tried: list[Host] = []
    first = rt.begin_attempt(tried)
    assert first is not None
    rt.end_attempt(first, tried)  # a failed connect
    second = rt.begin_attempt(tried)
    assert second is not None
    rt.end_attempt(second, tried, holds_host=True)  # connected: the relay starts
    assert rt.retries_in_flight == 0 and second.active == 1
    rt.release(second)  # the relay ended
    assert_balanced(rt)


def test_no_instance_is_counted_once_per_request_that_found_none() -> None:
    rt = make_runtime(0)
    assert serve(rt, []) == [] and rt.no_host_responses == 1
    assert_balanced(rt)


# An interleaving of concurrent requests: (which request steps, the outcome if it ends an
# attempt). Each request is a list of outcomes for its attempts.
request_plans = st.lists(st.lists(st.sampled_from((DONE, ABORTED, *FAILURES)), max_size=6),
                         min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(plans=request_plans, n_hosts=st.integers(0, 4), retries=st.integers(0, 4),
       seed=st.integers(0, 2**16), idempotent=st.booleans(), min_concurrency=st.integers(0, 3))
def test_counts_balance_after_any_mix_of_outcomes_and_interleavings(
        plans: list[list[int]], n_hosts: int, retries: int, seed: int, idempotent: bool,
        min_concurrency: int) -> None:
    rt = make_runtime(n_hosts, retries=retries, failures=2,
                      budget=RetryBudgetConfig(percent=20.0, min_concurrency=min_concurrency))
    method = b"GET" if idempotent else b"POST"
    rng = random.Random(seed)
    # Each request: its tried list, its current host (None between attempts), its plan.
    live = [([], None, list(plan)) for plan in plans]
    attempts = 0
    started = 0
    rt.in_flight = len(live)
    for _ in range(1000):  # bounded: every step ends or begins an attempt
        if not live:
            break
        i = rng.randrange(len(live))
        tried, host, plan = live[i]
        if host is None:
            host = rt.begin_attempt(tried)
            if host is None:
                live.pop(i)
                continue
            attempts += 1
            started += len(tried) == 1
            assert len(set(tried)) == len(tried), "an instance tried twice"
            assert len(tried) <= retries + 1
            live[i] = (tried, host, plan)
            continue
        outcome = plan.pop(0) if plan else DONE
        report(host, outcome)
        rt.end_attempt(host, tried)
        live[i] = (tried, None, plan)
        if outcome in (DONE, ABORTED) or not rt.should_retry(outcome, method, True, tried):
            live.pop(i)
    assert not live
    assert_balanced(rt)
    assert sum(h.requests for h in rt.all_hosts()) == attempts
    # Every attempt after a request's first was a retry should_retry said yes to, counted
    # once; a yes whose begin_attempt then found no instance shows as a no-instance.
    assert sum(rt.failovers.values()) == attempts - started + (
        rt.no_host_responses - (len(plans) - started))


# -- the decision -----------------------------------------------------------------------


@pytest.mark.parametrize("outcome, method, replayable, retried", [
    (CONNECT_FAILURE, b"POST", False, True),  # nothing was sent: any method
    (CONNECT_FAILURE, b"", True, True),  # TCP mode's one retryable outcome
    (RESET, b"GET", True, True),
    (RESET, b"POST", True, False),  # not idempotent
    (RESET, b"GET", False, False),  # the body was streamed past the replay limit
    (TIMEOUT, b"PUT", True, True),
    (STATUS_503, b"DELETE", True, True),
    (STATUS_503, b"PATCH", True, False),
    (RESET, b"", True, False),  # TCP mode: after the connect nothing is retried
])
def test_the_retry_rules(outcome: int, method: bytes, replayable: bool,
                         retried: bool) -> None:
    rt = make_runtime(3)
    tried = serve(rt, [DONE])
    assert rt.should_retry(outcome, method, replayable, tried) is retried
    assert rt.failovers == ({LABELS[outcome]: 1} if retried else {})


def test_tcp_and_http_get_the_same_answer_for_a_failed_connect() -> None:
    """TCP asks with method b"" and replayable True; HTTP with the request's: a failed
    connect is decided alike, by the same retries, retry_on and instances left."""
    for retry_on, n_hosts, retries in [(None, 3, 2), (None, 1, 2), (None, 3, 0),
                                       (("reset",), 3, 2)]:
        answers = set()
        for method in (b"", b"GET", b"POST"):
            rt = make_runtime(n_hosts, retries=retries, retry_on=retry_on)
            answers.add(len(serve(rt, [CONNECT_FAILURE] * 5, method=method)))
        assert len(answers) == 1, (retry_on, n_hosts, retries, answers)


def test_retry_on_follows_a_reload_of_the_config() -> None:
    rt = make_runtime(3)
    tried = serve(rt, [DONE])
    assert rt.should_retry(RESET, b"GET", True, tried)
    rt.config = replace(rt.config, retry_on=("connect-failure",))
    assert not rt.should_retry(RESET, b"GET", True, tried)
    assert rt.should_retry(CONNECT_FAILURE, b"GET", True, tried)


def test_no_failover_is_counted_when_no_instance_is_left() -> None:
    rt = make_runtime(2, retries=5)
    tried = serve(rt, [RESET, RESET])
    assert len(tried) == 2 and rt.failovers == {"reset": 1}
    assert not rt.should_retry(RESET, b"GET", True, tried)
    assert rt.failovers == {"reset": 1} and rt.budget_exhausted == 0


# -- the retry budget -------------------------------------------------------------------


def test_the_retry_budget_bounds_retries_in_flight_but_never_a_failed_connect() -> None:
    rt = make_runtime(8, retries=3, budget=RetryBudgetConfig(percent=20.0,
                                                             min_concurrency=2))
    rt.in_flight = 5  # 20 % of 5 is 1: the floor of 2 applies
    held: list[tuple[Host, list[Host]]] = []
    for _ in range(2):  # two requests each retrying, their retries still in flight
        tried: list[Host] = []
        first = rt.begin_attempt(tried)
        assert first is not None
        rt.end_attempt(first, tried)
        assert rt.should_retry(RESET, b"GET", True, tried)
        retry = rt.begin_attempt(tried)
        assert retry is not None
        held.append((retry, tried))
    assert rt.retries_in_flight == 2
    tried = serve(rt, [DONE])
    assert not rt.should_retry(RESET, b"GET", True, tried)
    assert not rt.should_retry(STATUS_503, b"GET", True, tried)
    assert rt.budget_exhausted == 2 and rt.failovers == {"reset": 2}
    assert rt.should_retry(CONNECT_FAILURE, b"GET", True, tried)  # reached no instance
    assert rt.budget_exhausted == 2
    for host, its_tried in held:
        rt.end_attempt(host, its_tried)
    assert rt.should_retry(RESET, b"GET", True, tried)  # room again
    assert_balanced(rt)


# -- the snapshot and the panic rule -----------------------------------------------------


def test_every_state_change_publishes_one_new_consistent_snapshot() -> None:
    rt = make_runtime(3, failures=1)
    before = rt.current
    host = rt.hosts["i0"]
    host.on_failure()  # the breaker opens: the listener republishes
    after = rt.current
    assert after is not before and isinstance(after, Snapshot)
    assert after.hosts == before.hosts and host not in after.available
    assert after.next_trial_at == host.breaker.opened_at + 10.0
    assert before.available == before.hosts, "a published snapshot is never changed"
    assert rt.available is after.available and not rt.panic


def test_panic_rule_picks_trials_when_no_instance_is_closed_but_never_a_drained_one() -> None:
    rt = make_runtime(2, failures=1)
    for host in rt.hosts.values():
        host.on_failure()
    assert rt.current.available == () and rt.panic
    tried = serve(rt, [RESET])
    assert len(tried) == 2 and rt.panic_picks == 2  # both tried, as trials
    assert_balanced(rt)
    rt.set_operator_drain("i0", True)
    rt.set_operator_drain("i1", True)
    assert not rt.panic and rt.begin_attempt([]) is None
    assert rt.no_host_responses == 1


def test_a_due_trial_is_found_on_the_runtime_clock() -> None:
    clock = FakeClock(100.0)
    rt = make_runtime(2, failures=1, clock=clock)
    rt.hosts["i0"].on_failure()
    assert {h.id for h in serve(rt, [DONE])} == {"i1"}
    clock.advance(10.0)  # reset_timeout: i0's breaker may try again
    picked = {rt.begin_attempt([]) for _ in range(2)}  # i0's trial, then i1 (trial taken)
    assert {h.id for h in picked if h is not None} == {"i0", "i1"}
    assert rt.hosts["i0"].state == "half_open"


# -- the protocols keep no attempt bookkeeping of their own ------------------------------


@pytest.mark.parametrize("module", ["protocols/tcp.py", "protocols/http_exchange.py"])
def test_protocols_leave_attempt_counting_and_retry_decisions_to_the_runtime(
        module: str) -> None:
    tree = ast.parse((PROXY / module).read_text())
    own_counts = [node.target.attr for node in ast.walk(tree)
                  if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Attribute)
                  and node.target.attr in ("active", "requests", "retries_in_flight",
                                           "no_host_responses")]
    calls = {node.func.attr for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert own_counts == []
    assert not calls & {"pick", "has_untried", "retry_allowed", "count_failover"}
    assert "may_retry" not in names | calls
    assert {"begin_attempt", "end_attempt", "should_retry"} <= calls
