"""`sdproxy demo --registry zookeeper` end to end: real ZooKeeper, real backends, the proxy.

The same promise as the Consul demo (tests/integration/test_demo.py): the client sees no
errors while backend-2 is killed, the report says when ZooKeeper dropped it (its
registrant died with it and the session expired), and nothing the demo started is left
running or on disk afterwards.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support.demo import cmdlines, refuses, run_demo

pytestmark = pytest.mark.timeout(120)


def test_zookeeper_demo_survives_a_killed_backend_and_cleans_up() -> None:
    code, out = run_demo("--registry", "zookeeper")
    assert code == 0, out
    assert "Traceback" not in out, out
    assert "the client saw 0 errors while backend-2 died" in out, out
    deleted = re.search(r"ZooKeeper deleted its znode \(session timeout 2s\) (\d+\.\d+)s later",
                        out)
    # The session expires 2 s after the last heartbeat; ZooKeeper checks every tick (0.5 s).
    assert deleted and 1.0 <= float(deleted.group(1)) <= 5.0, out

    zk = re.search(r"ZooKeeper at 127\.0\.0\.1:(\d+) \(data in (\S+)\)", out)
    assert zk, out
    assert refuses(int(zk.group(1))), "ZooKeeper still listens"
    assert not Path(zk.group(2)).exists(), "ZooKeeper's data dir was left behind"
    for port in re.findall(r"backend-\d on 127\.0\.0\.1:(\d+)", out):
        assert refuses(int(port)), f"backend {port} still up"
    leftovers = [line for line in cmdlines()
                 if "proxy.devzk register" in line and f"127.0.0.1:{zk.group(1)}" in line]
    assert not leftovers, f"registrants left running: {leftovers}"
