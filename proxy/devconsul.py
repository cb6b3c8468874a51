"""A real Consul binary for the demo and the tests, and agents started on free ports.

- `ConsulAgent`: a `consul agent -dev` (optionally pinned `ports`, a `datacenter` and
  `join_wan` to federate two dev agents as two datacenters; `tls` for an HTTPS-only API
  with `verify_incoming`, `acl_master_token` for ACLs in default-deny);
- `ConsulServer` / `ConsulCluster`: non-dev servers forming a real multi-server cluster
  on loopback (data dirs of their own, removed at cleanup), with leader lookup.

The binary is Debian bullseye's `consul` package (1.8.7), fetched into a cache folder
by `proxy.devinstall` without touching the machine's apt setup (the mirror is read from
the machine's own apt configuration).

This module runs outside the data path (demo, tests, `python -m proxy.devconsul`), so it
uses blocking subprocess and urllib calls on purpose.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

from proxy import devinstall
from proxy.devinstall import InstallError, cache_dir, fetch_package
from proxy.devprocess import DevServer

KEYRING = devinstall.KEYRING  # still importable from here, where it used to live

CONSUL_SUITE = "bullseye"
CONSUL_VERSION_PREFIX = "1.8."


class ConsulInstallError(InstallError):
    pass


def debian_mirror() -> str:
    """The machine's Debian archive (`proxy.devinstall.debian_mirror`), raising
    ConsulInstallError as it did when it lived here."""
    try:
        return devinstall.debian_mirror("set SDPROXY_CONSUL_BIN instead")
    except InstallError as e:
        raise ConsulInstallError(str(e)) from None


def installed_binary(environ: dict[str, str] | None = None) -> Path | None:
    env = os.environ if environ is None else environ
    override = env.get("SDPROXY_CONSUL_BIN")
    if override:
        return Path(override)
    path = cache_dir(env) / "consul" / "usr" / "bin" / "consul"
    return path if path.exists() else None


def install(environ: dict[str, str] | None = None, log: Any = None) -> Path:
    """Return the Consul binary, fetching and unpacking it first when missing."""
    env = dict(os.environ if environ is None else environ)
    found = installed_binary(env)
    if found:
        return found
    return fetch_package("consul", CONSUL_SUITE, cache_dir(env) / "consul", "usr/bin/consul",
                         error=ConsulInstallError, hint="set SDPROXY_CONSUL_BIN instead",
                         log=log)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free TCP ports (all held open while picking, so none repeats)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class ConsulPorts:
    """The ports of one agent on 127.0.0.1 (Serf uses its ports for both TCP and UDP).

    Pass the `ports` of a stopped agent to a new `ConsulAgent` to start a replacement at
    the same addresses.
    """

    http: int
    dns: int
    serf_lan: int
    serf_wan: int
    server: int

    @classmethod
    def free(cls) -> ConsulPorts:
        http, dns, serf_lan, serf_wan, server = free_ports(5)
        return cls(http, dns, serf_lan, serf_wan, server)


@dataclass(frozen=True)
class AgentTLS:
    """An agent's API over HTTPS only (`ports { https = N, http = -1 }`).

    `ca_file`, `cert_file`, `key_file`: the agent's CA and its own certificate; with
    `verify_incoming` every client must show a certificate signed by that CA, so
    `client_cert`/`client_key` are what this module's own requests show.
    """

    ca_file: str
    cert_file: str
    key_file: str
    client_cert: str = ""
    client_key: str = ""
    verify_incoming: bool = True


class ConsulAgent(DevServer):
    """A `consul agent -dev` on loopback and free ports; a context manager that ends it.

    `ports` pins the ports (default: free ones); `join_wan` lists `host:port` Serf WAN
    addresses of servers in other datacenters to join (dev agents are servers, so two dev
    agents with different `datacenter`s form a two-datacenter federation on loopback).
    `tls` serves the API over HTTPS only, on the `http` port; `acl_master_token` turns ACLs
    on in default-deny with that token as the master (and the agent's own) token, and this
    class's requests send it.
    """

    def __init__(self, binary: Path | None = None, *, node: str = "sdproxy-dev",
                 datacenter: str = "dc1", extra_args: tuple[str, ...] = (),
                 ports: ConsulPorts | None = None, join_wan: Sequence[str] = (),
                 tls: AgentTLS | None = None, acl_master_token: str = "") -> None:
        self.binary = binary or install()
        self.node = node
        self.datacenter = datacenter
        self.extra_args = extra_args
        self.join_wan = tuple(join_wan)
        self.tls = tls
        self.token = acl_master_token
        self._client_context: ssl.SSLContext | None = None
        ports = ports or ConsulPorts.free()
        self.http_port = ports.http
        self.dns_port = ports.dns
        self.serf_lan_port = ports.serf_lan
        self.serf_wan_port = ports.serf_wan
        self.server_port = ports.server
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="consul-", suffix=".log")[1])

    @property
    def http_addr(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"

    @property
    def ports(self) -> ConsulPorts:
        return ConsulPorts(self.http_port, self.dns_port, self.serf_lan_port,
                           self.serf_wan_port, self.server_port)

    @property
    def serf_lan_addr(self) -> str:
        return f"127.0.0.1:{self.serf_lan_port}"

    @property
    def serf_wan_addr(self) -> str:
        """What another datacenter's server passes to `-join-wan`."""
        return f"127.0.0.1:{self.serf_wan_port}"

    @property
    def server_addr(self) -> str:
        """The server RPC address, as `/v1/status/leader` and `/v1/status/peers` name it."""
        return f"127.0.0.1:{self.server_port}"

    def mode_args(self) -> list[str]:
        """The arguments that make this kind of agent (here: a dev server)."""
        return ["-dev"]

    def command(self) -> list[str]:
        return [
            str(self.binary), "agent", *self.mode_args(), "-bind", "127.0.0.1",
            "-client", "127.0.0.1", "-node", self.node, "-datacenter", self.datacenter,
            *self.api_args(), "-dns-port", str(self.dns_port),
            "-serf-lan-port", str(self.serf_lan_port), "-serf-wan-port", str(self.serf_wan_port),
            "-server-port", str(self.server_port), "-grpc-port", "-1",
            *(arg for addr in self.join_wan for arg in ("-join-wan", addr)),
            *self.extra_args,
        ]

    def api_args(self) -> list[str]:
        """The HTTP(S) API's port, TLS and ACL settings (Consul 1.8's agent config keys)."""
        if self.tls is None:
            args = ["-http-port", str(self.http_port)]
        else:
            t = self.tls
            args = ["-hcl", f"ports {{ http = -1, https = {self.http_port} }}",
                    "-hcl", f"ca_file = {json.dumps(t.ca_file)}",
                    "-hcl", f"cert_file = {json.dumps(t.cert_file)}",
                    "-hcl", f"key_file = {json.dumps(t.key_file)}",
                    "-hcl", f"verify_incoming = {json.dumps(t.verify_incoming)}"]
        if self.token:
            token = json.dumps(self.token)
            acl = ('acl { enabled = true, default_policy = "deny", '
                   f"tokens {{ master = {token}, agent = {token} }} }}")
            args += ["-hcl", acl]
        return args

    NAME = "consul"

    def is_ready(self) -> bool:
        """A leader is known and the agent's own node is in the catalog (registrations
        fail before that)."""
        return bool(self.get("/v1/status/leader") and self.get(f"/v1/catalog/node/{self.node}"))

    def wait_datacenters(self, names: Sequence[str], timeout: float = 15.0) -> list[str]:
        """Wait until `/v1/catalog/datacenters` lists every one of `names`; returns the list."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            try:
                seen = list(self.get("/v1/catalog/datacenters") or [])
            except OSError:
                pass
            if set(names) <= set(seen):
                return seen
            if time.monotonic() > deadline:
                raise RuntimeError(f"consul {self.http_addr}: datacenters {seen}, expected "
                                   f"{list(names)} within {timeout}s")
            time.sleep(0.05)

    # -- small blocking HTTP API client for tests and the demo --------------------------
    def open_api(self, method: str, path: str, body: Any = None,
                 timeout: float = 5.0) -> http.client.HTTPResponse:
        """Send one API request (over TLS with the client certificate, with the token,
        when the agent has them); the caller reads and closes the response."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"X-Consul-Token": self.token} if self.token else {}
        req = urllib.request.Request(self.http_addr + path, data=data, method=method,
                                     headers=headers)
        response: http.client.HTTPResponse = urllib.request.urlopen(
            req, timeout=timeout, context=self.client_context())
        return response

    def client_context(self) -> ssl.SSLContext | None:
        """What this class's requests use with `tls`: the agent's CA, the client cert."""
        if self.tls is None:
            return None
        if self._client_context is None:
            context = ssl.create_default_context(cafile=self.tls.ca_file)
            if self.tls.client_cert:
                context.load_cert_chain(self.tls.client_cert, self.tls.client_key or None)
            self._client_context = context
        return self._client_context

    def request(self, method: str, path: str, body: Any = None, timeout: float = 5.0) -> Any:
        with self.open_api(method, path, body, timeout) as resp:
            raw = resp.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode()

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def put(self, path: str, body: Any = None) -> Any:
        return self.request("PUT", path, body)

    def register(self, service: dict[str, Any]) -> None:
        self.put("/v1/agent/service/register", service)

    def deregister(self, service_id: str) -> None:
        self.put(f"/v1/agent/service/deregister/{service_id}")

    def check_pass(self, check_id: str, note: str = "") -> None:
        self.put(f"/v1/agent/check/pass/{check_id}?note={quote(note)}")

    def check_fail(self, check_id: str, note: str = "") -> None:
        self.put(f"/v1/agent/check/fail/{check_id}?note={quote(note)}")

    def check_warn(self, check_id: str, note: str = "") -> None:
        self.put(f"/v1/agent/check/warn/{check_id}?note={quote(note)}")

    def create_token(self, rules: str, description: str = "") -> str:
        """A new ACL policy with `rules` (HCL) and a new token holding only it; returns the
        token's SecretID (what X-Consul-Token carries). Needs `acl_master_token`."""
        policy = self.put("/v1/acl/policy", {"Name": f"policy-{uuid.uuid4().hex[:12]}",
                                             "Rules": rules})
        token = self.put("/v1/acl/token", {"Description": description,
                                           "Policies": [{"ID": policy["ID"]}]})
        return str(token["SecretID"])


class ConsulServer(ConsulAgent):
    """A non-dev `consul agent -server` with a data dir of its own, member of a cluster.

    `bootstrap_expect` servers elect a leader once they found each other through
    `retry_join` (other servers' Serf LAN addresses). `raft_multiplier = 1` (production
    timing rather than the lenient default of 5) keeps elections on loopback quick.
    """

    def __init__(self, binary: Path | None = None, *, node: str, datacenter: str = "dc1",
                 bootstrap_expect: int = 3, retry_join: Sequence[str] = (),
                 ports: ConsulPorts | None = None, extra_args: tuple[str, ...] = ()) -> None:
        super().__init__(binary, node=node, datacenter=datacenter, extra_args=extra_args,
                         ports=ports)
        self.bootstrap_expect = bootstrap_expect
        self.retry_join = tuple(retry_join)
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"consul-{node}-"))

    def mode_args(self) -> list[str]:
        return [
            "-server", "-bootstrap-expect", str(self.bootstrap_expect),
            "-data-dir", str(self.data_dir), "-hcl", "performance { raft_multiplier = 1 }",
            *(arg for addr in self.retry_join for arg in ("-retry-join", addr)),
            "-retry-interval", "1s",
        ]

    def cleanup(self) -> None:
        super().cleanup()
        shutil.rmtree(self.data_dir, ignore_errors=True)


class ConsulCluster:
    """`size` Consul servers on loopback in one datacenter; a context manager.

    Every server has ports of its own and `-retry-join`s all the others, so the cluster
    forms whatever order the processes come up in. `start` returns once every server
    knows the leader and sees every node in its catalog.
    """

    def __init__(self, size: int = 3, binary: Path | None = None, *,
                 datacenter: str = "dc1", node_prefix: str = "server") -> None:
        binary = binary or install()
        ports = [ConsulPorts(*chunk) for chunk in _chunks(free_ports(5 * size), 5)]
        self.servers = [
            ConsulServer(binary, node=f"{node_prefix}-{i}", datacenter=datacenter,
                         bootstrap_expect=size, ports=p,
                         retry_join=[f"127.0.0.1:{q.serf_lan}" for q in ports if q is not p])
            for i, p in enumerate(ports)]

    def start(self, timeout: float = 60.0) -> Self:
        deadline = time.monotonic() + timeout
        try:
            for server in self.servers:
                server.spawn()
            for server in self.servers:
                server.wait_ready(max(0.1, deadline - time.monotonic()))
            for server in self.servers:
                self._wait_nodes(server, deadline)
        except BaseException:
            self.cleanup()
            raise
        return self

    def _wait_nodes(self, server: ConsulServer, deadline: float) -> None:
        want = {s.node for s in self.servers}
        while True:
            try:
                nodes = {n["Node"] for n in server.get("/v1/catalog/nodes") or []}
                if want <= nodes:
                    return
            except OSError:
                nodes = set()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.node}: catalog nodes {sorted(nodes)}, "
                                   f"expected {sorted(want)}")
            time.sleep(0.05)

    def leader(self, among: Sequence[ConsulServer] | None = None) -> ConsulServer | None:
        """The server that is leader as the first live one of `among` says, or None."""
        for server in among or self.alive():
            try:
                addr = server.get("/v1/status/leader")
            except OSError:
                continue
            for candidate in self.servers:
                if addr == candidate.server_addr:
                    return candidate
            return None  # "" while an election runs
        return None

    def wait_leader(self, among: Sequence[ConsulServer] | None = None,
                    timeout: float = 15.0) -> ConsulServer:
        """Wait until a live server is leader (in the eyes of `among`); return it."""
        deadline = time.monotonic() + timeout
        while True:
            leader = self.leader(among)
            if leader is not None and leader.alive():
                return leader
            if time.monotonic() > deadline:
                raise RuntimeError(f"no live consul leader within {timeout}s")
            time.sleep(0.05)

    def alive(self) -> list[ConsulServer]:
        return [s for s in self.servers if s.alive()]

    def cleanup(self) -> None:
        """Stop every server (SIGTERM, then SIGKILL) and remove data dirs and logs."""
        for server in self.servers:
            server.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def _chunks(items: list[int], n: int) -> list[list[int]]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in ([], ["install"]):
        try:
            print(install())
        except ConsulInstallError as e:
            print(f"sdproxy: consul install: {e}", file=sys.stderr)
            return 1
        return 0
    print("usage: python -m proxy.devconsul [install]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
