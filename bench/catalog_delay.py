"""Delay from a Consul catalog change to sdproxy's pool swap, over N changes.

Starts a real Consul dev agent and sdproxy (discovery = consul) on loopback, then
alternately registers and deregisters an instance N times; after each change it polls
the admin API's /upstreams (1 ms apart, bounded by 2 s) until the pool shows the change.
Prints p50/p90/p99/max. Usage: python bench/catalog_delay.py [N]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from proxy.devconsul import ConsulAgent, free_port

SERVICE = "delay-probe"


def endpoint_ids(admin: str) -> set[str]:
    with urllib.request.urlopen(f"{admin}/upstreams", timeout=2) as resp:
        upstreams = json.load(resp)
    return {e["id"] for e in upstreams[0]["endpoints"] if e["state"] != "draining"}


def main(n: int) -> int:
    with ConsulAgent() as agent, tempfile.TemporaryDirectory() as tmp:
        agent.register({"Name": SERVICE, "ID": "base", "Address": "127.0.0.1", "Port": 1,
                        "Check": {"TTL": "1h", "Status": "passing"}})
        admin_port, listen_port = free_port(), free_port()
        cfg = os.path.join(tmp, "delay.toml")
        with open(cfg, "w") as f:
            f.write(f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n'
                    f'[consul]\naddress = "{agent.http_addr}"\n'
                    f'[[upstreams]]\nname = "{SERVICE}"\nlisten = "127.0.0.1:{listen_port}"\n')
        proxy = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", cfg],
                                 stderr=subprocess.DEVNULL)
        admin = f"http://127.0.0.1:{admin_port}"
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    if endpoint_ids(admin) == {"base"}:
                        break
                except OSError:
                    pass
                time.sleep(0.05)
            delays = []
            for i in range(n):
                present = i % 2 == 0
                t0 = time.perf_counter()
                if present:
                    agent.register({"Name": SERVICE, "ID": "probe", "Address": "127.0.0.1",
                                    "Port": 2, "Check": {"TTL": "1h", "Status": "passing"}})
                else:
                    agent.deregister("probe")
                limit = time.monotonic() + 2
                while ("probe" in endpoint_ids(admin)) != present:
                    if time.monotonic() > limit:
                        raise SystemExit(f"change {i} not seen within 2 s")
                    time.sleep(0.001)
                delays.append((time.perf_counter() - t0) * 1000)
        finally:
            proxy.terminate()
            proxy.wait(10)
    delays.sort()

    def pick(q: float) -> float:
        return delays[min(len(delays) - 1, int(q * len(delays)))]

    print(f"consul change -> pool swap over {n} changes (ms, includes the agent API call "
          f"and one admin poll): p50 {pick(0.5):.1f}  p90 {pick(0.9):.1f}  "
          f"p99 {pick(0.99):.1f}  max {delays[-1]:.1f}  mean {statistics.mean(delays):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100))
