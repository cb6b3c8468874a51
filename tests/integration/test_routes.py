"""One listener, many services (SPEC "Routing several upstreams on one listener"), end to
end: a real Consul agent, real backends (each answers with its name), the real proxy.

Requests go over one keep-alive connection where the test can, so that a route change
or a 404 is seen not to cost the connection.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.consul import Registration, wait_passing
from support.http import RawConnection
from support.procs import Backend, ProxyProcess
from support.tomlconf import toml_table

from proxy.devconsul import ConsulAgent, free_port

pytestmark = pytest.mark.timeout(90)

StartBackends = Callable[..., list[Backend]]
Register = Callable[..., Registration]
StartProxy = Callable[..., ProxyProcess]


def listeners_toml(listen: str, routes: list[dict[str, Any]], **keys: Any) -> str:
    """A [[listeners]] table (inline route tables, as a user writes them)."""
    lines = ["[[listeners]]", f'listen = "{listen}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    lines.append("routes = [")
    for r in routes:
        inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in r.items())
        lines.append(f"  {{ {inner} }},")
    lines.append("]")
    return "\n".join(lines) + "\n"


def route_views(proxy: ProxyProcess) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Every route /upstreams lists (under its listener's entry), by (upstream, host,
    path_prefix)."""
    return {(r["upstream"], r["host"], r["path_prefix"]): r
            for up in proxy.upstreams() for r in up.get("routes", [])}


async def test_routes_by_host_wildcard_longest_prefix_strip_and_404(
        consul: ConsulAgent, start_backends: StartBackends, register: Register,
        service_name: Callable[[str], str], start_proxy: StartProxy) -> None:
    a, b, c = start_backends("a", "b", "c")
    names = {n: service_name(n) for n in ("a", "b", "c")}
    for backend in (a, b, c):
        register(backend, names[backend.name])
    for backend in (a, b, c):
        wait_passing(consul, names[backend.name], {f"{names[backend.name]}-{backend.name}"})
    listen = f"127.0.0.1:{free_port()}"
    text = "\n".join([
        toml_table("[[upstreams]]", {"name": names["a"]}),  # reached only through routes
        toml_table("[[upstreams]]", {"name": names["b"]}),
        toml_table("[[upstreams]]", {"name": names["c"], "listen": f"127.0.0.1:{free_port()}"}),
        listeners_toml(listen, [
            {"host": "api.test", "path_prefix": "/", "upstream": names["a"]},
            {"host": "*.test", "path_prefix": "/", "upstream": names["b"]},
            {"host": "api.test", "path_prefix": "/strip/", "upstream": names["c"],
             "strip_prefix": True},
            {"path_prefix": "/static/", "upstream": names["c"]},
            {"path_prefix": "/static/deep/", "upstream": names["a"]},
        ]),
    ])
    proxy = start_proxy(text)
    host, port = listen.rsplit(":", 1)
    conn = await RawConnection.open((host, int(port)))
    try:
        async def who(host_header: str, path: str) -> tuple[int, str]:
            resp = await conn.request("GET", path, host=host_header)
            return resp.status, resp.text

        assert await who("api.test", "/anything") == (200, "a")
        assert await who("API.Test:8080", "/x") == (200, "a")  # case and port ignored
        assert await who("www.test", "/x") == (200, "b")  # wildcard
        assert await who("x.y.test", "/static/x") == (200, "b")  # its host group first
        assert await who("other.example", "/static/x") == (200, "c")
        assert await who("other.example", "/static/deep/x") == (200, "a")  # longest prefix
        status, body = await who("other.example", "/nothing/here")
        assert status == 404
        assert "no route for host other.example and path /nothing/here" in body
        assert body.startswith("sdproxy: ")
        # The 404 kept the connection: the next request on it is served.
        resp = await conn.request("GET", "/strip/headers?q=1", host="api.test:8080")
        assert resp.status == 200 and resp.header("X-Backend") == "c"
        seen = json.loads(resp.body)
        assert seen["_path"] == "/headers?q=1"
        assert seen["x-forwarded-prefix"] == "/strip"
        assert seen["x-forwarded-host"] == "api.test:8080"
        assert seen["host"] == "api.test:8080"  # Host kept (SPEC "HTTP mode")
        # Without strip_prefix the path goes as sent: /static/headers is not the
        # backend's /headers, so it answers with its name.
        assert await who("other.example", "/static/headers") == (200, "c")
        # A strip route adds X-Forwarded-Host only when the client sent none.
        resp = await conn.request("GET", "/strip/headers", host="api.test",
                                  headers=[("X-Forwarded-Host", "front.example"),
                                           ("X-Forwarded-Prefix", "/client")])
        seen = json.loads(resp.body)
        assert seen["x-forwarded-host"] == "front.example"
        assert seen["x-forwarded-prefix"] == "/strip"  # what this route took off
    finally:
        await conn.close()

    routes = route_views(proxy)
    assert set(routes) == {
        (names["a"], "api.test", "/"), (names["b"], "*.test", "/"),
        (names["c"], "api.test", "/strip/"), (names["c"], "", "/static/"),
        (names["a"], "", "/static/deep/")}
    assert routes[(names["a"], "api.test", "/")]["requests"] == 2
    assert routes[(names["c"], "api.test", "/strip/")]["strip_prefix"] is True
    assert all(r["listen"] == listen and r["source"] == "config" for r in routes.values())
    status, body = proxy.admin_get("/metrics")
    metrics = body.decode()
    assert (f'sdproxy_route_requests_total{{host="api.test",listen="{listen}",'
            f'path_prefix="/",upstream="{names["a"]}"}} 2.0') in metrics
    assert (f'sdproxy_responses_total{{code="404",upstream="listener {listen}"}} 1.0'
            in metrics)
    status, page = proxy.admin_get("/")
    assert status == 200 and b"/static/deep/" in page


def test_check_names_the_key_of_a_bad_route(tmp_path: Any) -> None:
    import subprocess
    import sys

    path = tmp_path / "routes.toml"
    path.write_text('[[upstreams]]\nname = "api"\n' + listeners_toml("127.0.0.1:18080", [
        {"path_prefix": "/a/", "upstream": "api"},
        {"path_prefix": "/b/", "upstream": "nope"},
        {"path_prefix": "/a/", "upstream": "api"},
    ]))
    proc = subprocess.run([sys.executable, "-m", "proxy", "check", "-c", str(path)],
                          check=False, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert f'{path}: listeners[0].routes[1].upstream: no upstream named "nope"' in proc.stderr
    assert f"{path}: listeners[0].routes[2]: same host and path_prefix as " \
           f"listeners[0].routes[0]" in proc.stderr


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until `predicate()`; the seconds it took. Bounded by `timeout`."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.01)
    return time.monotonic() - t0


async def _until_status(conn: RawConnection, host: str, path: str, status: int,
                        timeout: float = 10.0) -> tuple[float, str]:
    """Send GET `path` on `conn` until it answers `status`; (seconds taken, last body).
    Bounded by `timeout`; every try reuses the one connection."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while True:
        resp = await conn.request("GET", path, host=host)
        if resp.status == status:
            return loop.time() - t0, resp.text
        if loop.time() - t0 > timeout:
            raise AssertionError(f"{host}{path}: still {resp.status} {resp.text!r} after "
                                 f"{timeout}s")
        await asyncio.sleep(0.01)


async def test_catalog_routes_follow_the_tags_without_dropping_a_connection(
        consul: ConsulAgent, start_backends: StartBackends, register: Register,
        service_name: Callable[[str], str], start_proxy: StartProxy) -> None:
    one, two = start_backends("one", "two")
    svc_one, svc_two = service_name("tagged"), service_name("tagged")
    listen = f"127.0.0.1:{free_port()}"
    proxy = start_proxy(f'[[listeners]]\nlisten = "{listen}"\ncatalog_routes = true\n')
    host, port = listen.rsplit(":", 1)
    conn = await RawConnection.open((host, int(port)))
    path = f"/{svc_one}/x"
    vhost = f"{svc_two}.test"
    try:
        assert (await conn.request("GET", path)).status == 404
        # A service registers with a route tag: routable on the connection already open.
        register(one, svc_one, tags=[f"urlprefix-{path.rsplit('/', 1)[0]}", "other"])
        register(two, svc_two, tags=[f"urlprefix-{vhost}/"])
        took, body = await _until_status(conn, "any.example", path, 200)
        assert body == "one"
        _, body = await _until_status(conn, vhost, "/anything", 200)
        assert body == "two"
        assert took < 5.0
        routes = route_views(proxy)
        assert routes[(svc_one, "", f"/{svc_one}")]["source"] == "catalog"
        assert routes[(svc_one, "", f"/{svc_one}")]["strip_prefix"] is False  # never strips
        assert (svc_two, vhost, "/") in routes
        assert {svc_one, svc_two} <= {up["name"] for up in proxy.upstreams()}

        # The tag removed (re-registered without it): the route goes, the connection stays.
        register(one, svc_one, tags=["other"])
        await _until_status(conn, "any.example", path, 404)
        # The service deregistered while a request to it is in flight on another
        # connection: its route goes, the request still gets its whole answer.
        slow = await RawConnection.open((host, int(port)))
        try:
            in_flight = asyncio.create_task(
                slow.request("GET", "/slow?seconds=1.5", host=vhost, timeout=10))
            await asyncio.sleep(0.3)
            consul.deregister(f"{svc_two}-two")
            await _until_status(conn, vhost, "/anything", 404)
            assert not in_flight.done()
            answer = await in_flight
            assert answer.status == 200 and answer.header("X-Backend") == "two"
        finally:
            await slow.close()
        assert not conn.writer.is_closing()
    finally:
        await conn.close()
    deadline = time.monotonic() + 10
    while {svc_one, svc_two} & {up["name"] for up in proxy.upstreams()}:
        assert time.monotonic() < deadline, "catalog upstreams not stopped"
        await asyncio.sleep(0.05)


def _static(name: str, backend: Backend) -> str:
    return toml_table("[[upstreams]]", {"name": name, "discovery": "static",
                                        "endpoints": [f"127.0.0.1:{backend.port}"]})


def _refuses(addr: tuple[str, int]) -> bool:
    try:
        socket.create_connection(addr, timeout=0.5).close()
    except OSError:
        return True
    return False


async def test_sighup_changes_routes_and_listeners_keeping_connections(
        start_backends: StartBackends, start_proxy: StartProxy) -> None:
    a, b = start_backends("a", "b")
    first, second = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    proxy = start_proxy(_static("ua", a) + listeners_toml(first, [
        {"path_prefix": "/a/", "upstream": "ua"}]))
    config = Path(proxy.config_path)
    head = config.read_text().split("[[upstreams]]")[0]
    host, port = first.rsplit(":", 1)
    addr_first = (host, int(port))
    host2, port2 = second.rsplit(":", 1)
    addr_second = (host2, int(port2))
    async with await RawConnection.open(addr_first) as kept:
        assert (await kept.request("GET", "/a/x")).text == "a"
        assert (await kept.request("GET", "/b/x")).status == 404
        # A new upstream reached only by a new route, and a second listener.
        config.write_text(head + _static("ua", a) + _static("ub", b) + listeners_toml(first, [
            {"path_prefix": "/a/", "upstream": "ua"},
            {"path_prefix": "/b/", "upstream": "ub", "strip_prefix": True}])
            + listeners_toml(second, [{"path_prefix": "/", "upstream": "ub"}]))
        proxy.proc.send_signal(signal.SIGHUP)
        await _until_status(kept, "h", "/b/x", 200)
        assert (await kept.request("GET", "/b/headers")).header("X-Backend") == "b"
        assert json.loads((await kept.request("GET", "/b/headers")).body)["_path"] == \
            "/headers"
        assert (await kept.request("GET", "/a/x")).text == "a"
        async with await RawConnection.open(addr_second) as other:
            assert (await other.request("GET", "/anything")).text == "b"
        # The second listener removed: it stops accepting; the first keeps its client.
        config.write_text(head + _static("ua", a) + listeners_toml(first, [
            {"path_prefix": "/a/", "upstream": "ua"}]))
        proxy.proc.send_signal(signal.SIGHUP)
        await _until_status(kept, "h", "/b/x", 404)
        deadline = time.monotonic() + 5
        while not await asyncio.to_thread(_refuses, addr_second):
            assert time.monotonic() < deadline, "the removed listener still accepts"
            await asyncio.sleep(0.05)
        assert (await kept.request("GET", "/a/x")).text == "a"


async def test_routes_under_workers_count_every_workers_requests(
        start_backends: StartBackends, start_proxy: StartProxy) -> None:
    (a,) = start_backends("a")
    listen = f"127.0.0.1:{free_port()}"
    proxy = start_proxy(_static("ua", a) + listeners_toml(listen, [
        {"path_prefix": "/a/", "upstream": "ua"}]), workers=2)
    host, port = listen.rsplit(":", 1)
    for _ in range(20):  # fresh connections: the kernel spreads them over the workers
        async with await RawConnection.open((host, int(port))) as conn:
            assert (await conn.request("GET", "/a/x")).text == "a"
            assert (await conn.request("GET", "/b/x")).status == 404
    deadline = time.monotonic() + 5  # a sibling's reading is up to 1 s old
    while True:
        routes = route_views(proxy)
        (entry,) = [up for up in proxy.upstreams() if up["name"] == f"listener {listen}"]
        if routes[("ua", "", "/a/")]["requests"] == 20 and entry["responses"] == {"404": 20}:
            break
        assert time.monotonic() < deadline, (routes, entry["responses"])
        await asyncio.sleep(0.2)
    assert set(entry["workers"]) == {"0", "1"}
