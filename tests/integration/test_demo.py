"""`sdproxy demo` end to end: real Consul, real backends, the real proxy.

Runs the demo as a newcomer would (non-interactive, so it exits after its report) and
holds it to its promise: the client sees no errors while a backend is killed, the report
says where to look, and nothing it started is left running afterwards.
"""

from __future__ import annotations

import re
from pathlib import Path

from support.demo import cmdlines, refuses, run_demo


def test_demo_survives_a_killed_backend_and_cleans_up() -> None:
    code, out = run_demo()
    assert code == 0, out
    assert "Traceback" not in out, out
    assert "the client saw 0 errors while backend-2 died" in out, out
    assert re.search(r"^\s*errors\s+0\s*$", out, re.MULTILINE), out

    admin = re.search(r"admin page\s+(http://127\.0\.0\.1:(\d+)/)", out)
    assert admin, out
    assert re.search(re.escape(admin.group(1)) + "metrics", out), out
    assert re.search(re.escape(admin.group(1)) + "upstreams", out), out

    # Every process the demo started is gone: its ports refuse, no command line remains.
    ports = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", out)}
    assert len(ports) >= 6, out  # Consul, three backends, the listener, the admin API
    still_open = sorted(p for p in ports if not refuses(p))
    assert not still_open, f"ports still accepting after the demo exited: {still_open}\n{out}"
    backend_ports = re.findall(r"backend-\d on 127\.0\.0\.1:(\d+)", out)
    consul_port = re.search(r"Consul at http://127\.0\.0\.1:(\d+)", out)
    config = re.search(r"starting sdproxy -c (\S+)", out)
    assert len(backend_ports) == 3 and consul_port and config, out
    leftovers = [
        line for line in cmdlines()
        if any("proxy.demo.backend" in line and f"--port {p} " in line + " "
               for p in backend_ports)
        or ("consul" in line and f"-http-port {consul_port.group(1)} " in line)
        or config.group(1) in line
    ]
    assert not leftovers, f"processes left running: {leftovers}"
    assert not Path(config.group(1)).exists(), "the demo's temporary config was left behind"
