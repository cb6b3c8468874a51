"""CatalogRoutesWatch against a real `consul agent -dev` (proxy.devconsul), no mocks.

The watch reads the whole service list, so the tests that compare whole maps run on an
agent of this module's own (not the session's, where other tests register services);
the test that stops Consul and the ACL test start agents of their own. Waiting is for an
event: the next `on_change` or `on_error` (a queue), or a blocking-query answer carrying
at least a given `X-Consul-Index` (aiohttp's request tracing on the watch's session),
each bounded by STEP; never sleep-and-check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from support.consul import ttl_instance, unique_service
from support.watch import running

from proxy.config import ConsulConfig
from proxy.devconsul import ConsulAgent
from proxy.discovery.catalog_routes import CatalogRoutesWatch, RoutesMap, TagRoute

WAIT = 5.0  # a short blocking wait: no test needs a full 55 s query to end
STEP = 3.0  # generous bound for one catalog change to reach on_change
PREFIX = "urlprefix-"


@pytest.fixture(scope="module")
def agent() -> Iterator[ConsulAgent]:
    with ConsulAgent(node="tag-routes") as a:
        yield a


class Recorder:
    """What the watch reports (`on_change`, `on_error`), and every blocking-query answer's
    X-Consul-Index (so a test can wait until the watch has read a given change)."""

    def __init__(self) -> None:
        self.changes: asyncio.Queue[RoutesMap] = asyncio.Queue()
        self.errors: asyncio.Queue[str] = asyncio.Queue()
        self.calls = 0
        self.answered_index = 0
        self._answered = asyncio.Condition()

    def on_change(self, routes: RoutesMap) -> None:
        self.calls += 1
        self.changes.put_nowait(routes)

    def on_error(self, error: str) -> None:
        self.errors.put_nowait(error)

    async def change_where(self, pred: Callable[[RoutesMap], bool]) -> RoutesMap:
        async with asyncio.timeout(STEP):
            while True:
                routes = await self.changes.get()
                if pred(routes):
                    return routes

    async def error(self) -> str:
        async with asyncio.timeout(STEP):
            return await self.errors.get()

    def trace(self) -> aiohttp.TraceConfig:
        config = aiohttp.TraceConfig()

        async def on_request_end(_session: Any, _ctx: Any,
                                 params: aiohttp.TraceRequestEndParams) -> None:
            index = int(params.response.headers.get("X-Consul-Index", "0") or 0)
            async with self._answered:
                self.answered_index = max(self.answered_index, index)
                self._answered.notify_all()

        config.on_request_end.append(on_request_end)
        return config

    async def answered(self, index: int) -> None:
        """Until the watch has had an answer at `index` or later."""
        async with asyncio.timeout(STEP), self._answered:
            await self._answered.wait_for(lambda: self.answered_index >= index)


@contextlib.asynccontextmanager
async def watching(address: str, *, token: str = "", wait: float = WAIT,
                   on_change: Callable[[RoutesMap], None] | None = None,
                   ) -> AsyncIterator[tuple[CatalogRoutesWatch, Recorder]]:
    recorder = Recorder()
    async with aiohttp.ClientSession(trace_configs=[recorder.trace()]) as session:
        watch = CatalogRoutesWatch(ConsulConfig(address=address, wait=wait, token=token),
                                   PREFIX, on_change or recorder.on_change,
                                   on_error=recorder.on_error, session=session,
                                   rng=random.Random(7))
        async with running(watch):
            yield watch, recorder


def register(agent: ConsulAgent, service: str, tags: list[str], sid: str | None = None,
             ) -> int:
    """Register one instance; returns the catalog index that includes it."""
    agent.register(ttl_instance(service, sid or f"{service}-1", 9000, Tags=tags))
    return catalog_index(agent)


def catalog_index(agent: ConsulAgent) -> int:
    with agent.open_api("GET", "/v1/catalog/services") as resp:
        return int(resp.headers["X-Consul-Index"])


def mine(routes: RoutesMap, *services: str) -> RoutesMap:
    """The part of a map about these services."""
    return {s: r for s, r in routes.items() if s in services}


# -- against a real Consul --------------------------------------------------------------
async def test_first_call_at_start_then_a_registration_appears(agent: ConsulAgent) -> None:
    web = unique_service("web")
    async with watching(agent.http_addr) as (watch, rec):
        first = await rec.change_where(lambda r: True)
        assert web not in first
        assert watch.routes == first and watch.last_index > 0
        started = time.perf_counter()
        await asyncio.to_thread(register, agent, web, ["urlprefix-/web", "blue"])
        routes = await rec.change_where(lambda r: web in r)
        delay = time.perf_counter() - started
        assert routes[web] == (TagRoute(web, None, "/web"),)
        print(f"\nregister -> on_change: {delay * 1000:.1f} ms")
        assert rec.calls == 2


async def test_tag_removed_then_service_deregistered(agent: ConsulAgent) -> None:
    api, assets = unique_service("api"), unique_service("assets")
    await asyncio.to_thread(register, agent, api, ["urlprefix-api.example/v1"])
    async with watching(agent.http_addr) as (_, rec):
        await rec.change_where(lambda r: api in r)
        await asyncio.to_thread(register, agent, assets, ["urlprefix-/static/"])
        both = await rec.change_where(lambda r: assets in r)
        assert mine(both, api, assets) == {
            api: (TagRoute(api, "api.example", "/v1"),),
            assets: (TagRoute(assets, None, "/static/"),)}

        # The same instance registered again without the tag: its route goes.
        await asyncio.to_thread(register, agent, api, ["v2"])
        routes = await rec.change_where(lambda r: api not in r)
        assert mine(routes, api, assets) == {assets: (TagRoute(assets, None, "/static/"),)}

        await asyncio.to_thread(agent.deregister, f"{assets}-1")
        routes = await rec.change_where(lambda r: assets not in r)
        assert mine(routes, api, assets) == {}
        await asyncio.to_thread(agent.deregister, f"{api}-1")


async def test_routes_of_all_instances_of_a_service(agent: ConsulAgent) -> None:
    # The service list unites the tags of every instance: a route stays while any one
    # instance still declares it.
    svc = unique_service("multi")
    await asyncio.to_thread(register, agent, svc, ["urlprefix-/a"], f"{svc}-1")
    await asyncio.to_thread(register, agent, svc, ["urlprefix-/a", "urlprefix-/b"], f"{svc}-2")
    async with watching(agent.http_addr) as (_, rec):
        routes = await rec.change_where(lambda r: svc in r)
        assert routes[svc] == (TagRoute(svc, None, "/a"), TagRoute(svc, None, "/b"))
        await asyncio.to_thread(agent.deregister, f"{svc}-2")
        routes = await rec.change_where(lambda r: len(r.get(svc, ())) == 1)
        assert routes[svc] == (TagRoute(svc, None, "/a"),)
        await asyncio.to_thread(agent.deregister, f"{svc}-1")


async def test_wake_ups_without_a_route_change_call_nothing_and_log_nothing(
        agent: ConsulAgent, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sdproxy.discovery.catalog_routes")
    odd = unique_service("odd")
    await asyncio.to_thread(register, agent, odd, ["urlprefix-nohost", "urlprefix-/odd x=1"])
    async with watching(agent.http_addr) as (_, rec):
        await rec.change_where(lambda r: odd in r)
        calls = rec.calls
        # Three catalog changes that change no route: each wakes the blocking query.
        plain = unique_service("plain")
        for i in range(3):
            index = await asyncio.to_thread(register, agent, plain, [f"v{i}"])
            await rec.answered(index)
        assert rec.calls == calls
        # A route change after them is the next call.
        late = unique_service("late")
        await asyncio.to_thread(register, agent, late, ["urlprefix-/late"])
        routes = await rec.change_where(lambda r: True)
        assert late in routes and rec.calls == calls + 1
    events = [r.getMessage() for r in caplog.records]
    malformed = [m for m in events if "tag_route_malformed" in m and odd in m]
    ignored = [m for m in events if "tag_route_options_ignored" in m and odd in m]
    assert len(malformed) == 1 and '"urlprefix-nohost"' in malformed[0]
    assert len(ignored) == 1 and '"urlprefix-/odd x=1"' in ignored[0]
    for sid in (f"{odd}-1", f"{plain}-1", f"{late}-1"):
        await asyncio.to_thread(agent.deregister, sid)


async def test_on_change_that_raises_gets_the_map_again(agent: ConsulAgent) -> None:
    svc = unique_service("retry")
    await asyncio.to_thread(register, agent, svc, ["urlprefix-/retry"])
    given: list[RoutesMap] = []

    def fails_once(routes: RoutesMap) -> None:
        given.append(routes)
        if len(given) == 1:
            raise RuntimeError("route table bug")
        rec.on_change(routes)

    async with watching(agent.http_addr, on_change=fails_once) as (watch, rec):
        assert "route table bug" in await rec.error()
        routes = await rec.change_where(lambda r: True)
        assert svc in routes and given[0] == routes and watch.routes == routes
    await asyncio.to_thread(agent.deregister, f"{svc}-1")


async def test_agent_stopped_keeps_the_last_map_then_resumes() -> None:
    svc = unique_service("kept")
    agent = ConsulAgent(node="tag-routes-stopped")
    replacement: ConsulAgent | None = None
    try:
        await asyncio.to_thread(agent.start, 30.0)
        await asyncio.to_thread(register, agent, svc, ["urlprefix-/kept"])
        async with watching(agent.http_addr) as (watch, rec):
            before = await rec.change_where(lambda r: svc in r)
            agent.kill()  # SIGKILL: the blocking query is cut, then refused
            errors = [await rec.error(), await rec.error()]  # and retried
            assert all(e.startswith(f"consul {agent.http_addr}: ") for e in errors), errors
            assert watch.routes == before and rec.calls == 1 and rec.changes.empty()
            assert watch.last_error == errors[-1] and watch.errors >= 2

            # A new agent at the same address, with another tag: the watch reads afresh
            # (its index went backwards) and gives the new map.
            replacement = ConsulAgent(node="tag-routes-stopped", ports=agent.ports)
            await asyncio.to_thread(replacement.start, 30.0)
            await asyncio.to_thread(register, replacement, svc, ["urlprefix-/moved"])
            routes = await rec.change_where(lambda r: True)
            assert routes == {svc: (TagRoute(svc, None, "/moved"),)}
            assert watch.last_error is None
    finally:
        if replacement is not None:
            replacement.cleanup()
        agent.cleanup()


async def test_acl_errors_name_service_read_and_give_no_map() -> None:
    master = str(uuid.uuid4())
    svc = unique_service("acl")
    agent = ConsulAgent(node="tag-routes-acl", acl_master_token=master)
    try:
        await asyncio.to_thread(agent.start, 30.0)
        await asyncio.to_thread(register, agent, svc, ["urlprefix-/acl"])
        async with watching(agent.http_addr, token=master) as (_, rec):
            routes = await rec.change_where(lambda r: True)
            assert routes == {svc: (TagRoute(svc, None, "/acl"),)}
        async with watching(agent.http_addr, token=str(uuid.uuid4())) as (watch, rec):
            error = await rec.error()
            assert "ACL: token lacks service:read (HTTP 403: " in error, error
            assert "no token set" not in error
            assert watch.routes is None and rec.calls == 0
            print(f"\nunknown token: {json.dumps(error)}")
        # A token that may read no service gets an empty list from Consul, not a 403.
        no_services = await asyncio.to_thread(agent.create_token,
                                              'node_prefix "" { policy = "read" }')
        async with watching(agent.http_addr, token=no_services) as (watch, rec):
            error = await rec.error()
            assert "ACL: token lacks service:read (Consul listed no service" in error, error
            assert watch.routes is None and rec.calls == 0
    finally:
        agent.cleanup()
