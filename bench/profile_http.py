"""Profile sdproxy's HTTP hot path in one process: client -> proxy -> backend, keep-alive.

The backend is a minimal asyncio Protocol answering every request with a fixed response,
so the profile shows the proxy's own cost per request. Usage:
    python bench/profile_http.py [REQUESTS] [CONNECTIONS] [--cprofile | --direct]
    python bench/profile_http.py --instructions
Add `--access-log logfmt` (or `json`) to any of these to run with the access log on,
written to a temporary file. Add `--routes N` to send through a routed listener
([[listeners]]) whose table holds N routes (half by host, half by path prefix, over N
upstreams); the request then names the route's host and a path under its prefix.
`--routes 0` sends that same request through a plain listener: the difference between
`--routes 0` and `--routes 100` is the cost of routing.
Prints requests/s of the whole loop (client and backend included); with --cprofile, the
functions with the most own time; --direct leaves the proxy out (client -> backend).
--instructions counts the CPU instructions the proxy spends per request under valgrind
(callgrind): runs of 2000 and 6000 requests, with and without the proxy, differenced, so
start-up and the client and backend cancel out. Unlike requests/s on a shared machine it
gives the same figure run after run, so it can judge a change of a few per cent.
"""

from __future__ import annotations

import asyncio
import cProfile
import functools
import os
import pstats
import re
import subprocess
import sys
import tempfile
import time

import uvloop

from loadtest.apt import ensure_tools
from proxy.accesslog import AccessLog
from proxy.config import UpstreamConfig
from proxy.model import Address, CatalogAnswer, Endpoint
from proxy.protocols.http import HttpListener
from proxy.routing import Route
from proxy.upstream.manager import UpstreamRuntime

# What the throughput load test's wrk sends and its nginx instances answer.
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 02 Dec 2026 03:40:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
# With --routes: a request the route of host bench.example, prefix /api/, takes.
ROUTED_REQUEST = b"GET /api/items HTTP/1.1\r\nHost: bench.example:8080\r\n\r\n"


class Backend(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(RESPONSE * data.count(b"\r\n\r\n"))  # type: ignore[attr-defined]


class Client(asyncio.Protocol):
    def __init__(self, todo: int, done: asyncio.Future[None], request: bytes = REQUEST) -> None:
        self.todo, self.done, self.buf = todo, done, b""
        self.request = request

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\nok" in self.buf:
            self.buf = self.buf.split(b"\r\n\r\nok", 1)[1]
            self.todo -= 1
            if self.todo == 0:
                self.done.set_result(None)
                return
            self.transport.write(self.request)  # type: ignore[attr-defined]


def routed_listener(bench: UpstreamRuntime, routes: int,
                    loop: asyncio.AbstractEventLoop) -> HttpListener:
    """A routed listener with `routes` routes, the last of them to `bench`: half by host
    (svc-I.example, /api/vK/), half by prefix (/svc-I/), each to an upstream of its own."""
    own = UpstreamRuntime(UpstreamConfig(name="listener bench", listen=None))
    listener = HttpListener(own, loop)
    table: list[tuple[Route, UpstreamRuntime]] = []
    for i in range(routes - 1):
        other = UpstreamRuntime(UpstreamConfig(name=f"svc-{i}", listen=None))
        if i % 2:
            table.append((Route("", f"/svc-{i}/", other.name), other))
        else:
            table.append((Route(f"svc-{i}.example", f"/api/v{i % 3}/", other.name), other))
    table.append((Route("bench.example", "/api/", bench.name), bench))
    listener.set_routes(table)
    return listener


async def main(requests: int, connections: int, direct: bool = False,
               access_format: str | None = None, routes: int | None = None) -> float:
    loop = asyncio.get_running_loop()
    backend = await loop.create_server(Backend, "127.0.0.1", 0)
    bport = backend.sockets[0].getsockname()[1]
    request = REQUEST if routes is None else ROUTED_REQUEST
    if direct:
        return await _load(loop, bport, requests, connections, request)
    cfg = UpstreamConfig(name="bench", listen=Address("127.0.0.1", 0))
    runtime = UpstreamRuntime(cfg)
    runtime.on_catalog_answer(CatalogAnswer((Endpoint(id="b", address="127.0.0.1", port=bport),)))
    listener = (HttpListener(runtime, loop) if not routes
                else routed_listener(runtime, routes, loop))
    with tempfile.TemporaryDirectory() as tmp:
        if access_format is not None:
            listener.access = AccessLog(os.path.join(tmp, "access.log"), access_format)
        server = await loop.create_server(listener.protocol_factory, "127.0.0.1", 0)
        pport = server.sockets[0].getsockname()[1]
        rate = await _load(loop, pport, requests, connections, request)
        listener.close_all()
        if listener.access is not None:
            listener.access.close(timeout=60)  # every line written: its cost is counted
            assert listener.access.written == requests // connections * connections
    return rate


async def _load(loop: asyncio.AbstractEventLoop, port: int, requests: int,
                connections: int, request: bytes = REQUEST) -> float:
    per = requests // connections
    futures = [loop.create_future() for _ in range(connections)]
    t0 = time.perf_counter()
    for fut in futures:
        await loop.create_connection(functools.partial(Client, per, fut, request),
                                     "127.0.0.1", port)
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - t0
    return per * connections / elapsed


def _instructions(requests: int, direct: bool, access_format: str | None = None,
                  routes: int | None = None) -> int:
    """Instructions of one run of this script under callgrind."""
    valgrind = ensure_tools(["valgrind"])["valgrind"]  # apt-installed when missing
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        argv = [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                __file__, str(requests), "50", *(["--direct"] if direct else []),
                *(["--access-log", access_format] if access_format else []),
                *(["--routes", str(routes)] if routes is not None else [])]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800,
                              check=True)  # a shared machine under load is slow under valgrind
    match = re.search(r"Collected : (\d+)", proc.stderr)
    if not match:
        raise SystemExit(f"no instruction count from valgrind:\n{proc.stderr[-2000:]}")
    return int(match.group(1))


def instructions_per_request(access_format: str | None = None,
                             routes: int | None = None) -> float:
    small, large = 2000, 6000
    proxied = (_instructions(large, False, access_format, routes)
               - _instructions(small, False, access_format, routes))
    direct = _instructions(large, True, routes=routes) - _instructions(small, True, routes=routes)
    return (proxied - direct) / (large - small)


def _access_format() -> str | None:
    if "--access-log" not in sys.argv:
        return None
    at = sys.argv.index("--access-log") + 1
    if at >= len(sys.argv) or sys.argv[at] not in ("logfmt", "json"):
        raise SystemExit("--access-log takes logfmt or json")
    return sys.argv[at]


def _routes() -> int | None:
    if "--routes" not in sys.argv:
        return None
    at = sys.argv.index("--routes") + 1
    if at >= len(sys.argv) or not sys.argv[at].isdigit():
        raise SystemExit("--routes takes a number of routes (0: the same request, no table)")
    return int(sys.argv[at])


if __name__ == "__main__":
    access = _access_format()
    routes = _routes()
    if "--instructions" in sys.argv:
        with_log = f", access log on ({access})" if access else ""
        with_routes = "" if routes is None else f", {routes} routes"
        print(f"{instructions_per_request(access, routes):,.0f} instructions per request in "
              f"the proxy (callgrind; client and backend subtracted{with_log}{with_routes})")
        raise SystemExit(0)
    n = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 20000
    c = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].isdigit() else 10
    if "--cprofile" in sys.argv:
        prof = cProfile.Profile()
        prof.enable()
        rate = uvloop.run(main(n, c, access_format=access, routes=routes))
        prof.disable()
        stats = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(25)
    else:
        rate = uvloop.run(main(n, c, direct="--direct" in sys.argv, access_format=access,
                               routes=routes))
    print(f"{rate:,.0f} requests/s (client, proxy and backend in one loop)")
