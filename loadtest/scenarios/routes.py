"""routes: 50 services behind one catalog-routed listener; instances killed and services
re-tagged under paced load (issue 12 item 5).

A real Consul dev agent; --services services (default 50), each of 2 or 3 instances
spread over --processes `loadtest.portsbackend` processes (one port per instance, HTTP
check on /health every second), each registered with a Fabio-style tag
`urlprefix-/svcNN/` (every fifth with a host: `urlprefix-svcNN.example/svcNN/`); one
sdproxy listener with `catalog_routes = true` and no configured route. An open-model
client that never retries sends --rate GET/s for --duration seconds across every route
(keep-alive connections to the one listener, the route's Host header). Under that load:
- kill -9 of backend process 0 at 20 % of the run and of process P/2 at 80 % (every
  instance they serve dies at once; every service keeps an instance elsewhere);
- at 35 % a route moves: svcA's instances are re-registered with `urlprefix-/svcA-moved/`;
- at 50 % a route is removed: svcB's instances are re-registered without the tag;
- at 65 % a route is added: a new service registers with `urlprefix-/svcNN/`.
Each request is judged by its route's class (`judge`): a 404 on a route after the change
that took it away is an expected "route gone", a 404 on a new route before it first
answered is "not yet routed"; any other failure, or a 200 from another service's
instance, is a failure. The verdict line asserts 0 failed requests on routes whose
service had a passing instance (exit 1 otherwise), and the report gives, per class,
requests, failures and the expected 404s, and how long each change took to show;
`--plot FILE.png` draws the timeline of the requests that count (expected 404s left out)
with every fault and change marked.

Run: `python -m loadtest routes [--rate 300 --duration 60 --plot routes.png]` or
`make loadtest SCENARIO=routes`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from loadtest import common as c
from loadtest import routeprocs as rp

DESCRIPTION = ("50 services behind one catalog-routed listener; instances killed and routes "
               "moved, removed and added under paced load")

# Route classes, in report order.
UNTOUCHED = "untouched"
LOST = "lost instances (kill -9)"
MOVED_OLD = "moved: old prefix"
MOVED_NEW = "moved: new prefix"
REMOVED = "removed"
ADDED = "added"
CLASSES = (UNTOUCHED, LOST, MOVED_OLD, MOVED_NEW, REMOVED, ADDED)
# What one request came to (`judge`).
OK = "ok"
GONE = "route gone (404)"
NOT_YET = "not yet routed (404)"
FAILED = "failed"
MISROUTED = "misrouted"
# When the faults and changes happen, as a fraction of --duration.
KILL_FIRST, MOVE, REMOVE, ADD, KILL_SECOND = 0.20, 0.35, 0.50, 0.65, 0.80
SPECIAL_SHARE = 3  # every third request goes to a changed route (finer switch times)
HOST_EVERY = 5  # every fifth service's route has a host
ROUTED_TIMEOUT = 30.0  # seconds for every route to answer before the load starts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    c.add_load_arguments(parser, duration=60.0, duration_help="seconds (default 60)")
    parser.set_defaults(rate=300.0)
    parser.add_argument("--services", type=int, default=50,
                        help="services routed by their tags (default 50)")
    parser.add_argument("--processes", type=int, default=6,
                        help="backend processes the instances are spread over (default 6, "
                             "even, >= 6)")


# === the plan (pure) =====================================================================
@dataclass(frozen=True)
class ServicePlan:
    """One service: its tag route ("host/path/" or "/path/") and its instances, each
    (instance id, index of the backend process that serves it)."""

    name: str
    route: str
    instances: tuple[tuple[str, int], ...]

    @property
    def host(self) -> str:
        return self.route.split("/", 1)[0]

    @property
    def path(self) -> str:
        return "/" + self.route.split("/", 1)[1]

    def processes(self) -> set[int]:
        return {p for _, p in self.instances}


def plan_services(count: int, processes: int) -> list[ServicePlan]:
    """`count` services svc00.. of 3 instances (every third) or 2, on consecutive
    backend processes (so no service has two instances in one process, and no two
    processes `processes // 2` apart serve all of one service's instances)."""
    width = max(2, len(str(count)))
    out = []
    for i in range(count):
        name = f"svc{i:0{width}d}"
        host = f"{name}.example" if i % HOST_EVERY == 2 else ""
        size = 3 if i % 3 == 0 else 2
        out.append(ServicePlan(name, f"{host}/{name}/", tuple(
            (f"{name}-{k}", (i + k) % processes) for k in range(size))))
    return out


def victims(processes: int) -> tuple[int, int]:
    """The two backend processes killed: half the ring apart, so that with services on
    2 or 3 consecutive processes (and processes >= 6) each keeps a live instance and
    some services have none on either."""
    return 0, processes // 2


@dataclass(frozen=True)
class Target:
    """Where a request goes: a route of `service` (Host header `host`, "" for any),
    judged as `kind`."""

    service: str
    host: str
    path: str
    kind: str


@dataclass(frozen=True)
class Plan:
    services: list[ServicePlan]  # registered before the load
    moved: ServicePlan
    moved_route: str  # the moved service's route after the move
    removed: ServicePlan
    added: ServicePlan  # registered under load
    killed: tuple[int, int]

    def targets(self) -> list[Target]:
        out = []
        for s in self.services:
            kind = (MOVED_OLD if s is self.moved else REMOVED if s is self.removed
                    else LOST if s.processes() & set(self.killed) else UNTOUCHED)
            out.append(Target(s.name, s.host, s.path, kind))
        host, path = self.moved_route.split("/", 1)
        out.append(Target(self.moved.name, host, "/" + path, MOVED_NEW))
        out.append(Target(self.added.name, self.added.host, self.added.path, ADDED))
        return out

    def cycle(self) -> list[Target]:
        """The order requests go in, repeated: every route once, and every
        SPECIAL_SHARE-th request one of the changed routes in turn, so that their
        switch times are seen at a finer step than the others'."""
        targets = self.targets()
        special = [t for t in targets if t.kind in (MOVED_OLD, MOVED_NEW, REMOVED, ADDED)]
        out: list[Target] = []
        for k, target in enumerate(targets):
            out.append(target)
            if k % (SPECIAL_SHARE - 1) == SPECIAL_SHARE - 2:
                out.append(special[(k // (SPECIAL_SHARE - 1)) % len(special)])
        return out


def make_plan(count: int, processes: int) -> Plan:
    """The services, which ones change, and which processes die. The changed services
    are among those with no instance on a killed process, so each class measures one
    thing."""
    if processes < 6 or processes % 2:
        raise ValueError("--processes must be even and at least 6")
    if count < 4:
        raise ValueError("--services must be at least 4")
    services = plan_services(count, processes)
    killed = victims(processes)
    spared = [s for s in services if not s.processes() & set(killed)]
    if len(spared) < 3:
        raise ValueError("too few services outside the killed processes; add services")
    moved, removed, model = spared[0], spared[1], spared[2]
    new = f"svc{count:0{max(2, len(str(count)))}d}"
    added = ServicePlan(new, f"/{new}/", tuple(
        (f"{new}-{k}", p) for k, (_, p) in enumerate(model.instances)))
    return Plan(services, moved, f"{moved.host}/{moved.name}-moved/", removed, added, killed)


def target_of(cycle: Sequence[Target], t: float, rate: float) -> Target:
    """The target of the request scheduled at `t` (s since the load began): paced_load
    schedules request i at i / rate and sends them in that order."""
    return cycle[round(t * rate) % len(cycle)]


# === judging and summing up (pure) =======================================================
def service_of_backend(backend: str) -> str:
    """The service of an instance id `svcNN-K` (the body of its 2xx answers)."""
    return backend.rpartition("-")[0]


@dataclass(frozen=True)
class Changes:
    """When (s since the load began, just before the first API call) each change began;
    None if it did not happen."""

    moved: float | None = None
    removed: float | None = None
    added: float | None = None

    def start_of(self, kind: str) -> float | None:
        return {MOVED_OLD: self.moved, MOVED_NEW: self.moved, REMOVED: self.removed,
                ADDED: self.added}.get(kind)


def first_served(samples: Sequence[c.Sample], target_for: Callable[[c.Sample], Target],
                 kind: str, since: float | None) -> float | None:
    """When the first 2xx of a route of class `kind` at or after `since` was complete
    (its scheduled time + latency); None if none."""
    if since is None:
        return None
    done = [s.t + s.latency for s in samples
            if s.ok and s.t + s.lag >= since and target_for(s).kind == kind]
    return min(done) if done else None


def judge(sample: c.Sample, target: Target, changes: Changes,
          served_at: float | None) -> str:
    """What one request came to. A request is sent at `t + lag`. A 404:
    - on a moved route's old prefix or a removed route, sent after its change began: GONE;
    - on a moved route's new prefix or an added route, sent before the first request that
      got its 2xx had its answer (`served_at`, None: never): NOT_YET;
    - anywhere else: FAILED, as is every other failure. A 2xx from an instance of another
    service is MISROUTED."""
    if sample.ok:
        return OK if service_of_backend(sample.backend) == target.service else MISROUTED
    if sample.outcome != "http 404":
        return FAILED
    sent = sample.t + sample.lag
    start = changes.start_of(target.kind)
    if target.kind in (MOVED_OLD, REMOVED):
        return GONE if start is not None and sent >= start else FAILED
    if target.kind in (MOVED_NEW, ADDED):
        return NOT_YET if served_at is None or sent < served_at else FAILED
    return FAILED


@dataclass
class ClassTally:
    """One route class: its routes, and its requests by what they came to."""

    routes: set[str] = field(default_factory=set)
    verdicts: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)  # FAILED/MISROUTED by outcome
    latencies: list[float] = field(default_factory=list)  # of the OK ones

    @property
    def requests(self) -> int:
        return sum(self.verdicts.values())

    @property
    def failed(self) -> int:
        return self.verdicts[FAILED] + self.verdicts[MISROUTED]


@dataclass
class RoutesReport:
    """Every request of a run judged and tallied by route class, and when each change
    showed through sdproxy (s since the load began)."""

    tallies: dict[str, ClassTally]
    changes: Changes
    served_at: dict[str, float | None]  # MOVED_NEW, ADDED: first 2xx complete
    gone_at: dict[str, float | None]  # MOVED_OLD, REMOVED: first expected 404 complete
    errors: list[tuple[float, str, str, str]]  # (t, route, outcome, verdict) of failures
    counted: list[c.Sample]  # every request but the expected 404s, by scheduled time

    @property
    def failed(self) -> int:
        return sum(t.failed for t in self.tallies.values())

    @property
    def requests(self) -> int:
        return sum(t.requests for t in self.tallies.values())

    def expected(self, verdict: str) -> int:
        return sum(t.verdicts[verdict] for t in self.tallies.values())

    def never_served(self) -> list[str]:
        """The new routes (moved, added) whose change happened and that never answered."""
        return [kind for kind, at in self.served_at.items()
                if at is None and self.changes.start_of(kind) is not None]

    @property
    def passed(self) -> bool:
        return self.failed == 0 and not self.never_served() and self.requests > 0

    def switch_times(self) -> list[tuple[str, str, float | None]]:
        """(route class, what, seconds from the change to sdproxy showing it) for every
        change."""
        rows = []
        for kind, label, table in ((MOVED_NEW, "moved: new prefix served", self.served_at),
                                   (MOVED_OLD, "moved: old prefix 404", self.gone_at),
                                   (REMOVED, "removed: 404", self.gone_at),
                                   (ADDED, "added: served", self.served_at)):
            start, at = self.changes.start_of(kind), table.get(kind)
            rows.append((kind, label, None if start is None or at is None else at - start))
        return rows

    def verdict_line(self) -> str:
        gone, not_yet = self.expected(GONE), self.expected(NOT_YET)
        head = "PASS" if self.passed else "FAIL"
        text = (f"verdict: {head}: {self.failed} failed requests on routes whose service had "
                f"a passing instance, of {self.requests - gone - not_yet} (expected 404s "
                f"apart: {gone} on removed/moved routes, {not_yet} before new routes were "
                "routable)")
        never = self.never_served()
        if never:
            text += "; never served: " + ", ".join(never)
        return text


def build_report(samples: Sequence[c.Sample], cycle: Sequence[Target], rate: float,
                 changes: Changes) -> RoutesReport:
    def target_for(s: c.Sample) -> Target:
        return target_of(cycle, s.t, rate)

    served_at = {kind: first_served(samples, target_for, kind, changes.start_of(kind))
                 for kind in (MOVED_NEW, ADDED)}
    tallies = {kind: ClassTally() for kind in CLASSES}
    gone: dict[str, list[float]] = {MOVED_OLD: [], REMOVED: []}
    errors = []
    counted = []
    for s in sorted(samples, key=lambda s: s.t):
        target = target_for(s)
        verdict = judge(s, target, changes, served_at.get(target.kind))
        tally = tallies[target.kind]
        tally.routes.add(f"{target.host}{target.path}")
        tally.verdicts[verdict] += 1
        if verdict not in (GONE, NOT_YET):
            counted.append(s)
        if verdict == OK:
            tally.latencies.append(s.latency)
        elif verdict in (FAILED, MISROUTED):
            outcome = f"200 from {s.backend}" if verdict == MISROUTED else s.outcome
            tally.failures[outcome] += 1
            errors.append((s.t, f"{target.host}{target.path}", outcome, verdict))
        elif verdict == GONE and target.kind in gone:
            gone[target.kind].append(s.t + s.latency)
    gone_at = {kind: min(times) if times else None for kind, times in gone.items()}
    return RoutesReport(tallies, changes, served_at, gone_at, errors, counted)


def report_table(report: RoutesReport) -> str:
    rows = []
    for kind in CLASSES:
        t = report.tallies[kind]
        rows.append([kind, len(t.routes), t.requests, t.verdicts[OK], t.verdicts[GONE],
                     t.verdicts[NOT_YET], t.failed, c.ms(c.percentile(t.latencies, 0.5)),
                     c.ms(c.percentile(t.latencies, 0.99))])
    total = [t for t in report.tallies.values()]
    rows.append(["total", sum(len(t.routes) for t in total), report.requests,
                 report.expected(OK), report.expected(GONE), report.expected(NOT_YET),
                 report.failed,
                 c.ms(c.percentile([x for t in total for x in t.latencies], 0.5)),
                 c.ms(c.percentile([x for t in total for x in t.latencies], 0.99))])
    return c.format_table(["route class", "routes", "requests", "ok", GONE, NOT_YET,
                           "failed", "ok p50", "ok p99"], rows)


def failovers_by_reason(metrics_text: str) -> str:
    """sdproxy's failovers summed over every upstream, by reason ("connect-failure x9,
    reset x1"); with one upstream per routed service, per-upstream lines say little."""
    reasons: Counter[str] = Counter()
    for labels, value in c.metric_samples(metrics_text, "sdproxy_failovers_total"):
        reasons[labels.get("reason", "?")] += int(value)
    return c.kinds_text(+reasons) if +reasons else "none"


# === the run =============================================================================
class RouteSender:
    """The load's `send`: request i goes to `cycle[i % len(cycle)]`, over a keep-alive
    client per Host header (all to the one listener)."""

    def __init__(self, listen: c.Addr, cycle: Sequence[Target]) -> None:
        self.listen = listen
        self.cycle = list(cycle)
        self.clients = {t.host: c.HttpClient(host_header=t.host or "loadtest") for t in cycle}
        self.sent = 0

    async def send(self) -> c.Response:
        target = self.cycle[self.sent % len(self.cycle)]
        self.sent += 1
        return await self.clients[target.host].get(self.listen, target.path)

    @property
    def connects(self) -> int:
        return sum(client.connects for client in self.clients.values())

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def run(args: argparse.Namespace) -> int:
    return c.run_scenario("routes", lambda stack: _run(stack, args))


def _run(stack: contextlib.ExitStack, args: argparse.Namespace) -> int:
    try:
        plan = make_plan(args.services, args.processes)
    except ValueError as e:
        raise c.ScenarioError(str(e)) from None
    d = args.duration
    c.say(f"routes: Consul, {len(plan.services)} tagged services on {args.processes} backend "
          f"processes, one sdproxy listener with catalog_routes; {args.rate:g} GET/s for "
          f"{d:g}s; kill -9 of processes {plan.killed[0]} and {plan.killed[1]} at "
          f"t={KILL_FIRST * d:g}s and t={KILL_SECOND * d:g}s, {plan.moved.name} moved at "
          f"t={MOVE * d:g}s, {plan.removed.name}'s route removed at t={REMOVE * d:g}s, "
          f"{plan.added.name} added at t={ADD * d:g}s")
    agent = c.start_consul(stack)
    everyone = [*plan.services, plan.added]
    groups: list[list[str]] = [[] for _ in range(args.processes)]
    for s in everyone:
        for instance, process in s.instances:
            groups[process].append(instance)
    backends = rp.start_ports_backends(stack, groups)
    port = {name: port for b in backends for name, port in b.ports.items()}

    def register(service: ServicePlan, tags: list[str]) -> None:
        for instance, _ in service.instances:
            agent.register(rp.tagged_registration(service.name, instance, port[instance],
                                                  tags))

    for s in plan.services:
        register(s, rp.route_tags(s.route))
    proxy = rp.start_routed_sdproxy(stack, agent.http_addr)
    probe = rp.RouteProbe(proxy.listen)
    try:
        for s in plan.services:
            if probe.until(s.host, s.path, 200, time.perf_counter(), ROUTED_TIMEOUT) is None:
                raise c.ScenarioError(f"{s.route} not routed within {ROUTED_TIMEOUT:g}s")
        for target in plan.targets():
            if target.kind in (MOVED_NEW, ADDED) and probe.get(target.host, target.path)[0] \
                    != 404:
                raise c.ScenarioError(f"{target.host}{target.path} answered before its tag")
    finally:
        probe.close()
    c.say(f"  all {len(plan.services)} routes served; load starts")

    cycle = plan.cycle()
    sender = RouteSender(proxy.listen, cycle)
    warm = RouteSender(proxy.listen, [t for t in cycle if t.kind not in (MOVED_NEW, ADDED)])
    when: dict[str, float] = {}
    start_line = len(proxy.child.lines)

    async def changes(timeline: c.Timeline) -> None:
        steps: list[tuple[float, str, Callable[[], None]]] = [
            (KILL_FIRST, f"kill -9 backends-{plan.killed[0]}", backends[plan.killed[0]].kill),
            (MOVE, f"move {plan.moved.name}", lambda: register(
                plan.moved, rp.route_tags(plan.moved_route))),
            (REMOVE, f"untag {plan.removed.name}", lambda: register(plan.removed, ["v1"])),
            (ADD, f"add {plan.added.name}", lambda: register(
                plan.added, rp.route_tags(plan.added.route))),
            (KILL_SECOND, f"kill -9 backends-{plan.killed[1]}",
             backends[plan.killed[1]].kill),
        ]
        for share, label, action in steps:
            await asyncio.sleep(max(0.0, share * d - timeline.now()))
            began = timeline.now()
            await asyncio.to_thread(action)
            when[label.split()[0]] = began
            timeline.mark(label, began)

    async def main() -> tuple[list[c.Sample], c.Timeline]:
        await c.warm_up(warm.send, count=100)
        timeline = c.Timeline()
        changer = asyncio.create_task(changes(timeline))
        try:
            samples = await c.paced_load(sender.send, rate=args.rate, duration=d,
                                         timeline=timeline, timeout=args.timeout)
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(changer, 15)
        return samples, timeline

    samples, timeline = c.run_async(main())
    sender.close()
    warm.close()
    proxy.check_alive()

    report = build_report(samples, cycle, args.rate,
                          Changes(when.get("move"), when.get("untag"), when.get("add")))
    for label, at in (("sdproxy: moved route served", report.served_at[MOVED_NEW]),
                      ("sdproxy: added route served", report.served_at[ADDED])):
        if at is not None:
            timeline.mark(label, at)
    upstreams = proxy.events("catalog_upstreams", start_line)
    total = c.summarize(samples)
    c.say()
    c.say(f"routes through one sdproxy listener: {args.rate:g} GET/s for {d:g}s over "
          f"{len(plan.targets())} routes (client never retries)")
    c.say(report_table(report))
    c.say()
    for kind, label, took in report.switch_times():
        every = len(cycle) / (args.rate * max(1, sum(t.kind == kind for t in cycle)))
        c.say(f"  {label:<28}{'+' + c.ms(took) if took is not None else 'not seen'} after "
              f"the change began (the route is asked every {c.ms(every)})")
    failures = Counter[str]()
    for tally in report.tallies.values():
        failures.update(tally.failures)
    c.say(f"  failures by kind            {c.kinds_text(failures)}")
    for at, route, outcome, verdict in report.errors[:20]:
        c.say(f"    t={at:.3f}s {route} {outcome} ({verdict})")
    c.say(f"  sdproxy catalog upstreams   {len(upstreams)} event=catalog_upstreams lines "
          "during the load: " + "; ".join(
              f"+{f.get('added', '-')} -{f.get('removed', '-')}" for _, f in upstreams))
    c.say(f"  sdproxy failovers           {failovers_by_reason(proxy.metrics())}")
    c.say(f"  client                      {sender.connects} connections opened; generator "
          f"send lag p99 {c.ms(total.lag_p99)}")
    c.say()
    c.say(report.verdict_line())

    if args.plot:
        c.save_plot(args.plot, f"routes: {len(plan.services)} services behind one listener, "
                    f"{args.rate:g} GET/s for {d:g}s; instances killed, routes moved, "
                    "removed and added",
                    [c.timeline_panel(f"through sdproxy: {report.failed} failed of "
                                      f"{len(report.counted)} (expected 404s left out)",
                                      report.counted, d, timeline.marks)])
    return 0 if report.passed else 1
