"""The routes and tagroutes load tests' pure parts: the plan (placement, which services
change, the request cycle), how each request is judged by its route class, the report
and its verdict line; and the many-ports backend they run on, as a real process."""

from __future__ import annotations

import sys
import urllib.request

import pytest

from loadtest.load import Sample
from loadtest.portsbackend import READY_EVENT, parse_ports
from loadtest.procs import Child
from loadtest.scenarios import routes as r
from loadtest.scenarios import tagroutes as tr


# -- the plan ------------------------------------------------------------------------------
@pytest.mark.parametrize(("count", "processes"), [(50, 6), (50, 8), (9, 6), (200, 10)])
def test_every_service_keeps_an_instance_outside_the_killed_processes(
        count: int, processes: int) -> None:
    plan = r.make_plan(count, processes)
    killed = set(plan.killed)
    assert len(killed) == 2
    for service in [*plan.services, plan.added]:
        places = [p for _, p in service.instances]
        assert len(places) == len(set(places)) in (2, 3)  # one instance per process
        assert set(places) - killed, service
    for changed in (plan.moved, plan.removed, plan.added):
        assert not changed.processes() & killed  # a changed route measures one thing


def test_plan_names_routes_hosts_and_the_changes() -> None:
    plan = r.make_plan(50, 6)
    names = [s.name for s in plan.services]
    assert names[:3] == ["svc00", "svc01", "svc02"] and len(set(names)) == 50
    by_name = {s.name: s for s in plan.services}
    assert by_name["svc02"].route == "svc02.example/svc02/"
    assert (by_name["svc02"].host, by_name["svc02"].path) == ("svc02.example", "/svc02/")
    assert (by_name["svc03"].host, by_name["svc03"].path) == ("", "/svc03/")
    assert plan.added.name == "svc50" and plan.added.route == "/svc50/"
    assert plan.moved_route.endswith(f"/{plan.moved.name}-moved/")
    assert plan.moved is not plan.removed


def test_targets_give_every_route_one_class_and_the_moved_service_two_routes() -> None:
    plan = r.make_plan(50, 6)
    targets = plan.targets()
    assert len(targets) == 52
    kinds = {t.kind for t in targets}
    assert kinds == set(r.CLASSES)
    moved = [t for t in targets if t.service == plan.moved.name]
    assert {t.kind for t in moved} == {r.MOVED_OLD, r.MOVED_NEW}
    lost = [t for t in targets if t.kind == r.LOST]
    untouched = [t for t in targets if t.kind == r.UNTOUCHED]
    assert len(lost) + len(untouched) == 48


def test_cycle_sends_every_third_request_to_a_changed_route() -> None:
    plan = r.make_plan(50, 6)
    cycle = plan.cycle()
    assert set(cycle) == set(plan.targets())
    changed = [t for t in cycle if t.kind in (r.MOVED_OLD, r.MOVED_NEW, r.REMOVED, r.ADDED)]
    assert len(cycle) == 52 + 26  # every route, and one of the 4 changed every 2 routes
    assert len(changed) == 4 + 26
    # Each changed route about as often as the others (26 extra turns over 4 routes).
    assert sorted(changed.count(t) for t in set(changed)) == [7, 7, 8, 8]


def test_target_of_follows_paced_loads_schedule() -> None:
    cycle = r.make_plan(10, 6).cycle()
    rate = 300.0
    t0 = 1234.5678  # paced_load: due = t0 + i / rate, sample t = due - t0
    for i in range(3 * len(cycle)):
        t = (t0 + i / rate) - t0
        assert r.target_of(cycle, t, rate) is cycle[i % len(cycle)]


def test_make_plan_refuses_what_cannot_keep_a_live_instance() -> None:
    with pytest.raises(ValueError):
        r.make_plan(50, 5)  # odd: the two victims would not be half the ring apart
    with pytest.raises(ValueError):
        r.make_plan(50, 4)  # every service would have an instance on a victim
    with pytest.raises(ValueError):
        r.make_plan(3, 6)


# -- judging one request --------------------------------------------------------------------
def sample(t: float, outcome: str = "ok", backend: str = "", latency: float = 0.002,
           lag: float = 0.0) -> Sample:
    return Sample(t, latency, outcome, backend, lag)


CHANGES = r.Changes(moved=10.0, removed=20.0, added=30.0)
OLD = r.Target("svc01", "", "/svc01/", r.MOVED_OLD)
NEW = r.Target("svc01", "", "/svc01-moved/", r.MOVED_NEW)
GONE = r.Target("svc04", "", "/svc04/", r.REMOVED)
ADDED = r.Target("svc50", "", "/svc50/", r.ADDED)
PLAIN = r.Target("svc07", "svc07.example", "/svc07/", r.LOST)


def test_a_2xx_from_the_routes_own_service_is_ok_from_another_misrouted() -> None:
    assert r.judge(sample(1, backend="svc07-2"), PLAIN, CHANGES, None) == r.OK
    assert r.judge(sample(1, backend="svc08-0"), PLAIN, CHANGES, None) == r.MISROUTED
    assert r.judge(sample(1, backend="svc01-0"), NEW, CHANGES, 11.0) == r.OK


@pytest.mark.parametrize("outcome", ["http 404", "http 503", "http 502", "reset", "timeout"])
def test_any_failure_on_a_route_that_did_not_change_is_a_failure(outcome: str) -> None:
    assert r.judge(sample(15, outcome), PLAIN, CHANGES, None) == r.FAILED


def test_a_404_on_a_route_taken_away_is_expected_only_once_its_change_began() -> None:
    for target, start in ((OLD, 10.0), (GONE, 20.0)):
        assert r.judge(sample(start + 0.01, "http 404"), target, CHANGES, None) == r.GONE
        assert r.judge(sample(start - 0.01, "http 404"), target, CHANGES, None) == r.FAILED
        # Scheduled before the change but sent after it began (generator lag): expected.
        late = sample(start - 0.001, "http 404", lag=0.002)
        assert r.judge(late, target, CHANGES, None) == r.GONE
        assert r.judge(sample(start + 1, "http 503"), target, CHANGES, None) == r.FAILED
    assert r.judge(sample(15, "http 404"), GONE, r.Changes(), None) == r.FAILED  # no change


def test_a_404_on_a_new_route_is_expected_until_its_first_2xx_came_back() -> None:
    for target in (NEW, ADDED):
        assert r.judge(sample(1, "http 404"), target, CHANGES, 30.05) == r.NOT_YET
        assert r.judge(sample(30.04, "http 404"), target, CHANGES, 30.05) == r.NOT_YET
        # Sent once a 2xx had come back on that route: the table flapped.
        assert r.judge(sample(30.06, "http 404"), target, CHANGES, 30.05) == r.FAILED
        # Never served: every 404 is "not yet", and the report's verdict fails instead.
        assert r.judge(sample(50, "http 404"), target, CHANGES, None) == r.NOT_YET
        assert r.judge(sample(1, "reset"), target, CHANGES, None) == r.FAILED


# -- the report ---------------------------------------------------------------------------
def run_of(outcomes: dict[r.Target, list[tuple[float, str, str]]]
           ) -> tuple[list[Sample], list[r.Target], float]:
    """Samples as paced_load would record them for a cycle of these targets at 10/s:
    request i at i/10 to cycle[i % len]; `outcomes` gives (t, outcome, backend) in turn."""
    cycle = list(outcomes)
    rate = 10.0
    samples = []
    for k, target in enumerate(cycle):
        for n, (t, outcome, backend) in enumerate(outcomes[target]):
            i = round(t * rate)
            assert i % len(cycle) == k, (t, target)  # the test's own schedule is right
            samples.append(sample(i / rate, outcome, backend, latency=0.01 * (n + 1)))
    return samples, cycle, rate


def test_report_tallies_each_class_and_times_the_switches() -> None:
    # 5 targets, each asked every 0.5 s; changes at 10 (move), 20 (remove), 30 (add).
    samples, cycle, rate = run_of({
        PLAIN: [(0.0, "ok", "svc07-0"), (10.0, "ok", "svc07-1"), (20.0, "http 503", "")],
        OLD: [(0.1, "ok", "svc01-0"), (9.6, "ok", "svc01-1"), (10.1, "ok", "svc01-0"),
              (10.6, "http 404", "")],
        NEW: [(0.2, "http 404", ""), (10.2, "http 404", ""), (10.7, "ok", "svc01-1"),
              (11.2, "ok", "svc01-0")],
        GONE: [(19.8, "ok", "svc04-0"), (20.3, "http 404", ""), (20.8, "http 404", "")],
        ADDED: [(0.4, "http 404", ""), (30.4, "ok", "svc50-0"), (30.9, "ok", "svc99-0")],
    })
    report = r.build_report(samples, cycle, rate, CHANGES)
    t = report.tallies
    assert (t[r.LOST].requests, t[r.LOST].failed) == (3, 1)
    assert t[r.LOST].failures == {"http 503": 1}
    assert t[r.MOVED_OLD].verdicts == {r.OK: 3, r.GONE: 1}
    assert t[r.MOVED_NEW].verdicts == {r.NOT_YET: 2, r.OK: 2}
    assert t[r.REMOVED].verdicts == {r.OK: 1, r.GONE: 2}
    assert t[r.ADDED].verdicts == {r.NOT_YET: 1, r.OK: 1, r.MISROUTED: 1}
    assert t[r.ADDED].failures == {"200 from svc99-0": 1}
    assert t[r.UNTOUCHED].requests == 0
    assert report.failed == 2 and report.requests == 17
    assert len(report.counted) == 17 - 6  # the plot leaves the expected 404s out
    assert all(a.t <= b.t for a, b in zip(report.counted, report.counted[1:]))
    assert report.expected(r.GONE) == 3 and report.expected(r.NOT_YET) == 3
    switches = {kind: took for kind, _, took in report.switch_times()}
    assert switches[r.MOVED_NEW] == pytest.approx(10.7 + 0.03 - 10.0)
    assert switches[r.MOVED_OLD] == pytest.approx(10.6 + 0.04 - 10.0)
    assert switches[r.REMOVED] == pytest.approx(20.3 + 0.02 - 20.0)
    assert switches[r.ADDED] == pytest.approx(30.4 + 0.02 - 30.0)
    assert [(round(at, 3), route, outcome) for at, route, outcome, _ in report.errors] == [
        (20.0, "svc07.example/svc07/", "http 503"), (30.9, "/svc50/", "200 from svc99-0")]
    assert not report.passed
    line = report.verdict_line()
    assert line.startswith("verdict: FAIL: 2 failed requests on routes whose service had a "
                           "passing instance, of 11 (expected 404s apart: 3 on removed/moved "
                           "routes, 3 before new routes were routable)")
    table = r.report_table(report)
    assert "lost instances (kill -9)" in table and "total" in table


def test_a_clean_run_passes_and_a_new_route_never_served_fails() -> None:
    samples, cycle, rate = run_of({
        PLAIN: [(0.0, "ok", "svc07-0"), (31.0, "ok", "svc07-1")],
        ADDED: [(0.1, "http 404", ""), (30.1, "http 404", ""), (31.1, "ok", "svc50-1")],
    })
    only_added = r.Changes(added=30.0)
    report = r.build_report(samples, cycle, rate, only_added)
    assert report.passed
    assert report.verdict_line() == (
        "verdict: PASS: 0 failed requests on routes whose service had a passing instance, "
        "of 3 (expected 404s apart: 0 on removed/moved routes, 2 before new routes were "
        "routable)")
    never = r.build_report([s for s in samples if s.ok is False or s.backend == "svc07-0"],
                           cycle, rate, only_added)
    assert never.failed == 0 and never.never_served() == [r.ADDED]
    assert not never.passed and never.verdict_line().endswith("; never served: added")
    # Before the change happened nothing is owed: a run cut short does not fail on it.
    assert r.build_report(samples[:1], cycle, rate, r.Changes()).passed


def test_failovers_are_summed_by_reason_over_every_upstream() -> None:
    text = ('sdproxy_failovers_total{upstream="svc01",reason="connect-failure"} 3\n'
            'sdproxy_failovers_total{upstream="svc02",reason="connect-failure"} 2\n'
            'sdproxy_failovers_total{upstream="svc02",reason="reset"} 1\n'
            'sdproxy_failovers_total{upstream="svc03",reason="timeout"} 0\n')
    assert r.failovers_by_reason(text) == "connect-failure x5, reset x1"
    assert r.failovers_by_reason("") == "none"


# -- tagroutes ----------------------------------------------------------------------------
def test_tagroutes_stats_verdict_and_sizes() -> None:
    delays: list[float | None] = [0.010, 0.020, None, 0.030]
    assert tr.delay_stats(delays) == ["3/4", "20.0 ms", "30.0 ms", "30.0 ms"]
    assert tr.delay_stats([None]) == ["0/1", "-", "-", "-"]
    fast = tr.SizeResult(10, 42.0, 11, [0.01] * 99 + [0.09], [0.01])
    assert tr.met(fast)
    assert not tr.met(tr.SizeResult(10, 42.0, 11, [0.01] * 98 + [0.2, 0.2], [0.01]))
    assert not tr.met(tr.SizeResult(10, 42.0, 11, [0.01, None], [0.01]))  # one missed
    table = tr.report_table([fast], base_rss=40.0)
    assert "+2.0 MiB" in table and "42.0 MiB" in table
    delays_text = tr.delay_table([fast])
    routed_row = next(line for line in delays_text.splitlines() if "routed" in line)
    assert routed_row.split()[6:] == ["100/100", "10.0", "ms", "10.0", "ms", "90.0", "ms"]
    assert tr.parse_sizes("10,100,500") == [10, 100, 500]
    for bad in ("", "100,10", "0,5"):
        with pytest.raises(ValueError):
            tr.parse_sizes(bad)


# -- the many-ports backend, as a process -------------------------------------------------
def test_parse_ports_reads_the_ready_line() -> None:
    line = f"{READY_EVENT} pid=12 ports=svc01-0:4001,svc-x-1:4002"
    assert parse_ports(line) == {"svc01-0": 4001, "svc-x-1": 4002}
    with pytest.raises(ValueError):
        parse_ports("event=other")


def test_ports_backend_answers_each_ports_name_and_health() -> None:
    child = Child("ports", [sys.executable, "-m", "loadtest.portsbackend",
                            "--name", "a-0", "--name", "b-1"])
    try:
        ports = parse_ports(child.wait_for(READY_EVENT, timeout=20))
        assert set(ports) == {"a-0", "b-1"} and len(set(ports.values())) == 2
        for name, port in ports.items():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/x/y", timeout=5) as resp:
                assert resp.read() == name.encode()
                assert resp.headers["X-Backend"] == name
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                assert resp.read() == b"ok"
    finally:
        child.stop(3.0)
    assert child.proc.returncode == 0  # SIGTERM: a clean stop
