"""The processes of the catalog-routes load tests (`routes`, `tagroutes`): many backend
instances in a few processes, services registered with Fabio-style `urlprefix-` tags,
and sdproxy with one `[[listeners]]` entry that routes by those tags.

- `start_consul_agent`: the dev agent, optionally with a higher per-client connection
  limit (sdproxy holds one blocking query per routed service);
- `start_ports_backends`: `loadtest.portsbackend` processes, one port per instance,
  started in parallel and pushed on the ExitStack the moment they exist;
- `tagged_registration`: an agent registration of one instance with its route tags and
  (optionally) an HTTP check;
- `start_routed_sdproxy`: sdproxy with `catalog_routes = true` on one listener; returned
  once it listens and `/ready` answers 200, as a `procs.Sdproxy` (admin, metrics, log);
- `RouteProbe`: one keep-alive connection through the listener for setup and for the
  sequential measurements (never inside a paced load);
- `rss_mib`, `cpu_seconds`, `connections_to`: what /proc says of a process.

Invariants: as in `loadtest.procs`, every wait is bounded and every process is on the
stack before anything waits for it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.portsbackend import READY_EVENT, parse_ports
from loadtest.procs import (
    HEALTH_INTERVAL,
    Child,
    ScenarioError,
    Sdproxy,
    http_get,
    say,
    start_consul,
    wait_until,
)
from loadtest.tomlwrite import toml_table
from proxy import devconsul

TAG_PREFIX = "urlprefix-"
# Consul's default `limits.http_max_conns_per_client`: the agent resets any connection
# beyond it from one client IP, and on loopback every client shares 127.0.0.1.
CONSUL_CONNS_PER_CLIENT = 200
PROBE_TIMEOUT = 5.0  # seconds for one request of a RouteProbe


@dataclass
class PortsBackend:
    """A running `python -m loadtest.portsbackend`: `ports` is {instance name: port}."""

    child: Child
    ports: dict[str, int]

    def kill(self) -> None:
        """kill -9: every instance it serves dies at once, nothing said to anyone."""
        self.child.signal(9)


def start_consul_agent(stack: contextlib.ExitStack,
                       conns_per_client: int | None = None) -> devconsul.ConsulAgent:
    """`procs.start_consul`, with `limits.http_max_conns_per_client` set when given
    (None: Consul's default, CONSUL_CONNS_PER_CLIENT)."""
    if conns_per_client is None:
        return start_consul(stack)
    limit = f"limits {{ http_max_conns_per_client = {conns_per_client} }}"
    agent = devconsul.ConsulAgent(devconsul.install(log=lambda m: say(f"    {m}")),
                                  extra_args=("-hcl", limit))
    stack.callback(agent.cleanup)  # before start: a half-started agent too
    agent.start()
    return agent


def start_ports_backends(stack: contextlib.ExitStack,
                         groups: Sequence[Sequence[str]]) -> list[PortsBackend]:
    """One process per group of instance names, all started at once; returned once every
    port of every process accepts connections."""
    children = []
    for k, names in enumerate(groups):
        argv = [sys.executable, "-m", "loadtest.portsbackend"]
        for name in names:
            argv += ["--name", name]
        child = Child(f"backends-{k}", argv)
        stack.callback(child.stop, 3.0)
        children.append(child)
    return [PortsBackend(child, parse_ports(child.wait_for(READY_EVENT)))
            for child in children]


def route_tags(route: str, extra: Sequence[str] = ("v1",)) -> list[str]:
    """The tags of an instance whose service is routed at `route` ("host/path/" or
    "/path/"); an ordinary tag beside it, as real services carry."""
    return [f"{TAG_PREFIX}{route}", *extra]


def tagged_registration(service: str, instance: str, port: int, tags: Sequence[str], *,
                        check: bool = True, interval: str = HEALTH_INTERVAL,
                        ) -> dict[str, Any]:
    """The agent registration of one instance of `service`. With `check`, an HTTP check
    on /health that starts passing (a re-registration that changes only the tags must
    not make a live instance critical until its next check)."""
    body: dict[str, Any] = {"ID": instance, "Name": service, "Address": "127.0.0.1",
                            "Port": port, "Tags": list(tags)}
    if check:
        body["Check"] = {"HTTP": f"http://127.0.0.1:{port}/health", "Interval": interval,
                         "Timeout": interval, "DeregisterCriticalServiceAfter": "1m",
                         "Status": "passing"}
    return body


def routed_config(admin: tuple[str, int], listen: tuple[str, int], consul_addr: str,
                  defaults: Mapping[str, Any] | None = None) -> str:
    """One `[[listeners]]` entry with `catalog_routes = true` and no configured route;
    `defaults` ([defaults]) is the template of every upstream a tag makes."""
    parts = [toml_table("[admin]", {"listen": f"{admin[0]}:{admin[1]}"}),
             toml_table("[consul]", {"address": consul_addr}),
             toml_table("[defaults]", {"drain_timeout": "2s", **(defaults or {})}),
             toml_table("[[listeners]]", {"listen": f"{listen[0]}:{listen[1]}",
                                          "catalog_routes": True, "tag_prefix": TAG_PREFIX})]
    return "\n".join(parts)


def start_routed_sdproxy(stack: contextlib.ExitStack, consul_addr: str,
                         defaults: Mapping[str, Any] | None = None) -> Sdproxy:
    """sdproxy with one catalog-routed listener; returned once it listens and /ready
    answers 200. Stopped first by `stack` (SIGTERM: it drains)."""
    admin = ("127.0.0.1", devconsul.free_port())
    listen = ("127.0.0.1", devconsul.free_port())
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sdproxy-routes-")))
    text = routed_config(admin, listen, consul_addr, defaults)
    path = workdir / "sdproxy.toml"
    path.write_text(text)
    child = Child("sdproxy", [sys.executable, "-m", "proxy", "run", "-c", str(path)])
    stack.callback(child.stop, 10.0)
    child.wait_for("event=listening", f"listener={listen[0]}:{listen[1]}")
    proxy = Sdproxy(child, "", listen, f"http://127.0.0.1:{admin[1]}", text)
    try:
        wait_until("sdproxy /ready", lambda: child.alive() and
                   http_get(f"{proxy.admin}/ready")[0] == 200)
    except ScenarioError as e:
        raise ScenarioError(f"{e}\n{child.output()}") from None
    return proxy


class RouteProbe:
    """One HTTP/1.1 keep-alive connection to the listener (blocking: setup and the
    sequential measurements only). A connection the proxy closed is an error, never
    silently reopened: a route change must not cost a connection."""

    def __init__(self, listen: tuple[str, int]) -> None:
        self.conn = http.client.HTTPConnection(listen[0], listen[1], timeout=PROBE_TIMEOUT)
        self.requests = 0

    def get(self, host: str, path: str) -> tuple[int, str]:
        self.conn.request("GET", path, headers={"Host": host})
        resp = self.conn.getresponse()
        body = resp.read().decode(errors="replace")
        self.requests += 1
        if resp.will_close:
            raise ScenarioError(f"sdproxy closed the connection after GET {host}{path} "
                                f"({resp.status})")
        return resp.status, body

    def until(self, host: str, path: str, status: int, since: float, timeout: float,
              body: str | None = None, every: float = 0.002) -> float | None:
        """Seconds from `since` (perf_counter) until GET answers `status` (and `body`,
        when given), asking every `every` s; None when `timeout` passes first."""
        while True:
            got = self.get(host, path)
            if got[0] == status and (body is None or got[1] == body):
                return time.perf_counter() - since
            if time.perf_counter() - since > timeout:
                return None
            time.sleep(every)

    def close(self) -> None:
        self.conn.close()


def rss_mib(pid: int) -> float:
    """VmRSS of `pid` in MiB (0 when gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used so far, in seconds (0 when gone)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        # Fields after the command name (which may hold spaces): utime, stime are 14, 15.
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def connections_to(pid: int, port: int) -> int:
    """Established TCP connections of `pid` to 127.0.0.1:`port` (e.g. its Consul
    watches), from /proc/PID/fd and /proc/net/tcp."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        if state == "01" and inode in inodes and int(remote.split(":")[1], 16) == port:
            count += 1
    return count
