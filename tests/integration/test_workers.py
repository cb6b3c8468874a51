"""`--workers N` on real processes (SPEC "Workers", issue 11 item 4): a worker killed under
load is logged and restarted while the other keeps serving; five quick deaths make the
supervisor exit 1; SIGTERM exits 0; /metrics and /upstreams count every worker's work,
whichever worker answers, and keep a dead worker's counts.

Static discovery keeps these about the processes (the catalog side is tested elsewhere).
Worker pids come from the supervisor's `event=worker_started` lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from calendar import timegm
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from support.http import Sample, fetch, paced_requests
from support.procs import Backend, ProxyProcess

POLL = 0.02  # seconds between looks at a log or an admin endpoint


def static(*backends: Backend, **keys: Any) -> dict[str, Any]:
    return {"discovery": "static", "endpoints": [f"127.0.0.1:{b.port}" for b in backends],
            **keys}


def log_time(event: dict[str, str]) -> float:
    """Unix time of a log line (`ts=2026-01-02T03:04:05.678Z`)."""
    whole, _, millis = event["ts"].rstrip("Z").partition(".")
    return timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(millis) / 1000


async def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll `predicate` (run in a thread) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        found = await asyncio.to_thread(predicate)
        if found:
            return found
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        await asyncio.sleep(POLL)


def events_after(proxy: ProxyProcess, event: str, after: float,
                 **fields: str) -> list[dict[str, str]]:
    """Log lines `event=<event>` with `fields`, logged at or after unix time `after`
    (log times are cut to the millisecond)."""
    return [e for e in proxy.events(event)
            if log_time(e) >= after - 0.001 and all(e.get(k) == v for k, v in fields.items())]


def worker_pid(proxy: ProxyProcess, worker: int) -> int:
    """The pid of worker `worker`'s latest start."""
    started = [e for e in proxy.events("worker_started") if e["worker"] == str(worker)]
    return int(started[-1]["pid"])


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_exit(proxy: ProxyProcess, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (code := proxy.proc.poll()) is None:
        assert time.monotonic() < deadline, f"proxy still running after {timeout}s"
        time.sleep(POLL)
    return code


def scrape(proxy: ProxyProcess) -> dict[str, Any]:
    status, body = proxy.admin_get("/metrics")
    assert status == 200, body[:300]
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def total(families: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    """Sum of the samples named `sample` of `family` whose labels include `labels`."""
    if family not in families:
        return 0.0
    return sum(s.value for s in families[family].samples
               if s.name == sample and labels.items() <= s.labels.items())


async def test_a_worker_killed_under_load_is_logged_and_restarted_and_clients_keep_being_served(
        start_backend: Callable[..., Backend],
        start_proxy: Callable[..., ProxyProcess]) -> None:
    backend = start_backend("w")
    proxy = start_proxy({"web": static(backend)}, workers=2)
    await wait_for("both workers listening", lambda: len(proxy.events("listening")) >= 2)
    addr = proxy.listen("web")
    victim = worker_pid(proxy, 1)
    # Sample times are monotonic; the log's are wall-clock.
    wall_offset = time.time() - time.monotonic()

    load = asyncio.create_task(paced_requests(addr, rate=200, duration=3.0))
    await asyncio.sleep(1.0)  # a second of traffic through both workers first
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)

    exits = await wait_for("worker_exit logged",
                           lambda: events_after(proxy, "worker_exit", killed_at, worker="1"))
    assert exits[0]["signal"] == "SIGKILL" and exits[0]["pid"] == str(victim)
    noticed_at = log_time(exits[0])
    restarted = await wait_for(
        "worker 1 restarted and listening",
        lambda: events_after(proxy, "listening", noticed_at, worker="1", upstream="web"))
    restart_seconds = log_time(restarted[0]) - killed_at
    new_pid = worker_pid(proxy, 1)
    assert new_pid != victim and alive(new_pid)

    samples: list[Sample] = await load
    failed = [s for s in samples if not s.ok]
    # Only requests the killed worker held (in flight, or in its accept queue) may fail:
    # each started before the supervisor saw the death; every later one succeeds.
    late = [s for s in failed if s.start + wall_offset >= noticed_at + 0.001]
    assert late == [], [s.error for s in late]
    assert len(failed) <= 10, [s.error for s in failed]
    assert len(samples) >= 500 and sum(s.ok for s in samples) >= len(samples) - 10
    print(f"kill -9 of worker 1 under {len(samples) / 3:.0f} req/s: {len(failed)} of "
          f"{len(samples)} requests failed (all started before the death was noticed); "
          f"restart: kill -> new worker listening {restart_seconds * 1000:.0f} ms")

    # The restarted worker serves: kill the other one too, and everything still answers.
    os.kill(worker_pid(proxy, 0), signal.SIGKILL)
    await wait_for("worker 0 exit logged",
                   lambda: events_after(proxy, "worker_exit", noticed_at, worker="0"))
    answers = await asyncio.gather(*(fetch(addr) for _ in range(20)))
    assert all(r.status == 200 for r in answers)
    await wait_for("worker 0 restarted",
                   lambda: events_after(proxy, "listening", noticed_at, worker="0"))

    # A clean stop after restarts still exits 0 and leaves nothing behind.
    supervising = proxy.events("supervising")[0]
    workers = [worker_pid(proxy, 0), worker_pid(proxy, 1)]
    proxy.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(wait_exit, proxy, 10) == 0
    assert not any(alive(pid) for pid in workers)
    assert not Path(supervising["readings"]).exists()


async def test_five_quick_worker_deaths_make_the_supervisor_stop_the_rest_and_exit_1(
        start_backend: Callable[..., Backend],
        start_proxy: Callable[..., ProxyProcess]) -> None:
    backend = start_backend("w")
    proxy = start_proxy({"web": static(backend)}, workers=2)
    kills = 0
    while proxy.proc.poll() is None and kills < 5:  # the fifth death within 30 s ends it
        started = proxy.events("worker_started")
        # Kill the newest worker that is still running (restarts may be backing off).
        pid = next((int(e["pid"]) for e in reversed(started) if alive(int(e["pid"]))), None)
        if pid is None:
            await asyncio.sleep(POLL)
            continue
        os.kill(pid, signal.SIGKILL)
        kills += 1
        await wait_for(f"death {kills} noticed",
                       lambda n=kills: len(proxy.events("worker_exit")) >= n, timeout=5)
    assert await asyncio.to_thread(wait_exit, proxy, 10) == 1
    exits = proxy.events("worker_exit")
    assert len(exits) == 5 and all(e["signal"] == "SIGKILL" for e in exits)
    assert [e.get("restart") for e in exits] == [None] * 4 + ["no"]
    by_worker: dict[str, list[float]] = {}
    for e in exits[:4]:
        by_worker.setdefault(e["worker"], []).append(float(e["restart_in"].rstrip("s")))
    for delays in by_worker.values():  # a worker's first restart at once, then backing off
        assert delays[0] == 0.0 and delays == sorted(delays)
        assert all(d > 0 for d in delays[1:])
    failing = proxy.events("workers_failing")
    assert failing and failing[0]["exits"] == "5"
    assert not any(alive(int(e["pid"])) for e in proxy.events("worker_started"))


async def test_metrics_and_upstreams_count_every_workers_requests_whichever_answers(
        start_backend: Callable[..., Backend],
        start_proxy: Callable[..., ProxyProcess]) -> None:
    backend = start_backend("w")
    proxy = start_proxy({"web": static(backend)}, workers=2)
    await wait_for("both workers listening", lambda: len(proxy.events("listening")) >= 2)
    n = 40
    answers = await asyncio.gather(*(fetch(proxy.listen("web")) for _ in range(n)))
    assert all(r.status == 200 for r in answers)

    def counted(families: dict[str, Any]) -> float:
        return total(families, "sdproxy_requests", "sdproxy_requests_total", upstream="web",
                     code="200")

    # A sibling's numbers are up to a second old; then every scrape, whichever worker
    # answers it (the admin address is shared), counts all n.
    await wait_for("/metrics counts every request",
                   lambda: counted(scrape(proxy)) == n, timeout=5)
    for _ in range(6):
        families = await asyncio.to_thread(scrape, proxy)
        assert counted(families) == n
        assert total(families, "sdproxy_endpoint_requests",
                     "sdproxy_endpoint_requests_total", upstream="web") == n
        workers = {s.labels.get("worker") for s in families["sdproxy_connections"].samples}
        assert workers == {"0", "1"}  # gauges per worker
        rss = {s.labels.get("worker") for s in families["process_resident_memory_bytes"].samples}
        assert rss == {"0", "1"}
        info = families["sdproxy_build_info"].samples[0].labels
        assert {"version", "python", "parser"} <= info.keys()
        upstream = proxy.upstream("web")
        assert upstream["endpoints"][0]["requests"] == n
        assert {w: x["state"] for w, x in upstream["endpoints"][0]["workers"].items()} == {
            "0": "healthy", "1": "healthy"}

    # A killed worker's counts stay in the sums; its exit is counted.
    killed_at = time.time()
    os.kill(worker_pid(proxy, 1), signal.SIGKILL)
    await wait_for("worker 1 back", lambda: events_after(proxy, "listening", killed_at,
                                                         worker="1"))
    await wait_for("a worker exit counted", lambda: total(
        scrape(proxy), "sdproxy_worker_exits", "sdproxy_worker_exits_total", worker="1") == 1,
        timeout=5)
    for _ in range(4):
        assert counted(await asyncio.to_thread(scrape, proxy)) == n
    print(json.dumps(proxy.upstream("web")["endpoints"][0]))


async def test_sighup_reaches_every_worker_and_a_restarted_worker_starts_with_the_new_config(
        start_backend: Callable[..., Backend],
        start_proxy: Callable[..., ProxyProcess]) -> None:
    from proxy.devconsul import free_port

    backend = start_backend("w")
    proxy = start_proxy({"web": static(backend)}, workers=2)
    added = free_port()
    config = Path(proxy.config_path)
    config.write_text(config.read_text() + (
        f'\n[[upstreams]]\nname = "added"\nlisten = "127.0.0.1:{added}"\n'
        f'discovery = "static"\nendpoints = ["127.0.0.1:{backend.port}"]\n'))
    proxy.proc.send_signal(signal.SIGHUP)
    reloaded = await wait_for("both workers reloaded",
                              lambda: len(proxy.events("reloaded")) >= 2 and
                              proxy.events("reloaded"))
    assert sorted(e["worker"] for e in reloaded) == ["0", "1"]

    killed_at = time.time()
    os.kill(worker_pid(proxy, 0), signal.SIGKILL)
    await wait_for("the restarted worker listens on the added upstream",
                   lambda: events_after(proxy, "listening", killed_at, worker="0",
                                        upstream="added"))
    # Every line a worker logs names it.
    for event in proxy.events("listening") + proxy.events("admin_listening"):
        assert event.get("worker") in ("0", "1"), event
    answers = await asyncio.gather(*(fetch(("127.0.0.1", added)) for _ in range(10)))
    assert all(r.status == 200 for r in answers)


async def test_sighup_switches_the_supervisors_own_lines_to_the_new_log_format(
        start_backend: Callable[..., Backend],
        start_proxy: Callable[..., ProxyProcess]) -> None:
    backend = start_backend("w")
    proxy = start_proxy({"web": static(backend)}, workers=2)
    config = Path(proxy.config_path)
    config.write_text(config.read_text() + '\n[log]\nformat = "json"\n')
    proxy.proc.send_signal(signal.SIGHUP)

    def json_lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in proxy.stderr_text().splitlines()
                if line.startswith("{")]

    reread = await wait_for("the supervisor's config_reread line, in JSON", lambda: [
        e for e in json_lines() if e.get("event") == "config_reread"])
    assert reread[0]["workers"] == "2" and "worker" not in reread[0], reread
    # The workers switched too: each logs its reload as JSON.
    await wait_for("both workers' reloaded lines, in JSON", lambda: sorted(
        e["worker"] for e in json_lines() if e.get("event") == "reloaded") == ["0", "1"])


async def test_workers_drain_and_exit_when_their_supervisor_is_killed(
        start_backend: Callable[..., Backend],
        start_proxy: Callable[..., ProxyProcess]) -> None:
    """An orphaned worker would hold the ports, and the next `sdproxy run` would be
    refused with "address in use"; so a worker ends with its supervisor (drained)."""
    backend = start_backend("w")
    proxy = start_proxy({"web": static(backend)}, workers=2)
    workers = [worker_pid(proxy, 0), worker_pid(proxy, 1)]
    readings = Path(proxy.events("supervising")[0]["readings"])
    assert readings.is_dir()
    os.kill(proxy.pid, signal.SIGKILL)
    await wait_for("both workers gone", lambda: not any(alive(pid) for pid in workers),
                   timeout=10)
    assert not readings.exists()  # removed by the orphans, the supervisor being gone
    stopped = [e for e in proxy.events("stopping") if e.get("worker") in ("0", "1")]
    assert sorted(e["worker"] for e in stopped) == ["0", "1"]
    assert all(e["signal"] == "SIGTERM" for e in stopped)


async def test_sigquit_to_the_supervisor_drains_every_worker_and_exits_0(
        start_backend: Callable[..., Backend],
        start_proxy: Callable[..., ProxyProcess]) -> None:
    """No signal a user may send by habit kills sdproxy without draining (SPEC)."""
    backend = start_backend("q")
    proxy = start_proxy({"web": static(backend)}, workers=2)
    workers = [worker_pid(proxy, 0), worker_pid(proxy, 1)]
    proxy.proc.send_signal(signal.SIGQUIT)
    assert await asyncio.to_thread(wait_exit, proxy, 10) == 0
    assert not any(alive(pid) for pid in workers)
