"""etcd discovery against a real etcd (SPEC "More registries": `discovery = "etcd"`).

Real processes on loopback, no mocks: a single-member etcd 3.4 (`proxy.devetcd`, Debian's
`etcd-server`, client and peer URLs on free 127.0.0.1 ports, data dir in a temp dir),
demo backends, sdproxy, and registrars that keep Registrator's keys
`<prefix>/<service>/<id>` = `ip:port` alive on leases. Situations:

- register -> in the pool; a key deleted, a lease that lapses (its registrar stopped
  refreshing), a registrar process `kill -9`ed (its lease lapses) -> out of the pool;
- etcd killed -> the last pool keeps serving, `stale_seconds` and the errors grow; etcd
  back at the same address -> the watch resumes without a restart of sdproxy;
- in-process watcher: etcd hung (SIGSTOP) -> the probe notices and the watcher reports
  errors until it answers again; a compacted start revision -> read again, no error;
  endpoints tried in order; a key that is not `ip:port` left out and logged once;
- a three-member cluster (`EtcdCluster`): the watched member killed -> the next endpoint
  takes over; quorum lost -> errors, the last pool stays; quorum back -> answers again.

Every wait is bounded; every process is ended and every data dir removed at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from support.http import fetch
from support.procs import Backend, ProxyProcess, launch_proxy
from support.tomlconf import build_config
from support.watch import AliveSink, ids, running

from proxy.config import EtcdConfig, UpstreamConfig
from proxy.devconsul import free_port
from proxy.devetcd import EtcdCluster, EtcdServer, Registration
from proxy.discovery.etcd import EtcdWatcher
from proxy.model import Address

pytestmark = pytest.mark.timeout(90)

PREFIX = "/services"
TTL = 1.0  # lease seconds: etcd's minimum with devetcd's election timing is 0.75 s
LAPSE_BOUND = 5.0  # a lapsed lease's key is gone and the pool changed within this
LISTEN = Address("127.0.0.1", 0)
StartBackends = Callable[..., list[Backend]]


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture
def proxies() -> Iterator[list[ProxyProcess]]:
    started: list[ProxyProcess] = []
    yield started
    for proxy in started:
        proxy.cleanup()


def start_proxy(proxies: list[ProxyProcess], etcd_url: str, service: str) -> ProxyProcess:
    fragment = (f'[etcd]\nendpoints = ["{etcd_url}"]\nprefix = "{PREFIX}"\n\n'
                f'[[upstreams]]\nname = "{service}"\nlisten = "127.0.0.1:{free_port()}"\n'
                f'discovery = "etcd"\ndrain_timeout = "2s"\n')
    text = build_config(fragment, admin_listen=f"127.0.0.1:{free_port()}", consul={})
    proxy = launch_proxy(text, timeout=15.0)
    proxies.append(proxy)
    return proxy


def key(service: str, iid: str) -> str:
    return f"{PREFIX}/{service}/{iid}"


@contextlib.contextmanager
def registrar_process(etcd: EtcdServer, k: str, value: str) -> Iterator[subprocess.Popen[str]]:
    """`python -m proxy.devetcd keep`: a registrar of its own, for a `kill -9`."""
    proc = subprocess.Popen([sys.executable, "-m", "proxy.devetcd", "keep", etcd.url, k, value,
                             str(TTL)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # bounded by the test's timeout
        assert line.startswith("event=etcd_registered"), line
        yield proc
    finally:
        proc.kill()
        proc.wait(5)


async def answered_by(addr: tuple[str, int], n: int) -> set[str]:
    """`n` GETs through the proxy, each must answer 200; the backends that answered."""
    names = set()
    for _ in range(n):
        resp = await fetch(addr, timeout=3.0)
        assert resp.status == 200, (resp.status, resp.text)
        names.add(resp.text)
    return names


async def routable_within(proxy: ProxyProcess, service: str, want: set[str],
                          timeout: float) -> float:
    started = time.monotonic()
    await asyncio.to_thread(proxy.wait_routable, service, want, timeout)
    return time.monotonic() - started


# -- through sdproxy --------------------------------------------------------------------------
async def test_keys_in_and_out_of_the_pool(etcd: EtcdServer, start_backends: StartBackends,
                                           proxies: list[ProxyProcess]) -> None:
    service = "web"
    plain, leased, crashing = start_backends("etcd-plain", "etcd-leased", "etcd-crashing")
    etcd.put(key(service, "plain"), f"127.0.0.1:{plain.port}")
    lease = Registration(etcd, key(service, "leased"), f"127.0.0.1:{leased.port}", TTL)
    try:
        with registrar_process(etcd, key(service, "crashing"),
                               f"127.0.0.1:{crashing.port}") as registrar:
            proxy = start_proxy(proxies, etcd.url, service)
            addr = proxy.listen(service)
            await routable_within(proxy, service, {"plain", "leased", "crashing"}, 5.0)
            assert await answered_by(addr, 12) == {plain.name, leased.name, crashing.name}
            eps = {ep["id"]: ep for ep in proxy.endpoints(service)}
            assert (eps["plain"]["address"], eps["plain"]["port"]) == ("127.0.0.1", plain.port)

            etcd.delete(key(service, "plain"))  # a clean deregistration
            deleted = await routable_within(proxy, service, {"leased", "crashing"}, 2.0)

            lease.stop_refreshing()  # the registrar stopped refreshing: TTL lapse
            lapsed = await routable_within(proxy, service, {"crashing"}, LAPSE_BOUND)
            assert await answered_by(addr, 5) == {crashing.name}

            registrar.kill()  # kill -9 of a registrar process: its lease lapses
            killed = await routable_within(proxy, service, set(), LAPSE_BOUND)
        assert etcd.range_prefix(f"{PREFIX}/{service}/") == {}
        print(f"\ndelete -> out of the pool {deleted * 1000:.0f} ms; lease of {TTL:g}s "
              f"not refreshed -> out {lapsed:.2f}s; registrar kill -9 -> out {killed:.2f}s")
        # Empty pool: the proxy answers 503 itself, naming the upstream.
        resp = await fetch(addr, timeout=3.0)
        assert resp.status == 503
    finally:
        lease.deregister()


async def test_etcd_killed_last_pool_serves_then_watch_resumes(
        etcd: EtcdServer, start_backends: StartBackends, proxies: list[ProxyProcess]) -> None:
    service = "api"
    b1, b2, b3 = start_backends("etcd-k1", "etcd-k2", "etcd-k3")
    for b in (b1, b2):
        etcd.put(key(service, b.name), f"127.0.0.1:{b.port}")
    proxy = start_proxy(proxies, etcd.url, service)
    addr = proxy.listen(service)
    await routable_within(proxy, service, {b1.name, b2.name}, 5.0)
    up = proxy.upstream(service)
    assert (up["stale_seconds"], up["catalog_errors"]) == (0, 0)

    etcd.kill()  # SIGKILL: the watch stream is cut, then connections are refused
    killed = time.monotonic()
    seen: list[tuple[float, float, int]] = []  # (since kill, stale_seconds, errors)
    for _ in range(5):
        await asyncio.sleep(0.4)
        assert await answered_by(addr, 6) == {b1.name, b2.name}  # the last pool serves
        up = await asyncio.to_thread(proxy.upstream, service)
        seen.append((time.monotonic() - killed, up["stale_seconds"], up["catalog_errors"]))
        assert {ep["id"] for ep in up["endpoints"]} == {b1.name, b2.name}
    print("\nafter SIGKILL of etcd (s since kill, stale_seconds, catalog errors):\n  "
          + "\n  ".join(f"{t:.1f}s stale={s:.2f} errors={e}" for t, s, e in seen))
    stales = [s for _, s, _ in seen]
    assert all(s > 0 for s in stales)
    assert all(a < b for a, b in itertools.pairwise(stales))  # growing
    assert seen[0][2] >= 1 and seen[-1][2] > seen[0][2]
    assert up["last_error"].startswith(f"etcd {etcd.url}: ")

    await asyncio.to_thread(etcd.start)  # the same member back: same ports, same data
    back = time.monotonic()
    while (await asyncio.to_thread(proxy.upstream, service))["stale_seconds"] != 0:
        assert time.monotonic() - back < 10.0, "stale_seconds not back to 0 within 10s"
        await asyncio.sleep(0.05)
    resumed = time.monotonic() - back
    # The watch is live again: a change reaches the pool.
    etcd.put(key(service, b3.name), f"127.0.0.1:{b3.port}")
    added = await routable_within(proxy, service, {b1.name, b2.name, b3.name}, 2.0)
    assert await answered_by(addr, 9) == {b1.name, b2.name, b3.name}
    print(f"etcd back -> stale_seconds 0 after {resumed:.2f}s; a new key -> in the pool "
          f"{added * 1000:.0f} ms")
    assert proxy.proc.poll() is None


# -- the watcher in-process -------------------------------------------------------------------
@contextlib.asynccontextmanager
async def watching(endpoints: list[str], service: str, *, watcher_class: Any = EtcdWatcher,
                   probe_interval: float = 5.0
                   ) -> AsyncIterator[tuple[EtcdWatcher, AliveSink]]:
    sink = AliveSink(step=5.0)
    watcher = watcher_class(EtcdConfig(endpoints=tuple(endpoints), prefix=PREFIX),
                            UpstreamConfig(name=service, listen=LISTEN, discovery="etcd"),
                            sink, rng=random.Random(3), probe_interval=probe_interval)
    async with running(watcher):
        yield watcher, sink


async def test_hung_etcd_is_noticed_by_the_probe(etcd: EtcdServer) -> None:
    etcd.put(key("hung", "a"), "127.0.0.1:9001")
    async with watching([etcd.url], "hung", probe_interval=0.5) as (watcher, sink):
        assert ids(await sink.answer_where(lambda a: True)) == {"a"}
        await asyncio.sleep(1.2)  # quiet: probes answer, each one a sign of life
        assert sink.alive >= 2 and watcher.errors == 0
        etcd.pause()  # SIGSTOP: sockets stay open, nothing answers
        try:
            paused = time.monotonic()
            error = await sink.error()
            noticed = time.monotonic() - paused
            assert "probe got no answer" in error, error
        finally:
            etcd.resume()
        answer = await sink.answer_where(lambda a: True)  # the first one after the errors
        assert ids(answer) == {"a"}
        print(f"\netcd SIGSTOPped -> error after {noticed:.2f}s: {error}")
        await asyncio.to_thread(etcd.put, key("hung", "b"), "127.0.0.1:9002")
        assert ids(await sink.answer_where(lambda a: True)) == {"a", "b"}


class CompactingWatcher(EtcdWatcher):
    """Between the range and the watch, once: two changes, then a compaction up to the
    last one. The watch's start revision (the first change) is then gone, as for a
    watcher that fell behind a compaction."""

    server: EtcdServer
    compacted_once = False

    async def _range(self, session: Any) -> None:
        await super()._range(session)
        if not self.compacted_once:
            self.compacted_once = True
            await asyncio.to_thread(self.server.put, key("compact", "b"), "127.0.0.1:9002")
            await asyncio.to_thread(self.server.put, key("compact", "c"), "127.0.0.1:9003")
            revision = await asyncio.to_thread(self.server.revision)
            await asyncio.to_thread(self.server.compact, revision)


async def test_a_compacted_start_revision_is_read_again(etcd: EtcdServer) -> None:
    etcd.put(key("compact", "a"), "127.0.0.1:9001")
    CompactingWatcher.server = etcd
    async with watching([etcd.url], "compact",
                        watcher_class=CompactingWatcher) as (watcher, sink):
        assert ids(await sink.answer_where(lambda a: True)) == {"a"}
        # The changes made between the range and the watch are not lost: the range again.
        assert ids(await sink.answer_where(lambda a: True)) == {"a", "b", "c"}
        assert (watcher.compactions, watcher.errors) == (1, 0)
        assert sink.errors.empty()


async def test_endpoints_are_tried_in_turn(etcd: EtcdServer) -> None:
    etcd.put(key("turn", "a"), "127.0.0.1:9001")
    nothing = f"http://127.0.0.1:{free_port()}"  # no server there: refused
    async with watching([nothing, etcd.url], "turn") as (watcher, sink):
        assert await sink.error() == f"etcd {nothing}: connection refused"
        assert ids(await sink.answer_where(lambda a: True)) == {"a"}
        assert watcher.endpoint == etcd.url


async def test_a_broken_key_is_left_out_and_logged_once(
        etcd: EtcdServer, caplog: pytest.LogCaptureFixture) -> None:
    etcd.put(key("broken", "a"), "127.0.0.1:9001")
    etcd.put(key("broken", "bad"), "not-an-address")
    caplog.set_level(logging.WARNING, logger="sdproxy.discovery.etcd")
    async with watching([etcd.url], "broken") as (_, sink):
        assert ids(await sink.answer_where(lambda a: True)) == {"a"}
        await asyncio.to_thread(etcd.put, key("broken", "b"), "127.0.0.1:9002")
        assert ids(await sink.answer_where(lambda a: True)) == {"a", "b"}
    ignored = [r.getMessage() for r in caplog.records if "event=etcd_key_ignored" in
               r.getMessage()]
    assert len(ignored) == 1, ignored
    assert '"/services/broken/bad"' in ignored[0] and "not ip:port" in ignored[0]


async def test_a_cluster_member_lost_then_quorum_lost_then_back() -> None:
    with EtcdCluster(3) as cluster:
        m0, m1, m2 = cluster.members
        m0.put(key("cluster", "a"), "127.0.0.1:9001")
        async with watching(cluster.urls, "cluster") as (watcher, sink):
            assert ids(await sink.answer_where(lambda a: True)) == {"a"}
            assert watcher.endpoint == m0.url

            m0.kill()  # the member we watch: the next one takes over, quorum stays
            assert (await sink.error()).startswith(f"etcd {m0.url}: ")
            assert ids(await sink.answer_where(lambda a: True)) == {"a"}  # recovered
            # on another member: the next in turn, or the one after it when the next was
            # slow to answer on a loaded machine
            assert watcher.endpoint in (m1.url, m2.url)
            await asyncio.to_thread(m2.put, key("cluster", "b"), "127.0.0.1:9002")
            assert ids(await sink.answer_where(lambda a: True)) == {"a", "b"}

            m1.kill()  # quorum lost: m2 alone has no leader
            lost = time.monotonic()
            errors = [await sink.error(timeout=15.0) for _ in range(3)]
            print(f"\nafter quorum loss ({time.monotonic() - lost:.1f}s): "
                  + "; ".join(errors))
            assert any("no leader" in e or "timed out" in e or "refused" in e for e in errors)
            assert sink.answers.empty()  # the last pool stays in force

            await asyncio.to_thread(m0.start)  # quorum back (m0, m2)
            back = time.monotonic()
            assert ids(await sink.answer_where(lambda a: True, timeout=20.0)) == {"a", "b"}
            print(f"quorum back -> answer after {time.monotonic() - back:.2f}s "
                  f"from {watcher.endpoint}")
