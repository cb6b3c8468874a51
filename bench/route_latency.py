"""Catalog routes end to end: from a service registering with a `urlprefix-` tag to the
first request sdproxy routes to it, and sdproxy's memory, with 10, 100 and 500 routed
services.

Starts a real Consul dev agent, one demo backend (every service's instance) and sdproxy
with one `[[listeners]]` entry, `catalog_routes = true`. For each size in --sizes the
catalog first holds that many tagged services (each gets an upstream and a watch of its
own in sdproxy); then --changes times, one after the other, a new service registers with
the tag `urlprefix-/<name>/` and a client on one keep-alive connection asks for
`/<name>/` until it gets 200, timed from before the registering PUT (agent API, Raft
commit, the service-list watch, the new upstream's first health answer, the table swap).
The same services are then deregistered, each timed until its route answers 404.
Printed per size: p50/p99/max of both, sdproxy's VmRSS, its open connections to the
agent, and whether every route was served.

Every routed service is one blocking query, so one connection to the agent: Consul's
default `limits { http_max_conns_per_client = 200 }` refuses the 201st connection from
one address (the watches' and everyone else's on that host). `--agent-conns N` starts
the agent with that limit raised to N.

Usage: python bench/route_latency.py [--sizes 10,100,500] [--changes 50] [--agent-conns N]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from loadtest.procs import Child, http_get, start_backend, wait_until
from proxy import devconsul
from proxy.devconsul import ConsulAgent, free_port

CHANGE_TIMEOUT = 10.0  # a registration not routed within this counts as failed
POLL = 0.002  # between two requests of the client that waits for a route


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def connections_to(pid: int, port: int) -> int:
    """Established TCP connections of `pid` to 127.0.0.1:`port` (its watches)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        if state == "01" and inode in inodes and int(remote.split(":")[1], 16) == port:
            count += 1
    return count


def register(agent: ConsulAgent, name: str, port: int) -> None:
    # No check: passing at once, as a service whose check already passed.
    agent.register({"Name": name, "ID": name, "Address": "127.0.0.1", "Port": port,
                    "Tags": [f"urlprefix-/{name}/", "v1"]})


def status_of(conn: http.client.HTTPConnection, path: str) -> int:
    conn.request("GET", path, headers={"Host": "bench.example"})
    resp = conn.getresponse()
    resp.read()
    return resp.status


def until_status(conn: http.client.HTTPConnection, path: str, status: int,
                 since: float) -> float | None:
    """Seconds from `since` until GET `path` answers `status`; None after CHANGE_TIMEOUT."""
    while True:
        if status_of(conn, path) == status:
            return time.perf_counter() - since
        if time.perf_counter() - since > CHANGE_TIMEOUT:
            return None
        time.sleep(POLL)


def summary(label: str, delays: list[float | None]) -> str:
    done = sorted(d for d in delays if d is not None)
    if not done:
        return f"{label}: none of {len(delays)}"
    p99 = done[min(len(done) - 1, round(0.99 * (len(done) - 1)))]
    return (f"{label}: p50 {statistics.median(done) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
            f"max {done[-1] * 1000:.1f} ms ({len(done)}/{len(delays)} within "
            f"{CHANGE_TIMEOUT:g}s)")


def run(sizes: list[int], changes: int, agent_conns: int | None) -> int:
    with contextlib.ExitStack() as stack:
        extra = (() if agent_conns is None else
                 ("-hcl", f"limits {{ http_max_conns_per_client = {agent_conns} }}"))
        agent = ConsulAgent(devconsul.install(), extra_args=extra)
        stack.callback(agent.cleanup)
        agent.start()
        backend = start_backend(stack, "b")
        listen, admin = free_port(), free_port()
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="routes-")))
        config = workdir / "sdproxy.toml"
        config.write_text(f'[admin]\nlisten = "127.0.0.1:{admin}"\n'
                          f'[consul]\naddress = "{agent.http_addr}"\n'
                          f'[[listeners]]\nlisten = "127.0.0.1:{listen}"\n'
                          "catalog_routes = true\n")
        proxy = Child("sdproxy", [sys.executable, "-m", "proxy", "run", "-c", str(config)])
        stack.callback(proxy.stop, 10.0)
        proxy.wait_for("event=listening", "listener=")
        pid = proxy.proc.pid
        agent_port = int(agent.http_addr.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", listen, timeout=5)
        print(f"sdproxy {pid}, RSS {rss_mib(pid):.1f} MiB with no route", flush=True)
        registered = 0
        for size in sizes:
            try:
                for i in range(registered, size):
                    register(agent, f"base-{i}", backend.port)
            except OSError as e:
                print(f"{size} routed services: the agent refused a registration after "
                      f"{i}: {e!r} (sdproxy held {connections_to(pid, agent_port)} "
                      "connections to it; see --agent-conns)", flush=True)
                return 1
            registered = size
            last = f"/base-{size - 1}/"
            wait_until(f"{size} routes served",
                       lambda last=last: status_of(conn, last) == 200, timeout=60)
            time.sleep(1.0)  # let every watch settle before reading memory
            rss, watches = rss_mib(pid), connections_to(pid, agent_port)
            added: list[float | None] = []
            for i in range(changes):
                name = f"new-{size}-{i}"
                t0 = time.perf_counter()
                register(agent, name, backend.port)
                added.append(until_status(conn, f"/{name}/", 200, t0))
            removed: list[float | None] = []
            for i in range(changes):
                name = f"new-{size}-{i}"
                t0 = time.perf_counter()
                agent.deregister(name)
                removed.append(until_status(conn, f"/{name}/", 404, t0))
            _status, body = http_get(f"http://127.0.0.1:{admin}/upstreams")
            failing = sum(1 for up in json.loads(body) if up.get("catalog_errors"))
            print(f"{size} routed services: RSS {rss:.1f} MiB, {watches} connections to the "
                  f"agent, {failing} upstreams with catalog errors", flush=True)
            print("  " + summary("registered -> routed", added), flush=True)
            print("  " + summary("deregistered -> 404", removed), flush=True)
        conn.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,500")
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--agent-conns", type=int, default=None,
                        help="the agent's http_max_conns_per_client (default: Consul's)")
    args = parser.parse_args(argv)
    return run([int(s) for s in args.sizes.split(",")], args.changes, args.agent_conns)


if __name__ == "__main__":
    raise SystemExit(main())
