"""catalog: the delay from a catalog change to sdproxy's pool swap, over --changes changes.

A real registry (`--discovery consul`, the default, `etcd` or `zookeeper`) and sdproxy in
front of one service with a base instance. Then --changes times an instance comes or goes:
- consul: registered or deregistered through the agent API (`--kind register`, the
  default), or its TTL check turns critical or passing (`--kind health`);
- etcd: its Registrator key `<prefix>/<service>/<id>` = `ip:port` is put or deleted
  (`--kind register` only: a TTL lapse is a DELETE that etcd's lease timer times);
- zookeeper: its Curator znode `<base>/<service>/<id>` (ephemeral, in a session of ours)
  is created or deleted (`--kind register` only: a session expiry is such a delete).
The change time is taken just before the API call; the swap time is the `ts` sdproxy
writes on its `event=pool_change` line for that instance (its own clock, 1 ms resolution,
truncated), so no polling error is added. Beside it, our own watcher (a Consul blocking
query on /v1/health/service/SERVICE?passing, or an etcd watch on the service's keys)
(or a ZooKeeper child watch) records when the registry itself let a watcher see the
change: the difference is what sdproxy adds. Changes are spaced by 10-30 ms (random, seeded) after the previous one was
seen, so they do not pile up into one catalog answer. Target: p99 <= 50 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import random
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Protocol

from loadtest import common as c
from loadtest.etcdprocs import EtcdEventWatcher, start_etcd, start_sdproxy_etcd
from loadtest.zkprocs import ChildWatcher, start_sdproxy_zookeeper, start_zookeeper, zk_session

DESCRIPTION = ("delay from a catalog change (Consul, etcd or ZooKeeper) to sdproxy's pool "
               "swap (p50/p99)")
SERVICE = "catalog-probe"
TARGET_P99 = 0.050
SEEN_TIMEOUT = 2.0  # seconds for sdproxy to show one change
ETCD_PREFIX = "/services"
ZK_BASE = "/services"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--changes", type=int, default=100, help="changes to make (default 100)")
    parser.add_argument("--discovery", choices=tuple(REGISTRIES), default="consul",
                        help="the registry sdproxy watches (default consul)")
    parser.add_argument("--kind", choices=("register", "health"), default="register",
                        help="register/deregister an instance (default) or flip its TTL "
                             "check (consul only)")
    parser.add_argument("--seed", type=int, default=1, help="seeds the gaps between changes")


class OwnWatcher(Protocol):
    def first(self, after: float, holds: Callable[[frozenset[str]], bool],
              timeout: float = 1.0) -> float | None: ...


class PassingWatcher(threading.Thread):
    """Our own Consul watcher: blocking queries for the passing instances; `answers` is
    [(wall time, ids)] of every answer. Stops within ~1 s of `stop.set()`."""

    def __init__(self, consul_addr: str, service: str) -> None:
        super().__init__(name="passing-watcher", daemon=True)
        self.url = f"{consul_addr}/v1/health/service/{service}?passing"
        self.answers: list[tuple[float, frozenset[str]]] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        index = 0
        while not self.stop.is_set():
            try:
                with urllib.request.urlopen(f"{self.url}&index={index}&wait=1s",
                                            timeout=5) as resp:
                    new = int(resp.headers.get("X-Consul-Index", "0"))
                    ids = frozenset(e["Service"]["ID"] for e in json.load(resp))
            except (OSError, ValueError, KeyError):
                time.sleep(0.05)
                continue
            now = time.time()
            index = new if new >= index else 0  # an index going back means start over
            with self.lock:
                self.answers.append((now, ids))

    def first(self, after: float, holds: Callable[[frozenset[str]], bool],
              timeout: float = 1.0) -> float | None:
        """Wall time of the first answer since `after` for which `holds(ids)`; waits up
        to `timeout` for it (this thread may be behind sdproxy), None if none came."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = next((t for t, ids in self.answers if t >= after and holds(ids)), None)
            if found is not None or time.monotonic() > deadline:
                return found
            time.sleep(0.001)


# -- one driver per registry: start it and sdproxy, make one change ---------------------------
class Registry(Protocol):
    name: str  # as the report names the registry
    change_text: str  # what one change is
    own_watcher: str  # what our own watcher is
    proxy: c.Sdproxy
    watcher: OwnWatcher

    def change(self, k: int, iid: str, present: bool) -> None: ...


class ConsulRegistry:
    name = "Consul"
    own_watcher = "our own blocking query's answer"

    def __init__(self, stack: contextlib.ExitStack, kind: str) -> None:
        self.kind = kind
        self.change_text = ("register/deregister an instance" if kind == "register"
                            else "TTL check critical/passing")
        self.agent = agent = c.start_consul(stack)
        self.ttl = {"TTL": "1h", "Status": "passing"}
        agent.register({"Name": SERVICE, "ID": "base", "Address": "127.0.0.1", "Port": 1,
                        "Check": self.ttl})
        if kind == "health":
            agent.register({"Name": SERVICE, "ID": "probe", "Address": "127.0.0.1", "Port": 2,
                            "Check": {**self.ttl, "CheckID": "probe-ttl"}})
        base_ids = {"base"} | ({"probe"} if kind == "health" else set())
        c.wait_passing(agent, SERVICE, base_ids)
        self.proxy = c.start_sdproxy(stack, agent.http_addr, SERVICE, expect=base_ids)
        watcher = PassingWatcher(agent.http_addr, SERVICE)
        watcher.start()
        stack.callback(watcher.join, 3)
        stack.callback(watcher.stop.set)
        self.watcher = watcher

    def change(self, k: int, iid: str, present: bool) -> None:
        if self.kind == "health":
            (self.agent.check_pass if present else self.agent.check_fail)("probe-ttl")
        elif present:
            self.agent.register({"Name": SERVICE, "ID": iid, "Address": "127.0.0.1",
                                 "Port": 1000 + k // 2, "Check": self.ttl})
        else:
            self.agent.deregister(iid)


class EtcdRegistry:
    name = "etcd"
    change_text = "put/delete an instance's key"
    own_watcher = "our own etcd watch's event"

    def __init__(self, stack: contextlib.ExitStack, kind: str) -> None:
        if kind != "register":
            raise c.ScenarioError("--discovery etcd takes --kind register only (an etcd key "
                                  "has no health check)")
        self.server = server = start_etcd(stack)
        server.put(self.key("base"), "127.0.0.1:1")
        self.proxy = start_sdproxy_etcd(stack, server.url, ETCD_PREFIX, SERVICE, {"base"})
        watcher = EtcdEventWatcher(server, f"{ETCD_PREFIX}/{SERVICE}/".encode())
        watcher.start()
        stack.callback(watcher.join, 3)
        stack.callback(watcher.stop)
        if not watcher.ready.wait(c.START_TIMEOUT):
            raise c.ScenarioError("our own etcd watch did not start")
        self.watcher = watcher

    @staticmethod
    def key(iid: str) -> str:
        return f"{ETCD_PREFIX}/{SERVICE}/{iid}"

    def change(self, k: int, iid: str, present: bool) -> None:
        if present:
            self.server.put(self.key(iid), f"127.0.0.1:{1000 + k // 2}")
        else:
            self.server.delete(self.key(iid))


class ZooKeeperRegistry:
    name = "ZooKeeper"
    change_text = "create/delete an instance's ephemeral znode"
    own_watcher = "our own child watch's event"

    def __init__(self, stack: contextlib.ExitStack, kind: str) -> None:
        from proxy import devzk

        if kind != "register":
            raise c.ScenarioError("--discovery zookeeper takes --kind register only (a "
                                  "znode has no health check)")
        self.devzk = devzk
        server = start_zookeeper(stack)
        self.session = zk_session(stack, server.hosts)  # owns the instances' znodes
        self.create("base", 1, makepath=True)
        self.proxy = start_sdproxy_zookeeper(stack, server.hosts, ZK_BASE, SERVICE, {"base"})
        # A session of its own, as sdproxy has: its events cross the same server.
        self.watcher = ChildWatcher(zk_session(stack, server.hosts), f"{ZK_BASE}/{SERVICE}")

    def create(self, iid: str, port: int, *, makepath: bool = False) -> None:
        self.session.create(self.devzk.instance_path(ZK_BASE, SERVICE, iid),
                            self.devzk.curator_instance(SERVICE, iid, "127.0.0.1", port),
                            ephemeral=True, makepath=makepath)

    def change(self, k: int, iid: str, present: bool) -> None:
        if present:
            self.create(iid, 1000 + k // 2)
        else:
            self.session.delete(self.devzk.instance_path(ZK_BASE, SERVICE, iid))


REGISTRIES: dict[str, Callable[[contextlib.ExitStack, str], Registry]] = {
    "consul": ConsulRegistry,
    "etcd": EtcdRegistry,
    "zookeeper": ZooKeeperRegistry,
}


def run(args: argparse.Namespace) -> int:
    return c.run_scenario("catalog", lambda stack: _run(stack, args))


def _names(key: str, iid: str, text: str) -> bool:
    """An `event=pool_change` line whose `key` (added/removed) lists instance `iid`."""
    if "event=pool_change " not in text:
        return False
    return iid in c.parse_logfmt(text).get(key, "").split(",")


def _shows(iid: str, present: bool, ids: frozenset[str]) -> bool:
    return (iid in ids) == present


def _run(stack: contextlib.ExitStack, args: argparse.Namespace) -> int:
    c.say(f"catalog: {args.discovery} and sdproxy; {args.changes} changes ({args.kind}), "
          "delay from each change to sdproxy's pool swap")
    registry = REGISTRIES[args.discovery](stack, args.kind)
    proxy, watcher = registry.proxy, registry.watcher
    rng = random.Random(args.seed)
    t0 = time.time()

    # (t since start, delay to sdproxy's swap, delay to our watcher, API call duration)
    rows: list[tuple[float, float | None, float | None, float]] = []
    missed = 0
    for k in range(args.changes):
        present = k % 2 == 1 if args.kind == "health" else k % 2 == 0
        iid = "probe" if args.kind == "health" else f"probe-{k // 2}"
        start_line = len(proxy.child.lines)
        started = time.time()
        registry.change(k, iid, present)
        called = time.time() - started
        key = "added" if present else "removed"
        try:
            line = proxy.child.wait_line(functools.partial(_names, key, iid),
                                         f"event=pool_change {key}={iid}",
                                         timeout=SEEN_TIMEOUT, start=start_line)
            swapped = c.log_wall_time(line.text)
            swap = None if swapped is None else swapped - started
        except c.ScenarioError:
            if not proxy.child.alive():
                raise
            swap = None
            missed += 1
        seen = watcher.first(started, functools.partial(_shows, iid, present))
        rows.append((started - t0, swap, None if seen is None else seen - started, called))
        time.sleep(rng.uniform(0.010, 0.030))

    swaps = [r[1] for r in rows if r[1] is not None]
    direct = [r[2] for r in rows if r[2] is not None]
    calls = [r[3] for r in rows]
    behind = [r[1] - r[2] for r in rows if r[1] is not None and r[2] is not None]

    def stats(values: list[float]) -> list[str]:
        return [str(len(values)), *(c.ms(c.percentile(values, q)) for q in (0.5, 0.9, 0.99)),
                c.ms(max(values) if values else None),
                c.ms(sum(values) / len(values) if values else None)]

    c.say()
    c.say(f"catalog: {args.changes} {registry.name} changes ({args.kind}: "
          f"{registry.change_text}) -> sdproxy pool swap")
    c.say(c.format_table(
        ["delay from the change", "n", "p50", "p90", "p99", "max", "mean"],
        [["to sdproxy's pool swap (its log ts)", *stats(swaps)],
         [f"to {registry.own_watcher}", *stats(direct)],
         ["sdproxy minus our watcher (<0: sdproxy first)", *stats(behind)],
         [f"{registry.name} API call itself", *stats(calls)]]))
    c.say()
    c.say(f"  the change time is taken just before the {registry.name} API call; sdproxy's "
          "log ts has 1 ms resolution (truncated)")
    if missed:
        c.say(f"  {missed} changes were not seen by sdproxy within {SEEN_TIMEOUT:g}s")
    p99 = c.percentile(swaps, 0.99)
    ok = not missed and swaps and p99 <= TARGET_P99
    c.say()
    c.say(f"verdict: p99 {c.ms(p99)} (target <= {TARGET_P99 * 1000:g} ms): "
          + ("met" if ok else "NOT met"))

    if args.plot:
        plot(args.plot, rows, args, registry)
        c.say(f"plot: {args.plot}")
    return 0


def plot(path: str, rows: list[tuple[float, float | None, float | None, float]],
         args: argparse.Namespace, registry: Registry) -> None:
    """Delay per change over time: sdproxy's swap, our own watcher, the 50 ms target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.8))
    series = ((f"{registry.name} change -> sdproxy pool swap", "#d62728",
               [(r[0], r[1]) for r in rows]),
              (f"{registry.name} change -> {registry.own_watcher}", "#1f77b4",
               [(r[0], r[2]) for r in rows]))
    for label, color, points in series:
        pts = [(t, d * 1000) for t, d in points if d is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, lw=0.8, color=color,
                label=label)
    ax.axhline(TARGET_P99 * 1000, color="#7f7f7f", ls="--", lw=1)
    ax.annotate(f"target p99 {TARGET_P99 * 1000:g} ms", xy=(0, TARGET_P99 * 1000),
                xycoords=("axes fraction", "data"), xytext=(4, 4), textcoords="offset points",
                fontsize=8, color="#7f7f7f")
    ax.set_xlabel("time of the change since the first one (s)")
    ax.set_ylabel("delay (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"catalog: delay from a {registry.name} change to sdproxy's pool swap, "
                 f"{args.changes} changes ({args.kind})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
