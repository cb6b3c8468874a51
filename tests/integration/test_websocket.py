"""End to end, HTTP mode: `Upgrade` (WebSocket) through the proxy, with both parsers.

SPEC "HTTP mode": `Upgrade` switches the connection to a byte tunnel once the instance
answers 101. An instance that declines (answers anything else) gets an ordinary response
relayed, and the client connection is closed after it: bytes the client sent after the
Upgrade request belong to a protocol that never started.

The demo backend's WebSocket echo is aiohttp's, which refuses messages over 4 MiB
(aiohttp's default `max_msg_size`); the 5 MiB message goes to a test-owned echo server
without that limit, so the test measures the proxy's tunnel, not the backend's cap.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable

import aiohttp
import pytest
from support.consul import Registration
from support.http import RawConnection, fetch
from support.procs import Backend, ProxyProcess

pytestmark = pytest.mark.timeout(30)

PARSERS = pytest.mark.parametrize("http_parser", ["httptools", "h11"])
MiB = 1 << 20

StartBackend = Callable[..., Backend]
ProxyFor = Callable[..., tuple[ProxyProcess, list[Registration]]]
ServiceName = Callable[[str], str]
Spawn = Callable[[str, str], Backend]

# A WebSocket echo (`/ws`, no message size limit) that answers anything else with 200
# and body `wsbig`.
BIG_ECHO = r"""
import asyncio
from aiohttp import WSMsgType, web

async def echo(request):
    ws = web.WebSocketResponse(max_msg_size=0)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws

async def other(request):
    await request.read()
    return web.Response(text="wsbig")

async def main():
    app = web.Application()
    app.router.add_get("/ws", echo)
    app.router.add_route("*", "/{tail:.*}", other)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(f"event=backend_listening name=wsbig port={runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def base_url(proxy: ProxyProcess, svc: str) -> str:
    host, port = proxy.listen(svc)
    return f"http://{host}:{port}"


async def echo(ws: aiohttp.ClientWebSocketResponse, data: str | bytes) -> str | bytes:
    if isinstance(data, str):
        await ws.send_str(data)
    else:
        await ws.send_bytes(data)
    msg = await asyncio.wait_for(ws.receive(), 10.0)
    want = aiohttp.WSMsgType.TEXT if isinstance(data, str) else aiohttp.WSMsgType.BINARY
    assert msg.type == want, (msg.type, msg.data)
    got: str | bytes = msg.data
    return got


async def wait_no_connections(proxy: ProxyProcess, svc: str, timeout: float = 3.0) -> None:
    """The listener counts no open client connection (the tunnel's was released)."""
    deadline = time.monotonic() + timeout
    pattern = re.compile(rf'^sdproxy_connections\{{upstream="{re.escape(svc)}"\}} (\S+)$',
                         re.MULTILINE)
    while True:
        _, body = await asyncio.to_thread(proxy.admin_get, "/metrics")
        m = pattern.search(body.decode())
        if m and float(m.group(1)) == 0:
            return
        assert time.monotonic() < deadline, f"connections still counted: {m and m.group(0)}"
        await asyncio.sleep(0.05)


@PARSERS
async def test_websocket_echo_text_and_5mib_binary(
        http_parser: str, service_name: ServiceName, proxy_for: ProxyFor,
        spawn: Spawn) -> None:
    svc = service_name("ws")
    proxy, _ = proxy_for(svc, [spawn(BIG_ECHO, "wsbig")], {"http_parser": http_parser})
    base = base_url(proxy, svc)
    big = random.Random(5).randbytes(5 * MiB)

    t0 = time.monotonic()
    async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session,
                session.ws_connect(base + "/ws", max_msg_size=0) as ws):
        assert await echo(ws, "hello") == "hello"
        assert await echo(ws, "grüße ✓ " * 100) == "grüße ✓ " * 100
        t1 = time.monotonic()
        assert await echo(ws, big) == big
        t2 = time.monotonic()
        assert await echo(ws, "after") == "after"
        await ws.close()
    print(f"parser={http_parser}: 5 MiB echoed in {(t2 - t1) * 1000:.0f} ms "
          f"(session {(time.monotonic() - t0) * 1000:.0f} ms)")

    resp = await fetch(proxy.listen(svc))  # a normal request on a new connection
    assert (resp.status, resp.text) == (200, "wsbig")
    await wait_no_connections(proxy, svc)


@PARSERS
async def test_demo_backend_websocket_and_declined_upgrade(
        http_parser: str, start_backend: StartBackend, service_name: ServiceName,
        proxy_for: ProxyFor) -> None:
    svc = service_name("ws")
    proxy, _ = proxy_for(svc, [start_backend("demo")], {"http_parser": http_parser})
    base = base_url(proxy, svc)
    addr = proxy.listen(svc)
    blob = random.Random(1).randbytes(1 * MiB)

    async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session,
                session.ws_connect(base + "/ws") as ws):
        for text in ("ping", "x" * 70000):
            assert await echo(ws, text) == text
        assert await echo(ws, blob) == blob
        await ws.close()

    # An upgrade the instance declines: its 200 is relayed, then the connection closes;
    # the bytes sent after the request (a WebSocket frame) are never read as HTTP.
    async with await RawConnection.open(addr) as conn:
        await conn.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                        b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n"
                        b"\x81\x05hello")
        resp = await conn.read_response(timeout=5.0)
        print(f"parser={http_parser}: declined upgrade -> {resp.status} {resp.text!r} "
              f"connection={resp.header('connection')!r}")
        assert (resp.status, resp.text) == (200, "demo")
        assert resp.closed or await conn.wait_closed_by_peer(3.0)

    resp = await fetch(addr)
    assert (resp.status, resp.text) == (200, "demo")
    await wait_no_connections(proxy, svc)
