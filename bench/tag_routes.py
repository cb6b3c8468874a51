"""Delay from a Consul registration to the catalog-routes watch's `on_change`, and memory.

Starts a real Consul dev agent on loopback and runs `CatalogRoutesWatch` (the default
55 s blocking wait) in this process. For each size in --sizes (default 10, 100, 500) the
catalog first holds that many services with a `urlprefix-` tag (plus Consul's own);
then --changes times (default 50), one after the other: a new tagged service is
registered and the delay until `on_change` hands over a map that routes it is measured
from before the registering PUT (agent API call + Raft commit + blocking-query wake-up
+ reading the tags + comparing the maps). The same services are then deregistered, one
at a time, measuring until their route is gone. Also printed per size: the process's
VmRSS once the watch holds the map (and its growth since before the first watch), the
CPU time one answer costs the watch (parse the JSON, read every tag, compare the
maps), and how many blocking-query answers came back per `on_change`.

Usage: python bench/tag_routes.py [--sizes 10,100,500] [--changes 50]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable

import aiohttp

from proxy.config import ConsulConfig
from proxy.devconsul import ConsulAgent
from proxy.discovery.catalog_routes import CatalogRoutesWatch, RoutesMap, decode_services

PREFIX = "urlprefix-"
CHANGE_TIMEOUT = 5.0  # one registration not routed within this: the run fails
ANSWER_REPEATS = 200  # answers handled to time one


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def tagged(name: str, port: int) -> dict[str, object]:
    # No check: the service list does not look at health, and checks would only load the
    # agent. A second, ordinary tag, as real services carry.
    return {"Name": name, "ID": name, "Address": "127.0.0.1", "Port": port,
            "Tags": [f"{PREFIX}{name}.example/", f"{PREFIX}/{name}/", "v1"]}


class Probe:
    """on_change of the watch: notes when it was called and wakes whoever waits for a
    predicate on the map."""

    def __init__(self) -> None:
        self.routes: RoutesMap = {}
        self.calls = 0
        self.seen_at = 0.0  # time.perf_counter() of the last call
        self.changed = asyncio.Condition()

    def on_change(self, routes: RoutesMap) -> None:
        self.seen_at = time.perf_counter()
        self.routes = routes
        self.calls += 1
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def until(self, holds: Callable[[RoutesMap], bool]) -> float:
        """Wait until `holds(routes)`; returns when on_change made it true (in on_change's
        own turn, not when this waiter woke)."""
        async with asyncio.timeout(CHANGE_TIMEOUT), self.changed:
            await self.changed.wait_for(lambda: holds(self.routes))
        return self.seen_at


def summary(delays_ms: list[float]) -> str:
    ordered = sorted(delays_ms)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return (f"p50 {pick(0.5):6.1f}  p90 {pick(0.9):6.1f}  p99 {pick(0.99):6.1f}  "
            f"max {ordered[-1]:6.1f}  mean {statistics.mean(ordered):6.1f}")


async def measure(agent: ConsulAgent, size: int, changes: int, base_rss: float) -> None:
    probe = Probe()
    answers = 0

    answered_at = 0.0  # perf_counter() when the last answer's headers came in

    async def on_request_end(*_: object) -> None:
        nonlocal answers, answered_at
        answers += 1
        answered_at = time.perf_counter()

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_request_end)
    consul = ConsulConfig(address=agent.http_addr)  # wait 55 s, stale, as in production
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        watch = CatalogRoutesWatch(consul, PREFIX, probe.on_change, session=session)
        task = asyncio.create_task(watch.run())
        try:
            await probe.until(lambda r: sum(n.startswith("bench-") for n in r) == size)
            gc.collect()
            rss = rss_mib()
            answers_before, calls_before = answers, probe.calls
            added, dropped, put, answer = [], [], [], []
            names = [f"probe-{size}-{i}" for i in range(changes)]
            for i, name in enumerate(names):
                started = time.perf_counter()
                await asyncio.to_thread(agent.register, tagged(name, 20000 + i))
                put.append((time.perf_counter() - started) * 1000)
                seen = await probe.until(lambda r, n=name: n in r)
                added.append((seen - started) * 1000)
                answer.append((answered_at - started) * 1000)
            for name in names:
                started = time.perf_counter()
                await asyncio.to_thread(agent.deregister, name)
                seen = await probe.until(lambda r, n=name: n not in r)
                dropped.append((seen - started) * 1000)
            wakeups = answers - answers_before
            calls = probe.calls - calls_before
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
    answer_us = await asyncio.to_thread(answer_cost, agent, consul)
    print(f"\n{size} tagged services ({2 * size} routes): VmRSS {rss:.1f} MiB "
          f"(+{rss - base_rss:.1f} MiB since before the first watch); {wakeups} answers for "
          f"{calls} on_change calls; CPU per changed answer (JSON, tags, new map) "
          f"{answer_us:.0f} us")
    print(f"  register   -> on_change (ms, {changes}): {summary(added)}")
    print(f"    of which the registering PUT:  {summary(put)}")
    print(f"    Consul's answer in:            {summary(answer)}")
    print(f"  deregister -> on_change (ms, {changes}): {summary(dropped)}")


def answer_cost(agent: ConsulAgent, consul: ConsulConfig) -> float:
    """CPU microseconds the watch spends on one answer in which one service's route
    changed: decode the JSON, read the changed tags, build and give the map."""
    with agent.open_api("GET", "/v1/catalog/services") as resp:
        text = resp.read().decode()
    watch = CatalogRoutesWatch(consul, PREFIX, lambda routes: None)
    body = json.loads(text)
    body["probe-extra"] = tagged("probe-extra", 1)["Tags"]
    texts = (text, json.dumps(body))
    watch.handle_answer(decode_services(json.loads(text)), "1")
    started = time.process_time()
    for i in range(ANSWER_REPEATS):
        watch.handle_answer(decode_services(json.loads(texts[i % 2])), str(i + 2))
    return (time.process_time() - started) / ANSWER_REPEATS * 1e6


async def main(sizes: list[int], changes: int) -> int:
    with ConsulAgent(node="bench-tag-routes") as agent:
        gc.collect()
        base_rss = rss_mib()
        print(f"Consul dev agent {agent.http_addr}; this process before the first watch: "
              f"VmRSS {base_rss:.1f} MiB")
        registered = 0
        for size in sorted(sizes):
            for i in range(registered, size):
                await asyncio.to_thread(agent.register, tagged(f"bench-{i}", 10000 + i))
            registered = size
            await measure(agent, size, changes, base_rss)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,500",
                        help="comma-separated counts of tagged services")
    parser.add_argument("--changes", type=int, default=50,
                        help="registrations measured per size")
    args = parser.parse_args()
    sys.exit(asyncio.run(main([int(s) for s in args.sizes.split(",")], args.changes)))
