"""End to end: sdproxy's own health checks, instance state and reason, operator drain.

A real Consul dev agent, real instances and the real proxy, all on loopback. Instances
are registered with TTL checks set passing, so Consul keeps calling them passing while
their /health fails: an ejection seen here is sdproxy's own doing.

SPEC "Active health checks", "Instance state and reason", "Admin (additions)":
- `fall` consecutive failed probes eject an instance (state "ejected", reason
  "health: 500 on /health"), `rise` good ones bring it back; no request reaches it while
  ejected; probes are `interval` +-10 % apart, per instance, bounded by `timeout`; tcp
  mode probes by connecting;
- an instance Consul reports critical is listed as "down" with its check's output;
- `POST /upstreams/{name}/endpoints/{id}/drain|enable` on the admin API takes an instance
  out of rotation while its in-flight requests finish, and back; with `admin.token`, or
  on an admin address that is not loopback, a Bearer token is needed.

Each test prints what it measured.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
import signal
import socket
import statistics
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from support.consul import Registration, health_service, wait_passing
from support.http import fetch
from support.procs import Backend, ProxyProcess, raw_instance

from proxy.devconsul import ConsulAgent, free_port

pytestmark = pytest.mark.timeout(90)

Spawn = Callable[[str, str], Backend]
ServiceName = Callable[[str], str]
Register = Callable[..., Registration]
StartProxy = Callable[..., ProxyProcess]
ProxyFor = Callable[..., tuple[ProxyProcess, list[Registration]]]

# An instance whose /health the test controls. Paths:
#   GET /health                   -> the current health status (or hangs, after /control/hang);
#                                    each probe is recorded (time, Host, User-Agent)
#   GET /control/health/<code>    -> sets the /health status
#   GET /control/hang             -> /health never answers from now on
#   GET /control/state            -> JSON: probes, requests served
#   GET /slow/<seconds>           -> 200 after that long (a request in flight)
#   anything else                 -> 200, body INSTANCE (counted in `requests`)
HEALTH_INSTANCE = r"""
import json, threading, time

STATE = {"health": 200, "hang": False, "probes": [], "requests": 0}
LOCK = threading.Lock()


def reply(conn, status, body):
    conn.sendall(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n" % (status, len(body)) + body)


def handle(conn, number):
    with conn:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            fields = dict((k.strip().lower(), v.strip())
                          for k, _, v in (line.partition(":") for line in lines[1:]))
            if path == "/health":
                with LOCK:
                    STATE["probes"].append([time.time(), fields.get("host", ""),
                                            fields.get("user-agent", "")])
                    hang, status = STATE["hang"], STATE["health"]
                if hang:
                    time.sleep(60)
                    return
                reply(conn, status, b"health")
            elif path.startswith("/control/health/"):
                with LOCK:
                    STATE["health"] = int(path.rsplit("/", 1)[1])
                reply(conn, 200, b"ok")
            elif path == "/control/hang":
                with LOCK:
                    STATE["hang"] = True
                reply(conn, 200, b"ok")
            elif path == "/control/state":
                with LOCK:
                    body = json.dumps(STATE).encode()
                reply(conn, 200, body)
            else:
                with LOCK:
                    STATE["requests"] += 1
                if path.startswith("/slow/"):
                    time.sleep(float(path.rsplit("/", 1)[1]))
                reply(conn, 200, b"INSTANCE")
            if fields.get("connection", "").lower() == "close":
                return
"""


def health_instance(spawn: Spawn, name: str) -> Backend:
    return spawn(raw_instance(name, HEALTH_INSTANCE.replace("INSTANCE", name)), name)


async def control(instance: Backend, path: str) -> Any:
    resp = await fetch(instance.addr, "GET", path)
    assert resp.status == 200, resp.text
    return json.loads(resp.body) if path == "/control/state" else resp.text


async def probe_times(instance: Backend, since: float = 0.0) -> list[float]:
    state = await control(instance, "/control/state")
    return [t for t, _host, _agent in state["probes"] if t >= since]


async def requests_served(instance: Backend) -> int:
    return int((await control(instance, "/control/state"))["requests"])


async def wait_endpoint(proxy: ProxyProcess, upstream: str, eid: str,
                        predicate: Callable[[dict[str, Any]], bool],
                        timeout: float = 10.0) -> tuple[float, dict[str, Any]]:
    """Poll /upstreams (20 ms) until `eid` satisfies `predicate`: (wall time, endpoint)."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        for ep in await asyncio.to_thread(proxy.endpoints, upstream):
            if ep["id"] == eid:
                last = ep
                if predicate(ep):
                    return time.time(), ep
        await asyncio.sleep(0.02)
    raise AssertionError(f"{eid} never matched within {timeout}s; last: {last}")


def in_state(state: str) -> Callable[[dict[str, Any]], bool]:
    return lambda ep: ep["state"] == state


async def bodies(proxy: ProxyProcess, upstream: str, n: int, path: str = "/") -> Counter[str]:
    out: Counter[str] = Counter()
    for _ in range(n):
        resp = await fetch(proxy.listen(upstream), "GET", path)
        out[f"{resp.status} {resp.text}"] += 1
    return out


def metric(proxy: ProxyProcess, name: str, **labels: str) -> float:
    status, body = proxy.admin_get("/metrics")
    assert status == 200
    total = 0.0
    for line in body.decode().splitlines():
        if not line.startswith(name + "{"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def admin_post(proxy: ProxyProcess, path: str,
               headers: dict[str, str] | None = None) -> tuple[int, str]:
    """POST to the admin API (blocking: call through asyncio.to_thread)."""
    req = urllib.request.Request(proxy.admin_url + path, method="POST", data=b"",
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5.0) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# -- ejection and return ----------------------------------------------------------------------

INTERVAL, TIMEOUT, FALL, RISE = 0.5, 0.4, 3, 2
HEALTH = {"interval": "500ms", "timeout": "400ms", "fall": FALL, "rise": RISE}
SLACK = 0.3  # scheduling noise on a shared 2-core machine
EARLY = 0.01  # a timer may fire a little early, and two probes' latencies differ


async def test_a_failing_health_endpoint_is_ejected_after_fall_probes_and_returns_after_rise(
        spawn: Spawn, service_name: ServiceName, proxy_for: ProxyFor,
        consul: ConsulAgent) -> None:
    svc = service_name("hc")
    a, b = health_instance(spawn, "a"), health_instance(spawn, "b")
    proxy, _ = proxy_for(svc, [a, b], upstream={"health": HEALTH})
    a_id, b_id = f"{svc}-a", f"{svc}-b"
    await wait_endpoint(proxy, svc, a_id, lambda ep: ep["health"] is not None)

    # /health turns 500 while Consul still says passing.
    switched = time.time()
    await control(a, "/control/health/500")
    ejected_at, ep = await wait_endpoint(proxy, svc, a_id, in_state("ejected"))
    assert ep["reason"] == "health: 500 on /health"
    failing = await probe_times(a, since=switched)
    before = [t for t in failing if t <= ejected_at]
    gaps = [y - x for x, y in itertools.pairwise(before)]
    print(f"\nejection: {ejected_at - switched:.3f}s after /health turned 500; failed probes "
          f"before it: {len(before)}, gaps {[round(g, 3) for g in gaps]}, seen "
          f"{ejected_at - before[-1]:.3f}s after the last")
    assert len(before) == FALL
    assert all(0.9 * INTERVAL - EARLY <= g <= 1.1 * INTERVAL + SLACK for g in gaps)
    assert ejected_at - before[-1] < SLACK
    assert (FALL - 1) * 0.9 * INTERVAL <= ejected_at - switched <= FALL * 1.1 * INTERVAL + SLACK
    entries, _ = health_service(consul, svc)  # passing only
    assert {e["Service"]["ID"] for e in entries} == {a_id, b_id}

    # Ejected: no request reaches it, not even as a retry.
    served = await requests_served(a)
    assert await bodies(proxy, svc, 20) == Counter({"200 b": 20})
    assert await requests_served(a) == served
    assert metric(proxy, "sdproxy_health_checks_total", upstream=svc, endpoint=a_id,
                  result="fail") >= FALL
    assert metric(proxy, "sdproxy_endpoints", upstream=svc, state="ejected") == 1

    # Back after `rise` good probes.
    healed = time.time()
    await control(a, "/control/health/200")
    back_at, ep = await wait_endpoint(proxy, svc, a_id, in_state("healthy"))
    good = [t for t in await probe_times(a, since=healed) if t <= back_at]
    print(f"return: {back_at - healed:.3f}s after /health turned 200; good probes: {len(good)}")
    assert ep["reason"] == "" and ep["health"]["ejected"] is False
    assert len(good) == RISE
    assert (RISE - 1) * 0.9 * INTERVAL <= back_at - healed <= RISE * 1.1 * INTERVAL + SLACK
    assert await bodies(proxy, svc, 20) == Counter({"200 a": 10, "200 b": 10})
    events = proxy.events("health_ejected")
    assert [(e["instance"], e["reason"]) for e in events] == [(a_id, "health: 500 on /health")]
    assert [e["instance"] for e in proxy.events("health_restored")] == [a_id]


async def test_probes_are_spread_bounded_and_name_the_upstream(
        spawn: Spawn, service_name: ServiceName, proxy_for: ProxyFor) -> None:
    svc = service_name("hc")
    a, b = health_instance(spawn, "a"), health_instance(spawn, "b")
    interval = 0.2
    started = time.time()
    proxy, _ = proxy_for(svc, [a, b], upstream={"health": {"interval": "200ms"}})
    await asyncio.sleep(15 * interval)  # collecting probes: nothing to wait for but time
    series = [await probe_times(a, since=started), await probe_times(b, since=started)]
    for times in series:
        gaps = [y - x for x, y in itertools.pairwise(times)]
        print(f"\nprobe gaps (interval {interval}s): min {min(gaps):.3f} max {max(gaps):.3f} "
              f"stdev {statistics.stdev(gaps) * 1000:.1f} ms over {len(gaps)}")
        assert len(times) >= 10
        assert all(0.9 * interval - EARLY <= g <= 1.1 * interval + SLACK for g in gaps)
        assert statistics.stdev(gaps) > 0.005  # jittered, not a fixed period
    # Not in lockstep: the offset between the two instances' probes keeps moving.
    offsets = [min(abs(t - u) for u in series[1]) for t in series[0]]
    print(f"offsets between a's and b's probes: {min(offsets):.3f}..{max(offsets):.3f}s")
    assert max(offsets) - min(offsets) > 0.02
    state = await control(a, "/control/state")
    assert {(host, agent) for _, host, agent in state["probes"]} == {(svc, "sdproxy-health")}
    assert all(ep["health"]["last"] == "200 on /health" for ep in proxy.endpoints(svc))


async def test_a_hung_health_endpoint_fails_by_timeout(
        spawn: Spawn, service_name: ServiceName, proxy_for: ProxyFor) -> None:
    svc = service_name("hc")
    a, b = health_instance(spawn, "a"), health_instance(spawn, "b")
    proxy, _ = proxy_for(svc, [a, b], upstream={"health": {**HEALTH, "fall": 2}})
    a_id = f"{svc}-a"
    await wait_endpoint(proxy, svc, a_id, lambda ep: ep["health"] is not None)
    hung = time.time()
    await control(a, "/control/hang")
    ejected_at, ep = await wait_endpoint(proxy, svc, a_id, in_state("ejected"))
    probes = await probe_times(a, since=hung)
    print(f"\nhung /health: ejected {ejected_at - hung:.3f}s later after {len(probes)} probes")
    assert ep["reason"] == "health: timeout 0.4s"
    # Each probe gave up after `timeout`; the next came an interval after that.
    gaps = [y - x for x, y in itertools.pairwise(probes)]
    assert all(TIMEOUT + 0.9 * INTERVAL - EARLY <= g <= TIMEOUT + 1.1 * INTERVAL + SLACK for g in gaps)
    assert ejected_at - probes[-1] <= TIMEOUT + SLACK
    assert ejected_at - hung <= 2 * (TIMEOUT + 1.1 * INTERVAL) + SLACK
    assert await bodies(proxy, svc, 10) == Counter({"200 b": 10})
    assert metric(proxy, "sdproxy_health_checks_total", upstream=svc, endpoint=a_id,
                  result="timeout") >= 2


async def test_tcp_mode_checks_by_connect(
        start_backend: Callable[..., Backend], service_name: ServiceName,
        proxy_for: ProxyFor) -> None:
    svc = service_name("hctcp")
    a, b = start_backend("a"), start_backend("b")
    proxy, _ = proxy_for(svc, [a, b], upstream={"mode": "tcp", "health": HEALTH})
    a_id = f"{svc}-a"
    _, ep = await wait_endpoint(proxy, svc, a_id, lambda ep: ep["health"] is not None)
    assert ep["health"]["last"] == "connected"
    assert proxy.upstream(svc)["health_checks"]["check"] == "connect"
    port = a.port
    killed = time.time()
    a.kill9()
    ejected_at, ep = await wait_endpoint(proxy, svc, a_id, in_state("ejected"))
    print(f"\ntcp: ejected {ejected_at - killed:.3f}s after the instance died")
    assert ep["reason"] == "health: connection refused"
    assert ejected_at - killed <= FALL * 1.1 * INTERVAL + SLACK
    start_backend("a", port=port)
    restarted = time.time()  # it listens again
    back_at, _ = await wait_endpoint(proxy, svc, a_id, in_state("healthy"))
    print(f"tcp: back {back_at - restarted:.3f}s after it listened again")
    assert back_at - restarted <= RISE * 1.1 * INTERVAL + SLACK


# -- the catalog's view ------------------------------------------------------------------------

async def test_an_instance_consul_reports_critical_is_listed_down_with_its_check_output(
        spawn: Spawn, service_name: ServiceName, proxy_for: ProxyFor,
        consul: ConsulAgent) -> None:
    svc = service_name("down")
    a, b = health_instance(spawn, "a"), health_instance(spawn, "b")
    # Consul's own HTTP check on /health, every 200 ms.
    proxy, _ = proxy_for(svc, [a, b], check="http", interval="200ms")
    a_id = f"{svc}-a"
    await control(a, "/control/health/503")
    _, ep = await wait_endpoint(proxy, svc, a_id, in_state("down"))
    print(f"\ndown: reason {ep['reason']!r}")
    assert "503" in ep["reason"] and len(ep["reason"]) <= 200
    assert (ep["address"], ep["port"]) == ("127.0.0.1", a.port)
    served = await requests_served(a)
    assert await bodies(proxy, svc, 10) == Counter({"200 b": 10})
    assert await requests_served(a) == served
    assert metric(proxy, "sdproxy_endpoints", upstream=svc, state="down") == 1
    status, page = proxy.admin_get("/")
    assert status == 200 and b'<tr class="down">' in page and a_id.encode() in page
    await control(a, "/control/health/200")
    await wait_endpoint(proxy, svc, a_id, in_state("healthy"))


# -- operator drain ----------------------------------------------------------------------------

async def test_drain_and_enable_with_in_flight_requests_finishing(
        spawn: Spawn, service_name: ServiceName, proxy_for: ProxyFor) -> None:
    svc = service_name("drain")
    a, b = health_instance(spawn, "a"), health_instance(spawn, "b")
    proxy, _ = proxy_for(svc, [a, b])
    a_id = f"{svc}-a"
    # Two slow requests: round robin puts one on each instance.
    sent = time.time()
    slow = [asyncio.create_task(fetch(proxy.listen(svc), "GET", "/slow/1.5"))
            for _ in range(2)]
    await wait_endpoint(proxy, svc, a_id, lambda ep: ep["active"] == 1)

    status, text = await asyncio.to_thread(
        admin_post, proxy, f"/upstreams/{svc}/endpoints/{a_id}/drain")
    drained_after = time.time() - sent
    assert status == 200, text
    answer = json.loads(text)
    assert answer["operator_drained"] is True
    assert [(e["state"], e["reason"], e["active"]) for e in answer["endpoints"]] == [
        ("draining", "operator", 1)]
    assert await bodies(proxy, svc, 10) == Counter({"200 b": 10})  # no new requests
    results = sorted(f"{r.status} {r.text}" for r in await asyncio.gather(*slow))
    print(f"\ndrain: {drained_after:.3f}s into a 1.5 s request; it finished after "
          f"{time.time() - sent:.3f}s")
    assert results == ["200 a", "200 b"]  # the one in flight on a finished
    # The drain path sent to the proxy's listener is just a request to an instance.
    resp = await fetch(proxy.listen(svc), "POST", f"/upstreams/{svc}/endpoints/{svc}-b/drain")
    assert resp.status == 200
    assert proxy.events("operator_drain")[-1]["instance"] == a_id

    status, text = await asyncio.to_thread(
        admin_post, proxy, f"/upstreams/{svc}/endpoints/{a_id}/enable")
    assert status == 200, text
    _, ep = await wait_endpoint(proxy, svc, a_id, in_state("healthy"))
    assert ep["reason"] == ""
    assert await bodies(proxy, svc, 10) == Counter({"200 a": 5, "200 b": 5})


def _loopback_host_name() -> str | None:
    """A name (not "localhost") that resolves to loopback addresses only, or None."""
    name = socket.gethostname()
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except OSError:
        return None
    ok = infos and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)
    return name if ok and name != "localhost" else None


async def test_drain_needs_the_token_when_the_admin_address_is_not_loopback(
        spawn: Spawn, service_name: ServiceName, register: Register,
        start_proxy: StartProxy, consul: ConsulAgent) -> None:
    """The admin address is the machine's host name: sdproxy cannot know where a name
    points tomorrow, so it counts as not loopback; here it resolves to 127.0.0.1, so no
    byte leaves the machine."""
    name = _loopback_host_name()
    if name is None:
        pytest.skip("this machine's host name does not resolve to loopback only")
    svc = service_name("auth")
    a = health_instance(spawn, "a")
    register(a, svc)
    path = f"/upstreams/{svc}/endpoints/{svc}-a/drain"
    for token in ("", "s3cret"):
        admin = f'[admin]\nlisten = "{name}:{free_port()}"\n'
        if token:
            admin += f'token = "{token}"\n'
        fragment = (admin + f'[[upstreams]]\nname = "{svc}"\n'
                    f'listen = "127.0.0.1:{free_port()}"\n')
        proxy = start_proxy(fragment)
        proxy.wait_routable(svc, {f"{svc}-a"})
        assert proxy.admin_get("/upstreams")[0] == 200  # reads stay open
        status, text = await asyncio.to_thread(admin_post, proxy, path)
        print(f"\nadmin on {name}, token {'set' if token else 'unset'}: {status} {text.strip()}")
        if not token:
            assert status == 403 and "set admin.token" in text
        else:
            assert status == 401
            status, _ = await asyncio.to_thread(
                admin_post, proxy, path, {"Authorization": "Bearer wrong"})
            assert status == 401
            status, text = await asyncio.to_thread(
                admin_post, proxy, path, {"Authorization": f"Bearer {token}"})
            assert status == 200, text
        assert {ep["state"] for ep in proxy.endpoints(svc)} == (
            {"draining"} if token else {"healthy"})
        proxy.stop()


# -- life cycle ----------------------------------------------------------------------------------

async def wait_event(proxy: ProxyProcess, event: str, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(proxy.events(event)) < count:
        assert time.monotonic() < deadline, f"no {count}th event={event}: {proxy.stderr_tail()}"
        await asyncio.sleep(0.02)


async def test_sighup_turns_checks_on_and_a_removed_upstream_is_no_longer_probed(
        spawn: Spawn, service_name: ServiceName, proxy_for: ProxyFor) -> None:
    svc = service_name("hcreload")
    a = health_instance(spawn, "a")
    proxy, _ = proxy_for(svc, [a])
    assert await probe_times(a) == []  # no [upstreams.health]: no probes
    text = proxy.config_path.read_text()
    proxy.config_path.write_text(text + '[upstreams.health]\ninterval = "200ms"\n')
    proxy.proc.send_signal(signal.SIGHUP)
    await wait_event(proxy, "reloaded", 1)
    deadline = time.monotonic() + 5.0
    while len(await probe_times(a)) < 3:  # the first within a second, then every 200 ms
        assert time.monotonic() < deadline, "no probes after the reload"
        await asyncio.sleep(0.05)

    proxy.config_path.write_text(text.partition("[[upstreams]]")[0])  # no upstream left
    proxy.proc.send_signal(signal.SIGHUP)
    await wait_event(proxy, "reloaded", 2)
    count = len(await probe_times(a))
    await asyncio.sleep(1.0)  # five intervals: any probe would show by now
    after = len(await probe_times(a))
    print(f"\nprobes after the upstream was removed: {after - count}")
    assert after - count <= 1  # at most the one in flight when it was removed


# -- workers ---------------------------------------------------------------------------------------

async def test_with_two_workers_each_probes_and_a_drain_reaches_both(
        spawn: Spawn, service_name: ServiceName, register: Register,
        start_proxy: StartProxy, consul: ConsulAgent) -> None:
    svc = service_name("hcworkers")
    a, b = health_instance(spawn, "a"), health_instance(spawn, "b")
    regs = [register(x, svc) for x in (a, b)]
    wait_passing(consul, svc, [r.service_id for r in regs])
    proxy = start_proxy({svc: {"health": {"interval": "200ms"}}}, workers=2)
    proxy.wait_routable(svc, {f"{svc}-a", f"{svc}-b"})
    window_start = time.time()
    await asyncio.sleep(2.0)  # ten intervals of probes
    probes = await probe_times(a, since=window_start)
    probes = [t for t in probes if t <= window_start + 2.0]
    print(f"\ntwo workers: {len(probes)} probes of one instance in 2 s at interval 200 ms")
    assert 16 <= len(probes) <= 24  # each worker probes on its own: twice the rate

    a_id = f"{svc}-a"
    status, text = await asyncio.to_thread(
        admin_post, proxy, f"/upstreams/{svc}/endpoints/{a_id}/drain")
    assert status == 200, text
    assert json.loads(text)["workers_pending"] == []
    served = await requests_served(a)
    # Fresh connections: SO_REUSEPORT spreads them over both workers.
    assert await bodies(proxy, svc, 40) == Counter({"200 b": 40})
    assert await requests_served(a) == served
    [ep] = [e for e in proxy.endpoints(svc) if e["id"] == a_id]
    assert ep["state"] == "draining"
    assert {w["reason"] for w in ep["workers"].values()} == {"operator"}
    assert len(ep["workers"]) == 2

    status, text = await asyncio.to_thread(
        admin_post, proxy, f"/upstreams/{svc}/endpoints/{a_id}/enable")
    assert status == 200 and json.loads(text)["workers_pending"] == []
    got = await bodies(proxy, svc, 40)
    assert set(got) == {"200 a", "200 b"} and min(got.values()) >= 10, got
