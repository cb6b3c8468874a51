"""Running `sdproxy demo` as a newcomer would, for the demo tests (Consul, etcd, ZooKeeper).

- `run_demo(*args)`: the demo, non-interactive (it exits after its report); its exit code
  and its output. A demo that does not finish in time gets SIGINT, not SIGKILL, so that it
  can stop what it started, and the test fails with its output.
- `refuses(port)`: nothing accepts on 127.0.0.1:`port` any more.
- `cmdlines()`: the command lines of every process on the machine (for leftovers).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

DEMO_TIMEOUT = 60.0


def run_demo(*args: str, timeout: float = DEMO_TIMEOUT) -> tuple[int, str]:
    env = {**os.environ, "SDPROXY_DEMO_HOLD": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--duration", "4", "--rate", "100", *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        raise AssertionError(f"demo did not finish within {timeout}s:\n{out.decode()}") from None
    return proc.returncode, out.decode(errors="replace")


def refuses(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


def cmdlines() -> list[str]:
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "cmdline").read_bytes()
            except OSError:
                continue  # exited while we looked
            lines.append(raw.replace(b"\0", b" ").decode(errors="replace"))
    return lines
