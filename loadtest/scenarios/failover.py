"""failover: kill -9 one of three instances while paced traffic flows through sdproxy.

A real Consul dev agent, three backends registered as one service with HTTP checks every
second, sdproxy in front (discovery consul). An open-model client that never retries
sends --rate GET/s for --duration seconds; half way, one backend gets SIGKILL. The figure
that matters: failed requests through sdproxy (the goal is zero). The report splits the
run at the kill and says when Consul marked the victim critical and when sdproxy's pool
and breaker reacted (from its log lines' own timestamps).

`kill_under_load` and `sdproxy_reactions` are reused by dns_vs_proxy and hang.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Awaitable, Callable

from loadtest import common as c

DESCRIPTION = "kill -9 one of three instances under paced load through sdproxy"
SERVICE = "web"
BACKENDS = ("backend-1", "backend-2", "backend-3")
VICTIM = "backend-2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=500.0, help="GET/s (default 500)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument("--timeout", type=float, default=c.REQUEST_TIMEOUT,
                        help="client timeout per request, from its scheduled send time")


def sdproxy_reactions(proxy: c.Sdproxy, timeline: c.Timeline, victim: str,
                      start: int = 0) -> dict[str, float]:
    """When sdproxy (by its own log ts) opened the victim's breaker and dropped it from
    the pool, in timeline seconds; only the first of each, only from line `start` on."""
    out: dict[str, float] = {}
    for wall, f in proxy.events("breaker_change", start):
        if f.get("instance") == victim and f.get("to") == "open" and "breaker open" not in out:
            out["breaker open"] = timeline.from_wall(wall)
    for wall, f in proxy.events("pool_change", start):
        if victim in f.get("removed", "").split(",") and "pool: removed" not in out:
            out["pool: removed"] = timeline.from_wall(wall)
    return out


def failover_counts(proxy: c.Sdproxy) -> str:
    reasons = c.metric_samples(proxy.metrics(), "sdproxy_failovers_total")
    text = ", ".join(f"{lab.get('reason', '?')} x{v:g}" for lab, v in reasons if v)
    return text or "none"


def kill_under_load(proxy: c.Sdproxy | None, send: Callable[[], Awaitable[c.Response]],
                    *, backends: dict[str, c.Backend], victim: str, consul_addr: str,
                    service: str, rate: float, duration: float, timeout: float,
                    ) -> tuple[list[c.Sample], c.Timeline, c.CheckWatcher, int]:
    """Paced load through `send`, SIGKILL of `victim` half way, Consul watched beside.
    Returns (samples, timeline, watcher, sdproxy log line index when the load began)."""
    start_line = len(proxy.child.lines) if proxy else 0

    async def main() -> tuple[list[c.Sample], c.Timeline, c.CheckWatcher]:
        await c.warm_up(send)
        timeline = c.Timeline()
        watcher = c.CheckWatcher(consul_addr, service, timeline)
        samples = await c.load_with_fault(
            send, rate=rate, duration=duration, timeline=timeline, fault_at=duration / 2,
            fault=backends[victim].kill, label=f"kill -9 {victim}", watcher=watcher,
            timeout=timeout)
        return samples, timeline, watcher

    samples, timeline, watcher = c.run_async(main())
    return samples, timeline, watcher, start_line


def run(args: argparse.Namespace) -> int:
    return c.run_scenario("failover", lambda stack: _run(stack, args))


def _run(stack: contextlib.ExitStack, args: argparse.Namespace) -> int:
    c.say(f"failover: Consul, {len(BACKENDS)} backends, sdproxy; {args.rate:g} GET/s for "
          f"{args.duration:g}s, kill -9 {VICTIM} at t={args.duration / 2:g}s")
    agent = c.start_consul(stack)
    backends = c.start_service(stack, agent, SERVICE, BACKENDS)
    proxy = c.start_sdproxy(stack, agent.http_addr, SERVICE, expect=BACKENDS)
    client = c.HttpClient()
    samples, timeline, watcher, start_line = kill_under_load(
        proxy, functools.partial(client.get, proxy.listen), backends=backends, victim=VICTIM,
        consul_addr=agent.http_addr, service=SERVICE, rate=args.rate,
        duration=args.duration, timeout=args.timeout)
    client.close()
    if not proxy.child.alive():
        raise c.ScenarioError(f"sdproxy exited during the run:\n{proxy.child.output()}")

    killed = next(t for t, label in timeline.marks if label.startswith("kill"))
    critical = watcher.first(VICTIM, "critical", after=killed)
    if critical is not None:
        timeline.mark("Consul: critical", critical)
    reactions = sdproxy_reactions(proxy, timeline, VICTIM, start_line)
    for label, t in reactions.items():
        timeline.mark(f"sdproxy {label}", t)

    before, after = c.split_at(samples, killed)
    columns = [c.summarize(before), c.summarize(after), c.summarize(samples)]
    total = columns[-1]
    c.say()
    c.say(f"failover through sdproxy: {args.rate:g} GET/s for {args.duration:g}s, "
          f"kill -9 {VICTIM} at t={killed:.2f}s (client never retries)")
    c.say(c.format_table(["", "before kill", "after kill", "total"],
                         c.summary_rows(columns, BACKENDS)))
    c.say()
    c.say(f"  errors by kind              {c.kinds_text(total.kinds)}")
    if total.errors:
        c.say(f"  error window                t={total.first_error:.3f}s .. "
              f"t={total.last_error:.3f}s ({total.error_window * 1000:.0f} ms, by scheduled "
              "send time)")
        reused = sum(1 for s in samples if not s.ok and s.reused)
        c.say(f"  errors on reused conns      {reused} of {total.errors}")
    c.say("  Consul marked it critical   " + (f"+{critical - killed:.3f}s after the kill"
                                              if critical is not None else "not seen"))
    for label, t in reactions.items():
        c.say(f"  sdproxy {label:<20}+{t - killed:.3f}s after the kill (log ts)")
    c.say(f"  sdproxy failovers           {failover_counts(proxy)}")
    c.say(f"  client                      {client.connects} connections opened; generator "
          f"send lag p99 {c.ms(total.lag_p99)}")
    c.say("  latency: from each request's scheduled send time, errors included")
    c.say()
    c.say(f"verdict: {total.errors} failed requests through sdproxy out of {total.requests}")

    if args.plot:
        c.plot_timelines(args.plot, f"failover: kill -9 1 of 3 instances, {args.rate:g} GET/s "
                         f"for {args.duration:g}s through sdproxy (no client retries)",
                         [c.Panel(f"through sdproxy: {total.errors} errors in "
                                  f"{total.requests} requests",
                                  c.bucketize(samples, c.BUCKET, args.duration), timeline.marks)])
        c.say(f"plot: {args.plot}")
    return 0
