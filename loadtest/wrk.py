"""wrk, the HTTP load generator of the throughput benchmark: `run_wrk` runs it pinned to
chosen CPUs and `parse_wrk` reads its report (requests/s, latency percentiles, errors).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from loadtest.apt import find_binary
from loadtest.benchprocs import ToolError, taskset

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_LATENCY = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([0-9.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s*([0-9.]+)", re.MULTILINE)
_TOTAL = re.compile(r"^\s*([0-9]+) requests in ([0-9.]+)(us|ms|s|m|h)", re.MULTILINE)
_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s*([0-9]+)")
_SOCKET = re.compile(r"Socket errors: connect ([0-9]+), read ([0-9]+), write ([0-9]+), "
                     r"timeout ([0-9]+)")


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    latency_ms: dict[int, float]  # percentile -> milliseconds (50, 75, 90, 99)
    non_2xx: int = 0
    connect_errors: int = 0
    read_errors: int = 0
    write_errors: int = 0
    timeouts: int = 0
    raw: str = ""

    @property
    def p99_ms(self) -> float:
        return self.latency_ms.get(99, float("nan"))

    @property
    def errors(self) -> int:
        return (self.non_2xx + self.connect_errors + self.read_errors + self.write_errors
                + self.timeouts)

    def error_text(self) -> str:
        parts = []
        if self.non_2xx:
            parts.append(f"non-2xx {self.non_2xx}")
        for name, n in (("connect", self.connect_errors), ("read", self.read_errors),
                        ("write", self.write_errors), ("timeout", self.timeouts)):
            if n:
                parts.append(f"{name} {n}")
        return ", ".join(parts) or "0"


def parse_wrk(text: str) -> WrkResult:
    """Requests/sec, latency percentiles (`--latency`) and error counts from wrk's report."""
    rps = _RPS.search(text)
    if not rps:
        raise ToolError(f"wrk report without Requests/sec: {text.strip()[-800:]}")
    latency = {int(p): float(v) * _UNITS[u] for p, v, u in _LATENCY.findall(text)}
    total = _TOTAL.search(text)
    requests, seconds = 0, 0.0
    if total:
        requests = int(total.group(1))
        seconds = float(total.group(2)) * _UNITS[total.group(3)] / 1e3
    non = _NON2XX.search(text)
    sock = _SOCKET.search(text)
    c, r, w, t = (int(x) for x in sock.groups()) if sock else (0, 0, 0, 0)
    return WrkResult(requests=requests, seconds=seconds, rps=float(rps.group(1)),
                     latency_ms=latency, non_2xx=int(non.group(1)) if non else 0,
                     connect_errors=c, read_errors=r, write_errors=w, timeouts=t, raw=text)


def run_wrk(url: str, *, duration: float, connections: int = 50, threads: int = 1,
            cpus: str | None = None, timeout_s: float = 5.0,
            binary: str | None = None) -> WrkResult:
    """`taskset -c CPUS wrk -tT -cC -dDs --latency URL`, parsed."""
    wrk = binary or find_binary("wrk") or "wrk"
    argv = [*taskset(cpus), wrk, f"-t{threads}", f"-c{connections}",
            f"-d{max(1, round(duration))}s", "--latency", "--timeout", f"{timeout_s:g}s", url]
    done = subprocess.run(argv, capture_output=True, text=True, check=False,
                          timeout=duration + 60)
    if done.returncode != 0:
        raise ToolError(f"wrk exited {done.returncode}: {done.stderr.strip()[-800:]}")
    return parse_wrk(done.stdout)
