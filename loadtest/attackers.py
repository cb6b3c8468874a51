"""Hostile HTTP clients for the abuse scenario, in a process of their own.

`python -m loadtest.attackers --target 127.0.0.1:PORT --duration S [...]` raises its
RLIMIT_NOFILE to the hard limit, prints `event=attackers_ready flood=N fd_limit=N`, waits
(at most --wait-go seconds) for SIGUSR1, prints `event=attack_start`, attacks for
--duration seconds, then prints `event=attack_report {JSON}` and exits 0. SIGTERM or
SIGINT end the attack early (the report is still printed). Each attacker has its own
connections; none of them ever retries within a connection:
- pipeliners: --pipeline-depth GETs in one write, every response read and counted by its
  status line, --pipeline-pause, again (a surplus of responses or a body SMUGGLED_BODY
  means another response's bytes leaked in);
- drippers (slowloris): a request head sent one byte every --drip-interval seconds until
  the proxy answers or closes;
- non-readers: a GET for a large download on a socket with a tiny receive buffer, never
  read; a reset or FIN the kernel reports (TCP_INFO) ends one early, and at the end what
  is queued is read to tell a connection still served from one closed without a reset;
- flood: from --flood-delay s on, idle connections, at most --flood-rate new ones a
  second, up to `flood_size` (the fd limit less what the others need, at most --flood)
  held open at once;
- slow uploaders: POST bodies of --upload-rate bytes a second for --upload-seconds.
The process lowers its own priority (--nice) so that on a small machine the measured
client and the proxy get the CPU first: the abuse is in what it sends, not in CPU theft.

Owns: the attack and its figures. Knows nothing of the scenario beyond the target.
`ResponseCounter`, `flood_size` and `distribution` are pure and unit-tested.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import resource
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from loadtest.brokenbackend import SMUGGLED_BODY
from loadtest.client import read_response
from loadtest.load import classify, run_async
from loadtest.report import percentile

STATUS_MARK = b"HTTP/1.1 "
STATUS_LINE_BYTES = len(STATUS_MARK) + 3  # the mark and a three-digit status
CONNECT_TIMEOUT = 3.0  # a connect the kernel has not completed by then failed
BATCH_TIMEOUT = 30.0  # a pipelined batch not answered by then is cut
SLACK = 5.0  # seconds past the deadline an answer may still arrive before the report
FD_RESERVE = 256  # descriptors kept free beyond the other attackers' connections
FLOOD_TICK = 0.01  # seconds between rounds of new flood connections
FLOOD_CONNECTS_IN_FLIGHT = 512
TCP_ESTABLISHED = 1
MAX_DRIP_BYTES = 16384  # a dripped head stops growing here
DOWNLOAD_BYTES = 1 << 30  # what a non-reader asks for: more than the run can move
NONREADER_RCVBUF = 4096
NONREADER_PAUSE = 1.0  # seconds from the proxy closing a non-reader to its next one
DRAIN_BYTES = 8 << 20  # more than a closed connection can have queued (tcp_wmem's 4 MiB)
DRAIN_SECONDS = 2.0
RECONNECT_PAUSE = 0.5  # seconds before an attacker whose connection failed tries again


# === pure parts ==========================================================================
class ResponseCounter:
    """Counts the responses in a byte stream of pipelined answers by their status lines
    (`HTTP/1.1 NNN`), and the SMUGGLED_BODY markers in it, across any split into reads."""

    def __init__(self) -> None:
        self.count = 0
        self.statuses: Counter[str] = Counter()
        self.smuggled = 0
        self._status_rest = b""
        self._smuggled_rest = b""

    def feed(self, data: bytes) -> None:
        buf = self._status_rest + data
        found, self._status_rest = scan(buf, STATUS_MARK, STATUS_LINE_BYTES)
        for at in found:
            self.count += 1
            self.statuses[buf[at + len(STATUS_MARK):at + STATUS_LINE_BYTES].decode("latin-1")] += 1
        buf = self._smuggled_rest + data
        found, self._smuggled_rest = scan(buf, SMUGGLED_BODY, len(SMUGGLED_BODY))
        self.smuggled += len(found)


def scan(buf: bytes, mark: bytes, need: int) -> tuple[list[int], bytes]:
    """Where `mark` starts in `buf` with all `need` bytes from there present, and the tail
    to prepend to the next read (a match it starts may still complete)."""
    found = []
    end = 0
    at = buf.find(mark)
    while at != -1 and at + need <= len(buf):
        found.append(at)
        end = at + need
        at = buf.find(mark, end)
    keep = max(end, len(buf) - (need - 1))
    return found, buf[keep:]


def flood_size(wanted: int, fd_limit: int, others: int) -> int:
    """How many flood connections to hold at once: `wanted`, but never so many that the
    other attackers' `others` connections and FD_RESERVE spare descriptors lack one."""
    return max(0, min(wanted, fd_limit - others - FD_RESERVE))


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """count, p50 and max of some durations (seconds), None when there are none."""
    if not values:
        return {"count": 0, "p50": None, "max": None}
    return {"count": len(values), "p50": round(percentile(values, 0.5), 4),
            "max": round(max(values), 4)}


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def first_status(data: bytes) -> str:
    """`http NNN` for bytes that start a status line, `closed` for none, else `bytes`."""
    if not data:
        return "closed"
    if data.startswith(STATUS_MARK) and len(data) >= STATUS_LINE_BYTES:
        return f"http {data[len(STATUS_MARK):STATUS_LINE_BYTES].decode('latin-1')}"
    return "bytes"


# === the attack ==========================================================================
@dataclass
class Figures:
    """What one kind of attacker saw: outcomes by kind and the seconds each one took."""

    outcomes: Counter[str] = field(default_factory=Counter)
    seconds: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self, outcome: str, seconds: float | None = None) -> None:
        self.outcomes[outcome] += 1
        if seconds is not None:
            self.seconds.setdefault(outcome, []).append(seconds)

    def as_json(self) -> dict[str, Any]:
        return {"outcomes": dict(self.outcomes.most_common()),
                "seconds": {k: distribution(v) for k, v in self.seconds.items()},
                **self.extra}


class Attack:
    """Every attacker against `target` until `deadline` (loop time)."""

    def __init__(self, args: argparse.Namespace, flood: int) -> None:
        host, _, port = args.target.rpartition(":")
        self.addr = (host, int(port))
        self.args = args
        self.flood_target = flood
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + args.duration
        self.stopping = asyncio.Event()
        self.figures = {name: Figures() for name in
                        ("pipeline", "drip", "nonread", "flood", "upload")}

    def left(self) -> float:
        return float(self.deadline - self.loop.time())

    def over(self) -> bool:
        return self.stopping.is_set() or self.left() <= 0

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(asyncio.open_connection(*self.addr), CONNECT_TIMEOUT)

    async def pause(self, seconds: float) -> None:
        """Sleep `seconds`, less if the attack ends first."""
        try:
            await asyncio.wait_for(self.stopping.wait(), min(seconds, max(0.0, self.left())))
        except TimeoutError:
            pass

    async def run(self) -> dict[str, Any]:
        a = self.args
        jobs: list[Callable[[], Coroutine[Any, Any, None]]] = []
        jobs += [self.pipeliner] * a.pipeliners
        jobs += [self.dripper] * a.drippers
        jobs += [functools.partial(self.non_reader, i * a.non_reader_stagger)
                 for i in range(a.non_readers)]
        jobs += [self.uploader] * a.slow_uploaders
        if self.flood_target:
            jobs.append(self.flood)
        tasks = [asyncio.create_task(job()) for job in jobs]
        stop_at = asyncio.create_task(self.pause(a.duration))
        try:
            await stop_at
            self.stopping.set()
            # Each attacker ends within SLACK of the deadline; whatever still runs is cut.
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=SLACK + 1)
                for task in pending:
                    task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            crashes = Counter(f"{type(r).__name__}: {r}" for r in results
                              if isinstance(r, Exception))
            if crashes:  # a bug of ours, shown rather than hidden
                self.figures["pipeline"].extra["attacker_crashes"] = dict(crashes)
        finally:
            stop_at.cancel()
        f = self.figures
        f["pipeline"].extra.update(connections=a.pipeliners, depth=a.pipeline_depth)
        f["drip"].extra.update(connections=a.drippers, interval=a.drip_interval)
        f["nonread"].extra.update(connections=a.non_readers)
        f["upload"].extra.update(connections=a.slow_uploaders, rate=a.upload_rate,
                                 seconds_each=a.upload_seconds)
        f["flood"].extra.update(target=self.flood_target, rate=a.flood_rate,
                                delay=a.flood_delay)
        return {name: fig.as_json() for name, fig in f.items()}

    # -- pipeliners ---------------------------------------------------------------------
    async def pipeliner(self) -> None:
        fig = self.figures["pipeline"]
        depth = self.args.pipeline_depth
        batch = b"GET /pipelined HTTP/1.1\r\nHost: abuse\r\n\r\n" * depth
        statuses: Counter[str] = fig.extra.setdefault("statuses", Counter())
        while not self.over():
            try:
                reader, writer = await self.connect()
            except (OSError, TimeoutError) as e:
                fig.record(f"connect {classify(e)}")
                await self.pause(RECONNECT_PAUSE)
                continue
            try:
                while not self.over():
                    started = self.loop.time()
                    counter = ResponseCounter()
                    writer.write(batch)
                    try:
                        async with asyncio.timeout(min(BATCH_TIMEOUT, self.left() + SLACK)):
                            while counter.count < depth:
                                data = await reader.read(65536)
                                if not data:
                                    raise asyncio.IncompleteReadError(b"?", None)
                                counter.feed(data)
                    except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
                        statuses.update(counter.statuses)
                        kind = "unfinished at the end" if self.over() else \
                            f"cut: {classify(e)}"
                        fig.record(kind, self.loop.time() - started)
                        fig.extra["responses_in_cut_batches"] = \
                            fig.extra.get("responses_in_cut_batches", 0) + counter.count
                        break
                    statuses.update(counter.statuses)
                    fig.record("complete", self.loop.time() - started)
                    if counter.count > depth or counter.smuggled:
                        fig.record("surplus or smuggled responses (desync)")
                    await self.pause(self.args.pipeline_pause)
            finally:
                writer.transport.abort()
            await self.pause(RECONNECT_PAUSE)  # refused (503) or cut: not a connect loop

    # -- drippers -----------------------------------------------------------------------
    async def dripper(self) -> None:
        fig = self.figures["drip"]
        while not self.over():
            started = self.loop.time()
            try:
                reader, writer = await self.connect()
            except (OSError, TimeoutError) as e:
                fig.record(f"connect {classify(e)}")
                await self.pause(RECONNECT_PAUSE)
                continue
            answer = asyncio.create_task(reader.read(64))
            try:
                writer.write(b"GET /drip HTTP/1.1\r\nHost: abuse\r\nX-Drip: ")
                dripped = 0
                while not answer.done() and not self.over() and dripped < MAX_DRIP_BYTES:
                    await asyncio.wait({answer}, timeout=self.args.drip_interval)
                    if not answer.done():
                        writer.write(b"a")
                        dripped += 1
                if answer.done():
                    try:
                        outcome = first_status(answer.result())
                    except (OSError, asyncio.IncompleteReadError) as e:
                        outcome = classify(e)
                    fig.record(outcome, self.loop.time() - started)
                else:
                    fig.record("still unanswered at the end" if self.over() else
                               "unanswered after MAX_DRIP_BYTES", self.loop.time() - started)
            finally:
                answer.cancel()
                writer.transport.abort()
            if self.loop.time() - started < RECONNECT_PAUSE:  # refused at once (503)
                await self.pause(RECONNECT_PAUSE)

    # -- non-readers --------------------------------------------------------------------
    async def non_reader(self, delay: float) -> None:
        """After `delay` s (staggered: each download makes an instance fill every buffer on
        the way, ~10 MB, and all at once that is a CPU burst of the instances, not abuse
        of the proxy), again and again until the end."""
        fig = self.figures["nonread"]
        request = (f"GET /download?bytes={DOWNLOAD_BYTES}&seed=1 HTTP/1.1\r\n"
                   "Host: abuse\r\n\r\n").encode()
        await self.pause(delay)
        while not self.over():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            # Before connect, so the window the kernel offers stays small from the start.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, NONREADER_RCVBUF)
            try:
                try:
                    await asyncio.wait_for(self.loop.sock_connect(sock, self.addr),
                                           CONNECT_TIMEOUT)
                    await self.loop.sock_sendall(sock, request)
                except (OSError, TimeoutError) as e:
                    fig.record(f"connect {classify(e)}")
                    await self.pause(RECONNECT_PAUSE)
                    continue
                started = self.loop.time()
                while not self.over() and tcp_state(sock) == TCP_ESTABLISHED:
                    await self.pause(0.25)
                held = self.loop.time() - started
                if tcp_state(sock) != TCP_ESTABLISHED:
                    fig.record("closed by the proxy (reset or FIN)", held)
                else:  # a FIN queued behind unsent bytes never shows unless we read
                    fig.record(await self.drain(sock), held)
            finally:
                sock.close()
            await self.pause(NONREADER_PAUSE)

    async def drain(self, sock: socket.socket) -> str:
        """At the end, how a non-reader's connection stands: read what is queued for it
        (at most DRAIN_BYTES, for DRAIN_SECONDS). A proxy that closed it without a reset
        left its FIN behind the unsent bytes (the kernel keeps that orphan socket and its
        buffers); one that still serves it keeps sending."""
        got = 0
        try:
            async with asyncio.timeout(DRAIN_SECONDS):
                while got < DRAIN_BYTES:
                    data = await self.loop.sock_recv(sock, 65536)
                    if not data:
                        return ("closed by the proxy without a reset (its FIN queued behind "
                                "unsent bytes, seen at the end)")
                    got += len(data)
        except OSError:
            return "closed by the proxy (reset)"
        except TimeoutError:
            pass
        return "still served at the end"

    # -- slow uploaders -----------------------------------------------------------------
    async def uploader(self) -> None:
        fig = self.figures["upload"]
        rate, seconds = self.args.upload_rate, self.args.upload_seconds
        length = max(1, round(rate * seconds))
        while self.left() >= seconds + 1 and not self.stopping.is_set():
            started = self.loop.time()
            try:
                reader, writer = await self.connect()
            except (OSError, TimeoutError) as e:
                fig.record(f"connect {classify(e)}")
                await self.pause(RECONNECT_PAUSE)
                continue
            answer = asyncio.create_task(read_response(reader))
            try:
                writer.write(f"POST /upload HTTP/1.1\r\nHost: abuse\r\nContent-Length: "
                             f"{length}\r\n\r\n".encode())
                sent = 0
                while sent < length and not answer.done() and not self.stopping.is_set():
                    await asyncio.wait({answer}, timeout=1 / rate)
                    if not answer.done():
                        writer.write(b"u")
                        sent += 1
                try:
                    async with asyncio.timeout(max(0.0, self.left()) + SLACK):
                        status, _, _ = await answer
                    outcome = f"http {status}"
                except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as e:
                    outcome = classify(e)
                if sent < length:
                    outcome += f" before the body's end ({sent} of {length} bytes)" \
                        if sent < length - 1 else " before the body's last byte"
                fig.record(outcome, self.loop.time() - started)
            finally:
                answer.cancel()
                writer.transport.abort()
            if self.loop.time() - started < RECONNECT_PAUSE:  # refused at once (503)
                await self.pause(RECONNECT_PAUSE)

    # -- flood --------------------------------------------------------------------------
    async def flood(self) -> None:
        """Idle connections, at most --flood-rate new ones a second, until flood_target
        are open at once; each one the proxy ends is replaced."""
        fig = self.figures["flood"]
        pool = _FloodPool(fig, self.loop)
        slots = asyncio.Semaphore(FLOOD_CONNECTS_IN_FLIGHT)

        async def one() -> None:
            try:
                conn = _FloodConn(pool, self.loop.time())
                await asyncio.wait_for(self.loop.create_connection(lambda: conn, *self.addr),
                                       CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as e:
                fig.record(f"connect {classify(e)}")
            finally:
                pool.connecting -= 1
                slots.release()

        await self.pause(self.args.flood_delay)
        budget = 0.0
        tasks: set[asyncio.Task[None]] = set()
        started = self.loop.time()
        try:
            while not self.over():
                # A token bucket: FLOOD_TICK's share of the rate, at most 0.1 s of burst.
                budget = min(budget + self.args.flood_rate * FLOOD_TICK,
                             self.args.flood_rate * 0.1)
                while (budget >= 1 and pool.busy() < self.flood_target
                       and not slots.locked()):
                    await slots.acquire()
                    budget -= 1
                    pool.connecting += 1
                    task = asyncio.create_task(one())
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if pool.busy() >= self.flood_target and "filled_after" not in fig.extra:
                    fig.extra["filled_after"] = round(self.loop.time() - started, 3)
                await self.pause(FLOOD_TICK)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            fig.extra["peak_open"] = pool.peak
            fig.extra["open_at_end"] = len(pool.open)
            pool.close_all()


class _FloodPool:
    """The flood's open connections, how many are being opened, and the peak."""

    def __init__(self, fig: Figures, loop: asyncio.AbstractEventLoop) -> None:
        self.fig = fig
        self.loop = loop
        self.open: set[_FloodConn] = set()
        self.connecting = 0
        self.peak = 0
        self.closing = False

    def busy(self) -> int:
        return len(self.open) + self.connecting

    def opened(self, conn: _FloodConn) -> None:
        self.open.add(conn)
        self.peak = max(self.peak, len(self.open))

    def ended(self, conn: _FloodConn) -> None:
        if conn in self.open and not self.closing:
            self.fig.record(conn.outcome(), self.loop.time() - conn.opened_at)
        self.open.discard(conn)

    def close_all(self) -> None:
        """Our own closes at the end are not the proxy's doing: not recorded."""
        self.closing = True
        for conn in list(self.open):
            conn.transport.abort()
        self.open.clear()


class _FloodConn(asyncio.Protocol):
    """One idle flood connection: keeps the first bytes the proxy sends, reports its end."""

    def __init__(self, pool: _FloodPool, opened_at: float) -> None:
        self.pool = pool
        self.opened_at = opened_at
        self.first = b""
        self.error: BaseException | None = None
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.pool.opened(self)

    def data_received(self, data: bytes) -> None:
        if len(self.first) < STATUS_LINE_BYTES:
            self.first += data[:STATUS_LINE_BYTES]

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = exc
        self.pool.ended(self)

    def outcome(self) -> str:
        if self.first:
            return first_status(self.first)
        return classify(self.error) if self.error is not None else "closed"


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of `sock` (tcpi_state, the first byte of TCP_INFO)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except OSError:
        return -1


# === process =============================================================================
async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    go, stop = asyncio.Event(), asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, go.set)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    fd_limit = raise_fd_limit()
    others = args.pipeliners + args.drippers + args.non_readers + args.slow_uploaders
    flood = flood_size(args.flood, fd_limit, others)
    print(f"event=attackers_ready flood={flood} fd_limit={fd_limit}", flush=True)
    waiting = [asyncio.create_task(go.wait()), asyncio.create_task(stop.wait())]
    await asyncio.wait(waiting, timeout=args.wait_go, return_when=asyncio.FIRST_COMPLETED)
    for task in waiting:
        task.cancel()
    if not go.is_set() or stop.is_set():
        print("event=attack_not_started", flush=True)
        return 1
    print(f"event=attack_start wall={time.time():.6f}", flush=True)
    attack = Attack(args, flood)
    stopper = asyncio.create_task(stop.wait())
    stopper.add_done_callback(lambda _: attack.stopping.set())
    try:
        report = await attack.run()
    finally:
        stopper.cancel()
    print(f"event=attack_report {json.dumps(report, separators=(',', ':'))}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.attackers",
                                description="hostile HTTP clients against one listener")
    p.add_argument("--target", required=True, help="HOST:PORT of the proxy's listener")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of attack")
    p.add_argument("--wait-go", type=float, default=120.0,
                   help="seconds to wait for SIGUSR1 before giving up")
    p.add_argument("--nice", type=int, default=10, help="niceness increment (default 10)")
    p.add_argument("--pipeliners", type=int, default=2)
    p.add_argument("--pipeline-depth", type=int, default=2000, help="GETs per write")
    p.add_argument("--pipeline-pause", type=float, default=2.0,
                   help="seconds between a batch's last response and the next batch")
    p.add_argument("--drippers", type=int, default=100)
    p.add_argument("--drip-interval", type=float, default=0.3, help="seconds per byte")
    p.add_argument("--non-readers", type=int, default=20)
    p.add_argument("--non-reader-stagger", type=float, default=0.25,
                   help="seconds between two non-readers' first requests")
    p.add_argument("--flood", type=int, default=20000,
                   help="flood connections held at once, at most (the fd limit bounds it)")
    p.add_argument("--flood-rate", type=float, default=2000.0,
                   help="new flood connections a second, at most")
    p.add_argument("--flood-delay", type=float, default=0.0,
                   help="seconds from the attack's start to the flood's")
    p.add_argument("--slow-uploaders", type=int, default=10)
    p.add_argument("--upload-rate", type=float, default=4.0, help="body bytes a second")
    p.add_argument("--upload-seconds", type=float, default=8.0,
                   help="seconds each slow upload takes")
    args = p.parse_args(argv)
    if args.nice:
        os.nice(args.nice)
    return run_async(serve(args))


if __name__ == "__main__":
    sys.exit(main())
