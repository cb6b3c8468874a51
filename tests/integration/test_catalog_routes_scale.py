"""Catalog routes at scale (issue 12 item 2): what a catalog change costs the app, the
warning near Consul's per-client connection limit, and a watch against an agent that
resets its connections.

The app runs in-process (`ProxyApp`, no admin) against the session's real Consul agent,
so that its route table and policies can be compared by identity across changes; the
resetting agent is a real loopback socket that accepts and resets each connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from support.consul import Registration
from support.tomlconf import build_config
from support.watch import QueueSink

from proxy import app as app_mod
from proxy import config as config_mod
from proxy.app import ProxyApp, RoutedListener
from proxy.config import ConsulConfig, UpstreamConfig
from proxy.devconsul import ConsulAgent, free_port
from proxy.discovery.catalog_routes import CatalogRoutesWatch
from proxy.discovery.consul import BACKOFF_CAP, ConsulWatcher
from proxy.routing import Routed

pytestmark = pytest.mark.timeout(60)

Register = Callable[..., Registration]
STEP = 5.0  # bound for one catalog change to reach the route table


@contextlib.asynccontextmanager
async def catalog_app(consul: ConsulAgent, tmp_path: Path) -> AsyncIterator[ProxyApp]:
    """A started app with one routed listener with catalog_routes; stopped at the end."""
    listen = f"127.0.0.1:{free_port()}"
    text = build_config(f'[[listeners]]\nlisten = "{listen}"\ncatalog_routes = true\n',
                        admin_listen=f"127.0.0.1:{free_port()}",
                        consul={"address": consul.http_addr, "wait": "5s"},
                        defaults={"drain_timeout": "1s"})
    path = tmp_path / "sdproxy.toml"
    path.write_text(text)
    app = ProxyApp(config_mod.load(str(path), {}), admin=False)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def the_routed(app: ProxyApp) -> RoutedListener:
    (routed,) = app.routed.values()
    return routed


async def until_routed(routed: RoutedListener, path: str, present: bool = True
                       ) -> Routed[object] | None:
    """Poll the listener's table (no event exists for "the table changed") until `path`
    is routed (or, `present=False`, no longer is); bounded by STEP."""
    async with asyncio.timeout(STEP):
        while True:
            table = routed.listener.routes
            found = table.lookup(None, path.encode()) if table is not None else None
            if (found is not None) == present:
                return found  # type: ignore[return-value]
            await asyncio.sleep(0.01)


async def test_a_change_rebuilds_only_what_it_touches(
        consul: ConsulAgent, register: Register, service_name: Callable[[str], str],
        tmp_path: Path) -> None:
    svc_a, svc_b = service_name("scale-a"), service_name("scale-b")
    register(free_port(), svc_a, check="none", service_id=f"{svc_a}-1",
             tags=[f"urlprefix-/{svc_a}/"])
    async with catalog_app(consul, tmp_path) as app:
        routed = the_routed(app)
        entry_a = await until_routed(routed, f"/{svc_a}/")
        assert entry_a is not None
        policy_a = entry_a.target
        runtime_a = app.catalog_served[svc_a].runtime
        table = routed.listener.routes

        # A health change (a second instance): the service's own watch, not the table.
        register(free_port(), svc_a, check="none", service_id=f"{svc_a}-2",
                 tags=[f"urlprefix-/{svc_a}/"])
        async with asyncio.timeout(STEP):
            while len(runtime_a.all_hosts()) < 2:
                await asyncio.sleep(0.01)
        assert routed.listener.routes is table
        # Nothing changed: nothing is built.
        app._sync_catalog_upstreams()
        assert routed.listener.routes is table

        # Another service registers: a new table, where svc_a's entry and policy are the
        # very objects of before (a request in flight keeps its policy either way).
        reg_b = register(free_port(), svc_b, check="none", tags=[f"urlprefix-/{svc_b}/"])
        entry_b = await until_routed(routed, f"/{svc_b}/")
        assert entry_b is not None and entry_b.target is not policy_a
        table = routed.listener.routes
        assert table is not None
        assert table.lookup(None, f"/{svc_a}/".encode()) is entry_a
        assert entry_a.target is policy_a

        # It deregisters: its route and upstream go, svc_a's entry stays as it was.
        consul.deregister(reg_b.service_id)
        await until_routed(routed, f"/{svc_b}/", present=False)
        assert svc_b not in app.catalog_served
        table = routed.listener.routes
        assert table is not None
        assert table.lookup(None, f"/{svc_a}/".encode()) is entry_a
        assert entry_a.target is policy_a


async def test_one_warning_when_the_watches_near_the_agents_limit(
        consul: ConsulAgent, register: Register, service_name: Callable[[str], str],
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # The limit scaled down: the service-list watch plus 2 catalog upstreams pass it.
    monkeypatch.setattr(app_mod, "WATCHES_WARN_ABOVE", 2)
    caplog.set_level(logging.WARNING, logger="sdproxy.app")
    names = [service_name("near-limit") for _ in range(3)]
    async with catalog_app(consul, tmp_path) as app:
        routed = the_routed(app)
        for name in names:
            register(free_port(), name, check="none", tags=[f"urlprefix-/{name}/"])
            await until_routed(routed, f"/{name}/")
    lines = [r.getMessage() for r in caplog.records
             if "event=consul_watches_near_limit" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "http_max_conns_per_client" in lines[0]
    assert "agent_default_limit=200" in lines[0]


# -- an agent that resets every connection (what a Consul past its per-client limit may
# do): the watch must back off, not spin ---------------------------------------------------
@contextlib.asynccontextmanager
async def resetting_agent() -> AsyncIterator[tuple[str, list[int]]]:
    """A loopback server that accepts each connection and resets it at once (SO_LINGER
    0); its address and a list that counts the connections."""
    accepted: list[int] = []

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", accepted
    finally:
        server.close()
        await server.wait_closed()


async def test_a_reset_connection_is_retried_with_backoff() -> None:
    async with resetting_agent() as (address, accepted), aiohttp.ClientSession() as session:
        consul = ConsulConfig(address=address, wait=5.0)
        sink = QueueSink()
        watcher = ConsulWatcher(consul, UpstreamConfig(name="svc", listen=None), sink,
                                rng=random.Random(7))
        delays = [await watcher.poll_once(session) for _ in range(8)]
        routes = CatalogRoutesWatch(consul, "urlprefix-", lambda _m: None,
                                    rng=random.Random(7))
        route_delays = [await routes.poll_once(session) for _ in range(8)]
    for got in (delays, route_delays):
        assert all(0.0 < d <= BACKOFF_CAP for d in got)
        assert max(got[5:]) > 4 * max(got[:2])  # the ceiling grows: no spin
    # aiohttp may try a GET a second time on a fresh connection; never more.
    assert 16 <= len(accepted) <= 32
    error = await sink.error()
    assert error.startswith(f"consul {address}: ")
    # Reset or closed, depending on when the reset reaches the client: either way the
    # line names the agent's per-client limit.
    assert "(restarting, or past the agent's limits { http_max_conns_per_client } for " \
        "this address?" in error
    assert routes.failures == 8 and routes.routes is None
