"""dns-vs-proxy: the same kill -9 failover, once through Consul DNS and once through sdproxy.

Two services of three backends each, one Consul agent, sdproxy in front of the second
service. Run (a): the client looks up `web-dns.service.consul` SRV through Consul's DNS
interface (TTL 0, so no cache) before every request, with dnspython's asyncio resolver
at 127.0.0.1:<agent dns port>, picks a record as RFC 2782 says (lowest priority, then by
weight) and sends the request to that address over a keep-alive pool per address: what
a frontend that "uses Consul DNS" does. Run (b): the same client through sdproxy. Both
at --rate for --duration, one backend killed with SIGKILL half way, no client retries.
The report puts them side by side: errors, the error window, latency; --plot draws both
timelines, one row each.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import random
import struct
from dataclasses import dataclass
from typing import NamedTuple

import dns.asyncresolver
import dns.rdatatype

from loadtest import common as c

DESCRIPTION = "kill -9 failover through Consul DNS (TTL 0) vs through sdproxy"
DNS_SERVICE = "web-dns"
PROXY_SERVICE = "web-proxy"
NAMES = ("a-1", "a-2", "a-3")
VICTIM_INDEX = 1
SRV, A = 33, 1  # RR types (RFC 2782, RFC 1035)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    c.add_load_arguments(parser, duration=8.0,
                         duration_help="seconds per run (default 8: two runs stay under ~30 s)")
    parser.add_argument("--resolver", choices=("raw", "dnspython"), default="raw",
                        help="the DNS client: raw (default), a minimal SRV client on one UDP "
                             "socket (~0.2 ms CPU per lookup), or dnspython's asyncio "
                             "resolver (~1-2 ms CPU per lookup here: at 500/s on 2 cores "
                             "the client itself saturates)")


class SrvRecord(NamedTuple):
    priority: int
    weight: int
    port: int
    target: str  # lower case, no trailing dot
    address: str | None  # from the additional section, when given


def choose(records: list[SrvRecord], rng: random.Random) -> SrvRecord:
    """RFC 2782: the lowest priority, then at random by weight (uniform if all are 0)."""
    best = min(r.priority for r in records)
    group = [r for r in records if r.priority == best]
    weights = [r.weight for r in group]
    return rng.choices(group, weights)[0] if sum(weights) else rng.choice(group)


def build_query(qid: int, name: str, qtype: int = SRV) -> bytes:
    """A recursion-desired query for `name` (RFC 1035 section 4.1)."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.strip(".").split("."))
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + \
        struct.pack("!HH", qtype, 1)


def _name(data: bytes, pos: int) -> tuple[str, int]:
    """A possibly compressed domain name at `pos` -> (name, position after it)."""
    labels: list[str] = []
    end = None
    for _ in range(128):  # bounded: a pointer loop cannot spin
        n = data[pos]
        if n & 0xC0 == 0xC0:
            if end is None:
                end = pos + 2
            pos = ((n & 0x3F) << 8) | data[pos + 1]
        elif n == 0:
            return ".".join(labels).lower(), (pos + 1 if end is None else end)
        else:
            labels.append(data[pos + 1:pos + 1 + n].decode("ascii", "replace"))
            pos += 1 + n
    raise ValueError("DNS name too long or looping")


def parse_srv_response(data: bytes) -> tuple[int, int, list[SrvRecord]]:
    """(query id, rcode, SRV answers with their A addresses from the additional section)."""
    qid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", data)
    pos = 12
    for _ in range(qd):
        pos = _name(data, pos)[1] + 4
    srv: list[tuple[int, int, int, str]] = []
    addresses: dict[str, str] = {}
    for i in range(an + ns + ar):
        owner, pos = _name(data, pos)
        rtype, _cls, _ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
        pos += 10
        if rtype == SRV and i < an:
            prio, weight, port = struct.unpack_from("!HHH", data, pos)
            srv.append((prio, weight, port, _name(data, pos + 6)[0]))
        elif rtype == A and rdlen == 4:
            addresses.setdefault(owner, ".".join(str(b) for b in data[pos:pos + 4]))
        pos += rdlen
    return qid, flags & 0xF, [SrvRecord(p, w, port, t, addresses.get(t)) for p, w, port, t in srv]


class RawSrvResolver(asyncio.DatagramProtocol):
    """SRV lookups over one connected UDP socket, answers matched by query id: the same
    questions as dnspython asks, at a fraction of its CPU per lookup."""

    def __init__(self, server: c.Addr, timeout: float = 2.0) -> None:
        self.server = server
        self.timeout = timeout
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.next_id = random.Random(11).randrange(1 << 16)

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, remote_addr=self.server)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) >= 2:
            fut = self.pending.pop(struct.unpack_from("!H", data)[0], None)
            if fut is not None and not fut.done():
                fut.set_result(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    async def lookup(self, name: str) -> list[SrvRecord]:
        if self.transport is None:
            await self.open()
        assert self.transport is not None
        while self.next_id in self.pending:
            self.next_id = (self.next_id + 1) & 0xFFFF
        qid, self.next_id = self.next_id, (self.next_id + 1) & 0xFFFF
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending[qid] = fut
        try:
            self.transport.sendto(build_query(qid, name))
            async with asyncio.timeout(self.timeout):
                data = await fut
        finally:
            self.pending.pop(qid, None)
        _, rcode, records = parse_srv_response(data)
        if rcode or not records:
            raise LookupError(f"dns rcode {rcode}, {len(records)} SRV records for {name}")
        return records


class DnspythonSrvResolver:
    """The same lookups through dnspython's asyncio resolver (no cache)."""

    def __init__(self, server: c.Addr, timeout: float = 2.0) -> None:
        self.resolver = dns.asyncresolver.Resolver(configure=False)
        self.resolver.nameservers = [server[0]]
        self.resolver.port = server[1]
        self.resolver.lifetime = timeout
        self.resolver.cache = None  # TTL 0 anyway; no client-side caching at all

    async def lookup(self, name: str) -> list[SrvRecord]:
        answer = await self.resolver.resolve(name, "SRV")
        addresses = {rrset.name.to_text(omit_final_dot=True).lower(): rrset[0].address
                     for rrset in answer.response.additional
                     if rrset.rdtype == dns.rdatatype.A}
        out = []
        for r in answer:
            target = r.target.to_text(omit_final_dot=True).lower()
            out.append(SrvRecord(r.priority, r.weight, r.port, target, addresses.get(target)))
        return out

    def close(self) -> None:
        pass


class SrvClient:
    """Resolve SRV before every request, choose a record, GET over `client`'s pools."""

    def __init__(self, client: c.HttpClient, resolver: RawSrvResolver | DnspythonSrvResolver,
                 name: str, rng: random.Random) -> None:
        self.client = client
        self.resolver = resolver
        self.name = name
        self.rng = rng

    async def get(self) -> c.Response:
        rec = choose(await self.resolver.lookup(self.name), self.rng)
        if rec.address is None:
            raise LookupError(f"no A record for {rec.target} in the additional section")
        return await self.client.get((rec.address, rec.port))


@dataclass
class Run:
    """One failover run: what the client saw and when things happened (timeline s)."""

    samples: list[c.Sample]
    timeline: c.Timeline
    killed: float
    critical: float | None
    connects: int


def since(t: float | None, ref: float) -> str:
    """`t` relative to `ref` as a signed number of seconds; '-' when it never happened."""
    return "-" if t is None else f"{t - ref:+.3f}s"


def run(args: argparse.Namespace) -> int:
    return c.run_scenario("dns-vs-proxy", lambda stack: _run(stack, args))


def _run(stack: contextlib.ExitStack, args: argparse.Namespace) -> int:
    c.say(f"dns-vs-proxy: Consul, 2 x 3 backends, sdproxy; twice {args.rate:g} GET/s for "
          f"{args.duration:g}s with a kill -9 at t={args.duration / 2:g}s: (a) Consul DNS "
          "SRV per request, (b) sdproxy")
    agent = c.start_consul(stack)
    names = {svc: [f"{svc}-{n}" for n in NAMES] for svc in (DNS_SERVICE, PROXY_SERVICE)}
    backends = c.start_backends(stack, names[DNS_SERVICE] + names[PROXY_SERVICE])
    for svc, ids in names.items():
        for name in ids:
            agent.register(c.backend_service(svc, backends[name]))
    for svc, ids in names.items():
        c.wait_passing(agent, svc, ids)
    proxy = c.start_sdproxy(stack, agent.http_addr, PROXY_SERVICE, expect=names[PROXY_SERVICE])

    results: dict[str, Run] = {}
    for label, svc in (("DNS (TTL 0)", DNS_SERVICE), ("sdproxy", PROXY_SERVICE)):
        victim = names[svc][VICTIM_INDEX]
        client = c.HttpClient()
        if svc == DNS_SERVICE:
            server = ("127.0.0.1", agent.dns_port)
            resolver = RawSrvResolver(server) if args.resolver == "raw" else \
                DnspythonSrvResolver(server)
            send = SrvClient(client, resolver, f"{svc}.service.consul", random.Random(7)).get
        else:
            send = functools.partial(client.get, proxy.listen)
        c.say(f"  run {label}: kill -9 {victim} at t={args.duration / 2:g}s")
        samples, timeline, watcher, start_line = c.kill_under_load(
            proxy if svc == PROXY_SERVICE else None, send, backends=backends, victim=victim,
            consul_addr=agent.http_addr, service=svc, rate=args.rate,
            duration=args.duration, timeout=args.timeout)
        client.close()
        if svc == DNS_SERVICE:
            with contextlib.suppress(RuntimeError):  # its loop may be closed already
                resolver.close()
        killed = timeline.mark_time("kill")
        critical, _ = c.mark_reactions(timeline, watcher, victim, killed,
                                     proxy if svc == PROXY_SERVICE else None, start_line)
        results[label] = Run(samples, timeline, killed, critical, client.connects)
    proxy.check_alive()

    labels = list(results)
    totals = {k: c.summarize(r.samples) for k, r in results.items()}
    afters = {k: c.summarize(c.split_at(r.samples, r.killed)[1]) for k, r in results.items()}
    rows = c.summary_rows([totals[k] for k in labels])
    rows += [
        ["error window", *(f"{totals[k].error_window * 1000:.0f} ms" if totals[k].errors
                           else "-" for k in labels)],
        ["first error after kill", *(since(totals[k].first_error, results[k].killed)
                                     for k in labels)],
        ["last error after kill", *(since(totals[k].last_error, results[k].killed)
                                    for k in labels)],
        ["p99 after kill", *(c.ms(afters[k].p99) for k in labels)],
        ["Consul critical after", *(since(results[k].critical, results[k].killed)
                                    for k in labels)],
        ["connections opened", *(results[k].connects for k in labels)],
        ["send lag p99", *(c.ms(totals[k].lag_p99) for k in labels)],
    ]
    c.say()
    c.say(f"dns-vs-proxy: {args.rate:g} GET/s for {args.duration:g}s each, kill -9 1 of 3 "
          "instances half way (client never retries)")
    c.say(c.format_table(["", *labels], rows))
    c.say()
    for k in labels:
        c.say(f"  errors by kind, {k + ':':<13} {c.kinds_text(totals[k].kinds)}")
    c.say(f"  sdproxy failovers           {c.failover_counts(proxy)}")
    c.say("  latency: from each request's scheduled send time, errors included; the DNS "
          "run includes one SRV lookup per request")
    c.say(f"  note: DNS stops answering with the victim only once Consul's next check of it "
          f"fails (every {c.HEALTH_INTERVAL}, at a random phase), so run (a)'s error window "
          "varies from ~0 to that interval between runs; sdproxy's does not depend on it")
    c.say()
    c.say("verdict: " + "; ".join(f"{k} {totals[k].errors} errors" for k in labels))

    if args.plot:
        panels = [c.timeline_panel(f"({'ab'[i]}) {k}: {totals[k].errors} errors in "
                                   f"{totals[k].requests} requests", results[k].samples,
                                   args.duration, results[k].timeline.marks)
                  for i, k in enumerate(labels)]
        c.save_plot(args.plot, f"dns-vs-proxy: kill -9 1 of 3 instances, {args.rate:g} "
                    f"GET/s for {args.duration:g}s, client without retries", panels)
    return 0
