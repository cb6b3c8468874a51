"""The processes the throughput benchmark starts and measures (HAProxy, Envoy, nginx,
sdproxy, wrk, the bulk sink): `Proc`, one started in a session and a temporary folder of
its own with its output in a log file; their CPU time and memory read from /proc;
`taskset` pinning; `wait_port`; and `ToolError`, which every tool module raises.

Kept apart from `loadtest.procs`, the fault scenarios' processes, whose `Child` keeps
the output in memory, line by line, for the scenario to read.

Invariants: every process is started in a session of its own and ended by `stop()`
(SIGTERM, then SIGKILL of that session only); its temporary folder is removed with it.
Linux only (/proc, taskset). Blocking calls on purpose: this runs outside the data path.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Self

REPO_ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 30.0  # seconds for a process to accept connections
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL


class ToolError(RuntimeError):
    """A tool could not be installed, configured or started; the message says which."""


def make_workdir(name: str) -> Path:
    """A new temporary folder for the process `name`; its `Proc.stop()` removes it."""
    return Path(tempfile.mkdtemp(prefix=f"loadtest-{name}-"))


# --- /proc -----------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # stat fields 14, 15


def descendants(pid: int) -> list[int]:
    """pid and every process below it (children, grandchildren...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def rss_bytes(pid: int) -> int:
    """VmRSS of a process in bytes (0 when unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def taskset(cpus: str | None) -> list[str]:
    """The command prefix that pins a new process (and its threads) to `cpus`, e.g. "0"."""
    if not cpus:
        return []
    if not shutil.which("taskset"):
        raise ToolError("taskset not found (Debian package util-linux)")
    return ["taskset", "-c", cpus]


def pin(pid: int, cpus: str) -> None:
    """Pin a running process, every thread of it, to `cpus`."""
    subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], capture_output=True,
                   check=False)


def wait_port(port: int, proc: Proc | None = None, timeout: float = START_TIMEOUT,
              host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and not proc.alive():
            raise ToolError(f"{proc.name} exited {proc.popen.returncode} before listening on "
                            f"{host}:{port}: {proc.log_tail()}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ToolError(f"nothing listens on {host}:{port} after {timeout}s"
                            + (f": {proc.log_tail()}" if proc else ""))
        time.sleep(0.05)



# --- processes -------------------------------------------------------------------------

class Proc:
    """One started process (its own session), output in a log file; `stop()` ends it."""

    def __init__(self, name: str, argv: Sequence[str], *, cwd: str | Path | None = None,
                 env: Mapping[str, str] | None = None, workdir: Path | None = None,
                 stdout: int | IO[Any] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.workdir = workdir or make_workdir(name)
        self.log_path = self.workdir / f"{name}.log"
        with open(self.log_path, "wb") as logf:
            self.popen = subprocess.Popen(
                self.argv, cwd=cwd, env=None if env is None else dict(env),
                stdin=subprocess.DEVNULL, stdout=logf if stdout is None else stdout,
                stderr=logf, start_new_session=True)
        self.pid = self.popen.pid

    def wait_listening(self, ports: Iterable[int], timeout: float = START_TIMEOUT) -> None:
        """Until every port accepts; on failure the process is stopped and ToolError raised."""
        try:
            for port in ports:
                wait_port(port, self, timeout)
        except BaseException:
            self.stop()
            raise

    def alive(self) -> bool:
        return self.popen.poll() is None

    def pids(self) -> list[int]:
        return descendants(self.pid) if self.alive() else []

    def cpu(self) -> float:
        """CPU seconds used so far by the process and its descendants."""
        return sum(cpu_seconds(p) for p in self.pids())

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 1500) -> str:
        return self.log_text()[-n:].strip()

    def stop(self) -> int | None:
        """SIGTERM, wait, then SIGKILL the process's own session; remove the folder."""
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left in the session this process leads (workers, say)
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.popen.poll() is None:
            self.popen.kill()
        try:
            self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(self.workdir, ignore_errors=True)
        return self.popen.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
