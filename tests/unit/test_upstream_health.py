"""proxy.upstream.health: one probe against real loopback servers (status, timeout bound,
refused, garbage, tcp connect), and the checker's life with a real loop: it probes the
pool, follows catalog changes and config reloads, and stops."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from proxy.config import HealthConfig, UpstreamConfig
from proxy.devconsul import free_port
from proxy.model import Address, CatalogAnswer, Endpoint
from proxy.tls import UpstreamTlsConfig
from proxy.upstream.health import HealthChecker, probe_instance, probe_request
from proxy.upstream.health_state import (
    CONNECTED,
    ERROR,
    FAIL,
    PASS,
    TIMEOUT,
    ProbeResult,
    StatusExpectation,
)
from proxy.upstream.host import Host
from proxy.upstream.manager import UpstreamRuntime

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[int]:
    """A loopback server running `handler` per connection; yields its port."""
    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    srv = await asyncio.start_server(on_client, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()


def answering(status_line: bytes, heads: list[bytes] | None = None) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if heads is not None:
            heads.append(head)
        writer.write(status_line + b"Content-Length: 2\r\n\r\nok")
        await writer.drain()

    return handle


def host_at(port: int, hid: str = "i1") -> Host:
    return Host(Endpoint(hid, "127.0.0.1", port))


async def probe(port: int, tcp: bool = False, **cfg: object) -> ProbeResult:
    health = HealthConfig(**cfg)  # type: ignore[arg-type]
    return await probe_instance(host_at(port), health, "web", StatusExpectation(health.expect),
                                tcp)


# -- one probe ----------------------------------------------------------------------------

async def test_a_probe_is_a_get_with_the_upstream_name_as_host() -> None:
    heads: list[bytes] = []
    async with server(answering(b"HTTP/1.1 200 OK\r\n", heads)) as port:
        assert await probe(port, path="/ready") == (PASS, "200 on /ready")
    [head] = heads
    lines = head.decode().split("\r\n")
    assert lines[0] == "GET /ready HTTP/1.1"
    assert {"Host: web", "Connection: close", "User-Agent: sdproxy-health"} <= set(lines)


@pytest.mark.parametrize(("status_line", "expect", "kind"), [
    (b"HTTP/1.1 500 Internal Server Error\r\n", ("2xx",), FAIL),
    (b"HTTP/1.1 404 Not Found\r\n", ("2xx", "404"), PASS),
    (b"HTTP/1.0 302 Found\r\n", ("2xx",), FAIL),
    (b"HTTP/1.0 302 Found\r\n", ("3xx",), PASS),
])
async def test_the_status_is_judged_by_expect(status_line: bytes, expect: tuple[str, ...],
                                              kind: str) -> None:
    async with server(answering(status_line)) as port:
        assert (await probe(port, expect=expect)).kind == kind


async def test_a_hung_instance_fails_within_the_timeout() -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    async with server(hang) as port:
        started = time.monotonic()
        result = await probe(port, timeout=0.2)
        took = time.monotonic() - started
    assert result == (TIMEOUT, "timeout 0.2s") and result.reason == "health: timeout 0.2s"
    assert 0.2 <= took < 0.5


@pytest.mark.parametrize(("reply", "detail"), [
    (b"", "closed before answering"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "not an HTTP response"),
    (b"HTTP/1.1 " + b"2" * 9000, "not an HTTP response (status line too long)"),
])
async def test_what_is_not_an_answer_is_an_error(reply: bytes, detail: str) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()

    async with server(answer) as port:
        assert await probe(port) == (ERROR, detail)


async def test_a_refused_connect_is_an_error() -> None:
    port = free_port()  # nothing listens there
    assert await probe(port) == (ERROR, "connection refused")
    assert await probe(port, tcp=True) == (ERROR, "connection refused")


async def test_tcp_mode_connects_and_sends_nothing() -> None:
    received: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read())  # until the probe closes

    async with server(record) as port:
        assert await probe(port, tcp=True) == CONNECTED
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.01)
    assert received == [b""]


def test_a_name_cannot_split_the_probe_request() -> None:
    assert probe_request("/h", "web\r\nX-Evil: 1") == (
        b"GET /h HTTP/1.1\r\nHost: webX-Evil: 1\r\nUser-Agent: sdproxy-health\r\n"
        b"Accept: */*\r\nConnection: close\r\n\r\n")


# -- the checker --------------------------------------------------------------------------

class FakeProber:
    """Answers probes from a table and records when each instance was probed."""

    def __init__(self) -> None:
        self.results: dict[str, ProbeResult] = {}
        self.calls: list[tuple[str, float]] = []

    async def __call__(self, host: Host, cfg: HealthConfig, upstream: str,
                       expectation: StatusExpectation, tcp: bool,
                       tls: UpstreamTlsConfig | None) -> ProbeResult:
        self.calls.append((host.id, asyncio.get_running_loop().time()))
        return self.results.get(host.id, ProbeResult(PASS, "200 on /health"))

    def count(self, hid: str) -> int:
        return sum(1 for h, _ in self.calls if h == hid)


def make_runtime(health: HealthConfig | None, *ids: str) -> UpstreamRuntime:
    rt = UpstreamRuntime(UpstreamConfig(name="web", listen=Address("127.0.0.1", 1),
                                        health=health))
    rt.on_catalog_answer(CatalogAnswer(tuple(Endpoint(i, "127.0.0.1", n + 1)
                                             for n, i in enumerate(ids)), 1))
    return rt


async def until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.005)


async def test_the_checker_ejects_and_restores_by_probing() -> None:
    rt = make_runtime(HealthConfig(interval=0.05, fall=2, rise=2), "a", "b")
    prober = FakeProber()
    prober.results["a"] = ProbeResult(FAIL, "500 on /health")
    checker = HealthChecker(rt, rng=random.Random(1), probe=prober)
    checker.start()
    try:
        await until(lambda: rt.hosts["a"].state == "ejected")
        assert rt.hosts["b"].state == "healthy"
        assert [h.id for h in rt.available] == ["b"]
        del prober.results["a"]
        await until(lambda: rt.hosts["a"].state == "healthy")
    finally:
        checker.stop()


async def test_the_checker_follows_the_pool() -> None:
    rt = make_runtime(HealthConfig(interval=0.05), "a")
    prober = FakeProber()
    checker = HealthChecker(rt, rng=random.Random(2), probe=prober)
    checker.start()
    try:
        await until(lambda: prober.count("a") >= 1)
        rt.on_catalog_answer(CatalogAnswer((Endpoint("b", "127.0.0.1", 2),), 2))
        await until(lambda: prober.count("b") >= 2)  # the newcomer: within RECHECK
        before = prober.count("a")
        await asyncio.sleep(0.2)
        assert prober.count("a") <= before + 1  # a left: at most the probe in flight
    finally:
        checker.stop()


async def test_checks_turned_off_by_a_reload_lift_ejections_and_stop_probing() -> None:
    rt = make_runtime(HealthConfig(interval=0.05, fall=1), "a")
    prober = FakeProber()
    prober.results["a"] = ProbeResult(FAIL, "500 on /health")
    checker = HealthChecker(rt, rng=random.Random(3), probe=prober)
    checker.start()
    try:
        await until(lambda: rt.hosts["a"].state == "ejected")
        rt.config = UpstreamConfig(name="web", listen=Address("127.0.0.1", 1))  # as reload
        await until(lambda: rt.hosts["a"].state == "healthy", timeout=3.0)
        calls = len(prober.calls)
        await asyncio.sleep(0.2)
        assert len(prober.calls) == calls
        rt.config = UpstreamConfig(name="web", listen=Address("127.0.0.1", 1),
                                   health=HealthConfig(interval=0.05, fall=1))
        # Off, the checker sleeps (no wake-up a second per upstream) until the reload
        # that changed the section tells it.
        await asyncio.sleep(0.2)
        assert len(prober.calls) == calls
        checker.wake()  # as the app's reload does
        await until(lambda: rt.hosts["a"].state == "ejected", timeout=3.0)  # on again
    finally:
        checker.stop()


async def test_stop_ends_every_probe() -> None:
    rt = make_runtime(HealthConfig(interval=0.01), "a")
    started = asyncio.Event()

    async def slow(host: Host, *args: object) -> ProbeResult:
        started.set()
        await asyncio.sleep(30)
        return ProbeResult(PASS, "200 on /health")

    checker = HealthChecker(rt, probe=slow)
    checker.start()
    await asyncio.wait_for(started.wait(), 3.0)
    probes = list(checker._probes)
    checker.stop()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert probes and all(t.cancelled() or t.done() for t in probes)


async def test_a_bug_in_a_probe_costs_that_probe_only() -> None:
    rt = make_runtime(HealthConfig(interval=0.02), "a")
    calls = 0

    async def broken(host: Host, *args: object) -> ProbeResult:
        nonlocal calls
        calls += 1
        raise RuntimeError("bug")

    checker = HealthChecker(rt, probe=broken)
    checker.start()
    try:
        await until(lambda: calls >= 3)  # still scheduled after each failure
    finally:
        checker.stop()
