"""Memory sdproxy holds per idle client connection and per pooled upstream connection.

A measurement script, not a test. Each case starts a fresh sdproxy (http mode, static
discovery, deadlines long enough that nothing is closed while it runs) in front of
backends this process serves on loopback, and reads sdproxy's VmRSS and open fds from
/proc before and after, once the fd count has stopped moving:

- idle client connections, used: N connections each make one request (4 at a time, so
  the upstream pool does not grow) and stay open: parked keep-alive connections;
- idle client connections, never used: N connections opened, nothing sent;
- pooled upstream connections: M client connections each send one GET; the backends
  hold every answer until all M have arrived (so sdproxy has M upstream connections
  open at once), then answer all; the client connections are closed and the M upstream
  connections stay in sdproxy's keep-alive pool (at most 256 per instance, so M is
  spread over enough backend listeners, one instance each);
- control: the same round, the backends answering `Connection: close`, so nothing is
  pooled.

Every reading is taken once sdproxy's fd count has stopped moving and, on SIGUSR1, sdproxy
ran a full garbage collection (a sitecustomize on its PYTHONPATH installs the handler): a
connection closed a moment ago may sit in reference cycles that only the cyclic collector
frees, and would otherwise be counted as kept.

RSS counts the allocator's high-water mark, and the M in-flight exchanges that fill the
pool set one, so for pooled connections RSS shows only what pooling adds on top of it:
(pooled case's growth - control's growth) / M. Every case therefore also runs a second
time with tracemalloc on in sdproxy (started by the same sitecustomize, which then writes
the live traced bytes on SIGUSR1): live heap bytes per connection, independent of the
allocator. uvloop's handles and httptools' parsers are allocated through Python's
allocator, so they are in it; the control's live growth shows how close to zero
"nothing kept" comes.

Neither figure holds the kernel's memory per socket (the TCP socket, its inode and file,
the epoll entry: slab objects; send and receive buffers while data is queued): the
report adds the slab object sizes from /proc/slabinfo when it is readable. Linux only.
RLIMIT_NOFILE is raised within the hard limit as needed (sdproxy inherits it). Run:

    .venv/bin/python bench/memory_per_connection.py --clients 2000 --pooled 1000 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import resource
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from loadtest.benchprocs import rss_bytes
from loadtest.client import Addr, HttpClient, read_response
from loadtest.load import run_async
from loadtest.proxies import Sdproxy, SdUpstream
from loadtest.trend import open_fds
from proxy.devconsul import free_port

KiB = 1024
MiB = 1024 * KiB
POOL_PER_INSTANCE = 200  # below sdproxy's 256 idle connections per instance
CONNECT_BATCH = 200  # connections opened at once (below the listen backlog of 1024)
REQUEST_CONCURRENCY = 4  # requests at once on the idle-to-be client connections
ROUND_TIMEOUT = 60.0  # seconds for one round of M held requests
SETTLE_TIMEOUT = 30.0  # seconds for sdproxy's fd count to stop moving
SETTLE_QUIET = 1.0  # seconds the fd count must stay put to count as settled
COLLECT_TIMEOUT = 10.0  # seconds for sdproxy to answer SIGUSR1
GET = b"GET / HTTP/1.1\r\nHost: membench\r\nUser-Agent: sdproxy-membench\r\n\r\n"
KEEP_ALIVE_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CLOSE_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
# Slab caches a TCP socket's kernel objects live in (a socket, its inode, file, epoll entry)
SOCKET_SLABS = ("TCP", "sock_inode_cache", "filp", "dentry", "eventpoll_epi")
COLLECT_OUT_ENV = "SDPROXY_MEMBENCH_OUT"
TRACE_ENV = "SDPROXY_MEMBENCH_TRACE"
# Loaded by sdproxy at start-up (via PYTHONPATH), before sdproxy's own code. On SIGUSR1 it
# runs the cyclic garbage collector (connections closed a moment ago may still sit in
# reference cycles, which only a collection frees) and writes tracemalloc's live bytes
# (-1 when not tracing) to a file.
SITECUSTOMIZE = f"""\
import gc, os, signal, tracemalloc
_out = os.environ.get("{COLLECT_OUT_ENV}")
if _out:
    if os.environ.get("{TRACE_ENV}") == "1":
        tracemalloc.start()

    def _collect(signum, frame):
        gc.collect()
        live = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else -1
        with open(_out + ".tmp", "w") as f:
            f.write(str(live))
        os.replace(_out + ".tmp", _out)

    signal.signal(signal.SIGUSR1, _collect)
"""
CASES = ("used", "unused", "pooled", "control")
CASE_TITLES = {
    "used": "idle client connection, parked after one request",
    "unused": "idle client connection, never used",
    "pooled": "pooled upstream connection",
    "control": "control: the same round, upstream answers close",
}


# === backends ===========================================================================
class Backends:
    """HTTP backends on `count` loopback listeners in this process. Each GET is answered
    at once, or, while `hold` > 1, held until `hold` requests are waiting and then all
    answered together. `keep_alive` False answers `Connection: close` and closes."""

    def __init__(self) -> None:
        self.servers: list[asyncio.Server] = []
        self.hold = 1
        self.keep_alive = True
        self.waiting: list[asyncio.Transport] = []

    async def start(self, count: int) -> list[int]:
        loop = asyncio.get_running_loop()
        for _ in range(count):
            self.servers.append(await loop.create_server(
                lambda: _BackendConnection(self), "127.0.0.1", 0, backlog=1024))
        return [s.sockets[0].getsockname()[1] for s in self.servers]

    def arrived(self, transport: asyncio.Transport) -> None:
        self.waiting.append(transport)
        if len(self.waiting) >= self.hold:
            self.release()

    def release(self) -> None:
        """Answer every held request."""
        waiting, self.waiting = self.waiting, []
        for transport in waiting:
            if transport.is_closing():
                continue
            if self.keep_alive:
                transport.write(KEEP_ALIVE_ANSWER)
            else:
                transport.write(CLOSE_ANSWER)
                transport.close()

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()


class _BackendConnection(asyncio.Protocol):
    """Heads of bodiless requests, each handed to `Backends.arrived`."""

    def __init__(self, backends: Backends) -> None:
        self.backends = backends
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None and b"\r\n\r\n" in self.buffer:
            _, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            self.backends.arrived(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


# === sdproxy and /proc ==================================================================
@dataclass(frozen=True)
class Reading:
    rss: int  # bytes
    fds: int
    traced: int | None  # live bytes tracemalloc counts (a traced sdproxy only)


class Proxy:
    """A fresh sdproxy with one http upstream per name, each in front of every port,
    started with SITECUSTOMIZE from `site_dir` (`traced`: with tracemalloc on)."""

    def __init__(self, proc: Sdproxy, out: Path) -> None:
        self.proc = proc
        self.out = out

    @classmethod
    async def start(cls, names: Sequence[str], ports: Sequence[int], parser: str,
                    site_dir: Path, traced: bool) -> Proxy:
        extra = {"header_timeout": "10m", "idle_timeout": "10m", "request_timeout": "2m",
                 "http_parser": parser}
        endpoints = tuple(f"127.0.0.1:{p}" for p in ports)
        upstreams = [SdUpstream(name, free_port(), "http", "static", endpoints, extra)
                     for name in names]
        out = site_dir / "live"
        with _environ({"PYTHONPATH": str(site_dir), COLLECT_OUT_ENV: str(out),
                       TRACE_ENV: "1" if traced else "0"}):
            proc = await asyncio.to_thread(Sdproxy, upstreams)  # inherits os.environ
        return cls(proc, out)

    def addr(self, index: int = 0) -> Addr:
        return ("127.0.0.1", self.proc.upstreams[index].port)

    async def settled(self) -> Reading:
        """RSS (and live bytes) once the fd count stayed put for SETTLE_QUIET seconds
        (sdproxy has seen every open and close by then) and a garbage collection ran."""
        pid = self.proc.pid
        deadline = time.monotonic() + SETTLE_TIMEOUT
        last, since = open_fds(pid), time.monotonic()
        while time.monotonic() - since < SETTLE_QUIET:
            if time.monotonic() > deadline:
                raise RuntimeError(f"sdproxy's fd count still moving after {SETTLE_TIMEOUT:g}s")
            await asyncio.sleep(0.05)
            now = open_fds(pid)
            if now != last:
                last, since = now, time.monotonic()
        live = await self._collect()
        return Reading(rss_bytes(pid), last, None if live < 0 else live)

    async def _collect(self) -> int:
        """SIGUSR1: sdproxy collects its garbage and writes its live bytes (or -1)."""
        self.out.unlink(missing_ok=True)
        os.kill(self.proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + COLLECT_TIMEOUT
        while not self.out.exists():
            if time.monotonic() > deadline or not self.proc.alive():
                raise RuntimeError(f"sdproxy did not answer SIGUSR1: {self.proc.log_tail()}")
            await asyncio.sleep(0.02)
        return int(self.out.read_text())

    async def stop(self) -> None:
        await asyncio.to_thread(self.proc.stop)


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set, restored after."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        os.environ.update(values)
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


async def open_connections(addr: Addr, count: int,
                           ) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    out: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for start in range(0, count, CONNECT_BATCH):
            batch = min(CONNECT_BATCH, count - start)
            out += await asyncio.gather(*(asyncio.open_connection(*addr) for _ in range(batch)))
    except BaseException:
        close_all(out)
        raise
    return out


def close_all(conns: Iterable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, writer in conns:
        writer.close()


async def one_request_each(conns: Sequence[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
                           ) -> None:
    """One GET on every connection, REQUEST_CONCURRENCY at a time (so that sdproxy's
    upstream pool stays as small as the warm-up left it); each must answer 200."""
    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        writer.write(GET)
        status, _, _ = await read_response(reader)
        return status

    for start in range(0, len(conns), REQUEST_CONCURRENCY):
        async with asyncio.timeout(ROUND_TIMEOUT):
            statuses = await asyncio.gather(*(
                one(r, w) for r, w in conns[start:start + REQUEST_CONCURRENCY]))
        if any(s != 200 for s in statuses):
            raise RuntimeError(f"a request answered {sorted(set(statuses))}")


async def warm_up(addr: Addr) -> None:
    """Code paths and lazy imports warm: 200 sequential GETs and 20 concurrent ones."""
    client = HttpClient(pool_size=20)
    try:
        for _ in range(200):
            await client.get(addr)
        await asyncio.gather(*(client.get(addr) for _ in range(20)))
    finally:
        client.close()


# === the measurements ===================================================================
@dataclass(frozen=True)
class Step:
    """sdproxy before and after `count` connections of one case."""

    case: str
    count: int
    before: Reading
    after: Reading

    @property
    def added_fds(self) -> int:
        return self.after.fds - self.before.fds

    @property
    def rss_growth(self) -> int:
        return self.after.rss - self.before.rss

    @property
    def traced_growth(self) -> int | None:
        if self.before.traced is None or self.after.traced is None:
            return None
        return self.after.traced - self.before.traced


async def idle_clients(proxy: Proxy, n: int, used: bool) -> tuple[Reading, Reading]:
    before = await proxy.settled()
    conns = await open_connections(proxy.addr(), n)
    try:
        if used:
            await one_request_each(conns)
        return before, await proxy.settled()
    finally:
        close_all(conns)


async def held_round(proxy: Proxy, backends: Backends, m: int) -> tuple[Reading, Reading]:
    """M GETs on M new client connections, all held by the backends until the last one
    arrived; every answer must be 200; the client connections are closed after."""
    before = await proxy.settled()
    conns = await open_connections(proxy.addr(), m)
    backends.hold = m
    try:
        for _, writer in conns:
            writer.write(GET)
        async with asyncio.timeout(ROUND_TIMEOUT):
            results = await asyncio.gather(*(read_response(r) for r, _ in conns))
        if any(status != 200 for status, _, _ in results):
            raise RuntimeError("a held request did not answer 200")
    finally:
        backends.hold = 1
        backends.release()
        close_all(conns)
    return before, await proxy.settled()


async def run_case(case: str, backends: Backends, ports: Sequence[int],
                   args: argparse.Namespace, site_dir: Path, traced: bool) -> Step:
    """One case in a fresh sdproxy."""
    proxy = await Proxy.start(["mem"], ports, args.parser, site_dir, traced)
    backends.keep_alive = case != "control"
    try:
        await warm_up(proxy.addr())
        if case in ("used", "unused"):
            before, after = await idle_clients(proxy, args.clients, case == "used")
            return Step(case, args.clients, before, after)
        before, after = await held_round(proxy, backends, args.pooled)
        return Step(case, args.pooled, before, after)
    finally:
        backends.keep_alive = True
        await proxy.stop()


async def measure(args: argparse.Namespace) -> int:
    backends = Backends()
    ports = await backends.start(max(1, math.ceil(args.pooled / POOL_PER_INSTANCE)))
    steps: dict[tuple[str, bool], list[Step]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="membench-") as tmp:
            site_dir = Path(tmp)
            (site_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
            for k in range(args.repeat):
                print(f"run {k + 1}/{args.repeat}", flush=True)
                for traced in (False, True):
                    for case in CASES:
                        step = await run_case(case, backends, ports, args, site_dir, traced)
                        steps.setdefault((case, traced), []).append(step)
                        print(f"  {case:<8}{' traced' if traced else '':<8} {step.count:>5}  "
                              f"RSS {step.before.rss / MiB:6.2f} -> {step.after.rss / MiB:6.2f}"
                              f" MiB  fds {step.before.fds:>5} -> {step.after.fds:>5}"
                              + (f"  live {step.before.traced / MiB:6.2f} -> "
                                 f"{step.after.traced / MiB:6.2f} MiB"
                                 if step.before.traced is not None
                                 and step.after.traced is not None else ""), flush=True)
    finally:
        await backends.stop()
    report(args, steps)
    return 0


# === report =============================================================================
def kernel_bytes_per_socket() -> tuple[int, str] | None:
    """The summed object sizes of a socket's slab objects, and which were found."""
    try:
        with open("/proc/slabinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    sizes = {}
    for line in lines[2:]:
        fields = line.split()
        if len(fields) > 3 and fields[0] in SOCKET_SLABS:
            sizes[fields[0]] = int(fields[3])
    if not sizes:
        return None
    return sum(sizes.values()), " + ".join(f"{k} {v}" for k, v in sizes.items())


def _kib(nbytes: float) -> str:
    return f"{nbytes / KiB:,.2f} KiB"


def _median_range(values: Sequence[float]) -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return _kib(med)
    return f"{_kib(med)} ({_kib(min(values))} .. {_kib(max(values))})"


def raise_nofile(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to `needed` (within the hard limit); the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    return soft


def report(args: argparse.Namespace, steps: dict[tuple[str, bool], list[Step]]) -> None:
    def rss_per(case: str) -> list[float]:
        return [s.rss_growth / s.count for s in steps[(case, False)]]

    def live_per(case: str) -> list[float]:
        out = []
        for s in steps[(case, True)]:
            growth = s.traced_growth
            # Pooled: per connection the pool gained (fds); otherwise per connection made.
            count = s.added_fds if case == "pooled" else s.count
            if growth is not None and count > 0:
                out.append(growth / count)
        return out

    pooled_rss = [(p.rss_growth - c.rss_growth) / p.count
                  for p, c in zip(steps[("pooled", False)], steps[("control", False)])]
    added = statistics.median(s.added_fds for s in steps[("pooled", True)])
    print()
    print(f"sdproxy memory per connection (http mode, static discovery, {args.parser} parser; "
          f"median of {args.repeat} fresh processes per case, min .. max)")
    print(f"  {'':<50} {'RSS':<36} live heap (tracemalloc)")
    pooled_note = (f"{args.pooled} held requests, {added:g} connections added to the pool; "
                   "RSS: growth beyond the control's")
    rows = [("used", rss_per("used"), f"{args.clients} connections"),
            ("unused", rss_per("unused"), f"{args.clients} connections"),
            ("pooled", pooled_rss, pooled_note),
            ("control", rss_per("control"), "per held request; nothing pooled")]
    for case, rss, note in rows:
        print(f"  {CASE_TITLES[case]:<50} {_median_range(rss):<36} "
              f"{_median_range(live_per(case))}   ({note})")
    kernel = kernel_bytes_per_socket()
    print("  not in either: the kernel's memory per socket"
          + (f", about {kernel[0]:,} B of slab objects ({kernel[1]})" if kernel else "")
          + ", plus send/receive buffers while data is queued (none on an idle connection)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2000, help="idle client connections")
    parser.add_argument("--pooled", type=int, default=1000, help="pooled upstream connections")
    parser.add_argument("--repeat", type=int, default=3, help="fresh sdproxy processes per case")
    parser.add_argument("--parser", choices=("httptools", "h11"), default="httptools")
    args = parser.parse_args(argv)
    soft = raise_nofile(max(args.clients, 3 * args.pooled) + 1024)
    if soft < max(args.clients, 3 * args.pooled) + 256:
        print(f"RLIMIT_NOFILE {soft} is too low for these counts", file=sys.stderr)
        return 1
    return run_async(measure(args))


if __name__ == "__main__":
    sys.exit(main())
