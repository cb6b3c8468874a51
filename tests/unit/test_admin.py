"""Admin API over a real loopback port (proxy.admin.server.start_admin): every resource
of SPEC "Admin API", fed by real UpstreamRuntime objects and an injected clock."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from support.fakes import T0, FakeClock, Listener, State, serve_admin

from proxy.admin.server import build_app, start_admin
from proxy.config import UpstreamConfig
from proxy.model import Address, CatalogAnswer, Endpoint
from proxy.upstream.manager import UpstreamRuntime

ENDPOINT_FIELDS = {"id", "address", "port", "node", "datacenter", "tags", "weight", "state",
                   "active", "requests", "failures"}
UPSTREAM_FIELDS = {"name", "mode", "listen", "discovery", "catalog_index", "last_update",
                   "stale_seconds", "endpoints"}


def runtime(name: str, port: int, clock: FakeClock, **kw: Any) -> UpstreamRuntime:
    cfg = UpstreamConfig(name=name, listen=Address("127.0.0.1", port), **kw)
    return UpstreamRuntime(cfg, clock=clock)


WEB_ENDPOINTS = (
    Endpoint("web-1", "10.0.0.1", 9001, node="n1", datacenter="dc1", tags=("v1", "blue"),
             weight=3),
    Endpoint("web-2", "10.0.0.2", 9002, node="n2", datacenter="dc1"),
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def state(clock: FakeClock) -> State:
    """`web` (http, answered, with traffic) and `api` (tcp, never answered)."""
    web = runtime("web", 18081, clock)
    api = runtime("api", 18082, clock, mode="tcp", discovery="static")
    web.on_catalog_answer(CatalogAnswer(WEB_ENDPOINTS, index=7))
    h1 = web.hosts["web-1"]
    h1.requests = 4
    h1.on_success(200)
    h1.on_success(200)
    h1.on_success(200)
    h1.on_failure(503)
    h1.active = 1
    web.latency.observe(0.003)
    web.latency.observe(0.2)
    return State({"web": web, "api": api}, listeners={"web": Listener(5, 1)})


async def get(state: State, path: str) -> tuple[int, str, str]:
    async with serve_admin(state) as (session, base), session.get(base + path) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def get_json(state: State, path: str) -> Any:
    async with serve_admin(state) as (session, base), session.get(base + path) as resp:
        assert resp.status == 200
        return await resp.json()


# --- health and readiness ----------------------------------------------------------------


async def test_healthz(state: State) -> None:
    status, ctype, body = await get(state, "/healthz")
    assert (status, body) == (200, "ok")
    assert ctype.startswith("text/plain")


async def test_ready_names_the_unanswered_upstreams_then_turns_ready(state: State) -> None:
    async with serve_admin(state) as (session, base):
        async with session.get(base + "/ready") as resp:
            assert resp.status == 503
            assert await resp.text() == "not ready: api"
        state.upstreams["api"].on_catalog_answer(CatalogAnswer((), index=1))
        async with session.get(base + "/ready") as resp:
            assert resp.status == 200
            assert await resp.text() == "ready"


async def test_ready_lists_every_missing_upstream_in_config_order(clock: FakeClock) -> None:
    state = State({"web": runtime("web", 1, clock), "api": runtime("api", 2, clock)})
    assert await get(state, "/ready") == (503, "text/plain; charset=utf-8",
                                          "not ready: web, api")


async def test_ready_with_no_upstreams_is_ready() -> None:
    assert (await get(State({}), "/ready"))[::2] == (200, "ready")


# --- /upstreams -------------------------------------------------------------------------


async def test_upstreams_lists_every_spec_field_with_its_value(state: State) -> None:
    data = await get_json(state, "/upstreams")
    assert [u["name"] for u in data] == ["web", "api"]  # config order
    web = data[0]
    assert UPSTREAM_FIELDS <= web.keys()
    assert web["mode"] == "http"
    assert web["listen"] == "127.0.0.1:18081"
    assert web["discovery"] == "consul"
    assert web["catalog_index"] == 7
    assert web["last_update"] == T0
    assert web["stale_seconds"] == 0
    assert web["connections"] == 5
    assert web["rejected_connections"] == 1

    assert [e["id"] for e in web["endpoints"]] == ["web-1", "web-2"]
    e1 = web["endpoints"][0]
    assert ENDPOINT_FIELDS <= e1.keys()
    assert {k: e1[k] for k in ENDPOINT_FIELDS} == {
        "id": "web-1", "address": "10.0.0.1", "port": 9001, "node": "n1",
        "datacenter": "dc1", "tags": ["v1", "blue"], "weight": 3, "state": "healthy",
        "active": 1, "requests": 4, "failures": 1,
    }
    assert e1["responses"] == {"200": 3, "503": 1}


async def test_upstreams_before_the_first_answer_shows_nulls(state: State) -> None:
    api = (await get_json(state, "/upstreams"))[1]
    assert UPSTREAM_FIELDS <= api.keys()
    assert api["mode"] == "tcp"
    assert api["discovery"] == "static"
    assert api["last_update"] is None
    assert api["catalog_index"] is None
    assert api["stale_seconds"] == 0
    assert api["endpoints"] == []
    assert api["connections"] == 0  # no listener open for it: reads as 0


async def test_upstreams_shows_a_removed_instance_draining(state: State) -> None:
    web = state.upstreams["web"]
    web.hosts["web-2"].active = 2
    web.on_catalog_answer(CatalogAnswer(WEB_ENDPOINTS[:1], index=8))
    data = await get_json(state, "/upstreams")
    assert [(e["id"], e["state"]) for e in data[0]["endpoints"]] == [
        ("web-1", "healthy"), ("web-2", "draining")]
    assert data[0]["catalog_index"] == 8


async def test_stale_seconds_grow_while_the_catalog_fails(state: State, clock: FakeClock) -> None:
    web = state.upstreams["web"]
    async with serve_admin(state) as (session, base):
        async def stale() -> float:
            async with session.get(base + "/upstreams") as resp:
                return float((await resp.json())[0]["stale_seconds"])

        clock.now += 3
        assert await stale() == 0  # answering: fresh however long ago the last change was
        web.on_catalog_error("connection refused")
        assert await stale() == 3
        clock.now += 10
        assert await stale() == 13
        web.on_catalog_alive()
        assert await stale() == 0


# --- /metrics ---------------------------------------------------------------------------


async def test_metrics_is_prometheus_text_with_the_proxy_samples(state: State) -> None:
    status, ctype, text = await get(state, "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(text)}

    def value(name: str, **labels: str) -> float:
        found = [s.value for f in fams.values() for s in f.samples
                 if s.name == name and s.labels == labels]
        assert len(found) == 1, (name, labels)
        return float(found[0])

    assert value("sdproxy_requests_total", upstream="web", endpoint="web-1", code="200") == 3
    assert value("sdproxy_requests_total", upstream="web", endpoint="web-1", code="503") == 1
    assert value("sdproxy_endpoint_requests_total", upstream="web", endpoint="web-1") == 4
    assert value("sdproxy_active_requests", upstream="web", endpoint="web-1") == 1
    assert value("sdproxy_connections", upstream="web") == 5
    assert value("sdproxy_endpoints", upstream="web", state="healthy") == 2
    assert value("sdproxy_endpoints", upstream="api", state="healthy") == 0
    assert value("sdproxy_breaker_state", upstream="web", endpoint="web-2",
                 state="closed") == 1
    assert value("sdproxy_catalog_updates_total", upstream="web") == 1
    buckets = [s for s in fams["sdproxy_request_duration_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["upstream"] == "web"]
    assert [s.value for s in buckets] == sorted(s.value for s in buckets)
    assert buckets[-1].labels["le"] == "+Inf"
    assert buckets[-1].value == value("sdproxy_request_duration_seconds_count",
                                      upstream="web") == 2


# --- the dashboard ----------------------------------------------------------------------


async def test_dashboard_lists_upstreams_and_instances(state: State) -> None:
    status, ctype, page = await get(state, "/")
    assert status == 200
    assert ctype.startswith("text/html")
    assert '<noscript><meta http-equiv="refresh"' in page  # JS off: the page reloads itself
    assert 'href="/upstreams"' in page and 'href="/metrics"' in page
    for text in ("web", "api", "127.0.0.1:18081", "consul", "web-1", "web-2",
                 "10.0.0.1:9001", "n1", "healthy", "waiting for the first catalog answer"):
        assert text in page, text
    assert "http://" not in page.replace("http-equiv", "")  # nothing loaded from elsewhere


async def test_dashboard_escapes_catalog_strings(clock: FakeClock) -> None:
    evil = "<script>alert(1)</script>"
    up = runtime("web", 1, clock)
    up.on_catalog_answer(CatalogAnswer(
        (Endpoint(evil, "10.0.0.1", 1, node='"><img src=x>', tags=("<b>t</b>",)),),
        index=1))
    up.on_catalog_error("<i>boom</i>")
    _, _, page = await get(State({"web": up}), "/")
    assert "<script>alert" not in page and "<img" not in page
    assert "<b>t" not in page and "<i>boom" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;i&gt;boom&lt;/i&gt;" in page


async def test_dashboard_shows_staleness(state: State, clock: FakeClock) -> None:
    state.upstreams["web"].on_catalog_error("connection refused")
    clock.now += 4
    _, _, page = await get(state, "/")
    assert "4.0s stale" in page
    assert "connection refused" in page


# --- the server ---------------------------------------------------------------------------


async def test_a_reload_replacing_the_upstreams_is_seen_at_the_next_request(
        state: State, clock: FakeClock) -> None:
    async with serve_admin(state) as (session, base):
        state.upstreams = {"db": runtime("db", 3, clock)}
        async with session.get(base + "/upstreams") as resp:
            assert [u["name"] for u in await resp.json()] == ["db"]
        async with session.get(base + "/ready") as resp:
            assert await resp.text() == "not ready: db"


async def test_start_admin_raises_oserror_when_the_port_is_taken(state: State) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            await start_admin(state, Address("127.0.0.1", taken.getsockname()[1]))


async def test_build_app_under_aiohttp_test_client(state: State) -> None:
    async with TestClient(TestServer(build_app(state))) as client:
        resp = await client.get("/healthz")
        assert await resp.text() == "ok"
        resp = await client.head("/upstreams")
        assert resp.status == 200
        resp = await client.get("/nope")
        assert resp.status == 404
