"""Bulk TCP transfer through a proxy, both ends from `loadtest/fastbackend.py`: `Sink`
(the backend: reads, discards, answers the byte count) and `run_bulk` (the sender).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

from loadtest.benchprocs import REPO_ROOT, Proc, ToolError, taskset
from proxy.devconsul import free_port


class Sink(Proc):
    """`python -m loadtest.fastbackend sink`: reads and discards, answers the byte count."""

    def __init__(self, port: int | None = None, *, cpus: str | None = None,
                 python: str | None = None) -> None:
        self.port = port or free_port()
        super().__init__("sink", [*taskset(cpus), python or sys.executable, "-m",
                                  "loadtest.fastbackend", "sink", "--port", str(self.port)],
                         cwd=REPO_ROOT)
        self.wait_listening([self.port])


@dataclass(frozen=True)
class BulkResult:
    bytes: int
    seconds: float
    acked: int

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


def run_bulk(port: int, nbytes: int, *, cpus: str | None = None, python: str | None = None,
             timeout: float = 300.0) -> BulkResult:
    """Send `nbytes` through 127.0.0.1:`port` to a Sink; raises ToolError if any went missing."""
    argv = [*taskset(cpus), python or sys.executable, "-m", "loadtest.fastbackend", "send",
            "--port", str(port), "--bytes", str(nbytes), "--timeout", str(timeout)]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, check=False,
                          timeout=timeout + 30)
    try:
        out = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise ToolError(f"bulk sender exited {done.returncode}: {done.stderr.strip()[-800:]}")
    if "error" in out:
        raise ToolError(f"bulk sender: {out['error']}")
    result = BulkResult(int(out["bytes"]), float(out["seconds"]), int(out["acked"]))
    if result.acked != result.bytes:
        raise ToolError(f"bulk transfer lost bytes: sent {result.bytes}, sink got {result.acked}")
    return result
