"""Profile sdproxy's HTTP hot path in one process: client -> proxy -> backend, keep-alive.

The backend is a minimal asyncio Protocol answering every request with a fixed 2-byte
response, so the profile shows the proxy's own cost per request. Usage:
    python bench/profile_http.py [REQUESTS] [CONNECTIONS] [--cprofile]
Prints requests/s of the whole loop (client and backend included) and, with --cprofile,
the functions with the most own time per request.
"""

from __future__ import annotations

import asyncio
import cProfile
import functools
import pstats
import sys
import time

import uvloop

from proxy.config import UpstreamConfig
from proxy.model import Address, CatalogAnswer, Endpoint
from proxy.protocols.http import HttpListener
from proxy.upstream.manager import UpstreamRuntime

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"


class Backend(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(RESPONSE * data.count(b"\r\n\r\n"))  # type: ignore[attr-defined]


class Client(asyncio.Protocol):
    def __init__(self, todo: int, done: asyncio.Future[None]) -> None:
        self.todo, self.done, self.buf = todo, done, b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(REQUEST)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\nok" in self.buf:
            self.buf = self.buf.split(b"\r\n\r\nok", 1)[1]
            self.todo -= 1
            if self.todo == 0:
                self.done.set_result(None)
                return
            self.transport.write(REQUEST)  # type: ignore[attr-defined]


async def main(requests: int, connections: int) -> float:
    loop = asyncio.get_running_loop()
    backend = await loop.create_server(Backend, "127.0.0.1", 0)
    bport = backend.sockets[0].getsockname()[1]
    cfg = UpstreamConfig(name="bench", listen=Address("127.0.0.1", 0))
    runtime = UpstreamRuntime(cfg)
    runtime.on_catalog_answer(CatalogAnswer((Endpoint(id="b", address="127.0.0.1", port=bport),)))
    listener = HttpListener(runtime, loop)
    server = await loop.create_server(listener.protocol_factory, "127.0.0.1", 0)
    pport = server.sockets[0].getsockname()[1]
    per = requests // connections
    futures = [loop.create_future() for _ in range(connections)]
    t0 = time.perf_counter()
    for fut in futures:
        await loop.create_connection(functools.partial(Client, per, fut), "127.0.0.1", pport)
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - t0
    listener.close_all()
    return per * connections / elapsed


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 20000
    c = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].isdigit() else 10
    if "--cprofile" in sys.argv:
        prof = cProfile.Profile()
        prof.enable()
        rate = uvloop.run(main(n, c))
        prof.disable()
        stats = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(25)
    else:
        rate = uvloop.run(main(n, c))
    print(f"{rate:,.0f} requests/s through the proxy (client, proxy and backend in one loop)")
