"""`sdproxy demo --registry zookeeper` end to end: real ZooKeeper, real backends, the proxy.

The same promise as the Consul demo (tests/integration/test_demo.py): the client sees no
errors while backend-2 is killed, the report says when ZooKeeper dropped it (its
registrant died with it and the session expired), and nothing the demo started is left
running or on disk afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)
DEMO_TIMEOUT = 60.0


def _cmdlines() -> list[str]:
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "cmdline").read_bytes()
            except OSError:
                continue  # exited while we looked
            lines.append(raw.replace(b"\0", b" ").decode(errors="replace"))
    return lines


def test_zookeeper_demo_survives_a_killed_backend_and_cleans_up() -> None:
    env = {**os.environ, "SDPROXY_DEMO_HOLD": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--registry", "zookeeper", "--duration", "4",
         "--rate", "100"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        raw, _ = proc.communicate(timeout=DEMO_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # the demo must get the chance to stop its children
        raw, _ = proc.communicate(timeout=30)
        raise AssertionError(f"demo did not finish within {DEMO_TIMEOUT}s:\n{raw.decode()}")
    out = raw.decode(errors="replace")
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    assert "the client saw 0 errors while backend-2 died" in out, out
    deleted = re.search(r"ZooKeeper deleted its znode \(session timeout 2s\) (\d+\.\d+)s later",
                        out)
    # The session expires 2 s after the last heartbeat; ZooKeeper checks every tick (0.5 s).
    assert deleted and 1.0 <= float(deleted.group(1)) <= 5.0, out

    zk = re.search(r"ZooKeeper at 127\.0\.0\.1:(\d+) \(data in (\S+)\)", out)
    assert zk, out
    with socket.socket() as s:
        s.settimeout(1)
        assert s.connect_ex(("127.0.0.1", int(zk.group(1)))) != 0, "ZooKeeper still listens"
    assert not Path(zk.group(2)).exists(), "ZooKeeper's data dir was left behind"
    for port in re.findall(r"backend-\d on 127\.0\.0\.1:(\d+)", out):
        with socket.socket() as s:
            s.settimeout(1)
            assert s.connect_ex(("127.0.0.1", int(port))) != 0, f"backend {port} still up"
    leftovers = [line for line in _cmdlines()
                 if "proxy.devzk register" in line and f"127.0.0.1:{zk.group(1)}" in line]
    assert not leftovers, f"registrants left running: {leftovers}"
