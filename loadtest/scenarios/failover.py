"""failover: kill -9 one of three instances while paced traffic flows through sdproxy.

A real Consul dev agent, three backends registered as one service with HTTP checks every
second, sdproxy in front (discovery consul). An open-model client that never retries
sends --rate GET/s for --duration seconds; half way, one backend gets SIGKILL. The figure
that matters: failed requests through sdproxy (the goal is zero). The report splits the
run at the kill and says when Consul marked the victim critical and when sdproxy's pool
and breaker reacted (from its log lines' own timestamps).

Its setup (SERVICE, BACKENDS, VICTIM) is reused by hang; the fault-under-load steps it
shares with hang and dns_vs_proxy are in `loadtest.common`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools

from loadtest import common as c

DESCRIPTION = "kill -9 one of three instances under paced load through sdproxy"
SERVICE = "web"
BACKENDS = ("backend-1", "backend-2", "backend-3")
VICTIM = "backend-2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    c.add_load_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return c.run_scenario("failover", lambda stack: _run(stack, args))


def _run(stack: contextlib.ExitStack, args: argparse.Namespace) -> int:
    c.say(f"failover: Consul, {len(BACKENDS)} backends, sdproxy; {args.rate:g} GET/s for "
          f"{args.duration:g}s, kill -9 {VICTIM} at t={args.duration / 2:g}s")
    agent, backends, proxy = c.start_proxied_service(stack, SERVICE, BACKENDS)
    client = c.HttpClient()
    samples, timeline, watcher, start_line = c.kill_under_load(
        proxy, functools.partial(client.get, proxy.listen), backends=backends, victim=VICTIM,
        consul_addr=agent.http_addr, service=SERVICE, rate=args.rate,
        duration=args.duration, timeout=args.timeout)
    client.close()
    proxy.check_alive()

    killed = timeline.mark_time("kill")
    critical, reactions = c.mark_reactions(timeline, watcher, VICTIM, killed, proxy, start_line)

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
    c.say(f"  sdproxy failovers           {c.failover_counts(proxy)}")
    c.say_client(client, total)
    c.say()
    c.say(f"verdict: {total.errors} failed requests through sdproxy out of {total.requests}")

    if args.plot:
        c.save_plot(args.plot, f"failover: kill -9 1 of 3 instances, {args.rate:g} GET/s "
                    f"for {args.duration:g}s through sdproxy (no client retries)",
                    [c.timeline_panel(f"through sdproxy: {total.errors} errors in "
                                      f"{total.requests} requests",
                                      samples, args.duration, timeline.marks)])
    return 0
