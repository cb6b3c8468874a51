"""Bulk throughput of TCP mode: plain relay (relay.py) vs zero-copy splice (splice.py).

A measurement script, not a test. Movers: `relay` runs the proxy with
`proxy.protocols.tcp.ZERO_COPY = False` (every byte through relay.py); `splice` with
`ZERO_COPY = True`, the default on Linux (a connection starts on relay.py and is handed
to splice.py on its first bulk read). For each it starts the real proxy
(`proxy.cli.main(["run", "-c", FILE])` in a child process, after setting the constant),
a sink on loopback that reads and discards, and a sender that pushes N MiB through the
proxy's TCP mode and half-closes. It prints MB/s (sender start -> sink EOF) and the
proxy's CPU seconds (utime + stime from /proc/PID/stat) per GiB relayed. With
`--conns K` it also times K short connections (connect, send 1 KiB, half-close, read the
echo back), to show what each mover costs a connection too short to be handed over.
Rounds alternate the movers so that other load on the machine hits them alike.

Sender and sink are threads of this process doing big blocking sendall/recv_into calls
(the GIL is released in the kernel), so the proxy is the part under test. Linux only
(/proc). Run:

    .venv/bin/python bench/tcp_bulk.py --mib 1024 --repeat 7 --conns 1000
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from proxy.devconsul import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
GiB = 1 << 30
CHUNK = 4 * MiB
TICKS = os.sysconf("SC_CLK_TCK")
WAIT = 30.0

# Runs the proxy with a chosen mover: the constant is read when a TCP listener is made.
LAUNCH = ("import sys; from proxy.protocols import tcp; tcp.ZERO_COPY = {zero_copy}; "
          "from proxy.cli import main; sys.exit(main(sys.argv[1:]))")

ECHO_SERVER = r'''
import asyncio, sys, uvloop
class Echo(asyncio.Protocol):
    def connection_made(self, t): self.t = t
    def data_received(self, d): self.t.write(d)
    def eof_received(self): self.t.close(); return True
async def main():
    s = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0, backlog=1024)
    print(s.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
'''


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)


class Proxy:
    def __init__(self, zero_copy: bool, endpoints: list[str]) -> None:
        self.listen = ("127.0.0.1", free_port())
        lines = [f'[admin]\nlisten = "127.0.0.1:{free_port()}"\n']
        for name, ep in zip(("bulk", "short"), endpoints):
            port = free_port() if name == "short" else self.listen[1]
            lines.append(f'[[upstreams]]\nname = "{name}"\n'
                         f'listen = "127.0.0.1:{port}"\n'
                         f'mode = "tcp"\ndiscovery = "static"\nendpoints = ["{ep}"]\n'
                         f'drain_timeout = "1s"\n')
        fd, self.config = tempfile.mkstemp(prefix="tcp-bulk-", suffix=".toml")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH.format(zero_copy=zero_copy), "run", "-c", self.config],
            cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True)
        self.listens: dict[str, tuple[str, int]] = {}
        self._wait_listening(len(endpoints))

    def _wait_listening(self, count: int) -> None:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + WAIT
        buf = b""
        while len(self.listens) < count:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise RuntimeError(f"proxy did not start: {buf.decode(errors='replace')}")
            if select.select([fd], [], [], left)[0]:
                buf += os.read(fd, 65536)
                for line in buf.decode(errors="replace").splitlines():
                    if "event=listening" in line:
                        name = line.split("upstream=", 1)[1].split()[0]
                        host, _, port = line.split("listen=", 1)[1].split()[0].rpartition(":")
                        self.listens[name] = (host, int(port))
        # Keep draining stderr so the proxy never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in self.proc.stderr or ()],
                         daemon=True).start()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        os.unlink(self.config)


class Sink:
    """Accepts connections; reads each to EOF, discarding; records bytes and end time."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.port = self.server.getsockname()[1]
        self.received = 0
        self.finished = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        buf = bytearray(CHUNK)
        while True:
            conn, _ = self.server.accept()
            with conn:
                n = 0
                while True:
                    got = conn.recv_into(buf)
                    if not got:
                        break
                    n += got
                self.received = n
                self.finished.set()


def bulk_once(proxy: Proxy, sink: Sink, size: int) -> tuple[float, float]:
    """(seconds, proxy cpu seconds) to relay `size` bytes sender -> proxy -> sink."""
    payload = memoryview(os.urandom(CHUNK))
    sink.finished.clear()
    cpu0 = cpu_seconds(proxy.proc.pid)
    t0 = time.perf_counter()
    with socket.create_connection(proxy.listens["bulk"]) as sock:
        sent = 0
        while sent < size:
            sock.sendall(payload[:min(CHUNK, size - sent)])
            sent += min(CHUNK, size - sent)
        sock.shutdown(socket.SHUT_WR)
        if not sink.finished.wait(WAIT * 10):
            raise RuntimeError("sink saw no EOF")
        elapsed = time.perf_counter() - t0
        sock.settimeout(WAIT)
        assert sock.recv(1) == b"", "the half-close did not come back"
    cpu = cpu_seconds(proxy.proc.pid) - cpu0
    if sink.received != size:
        raise RuntimeError(f"sink got {sink.received} of {size} bytes")
    return elapsed, cpu


def short_once(proxy: Proxy, count: int) -> tuple[float, float]:
    """(seconds, proxy cpu seconds) for `count` sequential short echo connections."""
    msg = b"x" * 1024
    cpu0 = cpu_seconds(proxy.proc.pid)
    t0 = time.perf_counter()
    for _ in range(count):
        with socket.create_connection(proxy.listens["short"], timeout=WAIT) as sock:
            sock.sendall(msg)
            sock.shutdown(socket.SHUT_WR)
            got = b""
            while True:
                data = sock.recv(4096)
                if not data:
                    break
                got += data
            if got != msg:
                raise RuntimeError(f"echo returned {len(got)} bytes")
    return time.perf_counter() - t0, cpu_seconds(proxy.proc.pid) - cpu0


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="MiB per bulk transfer")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (each runs every mover)")
    parser.add_argument("--conns", type=int, default=0,
                        help="short connections per mover and round (0: skip)")
    parser.add_argument("--movers", default="relay,splice", help="comma-separated")
    args = parser.parse_args()
    size = args.mib * MiB
    movers = args.movers.split(",")
    sink = Sink()
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    proxies: dict[str, Proxy] = {}
    try:
        assert echo.stdout is not None
        echo_port = int(echo.stdout.readline())
        for mover in movers:
            proxies[mover] = Proxy(mover == "splice", [f"127.0.0.1:{sink.port}",
                                                       f"127.0.0.1:{echo_port}"])
        for proxy in proxies.values():  # warm-up
            bulk_once(proxy, sink, min(size, 64 * MiB))
            if args.conns:
                short_once(proxy, 100)
        # Rounds interleave the movers, so that load from elsewhere on the machine
        # drifts over all of them alike; medians are reported.
        rates: dict[str, list[float]] = {m: [] for m in movers}
        cpus: dict[str, list[float]] = {m: [] for m in movers}
        conn_rates: dict[str, list[float]] = {m: [] for m in movers}
        conn_cpus: dict[str, list[float]] = {m: [] for m in movers}
        print(f"{'round':>5} {'mover':8} {'MB/s':>7} {'cpu s/GiB':>10}"
              + (f" {'conn/s':>7} {'cpu us/conn':>11}" if args.conns else ""))
        for rnd in range(args.repeat):
            for mover, proxy in proxies.items():
                elapsed, cpu = bulk_once(proxy, sink, size)
                rates[mover].append(size / elapsed / 1e6)
                cpus[mover].append(cpu / (size / GiB))
                line = f"{rnd:>5} {mover:8} {rates[mover][-1]:>7.0f} {cpus[mover][-1]:>10.3f}"
                if args.conns:
                    elapsed, cpu = short_once(proxy, args.conns)
                    conn_rates[mover].append(args.conns / elapsed)
                    conn_cpus[mover].append(cpu / args.conns * 1e6)
                    line += f" {conn_rates[mover][-1]:>7.0f} {conn_cpus[mover][-1]:>11.0f}"
                print(line, flush=True)
        print(f"median of {args.repeat} rounds, {args.mib} MiB per transfer"
              + (f", {args.conns} short connections per round" if args.conns else ""))
        for mover in movers:
            line = f"{'med':>5} {mover:8} {median(rates[mover]):>7.0f} {median(cpus[mover]):>10.3f}"
            if args.conns:
                line += f" {median(conn_rates[mover]):>7.0f} {median(conn_cpus[mover]):>11.0f}"
            print(line)
    finally:
        for proxy in proxies.values():
            proxy.stop()
        echo.kill()
        echo.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
