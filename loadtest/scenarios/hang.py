"""hang: SIGSTOP one of three instances under paced load through sdproxy.

Like failover, but the victim hangs instead of dying: the kernel keeps accepting its
connections and nobody answers, so only timeouts tell. sdproxy runs with
request_timeout --request-timeout (default 1s) and breaker failures --breaker-failures
(default 3); a request that waited on the victim is retried elsewhere after the timeout,
so it succeeds, late. The report counts the errors and the latency cost: how many
requests were slow (over --slow-ms), how slow, and when the breaker opened (from
sdproxy's log ts) and Consul marked the victim critical. The victim gets SIGCONT when
the load ends.
"""

from __future__ import annotations

import argparse
import contextlib
import functools

from loadtest import common as c
from loadtest.scenarios.failover import BACKENDS, SERVICE, VICTIM

DESCRIPTION = "SIGSTOP one of three instances under paced load (request_timeout, breaker)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    c.add_load_arguments(parser)
    parser.add_argument("--request-timeout", default="1s",
                        help='sdproxy request_timeout (default "1s")')
    parser.add_argument("--breaker-failures", type=int, default=3,
                        help="sdproxy breaker failures (default 3)")
    parser.add_argument("--slow-ms", type=float, default=250.0,
                        help="a request slower than this counts as slow (default 250)")


def run(args: argparse.Namespace) -> int:
    return c.run_scenario("hang", lambda stack: _run(stack, args))


def _run(stack: contextlib.ExitStack, args: argparse.Namespace) -> int:
    c.say(f"hang: Consul, {len(BACKENDS)} backends, sdproxy (request_timeout "
          f"{args.request_timeout}, breaker failures {args.breaker_failures}); {args.rate:g} "
          f"GET/s for {args.duration:g}s, SIGSTOP {VICTIM} at t={args.duration / 2:g}s")
    settings = {"request_timeout": args.request_timeout,
                "breaker": {"failures": args.breaker_failures}}
    agent, backends, proxy = c.start_proxied_service(stack, SERVICE, BACKENDS, settings)
    victim = backends[VICTIM]
    client = c.HttpClient()
    samples, timeline, watcher, start_line = c.fault_under_load(
        proxy, functools.partial(client.get, proxy.listen), fault=victim.pause,
        label=f"SIGSTOP {VICTIM}", recover=victim.resume, recover_label=f"SIGCONT {VICTIM}",
        consul_addr=agent.http_addr, service=SERVICE, rate=args.rate, duration=args.duration,
        timeout=args.timeout)
    client.close()
    proxy.check_alive()

    stopped = timeline.mark_time("SIGSTOP")
    critical, reactions = c.mark_reactions(timeline, watcher, VICTIM, stopped, proxy, start_line)
    opened = reactions.get("breaker open")

    before, after = c.split_at(samples, stopped)
    columns = [c.summarize(before), c.summarize(after), c.summarize(samples)]
    total = columns[-1]
    slow_limit = args.slow_ms / 1000
    slow = [s for s in samples if s.latency > slow_limit]
    slow_lat = [s.latency for s in slow]
    base_p50 = columns[0].p50
    c.say()
    c.say(f"hang through sdproxy: {args.rate:g} GET/s for {args.duration:g}s, SIGSTOP "
          f"{VICTIM} at t={stopped:.2f}s, request_timeout {args.request_timeout}, breaker "
          f"failures {args.breaker_failures} (client never retries)")
    c.say(c.format_table(["", "before stop", "after stop", "total"],
                         c.summary_rows(columns, BACKENDS)))
    c.say()
    c.say(f"  errors by kind              {c.kinds_text(total.kinds)}")
    c.say(f"  slow requests (> {args.slow_ms:g} ms)   {len(slow)} of {len(samples)}"
          + (f": latency p50 {c.ms(c.percentile(slow_lat, 0.5))}, max "
             f"{c.ms(max(slow_lat))}" if slow else ""))
    if slow:
        first, last = min(s.t for s in slow), max(s.t for s in slow)
        c.say(f"  slow ones scheduled         t={first:.3f}s .. t={last:.3f}s "
              f"({first - stopped:+.3f}s .. {last - stopped:+.3f}s from the stop)")
        cost = sum(s.latency - base_p50 for s in slow)
        c.say(f"  latency cost                {cost:.1f} request-seconds above the "
              f"pre-stop p50 ({c.ms(base_p50)})")
        if opened is not None:
            late = sum(1 for s in slow if s.t >= opened)
            c.say(f"  slow ones sent after the breaker opened   {late}")
    c.say("  sdproxy breaker open        " + (f"+{opened - stopped:.3f}s after the stop "
                                              "(log ts)" if opened is not None else "not seen"))
    if "pool: removed" in reactions:
        c.say(f"  sdproxy pool: removed       +{reactions['pool: removed'] - stopped:.3f}s "
              "after the stop (log ts)")
    c.say("  Consul marked it critical   " + (f"+{critical - stopped:.3f}s after the stop"
                                              if critical is not None else "not seen"))
    c.say(f"  sdproxy failovers           {c.failover_counts(proxy)}")
    c.say_client(client, total)
    c.say()
    c.say(f"verdict: {total.errors} failed and {len(slow)} slow requests while {VICTIM} hung")

    if args.plot:
        c.save_plot(args.plot, f"hang: SIGSTOP 1 of 3 instances, {args.rate:g} GET/s for "
                    f"{args.duration:g}s through sdproxy (request_timeout "
                    f"{args.request_timeout}, breaker failures {args.breaker_failures})",
                    [c.timeline_panel(f"through sdproxy: {total.errors} errors, {len(slow)} "
                                      f"requests > {args.slow_ms:g} ms",
                                      samples, args.duration, timeline.marks)])
    return 0
