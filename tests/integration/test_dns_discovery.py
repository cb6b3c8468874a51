"""DnsWatcher against a real `consul agent -dev` DNS interface (proxy.devconsul), no mocks.

Every test watches its own service name on one module-wide agent; the test that stops
Consul starts an agent of its own. Waiting is always for an event (`asyncio.timeout`
around a queue), never sleep-and-check.

The last section drives the watcher's TTL, error, backoff and target-lookup paths through
a scripted DNS server on loopback (TCP, as the watcher asks), because a real Consul
cannot be made to answer SERVFAIL, hang, or send TTLs above 0 on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Self, cast

import dns.asyncresolver
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest
from support.consul import ttl_instance
from support.dnsmsg import reply
from support.fakes import FakeClock
from support.watch import AliveSink, FailingOnceSink, ids, running, stop

from proxy.config import DnsConfig, UpstreamConfig
from proxy.devconsul import ConsulAgent, free_port
from proxy.discovery.dns import QUERY_LIFETIME, DnsWatcher, make_resolver
from proxy.model import Address, CatalogAnswer

INTERVAL = 0.2  # re-resolve period in these tests
MARGIN = 1.0  # what a change may take beyond one interval (Consul's sync, a busy CI box)
STEP = INTERVAL + MARGIN
LISTEN = Address("127.0.0.1", 0)


def upstream(name: str, **kw: Any) -> UpstreamConfig:
    return UpstreamConfig(name=name, listen=LISTEN, discovery="dns", **kw)


@contextlib.asynccontextmanager
async def watching(dns_port: int, name: str, *, interval: float = INTERVAL,
                   domain: str = "service.consul",
                   resolver: dns.asyncresolver.Resolver | None = None,
                   **kw: Any) -> AsyncIterator[tuple[DnsWatcher, AliveSink]]:
    sink = AliveSink(STEP)
    config = DnsConfig(nameservers=(Address("127.0.0.1", dns_port),), domain=domain,
                       interval=interval)
    watcher = DnsWatcher(config, upstream(name, **kw), sink, resolver=resolver,
                         rng=random.Random(7))
    async with running(watcher):
        yield watcher, sink


async def timed(action: Callable[[], object], sink: AliveSink,
                pred: Callable[[CatalogAnswer], bool], label: str) -> CatalogAnswer:
    """Run a blocking Consul API call, wait for the answer it causes, print the delay.

    The call starts just after the watcher's lookup that produced the previous answer,
    so the delay measured is the worst case: about one interval.
    """
    started = time.perf_counter()
    await asyncio.to_thread(action)
    answer = await sink.answer_where(pred)
    delay = time.perf_counter() - started
    print(f"\n{label} -> answer: {delay * 1000:.1f} ms (interval {INTERVAL * 1000:.0f} ms)")
    assert delay < STEP
    return answer


@pytest.fixture(scope="module")
def agent() -> Iterator[ConsulAgent]:
    with ConsulAgent() as a:
        yield a


# -- against a real Consul --------------------------------------------------------------
async def test_srv_pool_follows_the_catalog(agent: ConsulAgent) -> None:
    p1, p2, p3 = 9101, 9102, 9103
    agent.register(ttl_instance("dsrv", "dsrv-1", p1, address="127.0.0.2"))
    agent.register(ttl_instance("dsrv", "dsrv-2", p2, address=""))  # -> the node's address
    async with watching(agent.dns_port, "dsrv") as (watcher, sink):
        first = await sink.answer_where(lambda a: True)
        by_id = {e.id: e for e in first.endpoints}
        assert set(by_id) == {f"127.0.0.2:{p1}", f"127.0.0.1:{p2}"}
        assert by_id[f"127.0.0.1:{p2}"].node == f"{agent.node}.node.{agent.datacenter}.consul"
        assert by_id[f"127.0.0.2:{p1}"].node == f"7f000002.addr.{agent.datacenter}.consul"
        assert all(e.weight == 1 for e in first.endpoints)
        assert first.index is None
        assert watcher.last_success is not None

        both = ids(first)
        third = f"127.0.0.3:{p3}"
        await timed(lambda: agent.register(ttl_instance("dsrv", "dsrv-3", p3, address="127.0.0.3")),
                    sink, lambda a: ids(a) == both | {third}, "register")
        await timed(lambda: agent.deregister("dsrv-3"), sink, lambda a: ids(a) == both,
                    "deregister")
        await timed(lambda: agent.check_fail("dsrv-1-ttl"), sink,
                    lambda a: ids(a) == {f"127.0.0.1:{p2}"}, "check_fail")
        await timed(lambda: agent.check_pass("dsrv-1-ttl"), sink, lambda a: ids(a) == both,
                    "check_pass")
        # Only changes are emitted: a few quiet intervals bring nothing new.
        with pytest.raises(TimeoutError):
            await sink.answer_where(lambda a: True, timeout=INTERVAL * 3)
        assert watcher.errors == 0


class NoAdditional(dns.asyncresolver.Resolver):
    """Drops the additional section of SRV answers, as a nameserver that does not send
    target addresses would, so the watcher must look every target up itself."""

    def __init__(self, base: dns.asyncresolver.Resolver) -> None:
        super().__init__(configure=False)
        self.nameservers = base.nameservers
        self.timeout, self.lifetime, self.cache = base.timeout, base.lifetime, None
        self.asked: list[tuple[str, str]] = []

    async def resolve(self, qname: dns.name.Name | str,
                      rdtype: dns.rdatatype.RdataType | str = dns.rdatatype.A,
                      *args: Any, **kw: Any) -> dns.resolver.Answer:
        self.asked.append((str(qname),
                           dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rdtype))))
        answer = await super().resolve(qname, rdtype, *args, **kw)
        if answer.rdtype == dns.rdatatype.SRV:
            # Through the wire format, so the message's lookup index forgets them too.
            answer.response.additional = []
            answer.response = cast(dns.message.QueryMessage,
                                   dns.message.from_wire(answer.response.to_wire()))
        return answer


async def test_srv_targets_are_resolved_through_the_same_nameserver(
        agent: ConsulAgent) -> None:
    agent.register(ttl_instance("dtgt", "dtgt-1", 9201, address="127.0.0.2"))
    agent.register(ttl_instance("dtgt", "dtgt-2", 9202, address=""))
    config = DnsConfig(nameservers=(Address("127.0.0.1", agent.dns_port),))
    resolver = NoAdditional(make_resolver(config))
    async with watching(agent.dns_port, "dtgt", resolver=resolver) as (_, sink):
        answer = await sink.answer_where(lambda a: True)
        assert ids(answer) == {"127.0.0.2:9201", "127.0.0.1:9202"}
    dc = agent.datacenter
    assert ("dtgt.service.consul.", "SRV") in resolver.asked
    assert (f"{agent.node}.node.{dc}.consul.", "A") in resolver.asked
    assert (f"7f000002.addr.{dc}.consul.", "A") in resolver.asked


async def test_more_instances_than_a_udp_answer_holds(agent: ConsulAgent) -> None:
    # Consul trims UDP answers to 3 records without EDNS (19 SRV at 1232 bytes) without
    # setting TC; the watcher asks over TCP and must see every instance.
    count = 30
    for i in range(count):
        agent.register(ttl_instance("dmany", f"dmany-{i}", 9300 + i, address=f"127.0.3.{i + 1}"))
    async with watching(agent.dns_port, "dmany") as (_, sink):
        answer = await sink.answer_where(lambda a: True)
        assert len(answer.endpoints) == count


async def test_a_mode_with_a_fixed_port(agent: ConsulAgent) -> None:
    agent.register(ttl_instance("da", "da-1", 1, address="127.0.0.2"))  # the SRV port is ignored
    agent.register(ttl_instance("da", "da-2", 2, address="127.0.0.3"))
    async with watching(agent.dns_port, "da", dns_type="A", port=8080) as (_, sink):
        first = await sink.answer_where(lambda a: True)
        assert ids(first) == {"127.0.0.2:8080", "127.0.0.3:8080"}
        assert {e.port for e in first.endpoints} == {8080}
        await timed(lambda: agent.register(ttl_instance("da", "da-3", 3, address="127.0.0.4")),
                    sink, lambda a: "127.0.0.4:8080" in ids(a), "A register")
        await timed(lambda: agent.check_fail("da-1-ttl"), sink,
                    lambda a: ids(a) == {"127.0.0.3:8080", "127.0.0.4:8080"}, "A check_fail")
        await timed(lambda: agent.deregister("da-3"), sink,
                    lambda a: ids(a) == {"127.0.0.3:8080"}, "A deregister")


async def test_no_passing_instance_is_an_empty_answer(agent: ConsulAgent) -> None:
    async with watching(agent.dns_port, "dnone") as (watcher, sink):
        # Unknown to Consul: NXDOMAIN, which is an answer (the upstream is known empty).
        first = await sink.answer_where(lambda a: True)
        assert first.endpoints == ()
        await timed(lambda: agent.register(ttl_instance("dnone", "dnone-1", 9401)), sink,
                    lambda a: ids(a) == {"127.0.0.2:9401"}, "register")
        await timed(lambda: agent.check_fail("dnone-1-ttl"), sink, lambda a: not a.endpoints,
                    "last check_fail")
        assert sink.errors.empty() and watcher.errors == 0


async def test_stopped_agent_reports_errors_and_keeps_the_last_answer(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sdproxy.discovery.dns")
    with ConsulAgent() as own:
        own.register(ttl_instance("dgone", "dgone-1", 9501))
        async with watching(own.dns_port, "dgone") as (watcher, sink):
            await sink.answer_where(lambda a: ids(a) == {"127.0.0.2:9501"})
            started = time.perf_counter()
            await asyncio.to_thread(own.stop)
            errors = [await sink.error(timeout=STEP + QUERY_LIFETIME) for _ in range(3)]
            print(f"\nagent stopped -> 3 errors: {(time.perf_counter() - started) * 1000:.1f} ms")
            server = f"127.0.0.1:{own.dns_port}"
            assert all(e.startswith(f"dns {server}: SRV dgone.service.consul.: ")
                       for e in errors)
            assert errors[-1].endswith(f"{server} connection refused")
            assert sink.answers.empty()  # the last answer stays in force: nothing emitted
            assert watcher.errors >= 3
    lines = [r.getMessage() for r in caplog.records if "event=catalog_error" in r.getMessage()]
    assert len(lines) >= 3
    assert lines[-1].startswith('event=catalog_error upstream=dgone error="dns ')


# -- a scripted DNS server stands in where a real Consul cannot misbehave on demand -----
Handler = Callable[[dns.message.Message], "dns.message.Message | None"]


def question(query: dns.message.Message) -> tuple[str, str]:
    q = query.question[0]
    return q.name.to_text(), dns.rdatatype.to_text(q.rdtype)


class ScriptedDns:
    """A DNS-over-TCP server (RFC 1035 4.2.2 framing) that answers with `handler`;
    a handler returning None leaves the query unanswered (the client times out)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.asked: list[tuple[str, str]] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                query = dns.message.from_wire(await reader.readexactly(size))
                self.asked.append(question(query))
                response = self.handler(query)
                if response is None:
                    await reader.read()  # hold the connection until the client gives up
                    return
                wire = response.to_wire()
                writer.write(len(wire).to_bytes(2, "big") + wire)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def scripted_watcher(port: int, sink: AliveSink, *, interval: float = 30.0,
                     lifetime: float | None = None, **kw: Any) -> DnsWatcher:
    config = DnsConfig(nameservers=(Address("127.0.0.1", port),), domain="svc.test",
                       interval=interval)
    resolver = make_resolver(config)
    if lifetime is not None:
        resolver.timeout = resolver.lifetime = lifetime
    return DnsWatcher(config, upstream("web", **kw), sink, resolver=resolver,
                      rng=random.Random(3), clock=FakeClock())


QNAME = "web.svc.test."


def srv_answer(ttl: int = 0, port: int = 9001) -> Handler:
    def handle(query: dns.message.Message) -> dns.message.Message:
        return reply(query, [f"{QNAME} {ttl} IN SRV 1 1 {port} a.test."],
                     additional=["a.test. 0 IN A 10.0.0.1"])
    return handle


def servfail(query: dns.message.Message) -> dns.message.Message:
    return reply(query, rcode=dns.rcode.SERVFAIL)


async def test_a_ttl_above_zero_brings_the_next_lookup_forward() -> None:
    async with ScriptedDns(srv_answer(ttl=0)) as server:
        sink = AliveSink(STEP)
        watcher = scripted_watcher(server.port, sink, interval=30.0)
        assert await watcher.poll_once() == 30.0  # TTL 0: the interval
        server.handler = srv_answer(ttl=4)
        assert await watcher.poll_once() == 4.0
        server.handler = srv_answer(ttl=60)
        assert await watcher.poll_once() == 30.0  # a longer TTL never delays it
        assert sink.answers.qsize() == 1  # the same endpoints each time: one answer
        assert sink.alive == 2  # the unchanged ones keep the pool fresh


async def test_servfail_keeps_the_last_answer_and_recovery_is_reported() -> None:
    async with ScriptedDns(srv_answer()) as server:
        sink = AliveSink(STEP)
        watcher = scripted_watcher(server.port, sink, interval=0.3)
        await watcher.poll_once()
        first = sink.answers.get_nowait()
        assert ids(first) == {"10.0.0.1:9001"}
        server.handler = servfail
        delays = [await watcher.poll_once() for _ in range(8)]
        # Backoff with jitter that grows, but never past the interval.
        assert all(0.0 <= d <= 0.3 for d in delays)
        assert max(delays[:2]) <= 0.2
        error = sink.errors.get_nowait()
        assert error == (f"dns 127.0.0.1:{server.port}: SRV {QNAME}: "
                         f"127.0.0.1:{server.port} answered SERVFAIL")
        assert sink.answers.empty() and watcher.errors == 8
        server.handler = srv_answer()
        assert await watcher.poll_once() == 0.3
        # Unchanged, but the first answer after an error is sent again.
        assert sink.answers.get_nowait() == first
        assert sink.alive == 0
        await watcher.poll_once()
        assert sink.answers.empty() and sink.alive == 1


async def test_a_silent_nameserver_is_a_timeout() -> None:
    async with ScriptedDns(lambda q: None) as server:
        sink = AliveSink(STEP)
        watcher = scripted_watcher(server.port, sink, lifetime=0.3)
        started = time.perf_counter()
        await watcher.poll_once()
        assert time.perf_counter() - started < 2.0
        error = sink.errors.get_nowait()
        assert error.startswith(f"dns 127.0.0.1:{server.port}: SRV {QNAME}: timeout after")
        assert sink.answers.empty()


async def test_nxdomain_empties_the_pool_once() -> None:
    async with ScriptedDns(srv_answer()) as server:
        sink = AliveSink(STEP)
        watcher = scripted_watcher(server.port, sink)
        await watcher.poll_once()
        server.handler = lambda q: reply(q, rcode=dns.rcode.NXDOMAIN)
        await watcher.poll_once()
        await watcher.poll_once()
        assert [len(a.endpoints) for a in sink.drain()] == [1, 0]
        assert sink.errors.empty()


def targets(extra: Callable[[dns.message.Message], dns.message.Message | None]) -> Handler:
    """SRV for two targets without addresses; their lookups go to `extra`."""
    def handle(query: dns.message.Message) -> dns.message.Message | None:
        name, rdtype = question(query)
        if (name, rdtype) == (QNAME, "SRV"):
            return reply(query, [f"{QNAME} 0 IN SRV 1 1 9001 v4.test.",
                                 f"{QNAME} 0 IN SRV 1 1 9002 v6.test.",
                                 f"{QNAME} 0 IN SRV 1 1 9003 broken.test."])
        if (name, rdtype) == ("v4.test.", "A"):
            return reply(query, ["v4.test. 0 IN A 10.0.0.4"])
        if name == "v6.test.":
            return reply(query, ["v6.test. 0 IN AAAA 2001:db8::6"] if rdtype == "AAAA" else [])
        return extra(query)
    return handle


async def test_targets_are_looked_up_and_a_refused_one_is_left_out(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sdproxy.discovery.dns")
    refused = targets(lambda q: reply(q, rcode=dns.rcode.REFUSED))
    async with ScriptedDns(refused) as server:
        sink = AliveSink(STEP)
        watcher = scripted_watcher(server.port, sink)
        await watcher.poll_once()
        await watcher.poll_once()
        assert ids(sink.answers.get_nowait()) == {"10.0.0.4:9001", "[2001:db8::6]:9002"}
        assert sink.answers.empty() and sink.errors.empty()
        # A, then AAAA only where A had nothing.
        assert {q for q in server.asked if q[0] != QNAME} == {
            ("v4.test.", "A"), ("v6.test.", "A"), ("v6.test.", "AAAA"),
            ("broken.test.", "A")}
    lines = [r.getMessage() for r in caplog.records]
    # Logged when it starts, not once per lookup.
    assert lines == [('event=dns_target_unresolved upstream=web target=broken.test. '
                      f'error="127.0.0.1:{server.port} answered REFUSED"')]


async def test_a_target_lookup_nobody_answers_fails_the_whole_lookup() -> None:
    async with ScriptedDns(targets(lambda q: None)) as server:
        sink = AliveSink(STEP)
        watcher = scripted_watcher(server.port, sink, lifetime=0.3)
        await watcher.poll_once()
        error = sink.errors.get_nowait()
        assert error.startswith(f"dns 127.0.0.1:{server.port}: SRV {QNAME}: "
                                "target broken.test.: timeout after")
        assert sink.answers.empty()  # a half-resolved answer would shrink the pool


async def test_reread_wakes_the_loop_at_once() -> None:
    async with ScriptedDns(srv_answer(port=9001)) as server:
        sink = AliveSink(STEP)
        config = DnsConfig(nameservers=(Address("127.0.0.1", server.port),),
                           domain="svc.test", interval=60.0)
        watcher = DnsWatcher(config, upstream("web"), sink)
        async with running(watcher):
            await sink.answer_where(lambda a: ids(a) == {"10.0.0.1:9001"})
            server.handler = srv_answer(port=9002)
            started = time.perf_counter()
            watcher.reread()
            await sink.answer_where(lambda a: ids(a) == {"10.0.0.1:9002"}, timeout=1.0)
            print(f"\nreread -> answer: {(time.perf_counter() - started) * 1000:.1f} ms")


async def test_a_failing_sink_does_not_kill_the_loop() -> None:
    async with ScriptedDns(srv_answer()) as server:
        sink = FailingOnceSink(STEP)
        config = DnsConfig(nameservers=(Address("127.0.0.1", server.port),),
                           domain="svc.test", interval=INTERVAL)
        async with running(DnsWatcher(config, upstream("web"), sink)):
            error = await sink.error()
            answer = await sink.answer_where(lambda a: True)  # sent again after the failure
            assert "internal error: RuntimeError: boom" in error
            assert ids(answer) == {"10.0.0.1:9001"}


@pytest.mark.parametrize("nameserver,message", [
    (Address("consul.local", 8600), "nameserver consul.local:8600 is not an IP address"),
])
async def test_bad_setup_is_reported_not_raised(nameserver: Address, message: str) -> None:
    sink = AliveSink(STEP)
    watcher = DnsWatcher(DnsConfig(nameservers=(nameserver,), interval=INTERVAL),
                         upstream("web"), sink)
    async with running(watcher):
        assert (await sink.error()).endswith(message)
        await sink.error()  # and retried, within the interval


async def test_nothing_listening_is_refused_at_once() -> None:
    sink = AliveSink(STEP)
    port = free_port()
    watcher = scripted_watcher(port, sink)
    started = time.perf_counter()
    await watcher.poll_once()
    assert time.perf_counter() - started < 0.5  # TCP: refused, not a timeout
    assert sink.errors.get_nowait().endswith(f"127.0.0.1:{port} connection refused")


class SwallowsOneCancel(dns.asyncresolver.Resolver):
    """Loses the first cancellation, as Python 3.11's asyncio.wait_for (used inside
    dnspython's queries) does when it lands just as the inner future completes."""

    def __init__(self, base: dns.asyncresolver.Resolver) -> None:
        super().__init__(configure=False)
        self.nameservers = base.nameservers
        self.entered = asyncio.Event()
        self.swallowed = False

    async def resolve(self, *args: Any, **kw: Any) -> dns.resolver.Answer:
        if not self.swallowed:
            self.entered.set()
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                self.swallowed = True
        return await super().resolve(*args, **kw)


async def test_a_cancellation_lost_inside_a_query_still_ends_run() -> None:
    async with ScriptedDns(srv_answer()) as server:
        config = DnsConfig(nameservers=(Address("127.0.0.1", server.port),),
                           domain="svc.test", interval=INTERVAL)
        resolver = SwallowsOneCancel(make_resolver(config))
        task = asyncio.create_task(DnsWatcher(config, upstream("web"), AliveSink(STEP),
                                              resolver=resolver).run())
        await resolver.entered.wait()
        await stop(task)
        assert resolver.swallowed
