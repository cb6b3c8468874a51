"""End to end, HTTP mode: a real Consul dev agent, real demo backends, the real proxy.

Every test registers its own service (unique name) in the session's agent, starts its
backends and a proxy of its own, and reads behaviour off the wire: which backend answered
(the body is the backend's name), statuses, timing. Tests about the data path run once
per HTTP parser (`http_parser = "httptools" | "h11"`, SPEC "Names").

Clients here never retry: `support.http` opens one socket per `RawConnection`, and
`fetch` one fresh connection per request. (aiohttp's client retries an idempotent request
on a stale keep-alive connection, so it is used only for the big transfers.)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from support.consul import Registration, wait_passing
from support.http import RawConnection, Sample, fetch, paced_requests
from support.procs import Backend, ProxyProcess, routable_ids

from proxy.demo.backend import download_blocks, expected_download_sha256
from proxy.devconsul import ConsulAgent

pytestmark = pytest.mark.timeout(90)

PARSERS = pytest.mark.parametrize("http_parser", ["httptools", "h11"])
MiB = 1 << 20

StartBackends = Callable[..., list[Backend]]
StartBackend = Callable[..., Backend]
Register = Callable[..., Registration]
StartProxy = Callable[..., ProxyProcess]
ServiceName = Callable[[str], str]
ProxyFor = Callable[..., tuple[ProxyProcess, list[Registration]]]


# -- helpers ------------------------------------------------------------------------------
def bodies(samples: list[Sample]) -> Counter[str]:
    return Counter(s.body for s in samples if s.ok)


def failures(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if not s.ok]


def joined(value: str | list[str] | None) -> str:
    """A header value from the backend's /headers echo, repeated lines joined by ', '."""
    if value is None:
        return ""
    return ", ".join(value) if isinstance(value, list) else value


async def watch_pool(proxy: ProxyProcess, upstream: str, gone_id: str,
                     deadline: float) -> float | None:
    """Poll /upstreams (10 ms) until `gone_id` is no longer routable; its monotonic time."""
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(proxy.admin_url + "/upstreams") as resp:
                ups: list[dict[str, Any]] = await resp.json()
            for up in ups:
                if up["name"] == upstream and gone_id not in routable_ids(up["endpoints"]):
                    return time.monotonic()
            await asyncio.sleep(0.01)
    return None


# -- a. routing only to passing instances --------------------------------------------------
@PARSERS
async def test_only_passing_instances_receive_traffic(
        http_parser: str, consul: ConsulAgent, start_backends: StartBackends,
        register: Register, service_name: ServiceName, start_proxy: StartProxy) -> None:
    svc = service_name("web")
    a, b, c = start_backends("a", "b", "c")
    ra, rb = register(a, svc), register(b, svc)
    register(c, svc, status="critical")
    wait_passing(consul, svc, {ra.service_id, rb.service_id})
    proxy = start_proxy({svc: {"http_parser": http_parser}})
    proxy.wait_routable(svc, {ra.service_id, rb.service_id})

    seen: Counter[str] = Counter()
    for _ in range(60):
        resp = await fetch(proxy.listen(svc))
        assert resp.status == 200, resp
        seen[resp.text] += 1
    print(f"distribution: {dict(seen)}")
    assert seen["c"] == 0
    assert seen["a"] > 0 and seen["b"] > 0
    assert seen["a"] + seen["b"] == 60


# -- b. a check turning critical removes the instance at once -------------------------------
async def test_check_turning_critical_removes_instance_quickly(
        consul: ConsulAgent, start_backends: StartBackends, service_name: ServiceName,
        proxy_for: ProxyFor) -> None:
    svc = service_name("web")
    proxy, regs = proxy_for(svc, start_backends("a", "b", "c"))
    victim = regs[2]  # backend "c"

    load = asyncio.create_task(paced_requests(proxy.listen(svc), rate=200, duration=3.0))
    await asyncio.sleep(1.0)  # traffic reaches all three first
    t_fail = time.monotonic()
    pool = asyncio.create_task(watch_pool(proxy, svc, victim.service_id, t_fail + 2.0))
    await asyncio.to_thread(consul.check_fail, victim.check_id)
    samples = await load
    t_pool = await pool

    assert not failures(samples), failures(samples)[:5]
    served_c = [s for s in samples if s.body == "c"]
    assert any(s.end < t_fail for s in served_c), "c got no traffic before the check failed"
    last_c = max(s.end for s in served_c)
    delay_last = last_c - t_fail
    print(f"check_fail -> last response from c: {delay_last * 1000:.0f} ms; "
          f"-> pool change in /upstreams: "
          f"{'never' if t_pool is None else f'{(t_pool - t_fail) * 1000:.0f} ms'}; "
          f"distribution {dict(bodies(samples))}")
    assert t_pool is not None and t_pool - t_fail < 1.0
    assert delay_last < 1.0
    late = [s for s in samples if s.start > t_fail + 1.0]
    assert late and all(s.body != "c" for s in late)


# -- c. Node.Address fallback ----------------------------------------------------------------
async def test_empty_service_address_falls_back_to_node_address(
        consul: ConsulAgent, start_backend: StartBackend, register: Register,
        service_name: ServiceName, start_proxy: StartProxy) -> None:
    svc = service_name("web")
    b = start_backend("nodeaddr")
    reg = register(b, svc, address="")
    wait_passing(consul, svc, {reg.service_id})
    proxy = start_proxy({svc: {}})
    eps = proxy.wait_endpoints(svc, lambda eps: routable_ids(eps) == {reg.service_id})
    assert eps[0]["address"] == "127.0.0.1" and eps[0]["port"] == b.port
    for _ in range(5):
        resp = await fetch(proxy.listen(svc))
        assert (resp.status, resp.text) == (200, "nodeaddr")


# -- d. tag filter ---------------------------------------------------------------------------
async def test_tag_filter(consul: ConsulAgent, start_backends: StartBackends,
                          register: Register, service_name: ServiceName,
                          start_proxy: StartProxy) -> None:
    svc = service_name("web")
    blue, green, plain = start_backends("blue", "green", "plain")
    rblue = register(blue, svc, tags=["blue", "v1"])
    rgreen = register(green, svc, tags=["green"])
    rplain = register(plain, svc)
    wait_passing(consul, svc, {rblue.service_id, rgreen.service_id, rplain.service_id})
    proxy = start_proxy({svc: {"tags": ["blue"]}})
    proxy.wait_routable(svc, {rblue.service_id})
    seen = Counter([(await fetch(proxy.listen(svc))).text for _ in range(20)])
    assert seen == Counter({"blue": 20})


# -- e. kill -9 under load: the client sees nothing ------------------------------------------
@PARSERS
async def test_kill9_under_load_no_client_errors(
        http_parser: str, start_backends: StartBackends, service_name: ServiceName,
        proxy_for: ProxyFor) -> None:
    svc = service_name("web")
    # HTTP checks every 1s: Consul notices the dead instance late, the proxy must not wait.
    backends = start_backends("a", "b", "c")
    proxy, _ = proxy_for(svc, backends, {"http_parser": http_parser}, check="http")
    victim = backends[2]

    load = asyncio.create_task(paced_requests(proxy.listen(svc), rate=200, duration=4.0))
    await asyncio.sleep(2.0)
    t_kill = time.monotonic()
    victim.kill9()
    samples = await load

    bad = failures(samples)
    seen = bodies(samples)
    before = sum(1 for s in samples if s.body == "c" and s.end < t_kill)
    print(f"{len(samples)} requests, {len(bad)} errors, distribution {dict(seen)}, "
          f"c answered {before} before the kill; "
          f"p99 {sorted(s.end - s.start for s in samples)[int(len(samples) * .99)] * 1000:.1f} ms")
    assert len(samples) >= 700
    assert not bad, [(s.status, s.error, s.body[:80]) for s in bad[:10]]
    assert before > 0
    assert not [s for s in samples if s.body == "c" and s.start > t_kill + 0.05]


# -- f. no passing instance ------------------------------------------------------------------
@PARSERS
async def test_no_passing_instance_gives_503_naming_upstream(
        http_parser: str, consul: ConsulAgent, start_backend: StartBackend,
        register: Register, service_name: ServiceName, start_proxy: StartProxy) -> None:
    svc = service_name("down")
    b = start_backend("sick")
    register(b, svc, status="critical")
    wait_passing(consul, svc, set())
    proxy = start_proxy({svc: {"http_parser": http_parser}})
    assert routable_ids(proxy.endpoints(svc)) == set()
    resp = await fetch(proxy.listen(svc))
    assert resp.status == 503
    assert svc in resp.text


# -- g. big bodies stream both ways in bounded memory ----------------------------------------
@PARSERS
async def test_100mib_each_way_intact_and_memory_bounded(
        http_parser: str, start_backend: StartBackend, service_name: ServiceName,
        proxy_for: ProxyFor) -> None:
    size = 100 * MiB
    rss_limit = 150 * MiB
    svc = service_name("bulk")
    b = start_backend("bulk")
    proxy, _ = proxy_for(svc, [b], {"http_parser": http_parser})
    host, port = proxy.listen(svc)
    base = f"http://{host}:{port}"

    peak = proxy.rss_bytes()
    start_rss = peak
    sampling = True

    async def sample_rss() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, proxy.rss_bytes())
            await asyncio.sleep(0.05)

    async def upload_body(n: int, seed: str) -> AsyncIterator[bytes]:
        for block in download_blocks(n, seed):
            yield block

    sampler = asyncio.create_task(sample_rss())
    timeout = aiohttp.ClientTimeout(total=120)
    t0 = time.monotonic()
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            # upload, chunked (from a generator)
            async with session.post(base + "/upload", data=upload_body(size, "up")) as resp:
                assert resp.status == 200
                got = await resp.json()
            assert got == {"sha256": expected_download_sha256(size, "up"), "bytes": size,
                           "name": "bulk"}
            t_up = time.monotonic()
            # download, Content-Length
            digest, total = hashlib.sha256(), 0
            async with session.get(base + f"/download?bytes={size}&seed=7") as resp:
                assert resp.status == 200
                assert resp.headers.get("Content-Length") == str(size)
                async for chunk in resp.content.iter_chunked(256 * 1024):
                    digest.update(chunk)
                    total += len(chunk)
            assert total == size
            assert digest.hexdigest() == expected_download_sha256(size, 7)
            t_down = time.monotonic()
            # the other framings, smaller: upload with Content-Length, download chunked
            small = 8 * MiB + 3
            async with session.put(base + "/upload", data=upload_body(small, "cl"),
                                   headers={"Content-Length": str(small)}) as resp:
                got = await resp.json()
            assert got["sha256"] == expected_download_sha256(small, "cl")
            async with session.get(base + f"/download?bytes={small}&seed=9&chunked=1") as resp:
                data = await resp.read()
            assert hashlib.sha256(data).hexdigest() == expected_download_sha256(small, 9)
    finally:
        sampling = False
        await sampler
    print(f"parser={http_parser} upload {size / MiB / (t_up - t0):.0f} MiB/s, "
          f"download {size / MiB / (t_down - t_up):.0f} MiB/s; proxy RSS start "
          f"{start_rss / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB")
    assert peak < rss_limit


# -- h. malformed requests -------------------------------------------------------------------
MALFORMED = {
    "content-length-and-transfer-encoding":
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
    "invalid-content-length": b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "conflicting-content-lengths":
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    "garbage-request-line": b"THIS IS NOT HTTP\r\n\r\n",
    "header-without-colon": b"GET / HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n",
}


@PARSERS
async def test_malformed_requests_get_400_and_proxy_keeps_serving(
        http_parser: str, start_backend: StartBackend, service_name: ServiceName,
        proxy_for: ProxyFor) -> None:
    svc = service_name("web")
    b = start_backend("fine")
    proxy, _ = proxy_for(svc, [b], {"http_parser": http_parser})
    addr = proxy.listen(svc)

    async with await RawConnection.open(addr) as bystander:
        assert (await bystander.request("GET", "/")).status == 200

        async def malformed(name: str, raw: bytes) -> None:
            async with await RawConnection.open(addr) as conn:
                await conn.send(raw)
                resp = await conn.read_response(timeout=5.0)
                assert resp.status == 400, (name, resp)
                assert svc in resp.text, (name, resp.text)

        async def normal() -> None:
            for _ in range(10):
                resp = await fetch(addr)
                assert (resp.status, resp.text) == (200, "fine")

        await asyncio.gather(*(malformed(n, r) for n, r in MALFORMED.items()), normal())
        # the connection opened before is still served, and so is a new one
        assert (await bystander.request("GET", "/")).text == "fine"
    assert (await fetch(addr)).status == 200


# -- i. keep-alive, forwarding headers, HTTP/1.0 ---------------------------------------------
@PARSERS
async def test_keepalive_and_forwarding_headers(
        http_parser: str, start_backend: StartBackend, service_name: ServiceName,
        proxy_for: ProxyFor) -> None:
    svc = service_name("web")
    b = start_backend("echo")
    proxy, _ = proxy_for(svc, [b], {"http_parser": http_parser})
    addr = proxy.listen(svc)

    peers = set()
    async with await RawConnection.open(addr) as conn:
        for i in range(5):
            resp = await conn.request("GET", f"/headers?i={i}", headers=[
                ("Host", "example.test:8080"),
                ("X-Forwarded-For", "10.1.2.3"),
                ("Connection", "keep-alive, X-Foo"),
                ("X-Foo", "must-not-pass"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Connection", "keep-alive"),
                ("X-End-To-End", "yes"),
            ])
            assert resp.status == 200, resp
            assert (resp.header("connection") or "").lower() != "close"
            seen = json.loads(resp.body)
            assert seen["_path"] == f"/headers?i={i}"
            assert seen["host"] == "example.test:8080"
            xff = [p.strip() for p in joined(seen.get("x-forwarded-for")).split(",")]
            assert xff[0] == "10.1.2.3" and "127.0.0.1" in xff[1:], xff
            assert joined(seen.get("x-forwarded-proto")) == "http"
            assert seen.get("x-end-to-end") == "yes"
            for hop in ("x-foo", "keep-alive", "proxy-connection"):
                assert hop not in seen, (hop, seen)
            assert "x-foo" not in joined(seen.get("connection")).lower()
            peers.add(seen["_peer"])
    # SPEC: sequential requests on one client connection reuse one upstream connection
    assert len(peers) == 1, peers

    # HTTP/1.0: served, then the proxy closes the connection
    async with await RawConnection.open(addr) as old:
        await old.send(b"GET /headers HTTP/1.0\r\nHost: example.test\r\n\r\n")
        resp = await old.read_response(timeout=5.0)
        assert resp.status == 200
        assert resp.header("transfer-encoding") is None
        assert json.loads(resp.body)["host"] == "example.test"
        assert resp.closed or await old.wait_closed_by_peer(3.0)


# -- j. header limits: size and time ---------------------------------------------------------
@PARSERS
async def test_header_too_large_431_and_header_timeout_408(
        http_parser: str, start_backend: StartBackend, service_name: ServiceName,
        proxy_for: ProxyFor) -> None:
    svc = service_name("web")
    b = start_backend("limits")
    proxy, _ = proxy_for(svc, [b], {"http_parser": http_parser, "max_header_size": 8192,
                                    "header_timeout": "1s"})
    addr = proxy.listen(svc)

    async with await RawConnection.open(addr) as conn:
        await conn.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 16384 + b"\r\n\r\n")
        resp = await conn.read_response(timeout=5.0)
        assert resp.status == 431, resp
        assert svc in resp.text

    # a head under the limit is fine
    ok = await fetch(addr, headers=[("X-Medium", "m" * 4000)])
    assert (ok.status, ok.text) == (200, "limits")

    t0 = time.monotonic()
    async with await RawConnection.open(addr) as slow:
        await slow.send(b"GET / HTTP/1.1\r\nHost: x\r\n")  # half a head, then nothing
        resp = await slow.read_response(timeout=5.0)
        elapsed = time.monotonic() - t0
        print(f"408 after {elapsed * 1000:.0f} ms (header_timeout 1s)")
        assert resp.status == 408, resp
        assert svc in resp.text
        assert 0.8 <= elapsed <= 2.5
        assert resp.closed or await slow.wait_closed_by_peer(2.0)
    assert (await fetch(addr)).status == 200
