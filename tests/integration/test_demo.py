"""`sdproxy demo` end to end: real Consul, real backends, the real proxy.

Runs the demo as a newcomer would (non-interactive, so it exits after its report) and
holds it to its promise: the client sees no errors while a backend is killed, the report
says where to look, and nothing it started is left running afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

DEMO_TIMEOUT = 60.0


def _run_demo() -> tuple[int, str]:
    env = {**os.environ, "SDPROXY_DEMO_HOLD": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--duration", "4", "--rate", "100"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        out, _ = proc.communicate(timeout=DEMO_TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGINT, not SIGKILL: the demo must get the chance to stop what it started.
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        raise AssertionError(f"demo did not finish within {DEMO_TIMEOUT}s:\n{out.decode()}")
    return proc.returncode, out.decode(errors="replace")


def _refuses(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


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


def test_demo_survives_a_killed_backend_and_cleans_up() -> None:
    code, out = _run_demo()
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
    still_open = sorted(p for p in ports if not _refuses(p))
    assert not still_open, f"ports still accepting after the demo exited: {still_open}\n{out}"
    backend_ports = re.findall(r"backend-\d on 127\.0\.0\.1:(\d+)", out)
    consul_port = re.search(r"Consul at http://127\.0\.0\.1:(\d+)", out)
    config = re.search(r"starting sdproxy -c (\S+)", out)
    assert len(backend_ports) == 3 and consul_port and config, out
    leftovers = [
        line for line in _cmdlines()
        if any("proxy.demo.backend" in line and f"--port {p} " in line + " "
               for p in backend_ports)
        or ("consul" in line and f"-http-port {consul_port.group(1)} " in line)
        or config.group(1) in line
    ]
    assert not leftovers, f"processes left running: {leftovers}"
    assert not Path(config.group(1)).exists(), "the demo's temporary config was left behind"
