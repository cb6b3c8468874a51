"""A broken HTTP instance for the abuse scenario: healthy to the catalog, broken to traffic.

`python -m loadtest.brokenbackend --port 0 --name NAME` prints the demo backend's line,
`event=backend_listening name=NAME port=N`, once it accepts connections. Per connection
it reads one request head and then:
- `GET /health`: 200 `ok`, kept alive for the next one (Consul's check passes, so the
  catalog keeps vouching for it: the case a proxy must survive on its own);
- a `/download` request: reset mid-body (a head promising 1 MiB, 32 KiB of it, then RST).
  The head has reached the client by then, so no proxy can hide this one: only a client
  that asks for a large body gets it, never the measured client's small GETs;
- anything else, each mode in turn:
  - `endless_head`: `HTTP/1.1 200 OK` and one header line that never ends, as fast as the
    peer reads, until it closes (bounded by MAX_ENDLESS_BYTES and MAX_CONNECTION_SECONDS);
  - `garbage`: bytes that are no HTTP at all, then close;
  - `extra`: a complete, valid 200 (body NAME) followed at once by a second, unrequested
    response (body SMUGGLED_BODY), and the connection kept open: a proxy that pooled it
    would hand the smuggled response to the next client.
On SIGTERM or SIGINT it prints `event=broken_tally health=N endless_head=N garbage=N
extra=N reset=N` and exits 0. It knows nothing of the proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import socket
import struct
import sys
from collections import Counter

from loadtest.load import run_async

SMUGGLED_BODY = b"SMUGGLED"  # what a client that got bytes meant for nobody reads
MODES = ("endless_head", "garbage", "extra")
MAX_HEAD = 65536  # bytes of a request head it reads
HEAD_TIMEOUT = 10.0  # seconds for a request head to arrive
MAX_CONNECTION_SECONDS = 60.0  # no connection lives longer, whatever the peer does
MAX_ENDLESS_BYTES = 256 << 20  # an endless head stops here even if the peer reads on
ENDLESS_CHUNK = b"a" * 16384
RESET_PROMISED = 1 << 20  # Content-Length of a reset-mid-body answer
RESET_SENT = 32768  # bytes of that body sent before the RST
GARBAGE = bytes(range(256)) * 16  # 4 KiB with NUL, CR, LF and high bytes in every order


def extra_answer(name: str) -> bytes:
    """A complete 200 followed by a response nobody asked for."""
    body = name.encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Backend: %s\r\n\r\n%s"
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Smuggled: 1\r\n\r\n%s"
            % (len(body), body, body, len(SMUGGLED_BODY), SMUGGLED_BODY))


class BrokenBackend:
    """The connection handler and its tally."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tally: Counter[str] = Counter({mode: 0 for mode in ("health", *MODES, "reset")})
        self._modes = itertools.cycle(MODES)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(MAX_CONNECTION_SECONDS):
                await self._serve(reader, writer)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the peer went away or took too long: either way this connection is done
        finally:
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            if target == b"/health":
                self.tally["health"] += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
                continue
            if target.startswith(b"/download"):
                self.tally["reset"] += 1
                await self._reset_mid_body(writer)
                return
            mode = next(self._modes)
            self.tally[mode] += 1
            if mode == "endless_head":
                await self._endless_head(reader, writer)
            elif mode == "garbage":
                writer.write(GARBAGE)
                await writer.drain()
            else:
                writer.write(extra_answer(self.name))
                await writer.drain()
                await reader.read()  # until the peer closes (or the connection deadline)
            return

    async def _endless_head(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        sent = 0
        while sent < MAX_ENDLESS_BYTES and not reader.at_eof():
            writer.write(ENDLESS_CHUNK)
            sent += len(ENDLESS_CHUNK)
            await writer.drain()  # as fast as the peer reads, no faster

    async def _reset_mid_body(self, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Backend: %s\r\n\r\n"
                     % (RESET_PROMISED, self.name.encode()))
        writer.write(b"r" * RESET_SENT)
        await writer.drain()
        sock = writer.get_extra_info("socket")
        if sock is not None:  # SO_LINGER 0: the close that follows sends RST, not FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def tally_line(self) -> str:
        return "event=broken_tally " + " ".join(f"{k}={v}" for k, v in self.tally.items())


async def serve(host: str, port: int, name: str) -> None:
    """Serve until SIGTERM/SIGINT, then print the tally."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    backend = BrokenBackend(name)
    server = await asyncio.start_server(backend.handle, host, port, reuse_address=True,
                                        limit=MAX_HEAD, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"event=backend_listening name={name} port={bound}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        print(backend.tally_line(), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.brokenbackend",
                                     description="an instance whose health check passes and "
                                     "whose every other answer is broken")
    parser.add_argument("--port", type=int, required=True, help="0: let the kernel choose")
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    try:
        run_async(serve(args.host, args.port, args.name))
    except OSError as e:
        print(f"broken backend {args.name}: cannot listen on {args.host}:{args.port}: {e}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
