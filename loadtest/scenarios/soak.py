"""soak: mixed traffic and catalog churn through sdproxy for --minutes; does its memory
or its count of open file descriptors creep?

Real processes on loopback: a Consul dev agent; four demo backends registered as SERVICE
(three with HTTP checks, FLIPPED with a TTL check this scenario sets); two
`loadtest.fastbackend` sinks registered as TCP_SERVICE; one sdproxy with an http and a
tcp upstream, both discovered through Consul. The traffic is `loadtest.mixed`'s mix, each
kind paced at its own rate (open model, no client retries). Every --churn-period seconds
the catalog changes: DEREGISTERED is deregistered and registered again half a period
later, or FLIPPED's check turns critical and, half a period later, passing (alternately).

Every --sample seconds the scenario reads sdproxy's VmRSS, open fds and CPU time from
/proc. The figures: RSS at the start, after the warm-up, at the end and its peak, and the
least-squares slope of RSS (KiB per minute) and of fds (per minute) over the run after
the warm-up, each called flat when below its threshold. `--plot` draws RSS, fds and
throughput over time with the fitted lines. Everything it starts ends when it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from loadtest import common as c
from loadtest import trend as tr
from loadtest.mixed import Kind, MixedClient, mixed_kinds
from loadtest.proxies import Sdproxy as SdproxyProc
from loadtest.proxies import SdUpstream
from proxy import devconsul

DESCRIPTION = ("mixed HTTP and TCP traffic with catalog churn for --minutes; the slope of "
               "sdproxy's RSS and open fds")
SERVICE = "soak"
TCP_SERVICE = "soak-tcp"
BACKENDS = ("soak-1", "soak-2", "soak-3", "soak-4")
DEREGISTERED = "soak-2"  # deregistered and registered again
FLIPPED = "soak-4"  # its TTL check turns critical and passing again
SINKS = ("sink-1", "sink-2")
RSS_FLAT_KIB_PER_MIN = 64.0
FDS_FLAT_PER_MIN = 1.0
KiB = 1024
MiB = 1024 * KiB


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=30.0,
                        help="length of the load (default 30)")
    parser.add_argument("--sample", type=float, default=10.0,
                        help="seconds between two readings of sdproxy's RSS and fds (default 10)")
    parser.add_argument("--warm-up", type=float, default=None,
                        help="seconds at the start the slopes leave out (default 120, or a "
                        "quarter of a run shorter than 8 minutes)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies every traffic rate (default 1: about 140 requests/s)")
    parser.add_argument("--churn-period", type=float, default=4.0,
                        help="seconds between two catalog changes (default 4)")
    parser.add_argument("--flat-kib-per-min", type=float, default=RSS_FLAT_KIB_PER_MIN,
                        help=f"RSS slope called flat below this (default {RSS_FLAT_KIB_PER_MIN:g})")
    parser.add_argument("--flat-fds-per-min", type=float, default=FDS_FLAT_PER_MIN,
                        help=f"fd slope called flat below this (default {FDS_FLAT_PER_MIN:g})")


def run(args: argparse.Namespace) -> int:
    return c.run_scenario("soak", lambda stack: _run(stack, args))


# === setup ==============================================================================
def ttl_registration(backend: c.Backend) -> dict[str, Any]:
    """`backend` as an instance of SERVICE whose only check is a TTL one, passing; it
    changes only when this scenario says (the TTL outlasts any churn period)."""
    return {"ID": backend.name, "Name": SERVICE, "Address": "127.0.0.1", "Port": backend.port,
            "Check": {"CheckID": f"{backend.name}-ttl", "TTL": "10m", "Status": "passing"}}


def start_sinks(stack: contextlib.ExitStack, agent: devconsul.ConsulAgent) -> list[int]:
    """The TCP instances: one `loadtest.fastbackend sink` per name, registered as
    TCP_SERVICE with no check (so passing); their ports."""
    children = []
    for name in SINKS:
        child = c.Child(name, [sys.executable, "-m", "loadtest.fastbackend", "sink",
                               "--port", "0"])
        stack.callback(child.stop, 3.0)
        children.append(child)
    ports = []
    for name, child in zip(SINKS, children):
        port = int(child.wait_for("ready").split()[1])
        agent.register({"ID": name, "Name": TCP_SERVICE, "Address": "127.0.0.1", "Port": port})
        ports.append(port)
    c.wait_passing(agent, TCP_SERVICE, SINKS)
    return ports


def start_proxy(stack: contextlib.ExitStack, consul_addr: str) -> SdproxyProc:
    """sdproxy with an http upstream (SERVICE) and a tcp one (TCP_SERVICE); returns once
    both pools hold every instance."""
    upstreams = [SdUpstream(SERVICE, devconsul.free_port(), "http", "consul"),
                 SdUpstream(TCP_SERVICE, devconsul.free_port(), "tcp", "consul")]
    proxy = SdproxyProc(upstreams, consul_addr=consul_addr)
    stack.callback(proxy.stop)
    want = {SERVICE: set(BACKENDS), TCP_SERVICE: set(SINKS)}

    def pools_full() -> bool:
        status, body = c.http_get(f"http://127.0.0.1:{proxy.admin_port}/upstreams")
        if status != 200:
            return False
        healthy = {u["name"]: {e["id"] for e in u["endpoints"] if e["state"] == "healthy"}
                   for u in json.loads(body)}
        return all(healthy.get(name) == ids for name, ids in want.items())

    c.wait_until("sdproxy pools of both upstreams", pools_full)
    return proxy


def catalog_updates(proxy: SdproxyProc) -> float:
    status, body = c.http_get(f"http://127.0.0.1:{proxy.admin_port}/metrics")
    if status != 200:
        raise c.ScenarioError(f"sdproxy /metrics answered {status}")
    return sum(v for lab, v in c.metric_samples(body.decode(), "sdproxy_catalog_updates_total")
               if lab.get("upstream") == SERVICE)


# === the run ============================================================================
def _run(stack: contextlib.ExitStack, args: argparse.Namespace) -> int:
    duration = args.minutes * 60
    warm_up = tr.default_warm_up(duration) if args.warm_up is None else args.warm_up
    c.say(f"soak: Consul, {len(BACKENDS)} HTTP backends, {len(SINKS)} TCP sinks, sdproxy "
          f"(http + tcp upstreams); mixed traffic for {args.minutes:g} min, a catalog change "
          f"every {args.churn_period:g}s, sdproxy sampled every {args.sample:g}s")
    agent = c.start_consul(stack)
    backends = c.start_backends(stack, BACKENDS)
    for name, backend in backends.items():
        agent.register(ttl_registration(backend) if name == FLIPPED
                       else c.backend_service(SERVICE, backend))
    c.wait_passing(agent, SERVICE, BACKENDS)
    start_sinks(stack, agent)
    proxy = start_proxy(stack, agent.http_addr)
    http_addr = ("127.0.0.1", proxy.upstreams[0].port)
    tcp_addr = ("127.0.0.1", proxy.upstreams[1].port)
    client = MixedClient()
    kinds = mixed_kinds(client, http_addr, tcp_addr, args.scale)
    updates_before = catalog_updates(proxy)
    at_rest = tr.sample_process(proxy.pid, 0.0)
    resources: list[tr.ProcessSample] = []
    churn_log: list[tuple[float, str]] = []

    async def churn(timeline: c.Timeline) -> None:
        """A catalog change every period, undone half a period later; bounded by the run."""
        half = args.churn_period / 2
        for k in range(max(0, int(duration / args.churn_period) - 1)):
            await asyncio.sleep(max(0.0, (k + 1) * args.churn_period - timeline.now()))
            if k % 2 == 0:
                await asyncio.to_thread(agent.deregister, DEREGISTERED)
                churn_log.append((timeline.now(), f"-{DEREGISTERED}"))
                await asyncio.sleep(half)
                await asyncio.to_thread(agent.register, c.backend_service(
                    SERVICE, backends[DEREGISTERED], passing=True))
                churn_log.append((timeline.now(), f"+{DEREGISTERED}"))
            else:
                await asyncio.to_thread(agent.check_fail, f"{FLIPPED}-ttl", "soak")
                churn_log.append((timeline.now(), f"critical {FLIPPED}"))
                await asyncio.sleep(half)
                await asyncio.to_thread(agent.check_pass, f"{FLIPPED}-ttl", "soak")
                churn_log.append((timeline.now(), f"passing {FLIPPED}"))

    async def sample(timeline: c.Timeline) -> None:
        """sdproxy read every args.sample seconds from t=0 to the end of the schedule."""
        for k in range(int(duration / args.sample) + 1):
            await asyncio.sleep(max(0.0, k * args.sample - timeline.now()))
            resources.append(tr.sample_process(proxy.pid, timeline.now()))

    async def main() -> list[list[c.Sample]]:
        await asyncio.gather(*(c.warm_up(kind.send, count=3) for kind in kinds))
        timeline = c.Timeline()
        side = [asyncio.create_task(churn(timeline)), asyncio.create_task(sample(timeline))]
        try:
            per_kind = await asyncio.gather(*(
                c.paced_load(kind.send, rate=kind.rate, duration=duration, timeline=timeline,
                             timeout=kind.timeout) for kind in kinds))
        finally:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.gather(*side), args.churn_period + args.sample)
        return list(per_kind)

    per_kind = c.run_async(main())
    client.close()
    if not proxy.alive():
        raise c.ScenarioError(f"sdproxy exited during the run:\n{proxy.log_tail()}")
    updates = catalog_updates(proxy) - updates_before
    report = SoakReport(kinds, per_kind, resources, at_rest, warm_up, duration, args)
    c.say()
    c.say(report.text(churn_log, updates, proxy.errors_logged()))
    if args.plot:
        plot(args.plot, report)
        c.say(f"plot: {args.plot}")
    return 0


# === report =============================================================================
class SoakReport:
    """The figures of one run: traffic per kind, and sdproxy's RSS and fds trends."""

    def __init__(self, kinds: Sequence[Kind], per_kind: Sequence[Sequence[c.Sample]],
                 resources: Sequence[tr.ProcessSample], at_rest: tr.ProcessSample,
                 warm_up: float, duration: float, args: argparse.Namespace) -> None:
        self.kinds = list(kinds)
        self.per_kind = [list(s) for s in per_kind]
        self.resources = list(resources)
        self.at_rest = at_rest
        self.warm_up = warm_up
        self.duration = duration
        self.args = args
        self.rss = tr.trend([(s.t, s.rss / KiB) for s in resources], warm_up=warm_up,
                            threshold_per_minute=args.flat_kib_per_min)
        self.fds = tr.trend([(s.t, float(s.fds)) for s in resources], warm_up=warm_up,
                            threshold_per_minute=args.flat_fds_per_min)
        self.all_samples = [s for samples in self.per_kind for s in samples]
        self.total = c.summarize(self.all_samples)

    def after_warm_up(self) -> list[tr.ProcessSample]:
        return [s for s in self.resources if s.t >= self.warm_up]

    def text(self, churn_log: Sequence[tuple[float, str]], updates: float,
             logged: Sequence[str]) -> str:
        rows: list[list[object]] = []
        for kind, samples in zip(self.kinds, self.per_kind):
            s = c.summarize(samples)
            rows.append([kind.name, f"{kind.rate:g}", s.requests, s.ok, s.errors,
                         c.ms(s.p50), c.ms(s.p99), c.ms(s.max)])
        t = self.total
        rows.append(["total", f"{sum(k.rate for k in self.kinds):g}", t.requests, t.ok,
                     t.errors, c.ms(t.p50), c.ms(t.p99), c.ms(t.max)])
        title = (f"soak through sdproxy: {self.duration / 60:g} min of mixed traffic (client "
                 f"never retries), a catalog change every {self.args.churn_period:g}s; "
                 f"sdproxy read every {self.args.sample:g}s")
        lines = [title,
                 c.format_table(["kind", "rate/s", "requests", "ok", "errors", "p50", "p99",
                                 "max"], rows), "",
                 f"  errors by kind              {c.kinds_text(t.kinds)}"]
        if t.errors:
            first = sorted((s for s in self.all_samples if not s.ok), key=lambda s: s.t)[:10]
            lines.append("  first errors (scheduled)    "
                         + ", ".join(f"{s.t:.1f}s {s.outcome}" for s in first))
            reused = sum(1 for s in self.all_samples if not s.ok and s.reused)
            lines.append(f"  errors on reused conns      {reused} of {t.errors}")
        deregs = sum(1 for _, what in churn_log if what.startswith("-"))
        flips = sum(1 for _, what in churn_log if what.startswith("critical"))
        lines.append(f"  catalog churn               {deregs} deregister + register again, "
                     f"{flips} check critical + passing again; sdproxy_catalog_updates_total "
                     f"+{updates:g}")
        lines += self.memory_lines()
        lines.append(f"  sdproxy log                 {len(logged)} lines at warning or error"
                     + (": " + " | ".join(sorted({_event(x) for x in logged})[:6])
                        if logged else ""))
        lines += ["", self.verdict()]
        return "\n".join(lines)

    def memory_lines(self) -> list[str]:
        res = self.resources
        if not res:
            return ["  sdproxy                     no sample taken"]
        kept = self.after_warm_up() or res
        peak = max(res, key=lambda s: s.rss)
        first, last = kept[0], res[-1]
        cpu = res[-1].cpu - res[0].cpu
        span = res[-1].t - res[0].t
        rss_line = (f"  sdproxy RSS                 at rest {_mib(self.at_rest.rss)}; load "
                    f"start {_mib(res[0].rss)}; after warm-up (t={first.t / 60:.1f} min) "
                    f"{_mib(first.rss)}; end {_mib(last.rss)}; peak {_mib(peak.rss)} at "
                    f"t={peak.t / 60:.1f} min")
        rss_slope = (f"  RSS slope after warm-up     {_slope(self.rss, 'KiB')} over "
                     f"{self.rss.points} samples, t={_minutes(self.rss.start)}.."
                     f"{_minutes(self.rss.end)} min (flat below {self.rss.threshold:g} "
                     f"KiB/min) -> {self.rss.verdict}")
        fds_line = (f"  sdproxy open fds            at rest {self.at_rest.fds}; after warm-up "
                    f"{min(s.fds for s in kept)}..{max(s.fds for s in kept)}; end {last.fds}")
        fds_slope = (f"  fds slope after warm-up     {_slope(self.fds, 'fds')} (flat below "
                     f"{self.fds.threshold:g}/min) -> {self.fds.verdict}")
        cpu_line = (f"  sdproxy CPU                 {cpu:.0f} s in {span / 60:.1f} min "
                    f"({100 * cpu / span if span else math.nan:.0f} % of one core)")
        return [rss_line, rss_slope, fds_line, fds_slope, cpu_line]

    def verdict(self) -> str:
        return (f"verdict: RSS {self.rss.verdict} ({_slope(self.rss, 'KiB')}), fds "
                f"{self.fds.verdict} ({_slope(self.fds, 'fds')}), peak RSS "
                f"{_mib(max((s.rss for s in self.resources), default=0))}; "
                f"{self.total.errors} failed requests out of {self.total.requests}")


def _event(line: str) -> str:
    fields = c.parse_logfmt(line)
    return fields.get("event") or line[:60]


def _mib(nbytes: float) -> str:
    return f"{nbytes / MiB:.1f} MiB"


def _minutes(t: float) -> str:
    return "-" if math.isnan(t) else f"{t / 60:.1f}"


def _slope(t: tr.Trend, unit: str) -> str:
    return "-" if math.isnan(t.per_minute) else f"{t.per_minute:+.2f} {unit}/min"


# === plot ===============================================================================
def plot(path: str, report: SoakReport) -> None:
    """Three stacked axes over minutes: RSS (MiB), open fds and requests/s, the warm-up
    shaded and the fitted lines drawn over the part they were fitted on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report.resources
    minutes = [s.t / 60 for s in res]
    fig, (ax_rss, ax_fds, ax_rate) = plt.subplots(3, 1, figsize=(12, 9), sharex=True,
                                                  gridspec_kw={"height_ratios": [3, 2, 2]})
    ax_rss.plot(minutes, [s.rss / MiB for s in res], color="#1f77b4", lw=1.3, marker=".",
                label="VmRSS")
    ax_fds.plot(minutes, [s.fds for s in res], color="#9467bd", lw=1.3, marker=".",
                label="open fds")
    for ax, fit, scale, unit in ((ax_rss, report.rss, 1 / KiB, "KiB/min"),
                                 (ax_fds, report.fds, 1.0, "fds/min")):
        if not math.isnan(fit.per_minute):
            xs = [fit.start, fit.end]
            ax.plot([x / 60 for x in xs], [fit.at(x) * scale for x in xs], color="#d62728",
                    ls="--", lw=1.2, label=f"least squares: {fit.per_minute:+.2f} {unit} "
                    f"({fit.verdict})")
        ax.axvspan(0, report.warm_up / 60, color="#cccccc", alpha=0.4, label="warm-up")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    top = max((s.rss for s in res), default=MiB) / MiB
    ax_rss.set_ylim(0, top * 1.15)  # from zero: a flat line must look flat, not zoomed noise
    ax_rss.set_ylabel("sdproxy RSS (MiB)")
    ax_fds.set_ylim(0, max((s.fds for s in res), default=1) * 1.3)
    ax_fds.set_ylabel("sdproxy open fds")
    buckets = c.bucketize(report.all_samples, report.args.sample, report.duration)
    xs = [(b.t + b.width / 2) / 60 for b in buckets]
    ax_rate.plot(xs, [b.ok_rate for b in buckets], color="#2ca02c", lw=1.2,
                 drawstyle="steps-mid", label="ok/s")
    ax_rate.bar(xs, [b.error_rate for b in buckets], width=report.args.sample / 60,
                color="#d62728", alpha=0.8, label="errors/s")
    ax_rate.set_ylim(0, max([b.ok_rate + b.error_rate for b in buckets] + [1]) * 1.3)
    ax_rate.set_ylabel(f"requests/s\n(per {report.args.sample:g} s)")
    ax_rate.grid(alpha=0.3)
    ax_rate.legend(loc="lower right", fontsize=8)
    ax_rate.set_xlabel("minutes since the load started")
    fig.suptitle(f"soak: {report.duration / 60:g} min of mixed HTTP + TCP traffic and catalog "
                 f"churn through sdproxy: {report.total.errors} errors in "
                 f"{report.total.requests} requests", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
