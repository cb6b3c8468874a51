"""What TLS costs sdproxy per request: profile_http.py's loop, plain and over TLS.

    python bench/https_upstream.py [REQUESTS] [CONNECTIONS] [--rounds N]

One process (uvloop): client -> sdproxy's HTTP listener -> a minimal backend, keep-alive,
as bench/profile_http.py runs it. Three cases, each run `--rounds` times, interleaved so
that the machine's other tenants weigh on all alike; the median of each is printed:
- plain: http to the proxy, http to the backend;
- upstream TLS: the backend serves HTTPS and the proxy speaks it (`[upstreams.tls]`,
  verified against a CA made here, the pooled connections reused);
- both: the client speaks TLS to the proxy too (`[upstreams.listen_tls]`).
The client and the backend do their share of the TLS work in the same loop, so the
figures compare whole loops, not the proxy alone.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_http import Backend, Client
from support.tls import TestCA

from proxy.config import UpstreamConfig, UpstreamTlsConfig
from proxy.model import Address, CatalogAnswer, Endpoint
from proxy.protocols.http import HttpListener
from proxy.tls import ORIGINATIONS, server_context
from proxy.upstream.manager import UpstreamRuntime


async def run(requests: int, connections: int, pem: Path, upstream_tls: bool,
              listen_tls: bool) -> float:
    loop = asyncio.get_running_loop()
    cert, key, ca = str(pem / "bench.pem"), str(pem / "bench-key.pem"), str(pem / "ca.pem")
    serving = server_context(cert, key)
    backend = await loop.create_server(Backend, "127.0.0.1", 0,
                                       ssl=serving if upstream_tls else None)
    bport = backend.sockets[0].getsockname()[1]
    tls = UpstreamTlsConfig(upstream="bench", server_name="127.0.0.1", ca_file=ca)
    cfg = UpstreamConfig(name="bench", listen=Address("127.0.0.1", 0),
                         tls=tls if upstream_tls else None)
    if upstream_tls:
        ORIGINATIONS.prepare(tls)
    runtime = UpstreamRuntime(cfg)
    runtime.on_catalog_answer(CatalogAnswer((Endpoint(id="b", address="127.0.0.1",
                                                      port=bport),)))
    listener = HttpListener(runtime, loop)
    server = await loop.create_server(listener.protocol_factory, "127.0.0.1", 0,
                                      ssl=serving if listen_tls else None)
    pport = server.sockets[0].getsockname()[1]
    client_tls = ssl.create_default_context(cafile=ca) if listen_tls else None
    per = requests // connections
    futures = [loop.create_future() for _ in range(connections)]
    started = time.perf_counter()
    for fut in futures:
        await loop.create_connection(functools.partial(Client, per, fut), "127.0.0.1", pport,
                                     ssl=client_tls)
    await asyncio.gather(*futures)
    rate = per * connections / (time.perf_counter() - started)
    listener.close_all()
    server.close()
    backend.close()
    return rate


def main() -> None:
    args = [a for a in sys.argv[1:] if a.isdigit()]
    requests = int(args[0]) if args else 20000
    connections = int(args[1]) if len(args) > 1 else 10
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 5
    cases = {"plain": (False, False), "upstream TLS": (True, False), "both TLS": (True, True)}
    rates: dict[str, list[float]] = {name: [] for name in cases}
    with tempfile.TemporaryDirectory() as tmp:
        ca = TestCA(Path(tmp))
        ca.issue("bench", ["127.0.0.1"])
        for _ in range(rounds):
            for name, (upstream_tls, listen_tls) in cases.items():
                rates[name].append(uvloop.run(run(requests, connections, Path(tmp),
                                                  upstream_tls, listen_tls)))
    plain = statistics.median(rates["plain"])
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:>13}: {median:8,.0f} requests/s (median of {rounds}; "
              f"{median / plain:.2f} of plain)")


if __name__ == "__main__":
    main()
