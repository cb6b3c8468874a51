"""Routes in the admin: a routed listener's entry lists its routes, summed over workers."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from proxy.admin.merge import Reading, merge_views
from proxy.admin.state import routes_of
from proxy.model import Address
from proxy.routing import Route, RouteTable


def test_routes_of_a_routed_listener_with_requests() -> None:
    table = RouteTable([(Route("API.example", "/v1/", "api", strip_prefix=True), "x"),
                        (Route("", "/", "web", source="catalog"), "y")])
    found = table.lookup(b"api.example", b"/v1/a")
    assert found is not None
    found.requests += 3
    listener = SimpleNamespace(
        routes=table, runtime=SimpleNamespace(config=SimpleNamespace(
            listen=Address("127.0.0.1", 8080))))
    state = SimpleNamespace(listeners={"listener 127.0.0.1:8080": listener,
                                       "plain": SimpleNamespace(routes=None)})
    assert routes_of(state, "listener 127.0.0.1:8080") == [  # type: ignore[arg-type]
        {"listen": "127.0.0.1:8080", "host": "api.example", "path_prefix": "/v1/",
         "upstream": "api", "strip_prefix": True, "source": "config", "requests": 3},
        {"listen": "127.0.0.1:8080", "host": "", "path_prefix": "/", "upstream": "web",
         "strip_prefix": False, "source": "catalog", "requests": 0}]
    assert routes_of(state, "plain") == []  # type: ignore[arg-type]
    assert routes_of(state, "absent") == []  # type: ignore[arg-type]


def _listener(requests: int, *extra: dict[str, Any]) -> dict[str, Any]:
    route = {"listen": "127.0.0.1:8080", "host": "", "path_prefix": "/a/", "upstream": "a",
             "strip_prefix": False, "source": "config", "requests": requests}
    return {"name": "listener 127.0.0.1:8080", "routes": [route, *extra], "endpoints": []}


def test_requests_per_route_are_summed_over_workers_dead_ones_included() -> None:
    gone = {"listen": "127.0.0.1:8080", "host": "", "path_prefix": "/gone/",
            "upstream": "g", "requests": 9}
    merged = merge_views([Reading(0, 10, True, [_listener(2)]),
                          Reading(1, 11, True, [_listener(5)]),
                          Reading(2, 12, False, [_listener(1, gone)])])
    (view,) = merged
    assert [(r["path_prefix"], r["requests"]) for r in view["routes"]] == [("/a/", 8)]
