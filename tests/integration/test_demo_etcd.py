"""`sdproxy demo --registry etcd` end to end: real etcd, real backends, the real proxy.

The same promise as the Consul demo (tests/integration/test_demo.py): the client sees no
errors while backend-2 is killed, the report says when etcd dropped it (its lease
lapsed), and nothing the demo started is left running or on disk afterwards.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support.demo import refuses, run_demo

pytestmark = pytest.mark.timeout(120)


def test_etcd_demo_survives_a_killed_backend_and_cleans_up() -> None:
    code, out = run_demo("--registry", "etcd")
    assert code == 0, out
    assert "Traceback" not in out, out
    assert "the client saw 0 errors while backend-2 died" in out, out
    lapsed = re.search(r"its key lapsed from etcd \(lease TTL 2s\) (\d+\.\d+)s later", out)
    assert lapsed and 1.0 <= float(lapsed.group(1)) <= 5.0, out

    etcd = re.search(r"etcd at http://127\.0\.0\.1:(\d+) \(data in (\S+)\)", out)
    assert etcd, out
    assert refuses(int(etcd.group(1))), "etcd still listens"
    assert not Path(etcd.group(2)).exists(), "etcd's data dir was left behind"
    for port in re.findall(r"backend-\d on 127\.0\.0\.1:(\d+)", out):
        assert refuses(int(port)), f"backend {port} still up"
