"""The admin under `--workers N`, without processes: real UpstreamRuntime objects stand
for two workers, each publishing its reading into a real directory (proxy.admin.readings)
as the workers do; /upstreams' merge (proxy.admin.merge) and the collector are read back
as an admin request would read them. Prometheus text parsed with prometheus_client."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.fakes import T0, FakeClock, Listener

from proxy.admin.collector import build_registry
from proxy.admin.merge import Reading, merge_views
from proxy.admin.readings import ReadingFiles, mark_dead, read_all
from proxy.admin.views import process_reading, upstream_views
from proxy.config import UpstreamConfig
from proxy.model import Address, CatalogAnswer, Endpoint
from proxy.upstream.manager import UpstreamRuntime

ENDPOINTS = (Endpoint("a", "10.0.0.1", 1), Endpoint("b", "10.0.0.2", 2))


def runtime(clock: FakeClock, name: str = "web") -> UpstreamRuntime:
    rt = UpstreamRuntime(UpstreamConfig(name=name, listen=Address("127.0.0.1", 18080)),
                         clock=clock)
    rt.on_catalog_answer(CatalogAnswer(ENDPOINTS, index=7))
    return rt


@dataclass
class WorkerState:
    """What one worker's admin reads: its state and its side of the readings directory."""

    upstreams: dict[str, UpstreamRuntime]
    workers: ReadingFiles
    listeners: dict[str, Any] = field(default_factory=dict)
    started_at: float = T0

    def publish(self) -> None:
        self.workers.publish(process_reading(self))


def traffic(rt: UpstreamRuntime, host: str, ok: int, failed: int = 0) -> None:
    h = rt.hosts[host]
    h.requests += ok + failed
    for _ in range(ok):
        h.on_success(200)
    for _ in range(failed):
        h.on_failure(503)
    for _ in range(ok + failed):
        rt.latency.observe(0.003)


def two_workers(tmp_path: Path) -> tuple[WorkerState, WorkerState, FakeClock]:
    clock = FakeClock(T0)
    w0 = WorkerState({"web": runtime(clock)}, ReadingFiles(tmp_path, 0, pid=100),
                     listeners={"web": Listener(connections=2, rejected_connections=1)})
    w1 = WorkerState({"web": runtime(clock)}, ReadingFiles(tmp_path, 1, pid=101),
                     listeners={"web": Listener(connections=5)})
    traffic(w0.upstreams["web"], "a", ok=3)
    traffic(w1.upstreams["web"], "a", ok=4, failed=1)
    traffic(w1.upstreams["web"], "b", ok=2)
    w0.upstreams["web"].hosts["a"].active = 1
    w1.upstreams["web"].hosts["a"].active = 2
    w1.publish()
    return w0, w1, clock


def scrape(state: WorkerState) -> dict[str, Any]:
    text = generate_latest(build_registry(state, process=False)).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fams: dict[str, Any], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for f in fams.values()
            for s in f.samples if s.name == name}


def value(fams: dict[str, Any], name: str, **labels: str) -> float:
    found = samples(fams, name)
    key = tuple(sorted(labels.items()))
    assert key in found, (name, labels, found)
    return found[key]


# --- /metrics ------------------------------------------------------------------------------


def test_counters_are_summed_over_the_workers_whichever_answers(tmp_path: Path) -> None:
    w0, w1, _ = two_workers(tmp_path)
    for answering in (w0, w1):
        fams = scrape(answering)
        assert value(fams, "sdproxy_requests_total", upstream="web", endpoint="a",
                     code="200") == 7
        assert value(fams, "sdproxy_requests_total", upstream="web", endpoint="a",
                     code="503") == 1
        assert value(fams, "sdproxy_endpoint_requests_total", upstream="web",
                     endpoint="a") == 8
        assert value(fams, "sdproxy_endpoint_failures_total", upstream="web",
                     endpoint="a") == 1
        assert value(fams, "sdproxy_rejected_connections_total", upstream="web") == 1
        assert value(fams, "sdproxy_catalog_updates_total", upstream="web") == 2
        assert value(fams, "sdproxy_request_duration_seconds_count", upstream="web") == 10


def test_gauges_are_given_per_worker(tmp_path: Path) -> None:
    w0, w1, _ = two_workers(tmp_path)
    w0.publish()
    fams = scrape(w1)
    assert samples(fams, "sdproxy_connections") == {
        (("upstream", "web"), ("worker", "0")): 2, (("upstream", "web"), ("worker", "1")): 5}
    assert value(fams, "sdproxy_active_requests", upstream="web", endpoint="a",
                 worker="1") == 2
    assert value(fams, "sdproxy_endpoints", upstream="web", state="healthy", worker="0") == 2
    assert value(fams, "sdproxy_breaker_state", upstream="web", endpoint="b",
                 state="closed", worker="0") == 1
    info = samples(fams, "sdproxy_build_info")
    assert len(info) == 1 and "worker" not in dict(next(iter(info)))


def test_a_dead_workers_counters_stay_and_its_gauges_go(tmp_path: Path) -> None:
    w0, _w1, _ = two_workers(tmp_path)
    before = value(scrape(w0), "sdproxy_endpoint_requests_total", upstream="web",
                   endpoint="a")
    mark_dead(tmp_path, 1, 101)  # worker 1 was killed; the supervisor marks its reading
    fams = scrape(w0)
    assert value(fams, "sdproxy_endpoint_requests_total", upstream="web",
                 endpoint="a") == before == 8
    assert {dict(k)["worker"] for k in samples(fams, "sdproxy_connections")} == {"0"}
    assert value(fams, "sdproxy_worker_exits_total", worker="1") == 1


def test_a_dead_workers_counts_leave_with_the_instance(tmp_path: Path) -> None:
    w0, _w1, _ = two_workers(tmp_path)
    mark_dead(tmp_path, 1, 101)
    # Instance b left the catalog of the live worker: only the dead one knew it.
    w0.upstreams["web"].on_catalog_answer(CatalogAnswer(ENDPOINTS[:1], index=8))
    fams = scrape(w0)
    assert ("endpoint", "b") not in {kv for k in samples(fams, "sdproxy_endpoint_requests_total")
                                     for kv in k}
    assert value(fams, "sdproxy_endpoint_requests_total", upstream="web", endpoint="a") == 8


def test_a_worker_killed_before_its_first_reading_is_still_counted(tmp_path: Path) -> None:
    w0, _, _ = two_workers(tmp_path)
    mark_dead(tmp_path, 1, 999)  # no reading was ever written by pid 999
    assert value(scrape(w0), "sdproxy_worker_exits_total", worker="1") == 1


def test_a_process_alone_keeps_its_labels_without_worker(tmp_path: Path) -> None:
    from support.fakes import State

    clock = FakeClock(T0)
    text = generate_latest(build_registry(State({"web": runtime(clock)}),
                                          process=False)).decode()
    assert 'worker="' not in text
    assert "sdproxy_build_info{" in text


# --- /upstreams ----------------------------------------------------------------------------


def test_upstreams_merges_counters_and_sums_gauges(tmp_path: Path) -> None:
    w0, _w1, _ = two_workers(tmp_path)
    [web] = upstream_views(w0)
    assert web["connections"] == 7
    assert web["rejected_connections"] == 1
    assert web["catalog_updates"] == 2
    assert "metrics" not in web
    a, b = web["endpoints"]
    assert (a["id"], a["requests"], a["failures"], a["active"]) == ("a", 8, 1, 3)
    assert a["responses"] == {"200": 7, "503": 1}
    assert a["workers"] == {"0": {"state": "healthy", "reason": "", "active": 1},
                            "1": {"state": "healthy", "reason": "", "active": 2}}
    assert web["workers"] == {"0": {"answered": True, "stale_seconds": 0, "connections": 2},
                              "1": {"answered": True, "stale_seconds": 0, "connections": 5}}
    assert (b["id"], b["requests"]) == ("b", 2)


def test_an_instance_shows_the_most_severe_state_any_worker_has(tmp_path: Path) -> None:
    w0, w1, _ = two_workers(tmp_path)
    for _ in range(5):  # the default breaker opens after 5 failures in a row
        w1.upstreams["web"].hosts["b"].on_failure()
    w1.publish()
    [web] = upstream_views(w0)
    b = web["endpoints"][1]
    assert b["state"] == "open"
    assert {w: x["state"] for w, x in b["workers"].items()} == {"0": "healthy", "1": "open"}


def test_the_stalest_worker_speaks_for_the_catalog(tmp_path: Path) -> None:
    w0, w1, clock = two_workers(tmp_path)
    w1.upstreams["web"].on_catalog_error("connection refused")
    clock.advance(4)
    w1.publish()
    [web] = upstream_views(w0)
    assert web["stale_seconds"] == 4
    assert web["last_error"] == "connection refused"


def test_answered_only_when_every_live_worker_answered(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    fresh = UpstreamRuntime(UpstreamConfig(name="web", listen=Address("127.0.0.1", 1)),
                            clock=clock)
    views = merge_views([
        Reading(0, 1, True, [{"name": "web", "answered": True, "endpoints": []}]),
        Reading(1, 2, True, process_reading(WorkerState({"web": fresh},
                                                        ReadingFiles(tmp_path, 1)))),
    ])
    assert views[0]["answered"] is False


def test_an_upstream_only_a_dead_worker_had_is_not_shown(tmp_path: Path) -> None:
    views = merge_views([
        Reading(0, 1, True, [{"name": "web", "endpoints": []}]),
        Reading(1, 2, False, [{"name": "gone", "catalog_updates": 3, "endpoints": []}]),
    ])
    assert [v["name"] for v in views] == ["web"]


# --- the directory -------------------------------------------------------------------------


def test_a_reading_renamed_while_listed_is_read_as_dead(tmp_path: Path) -> None:
    files = ReadingFiles(tmp_path, 3, pid=42)
    files.publish([{"name": "web"}])
    listed = os.listdir(tmp_path)
    mark_dead(tmp_path, 3, 42)
    assert listed == ["w3.42.json"] and os.listdir(tmp_path) == ["dead.w3.42.json"]
    [reading] = read_all(tmp_path)
    assert (reading.worker, reading.pid, reading.live) == (3, 42, False)
    assert reading.upstreams == [{"name": "web"}]


def test_temporary_and_foreign_files_are_not_readings(tmp_path: Path) -> None:
    (tmp_path / ".w0.1.json.tmp").write_text("{")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "w0.2.json").write_text("{broken")
    (tmp_path / "w1.3.json").write_text(json.dumps({"upstreams": [{"name": "web"}]}))
    assert [(r.worker, r.pid, r.live) for r in read_all(tmp_path)] == [(1, 3, True)]


def test_a_write_that_fails_costs_freshness_not_the_answer(tmp_path: Path) -> None:
    files = ReadingFiles(tmp_path / "missing", 0, pid=1)
    found = files.gather([{"name": "web", "endpoints": []}])
    assert [(r.worker, r.live) for r in found] == [(0, True)]
