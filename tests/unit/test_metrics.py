"""The metrics catalogue (proxy.metrics) and the scrape-time collector
(proxy.admin.collector): real UpstreamRuntime/Host objects in, Prometheus text out,
parsed back with prometheus_client's own parser. No sockets, no loop."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from support.fakes import T0, FakeClock, Listener, State

from proxy import metrics as m
from proxy.admin.collector import build_registry, cumulative_buckets
from proxy.config import UpstreamConfig
from proxy.model import Address, CatalogAnswer, Endpoint
from proxy.upstream.health_state import HealthState
from proxy.upstream.host import Host
from proxy.upstream.manager import LATENCY_BUCKETS, LatencyHistogram, UpstreamRuntime


def ep(eid: str, port: int, **kw: Any) -> Endpoint:
    return Endpoint(id=eid, address="10.0.0.1", port=port, **kw)


def runtime(name: str = "web", clock: FakeClock | None = None) -> UpstreamRuntime:
    return UpstreamRuntime(UpstreamConfig(name=name, listen=Address("127.0.0.1", 18080)),
                           clock=clock or FakeClock(T0))


def scrape(state: State) -> dict[str, Any]:
    """Family name -> family, from the text a Prometheus server would read."""
    text = generate_latest(build_registry(state, process=False)).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(families: dict[str, Any], family: str, suffix: str = "") -> list[Sample]:
    return [s for s in families[family].samples if s.name == family + suffix]


def value(families: dict[str, Any], family: str, suffix: str = "", **labels: str) -> float:
    found = [s.value for s in samples(families, family, suffix) if s.labels == labels]
    assert len(found) == 1, (family, labels, samples(families, family, suffix))
    return float(found[0])


def family_name(metric: m.Metric) -> str:
    # The parser names a counter's family without its `_total` suffix.
    return metric.name.removesuffix("_total") if metric.kind == "counter" else metric.name


# --- the catalogue ------------------------------------------------------------------------


def test_metric_names_are_unique_and_conventional() -> None:
    names = [x.name for x in m.ALL]
    assert len(names) == len(set(names))
    for metric in m.ALL:
        assert metric.name.startswith("sdproxy_")
        assert metric.help
        assert metric.name.endswith("_total") == (metric.kind == "counter"), metric.name


def test_every_declared_metric_is_exposed_with_its_help() -> None:
    rt = runtime()
    rt.on_catalog_answer(CatalogAnswer((ep("a", 1),), index=7))
    fams = scrape(State({"web": rt}))
    for metric in m.ALL:
        fam = fams[family_name(metric)]
        assert fam.type == metric.kind
        assert fam.documentation == metric.help


# --- per-endpoint traffic -----------------------------------------------------------------


def test_requests_by_code_attempts_failures_and_active() -> None:
    rt = runtime()
    rt.on_catalog_answer(CatalogAnswer((ep("a", 1), ep("b", 2)), index=7))
    a, b = rt.hosts["a"], rt.hosts["b"]
    a.requests = 5
    for _ in range(3):
        a.on_success(200)
    a.on_failure(503)
    a.on_failure()  # connect failure: no status code
    a.active = 2
    b.requests = 1
    b.on_success(404)

    fams = scrape(State({"web": rt}))
    assert value(fams, "sdproxy_requests", "_total", upstream="web", endpoint="a",
                 code="200") == 3
    assert value(fams, "sdproxy_requests", "_total", upstream="web", endpoint="a",
                 code="503") == 1
    assert value(fams, "sdproxy_requests", "_total", upstream="web", endpoint="b",
                 code="404") == 1
    assert {s.labels["code"] for s in samples(fams, "sdproxy_requests", "_total")} == {
        "200", "503", "404"}  # a failure without a response has no code
    assert value(fams, "sdproxy_endpoint_requests", "_total", upstream="web",
                 endpoint="a") == 5
    assert value(fams, "sdproxy_endpoint_failures", "_total", upstream="web",
                 endpoint="a") == 2
    assert value(fams, "sdproxy_endpoint_failures", "_total", upstream="web",
                 endpoint="b") == 0
    assert value(fams, "sdproxy_active_requests", upstream="web", endpoint="a") == 2


def test_a_moved_instance_and_its_draining_twin_give_one_sample_per_label_set() -> None:
    rt = runtime()
    rt.on_catalog_answer(CatalogAnswer((ep("a", 1),), index=7))
    old = rt.hosts["a"]
    old.requests, old.active = 4, 1
    old.on_success(200)
    # Same id, new port: the old Host drains under the same id while the new one serves.
    rt.on_catalog_answer(CatalogAnswer((ep("a", 2),), index=8))
    new = rt.hosts["a"]
    assert new is not old and old in rt.all_hosts()
    new.requests = 1
    new.on_success(200)

    fams = scrape(State({"web": rt}))
    assert value(fams, "sdproxy_endpoint_requests", "_total", upstream="web",
                 endpoint="a") == 5
    assert value(fams, "sdproxy_requests", "_total", upstream="web", endpoint="a",
                 code="200") == 2
    assert value(fams, "sdproxy_breaker_state", upstream="web", endpoint="a",
                 state="closed") == 1
    assert value(fams, "sdproxy_endpoints", upstream="web", state="draining") == 1
    assert value(fams, "sdproxy_endpoints", upstream="web", state="healthy") == 1


# --- latency histogram -------------------------------------------------------------------


def test_latency_histogram_is_cumulative_and_inf_equals_count() -> None:
    rt = runtime()
    for seconds in (0.0007, 0.003, 0.003, 0.2, 100.0):  # 100s lands in the +Inf overflow
        rt.latency.observe(seconds)
    fams = scrape(State({"web": rt}))
    fam = "sdproxy_request_duration_seconds"
    buckets = [s for s in samples(fams, fam, "_bucket") if s.labels["upstream"] == "web"]
    les = [s.labels["le"] for s in buckets]
    assert les == [str(b) for b in LATENCY_BUCKETS] + ["+Inf"]
    counts = [s.value for s in buckets]
    assert counts == sorted(counts)  # cumulative: never decreasing
    by_le = dict(zip(les, counts))
    assert by_le["0.0005"] == 0
    assert by_le["0.001"] == 1
    assert by_le["0.005"] == 3
    assert by_le["0.25"] == 4
    assert by_le["30.0"] == 4
    assert by_le["+Inf"] == 5
    assert value(fams, fam, "_count", upstream="web") == 5
    assert value(fams, fam, "_sum", upstream="web") == pytest.approx(100.2067)


def test_cumulative_buckets_of_an_empty_histogram() -> None:
    out = cumulative_buckets(LatencyHistogram())
    assert len(out) == len(LATENCY_BUCKETS) + 1
    assert out[-1] == ("+Inf", 0)
    assert all(n == 0 for _, n in out)


# --- instance states ---------------------------------------------------------------------


def put_in_state(rt: UpstreamRuntime, host: Host, state: str) -> None:
    """Bring a real `host` of `rt` into `state` as requests, probes and operators do."""
    if state in ("open", "half_open"):
        for _ in range(rt.config.breaker.failures):
            host.on_failure()
        if state == "half_open":
            host.breaker.to_half_open()
    elif state == "ejected":
        host.health = HealthState()
        host.health.ejected = True
    elif state == "draining":
        rt.set_operator_drain(host.id, True)
    assert host.state == state


@pytest.mark.parametrize(("host_state", "breaker"), [
    ("healthy", "closed"),
    ("open", "open"),
    ("half_open", "half_open"),
    ("ejected", "closed"),  # outlier ejection is not a breaker state
    ("draining", "closed"),
])
def test_breaker_state_gauge_has_one_current_state(host_state: str, breaker: str) -> None:
    rt = runtime()
    rt.on_catalog_answer(CatalogAnswer((ep("a", 1),), index=7))
    put_in_state(rt, rt.hosts["a"], host_state)
    fams = scrape(State({"web": rt}))
    got = {s.labels["state"]: s.value for s in samples(fams, "sdproxy_breaker_state")}
    assert got == {b: (1.0 if b == breaker else 0.0) for b in m.BREAKER_STATES}
    assert value(fams, "sdproxy_endpoints", upstream="web", state=host_state) == 1


def test_endpoints_by_state_counts_routable_and_draining_hosts() -> None:
    rt = runtime()
    rt.on_catalog_answer(CatalogAnswer((ep("a", 1), ep("b", 2), ep("c", 3)), index=7))
    rt.hosts["c"].active = 1  # in flight: it drains rather than disappearing
    rt.on_catalog_answer(CatalogAnswer((ep("a", 1), ep("b", 2)), index=8))
    fams = scrape(State({"web": rt}))
    got = {s.labels["state"]: s.value for s in samples(fams, "sdproxy_endpoints")}
    assert got == {"healthy": 2, "open": 0, "half_open": 0, "ejected": 0, "draining": 1,
                   "down": 0}


# --- upstream-level counters --------------------------------------------------------------


def test_catalog_metrics_and_staleness_with_an_injected_clock() -> None:
    clock = FakeClock(T0)
    rt = runtime(clock=clock)
    fams = scrape(State({"web": rt}))
    # Before the first answer: no timestamp sample at all, rather than a 1970 one.
    assert samples(fams, "sdproxy_catalog_last_update_timestamp_seconds") == []
    assert value(fams, "sdproxy_catalog_answered", upstream="web") == 0

    rt.on_catalog_answer(CatalogAnswer((ep("a", 1),), index=7))
    clock.now += 5
    rt.on_catalog_error("connection refused")
    clock.now += 7
    rt.on_catalog_error("connection refused")
    fams = scrape(State({"web": rt}))
    assert value(fams, "sdproxy_catalog_updates", "_total", upstream="web") == 1
    assert value(fams, "sdproxy_catalog_errors", "_total", upstream="web") == 2
    assert value(fams, "sdproxy_catalog_stale_seconds", upstream="web") == 12
    assert value(fams, "sdproxy_catalog_last_update_timestamp_seconds",
                 upstream="web") == 1_700_000_000.0
    assert value(fams, "sdproxy_catalog_answered", upstream="web") == 1


def test_listener_failover_and_no_instance_counters() -> None:
    web, api = runtime("web"), runtime("api")
    web.failovers.update({"connect-failure": 2, "503": 1})  # as should_retry counts them
    web.no_host_responses = 4
    state = State({"web": web, "api": api},
                  listeners={"web": Listener(connections=3, rejected_connections=2)})
    fams = scrape(state)
    assert value(fams, "sdproxy_connections", upstream="web") == 3
    assert value(fams, "sdproxy_rejected_connections", "_total", upstream="web") == 2
    # api's listener is not open: its counts read as 0 rather than failing the scrape.
    assert value(fams, "sdproxy_connections", upstream="api") == 0
    assert value(fams, "sdproxy_rejected_connections", "_total", upstream="api") == 0
    assert value(fams, "sdproxy_failovers", "_total", upstream="web",
                 reason="connect-failure") == 2
    assert value(fams, "sdproxy_failovers", "_total", upstream="web", reason="503") == 1
    assert value(fams, "sdproxy_no_instance_responses", "_total", upstream="web") == 4


def test_scrape_reads_the_state_at_scrape_time() -> None:
    """The registry is built once; a reload replacing `state.upstreams` shows next scrape."""
    state = State({"web": runtime("web")})
    registry = build_registry(state, process=False)

    def upstreams(text: bytes) -> set[str]:
        fams: Iterable[Any] = text_string_to_metric_families(text.decode())
        return {s.labels["upstream"] for f in fams if f.name == "sdproxy_connections"
                for s in f.samples}

    assert upstreams(generate_latest(registry)) == {"web"}
    state.upstreams = {"api": runtime("api")}
    assert upstreams(generate_latest(registry)) == {"api"}


def test_process_metrics_share_the_private_registry() -> None:
    text = generate_latest(build_registry(State({}))).decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "python_info" in names
    if "process_resident_memory_bytes" not in names:  # ProcessCollector needs /proc
        pytest.skip("no /proc on this platform")
    assert "sdproxy_requests" in names
