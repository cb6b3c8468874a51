"""An operator's drain under `--workers N`, without processes: two real UpstreamRuntime
objects stand for two workers sharing a real readings directory (proxy.admin.readings).
A drain through one worker's admin reaches the other's pool at its next reading, and the
admin's answer waits until every live worker shows it (proxy.admin.operator)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.fakes import T0, FakeClock, serve_admin

from proxy.admin import operator
from proxy.admin.merge import Reading
from proxy.admin.readings import DRAINS_FILE, ReadingFiles, read_all
from proxy.admin.views import process_reading
from proxy.config import UpstreamConfig
from proxy.model import Address, CatalogAnswer, Endpoint
from proxy.upstream.manager import UpstreamRuntime

ENDPOINTS = (Endpoint("a", "10.0.0.1", 1), Endpoint("b", "10.0.0.2", 2))


@dataclass
class WorkerState:
    upstreams: dict[str, UpstreamRuntime]
    workers: ReadingFiles
    listeners: dict[str, Any] = field(default_factory=dict)
    started_at: float = T0

    def publish(self) -> None:
        self.workers.publish(process_reading(self))


def worker(tmp_path: Path, number: int) -> WorkerState:
    rt = UpstreamRuntime(UpstreamConfig(name="web", listen=Address("127.0.0.1", 18080)),
                         clock=FakeClock(T0))
    rt.on_catalog_answer(CatalogAnswer(ENDPOINTS, index=1))
    return WorkerState({"web": rt}, ReadingFiles(tmp_path, number, pid=100 + number))


def routable(state: WorkerState) -> set[str]:
    return {h.id for h in state.upstreams["web"].available}


async def publishing(state: WorkerState, every: float = 0.05) -> None:
    """What a worker does between admin requests: take a reading now and then."""
    while True:
        state.publish()
        await asyncio.sleep(every)


# -- the shared record -----------------------------------------------------------------------

def test_drains_are_recorded_for_every_worker(tmp_path: Path) -> None:
    w0, w1 = ReadingFiles(tmp_path, 0, pid=1), ReadingFiles(tmp_path, 1, pid=2)
    assert w1.operator_drains() == {}
    w0.set_operator_drain("web", "a", True)
    w1.set_operator_drain("web", "b", True)  # both count: read-modify-write under a lock
    w1.set_operator_drain("api", "x/1", True)
    assert w0.operator_drains() == {"web": {"a", "b"}, "api": {"x/1"}}
    w0.set_operator_drain("web", "a", False)
    w0.set_operator_drain("api", "x/1", False)
    assert w1.operator_drains() == {"web": {"b"}}
    assert json.loads((tmp_path / DRAINS_FILE).read_text()) == {"web": ["b"]}
    assert [r.worker for r in read_all(tmp_path)] == []  # not taken for a reading


def test_a_reading_takes_up_the_siblings_drains(tmp_path: Path) -> None:
    w0, w1 = worker(tmp_path, 0), worker(tmp_path, 1)
    w0.workers.set_operator_drain("web", "a", True)
    assert routable(w1) == {"a", "b"}
    w1.publish()
    assert routable(w1) == {"b"}
    assert w1.upstreams["web"].hosts["a"].reason == "operator"
    w0.workers.set_operator_drain("web", "a", False)
    w1.publish()
    assert routable(w1) == {"a", "b"}


def test_a_drain_of_an_id_a_worker_has_not_seen_yet_waits_for_it(tmp_path: Path) -> None:
    w0, w1 = worker(tmp_path, 0), worker(tmp_path, 1)
    w0.workers.set_operator_drain("web", "c", True)
    w1.publish()
    w1.upstreams["web"].on_catalog_answer(
        CatalogAnswer((*ENDPOINTS, Endpoint("c", "10.0.0.3", 3)), index=2))
    assert routable(w1) == {"a", "b"}


@pytest.mark.parametrize(("drained", "rows", "shown"), [
    (True, [{"id": "a", "state": "draining", "reason": "operator"}], True),
    (True, [{"id": "a", "state": "healthy", "reason": ""}], False),
    (True, [{"id": "a", "state": "down", "reason": "critical"}], True),
    (True, [], True),  # the worker does not list it: it keeps the drain for later
    (False, [{"id": "a", "state": "draining", "reason": "operator"}], False),
    (False, [{"id": "a", "state": "draining", "reason": "removed from the catalog"}], True),
    (False, [{"id": "a", "state": "healthy", "reason": ""}], True),
])
def test_what_shows_a_change(drained: bool, rows: list[dict[str, Any]], shown: bool) -> None:
    reading = Reading(0, 1, True, [{"name": "web", "endpoints": rows}])
    assert operator.shows(reading, "web", "a", drained) is shown


# -- through the admin API --------------------------------------------------------------------

async def test_the_answer_waits_until_every_worker_drains(tmp_path: Path) -> None:
    w0, w1 = worker(tmp_path, 0), worker(tmp_path, 1)
    w1.publish()
    sibling = asyncio.create_task(publishing(w1))
    try:
        async with serve_admin(w0) as (session, base):
            url = base + "/upstreams/web/endpoints/a"
            async with session.post(url + "/drain") as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.json()
            assert body["workers_pending"] == []
            assert routable(w0) == routable(w1) == {"b"}
            async with session.get(base + "/upstreams") as resp:
                [web] = await resp.json()
            [a] = [ep for ep in web["endpoints"] if ep["id"] == "a"]
            assert a["state"] == "draining"
            assert {w["reason"] for w in a["workers"].values()} == {"operator"}
            async with session.post(url + "/enable") as resp:
                assert (await resp.json())["workers_pending"] == []
            assert routable(w0) == routable(w1) == {"a", "b"}
    finally:
        sibling.cancel()


async def test_a_worker_that_does_not_answer_is_named(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    w0, w1 = worker(tmp_path, 0), worker(tmp_path, 1)
    w1.publish()  # then nothing more: a worker stuck in a long callback, say
    monkeypatch.setattr("proxy.admin.handlers.CONFIRM_TIMEOUT", 0.3)
    async with serve_admin(w0) as (session, base), session.post(
            base + "/upstreams/web/endpoints/a/drain") as resp:
        assert resp.status == 200
        assert (await resp.json())["workers_pending"] == [1]
    w1.publish()
    assert routable(w1) == {"b"}  # it takes the drain up at its next reading
