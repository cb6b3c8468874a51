"""What clients got, counted exactly (SPEC "Admin (additions)": responses by upstream and
the status the client got, sdproxy's own errors included; bytes in/out per upstream):
raw sockets on both ends of a real proxy process, so every byte sent and received is
known, and /metrics must agree to the byte."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from support.procs import Backend, ProxyProcess

from proxy.devconsul import free_port

READ_TIMEOUT = 10.0


def static(*ports: int, **keys: Any) -> dict[str, Any]:
    return {"discovery": "static", "endpoints": [f"127.0.0.1:{p}" for p in ports], **keys}


async def exchange(addr: tuple[str, int], request: bytes) -> bytes:
    """Send `request` on a fresh connection and return every byte until the proxy closes."""
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), READ_TIMEOUT)
    finally:
        writer.close()


def metrics(proxy: ProxyProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = proxy.admin_get("/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body.decode()) for s in f.samples}


def counted(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
            **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_http_statuses_and_bytes_as_the_clients_saw_them(
        start_backend: Callable[..., Backend],
        start_proxy: Callable[..., ProxyProcess]) -> None:
    backend = start_backend("w")
    closed = free_port()  # nothing listens: every attempt fails to connect
    proxy = start_proxy({"web": static(backend.port, retries=0),
                         "dead": static(closed, retries=0)})
    web, dead = proxy.listen("web"), proxy.listen("dead")
    sent: dict[str, int] = {"web": 0, "dead": 0}
    got: dict[str, int] = {"web": 0, "dead": 0}
    statuses: dict[str, list[int]] = {"web": [], "dead": []}
    for name, addr, request in (
            ("web", web, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
            ("web", web, b"GET /status/404 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"),
            ("web", web, b"GET /download?bytes=300000 HTTP/1.0\r\n\r\n"),
            ("web", web, b"NOT HTTP AT ALL\r\n\r\n"),  # sdproxy's own 400
            ("dead", dead, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")):
        answer = await exchange(addr, request)
        sent[name] += len(request)
        got[name] += len(answer)
        statuses[name].append(int(answer.split(b" ", 2)[1]))
    assert statuses == {"web": [200, 404, 200, 400], "dead": [502]}
    found = await asyncio.to_thread(metrics, proxy)
    for name in ("web", "dead"):
        assert counted(found, "sdproxy_bytes_in_total", upstream=name) == sent[name]
        assert counted(found, "sdproxy_bytes_out_total", upstream=name) == got[name]
    assert counted(found, "sdproxy_responses_total", upstream="web", code="200") == 2
    assert counted(found, "sdproxy_responses_total", upstream="web", code="404") == 1
    assert counted(found, "sdproxy_responses_total", upstream="web", code="400") == 1
    assert counted(found, "sdproxy_responses_total", upstream="dead", code="502") == 1
    # An instance's counts stay what they were: only responses it gave.
    assert counted(found, "sdproxy_requests_total", upstream="web",
                   endpoint=f"127.0.0.1:{backend.port}", code="200") == 2
    up = proxy.upstream("dead")
    assert up["responses"] == {"502": 1} and up["bytes_out"] == got["dead"]


async def test_tcp_bytes_relayed_and_spliced_are_counted_to_the_byte(
        start_backend: Callable[..., Backend],
        start_proxy: Callable[..., ProxyProcess]) -> None:
    backend = start_backend("w")
    proxy = start_proxy({"raw": static(backend.port, mode="tcp")})
    addr = proxy.listen("raw")
    sent = got = 0
    # A small exchange stays relayed; 4 MB is a bulk transfer that splice(2) takes over.
    for request in (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                    (b"GET /download?bytes=4000000 HTTP/1.1\r\nHost: a\r\n"
                    b"Connection: close\r\n\r\n")):
        answer = await exchange(addr, request)
        sent += len(request)
        got += len(answer)
    assert got > 4_000_000
    found = await asyncio.to_thread(metrics, proxy)
    assert counted(found, "sdproxy_bytes_in_total", upstream="raw") == sent
    assert counted(found, "sdproxy_bytes_out_total", upstream="raw") == got
    assert not any(name == "sdproxy_responses_total" and dict(labels)["upstream"] == "raw"
                   for name, labels in found)  # no status in tcp mode


async def test_sdproxys_own_502_is_counted_by_code_across_workers(
        start_proxy: Callable[..., ProxyProcess]) -> None:
    """Under --workers 2, whichever worker answers the scrape counts every worker's 502s
    (a sibling's numbers are up to a second old, hence the wait for the first match)."""
    closed = free_port()  # nothing listens there: every request gets sdproxy's own 502
    proxy = start_proxy({"dead": static(closed, retries=0)}, workers=2)
    n = 30
    answers = [await exchange(proxy.listen("dead"),
                              b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
               for _ in range(n)]
    assert all(a.startswith(b"HTTP/1.1 502 ") for a in answers)

    def bad_gateways() -> float:
        return counted(metrics(proxy), "sdproxy_responses_total", upstream="dead", code="502")

    deadline = asyncio.get_running_loop().time() + 5
    while await asyncio.to_thread(bad_gateways) != n:
        assert asyncio.get_running_loop().time() < deadline, "502s not all counted in 5 s"
        await asyncio.sleep(0.05)
    for _ in range(4):  # whichever worker answers
        assert await asyncio.to_thread(bad_gateways) == n
