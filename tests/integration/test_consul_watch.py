"""ConsulWatcher against a real `consul agent -dev` (proxy.devconsul), no mocks.

Every test watches its own service name on one module-wide agent, so tests do not see
each other's instances; the test that stops Consul starts an agent of its own. Waiting is
always for an event (`asyncio.timeout` around a queue), never sleep-and-check.

The last section drives the watcher's error and pacing paths through a scripted HTTP
server on loopback, because a real Consul cannot be made to send bad JSON or answer a
blocking query at once forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support.consul import ttl_instance
from support.fakes import FakeClock
from support.watch import AliveSink, FailingOnceSink, QueueSink, ids, running

from proxy.config import ConsulConfig, UpstreamConfig
from proxy.devconsul import ConsulAgent
from proxy.discovery.consul import PACE_BURST, PACE_INTERVAL, ConsulWatcher
from proxy.model import Address

WAIT = 5.0  # small blocking wait: a test never needs a full 55 s query to end
STEP = 2.0  # generous bound for one catalog change to reach the sink
LISTEN = Address("127.0.0.1", 0)


@pytest.fixture(scope="module")
def agent() -> Iterator[ConsulAgent]:
    with ConsulAgent() as a:
        yield a


@contextlib.asynccontextmanager
async def watching(address: str, name: str, *, consul: ConsulConfig | None = None,
                   **upstream: Any) -> AsyncIterator[tuple[ConsulWatcher, QueueSink]]:
    sink = QueueSink(STEP)
    watcher = ConsulWatcher(consul or ConsulConfig(address=address, wait=WAIT),
                            UpstreamConfig(name=name, listen=LISTEN, **upstream), sink,
                            rng=random.Random(7))
    async with running(watcher):
        yield watcher, sink


# -- against a real Consul --------------------------------------------------------------
async def test_first_answer_holds_only_passing_instances(agent: ConsulAgent) -> None:
    for sid, port, status in [("first-ok", 9001, "passing"), ("first-crit", 9002, "critical"),
                              ("first-warn", 9003, "warning")]:
        agent.register(ttl_instance("first", sid, port, status))
    async with watching(agent.http_addr, "first") as (watcher, sink):
        answer = await sink.answer_where(lambda a: True)
        assert ids(answer) == {"first-ok"}
        (e,) = answer.endpoints
        assert (e.address, e.port, e.status, e.weight) == ("127.0.0.2", 9001, "passing", 1)
        assert (e.node, e.datacenter) == (agent.node, agent.datacenter)
        assert answer.index is not None and answer.index > 0
        assert watcher.last_index == answer.index


async def test_register_reaches_the_sink_at_once(agent: ConsulAgent) -> None:
    agent.register(ttl_instance("reg", "reg-1", 9001))
    async with watching(agent.http_addr, "reg") as (_, sink):
        await sink.answer_where(lambda a: ids(a) == {"reg-1"})
        started = time.perf_counter()
        await asyncio.to_thread(agent.register, ttl_instance("reg", "reg-2", 9002))
        await sink.answer_where(lambda a: ids(a) == {"reg-1", "reg-2"})
        delay = time.perf_counter() - started
        print(f"\nregister -> answer: {delay * 1000:.1f} ms")
        assert delay < 1.0
        await asyncio.to_thread(agent.deregister, "reg-2")
        await sink.answer_where(lambda a: ids(a) == {"reg-1"})


async def test_failing_check_removes_and_passing_restores(agent: ConsulAgent) -> None:
    agent.register(ttl_instance("flap", "flap-1", 9001))
    agent.register(ttl_instance("flap", "flap-2", 9002))
    async with watching(agent.http_addr, "flap") as (_, sink):
        await sink.answer_where(lambda a: ids(a) == {"flap-1", "flap-2"})
        started = time.perf_counter()
        await asyncio.to_thread(agent.check_fail, "flap-2-ttl")
        await sink.answer_where(lambda a: ids(a) == {"flap-1"})
        print(f"\ncheck_fail -> answer: {(time.perf_counter() - started) * 1000:.1f} ms")
        await asyncio.to_thread(agent.check_pass, "flap-2-ttl")
        await sink.answer_where(lambda a: ids(a) == {"flap-1", "flap-2"})
        # warning is not passing unless the upstream says include_warning
        await asyncio.to_thread(agent.check_warn, "flap-2-ttl")
        await sink.answer_where(lambda a: ids(a) == {"flap-1"})


async def test_include_warning(agent: ConsulAgent) -> None:
    agent.register(ttl_instance("warn", "warn-ok", 9001))
    agent.register(ttl_instance("warn", "warn-w", 9002, "warning",
                            Weights={"Passing": 5, "Warning": 1}))
    agent.register(ttl_instance("warn", "warn-crit", 9003, "critical"))
    async with watching(agent.http_addr, "warn", include_warning=True) as (_, sink):
        answer = await sink.answer_where(lambda a: True)
        by_id = {e.id: e for e in answer.endpoints}
        assert set(by_id) == {"warn-ok", "warn-w"}
        assert (by_id["warn-w"].status, by_id["warn-w"].weight) == ("warning", 1)
        await asyncio.to_thread(agent.check_pass, "warn-w-ttl")
        answer = await sink.answer_where(lambda a: a.endpoints != answer.endpoints)
        by_id = {e.id: e for e in answer.endpoints}
        assert (by_id["warn-w"].status, by_id["warn-w"].weight) == ("passing", 5)


async def test_tag_filter(agent: ConsulAgent) -> None:
    agent.register(ttl_instance("tags", "tags-blue", 9001, Tags=["blue", "v2"]))
    agent.register(ttl_instance("tags", "tags-green", 9002, Tags=["green", "v2"]))
    async with watching(agent.http_addr, "tags", tags=("blue", "v2")) as (_, sink):
        answer = await sink.answer_where(lambda a: True)
        assert ids(answer) == {"tags-blue"}
        assert answer.endpoints[0].tags == ("blue", "v2")
        await asyncio.to_thread(agent.register,
                                ttl_instance("tags", "tags-blue2", 9003, Tags=["v2", "blue"]))
        await sink.answer_where(lambda a: ids(a) == {"tags-blue", "tags-blue2"})


async def test_node_address_fallback(agent: ConsulAgent) -> None:
    agent.register(ttl_instance("naddr", "naddr-svc", 9001, address="127.0.0.2"))
    agent.register(ttl_instance("naddr", "naddr-node", 9002, address=""))
    async with watching(agent.http_addr, "naddr") as (_, sink):
        answer = await sink.answer_where(lambda a: True)
        assert {e.id: e.address for e in answer.endpoints} == {
            "naddr-svc": "127.0.0.2", "naddr-node": "127.0.0.1"}  # the dev agent's bind


async def test_unknown_datacenter_is_an_error_not_an_answer(agent: ConsulAgent) -> None:
    agent.register(ttl_instance("nodc", "nodc-1", 9001))
    async with watching(agent.http_addr, "nodc", datacenters=("dc-nowhere",)) as (_, sink):
        async with asyncio.timeout(STEP):
            error = await sink.errors.get()
        assert error.startswith(f"consul {agent.http_addr}: HTTP 500")
        assert "datacenter" in error.lower()
        assert sink.answers.empty()


async def test_stopped_agent_reports_errors_and_keeps_the_last_answer(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sdproxy.discovery.consul")
    with ConsulAgent() as own:
        own.register(ttl_instance("gone", "gone-1", 9001))
        async with watching(own.http_addr, "gone") as (watcher, sink):
            await sink.answer_where(lambda a: ids(a) == {"gone-1"})
            index = watcher.last_index
            await asyncio.to_thread(own.stop)
            errors: list[str] = []
            async with asyncio.timeout(5.0):
                while len(errors) < 3:  # the cut query, then retries refused
                    errors.append(await sink.errors.get())
            assert all(e.startswith(f"consul {own.http_addr}: ") for e in errors)
            assert any(e.endswith("connection refused") for e in errors)
            assert sink.answers.empty()  # the last answer stays in force
            assert watcher.last_index == index
    lines = [r.getMessage() for r in caplog.records if "event=catalog_error" in r.getMessage()]
    assert len(lines) >= 3
    assert lines[-1].startswith('event=catalog_error upstream=gone error="consul ')


# -- a scripted server stands in where a real Consul cannot misbehave on demand -----------
Reply = tuple[int, str, str | None]  # status, body, X-Consul-Index


class Script:
    """Answers each request with the next (status, body, index); records the requests."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = replies
        self.requests: list[tuple[dict[str, str], dict[str, str]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.query), dict(request.headers)))
        status, body, index = self.replies[min(len(self.requests), len(self.replies)) - 1]
        headers = {"X-Consul-Index": index} if index is not None else {}
        return web.Response(status=status, text=body, headers=headers,
                            content_type="application/json")


@contextlib.asynccontextmanager
async def serving(handle: Callable[[web.Request], Awaitable[web.Response]]
                  ) -> AsyncIterator[str]:
    """A loopback HTTP server answering the health endpoint with `handle`; its address."""
    app = web.Application()
    app.router.add_get("/v1/health/service/{name}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def scripted(replies: list[Reply]) -> AsyncIterator[tuple[Script, str]]:
    script = Script(replies)
    async with serving(script.handle) as address:
        yield script, address


def one_instance(sid: str = "s-1") -> str:
    return json.dumps([{"Node": {"Node": "n1", "Address": "127.0.0.1", "Datacenter": "dc1"},
                        "Service": {"ID": sid, "Port": 9001, "Address": ""},
                        "Checks": [{"Status": "passing"}]}])


def make(address: str, sink: Any, clock: FakeClock | None = None, **consul: Any) -> ConsulWatcher:
    return ConsulWatcher(ConsulConfig(address=address, wait=WAIT, **consul),
                         UpstreamConfig(name="svc", listen=LISTEN), sink,
                         rng=random.Random(3), clock=clock or FakeClock())


async def test_request_shape_and_index_reset_after_error() -> None:
    replies: list[Reply] = [(200, one_instance(), "10"), (200, "{not json", "11"),
                           (200, one_instance(), "12")]
    async with scripted(replies) as (script, address), aiohttp.ClientSession() as session:
        sink = QueueSink()
        watcher = make(address, sink, token="s3cret", datacenter="dc2")
        assert await watcher.poll_once(session) == 0.0  # changed: no delay
        assert 0.0 <= await watcher.poll_once(session) <= 0.1  # bad JSON: first backoff
        assert await watcher.poll_once(session) == 0.0
        first, after_good, after_error = (q for q, _ in script.requests)
        assert first == {"wait": "5s", "stale": "", "dc": "dc2"}  # no index, no passing
        assert after_good == {"wait": "5s", "stale": "", "dc": "dc2", "index": "10"}
        assert after_error == first  # the index is forgotten after an error
        assert all(h["X-Consul-Token"] == "s3cret" for _, h in script.requests)
        assert (await sink.errors.get()).startswith(f"consul {address}: bad answer: invalid")
        # Unchanged, but the first answer after an error is sent again: the sink learns
        # the catalog is back.
        assert [(await sink.answers.get()).index, (await sink.answers.get()).index] == [10, 12]
        assert watcher.last_index == 12


async def test_unchanged_answers_at_once_do_not_spin() -> None:
    async with scripted([(200, one_instance(), "5")]) as (_, address), \
            aiohttp.ClientSession() as session:
        sink = QueueSink()
        watcher = make(address, sink)  # the clock stands still: answers "come at once"
        delays = [await watcher.poll_once(session) for _ in range(PACE_BURST + 3)]
        assert delays[0] == 0.0  # the first answer is a change
        assert delays[1:PACE_BURST + 1] == [0.0] * PACE_BURST
        assert all(d >= PACE_INTERVAL for d in delays[PACE_BURST + 1:])
        assert sink.answers.qsize() == 1


async def test_errors_back_off_with_jitter_up_to_the_cap() -> None:
    async with scripted([(503, "No cluster leader", None)]) as (_, address), \
            aiohttp.ClientSession() as session:
        sink = QueueSink()
        watcher = make(address, sink)
        delays = [await watcher.poll_once(session) for _ in range(12)]
        assert all(0.0 <= d <= 5.0 for d in delays)
        assert max(delays[:2]) <= 0.2 and max(delays[6:]) > 0.4  # the ceiling grows
        assert (await sink.errors.get()) == f"consul {address}: HTTP 503: No cluster leader"


async def test_a_failing_sink_does_not_kill_the_loop() -> None:
    async with scripted([(200, one_instance(), "5")]) as (_, address):
        sink = FailingOnceSink()
        watcher = make(address, sink)
        async with running(watcher):  # run() owns its session
            async with asyncio.timeout(STEP):
                error = await sink.errors.get()
                answer = await sink.answers.get()  # sent again after the failure
            assert "internal error: RuntimeError: boom" in error
            assert ids(answer) == {"s-1"}


async def test_connection_refused_is_reported() -> None:
    from proxy.devconsul import free_port

    sink = QueueSink()
    watcher = make(f"127.0.0.1:{free_port()}", sink)  # no scheme, as $CONSUL_HTTP_ADDR often is
    async with aiohttp.ClientSession() as session:
        await watcher.poll_once(session)
    assert (await sink.errors.get()) == f"{'consul ' + watcher.address}: connection refused"


# -- datacenter failover, driven through a scripted server per `dc` -----------------------
class DcScript:
    """Answers each request with the current reply of the datacenter its `dc` names."""

    def __init__(self, replies: dict[str, Reply]) -> None:
        self.replies = replies
        self.requests: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(dict(request.query))
        status, body, index = self.replies[request.query.get("dc", "")]
        headers = {"X-Consul-Index": index} if index is not None else {}
        return web.Response(status=status, text=body, headers=headers,
                            content_type="application/json")


@contextlib.asynccontextmanager
async def scripted_dcs(replies: dict[str, Reply]) -> AsyncIterator[tuple[DcScript, str]]:
    script = DcScript(replies)
    async with serving(script.handle) as address:
        yield script, address


def dc_instances(dc: str, *sids: str) -> str:
    return json.dumps([{"Node": {"Node": f"n-{dc}", "Address": "127.0.0.1", "Datacenter": dc},
                        "Service": {"ID": sid, "Port": 9001 + i, "Address": ""},
                        "Checks": [{"Status": "passing"}]} for i, sid in enumerate(sids)])


def make_failover(address: str, sink: Any, *dcs: str) -> ConsulWatcher:
    return ConsulWatcher(ConsulConfig(address=address, wait=WAIT),
                         UpstreamConfig(name="svc", listen=LISTEN, datacenters=dcs), sink,
                         rng=random.Random(5), clock=FakeClock())


async def test_failover_to_the_next_datacenter_and_back() -> None:
    replies: dict[str, Reply] = {"dc1": (200, dc_instances("dc1", "a1", "a2"), "10"),
                                 "dc2": (200, dc_instances("dc2", "b1"), "20")}
    async with scripted_dcs(replies) as (script, address), aiohttp.ClientSession() as s:
        sink = QueueSink()
        watcher = make_failover(address, sink, "dc1", "dc2")
        await watcher.poll_once(s, "dc2")
        assert sink.drain() == []  # dc1 not heard from yet: no premature failover
        await watcher.poll_once(s, "dc1")
        (answer,) = sink.drain()
        assert ids(answer) == {"a1", "a2"} and answer.index == 10
        assert {e.datacenter for e in answer.endpoints} == {"dc1"}
        await watcher.poll_once(s, "dc2")
        assert sink.drain() == []  # dc2 unchanged and not selected
        replies["dc1"] = (200, "[]", "11")  # every dc1 instance gone
        await watcher.poll_once(s, "dc1")
        (answer,) = sink.drain()
        assert ids(answer) == {"b1"} and answer.index == 20 and watcher.selected == "dc2"
        replies["dc2"] = (200, dc_instances("dc2", "b1", "b2"), "21")  # dc2 changes: follow
        await watcher.poll_once(s, "dc2")
        assert [ids(a) for a in sink.drain()] == [{"b1", "b2"}]
        replies["dc1"] = (200, dc_instances("dc1", "a1"), "12")  # dc1 recovers: back
        await watcher.poll_once(s, "dc1")
        assert [ids(a) for a in sink.drain()] == [{"a1"}]
        assert watcher.selected == "dc1"
        replies["dc1"] = replies["dc2"] = (200, "[]", "30")
        await watcher.poll_once(s, "dc1")
        await watcher.poll_once(s, "dc2")
        assert [ids(a) for a in sink.drain()] == [{"b1", "b2"}, set()]  # none anywhere
        assert {q["dc"] for q in script.requests} == {"dc1", "dc2"}
        assert sink.errors.empty()


async def test_a_failing_datacenter_keeps_its_last_answer() -> None:
    replies: dict[str, Reply] = {"dc1": (200, dc_instances("dc1", "a1"), "10"),
                                 "dc2": (200, dc_instances("dc2", "b1"), "20")}
    async with scripted_dcs(replies) as (_, address), aiohttp.ClientSession() as s:
        sink = QueueSink()
        watcher = make_failover(address, sink, "dc1", "dc2")
        await watcher.poll_once(s, "dc1")
        await watcher.poll_once(s, "dc2")
        assert [ids(a) for a in sink.drain()] == [{"a1"}]
        replies["dc1"] = (500, "rpc error: No path to datacenter", None)
        assert await watcher.poll_once(s, "dc1") <= 0.1  # first backoff
        error = sink.errors.get_nowait()
        assert error == f"consul {address} dc=dc1: HTTP 500: rpc error: No path to datacenter"
        assert sink.drain() == []  # dc1's last answer (a1) stays in force: no failover
        replies["dc2"] = (200, dc_instances("dc2", "b1", "b2"), "21")
        await watcher.poll_once(s, "dc2")
        assert sink.drain() == []  # dc1 still wins with its last answer
        replies["dc1"] = (200, dc_instances("dc1", "a1"), "10")
        await watcher.poll_once(s, "dc1")
        # Unchanged, but the first answer once no datacenter fails: the sink learns the
        # catalog answers again.
        assert [ids(a) for a in sink.drain()] == [{"a1"}]


async def test_an_unreachable_first_datacenter_is_passed_over() -> None:
    replies: dict[str, Reply] = {"dc1": (500, "No path to datacenter", None),
                                 "dc2": (200, dc_instances("dc2", "b1"), "20")}
    async with scripted_dcs(replies) as (_, address), aiohttp.ClientSession() as s:
        sink = QueueSink()
        watcher = make_failover(address, sink, "dc1", "dc2")
        await watcher.poll_once(s, "dc2")
        assert sink.drain() == []  # dc1 not heard from yet
        await watcher.poll_once(s, "dc1")  # fails before ever answering: skip it
        assert [ids(a) for a in sink.drain()] == [{"b1"}]
        assert watcher.selected == "dc2"
        replies["dc1"] = (200, dc_instances("dc1", "a1"), "5")
        await watcher.poll_once(s, "dc1")
        assert [ids(a) for a in sink.drain()] == [{"a1"}]


async def test_nothing_is_emitted_while_every_datacenter_fails() -> None:
    replies: dict[str, Reply] = {"dc1": (500, "x", None), "dc2": (500, "y", None)}
    async with scripted_dcs(replies) as (_, address), aiohttp.ClientSession() as s:
        sink = QueueSink()
        watcher = make_failover(address, sink, "dc1", "dc2")
        await watcher.poll_once(s, "dc1")
        await watcher.poll_once(s, "dc2")
        assert sink.drain() == [] and sink.errors.qsize() == 2  # never seen: not ready


async def test_run_queries_every_datacenter_concurrently() -> None:
    replies: dict[str, Reply] = {"dc1": (200, "[]", "10"),
                                 "dc2": (200, dc_instances("dc2", "b1"), "20"),
                                 "dc3": (200, dc_instances("dc3", "c1"), "30")}
    async with scripted_dcs(replies) as (script, address):
        sink = QueueSink()
        watcher = ConsulWatcher(ConsulConfig(address=address, wait=WAIT),
                                UpstreamConfig(name="svc", listen=LISTEN,
                                               datacenters=("dc1", "dc2", "dc3")),
                                sink, rng=random.Random(5))
        async with running(watcher):  # run() owns its session
            answer = await sink.answer_where(lambda a: True)
            assert ids(answer) == {"b1"}
            replies["dc2"] = (200, "[]", "21")  # picked up by the paced re-query (~1 s)
            answer = await sink.answer_where(lambda a: ids(a) == {"c1"}, timeout=3.0)
        assert {q.get("dc") for q in script.requests} == {"dc1", "dc2", "dc3"}


async def test_unchanged_answers_tell_a_sink_the_catalog_is_alive() -> None:
    """A sink with `on_catalog_alive` hears of every unchanged answer while no datacenter
    fails, so its staleness counts from the last answer rather than the last change."""
    replies: dict[str, Reply] = {"dc1": (200, dc_instances("dc1", "a1"), "10"),
                                 "dc2": (200, dc_instances("dc2", "b1"), "20")}
    async with scripted_dcs(replies) as (_, address), aiohttp.ClientSession() as s:
        sink = AliveSink()
        watcher = make_failover(address, sink, "dc1", "dc2")
        await watcher.poll_once(s, "dc1")  # emitted: not "alive"
        await watcher.poll_once(s, "dc2")  # unchanged combined answer
        await watcher.poll_once(s, "dc1")
        assert (len(sink.drain()), sink.alive) == (1, 2)
        replies["dc2"] = (500, "down", None)
        await watcher.poll_once(s, "dc2")
        await watcher.poll_once(s, "dc1")  # dc2 fails: the sink must stay stale
        assert sink.alive == 2
