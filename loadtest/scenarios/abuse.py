"""abuse: a well-behaved client beside hostile clients and a broken instance.

Real processes on loopback: a Consul dev agent, three demo backends registered as
SERVICE, sdproxy (http mode) in front with tight limits (header_timeout, idle_timeout,
request_timeout, max_connections below what the flood holds), one
`loadtest.brokenbackend` and one `loadtest.attackers` process (niced, so its CPU cost
does not land on the measured client). The well-behaved client is open-model, never
retries, sends --rate GET/s throughout on a fixed keep-alive pool opened before the clock
starts (`SteadyClient`); a control client sends --control-rate GET/s straight to
BACKENDS[0], so the report can tell the machine's and the instances' share of a slowdown
from sdproxy's. Three phases:
- baseline (--baseline s): the clients alone, the three good instances;
- abuse (--duration s): the broken instance joins SERVICE (its health check passes; every
  other answer is an endless head, garbage, a valid response with a smuggled one behind
  it, or a reset mid-download), and the attackers start: pipeliners, header drippers,
  clients that never read a large download, slow uploaders and, from half way (once it
  holds every max_connections slot, every new connection is refused), a connection flood
  up to the fd limit;
- after (--after s): the broken instance deregistered, the attackers gone.
sdproxy's VmRSS, open fds and CPU time are sampled every SAMPLE_EVERY s, in a thread.

Targets: the client gets no error in any phase (a response smuggled by the broken
instance counts as one), and its p99 under abuse is at most P99_RATIO_TARGET times its
baseline p99. Exit 0 when both hold, 1 when not (each failure printed). The report also
says what sdproxy did to each attacker, what the broken instance sent, and sdproxy's
breaker, idle-timeout, retry-budget and max_connections figures, so that a failure
comes with its evidence; `--plot` draws the client's throughput, errors and latency,
the control's p99, and sdproxy's RSS and fds over the three phases.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import math
import signal
import sys
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Self

from loadtest import common as c
from loadtest import trend as tr
from loadtest.brokenbackend import SMUGGLED_BODY

DESCRIPTION = ("a well-behaved client beside pipeliners, slowloris, non-readers, a connection "
               "flood, slow uploads and a broken instance: its p99 and errors, sdproxy's RSS")
SERVICE = "abuse"
BACKENDS = ("backend-1", "backend-2", "backend-3")
BROKEN = "broken-1"
P99_RATIO_TARGET = 2.0
SAMPLE_EVERY = 0.5  # seconds between two readings of sdproxy's RSS and fds
REPORT_TIMEOUT = 20.0  # seconds past the abuse for the attackers' report
CONTROL_CONNECTIONS = 8  # the control client's pool
PLOT_BUCKET = 0.25  # seconds per bucket of the plot
MiB = 1024 * 1024
DESYNC = "desync: smuggled response"
PHASES = ("baseline", "abuse", "after")
ATTACKERS = {"pipeline": "pipeliners", "drip": "header drippers", "nonread": "non-readers",
             "flood": "connection flood", "upload": "slow uploaders"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    c.add_load_arguments(parser, duration=20.0, duration_help="seconds of abuse (default 20)")
    parser.set_defaults(rate=300.0)
    parser.add_argument("--client-connections", type=int, default=32,
                        help="the client's keep-alive pool, opened up front (default 32)")
    parser.add_argument("--control-rate", type=float, default=100.0,
                        help=f"GET/s of a control client straight to {BACKENDS[0]}, "
                        "bypassing sdproxy: what the abuse costs without sdproxy in the "
                        "path (the machine's and the instances' share); 0: none "
                        "(default 100)")
    parser.add_argument("--baseline", type=float, default=10.0,
                        help="seconds of the client alone first (default 10)")
    parser.add_argument("--after", type=float, default=5.0,
                        help="seconds of the client alone after the abuse (default 5)")
    g = parser.add_argument_group("sdproxy")
    g.add_argument("--header-timeout", default="2s")
    g.add_argument("--idle-timeout", default="5s")
    g.add_argument("--request-timeout", default="3s",
                   help="below --upload-seconds, so a cut upload shows (default 3s)")
    g.add_argument("--max-connections", type=int, default=2000,
                   help="below what the flood holds (--flood-rate x header_timeout), so the "
                   "flood hits it (default 2000)")
    g = parser.add_argument_group("attackers (see python -m loadtest.attackers --help)")
    g.add_argument("--pipeliners", type=int, default=2)
    g.add_argument("--pipeline-depth", type=int, default=2000)
    g.add_argument("--drippers", type=int, default=100)
    g.add_argument("--non-readers", type=int, default=20)
    g.add_argument("--flood", type=int, default=20000,
                   help="flood connections at once, at most (bounded by the fd limit)")
    g.add_argument("--flood-rate", type=float, default=2000.0)
    g.add_argument("--flood-delay", type=float, default=None,
                   help="seconds into the abuse the flood starts (default: half way); "
                   "once it holds every slot, the other attackers' new connections are "
                   "refused too, so they get the first half to themselves")
    g.add_argument("--slow-uploaders", type=int, default=10)
    g.add_argument("--upload-seconds", type=float, default=8.0)
    g.add_argument("--no-broken", action="store_true",
                   help="leave the broken instance out (client-side abuse only)")


def run(args: argparse.Namespace) -> int:
    return c.run_scenario("abuse", lambda stack: _run(stack, args))


# === pure parts ==========================================================================
def flag_desync(samples: Sequence[c.Sample]) -> list[c.Sample]:
    """The samples with every answer whose body was the broken instance's smuggled
    response turned into an error: the client read bytes meant for nobody."""
    marker = SMUGGLED_BODY.decode()
    return [dataclasses.replace(s, outcome=DESYNC, backend="") if s.backend == marker else s
            for s in samples]


def phase_of(t: float, baseline: float, duration: float) -> str:
    return "baseline" if t < baseline else "abuse" if t < baseline + duration else "after"


def p99_ratio(baseline: c.Summary, abuse: c.Summary) -> float:
    """Abuse p99 over baseline p99 (NaN when either is unknown or the baseline is 0)."""
    if math.isnan(baseline.p99) or math.isnan(abuse.p99) or baseline.p99 <= 0:
        return math.nan
    return abuse.p99 / baseline.p99


def verdict(phases: Mapping[str, c.Summary], max_ratio: float = P99_RATIO_TARGET) -> list[str]:
    """What failed the targets (empty: they hold): any error of the well-behaved client,
    and an abuse p99 above `max_ratio` times the baseline's (or none measured)."""
    failures = []
    for name, summary in phases.items():
        if summary.errors:
            failures.append(f"{summary.errors} errors for the well-behaved client during "
                            f"{name} ({c.kinds_text(summary.kinds)})")
    ratio = p99_ratio(phases["baseline"], phases["abuse"])
    if math.isnan(ratio):
        failures.append("no p99 ratio: a phase without a measured request")
    elif ratio > max_ratio:
        failures.append(f"p99 under abuse {c.ms(phases['abuse'].p99)} is {ratio:.2f}x the "
                        f"baseline's {c.ms(phases['baseline'].p99)} (target <= {max_ratio:g}x)")
    return failures


def sdproxy_share(r: Any) -> str:
    """The good client's p99 rise beside the control's, which no proxy stood in front of:
    on a shared machine the attackers slow everything, and only the difference is
    sdproxy's."""
    through = p99_ratio(r.summaries["baseline"], r.summaries["abuse"])
    if "baseline" not in r.direct_summaries or "abuse" not in r.direct_summaries:
        return ""
    direct = p99_ratio(r.direct_summaries["baseline"], r.direct_summaries["abuse"])
    if math.isnan(through) or math.isnan(direct) or direct <= 0:
        return ""
    return (f"x{through:.2f} through sdproxy, x{direct:.2f} for the control straight to "
            f"{BACKENDS[0]}: sdproxy's own share x{through / direct:.2f}")


@dataclasses.dataclass(frozen=True)
class Resources:
    """sdproxy's peak RSS (bytes) and open fds, and its CPU share, over some samples."""

    peak_rss: int
    peak_fds: int
    cpu_share: float  # CPU seconds per wall second (1.0: one core busy); NaN if unknown


def resources(samples: Sequence[tr.ProcessSample]) -> Resources:
    if not samples:
        return Resources(0, 0, math.nan)
    span = samples[-1].t - samples[0].t
    cpu = (samples[-1].cpu - samples[0].cpu) / span if span > 0 else math.nan
    return Resources(max(s.rss for s in samples), max(s.fds for s in samples), cpu)


def outcomes_text(figures: Mapping[str, Any]) -> str:
    """One attacker kind's outcomes from its report: `what xN (p50 .., max ..)`, most
    frequent first."""
    seconds = figures.get("seconds", {})
    parts = []
    for outcome, count in figures.get("outcomes", {}).items():
        text = f"{outcome} x{count}"
        dist = seconds.get(outcome)
        if dist and dist.get("p50") is not None:
            text += f" (after p50 {_secs(dist['p50'])}, max {_secs(dist['max'])})"
        parts.append(text)
    return "; ".join(parts) or "nothing recorded"


def _secs(value: float) -> str:
    return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"


# === the run =============================================================================
def _attacker_argv(args: argparse.Namespace, listen: c.Addr) -> list[str]:
    return [sys.executable, "-m", "loadtest.attackers", "--target", f"{listen[0]}:{listen[1]}",
            "--duration", f"{args.duration:g}", "--pipeliners", str(args.pipeliners),
            "--pipeline-depth", str(args.pipeline_depth), "--drippers", str(args.drippers),
            "--non-readers", str(args.non_readers), "--flood", str(args.flood),
            "--flood-rate", f"{args.flood_rate:g}", "--flood-delay", f"{flood_delay(args):g}",
            "--slow-uploaders", str(args.slow_uploaders),
            "--upload-seconds", f"{args.upload_seconds:g}"]


def split_phases(samples: Sequence[c.Sample], args: argparse.Namespace,
                 ) -> dict[str, list[c.Sample]]:
    by_phase: dict[str, list[c.Sample]] = {name: [] for name in PHASES}
    for s in samples:
        by_phase[phase_of(s.t, args.baseline, args.duration)].append(s)
    return by_phase


def flood_delay(args: argparse.Namespace) -> float:
    return float(args.duration / 2 if args.flood_delay is None else args.flood_delay)


def start_broken(stack: contextlib.ExitStack) -> c.Backend:
    """The broken instance, listening, not registered yet."""
    child = c.Child(BROKEN, [sys.executable, "-m", "loadtest.brokenbackend", "--port", "0",
                             "--name", BROKEN])
    stack.callback(child.stop, 3.0)
    line = child.wait_for("event=backend_listening", f"name={BROKEN}")
    return c.Backend(BROKEN, int(c.parse_logfmt(line)["port"]), child)


class SteadyClient(c.HttpClient):
    """The well-behaved client: HttpClient with a fixed pool (`pool_size`, all opened
    before the clock starts by `open_pool`) whose idle connections are reused oldest
    first. Every connection then carries a request every pool_size/rate s, so none sits
    idle long enough for sdproxy's keep-alive close to race a request, and none has to
    be opened during the abuse, when the flood holds every max_connections slot: a
    connection it loses is one sdproxy closed, and the next connect shows the cost."""

    def _release(self, addr: c.Addr, conn: Any, keep: bool) -> None:
        super()._release(addr, conn, keep)
        idle = self._idle.get(addr)
        if idle and idle[-1] is conn:  # pooled: to the back of the line (pop() takes the end)
            idle.insert(0, idle.pop())


async def open_pool(client: c.HttpClient, addr: c.Addr) -> None:
    """Fill `client`'s pool for `addr`: pool_size requests at once, each on a connection
    of its own."""
    async with asyncio.timeout(c.START_TIMEOUT):
        await asyncio.gather(*(client.get(addr) for _ in range(client.pool_size)))


class Sampler:
    """sdproxy's RSS, fds and CPU every SAMPLE_EVERY s on the run's clock, in a thread of
    its own: reading /proc/PID/fd with thousands of entries must not delay the client's
    event loop."""

    def __init__(self, pid: int, timeline: c.Timeline) -> None:
        self.pid = pid
        self.timeline = timeline
        self.samples: list[tr.ProcessSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sdproxy-sampler", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(tr.sample_process(self.pid, self.timeline.now()))
            self._stop.wait(SAMPLE_EVERY)


@dataclasses.dataclass
class Results:
    """Everything the report and the plot say, gathered once the processes are done."""

    samples: list[c.Sample]  # desync already flagged
    by_phase: dict[str, list[c.Sample]]
    direct: dict[str, list[c.Sample]]  # the control client, straight to BACKENDS[0]
    usage: list[tr.ProcessSample]  # sdproxy, every SAMPLE_EVERY s
    attack: dict[str, Any]  # the attackers' report
    fd_limit: str  # the attackers' RLIMIT_NOFILE
    tally: dict[str, str]  # what the broken instance sent
    sdproxy: list[tuple[str, str]]  # (what, figure) lines on sdproxy's own counters
    marks: list[tuple[float, str]]

    def __post_init__(self) -> None:
        self.summaries = {name: c.summarize(group) for name, group in self.by_phase.items()}
        self.direct_summaries = {name: c.summarize(group)
                                 for name, group in self.direct.items()}
        self.failures = verdict({k: v for k, v in self.summaries.items()
                                 if k != "after" or v.requests})


def _run(stack: contextlib.ExitStack, args: argparse.Namespace) -> int:
    end = args.baseline + args.duration
    c.say(f"abuse: Consul, {len(BACKENDS)} backends{'' if args.no_broken else ' + ' + BROKEN}, "
          f"sdproxy, attackers; {args.rate:g} GET/s for {end + args.after:g}s: baseline "
          f"{args.baseline:g}s, abuse {args.duration:g}s, after {args.after:g}s")
    settings = {"header_timeout": args.header_timeout, "idle_timeout": args.idle_timeout,
                "request_timeout": args.request_timeout,
                "max_connections": args.max_connections}
    agent, backends, proxy = c.start_proxied_service(stack, SERVICE, BACKENDS, settings)
    broken = None if args.no_broken else start_broken(stack)
    attackers = c.Child("attackers", _attacker_argv(args, proxy.listen))
    stack.callback(attackers.stop, 10.0)
    ready = c.parse_logfmt(attackers.wait_for("event=attackers_ready"))
    client = SteadyClient(pool_size=args.client_connections)
    send = functools.partial(client.get, proxy.listen)
    start_line = len(proxy.child.lines)

    async def phases(timeline: c.Timeline) -> None:
        await asyncio.sleep(max(0.0, args.baseline - timeline.now()))
        attackers.signal(signal.SIGUSR1)
        timeline.mark("abuse starts")
        if broken is not None:
            await asyncio.to_thread(agent.register,
                                    c.backend_service(SERVICE, broken, passing=True))
            timeline.mark(f"{BROKEN} registered")
        if args.flood:
            flood_at = args.baseline + flood_delay(args)
            await asyncio.sleep(max(0.0, flood_at - timeline.now()))
            timeline.mark("flood starts")
        await asyncio.sleep(max(0.0, end - timeline.now()))
        timeline.mark("abuse ends")
        if broken is not None:
            await asyncio.to_thread(agent.deregister, BROKEN)

    direct = backends[BACKENDS[0]].addr
    control = SteadyClient(pool_size=CONTROL_CONNECTIONS)
    send_direct = functools.partial(control.get, direct)

    async def main() -> tuple[list[c.Sample], list[c.Sample], c.Timeline,
                              list[tr.ProcessSample]]:
        await open_pool(client, proxy.listen)
        await c.warm_up(send)
        if args.control_rate:
            await open_pool(control, direct)
        timeline = c.Timeline()
        with Sampler(proxy.child.pid, timeline) as sampler:
            side = asyncio.create_task(phases(timeline))
            loads = [c.paced_load(send, rate=args.rate, duration=end + args.after,
                                  timeline=timeline, timeout=args.timeout)]
            if args.control_rate:
                loads.append(c.paced_load(send_direct, rate=args.control_rate,
                                          duration=end + args.after, timeline=timeline,
                                          timeout=args.timeout))
            try:
                done = await asyncio.gather(*loads)
            finally:  # done by now unless the load was cut short (Ctrl-C)
                side.cancel()
                await asyncio.gather(side, return_exceptions=True)
        return done[0], done[1] if args.control_rate else [], timeline, sampler.samples

    raw, direct_samples, timeline, usage = c.run_async(main())
    client.close()
    control.close()
    report_line = attackers.wait_for("event=attack_report", timeout=REPORT_TIMEOUT)
    tally: dict[str, str] = {}
    if broken is not None:
        broken.child.stop(3.0)  # it prints its tally as it stops
        lines = broken.child.matching("event=broken_tally")
        tally = {k: v for k, v in c.parse_logfmt(lines[-1].text).items() if k != "event"} \
            if lines else {}
    proxy.check_alive()

    samples = flag_desync(raw)
    results = Results(
        samples=samples, by_phase=split_phases(samples, args),
        direct=split_phases(direct_samples, args), usage=usage,
        attack=json.loads(report_line.split("event=attack_report ", 1)[1]),
        fd_limit=ready.get("fd_limit", "?"), tally=tally,
        sdproxy=sdproxy_figures(proxy, start_line), marks=timeline.marks)
    report(args, results, client)
    if args.plot:
        plot(args.plot, args, results)
        c.say(f"plot: {args.plot}")
    return 1 if results.failures else 0


def sdproxy_figures(proxy: c.Sdproxy, start_line: int) -> list[tuple[str, str]]:
    """What sdproxy's metrics and log lines (from line `start_line` on) say about the run:
    connections refused at max_connections, breakers opened, idle timeouts, failovers."""
    opened = Counter(f.get("instance", "?") for _, f in proxy.events("breaker_change", start_line)
                     if f.get("to") == "open")
    out = [("refused (max_connections)",
            f"{proxy.metric('sdproxy_rejected_connections_total', upstream=SERVICE):g}"),
           ("breakers opened", ", ".join(f"{k} x{v}" for k, v in sorted(opened.items()))
            or "none"),
           ("idle timeouts logged", str(len(proxy.events("idle_timeout", start_line)))),
           ("retry budget exhausted",
            f"{proxy.metric('sdproxy_retry_budget_exhausted_total', upstream=SERVICE):g}"),
           ("failovers", c.failover_counts(proxy))]
    errors = proxy.child.matching("event=exchange_error", start=start_line)
    if errors:
        out.append(("exchange errors logged", f"{len(errors)} (first: {errors[0].text[:160]})"))
    return out


# === report ==============================================================================
def report(args: argparse.Namespace, r: Results, client: c.HttpClient) -> None:
    """Print the client's table by phase with sdproxy's peaks, the errors, what sdproxy
    did to each attacker, what the broken instance sent, and the verdict."""
    usage = {name: resources([u for u in r.usage
                              if phase_of(u.t, args.baseline, args.duration) == name])
             for name in PHASES}
    columns = [r.summaries[p] for p in PHASES]
    ratios = [p99_ratio(r.summaries["baseline"], s) for s in columns]
    rows = c.summary_rows(columns, (*BACKENDS, *(() if args.no_broken else (BROKEN,))))
    rows += [
        ["p99 / baseline p99", *("-" if math.isnan(x) else f"{x:.2f}" for x in ratios)]]
    if any(r.direct.values()):
        direct = [r.direct_summaries[p] for p in PHASES]
        direct_ratios = [p99_ratio(direct[0], s) for s in direct]
        rows += [
            [f"direct to {BACKENDS[0]}: requests", *(s.requests for s in direct)],
            ["  errors", *(s.errors for s in direct)],
            ["  latency p50", *(c.ms(s.p50) for s in direct)],
            ["  latency p99", *(c.ms(s.p99) for s in direct)],
            ["  p99 / baseline p99",
             *("-" if math.isnan(x) else f"{x:.2f}" for x in direct_ratios)]]
    rows += [
        ["sdproxy peak RSS", *(f"{usage[p].peak_rss / MiB:.1f} MiB" for p in PHASES)],
        ["sdproxy peak open fds", *(usage[p].peak_fds for p in PHASES)],
        ["sdproxy CPU (cores)", *("-" if math.isnan(usage[p].cpu_share) else
                                  f"{usage[p].cpu_share:.2f}" for p in PHASES)],
    ]
    settings = (f"header_timeout {args.header_timeout}, idle_timeout {args.idle_timeout}, "
                f"request_timeout {args.request_timeout}, max_connections "
                f"{args.max_connections}")
    c.say()
    c.say(f"abuse through sdproxy: the well-behaved client at {args.rate:g} GET/s (never "
          f"retries); {settings}")
    c.say(c.format_table(["", f"baseline {args.baseline:g}s", f"abuse {args.duration:g}s",
                          f"after {args.after:g}s"], rows))
    c.say()
    for name in PHASES:
        failed = sorted((s for s in r.by_phase[name] if not s.ok), key=lambda s: s.t)
        if failed:
            reused = sum(1 for s in failed if s.reused)
            when = ", ".join(f"{s.t:.2f}s" for s in failed[:8]) + (" ..." if len(failed) > 8
                                                                   else "")
            c.say(f"  errors during {name:<9}     {c.kinds_text(r.summaries[name].kinds)}; "
                  f"{reused} of {len(failed)} on a reused connection; scheduled at {when}")
    if r.usage:
        first, last = r.usage[0], r.usage[-1]
        c.say(f"  sdproxy RSS                 {first.rss / MiB:.1f} MiB at the start, peak "
              f"{max(u.rss for u in r.usage) / MiB:.1f} MiB, {last.rss / MiB:.1f} MiB at the "
              f"end; open fds {first.fds} -> peak {max(u.fds for u in r.usage)} -> {last.fds}")
    c.say_client(client, c.summarize(r.samples))
    c.say()
    c.say(f"attackers (one niced process, fd limit {r.fd_limit}), what sdproxy did to them:")
    for key, label in ATTACKERS.items():
        fig = r.attack.get(key, {})
        c.say(f"  {label:<18} {_attacker_setup(key, fig)}")
        c.say(f"  {'':<18} {outcomes_text(fig)}")
        if fig.get("statuses"):
            c.say(f"  {'':<18} statuses "
                  + ", ".join(f"{k} x{v}" for k, v in fig["statuses"].items()))
        if fig.get("attacker_crashes"):
            c.say(f"  {'':<18} attacker crashes: {fig['attacker_crashes']}")
    if r.tally:
        c.say(f"  {BROKEN + ' sent':<18} " + ", ".join(f"{k} x{v}" for k, v in r.tally.items()))
    c.say()
    c.say("sdproxy during the run:")
    for what, figure in r.sdproxy:
        c.say(f"  {what:<27} {figure}")
    c.say()
    own_share = sdproxy_share(r)
    if own_share:
        c.say(f"p99 under abuse over the baseline's: {own_share}")
    if r.failures:
        c.say("verdict: FAIL")
        for failure in r.failures:
            c.say(f"  - {failure}")
    else:
        c.say(f"verdict: PASS: no errors, p99 under abuse {ratios[1]:.2f}x the baseline's "
              f"(target <= {P99_RATIO_TARGET:g}x)")


def _attacker_setup(key: str, fig: Mapping[str, Any]) -> str:
    if key == "pipeline":
        return f"{fig.get('connections')} connections, {fig.get('depth')} GETs per write"
    if key == "drip":
        return f"{fig.get('connections')} connections, one header byte per " \
               f"{fig.get('interval')} s"
    if key == "nonread":
        return f"{fig.get('connections')} connections, a 1 GiB download never read"
    if key == "flood":
        return (f"from +{fig.get('delay', 0):g} s, up to {fig.get('target')} idle "
                f"connections at <= {fig.get('rate'):g}/s; "
                f"peak {fig.get('peak_open')} open at once"
                + (f" (reached after {fig['filled_after']} s)" if "filled_after" in fig
                   else ""))
    return (f"{fig.get('connections')} connections, a body at {fig.get('rate'):g} B/s for "
            f"{fig.get('seconds_each'):g} s each")


# === plot ================================================================================
def plot(path: str, args: argparse.Namespace, r: Results) -> None:
    """Three stacked axes over the run: the client's requests/s (ok, errors), its latency
    p50/p99 (log), and sdproxy's RSS and open fds; the abuse shaded, every mark drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = args.baseline + args.duration + args.after
    buckets = c.bucketize(r.samples, PLOT_BUCKET, total)
    usage, marks = r.usage, r.marks
    xs = [b.t + b.width / 2 for b in buckets]
    fig, (ax_rate, ax_lat, ax_rss) = plt.subplots(
        3, 1, figsize=(12, 9), sharex=True, gridspec_kw={"height_ratios": [2, 3, 2]})
    ax_rate.plot(xs, [b.ok_rate for b in buckets], color="#2ca02c", lw=1.2,
                 drawstyle="steps-mid", label="ok/s")
    ax_rate.bar(xs, [b.error_rate for b in buckets], width=PLOT_BUCKET, color="#d62728",
                alpha=0.8, label="errors/s")
    ax_rate.set_ylim(0, max([b.ok_rate + b.error_rate for b in buckets] + [1]) * 1.3)
    ax_rate.set_ylabel(f"well-behaved client\nrequests/s (per {PLOT_BUCKET:g} s)")
    ax_lat.plot(xs, [b.p50 * 1000 for b in buckets], color="#1f77b4", lw=1.2,
                drawstyle="steps-mid", label="p50")
    ax_lat.plot(xs, [b.p99 * 1000 for b in buckets], color="#ff7f0e", lw=1.2,
                drawstyle="steps-mid", label="p99")
    direct = [s for group in r.direct.values() for s in group]
    if direct:
        control = c.bucketize(direct, PLOT_BUCKET, total)
        ax_lat.plot([b.t + b.width / 2 for b in control], [b.p99 * 1000 for b in control],
                    color="#7f7f7f", lw=0.9, drawstyle="steps-mid",
                    label=f"p99 of a control client straight to {BACKENDS[0]} (no sdproxy)")
    base = r.summaries["baseline"].p99
    if not math.isnan(base):
        ax_lat.axhline(base * 1000 * P99_RATIO_TARGET, color="#d62728", ls=":", lw=1,
                       label=f"target: {P99_RATIO_TARGET:g}x baseline p99")
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency (ms, log)")
    ax_rss.plot([u.t for u in usage], [u.rss / MiB for u in usage], color="#1f77b4",
                lw=1.3, marker=".", label="sdproxy RSS (MiB)")
    ax_rss.set_ylim(0, max([u.rss / MiB for u in usage] + [1]) * 1.2)
    ax_rss.set_ylabel("sdproxy RSS (MiB)")
    ax_fds = ax_rss.twinx()
    ax_fds.plot([u.t for u in usage], [u.fds for u in usage], color="#9467bd", lw=1.1,
                label="sdproxy open fds")
    ax_fds.set_ylim(0, max([u.fds for u in usage] + [1]) * 1.2)
    ax_fds.set_ylabel("sdproxy open fds")
    for ax in (ax_rate, ax_lat, ax_rss):
        ax.axvspan(args.baseline, args.baseline + args.duration, color="#d62728", alpha=0.06)
        for t, _ in marks:
            ax.axvline(t, color="#7f7f7f", ls="--", lw=0.8)
        ax.grid(alpha=0.3, which="both")
    for k, (t, label) in enumerate(sorted(marks)):
        ax_rate.annotate(f"{label} (t={t:.1f}s)", xy=(t, 1), xycoords=("data", "axes fraction"),
                         xytext=(3, -12 - 11 * k), textcoords="offset points", fontsize=8)
    ax_rate.legend(loc="lower left", fontsize=8)
    ax_lat.legend(loc="upper left", fontsize=8)
    handles = ax_rss.get_legend_handles_labels()
    more = ax_fds.get_legend_handles_labels()
    ax_rss.legend(handles[0] + more[0], handles[1] + more[1], loc="lower left", fontsize=8)
    ax_rss.set_xlabel("time since load start (s), requests bucketed by scheduled send time")
    ab = r.summaries["abuse"]
    ratio = p99_ratio(r.summaries["baseline"], ab)
    fig.suptitle(f"abuse: {args.rate:g} GET/s well-behaved client through sdproxy; under abuse "
                 f"{ab.errors} errors, p99 {c.ms(ab.p99)} = "
                 f"{'-' if math.isnan(ratio) else f'{ratio:.2f}'}x baseline; "
                 f"{'FAIL' if r.failures else 'PASS'}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
