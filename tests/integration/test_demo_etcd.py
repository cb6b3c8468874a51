"""`sdproxy demo --registry etcd` end to end: real etcd, real backends, the real proxy.

The same promise as the Consul demo (tests/integration/test_demo.py): the client sees no
errors while backend-2 is killed, the report says when etcd dropped it (its lease
lapsed), and nothing the demo started is left running or on disk afterwards.
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


def test_etcd_demo_survives_a_killed_backend_and_cleans_up() -> None:
    env = {**os.environ, "SDPROXY_DEMO_HOLD": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--registry", "etcd", "--duration", "4",
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
    lapsed = re.search(r"its key lapsed from etcd \(lease TTL 2s\) (\d+\.\d+)s later", out)
    assert lapsed and 1.0 <= float(lapsed.group(1)) <= 5.0, out

    etcd = re.search(r"etcd at http://127\.0\.0\.1:(\d+) \(data in (\S+)\)", out)
    assert etcd, out
    with socket.socket() as s:
        s.settimeout(1)
        assert s.connect_ex(("127.0.0.1", int(etcd.group(1)))) != 0, "etcd still listens"
    assert not Path(etcd.group(2)).exists(), "etcd's data dir was left behind"
    for port in re.findall(r"backend-\d on 127\.0\.0\.1:(\d+)", out):
        with socket.socket() as s:
            s.settimeout(1)
            assert s.connect_ex(("127.0.0.1", int(port))) != 0, f"backend {port} still up"
