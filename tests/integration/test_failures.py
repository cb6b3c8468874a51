"""End to end, HTTP mode under failure: dead, hung, resetting and erroring instances.

A real Consul dev agent, real demo backends and the real proxy, as in test_http_proxy.py.
Instances are registered with TTL checks set passing, so Consul keeps calling an instance
healthy while it is dead or frozen: whatever the client is spared here is sdproxy's own
doing (failover, per-instance breaker, panic rule, request_timeout), not the catalog's.

SPEC "HTTP mode" and "Routing rules" are the contract:
- a failed connect is retried at once on an untried instance, for every method;
- a reset, request_timeout or listed 5xx after the request was sent is retried only for
  idempotent methods with a replayable body; otherwise reset -> 502, timeout -> 504,
  an unretried listed 5xx is passed through;
- `failures` consecutive failed attempts open an instance's breaker; after
  `reset_timeout` one trial at a time; when every breaker is open, requests still go out
  as trials (panic rule);
- `max_connections`: a connection beyond it gets 503 and is closed.

Clients never retry (`support.http`). Each test prints what it measured.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from support.consul import Registration
from support.http import RawConnection, Response, Sample, fetch, paced_requests
from support.procs import Backend, ProxyProcess, raw_instance

pytestmark = pytest.mark.timeout(60)

PARSERS = pytest.mark.parametrize("http_parser", ["httptools", "h11"])

StartBackends = Callable[..., list[Backend]]
StartBackend = Callable[..., Backend]
ServiceName = Callable[[str], str]
Spawn = Callable[[str, str], Backend]
ProxyFor = Callable[..., tuple[ProxyProcess, list[Registration]]]


# -- helpers ------------------------------------------------------------------------------
_SAMPLE = re.compile(r'^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        have = dict(_LABEL.findall(m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def metrics_text(proxy: ProxyProcess) -> str:
    status, body = proxy.admin_get("/metrics")
    assert status == 200, body[:300]
    return body.decode()


def by_id(proxy: ProxyProcess, upstream: str) -> dict[str, dict[str, Any]]:
    return {ep["id"]: ep for ep in proxy.endpoints(upstream)}


def total_requests(proxy: ProxyProcess, upstream: str) -> int:
    return sum(int(ep["requests"]) for ep in proxy.endpoints(upstream))


def latency(s: Sample) -> float:
    return s.end - s.start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def wait_state(proxy: ProxyProcess, upstream: str, endpoint_id: str, state: str,
                     deadline: float) -> float | None:
    """Poll /upstreams every 20 ms (without blocking the loop) until `endpoint_id` is in
    `state`; the monotonic time it was first seen there, or None past `deadline`."""
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(proxy.admin_url + "/upstreams") as resp:
                ups: list[dict[str, Any]] = await resp.json()
            for up in ups:
                if up["name"] != upstream:
                    continue
                for ep in up["endpoints"]:
                    if ep["id"] == endpoint_id and ep["state"] == state:
                        return time.monotonic()
            await asyncio.sleep(0.02)
    return None


# A test-owned instance that reads each whole request (head and Content-Length body), then
# resets the connection (SO_LINGER 0 -> RST) without a byte of response, whatever the path.
RESETTER = raw_instance("resetter", r"""
import socket, struct

def handle(conn, _number):
    try:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            data = conn.recv(65536)
            if not data:
                break
            rest += data
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        conn.close()
""")

# After each response, in the same write: bytes that are not HTTP, or a second response
# nobody asked for.
TRAILERS = {"junk": b"\x00\x01 not http\r\n\r\n",
            "response": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra"}


def trailing_bytes(trailer: bytes) -> str:
    """An instance that answers every request with a complete response followed by
    `trailer` in one write; the body names the connection ("c1", "c2", ...)."""
    return raw_instance("trailing", f"TRAILER = {trailer!r}\n" + r"""
def handle(conn, number):
    body = b"c%d" % number
    buf = b""
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            _head, _, buf = buf.partition(b"\r\n\r\n")
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                         + TRAILER)
    except OSError:
        pass
    finally:
        conn.close()
""")


# -- a. a registered, passing instance whose port nobody listens on -------------------------
@PARSERS
async def test_closed_port_costs_no_client_errors_and_opens_breaker(
        http_parser: str, start_backends: StartBackends, service_name: ServiceName,
        proxy_for: ProxyFor, request: pytest.FixtureRequest) -> None:
    svc = service_name("dead")
    a, b = start_backends("a", "b")
    # Bound but never listening: connects are refused, and no other process on this
    # shared host can take the port while the test runs (a free port number could be).
    closed = socket.socket()
    request.addfinalizer(closed.close)
    closed.bind(("127.0.0.1", 0))
    proxy, regs = proxy_for(svc, [a, b, (closed.getsockname()[1], "dead")],
                            {"http_parser": http_parser,
                             "breaker": {"failures": 3, "reset_timeout": "30s"}})
    dead_id = regs[2].service_id
    addr = proxy.listen(svc)

    seen: Counter[str] = Counter()
    bad: list[Response] = []
    for _ in range(60):
        resp = await fetch(addr)
        if resp.status == 200:
            seen[resp.text] += 1
        else:
            bad.append(resp)
    dead = by_id(proxy, svc)[dead_id]
    failovers = metric(metrics_text(proxy), "sdproxy_failovers_total", upstream=svc,
                       reason="connect-failure")
    print(f"parser={http_parser}: distribution {dict(seen)}; dead instance cost "
          f"{dead['requests']} attempts ({dead['failures']} failures, {failovers:g} "
          f"failovers) before its breaker opened; state {dead['state']}")
    assert not bad, [(r.status, r.text) for r in bad[:5]]
    assert seen["a"] + seen["b"] == 60 and seen["a"] > 0 and seen["b"] > 0
    assert dead["state"] == "open"
    # exactly `failures` attempts, each failed over at once; none once the breaker opened
    assert dead["requests"] == dead["failures"] == 3
    assert failovers == 3


async def test_an_empty_retry_budget_still_retries_failed_connects(
        start_backend: StartBackend, service_name: ServiceName, proxy_for: ProxyFor,
        spawn: Spawn, request: pytest.FixtureRequest) -> None:
    """With a budget of zero retries in flight, a refused connect is still retried (its
    request reached no instance), while a reset after the request was sent is not."""
    svc = service_name("budget")
    good = start_backend("good")
    closed = socket.socket()
    request.addfinalizer(closed.close)
    closed.bind(("127.0.0.1", 0))
    resetter = spawn(RESETTER, "resetter")
    proxy, _ = proxy_for(svc, [good, (closed.getsockname()[1], "dead"), resetter],
                         {"retries": 2, "breaker": {"failures": 1000},
                          "retry_budget": {"percent": 0, "min_concurrency": 0}})
    addr = proxy.listen(svc)
    responses = [await fetch(addr, "GET", f"/?i={i}") for i in range(30)]
    exhausted = metric(metrics_text(proxy), "sdproxy_retry_budget_exhausted_total",
                       upstream=svc)
    failovers = metric(metrics_text(proxy), "sdproxy_failovers_total", upstream=svc,
                       reason="connect-failure")
    statuses = Counter((r.status, r.text.split(":")[-1].strip()) for r in responses)
    print(f"{dict(statuses)}; budget refusals {exhausted:g}, connect failovers {failovers:g}")
    # Round robin sends a third of the first attempts to each: the dead port's are
    # retried (good, or the resetter and then 502), the resetter's are refused a retry.
    assert failovers >= 10
    assert exhausted >= 10
    assert all(r.status in (200, 502) for r in responses)
    assert all("reset" in r.text for r in responses if r.status == 502)
    assert sum(r.status == 200 for r in responses) >= 10


# -- b. a hung instance (SIGSTOP) ------------------------------------------------------------
async def test_hung_instance_costs_at_most_one_request_timeout(
        start_backends: StartBackends, service_name: ServiceName,
        proxy_for: ProxyFor) -> None:
    svc = service_name("hang")
    backends = start_backends("a", "b", "c")
    proxy, regs = proxy_for(svc, list(backends),
                            {"request_timeout": "1s", "retries": 2,
                             "breaker": {"failures": 3, "reset_timeout": "30s"}})
    victim, victim_id = backends[2], regs[2].service_id

    warm = asyncio.Event()
    answered_c = 0

    def on_sample(s: Sample) -> None:
        nonlocal answered_c
        answered_c += s.body == "c"
        if answered_c >= 3:
            warm.set()

    try:
        load = asyncio.create_task(paced_requests(proxy.listen(svc), rate=20, duration=6.0,
                                                  timeout=5.0, on_sample=on_sample))
        await asyncio.wait_for(warm.wait(), 3.0)  # traffic reaches c before it hangs
        t_stop = time.monotonic()
        victim.sigstop()
        t_open = await wait_state(proxy, svc, victim_id, "open", t_stop + 5.0)
        samples = await load
        state_after = by_id(proxy, svc)[victim_id]
    finally:
        victim.sigcont()

    bad = [s for s in samples if not s.ok]
    lat = [latency(s) for s in samples]
    slow = [s for s in samples if latency(s) > 0.5]
    t_last = max(s.start for s in samples)
    last_second = [latency(s) for s in samples if s.start >= t_last - 1.0]
    after_open = [latency(s) for s in samples if t_open is not None and s.start > t_open]
    print(f"{len(samples)} requests, {len(bad)} errors; SIGSTOP -> breaker open "
          f"{'never' if t_open is None else f'{(t_open - t_stop) * 1000:.0f} ms'}; "
          f"{len(slow)} requests paid the timeout (latencies "
          f"{sorted(round(latency(s), 3) for s in slow)}); max {max(lat):.3f} s; "
          f"after open: max {max(after_open, default=0):.3f} s; last second p95 "
          f"{percentile(last_second, 0.95) * 1000:.1f} ms; hung instance "
          f"requests={state_after['requests']} failures={state_after['failures']}")
    assert len(samples) >= 100
    assert not bad, [(s.status, s.error, s.body[:100]) for s in bad[:5]]
    assert max(lat) < 1.8
    assert t_open is not None, "the hung instance's breaker never opened"
    assert state_after["state"] == "open"
    assert slow, "no request was routed to the hung instance: the test proved nothing"
    assert max(after_open) < 0.5  # nothing goes to the hung instance once it is open
    assert percentile(last_second, 0.95) < 0.2


# -- c. resets after the request was sent ---------------------------------------------------
@PARSERS
async def test_reset_retried_for_get_not_for_post(
        http_parser: str, start_backends: StartBackends, service_name: ServiceName,
        proxy_for: ProxyFor) -> None:
    svc = service_name("reset")
    backends = start_backends("a", "b")
    proxy, _ = proxy_for(svc, list(backends),
                         {"http_parser": http_parser, "retries": 1,
                          "breaker": {"failures": 100}})
    addr = proxy.listen(svc)

    def failovers() -> float:
        return metric(metrics_text(proxy), "sdproxy_failovers_total", upstream=svc,
                      reason="reset")

    # GET: both instances reset -> tried on both, then 502
    f0, r0 = failovers(), total_requests(proxy, svc)
    resp = await fetch(addr, "GET", "/reset")
    f1, r1 = failovers(), total_requests(proxy, svc)
    print(f"parser={http_parser} GET /reset -> {resp.status} {resp.text.strip()!r}; "
          f"attempts {r1 - r0}, reset failovers {f1 - f0:g}")
    assert resp.status == 502
    assert svc in resp.text
    assert r1 - r0 == 2
    assert f1 - f0 == 1

    # POST: not idempotent -> one attempt, then 502
    resp = await fetch(addr, "POST", "/reset", body=b"x" * 1000)
    f2, r2 = failovers(), total_requests(proxy, svc)
    print(f"parser={http_parser} POST /reset -> {resp.status} {resp.text.strip()!r}; "
          f"attempts {r2 - r1}, reset failovers {f2 - f1:g}")
    assert resp.status == 502
    assert svc in resp.text
    assert r2 - r1 == 1
    assert f2 == f1

    # The proxy keeps serving normal requests on both instances.
    assert {(await fetch(addr)).text for _ in range(4)} == {"a", "b"}


@PARSERS
async def test_one_resetting_instance_get_fails_over_post_gets_502(
        http_parser: str, start_backend: StartBackend, service_name: ServiceName,
        proxy_for: ProxyFor, spawn: Spawn) -> None:
    svc = service_name("mixed")
    good = start_backend("good")
    resetter = spawn(RESETTER, "resetter")
    proxy, regs = proxy_for(svc, [good, resetter],
                            {"http_parser": http_parser, "breaker": {"failures": 100}})
    bad_id = regs[1].service_id
    addr = proxy.listen(svc)

    gets = [await fetch(addr, "GET", f"/?i={i}") for i in range(10)]
    eps = by_id(proxy, svc)
    text = metrics_text(proxy)
    reset_failovers = metric(text, "sdproxy_failovers_total", upstream=svc, reason="reset")
    print(f"parser={http_parser} GETs: {Counter((r.status, r.text) for r in gets)}; resetter "
          f"got {eps[bad_id]['requests']} attempts, reset failovers {reset_failovers:g}")
    assert all((r.status, r.text) == (200, "good") for r in gets)
    assert eps[bad_id]["requests"] > 0, "round robin never chose the resetter"
    assert reset_failovers == eps[bad_id]["requests"]

    before = eps[bad_id]["requests"]
    posts = [await fetch(addr, "POST", "/upload", body=b"p" * 4096) for _ in range(10)]
    hit = by_id(proxy, svc)[bad_id]["requests"] - before
    statuses = Counter(r.status for r in posts)
    print(f"parser={http_parser} POSTs: {dict(statuses)}; resetter got {hit} of them")
    assert set(statuses) <= {200, 502}
    assert statuses[502] == hit and 0 < hit < 10  # round robin spreads them over both
    for r in posts:
        if r.status == 502:
            assert svc in r.text and bad_id in r.text, r.text
        else:
            assert '"name": "good"' in r.text, r.text
    # POST is never retried after a reset: the failover count did not move
    assert metric(metrics_text(proxy), "sdproxy_failovers_total", upstream=svc,
                  reason="reset") == reset_failovers


# -- d. half-open recovery of a restarted instance ------------------------------------------
async def test_breaker_half_open_recovery_after_restart(
        start_backends: StartBackends, start_backend: StartBackend,
        service_name: ServiceName, proxy_for: ProxyFor) -> None:
    svc = service_name("recover")
    a, b = start_backends("a", "b")
    proxy, regs = proxy_for(svc, [a, b], {"breaker": {"failures": 2, "reset_timeout": "1s"}})
    b_id = regs[1].service_id
    addr = proxy.listen(svc)
    assert {(await fetch(addr)).text for _ in range(4)} == {"a", "b"}

    b.kill9()  # its TTL check stays passing: only the breaker can notice
    t_kill = time.monotonic()
    errors: list[Response] = []
    while by_id(proxy, svc)[b_id]["state"] != "open":
        assert time.monotonic() - t_kill < 5.0, "b's breaker never opened"
        resp = await fetch(addr)
        if (resp.status, resp.text) != (200, "a"):
            errors.append(resp)
        await asyncio.sleep(0.02)
    t_open = time.monotonic()
    assert not errors, [(r.status, r.text) for r in errors]

    start_backend("b2", port=b.port)  # a new process on the same port
    t_up = time.monotonic()
    t_first: float | None = None
    seen: Counter[str] = Counter()
    while t_first is None:
        assert time.monotonic() - t_up < 5.0, f"b2 got no traffic; saw {dict(seen)}"
        resp = await fetch(addr)
        assert resp.status == 200, (resp.status, resp.text)
        seen[resp.text] += 1
        if resp.text == "b2":
            t_first = time.monotonic()
        else:
            await asyncio.sleep(0.05)
    eps = proxy.wait_endpoints(svc, lambda eps: all(ep["state"] == "healthy" for ep in eps),
                               timeout=3.0)
    t_healthy = time.monotonic()
    after = Counter([(await fetch(addr)).text for _ in range(10)])
    print(f"kill -> open {(t_open - t_kill) * 1000:.0f} ms; open -> restart "
          f"{(t_up - t_open) * 1000:.0f} ms; restart -> first response from b2 "
          f"{(t_first - t_up) * 1000:.0f} ms, -> healthy in /upstreams "
          f"{(t_healthy - t_up) * 1000:.0f} ms; then {dict(after)}; "
          f"b: {[(ep['state'], ep['requests'], ep['failures']) for ep in eps if ep['id'] == b_id]}")
    assert t_first - t_up < 1.0 + 1.5  # reset_timeout + a few paced requests
    assert after["b2"] >= 4 and after["a"] >= 4


# -- e. a listed 5xx: retried, then passed through; unlisted: passed through at once --------
@pytest.mark.parametrize("retries", [
    1,
    2,  # retries >= instances: the last answer decides (a regression test)
])
async def test_listed_503_retried_then_passed_through(
        retries: int, start_backends: StartBackends, service_name: ServiceName,
        proxy_for: ProxyFor) -> None:
    svc = service_name("busy")
    backends = start_backends("a", "b")
    proxy, _ = proxy_for(svc, list(backends), {"retries": retries,
                                               "breaker": {"failures": 100}})
    addr = proxy.listen(svc)

    resp = await fetch(addr, "GET", "/status/503")
    text = metrics_text(proxy)
    eps = proxy.endpoints(svc)
    failovers = metric(text, "sdproxy_failovers_total", upstream=svc, reason="503")
    print(f"retries={retries}: GET /status/503 -> {resp.status} {resp.text.strip()!r} "
          f"x-sdproxy-error={resp.header('x-sdproxy-error')}; failovers {failovers:g}; "
          f"attempts {[(ep['id'], ep['requests'], ep['failures']) for ep in eps]}")
    assert sum(ep["requests"] for ep in eps) == 2  # both instances tried, once each
    assert sum(ep["failures"] for ep in eps) == 2  # a listed 5xx counts against a breaker
    assert failovers >= 1
    assert resp.status == 503
    assert resp.header("x-sdproxy-error") is None  # the instance's own response
    assert resp.text in ("a", "b")


async def test_unlisted_503_passed_through_without_retry(
        start_backends: StartBackends, service_name: ServiceName,
        proxy_for: ProxyFor) -> None:
    svc = service_name("busy")
    backends = start_backends("a", "b")
    proxy, _ = proxy_for(svc, list(backends), {"retry_on": ["connect-failure"]})
    addr = proxy.listen(svc)

    resp = await fetch(addr, "GET", "/status/503")
    eps = proxy.endpoints(svc)
    text = metrics_text(proxy)
    print(f"retry_on=[connect-failure]: GET /status/503 -> {resp.status} {resp.text!r}; "
          f"attempts {[(ep['id'], ep['requests'], ep['failures']) for ep in eps]}")
    assert resp.status == 503 and resp.text in ("a", "b")
    assert sum(ep["requests"] for ep in eps) == 1
    assert sum(ep["failures"] for ep in eps) == 0  # unlisted: not a failure of the instance
    assert metric(text, "sdproxy_failovers_total", upstream=svc) == 0


@pytest.mark.parametrize("retries", [
    1,
    2,  # retries >= instances: the last answer decides (a regression test)
])
async def test_every_instance_hung_gives_504(
        retries: int, start_backends: StartBackends, service_name: ServiceName,
        proxy_for: ProxyFor) -> None:
    svc = service_name("hung")
    backends = start_backends("a", "b")
    proxy, _ = proxy_for(svc, list(backends), {"retries": retries, "request_timeout": "500ms",
                                               "breaker": {"failures": 100}})
    addr = proxy.listen(svc)
    try:
        for b in backends:
            b.sigstop()
        t0 = time.monotonic()
        post = await fetch(addr, "POST", "/", body=b"data", timeout=5.0)
        t1 = time.monotonic()
        r1 = total_requests(proxy, svc)
        get = await fetch(addr, "GET", "/", timeout=5.0)
        t2 = time.monotonic()
        r2 = total_requests(proxy, svc)
        timeouts = metric(metrics_text(proxy), "sdproxy_failovers_total", upstream=svc,
                          reason="timeout")
    finally:
        for b in backends:
            b.sigcont()
    print(f"retries={retries}: POST -> {post.status} after {(t1 - t0) * 1000:.0f} ms, "
          f"{r1} attempt(s); GET -> {get.status} {get.text.strip()!r} after "
          f"{(t2 - t1) * 1000:.0f} ms, {r2 - r1} attempts; timeout failovers {timeouts:g}")
    # POST: not idempotent, one attempt, then 504
    assert post.status == 504 and svc in post.text
    assert r1 == 1 and 0.4 < t1 - t0 < 1.0
    # GET: one request_timeout per instance, then 504
    assert r2 - r1 == 2 and 0.9 < t2 - t1 < 1.6
    assert timeouts >= 1
    assert get.status == 504 and svc in get.text


# -- f. max_connections ----------------------------------------------------------------------
async def test_max_connections_rejects_with_503_and_keeps_open_ones(
        start_backend: StartBackend, service_name: ServiceName,
        proxy_for: ProxyFor) -> None:
    svc = service_name("limit")
    b = start_backend("only")
    proxy, _ = proxy_for(svc, [b], {"max_connections": 2})
    addr = proxy.listen(svc)

    async with await RawConnection.open(addr) as one, await RawConnection.open(addr) as two:
        assert (await one.request()).text == "only"
        assert (await two.request()).text == "only"
        async with await RawConnection.open(addr) as three:
            # The proxy answers at once, before any request: sending one could race its
            # close and turn the answer into a reset.
            resp = await three.read_response(timeout=5.0)
            print(f"third connection: {resp.status} {resp.text.strip()!r}")
            assert resp.status == 503
            assert svc in resp.text
            assert resp.closed or await three.wait_closed_by_peer(3.0)
        for conn in (one, two):  # the open ones are unaffected, still keep-alive
            resp = await conn.request("GET", "/")
            assert (resp.status, resp.text) == (200, "only")
            assert (resp.header("connection") or "").lower() != "close"
        rejected = metric(metrics_text(proxy), "sdproxy_rejected_connections_total",
                          upstream=svc)
        assert rejected == 1
    # Both closed: the listener frees their slots (bounded wait for it to notice).
    deadline = time.monotonic() + 3.0
    while True:
        status: int | None = None
        async with await RawConnection.open(addr) as again:
            try:  # a rejected one may be reset: it gets its 503 before the request is read
                status = (await again.request("GET", "/", timeout=3.0)).status
            except OSError:
                pass
        if status == 200:
            break
        assert time.monotonic() < deadline, "slots of closed connections never freed"
        await asyncio.sleep(0.05)


# -- g. panic rule: every breaker open ----------------------------------------------------
async def test_panic_rule_all_breakers_open_recovers_without_reset_timeout(
        start_backends: StartBackends, start_backend: StartBackend,
        service_name: ServiceName, proxy_for: ProxyFor) -> None:
    svc = service_name("panic")
    a, b = start_backends("a", "b")
    proxy, _ = proxy_for(svc, [a, b], {"breaker": {"failures": 1, "reset_timeout": "30s"}})
    addr = proxy.listen(svc)
    assert {(await fetch(addr)).text for _ in range(4)} == {"a", "b"}

    a.kill9()
    b.kill9()
    slowest = 0.0
    statuses: Counter[int] = Counter()
    for _ in range(5):
        t0 = time.monotonic()
        resp = await fetch(addr, timeout=5.0)
        slowest = max(slowest, time.monotonic() - t0)
        statuses[resp.status] += 1
        assert resp.status == 502, (resp.status, resp.text)
        assert svc in resp.text
    eps = proxy.endpoints(svc)
    panic = metric(metrics_text(proxy), "sdproxy_panic_picks_total", upstream=svc)
    print(f"both dead: {dict(statuses)}, slowest {slowest * 1000:.1f} ms; states "
          f"{[(ep['id'], ep['state'], ep['requests']) for ep in eps]}; panic picks {panic:g}")
    assert slowest < 0.5
    assert {ep["state"] for ep in eps} == {"open"}
    assert panic > 0

    start_backend("a2", port=a.port)
    t_up = time.monotonic()
    while True:
        resp = await fetch(addr, timeout=5.0)
        if resp.status == 200:
            break
        assert resp.status == 502, (resp.status, resp.text)
        assert time.monotonic() - t_up < 2.0, "no recovery within 2 s (reset_timeout 30s)"
        await asyncio.sleep(0.05)
    t_ok = time.monotonic()
    print(f"restart -> first 200 in {(t_ok - t_up) * 1000:.0f} ms "
          f"(body {resp.text!r}, reset_timeout 30s)")
    assert resp.text == "a2"
    for _ in range(5):  # keeps working: a2 serves, failing over from dead b if picked
        resp = await fetch(addr)
        assert (resp.status, resp.text) == (200, "a2")


# -- h. bytes after a complete response ------------------------------------------------------
@PARSERS
@pytest.mark.parametrize("trailer", ["junk", "response"])
async def test_bytes_after_a_response_spoil_only_that_connection(
        http_parser: str, trailer: str, service_name: ServiceName, proxy_for: ProxyFor,
        spawn: Spawn) -> None:
    """The response is delivered whole; the connection that carried more after it is never
    used again (each request gets a new one), and the proxy keeps serving."""
    svc = service_name("junk")
    backend = spawn(trailing_bytes(TRAILERS[trailer]), "trailing")
    proxy, _ = proxy_for(svc, [backend], {"http_parser": http_parser,
                                          "breaker": {"failures": 100}})
    addr = proxy.listen(svc)
    responses = [await fetch(addr, "GET", f"/?i={i}") for i in range(6)]
    print(f"parser={http_parser} trailer={trailer}: {[(r.status, r.text) for r in responses]}")
    assert all(r.status == 200 for r in responses)
    bodies = [r.text for r in responses]
    assert all(re.fullmatch(r"c\d+", b) for b in bodies), bodies
    assert len(set(bodies)) == len(bodies), f"a spoiled connection was reused: {bodies}"
