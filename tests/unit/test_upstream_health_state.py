"""proxy.upstream.health_state: fall/rise counting, what a probe's answer means, and the
probe schedule (first probe within an interval, +-10 % jitter, one probe at a time), on
a fake clock and a seeded rng."""

from __future__ import annotations

import random

import pytest

from proxy.upstream.health_state import (
    CONNECTED,
    EJECTED,
    ERROR,
    FAIL,
    PASS,
    RESTORED,
    TIMEOUT,
    HealthState,
    ProbeResult,
    ProbeSchedule,
    StatusExpectation,
    error_result,
    http_result,
    parse_status_line,
    timeout_result,
)

GOOD = ProbeResult(PASS, "200 on /health")
BAD = ProbeResult(FAIL, "500 on /health")
SLOW = timeout_result(1.0)


def run(results: list[ProbeResult], fall: int = 3, rise: int = 2
        ) -> tuple[HealthState, list[str | None]]:
    state = HealthState()
    changes = [state.record(r, fall=fall, rise=rise, now=float(i))
               for i, r in enumerate(results)]
    return state, changes


# -- fall and rise --------------------------------------------------------------------------

def test_a_new_instance_is_in_the_pool() -> None:
    state = HealthState()
    assert (state.ejected, state.reason, state.last) == (False, "", "")


def test_fall_consecutive_failures_eject_with_the_failed_probe_as_reason() -> None:
    state, changes = run([BAD, BAD, BAD])
    assert changes == [None, None, EJECTED]
    assert state.ejected and state.reason == "health: 500 on /health"


def test_a_good_probe_in_between_resets_the_failures() -> None:
    state, changes = run([BAD, BAD, GOOD, BAD, BAD])
    assert changes == [None] * 5 and not state.ejected
    state, changes = run([BAD, BAD, GOOD, BAD, BAD, BAD])
    assert changes[-1] == EJECTED


def test_rise_consecutive_good_probes_bring_it_back() -> None:
    state, changes = run([BAD, BAD, BAD, GOOD, BAD, GOOD, GOOD])
    assert changes == [None, None, EJECTED, None, None, None, RESTORED]
    assert (state.ejected, state.reason, state.last) == (False, "", "200 on /health")


def test_while_ejected_the_reason_is_the_latest_failure() -> None:
    state, _ = run([BAD, BAD, BAD, SLOW])
    assert state.ejected and state.reason == "health: timeout 1s"


@pytest.mark.parametrize(("fall", "rise"), [(1, 1), (2, 5), (5, 1)])
def test_fall_and_rise_are_the_counts_given(fall: int, rise: int) -> None:
    _, changes = run([BAD] * fall + [GOOD] * rise, fall=fall, rise=rise)
    assert changes.index(EJECTED) == fall - 1
    assert changes.index(RESTORED) == fall + rise - 1
    assert changes.count(EJECTED) == changes.count(RESTORED) == 1


def test_good_probes_of_a_healthy_instance_change_nothing() -> None:
    state, changes = run([GOOD] * 10)
    assert changes == [None] * 10 and state.good == 10 and state.checked_at == 9.0


# -- what a probe's answer means --------------------------------------------------------------

@pytest.mark.parametrize(("expect", "passing", "failing"), [
    (("2xx",), [200, 204, 299], [199, 301, 404, 500]),
    (("2xx", "3xx", "404"), [200, 302, 404], [403, 405, 500]),
    (("503",), [503], [200, 500]),
])
def test_status_expectation(expect: tuple[str, ...], passing: list[int],
                            failing: list[int]) -> None:
    matches = StatusExpectation(expect)
    assert all(matches(s) for s in passing)
    assert not any(matches(s) for s in failing)


def test_results_and_their_reasons() -> None:
    assert http_result(200, "/h", StatusExpectation(("2xx",))) == (PASS, "200 on /h")
    fail = http_result(500, "/health", StatusExpectation(("2xx",)))
    assert fail.kind == FAIL and fail.reason == "health: 500 on /health"
    assert timeout_result(0.25).reason == "health: timeout 0.25s"
    assert error_result("connection refused") == (ERROR, "connection refused")
    assert CONNECTED.passed and not SLOW.passed and SLOW.kind == TIMEOUT


@pytest.mark.parametrize(("line", "status"), [
    (b"HTTP/1.1 200 OK\r\n", 200), (b"HTTP/1.0 503 Service Unavailable\r\n", 503),
    (b"HTTP/1.1 404\r\n", 404), (b"HTTP/1.1 204 No Content\n", 204),
    (b"HTTP/2 200\r\n", None), (b"SSH-2.0-OpenSSH\r\n", None), (b"HTTP/1.1 2000 x\r\n", None),
    (b"HTTP/1.1 600 x\r\n", None), (b"", None), (b"hello", None),
])
def test_parse_status_line(line: bytes, status: int | None) -> None:
    assert parse_status_line(line) == status


# -- the schedule ---------------------------------------------------------------------------

def test_first_probes_spread_over_the_first_interval() -> None:
    schedule: ProbeSchedule[str] = ProbeSchedule(2.0, random.Random(1))
    members = [f"i{n}" for n in range(200)]
    schedule.sync(members, now=100.0)
    firsts = sorted(schedule.due.values())
    assert 100.0 <= firsts[0] and firsts[-1] <= 102.0
    # Spread, not bunched: every quarter of the interval holds some first probes.
    assert all(any(100 + q / 2 <= t < 100 + (q + 1) / 2 for t in firsts) for q in range(4))


def test_each_next_probe_is_an_interval_within_ten_percent_after_the_last_ended() -> None:
    schedule: ProbeSchedule[str] = ProbeSchedule(1.0, random.Random(2))
    schedule.sync(["a"], now=0.0)
    now, gaps = 0.0, []
    for _ in range(300):
        due = schedule.next_due()
        assert due is not None
        now = due
        assert schedule.take_due(now) == ["a"]
        assert schedule.next_due() is None  # one probe at a time
        ended = now + 0.05  # the probe took 50 ms
        schedule.finished("a", ended)
        gaps.append(schedule.due["a"] - ended)
    assert 0.9 <= min(gaps) < 0.92 and 1.08 < max(gaps) <= 1.1  # the whole +-10 % is used
    assert len({round(g, 6) for g in gaps}) > 250  # not one fixed period


def test_take_due_returns_only_what_is_due() -> None:
    schedule: ProbeSchedule[str] = ProbeSchedule(1.0, random.Random(3))
    schedule.sync(["a", "b", "c"], now=0.0)
    order = sorted(schedule.due, key=schedule.due.__getitem__)
    first = schedule.due[order[0]]
    assert schedule.take_due(first - 1e-9) == []
    assert schedule.take_due(first) == [order[0]]
    assert sorted(schedule.take_due(1.0)) == sorted(order[1:])
    assert schedule.running == {"a", "b", "c"} and schedule.next_due() is None


def test_leavers_are_not_probed_and_their_late_results_plan_nothing() -> None:
    schedule: ProbeSchedule[str] = ProbeSchedule(1.0, random.Random(4))
    schedule.sync(["a", "b"], now=0.0)
    assert sorted(schedule.take_due(1.0)) == ["a", "b"]
    schedule.sync(["b", "c"], now=1.0)  # a left while being probed
    schedule.finished("a", 1.1)
    schedule.finished("b", 1.1)
    assert set(schedule.due) == {"b", "c"} and len(schedule) == 2
    schedule.sync(["c"], now=1.2)  # b left while waiting
    assert schedule.take_due(10.0) == ["c"]


def test_stale_heap_entries_are_dropped() -> None:
    schedule: ProbeSchedule[int] = ProbeSchedule(1.0, random.Random(5))
    for round_ in range(50):  # a churning pool: 100 members come and go each time
        schedule.sync(range(round_ * 100, round_ * 100 + 100), now=float(round_))
    assert len(schedule.due) == 100
    assert len(schedule._heap) <= 2 * 100 + 64 + 100
