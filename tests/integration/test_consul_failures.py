"""The catalog under failure (SPEC "Routing rules": "When the catalog cannot be reached...").

Real processes on loopback, no mocks: Consul agents and servers (`proxy.devconsul`), demo
backends and the proxy. Three situations:

- the agent the proxy talks to is SIGKILLed: the last pool keeps serving, `/upstreams`
  and `/metrics` show the staleness and the errors; a new agent at the same address
  (same ports) brings the watch back;
- a three-server cluster loses its leader while the proxy reads (`stale = true`) from a
  follower: clients see no error and the watch keeps getting answers;
- the watch's own load on Consul: about one blocking query per upstream per `wait`,
  counted by a small counting HTTP proxy (aiohttp, inside the test) in front of the agent.

Every wait is bounded; every agent is stopped (SIGTERM, then SIGKILL) and its data dir
and log removed at teardown. Each test prints what it measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from support.consul import Registration, register_backend, unique_service, wait_passing
from support.http import Sample, all_ok, paced_requests, seconds_until
from support.procs import Backend, ProxyProcess
from support.tomlconf import toml_table

from proxy.devconsul import ConsulAgent, ConsulCluster, free_port

pytestmark = pytest.mark.timeout(90)

StartBackends = Callable[..., list[Backend]]
StartProxy = Callable[..., ProxyProcess]
Register = Callable[..., Registration]


# -- helpers ------------------------------------------------------------------------------
def proxy_config(consul_address: str, services: list[str], *, wait: str,
                 stale: bool = True) -> str:
    """A TOML fragment with its own `[consul]` (the fixture's agent is not the one here)."""
    parts = [toml_table("[consul]", {"address": consul_address, "wait": wait,
                                     "stale": stale})]
    for name in services:
        parts.append(toml_table("[[upstreams]]", {"name": name, "mode": "http",
                                                  "listen": f"127.0.0.1:{free_port()}"}))
    return "\n".join(parts)


def catalog_errors_metric(proxy: ProxyProcess, upstream: str) -> float:
    """`sdproxy_catalog_errors_total{upstream=...}` from `/metrics`."""
    status, body = proxy.admin_get("/metrics")
    assert status == 200, body[:300]
    pattern = re.compile(r'^sdproxy_catalog_errors_total\{([^}]*)\}\s+(\S+)$', re.MULTILINE)
    for labels, value in pattern.findall(body.decode()):
        if f'upstream="{upstream}"' in labels:
            return float(value)
    raise AssertionError(f"sdproxy_catalog_errors_total for {upstream} missing")


# -- a: the agent is killed, then replaced at the same address ----------------------------
async def test_agent_killed_last_pool_serves_then_watch_resumes(
        start_backends: StartBackends, start_proxy: StartProxy) -> None:
    service = unique_service("killed")
    agent = ConsulAgent(node="killed-agent")
    replacement: ConsulAgent | None = None
    try:
        agent.start(timeout=30.0)
        b1, b2 = start_backends("kill-a", "kill-b")
        regs = [register_backend(agent, service, b.port, service_id=f"{service}-{b.name}")
                for b in (b1, b2)]
        ids = [r.service_id for r in regs]
        wait_passing(agent, service, ids)
        proxy = start_proxy(proxy_config(agent.http_addr, [service], wait="2s"))
        addr = proxy.listen(service)
        assert await all_ok(addr, 10) == {b1.name, b2.name}
        up = proxy.upstream(service)
        assert (up["stale_seconds"], up["catalog_errors"]) == (0, 0)

        agent.kill()  # SIGKILL: the in-flight blocking query is cut, then refused
        killed = time.monotonic()
        seen: list[tuple[float, float, float]] = []  # (since kill, stale_seconds, errors)
        for _ in range(6):
            await asyncio.sleep(0.4)
            assert await all_ok(addr, 5) == {b1.name, b2.name}  # the last pool serves
            up = await asyncio.to_thread(proxy.upstream, service)
            errors = await asyncio.to_thread(catalog_errors_metric, proxy, service)
            seen.append((time.monotonic() - killed, up["stale_seconds"], errors))
            assert {ep["id"] for ep in up["endpoints"]} == set(ids)
        print("\nafter SIGKILL of the agent (s since kill, stale_seconds, catalog errors):\n  "
              + "\n  ".join(f"{t:.1f}s stale={s:.2f} errors={e:g}" for t, s, e in seen))
        stales = [s for _, s, _ in seen]
        errors_seen = [e for _, _, e in seen]
        assert all(s > 0 for s in stales)
        assert all(a < b for a, b in itertools.pairwise(stales))  # growing
        assert errors_seen[0] >= 1 and errors_seen[-1] > errors_seen[0]
        assert up["last_error"].startswith(f"consul {agent.http_addr}: ")

        # A new agent at the same address; its catalog is empty until we register again.
        replacement = ConsulAgent(node="killed-agent", ports=agent.ports)
        await asyncio.to_thread(replacement.start, 30.0)
        for b in (b1, b2):
            register_backend(replacement, service, b.port, service_id=f"{service}-{b.name}")
        restarted = time.monotonic()
        resumed = await seconds_until(
            "stale_seconds back to 0",
            lambda: proxy.upstream(service)["stale_seconds"] == 0, timeout=15.0)
        await asyncio.to_thread(proxy.wait_routable, service, ids, 5.0)
        assert await all_ok(addr, 10) == {b1.name, b2.name}
        # The watch is live again: a catalog change reaches the pool.
        replacement.check_fail(regs[1].check_id)
        changed = time.monotonic()
        await asyncio.to_thread(proxy.wait_routable, service, ids[:1], 5.0)
        change_delay = time.monotonic() - changed
        assert await all_ok(addr, 5) == {b1.name}
        pool_changes = [e for e in proxy.events("pool_change")
                        if e.get("upstream") == service]
        print(f"replacement agent registered -> stale_seconds 0 after {resumed:.2f} s "
              f"({time.monotonic() - restarted:.2f} s until routable); check_fail -> pool "
              f"{change_delay * 1000:.0f} ms; pool changes logged: {len(pool_changes)}")
    finally:
        if replacement is not None:
            replacement.cleanup()
        agent.cleanup()


# -- b: a three-server cluster loses its leader -------------------------------------------
async def test_leader_loss_with_stale_reads_from_a_follower(
        start_backends: StartBackends, start_proxy: StartProxy) -> None:
    service = unique_service("raft")
    with await asyncio.to_thread(ConsulCluster(3).start, 60.0) as cluster:
        leader = cluster.wait_leader()
        # Both roles on followers: the registering agent (its node must stay alive, or its
        # serfHealth turns critical) and the one the proxy reads from.
        home, reader = (s for s in cluster.servers if s is not leader)
        b1, b2 = start_backends("raft-a", "raft-b")
        regs = [register_backend(home, service, b.port, service_id=f"{service}-{b.name}")
                for b in (b1, b2)]
        ids = [r.service_id for r in regs]
        wait_passing(reader, service, ids, timeout=15.0)
        proxy = start_proxy(proxy_config(reader.http_addr, [service], wait="5s", stale=True))
        addr = proxy.listen(service)
        assert await all_ok(addr, 5) == {b1.name, b2.name}

        observed: list[tuple[float, float, int]] = []  # (since kill, stale, catalog_errors)
        stop = asyncio.Event()
        killed_at: list[float] = []

        async def watch_admin() -> None:
            while not stop.is_set():
                up = await asyncio.to_thread(proxy.upstream, service)
                t = time.monotonic() - killed_at[0] if killed_at else -1.0
                observed.append((t, up["stale_seconds"], up["catalog_errors"]))
                await asyncio.sleep(0.1)

        async def kill_leader() -> float:
            await asyncio.sleep(1.0)
            killed_at.append(time.monotonic())
            await asyncio.to_thread(leader.kill)
            new = await asyncio.to_thread(cluster.wait_leader, [home, reader], 15.0)
            assert new is not leader
            return time.monotonic() - killed_at[0]

        admin_task = asyncio.create_task(watch_admin())
        load = asyncio.create_task(paced_requests(addr, rate=50, duration=5.0, timeout=5.0))
        election = await kill_leader()
        samples: list[Sample] = await load
        stop.set()
        await admin_task

        failed = [s for s in samples if not s.ok]
        errors_before = max(e for t, _, e in observed if t < 0)
        errors_after = max(e for _, _, e in observed)
        max_stale = max(s for _, s, _ in observed)
        print(f"\nleader {leader.node} killed under {len(samples)} GETs at 50/s: "
              f"{len(failed)} client errors; new leader after {election:.2f} s; "
              f"/upstreams during the election: max stale_seconds={max_stale:.2f}, "
              f"catalog_errors {errors_before} -> {errors_after}")
        assert not failed, [(s.status, s.error) for s in failed[:5]]
        assert {s.body for s in samples} == {b1.name, b2.name}
        # Stale reads are served by the follower itself: no leader needed, no error.
        assert errors_after - errors_before <= 1
        assert max_stale < 2.0

        # The watch still gets answers after the election: a change reaches the pool.
        await asyncio.to_thread(home.check_fail, regs[0].check_id)
        started = time.monotonic()
        await asyncio.to_thread(proxy.wait_routable, service, ids[1:], 10.0)
        print(f"check_fail after the election -> pool change in "
              f"{(time.monotonic() - started) * 1000:.0f} ms")
        assert proxy.upstream(service)["stale_seconds"] == 0


# -- c: the watch's load on Consul ----------------------------------------------------------
@dataclass
class CountingProxy:
    """A pass-through HTTP proxy in front of a Consul agent that records health queries."""

    target: str
    health: list[tuple[float, str, dict[str, str]]] = field(default_factory=list)
    session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.Response:
        if request.path.startswith("/v1/health/service/"):
            name = request.path.rsplit("/", 1)[1]
            self.health.append((time.monotonic(), name, dict(request.query)))
        assert self.session is not None
        async with self.session.request(request.method, self.target + request.path_qs,
                                        data=await request.read()) as resp:
            body = await resp.read()
            headers = {k: v for k, v in resp.headers.items()
                       if k.lower().startswith("x-consul-") or k.lower() == "content-type"}
            return web.Response(status=resp.status, body=body, headers=headers)

    def count(self, start: float, end: float) -> dict[str, int]:
        out: dict[str, int] = {}
        for t, name, _ in self.health:
            if start <= t < end:
                out[name] = out.get(name, 0) + 1
        return out


@contextlib.asynccontextmanager
async def counting_proxy(target: str) -> AsyncIterator[tuple[CountingProxy, str]]:
    counter = CountingProxy(target)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", counter.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        counter.session = session
        try:
            yield counter, f"http://127.0.0.1:{runner.addresses[0][1]}"
        finally:
            await runner.cleanup()


async def test_watch_load_is_one_blocking_query_per_upstream_per_wait(
        consul: ConsulAgent, start_backends: StartBackends, register: Register,
        start_proxy: StartProxy) -> None:
    wait, quiet = 2.0, 5.0
    services = [unique_service("load"), unique_service("load")]
    backends = start_backends("load-a", "load-b")
    for svc, b in zip(services, backends, strict=True):
        register(b, svc)
        wait_passing(consul, svc, [f"{svc}-{b.name}"])
    async with counting_proxy(consul.http_addr) as (counter, address):
        # The proxy's start blocks on its readiness; this loop must keep serving Consul.
        proxy = await asyncio.to_thread(
            start_proxy, proxy_config(address, services, wait=f"{wait:g}s"))
        for svc, b in zip(services, backends, strict=True):
            assert await all_ok(proxy.listen(svc), 2) == {b.name}
        await asyncio.sleep(0.5)  # past the first, non-blocking reads
        start = time.monotonic()
        await asyncio.sleep(quiet)
        counts = counter.count(start, time.monotonic())
        window = [q for t, _, q in counter.health if t >= start]
    total = sum(counts.values())
    bound = len(services) * (quiet / wait + 2)
    print(f"\nwatch load over a quiet {quiet:g} s, wait={wait:g}s, {len(services)} upstreams: "
          f"{total} health queries ({total / quiet:.2f}/s; per upstream "
          f"{sorted(counts.values())}); bound {bound:g}")
    assert total <= bound
    assert set(counts) == set(services)  # every upstream keeps its one query going
    assert all(c >= 1 for c in counts.values())
    assert all("index" in q and q["wait"] == "2s" for q in window)  # all blocking
