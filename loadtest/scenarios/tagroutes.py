"""tagroutes: from a service registering with a `urlprefix-` tag to the first request
sdproxy routes to it, and sdproxy's memory and watches, with 10, 100 and 500 tagged
services (issue 12 item 2, measured through sdproxy itself).

A real Consul dev agent, one `loadtest.portsbackend` process (one port for every
background service, one port per measured registration, each answering its own name)
and sdproxy with one `[[listeners]]` entry, `catalog_routes = true`. For each size in
--sizes, the catalog first holds that many services tagged `urlprefix-/base-N/`, every
one of them served through the listener. Then --changes times, one after the other, a
new service registers with `urlprefix-/new-SIZE-K/` and one keep-alive connection asks
the listener for that path every 2 ms until its own instance answers; the delay runs
from just before the registering PUT (agent API, Raft commit, sdproxy's service-list
watch, the new upstream's first catalog answer, the table swap, the request). The same
services are then deregistered one at a time, each timed until its path answers 404.
Per size: p50/p99/max of both, sdproxy's VmRSS (and its growth since no route), its
open connections to the agent (one watch per routed service plus the service list), and
the CPU time sdproxy and the agent spent per change (one registration and its
deregistration, from /proc: what a change costs as the catalog grows).
Target: p99 of register -> routed <= 100 ms at every size.

Consul's agent resets every connection from one client IP beyond
`limits.http_max_conns_per_client` (200 by default), and here every client is
127.0.0.1: with one blocking query per routed service, past ~200 services sdproxy's own
watches and our registering PUTs are reset. The run then stops and says so;
`--conns-per-client N` starts the agent with a higher limit to measure sdproxy beyond it.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from loadtest import common as c
from loadtest import routeprocs as rp

DESCRIPTION = ("delay from a service registering with a urlprefix- tag to its first request "
               "routed by sdproxy (p50/p99), sdproxy RSS and watches at 10/100/500 services")
TARGET_P99 = 0.100
CHANGE_TIMEOUT = 10.0  # a registration not routed within this counts as missed
SETTLE_TIMEOUT = 120.0  # seconds for a size's background services to be routed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="10,100,500",
                        help="tagged services in the catalog, in increasing order "
                             "(default 10,100,500)")
    parser.add_argument("--changes", type=int, default=50,
                        help="registrations measured per size (default 50)")
    parser.add_argument("--conns-per-client", type=int, default=None, metavar="N",
                        help="start the agent with limits.http_max_conns_per_client = N "
                             f"(default: Consul's, {rp.CONSUL_CONNS_PER_CLIENT}; sdproxy "
                             "holds one blocking query per routed service)")


@dataclass
class SizeResult:
    """One size: memory and watches once every route is served, and the delays (s;
    None: not within CHANGE_TIMEOUT)."""

    size: int
    rss_mib: float
    watches: int
    routed: list[float | None]  # register -> the first 200 from its own instance
    dropped: list[float | None]  # deregister -> 404
    # register -> sdproxy's `event=catalog_upstreams added=` line (its tag watch saw the
    # service, made its upstream and published; its log ts, 1 ms resolution)
    seen: list[float | None] = field(default_factory=list)
    sdproxy_cpu: float = 0.0  # CPU seconds sdproxy used per registration + deregistration
    consul_cpu: float = 0.0  # the same for the agent


def delay_stats(delays: Sequence[float | None]) -> list[str]:
    """n seen / n, p50, p99, max of the delays that were seen, as report cells."""
    seen = [d for d in delays if d is not None]
    return [f"{len(seen)}/{len(delays)}", c.ms(c.percentile(seen, 0.5)),
            c.ms(c.percentile(seen, 0.99)), c.ms(max(seen) if seen else None)]


def met(result: SizeResult) -> bool:
    """Every registration routed, and p99 within the target."""
    seen = [d for d in result.routed if d is not None]
    return (bool(seen) and len(seen) == len(result.routed)
            and c.percentile(seen, 0.99) <= TARGET_P99)


def report_table(results: Sequence[SizeResult], base_rss: float) -> str:
    """One row per size: memory, connections to the agent, CPU per change."""
    rows = [[r.size, f"{r.rss_mib:.1f} MiB", f"+{r.rss_mib - base_rss:.1f} MiB", r.watches,
             c.ms(r.sdproxy_cpu), c.ms(r.consul_cpu)] for r in results]
    return c.format_table(["tagged services", "sdproxy RSS", "since 0 routes",
                           "agent conns", "sdproxy CPU/change", "Consul CPU/change"], rows)


def delay_table(results: Sequence[SizeResult]) -> str:
    """Per size, the delays from the change: to sdproxy's tag watch (its log), to the
    first routed request, and from a deregistration to 404."""
    rows = []
    for r in results:
        rows.append([f"{r.size}: register -> tag watch made the upstream", *delay_stats(r.seen)])
        rows.append([f"{r.size}: register -> first request routed", *delay_stats(r.routed)])
        rows.append([f"{r.size}: deregister -> 404", *delay_stats(r.dropped)])
    return c.format_table(["services: from the change", "n", "p50", "p99", "max"], rows)


def upstream_added(proxy: c.Sdproxy, service: str, start: int, since: float) -> float | None:
    """Seconds from `since` (wall) to sdproxy's `event=catalog_upstreams` line (from line
    `start` on) whose `added` names `service`; None when there is none."""
    for wall, fields in proxy.events("catalog_upstreams", start):
        if service in fields.get("added", "").split(","):
            return wall - since
    return None


def parse_sizes(text: str) -> list[int]:
    sizes = [int(s) for s in text.split(",") if s.strip()]
    if not sizes or sizes != sorted(sizes) or sizes[0] < 1:
        raise ValueError(f"--sizes: increasing positive counts, got {text!r}")
    return sizes


def run(args: argparse.Namespace) -> int:
    return c.run_scenario("tagroutes", lambda stack: _run(stack, args))


def _run(stack: contextlib.ExitStack, args: argparse.Namespace) -> int:
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as e:
        raise c.ScenarioError(str(e)) from None
    c.say(f"tagroutes: Consul, sdproxy with catalog_routes; at {args.sizes} tagged "
          f"services, {args.changes} registrations timed to their first routed request")
    agent = rp.start_consul_agent(stack, args.conns_per_client)
    probes = [f"probe-{k}" for k in range(args.changes)]
    backend = rp.start_ports_backends(stack, [["base", *probes]])[0]
    proxy = rp.start_routed_sdproxy(stack, agent.http_addr)
    pid = proxy.child.pid
    agent_port = int(agent.http_addr.rsplit(":", 1)[1])
    assert agent.proc is not None
    agent_pid = agent.proc.pid
    probe = rp.RouteProbe(proxy.listen)
    stack.callback(probe.close)
    base_rss = rp.rss_mib(pid)
    c.say(f"  sdproxy pid {pid}: VmRSS {base_rss:.1f} MiB with no route")

    def register(name: str, port: int) -> None:
        agent.register(rp.tagged_registration(name, name, port, rp.route_tags(f"/{name}/"),
                                              check=False))

    def measure(size: int, already: int) -> SizeResult:
        for i in range(already, size):
            register(f"base-{i}", backend.ports["base"])
        started = time.perf_counter()
        for i in range(size):  # every route served: every upstream has its answer
            if probe.until("", f"/base-{i}/", 200, started, SETTLE_TIMEOUT) is None:
                raise c.ScenarioError(f"/base-{i}/ not routed within {SETTLE_TIMEOUT:g}s")
        proxy.check_alive()
        rss, watches = rp.rss_mib(pid), rp.connections_to(pid, agent_port)
        cpu_before = rp.cpu_seconds(pid), rp.cpu_seconds(agent_pid)
        routed: list[float | None] = []
        seen: list[float | None] = []
        for k, name in enumerate(probes):
            service = f"new-{size}-{k}"
            first_line = len(proxy.child.lines)
            wall0, t0 = time.time(), time.perf_counter()
            register(service, backend.ports[name])
            routed.append(probe.until("", f"/{service}/", 200, t0, CHANGE_TIMEOUT, body=name))
            seen.append(upstream_added(proxy, service, first_line, wall0))
        dropped: list[float | None] = []
        for k in range(args.changes):
            service = f"new-{size}-{k}"
            t0 = time.perf_counter()
            agent.deregister(service)
            dropped.append(probe.until("", f"/{service}/", 404, t0, CHANGE_TIMEOUT))
        proxy.check_alive()
        n = max(1, args.changes)
        return SizeResult(size, rss, watches, routed, dropped, seen,
                          (rp.cpu_seconds(pid) - cpu_before[0]) / n,
                          (rp.cpu_seconds(agent_pid) - cpu_before[1]) / n)

    results: list[SizeResult] = []
    for size in sizes:
        try:
            result = measure(size, results[-1].size if results else 0)
        except OSError as e:  # the agent resets connections beyond its per-client limit
            limit = args.conns_per_client or rp.CONSUL_CONNS_PER_CLIENT
            raise c.ScenarioError(
                f"at {size} services: {e!r}; sdproxy holds "
                f"{rp.connections_to(pid, agent_port)} connections to the agent, whose "
                f"limits.http_max_conns_per_client ({limit}) counts every connection from "
                "127.0.0.1 (ours too); --conns-per-client raises it") from None
        results.append(result)
        c.say(f"  {size} services: RSS {result.rss_mib:.1f} MiB, {result.watches} connections "
              f"to the agent, routed p99 {delay_stats(result.routed)[2]}")

    c.say()
    c.say(f"tagroutes: register with a urlprefix- tag -> first request routed through "
          f"sdproxy ({args.changes} per size, asked every 2 ms on one keep-alive connection; "
          f"{probe.requests} requests, none lost a connection)")
    c.say(delay_table(results))
    c.say()
    c.say(report_table(results, base_rss))
    c.say("  CPU/change: per registered-then-deregistered service, sdproxy's and the agent's "
          "own (utime+stime)")
    c.say()
    ok = all(met(r) for r in results)
    c.say("verdict: routed p99 " + ", ".join(
        f"{delay_stats(r.routed)[2]} at {r.size}" for r in results)
        + f" (target <= {TARGET_P99 * 1000:g} ms): " + ("met" if ok else "NOT met"))
    return 0 if ok else 1
