"""One process serving many backend instances, one port each, for load tests that need
dozens of instances (`routes`: 50 services of 2-3 instances) without one Python process
(30+ MiB) per instance.

`python -m loadtest.portsbackend --name NAME [--name NAME ...]` binds one loopback port
per name (kernel-chosen), serves them all from one aiohttp app and prints exactly one
line once every port accepts connections:
`event=backends_listening pid=PID ports=NAME:PORT,NAME:PORT,...`.
Every port answers like `proxy.demo.backend` does for the paths the load tests use:
`GET /health` -> 200 `ok`; anything else -> 200 with the port's NAME as the body; every
response carries `X-Backend: NAME`. kill -9 of the process is the fault "every instance
it serves dies at once". SIGTERM/SIGINT stop it (exit 0).

Knows nothing of Consul or the proxy; `parse_ports` reads its one line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys

from aiohttp import web

READY_EVENT = "event=backends_listening"


def parse_ports(line: str) -> dict[str, int]:
    """{name: port} from the `event=backends_listening` line."""
    for field in line.split():
        key, _, value = field.partition("=")
        if key == "ports":
            return {name: int(port) for name, _, port in
                    (pair.rpartition(":") for pair in value.split(",") if pair)}
    raise ValueError(f"no ports= in {line!r}")


def build_app(names_by_port: dict[int, str]) -> web.Application:
    async def answer(request: web.Request) -> web.StreamResponse:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        name = names_by_port.get(sockname[1] if sockname else -1, "?")
        body = "ok" if request.path == "/health" else name
        return web.Response(text=body, headers={"X-Backend": name})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def serve(names: list[str], host: str) -> None:
    sockets: dict[str, socket.socket] = {}
    for name in names:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        sockets[name] = sock
    names_by_port = {sock.getsockname()[1]: name for name, sock in sockets.items()}
    runner = web.AppRunner(build_app(names_by_port), access_log=None, handle_signals=False)
    await runner.setup()
    for sock in sockets.values():
        await web.SockSite(runner, sock, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ports = ",".join(f"{name}:{sock.getsockname()[1]}" for name, sock in sockets.items())
    print(f"{READY_EVENT} pid={os.getpid()} ports={ports}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.portsbackend")
    parser.add_argument("--name", action="append", required=True,
                        help="one instance (one port) per --name")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.name, args.host))
    return 0


if __name__ == "__main__":
    sys.exit(main())
