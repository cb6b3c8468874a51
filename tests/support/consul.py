"""Registering test backends in the session's shared Consul dev agent.

The agent lives for the whole test session, so every test must use service names of its
own (`unique_service`). A registration carries an explicit check id, so a test can flip a
TTL check with `consul.check_fail(reg.check_id)` / `check_pass`; `ttl_instance` is the
bare registration body, for tests that talk to an agent of their own. `wait_passing`
waits on Consul blocking queries (event-driven, bounded) until the catalog shows exactly
the expected passing instances, so the proxy's first catalog answer already contains
them.

`make_certificates` writes a private CA and certificates signed by it (support.tls, made
fresh by each test, valid for a day) for an agent with TLS and `verify_incoming` and for
its clients.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from proxy.devconsul import ConsulAgent

CheckKind = Literal["ttl", "http", "none"]


def unique_service(prefix: str = "svc") -> str:
    """A DNS-safe service name no other test uses: `<prefix>-<8 hex>`."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Registration:
    """What was registered: `service_id` is the proxy's endpoint id for this instance."""

    service: str
    service_id: str
    check_id: str  # "" when check == "none"
    check: CheckKind
    port: int
    address: str
    tags: tuple[str, ...]


def register_backend(
    consul: ConsulAgent,
    service: str,
    port: int,
    *,
    service_id: str | None = None,
    check: CheckKind = "ttl",
    status: str = "passing",
    tags: Iterable[str] = (),
    address: str = "127.0.0.1",
    weight: int | None = None,
    interval: str = "1s",
    meta: dict[str, str] | None = None,
) -> Registration:
    """Register one instance of `service` at `address:port` with one check.

    - `check="ttl"`: a TTL check (TTL 10 minutes, so it only changes when the test says so)
      starting in `status`; id `<service_id>:ttl`.
    - `check="http"`: GET http://127.0.0.1:<port>/health every `interval` (timeout 1s),
      starting in `status` so the instance is routable before the first probe; id
      `<service_id>:http`. Consul notices a dead backend only at the next probe.
    - `check="none"`: no check (Consul counts the instance as passing).
    `address=""` leaves Service.Address empty (Consul answers with Node.Address).
    """
    sid = service_id or f"{service}-{port}"
    body: dict[str, Any] = {"Name": service, "ID": sid, "Port": port, "Address": address,
                            "Tags": list(tags)}
    if weight is not None:
        body["Weights"] = {"Passing": weight, "Warning": 1}
    if meta:
        body["Meta"] = meta
    check_id = ""
    if check == "ttl":
        check_id = f"{sid}:ttl"
        body["Check"] = {"CheckID": check_id, "Name": f"ttl {sid}", "TTL": "10m",
                         "Status": status}
    elif check == "http":
        check_id = f"{sid}:http"
        body["Check"] = {"CheckID": check_id, "Name": f"http {sid}",
                         "HTTP": f"http://127.0.0.1:{port}/health", "Interval": interval,
                         "Timeout": "1s", "Status": status}
    consul.register(body)
    return Registration(service=service, service_id=sid, check_id=check_id, check=check,
                        port=port, address=address, tags=tuple(tags))


def ttl_instance(name: str, sid: str, port: int, status: str = "passing", *,
                 address: str = "127.0.0.2", **extra: Any) -> dict[str, Any]:
    """An agent registration body: instance `sid` of `name` with one TTL check
    `<sid>-ttl` in `status` (TTL long: it changes only when the test says so)."""
    return {"Name": name, "ID": sid, "Address": address, "Port": port,
            "Check": {"CheckID": f"{sid}-ttl", "TTL": "10m", "Status": status}, **extra}


def health_service(consul: ConsulAgent, service: str, *, passing: bool = True,
                   index: int = 0, wait: float = 0.0) -> tuple[list[dict[str, Any]], int]:
    """`/v1/health/service/<service>` (a blocking query when index > 0): (entries, index)."""
    query: dict[str, str] = {}
    if passing:
        query["passing"] = "1"
    if index > 0:
        query["index"] = str(index)
        query["wait"] = f"{max(wait, 0.05):.3f}s"
    path = (f"/v1/health/service/{urllib.parse.quote(service)}?"
            + urllib.parse.urlencode(query))
    with consul.open_api("GET", path, timeout=wait + 5.0) as resp:
        entries: list[dict[str, Any]] = json.loads(resp.read())
        new_index = int(resp.headers.get("X-Consul-Index", "0") or 0)
    return entries, new_index


def wait_passing(consul: ConsulAgent, service: str, ids: Iterable[str],
                 timeout: float = 10.0) -> None:
    """Block until the catalog's passing instances of `service` are exactly `ids`.

    Uses blocking queries, so it returns as soon as Consul changes; fails after `timeout`.
    """
    want = set(ids)
    deadline = time.monotonic() + timeout
    index = 0
    while True:
        left = deadline - time.monotonic()
        entries, index = health_service(consul, service, index=index,
                                        wait=min(max(left, 0.05), 2.0))
        got = {e["Service"]["ID"] for e in entries}
        if got == want:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"consul: passing instances of {service} are {sorted(got)}, "
                                 f"expected {sorted(want)} (waited {timeout}s)")


# -- TLS: a private CA and certificates, made by the test ---------------------------------
SERVER_NAME = "server.dc1.consul"  # the name Consul's own tooling gives a dc1 server


@dataclass(frozen=True)
class CertificateFiles:
    """PEM files in one folder: a CA; a server certificate for `127.0.0.1`, `localhost`
    and SERVER_NAME; a client certificate (`verify_incoming` asks for one); and a second
    CA that signed none of them (an agent checked against it fails verification)."""

    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_file: Path


def make_certificates(directory: Path) -> CertificateFiles:
    from support.tls import TestCA

    ca = TestCA(directory)
    other_ca = TestCA(directory, "sdproxy test CA that signed nothing")
    # A Consul server is also a client of other servers' RPC.
    server = ca.issue("server", [SERVER_NAME, "localhost", "127.0.0.1"], client=True)
    client = ca.issue("client", ["sdproxy"], server=False, client=True)
    return CertificateFiles(
        ca_file=ca.ca_file,
        server_cert=server.cert_file,
        server_key=server.key_file,
        client_cert=client.cert_file,
        client_key=client.key_file,
        other_ca_file=other_ca.ca_file,
    )
