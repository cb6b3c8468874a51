"""Datacenter failover (SPEC "Routing rules") against two real Consul datacenters.

Two `consul agent -dev` processes on loopback, one per datacenter (`dc1`, `dc2`), the
second joined to the first over the WAN (dev agents are servers, so they federate). Each
datacenter's instances are registered on its own agent; the proxy (a real process) talks
only to the dc1 agent, which forwards the `dc=dc2` query over the WAN. Every wait is
bounded; both agents are stopped and their logs removed at module teardown.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support.consul import register_backend, unique_service, wait_passing
from support.http import fetch
from support.procs import Backend, ProxyProcess
from support.tomlconf import toml_table

from proxy.devconsul import ConsulAgent, free_port

DCS = ("dc1", "dc2")
SWITCH_BOUND = 1.5  # seconds: "within about a second" with room for a busy CI machine


@pytest.fixture(scope="module")
def federation() -> Iterator[tuple[ConsulAgent, ConsulAgent]]:
    """dc1 and dc2 dev agents joined over the WAN; each lists both datacenters."""
    dc1 = ConsulAgent(node="fed-dc1", datacenter="dc1")
    dc2 = ConsulAgent(node="fed-dc2", datacenter="dc2", join_wan=[dc1.serf_wan_addr])
    try:
        dc1.start(timeout=30.0)
        dc2.start(timeout=30.0)
        for agent in (dc1, dc2):
            agent.wait_datacenters(DCS, timeout=15.0)
        yield dc1, dc2
    finally:
        dc2.cleanup()
        dc1.cleanup()


def failover_config(agent: ConsulAgent, service: str, datacenters: tuple[str, ...]) -> str:
    """A TOML fragment whose own `[consul]` points the proxy at `agent`."""
    return (toml_table("[consul]", {"address": agent.http_addr, "wait": "10s"}) + "\n"
            + toml_table("[[upstreams]]", {"name": service, "mode": "http",
                                           "listen": f"127.0.0.1:{free_port()}",
                                           "datacenters": list(datacenters)}))


async def first_body_from(addr: tuple[str, int], bodies: set[str],
                          timeout: float = 5.0) -> float:
    """GET in a tight loop until a response body is one of `bodies`; the monotonic time."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        resp = await fetch(addr, timeout=2.0)
        last = f"{resp.status} {resp.text!r}"
        if resp.status == 200 and resp.text in bodies:
            return time.monotonic()
        await asyncio.sleep(0.005)
    raise AssertionError(f"no response from {sorted(bodies)} within {timeout}s; last: {last}")


async def bodies_of(addr: tuple[str, int], n: int) -> list[str]:
    out = []
    for _ in range(n):
        resp = await fetch(addr, timeout=2.0)
        assert resp.status == 200, resp
        out.append(resp.text)
    return out


def datacenters_of(proxy: ProxyProcess, name: str) -> set[str]:
    """Datacenters of the pool (instances Consul reports critical are listed as "down")."""
    return {ep["datacenter"] for ep in proxy.endpoints(name) if ep["state"] != "down"}


async def test_failover_to_dc2_and_back(
        federation: tuple[ConsulAgent, ConsulAgent],
        start_backends: Callable[..., list[Backend]],
        start_proxy: Callable[..., ProxyProcess]) -> None:
    dc1, dc2 = federation
    service = unique_service("fed")
    a1, a2, b1 = start_backends("dc1-a", "dc1-b", "dc2-a")
    regs = [register_backend(dc1, service, b.port, service_id=f"{service}-{b.name}")
            for b in (a1, a2)]
    register_backend(dc2, service, b1.port, service_id=f"{service}-{b1.name}")
    wait_passing(dc1, service, [r.service_id for r in regs])
    wait_passing(dc2, service, [f"{service}-{b1.name}"])

    proxy = start_proxy(failover_config(dc1, service, DCS))
    addr = proxy.listen(service)
    # dc1 has passing instances: only dc1 gets traffic, though dc2's are known.
    seen = await bodies_of(addr, 20)
    assert set(seen) == {a1.name, a2.name}, seen
    assert datacenters_of(proxy, service) == {"dc1"}

    # Every dc1 check fails: dc2 takes over.
    started = time.monotonic()
    for reg in regs:
        await asyncio.to_thread(dc1.check_fail, reg.check_id)
    none_left = time.monotonic()
    switched = await first_body_from(addr, {b1.name})
    failover = switched - none_left
    assert set(await bodies_of(addr, 10)) == {b1.name}
    assert datacenters_of(proxy, service) == {"dc2"}

    # One dc1 instance passes again: back to dc1 (it is preferred, not just a fallback).
    await asyncio.to_thread(dc1.check_pass, regs[0].check_id)
    recovered = time.monotonic()
    back = await first_body_from(addr, {a1.name})
    failback = back - recovered
    await asyncio.to_thread(dc1.check_pass, regs[1].check_id)
    await asyncio.to_thread(proxy.wait_routable, service, [r.service_id for r in regs], 5.0)
    assert set(await bodies_of(addr, 20)) == {a1.name, a2.name}
    assert datacenters_of(proxy, service) == {"dc1"}

    print(f"\nfailover dc1 -> dc2: {failover * 1000:.1f} ms after the last dc1 check failed "
          f"({(switched - started) * 1000:.1f} ms after the first)"
          f"\nfailback dc2 -> dc1: {failback * 1000:.1f} ms after a dc1 check passed")
    assert failover < SWITCH_BOUND
    assert failback < SWITCH_BOUND
    changes = [e for e in proxy.events("catalog_answer") if e.get("failover_from")]
    assert [(e["failover_from"], e["selected"]) for e in changes] == [("dc1", "dc2"),
                                                                     ("dc2", "dc1")]


async def test_empty_first_datacenter_routes_to_the_second_from_the_start(
        federation: tuple[ConsulAgent, ConsulAgent],
        start_backends: Callable[..., list[Backend]],
        start_proxy: Callable[..., ProxyProcess]) -> None:
    """dc1 has no instance at all (the service is unknown there): dc2 from the first answer;
    an instance registered in dc1 later takes the traffic back."""
    dc1, dc2 = federation
    service = unique_service("fed")
    (b1,) = start_backends("dc2-only")
    register_backend(dc2, service, b1.port, service_id=f"{service}-{b1.name}")
    wait_passing(dc2, service, [f"{service}-{b1.name}"])

    proxy = start_proxy(failover_config(dc1, service, DCS))
    addr = proxy.listen(service)
    assert set(await bodies_of(addr, 5)) == {b1.name}
    up: dict[str, Any] = proxy.upstream(service)
    assert up["stale_seconds"] == 0 and up["catalog_index"]
    assert datacenters_of(proxy, service) == {"dc2"}

    (a1,) = start_backends("dc1-late")
    await asyncio.to_thread(register_backend, dc1, service, a1.port,
                            service_id=f"{service}-{a1.name}")
    await first_body_from(addr, {a1.name})
    assert set(await bodies_of(addr, 5)) == {a1.name}
