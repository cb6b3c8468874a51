"""What every load-test scenario shares: one import (`from loadtest import common as c`)
for the infrastructure, and the steps the fault scenarios all take.

The infrastructure lives in one module per concern and is re-exported here unchanged:
- `loadtest.procs`: the processes (`Child`, backends, Consul, `Sdproxy`) and
  `run_scenario`, which ends every one of them however the scenario ends;
- `loadtest.client`: `HttpClient`, a raw-socket HTTP/1.1 keep-alive client that never
  retries, and `read_response`;
- `loadtest.load`: open-model load (`paced_load`, `load_with_fault`, `warm_up`), the
  `Timeline` clock, `CheckWatcher` (Consul check transitions), `classify`, `run_async`;
- `loadtest.report`: `percentile`, `bucketize`, `summarize`, `format_table`,
  `plot_timelines`;
- `loadtest.parse`: logfmt, log `ts` and Prometheus text parsers;
- `loadtest.tomlwrite`: `toml_value` and friends.
The pure parts take data and return data; `tests/unit/test_loadtest_common.py` covers
them.

The scenario steps below are the same logic wherever they appear: the load options every
paced scenario takes, Consul + backends + sdproxy started together, the report's client
lines, one timeline plot per run, and a fault under paced load (failover, hang,
dns-vs-proxy): the fault half way, Consul watched beside, and when Consul and sdproxy
reacted, marked on the timeline.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from loadtest.client import POOL_SIZE, Addr, HttpClient, Response, read_response
from loadtest.load import (
    REQUEST_TIMEOUT,
    CheckWatcher,
    Sample,
    Timeline,
    classify,
    load_with_fault,
    paced_load,
    run_async,
    warm_up,
)
from loadtest.parse import LOG_TS, LOGFMT_PAIR, log_wall_time, metric_samples, parse_logfmt
from loadtest.procs import (
    HEALTH_INTERVAL,
    MAX_LINES,
    REPO_ROOT,
    START_TIMEOUT,
    Backend,
    Child,
    LogLine,
    ScenarioError,
    Sdproxy,
    backend_service,
    child_env,
    http_get,
    run_scenario,
    say,
    sdproxy_config,
    start_backend,
    start_backends,
    start_consul,
    start_sdproxy,
    start_service,
    wait_passing,
    wait_until,
)
from loadtest.report import (
    BUCKET,
    Bucket,
    Panel,
    Summary,
    bucketize,
    format_table,
    kinds_text,
    ms,
    percentile,
    plot_timelines,
    split_at,
    summarize,
    summary_rows,
)
from loadtest.tomlwrite import toml_value
from proxy import devconsul

__all__ = [
    "BUCKET",
    "HEALTH_INTERVAL",
    "LOGFMT_PAIR",
    "LOG_TS",
    "MAX_LINES",
    "POOL_SIZE",
    "REPO_ROOT",
    "REQUEST_TIMEOUT",
    "START_TIMEOUT",
    "Addr",
    "Backend",
    "Bucket",
    "CheckWatcher",
    "Child",
    "HttpClient",
    "LogLine",
    "Panel",
    "Response",
    "Sample",
    "ScenarioError",
    "Sdproxy",
    "Summary",
    "Timeline",
    "add_load_arguments",
    "backend_service",
    "bucketize",
    "child_env",
    "classify",
    "failover_counts",
    "fault_under_load",
    "format_table",
    "http_get",
    "kill_under_load",
    "kinds_text",
    "load_with_fault",
    "log_wall_time",
    "mark_reactions",
    "metric_samples",
    "ms",
    "paced_load",
    "parse_logfmt",
    "percentile",
    "plot_timelines",
    "read_response",
    "run_async",
    "run_scenario",
    "save_plot",
    "say",
    "say_client",
    "sdproxy_config",
    "sdproxy_reactions",
    "split_at",
    "start_backend",
    "start_backends",
    "start_consul",
    "start_proxied_service",
    "start_sdproxy",
    "start_service",
    "summarize",
    "summary_rows",
    "timeline_panel",
    "toml_value",
    "wait_passing",
    "wait_until",
    "warm_up",
]


# === scenario steps =====================================================================
def add_load_arguments(parser: argparse.ArgumentParser, *, duration: float = 10.0,
                       duration_help: str = "seconds (default 10)") -> None:
    """--rate, --duration and --timeout of a paced scenario."""
    parser.add_argument("--rate", type=float, default=500.0, help="GET/s (default 500)")
    parser.add_argument("--duration", type=float, default=duration, help=duration_help)
    parser.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT,
                        help="client timeout per request, from its scheduled send time")


def start_proxied_service(stack: contextlib.ExitStack, service: str, names: Sequence[str],
                          settings: Mapping[str, Any] | None = None,
                          ) -> tuple[devconsul.ConsulAgent, dict[str, Backend], Sdproxy]:
    """Consul, one backend per name registered as `service` (all passing), and sdproxy
    (with `settings`) in front of them, its healthy pool exactly `names`."""
    agent = start_consul(stack)
    backends = start_service(stack, agent, service, names)
    proxy = start_sdproxy(stack, agent.http_addr, service, settings, expect=names)
    return agent, backends, proxy


def say_client(client: HttpClient, total: Summary) -> None:
    """The report's lines on the client itself and on what its latencies mean."""
    say(f"  client                      {client.connects} connections opened; generator "
        f"send lag p99 {ms(total.lag_p99)}")
    say("  latency: from each request's scheduled send time, errors included")


def timeline_panel(label: str, samples: Sequence[Sample], duration: float,
                   marks: list[tuple[float, str]]) -> Panel:
    """One run drawn as a timeline: its samples bucketed from 0 to `duration`."""
    return Panel(label, bucketize(samples, BUCKET, duration), marks)


def save_plot(path: str, title: str, panels: Sequence[Panel]) -> None:
    """Draw `panels` into `path` and say where."""
    plot_timelines(path, title, panels)
    say(f"plot: {path}")


# === faults under load ===================================================================
def sdproxy_reactions(proxy: Sdproxy, timeline: Timeline, victim: str,
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


def mark_reactions(timeline: Timeline, watcher: CheckWatcher, victim: str, at: float,
                   proxy: Sdproxy | None = None, start: int = 0,
                   ) -> tuple[float | None, dict[str, float]]:
    """Mark on `timeline` when Consul first called `victim` critical after the fault at
    `at`, and (with `proxy`) when sdproxy reacted; returns (critical, reactions)."""
    critical = watcher.first(victim, "critical", after=at)
    if critical is not None:
        timeline.mark("Consul: critical", critical)
    reactions = sdproxy_reactions(proxy, timeline, victim, start) if proxy is not None else {}
    for label, t in reactions.items():
        timeline.mark(f"sdproxy {label}", t)
    return critical, reactions


def failover_counts(proxy: Sdproxy) -> str:
    """sdproxy's failovers so far by reason, e.g. "connect-failure x4, reset x1"."""
    reasons = metric_samples(proxy.metrics(), "sdproxy_failovers_total")
    text = ", ".join(f"{lab.get('reason', '?')} x{v:g}" for lab, v in reasons if v)
    return text or "none"


def fault_under_load(proxy: Sdproxy | None, send: Callable[[], Awaitable[Response]],
                     *, fault: Callable[[], None], label: str, consul_addr: str,
                     service: str, rate: float, duration: float, timeout: float,
                     recover: Callable[[], None] | None = None, recover_label: str = "",
                     ) -> tuple[list[Sample], Timeline, CheckWatcher, int]:
    """Paced load through `send`, `fault()` half way (marked `label`), Consul watched
    beside; `recover()` (marked `recover_label`) once the load ends, however it ends.
    Returns (samples, timeline, watcher, sdproxy log line index when the load began)."""
    start_line = len(proxy.child.lines) if proxy is not None else 0

    async def main() -> tuple[list[Sample], Timeline, CheckWatcher]:
        await warm_up(send)
        timeline = Timeline()
        watcher = CheckWatcher(consul_addr, service, timeline)
        try:
            samples = await load_with_fault(
                send, rate=rate, duration=duration, timeline=timeline, fault_at=duration / 2,
                fault=fault, label=label, watcher=watcher, timeout=timeout)
        finally:
            if recover is not None:
                recover()
        if recover is not None:
            timeline.mark(recover_label)
        return samples, timeline, watcher

    samples, timeline, watcher = run_async(main())
    return samples, timeline, watcher, start_line


def kill_under_load(proxy: Sdproxy | None, send: Callable[[], Awaitable[Response]],
                    *, backends: dict[str, Backend], victim: str, consul_addr: str,
                    service: str, rate: float, duration: float, timeout: float,
                    ) -> tuple[list[Sample], Timeline, CheckWatcher, int]:
    """`fault_under_load` with SIGKILL of `victim` as the fault."""
    return fault_under_load(proxy, send, fault=backends[victim].kill, label=f"kill -9 {victim}",
                            consul_addr=consul_addr, service=service, rate=rate,
                            duration=duration, timeout=timeout)
