"""churn: instances register and deregister while paced traffic flows through sdproxy.

Three instances to start with; then every --period seconds one new backend (started
before the load, so Python start-ups do not compete with the traffic for CPU) is
registered with an HTTP check, and the oldest registered one is deregistered and,
--term-delay seconds later, stopped gracefully with SIGTERM (an orchestrator's order:
out of the catalog first, then stop). The client never retries; the figure that matters
is errors (the goal is zero).
The report also says how many pool changes sdproxy saw: the growth of
sdproxy_catalog_updates_total over the run and its event=pool_change log lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
from collections import deque

from loadtest import common as c

DESCRIPTION = "instances register and deregister every ~0.5 s under paced load"
SERVICE = "churn"
INITIAL = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    c.add_load_arguments(parser)
    parser.add_argument("--period", type=float, default=0.5,
                        help="seconds between churn cycles (one in, one out; default 0.5)")
    parser.add_argument("--term-delay", type=float, default=0.25,
                        help="seconds from deregistration to SIGTERM (default 0.25)")


def run(args: argparse.Namespace) -> int:
    return c.run_scenario("churn", lambda stack: _run(stack, args))


def _run(stack: contextlib.ExitStack, args: argparse.Namespace) -> int:
    c.say(f"churn: Consul, {INITIAL} backends, sdproxy; {args.rate:g} GET/s for "
          f"{args.duration:g}s; every {args.period:g}s one instance in, one out (SIGTERM "
          f"{args.term_delay:g}s after deregistration)")
    first = [f"inst-{i}" for i in range(INITIAL)]
    agent, backends, proxy = c.start_proxied_service(stack, SERVICE, first)
    # Every instance that will join is started now, all at once: starting a Python
    # process under load would measure this machine's CPU rather than sdproxy.
    cycles = max(0, int((args.duration - args.period) / args.period))
    spares = list(c.start_backends(stack, [f"inst-{INITIAL + k}" for k in range(cycles)])
                  .values())
    client = c.HttpClient()
    updates_before = proxy.metric("sdproxy_catalog_updates_total", upstream=SERVICE)
    start_line = len(proxy.child.lines)
    registered: deque[str] = deque(first)
    log: list[tuple[float, str]] = []  # (t, what) of every churn action
    stops: list[asyncio.Task[None]] = []

    async def churn(timeline: c.Timeline) -> None:
        try:
            for k, new in enumerate(spares):
                await asyncio.sleep(max(0.0, (k + 1) * args.period - timeline.now()))
                backends[new.name] = new
                await asyncio.to_thread(agent.register, c.backend_service(SERVICE, new))
                registered.append(new.name)
                log.append((timeline.now(), f"+{new.name}"))
                old = registered.popleft()
                await asyncio.to_thread(agent.deregister, old)
                log.append((timeline.now(), f"-{old}"))
                stops.append(asyncio.create_task(stop_later(backends[old], timeline)))
        finally:
            if stops:
                await asyncio.gather(*stops, return_exceptions=True)

    async def stop_later(backend: c.Backend, timeline: c.Timeline) -> None:
        await asyncio.sleep(args.term_delay)
        await asyncio.to_thread(backend.stop, 3.0)
        log.append((timeline.now(), f"stopped {backend.name}"))

    async def main() -> tuple[list[c.Sample], c.Timeline]:
        send = functools.partial(client.get, proxy.listen)
        await c.warm_up(send)
        timeline = c.Timeline()
        churner = asyncio.create_task(churn(timeline))
        try:
            samples = await c.paced_load(send, rate=args.rate, duration=args.duration,
                                         timeline=timeline, timeout=args.timeout)
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(churner, 15)
        return samples, timeline

    samples, timeline = c.run_async(main())
    client.close()
    proxy.check_alive()

    updates = proxy.metric("sdproxy_catalog_updates_total", upstream=SERVICE) - updates_before
    changes = proxy.events("pool_change", start_line)
    added = sum(len([x for x in f.get("added", "-").split(",") if x != "-"]) for _, f in changes)
    removed = sum(len([x for x in f.get("removed", "-").split(",") if x != "-"])
                  for _, f in changes)
    ins = [t for t, what in log if what.startswith("+")]
    outs = [t for t, what in log if what.startswith("-")]
    stopped = [t for t, what in log if what.startswith("stopped")]
    if ins:
        timeline.mark("churn starts", min(ins))
        timeline.mark("churn ends", max(outs))
    total = c.summarize(samples)
    c.say()
    c.say(f"churn through sdproxy: {args.rate:g} GET/s for {args.duration:g}s; every "
          f"{args.period:g}s one instance registered, one deregistered then SIGTERMed after "
          f"{args.term_delay:g}s (client never retries)")
    c.say(c.format_table(["", "run"], c.summary_rows([total])))
    c.say()
    c.say(f"  errors by kind              {c.kinds_text(total.kinds)}")
    if total.errors:
        c.say("  error times (scheduled)     "
              + ", ".join(f"{s.t:.3f}s {s.outcome}" for s in
                          sorted((s for s in samples if not s.ok), key=lambda s: s.t)[:20]))
    c.say(f"  churn actions               {len(ins)} registered, {len(outs)} deregistered, "
          f"{len(stopped)} stopped with SIGTERM")
    c.say(f"  pool changes seen           sdproxy_catalog_updates_total +{updates:g}; "
          f"{len(changes)} event=pool_change lines ({added} added, {removed} removed)")
    c.say(f"  instances that answered     {len(total.backends)} distinct: "
          + ", ".join(f"{b} {n}" for b, n in sorted(total.backends.items(),
                                                       key=lambda kv: int(kv[0].split('-')[-1]))))
    c.say_client(client, total)
    c.say()
    c.say(f"verdict: {total.errors} failed requests through sdproxy out of {total.requests} "
          f"while {len(ins) + len(outs)} registrations changed")

    if args.plot:
        c.save_plot(args.plot, f"churn: 1 instance in + 1 out every {args.period:g}s, "
                    f"{args.rate:g} GET/s for {args.duration:g}s through sdproxy "
                    f"(SIGTERM {args.term_delay:g}s after deregistration)",
                    [c.timeline_panel(f"through sdproxy: {total.errors} errors in "
                                      f"{total.requests} requests, {len(changes)} pool changes",
                                      samples, args.duration, timeline.marks)])
    return 0
