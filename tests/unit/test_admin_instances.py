"""Admin API, instance state and operator actions over a real loopback port: `reason`,
catalog-down instances, health-check fields and metrics, and POST .../drain|enable with
its access rules (proxy.admin.auth)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.fakes import T0, FakeClock, State, serve_admin

from proxy.admin.auth import is_loopback
from proxy.config import AdminConfig, Config, HealthConfig, UpstreamConfig
from proxy.model import Address, CatalogAnswer, Endpoint
from proxy.upstream.health_state import ProbeResult
from proxy.upstream.manager import UpstreamRuntime

WEB = (Endpoint("web-1", "10.0.0.1", 9001), Endpoint("web-2", "10.0.0.2", 9002),
       Endpoint("odd/id", "10.0.0.3", 9003))
CRITICAL = Endpoint("web-9", "10.0.0.9", 9009, node="n9", status="critical")


@dataclass
class ConfiguredState(State):
    config: Config = field(default_factory=lambda: Config(path="test.toml"))


def make_state(admin: AdminConfig | None = None) -> ConfiguredState:
    cfg = UpstreamConfig(name="web", listen=Address("127.0.0.1", 18081),
                         health=HealthConfig(fall=1, rise=1))
    web = UpstreamRuntime(cfg, clock=FakeClock(T0))
    web.on_catalog_answer(CatalogAnswer(WEB, index=3))
    web.on_catalog_down([(CRITICAL, "HTTP GET http://10.0.0.9:9009/health: 503")])
    return ConfiguredState({"web": web},
                           config=Config(path="test.toml", admin=admin or AdminConfig()))


async def endpoints(session: aiohttp.ClientSession, base: str) -> dict[str, dict[str, Any]]:
    async with session.get(base + "/upstreams") as resp:
        return {e["id"]: e for e in (await resp.json())[0]["endpoints"]}


# -- what /upstreams shows ------------------------------------------------------------------

async def test_every_endpoint_has_a_reason_and_down_ones_are_listed() -> None:
    state = make_state()
    state.upstreams["web"].on_probe_result(state.upstreams["web"].hosts["web-2"],
                                           ProbeResult("timeout", "timeout 1s"))
    async with serve_admin(state) as (session, base):
        eps = await endpoints(session, base)
        async with session.get(base + "/upstreams") as resp:
            up = (await resp.json())[0]
    assert list(eps) == ["web-1", "web-2", "odd/id", "web-9"]
    assert (eps["web-1"]["state"], eps["web-1"]["reason"], eps["web-1"]["health"]) == (
        "healthy", "", None)
    assert (eps["web-2"]["state"], eps["web-2"]["reason"]) == ("ejected", "health: timeout 1s")
    assert eps["web-2"]["health"] == {"ejected": True, "last": "timeout 1s", "checked_at": T0}
    assert {k: eps["web-9"][k] for k in ("state", "reason", "node", "active", "requests")} == {
        "state": "down", "reason": "HTTP GET http://10.0.0.9:9009/health: 503", "node": "n9",
        "active": 0, "requests": 0}
    assert up["health_checks"] == {"check": "GET /health", "interval": 2.0, "timeout": 1.0,
                                   "fall": 1, "rise": 1, "expect": ["2xx"]}


async def test_dashboard_shows_down_instances_greyed_with_their_reason() -> None:
    async with serve_admin(make_state()) as (session, base), session.get(base + "/") as resp:
        page = await resp.text()
    assert '<tr class="down">' in page and "web-9" in page
    assert "HTTP GET http://10.0.0.9:9009/health: 503" in page


async def test_metrics_count_probes_by_result_and_down_instances() -> None:
    state = make_state()
    web = state.upstreams["web"]
    for result in ("pass", "pass", "fail", "timeout"):
        web.on_probe_result(web.hosts["web-1"], ProbeResult(result, "x"))
    async with serve_admin(state) as (session, base), session.get(base + "/metrics") as resp:
        text = await resp.text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("sdproxy_health_checks_total", upstream="web", endpoint="web-1",
                 result="pass") == 2
    assert value("sdproxy_health_checks_total", upstream="web", endpoint="web-1",
                 result="timeout") == 1
    assert value("sdproxy_endpoints", upstream="web", state="down") == 1
    assert value("sdproxy_endpoints", upstream="web", state="ejected") == 1  # fall = 1


# -- drain and enable -------------------------------------------------------------------------

async def test_drain_and_enable_on_a_loopback_admin() -> None:
    state = make_state()
    async with serve_admin(state) as (session, base):
        url = base + "/upstreams/web/endpoints/web-1"
        async with session.post(url + "/drain") as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body["operator_drained"] is True
        assert [(e["id"], e["state"], e["reason"]) for e in body["endpoints"]] == [
            ("web-1", "draining", "operator")]
        assert (await endpoints(session, base))["web-1"]["state"] == "draining"
        assert state.upstreams["web"].hosts["web-1"] not in state.upstreams["web"].available
        async with session.post(url + "/enable") as resp:
            assert resp.status == 200
        eps = await endpoints(session, base)
        assert (eps["web-1"]["state"], eps["web-1"]["reason"]) == ("healthy", "")


async def test_an_id_with_a_slash_is_reached_percent_encoded() -> None:
    state = make_state()
    url = "/upstreams/web/endpoints/odd%2Fid/drain"
    async with serve_admin(state) as (session, base), session.post(base + url) as resp:
        assert resp.status == 200, await resp.text()
    assert state.upstreams["web"].hosts["odd/id"].operator_drained


@pytest.mark.parametrize(("path", "status", "text"), [
    ("/upstreams/nope/endpoints/web-1/drain", 404, "no upstream named nope"),
    ("/upstreams/web/endpoints/web-7/drain", 404, "upstream web has no instance web-7"),
])
async def test_unknown_names_are_404(path: str, status: int, text: str) -> None:
    async with serve_admin(make_state()) as (session, base), session.post(base + path) as resp:
        assert (resp.status, (await resp.text()).strip()) == (status, text)


async def test_drain_is_a_post() -> None:
    url = "/upstreams/web/endpoints/web-1/drain"
    async with serve_admin(make_state()) as (session, base), session.get(base + url) as resp:
        assert resp.status == 405


@pytest.mark.parametrize(("admin", "headers", "status"), [
    # A token, whatever the address: needed, and must match.
    (AdminConfig(token="s3cret"), {}, 401),
    (AdminConfig(token="s3cret"), {"Authorization": "Bearer wrong"}, 401),
    (AdminConfig(token="s3cret"), {"Authorization": "Basic s3cret"}, 401),
    (AdminConfig(token="s3cret"), {"Authorization": "Bearer s3cret"}, 200),
    (AdminConfig(Address("0.0.0.0", 9901), token="s3cret"),
     {"Authorization": "bearer s3cret"}, 200),
    # No token: loopback only.
    (AdminConfig(Address("0.0.0.0", 9901)), {}, 403),
    (AdminConfig(Address("192.0.2.10", 9901)), {"Authorization": "Bearer x"}, 403),
    (AdminConfig(Address("::1", 9901)), {}, 200),
    (AdminConfig(Address("localhost", 9901)), {}, 200),
    # A browser sending it for another site: never.
    (AdminConfig(), {"Origin": "https://evil.example"}, 403),
    (AdminConfig(), {"Sec-Fetch-Site": "cross-site"}, 403),
    (AdminConfig(token="s3cret"),
     {"Origin": "https://evil.example", "Authorization": "Bearer s3cret"}, 403),
])
async def test_who_may_drain(admin: AdminConfig, headers: dict[str, str], status: int) -> None:
    state = make_state(admin)
    url = "/upstreams/web/endpoints/web-1/drain"
    async with serve_admin(state) as (session, base), session.post(base + url,
                                                             headers=headers) as resp:
        assert resp.status == status, await resp.text()
        if status == 401:
            assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert state.upstreams["web"].hosts["web-1"].operator_drained is (status == 200)


async def test_a_same_origin_request_from_the_dashboard_is_allowed() -> None:
    state = make_state()
    async with serve_admin(state) as (session, base):
        headers = {"Origin": base, "Sec-Fetch-Site": "same-origin"}
        async with session.post(base + "/upstreams/web/endpoints/web-1/drain",
                                headers=headers) as resp:
            assert resp.status == 200


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True),
    ("::ffff:127.0.0.1", True), ("::ffff:10.0.0.1", False),
    ("0.0.0.0", False), ("::", False), ("10.0.0.1", False), ("admin.internal", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
