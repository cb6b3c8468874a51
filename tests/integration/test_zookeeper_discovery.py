"""ZooKeeper discovery against a real ZooKeeper server (`proxy.devzk`, Debian's 3.8 jar).

Instances are Curator-style ephemeral znodes `/services/<service>/<id>` made by the
test's own kazoo sessions, or by a registrant process (`python -m proxy.devzk register`)
holding a session of its own. First the watcher as a task with a recording sink (every
wait is for its report, bounded); then the whole proxy with real backends while the
ZooKeeper server is SIGKILLed and started again on the same port and data.

What must hold (issue 13 item 1): a registration reaches the pool; a znode that goes (its
session closed, or its process killed and the session expired) leaves it; with the server
killed the last pool keeps serving and `stale_seconds` grows; with the server back the
watches resume without restarting sdproxy. Delays are printed (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from kazoo.client import KazooClient
from kazoo.retry import KazooRetry
from support.consul import unique_service
from support.http import all_ok, seconds_until
from support.procs import Backend, ProxyProcess, launch_proxy
from support.tomlconf import toml_table
from support.watch import AliveSink, ids, running

from proxy.config import UpstreamConfig, ZooKeeperConfig
from proxy.devconsul import free_port
from proxy.devzk import ZooKeeperServer, curator_instance, instance_path
from proxy.discovery.zookeeper import ZooKeeperWatcher
from proxy.model import Address, CatalogAnswer

pytestmark = pytest.mark.timeout(120)

BASE = "/services"
STEP = 5.0  # bound for one expected report (a failure bound, not a measurement)
REGISTRANT_SESSION = 1.0  # seconds: how long ZooKeeper keeps a killed registrant's znode

StartBackends = Callable[..., list[Backend]]


@pytest.fixture(scope="module")
def zookeeper() -> Iterator[ZooKeeperServer]:
    """One server for the tests that do not kill it."""
    with ZooKeeperServer() as server:
        yield server


@contextlib.contextmanager
def zk_session(hosts: str) -> Iterator[Any]:
    """A test-side kazoo session (it owns the ephemeral znodes it creates); closed at exit,
    which deletes them. Its timeout is the server's longest (60 ticks), so that a server
    slow to restart on a busy machine does not expire it and take the znodes along."""
    client = KazooClient(hosts=hosts, timeout=30.0,
                         connection_retry=KazooRetry(max_tries=-1, max_delay=0.5))
    client.start(timeout=15)
    try:
        yield client
    finally:
        client.stop()
        client.close()


def register(client: Any, service: str, instance_id: str, port: int, **kw: Any) -> str:
    """Create one ephemeral Curator instance znode; its path."""
    path = instance_path(BASE, service, instance_id)
    client.create(path, curator_instance(service, instance_id, "127.0.0.1", port, **kw),
                  ephemeral=True, makepath=True)
    return path


class Registrant:
    """`python -m proxy.devzk register`: one instance in a session of its own process."""

    def __init__(self, hosts: str, service: str, instance_id: str, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.devzk", "register", "--hosts", hosts, "--base", BASE,
             "--service", service, "--id", instance_id, "--port", str(port),
             "--session-timeout", str(REGISTRANT_SESSION)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            text=True, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # bounded by the module's timeout
        assert line.startswith("event=zk_registered"), line

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill9()


@contextlib.asynccontextmanager
async def watching(hosts: str, service: str) -> AsyncIterator[tuple[ZooKeeperWatcher,
                                                                     AliveSink]]:
    sink = AliveSink(STEP)
    port = int(hosts.rpartition(":")[2])
    upstream = UpstreamConfig(name=service, listen=Address("127.0.0.1", 0),
                              discovery="zookeeper")
    watcher = ZooKeeperWatcher(ZooKeeperConfig(hosts=(Address("127.0.0.1", port),), base=BASE),
                               upstream, sink)
    async with running(watcher):
        yield watcher, sink


def ports(answer: CatalogAnswer) -> dict[str, int]:
    return {e.id: e.port for e in answer.endpoints}


async def timed(sink: AliveSink, pred: Callable[[CatalogAnswer], bool], started: float,
                timeout: float = STEP) -> tuple[CatalogAnswer, float]:
    answer = await sink.answer_where(pred, timeout)
    return answer, time.monotonic() - started


# -- the watcher and a real server ---------------------------------------------------------
async def test_ephemeral_znodes_join_and_leave_the_pool(zookeeper: ZooKeeperServer) -> None:
    service = unique_service("zk")
    delays: dict[str, float] = {}
    with zk_session(zookeeper.hosts) as first, zk_session(zookeeper.hosts) as second:
        async with watching(zookeeper.hosts, service) as (watcher, sink):
            # No service znode yet: an answer with no instances (and /ready can say so).
            empty = await sink.answer_where(lambda a: True)
            assert empty.endpoints == ()

            started = time.monotonic()
            await asyncio.to_thread(register, first, service, "a", 1001)
            answer, delays["register (service znode created)"] = await timed(
                sink, lambda a: ids(a) == {"a"}, started)
            assert ports(answer) == {"a": 1001}
            assert answer.index is not None and answer.index > 0

            started = time.monotonic()
            await asyncio.to_thread(register, second, service, "b", 1002)
            _, delays["register"] = await timed(sink, lambda a: ids(a) == {"a", "b"}, started)

            started = time.monotonic()
            await asyncio.to_thread(
                first.set, instance_path(BASE, service, "a"),
                curator_instance(service, "a", "127.0.0.1", 2001, ssl_port=2443))
            answer, delays["data change"] = await timed(
                sink, lambda a: ports(a).get("a") == 2001, started)
            a = next(e for e in answer.endpoints if e.id == "a")
            assert dict(a.meta) == {"ssl_port": "2443"}

            # A session closed cleanly: ZooKeeper deletes its ephemeral znodes at once.
            started = time.monotonic()
            await asyncio.to_thread(second.stop)
            _, delays["session closed"] = await timed(sink, lambda a: ids(a) == {"a"},
                                                      started)

            # A registrant process killed: its znode goes when its session expires.
            registrant = await asyncio.to_thread(Registrant, zookeeper.hosts, service, "r",
                                                 1003)
            try:
                await sink.answer_where(lambda a: ids(a) == {"a", "r"})
                started = time.monotonic()
                registrant.kill9()
                _, delays["process killed (session expiry)"] = await timed(
                    sink, lambda a: ids(a) == {"a"}, started, timeout=STEP + 10)
            finally:
                registrant.stop()
            assert delays["process killed (session expiry)"] >= REGISTRANT_SESSION * 0.5

            # A znode that is no Curator instance is left out; the others keep routing.
            started = time.monotonic()
            await asyncio.to_thread(first.create, instance_path(BASE, service, "junk"),
                                    b"not json", ephemeral=True)
            await asyncio.to_thread(register, first, service, "c", 1004)
            answer, _ = await timed(sink, lambda a: "c" in ids(a), started)
            assert ids(answer) == {"a", "c"}

            assert sink.errors.empty(), sink.errors.get_nowait()
            assert watcher.errors == 0
    print("\nZooKeeper change -> watcher answer: " + ", ".join(
        f"{what} {delay * 1000:.0f} ms" for what, delay in delays.items()))


async def test_server_down_at_start_is_reported_then_answered() -> None:
    """A ZooKeeper not up yet: an error (retrying), no answer; once it serves, the answer."""
    server = ZooKeeperServer()
    service = unique_service("zk-late")
    try:
        async with watching(server.hosts, service) as (_, sink):
            error = await sink.error()
            assert error.startswith(f"zookeeper {server.hosts}: cannot connect"), error
            assert "Connection refused" in error, error
            assert sink.answers.empty()
            await asyncio.to_thread(server.start)
            started = time.monotonic()
            answer, delay = await timed(sink, lambda a: True, started, timeout=STEP + 5)
            assert answer.endpoints == ()
            print(f"\nserver up -> first answer {delay:.2f}s")
    finally:
        server.cleanup()


# -- the whole proxy while ZooKeeper is killed and comes back ---------------------------------
def proxy_config(hosts: str, service: str) -> str:
    return "\n".join([
        toml_table("[admin]", {"listen": f"127.0.0.1:{free_port()}"}),
        toml_table("[zookeeper]", {"hosts": [hosts], "base": BASE}),
        toml_table("[[upstreams]]", {"name": service, "listen": f"127.0.0.1:{free_port()}",
                                     "discovery": "zookeeper", "drain_timeout": "1s"}),
    ])


async def test_server_killed_last_pool_serves_then_watches_resume(
        start_backends: StartBackends) -> None:
    service = unique_service("zk-killed")
    b1, b2 = start_backends("zk-a", "zk-b")
    with ZooKeeperServer() as server, zk_session(server.hosts) as session:
        register(session, service, "zk-a", b1.port)
        register(session, service, "zk-b", b2.port)
        proxy: ProxyProcess = await asyncio.to_thread(
            launch_proxy, proxy_config(server.hosts, service))
        try:
            addr = proxy.listen(service)
            assert await all_ok(addr, 10) == {b1.name, b2.name}
            up = await asyncio.to_thread(proxy.upstream, service)
            assert (up["discovery"], up["stale_seconds"]) == ("zookeeper", 0)
            assert {ep["id"] for ep in up["endpoints"]} == {"zk-a", "zk-b"}

            server.kill()  # SIGKILL: the session's connection is cut, then refused
            killed = time.monotonic()
            seen: list[tuple[float, float]] = []  # (since kill, stale_seconds)
            for _ in range(5):
                await asyncio.sleep(0.4)
                assert await all_ok(addr, 5) == {b1.name, b2.name}  # the last pool serves
                up = await asyncio.to_thread(proxy.upstream, service)
                seen.append((time.monotonic() - killed, up["stale_seconds"]))
                assert {ep["id"] for ep in up["endpoints"]} == {"zk-a", "zk-b"}
            print("\nafter SIGKILL of ZooKeeper (s since kill, stale_seconds): "
                  + ", ".join(f"{t:.1f}s {s:.2f}" for t, s in seen))
            stales = [s for _, s in seen]
            assert all(s > 0 for s in stales)
            assert all(a < b for a, b in itertools.pairwise(stales))  # growing
            assert stales[-1] <= seen[-1][0] + 0.5  # counted from the kill, not from start
            assert up["last_error"].startswith(f"zookeeper {server.hosts}: connection lost")
            assert up["catalog_errors"] >= 1

            # Back on the same port with the same data: sessions and znodes survive.
            await asyncio.to_thread(server.start)
            resumed = await seconds_until(
                "stale_seconds back to 0",
                lambda: proxy.upstream(service)["stale_seconds"] == 0, timeout=15.0)
            # The watches are armed again: a change reaches the pool, no restart. (kazoo's
            # retry: our own session may still be reconnecting to the restarted server.)
            await asyncio.to_thread(session.retry, session.delete,
                                    instance_path(BASE, service, "zk-b"))
            changed = time.monotonic()
            await asyncio.to_thread(proxy.wait_routable, service, ["zk-a"], 5.0)
            print(f"server back -> fresh in {resumed:.2f}s; then a deletion reached the pool "
                  f"in {time.monotonic() - changed:.2f}s")
            assert await all_ok(addr, 5) == {b1.name}
            # The same process reconnected (at least once: a slow restart may cost two).
            events = [e.get("event") for e in await asyncio.to_thread(proxy.events)]
            assert events.count("zookeeper_connected") >= 2
            assert proxy.proc.poll() is None
        except Exception as e:
            # What both sides logged, for a failure seen only on a busy machine.
            raise AssertionError(f"{e}\n--- sdproxy:\n{proxy.stderr_tail()}\n--- "
                                 f"zookeeper:\n{server.log_tail(3000)}") from e
        finally:
            await asyncio.to_thread(proxy.cleanup)

