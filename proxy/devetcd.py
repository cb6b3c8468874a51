"""A real etcd for the demo, the tests and the load tests: a single member on free ports.

- `install()`: Debian bookworm's `etcd-server` package (etcd 3.4), fetched into
  `~/.cache/sdproxy/etcd` by `proxy.devinstall` without touching the machine's apt setup
  (`SDPROXY_ETCD_BIN` names a binary you already have instead).
- `EtcdServer`: one member listening on 127.0.0.1 only (client and peer URLs), with a data
  dir of its own that survives `kill()`/`stop()`, so `start()` again is the same server
  coming back (same ports, same keys, same revision); `cleanup()` removes it. Election
  timing is shortened (loopback), which also lowers etcd's minimum lease TTL to 0.75 s.
- `EtcdCluster`: three (or `size`) such members forming one cluster.
- `EtcdClient`: a small blocking client of the v3 JSON gateway (`put`, `delete`, `grant`,
  `keepalive`, `range_prefix`, `compact`); an `EtcdServer` is one.
- `Registration`: keeps one `<prefix>/<service>/<id>` key alive on a lease the way
  Registrator's etcd backend keeps its TTL key fresh; `python -m proxy.devetcd keep URL
  KEY VALUE TTL` is one as a process (a registrar that a test can `kill -9`).

This module runs outside the data path, so it uses blocking subprocess and urllib calls on
purpose.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self

from proxy.devconsul import free_ports
from proxy.devinstall import InstallError, cache_dir, fetch_package
from proxy.devprocess import DevServer

ETCD_SUITE = "bookworm"  # etcd-server 3.4: the /v3 gateway (bullseye's 3.3 has /v3beta)
HEARTBEAT_MS = 50
ELECTION_MS = 500
REQUEST_TIMEOUT = 5.0
ALIVE_POLL = 0.1  # how often a Registration looks whether its instance still lives


class EtcdInstallError(InstallError):
    pass


def installed_binary(environ: Mapping[str, str] | None = None) -> Path | None:
    env = os.environ if environ is None else environ
    override = env.get("SDPROXY_ETCD_BIN")
    if override:
        return Path(override)
    path = cache_dir(env) / "etcd" / "usr" / "bin" / "etcd"
    return path if path.exists() else None


def install(environ: Mapping[str, str] | None = None, log: Any = None) -> Path:
    """Return the etcd binary, fetching and unpacking it first when missing."""
    env = dict(os.environ if environ is None else environ)
    found = installed_binary(env)
    if found:
        return found
    return fetch_package("etcd-server", ETCD_SUITE, cache_dir(env) / "etcd", "usr/bin/etcd",
                         error=EtcdInstallError, hint="set SDPROXY_ETCD_BIN instead", log=log)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def unb64(text: str) -> str:
    return base64.b64decode(text).decode()


class EtcdClient:
    """A small blocking client of one etcd's v3 JSON gateway (`url`: its client URL)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def call(self, path: str, body: Mapping[str, Any], timeout: float = REQUEST_TIMEOUT) -> Any:
        """POST one gateway request (`/v3/kv/put`, ...) and return its decoded answer."""
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            answer = json.load(resp)
        if isinstance(answer, dict) and "result" in answer:  # a one-message stream
            answer = answer["result"]
        return answer

    def put(self, key: str, value: str, lease: int = 0) -> int:
        """Write `key`; returns the revision it was written at."""
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self.call("/v3/kv/put", body)["header"]["revision"])

    def delete(self, key: str) -> int:
        """Delete `key`; returns how many keys went."""
        return int(self.call("/v3/kv/deleterange", {"key": b64(key)}).get("deleted", 0))

    def grant(self, ttl: float) -> int:
        """A new lease of `ttl` seconds (etcd rounds up to whole seconds); its id."""
        return int(self.call("/v3/lease/grant", {"TTL": max(1, round(ttl + 0.499))})["ID"])

    def keepalive(self, lease: int) -> int:
        """Refresh `lease`; the TTL it has again (0: it had expired)."""
        return int(self.call("/v3/lease/keepalive", {"ID": str(lease)}).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        self.call("/v3/lease/revoke", {"ID": str(lease)})

    def range_prefix(self, prefix: str) -> dict[str, str]:
        """Every key under `prefix` and its value."""
        answer = self.call("/v3/kv/range", {"key": b64(prefix),
                                            "range_end": b64(prefix_end(prefix))})
        return {unb64(kv["key"]): unb64(kv.get("value", "")) for kv in answer.get("kvs", [])}

    def revision(self) -> int:
        return int(self.call("/v3/kv/range", {"key": b64("\0"), "count_only": True})
                   ["header"]["revision"])

    def compact(self, revision: int) -> None:
        self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})



class EtcdServer(EtcdClient, DevServer):
    """A single-member etcd on 127.0.0.1; a context manager that ends it and removes its
    data dir. `client_port`/`peer_port` default to free ones and stay the same across
    `kill()` and `start()`; `url` is the client URL, as `[etcd] endpoints` lists it."""

    def __init__(self, binary: Path | None = None, *, name: str = "sdproxy-etcd",
                 client_port: int = 0, peer_port: int = 0, initial_cluster: str = "") -> None:
        self.binary = binary or install()
        self.name = name
        if not client_port or not peer_port:
            client_port, peer_port = free_ports(2)
        self.client_port = client_port
        self.peer_port = peer_port
        super().__init__(f"http://127.0.0.1:{client_port}")
        # name=peer URL of every member; "" = this member alone.
        self.initial_cluster = initial_cluster or f"{name}=http://127.0.0.1:{peer_port}"
        self.data_dir = Path(tempfile.mkdtemp(prefix="etcd-data-"))
        self.log_path = Path(tempfile.mkstemp(prefix="etcd-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            str(self.binary), "--name", self.name, "--data-dir", str(self.data_dir / "member"),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self.initial_cluster,
            "--heartbeat-interval", str(HEARTBEAT_MS), "--election-timeout", str(ELECTION_MS),
        ]

    NAME = "etcd"
    START_TIMEOUT = 20.0

    def is_ready(self) -> bool:
        """`/health` says true: a leader is known and reads are served."""
        with urllib.request.urlopen(self.url + "/health", timeout=1.0) as resp:
            return bool(json.load(resp).get("health") == "true")

    def cleanup(self) -> None:
        """Stop and remove the data dir and log; the data dir survives `kill`/`stop`."""
        super().cleanup()
        shutil.rmtree(self.data_dir, ignore_errors=True)


class EtcdCluster:
    """`size` etcd members on loopback forming one cluster; a context manager.

    `start` returns once every member says healthy (a leader is known to each)."""

    def __init__(self, size: int = 3, binary: Path | None = None) -> None:
        binary = binary or install()
        ports = free_ports(2 * size)
        names = [f"member-{i}" for i in range(size)]
        initial = ",".join(f"{n}=http://127.0.0.1:{ports[2 * i + 1]}"
                           for i, n in enumerate(names))
        self.members = [EtcdServer(binary, name=n, client_port=ports[2 * i],
                                   peer_port=ports[2 * i + 1], initial_cluster=initial)
                        for i, n in enumerate(names)]

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    def start(self, timeout: float = 30.0) -> Self:
        try:
            for member in self.members:
                member.spawn()
            for member in self.members:
                member.wait_ready(timeout)
        except BaseException:
            self.cleanup()
            raise
        return self

    def cleanup(self) -> None:
        for member in self.members:
            member.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def prefix_end(prefix: str) -> str:
    """The range end that covers every key starting with `prefix` (ASCII prefixes)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class Registration:
    """One instance's key `<prefix>/<service>/<id>` = `host:port`, kept on a lease of
    `ttl` seconds refreshed every ttl/3 by a thread, as Registrator does with
    `-ttl`/`-ttl-refresh`. The refreshing stops for good when `alive()` turns false (the
    instance died: its key lapses a TTL later) or on `stop_refreshing()` (the registrar
    died); `deregister()` deletes the key at once (a clean stop)."""

    def __init__(self, server: EtcdClient, key: str, value: str, ttl: float = 2.0, *,
                 alive: Callable[[], bool] | None = None) -> None:
        self.server = server
        self.key = key
        self.value = value
        self.ttl = ttl
        self._alive = alive or (lambda: True)
        self.lease = server.grant(ttl)
        server.put(key, value, self.lease)
        self.lapsing_since: float | None = None  # monotonic time the refreshing stopped
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name=f"lease-{key}",
                                         daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        # alive() is looked at more often than the lease is refreshed, so that the key
        # starts lapsing soon after the instance died.
        refreshed = time.monotonic()
        while not self._stop.wait(min(self.ttl / 3, ALIVE_POLL)):
            if not self._alive():
                break
            if time.monotonic() - refreshed < self.ttl / 3:
                continue
            refreshed = time.monotonic()
            try:
                self.server.keepalive(self.lease)
            except OSError:
                pass  # the server is down; try again next turn, as a registrar would
        self.lapsing_since = time.monotonic()

    def stop_refreshing(self) -> None:
        self._stop.set()
        self._thread.join(REQUEST_TIMEOUT + 1)

    def deregister(self) -> None:
        self.stop_refreshing()
        try:
            self.server.revoke(self.lease)  # takes the key with it
        except OSError:
            pass


def keep(endpoint: str, key: str, value: str, ttl: float) -> int:
    """Keep `key` = `value` on a lease until SIGTERM/SIGINT (then revoke it, exit 0); a
    `kill -9` leaves the key to lapse a TTL later, as a crashed registrar does."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    registration = Registration(EtcdClient(endpoint), key, value, ttl)
    print(f"event=etcd_registered key={key} value={value} lease={registration.lease} "
          f"ttl={ttl:g} pid={os.getpid()}", flush=True)
    stop.wait()
    registration.deregister()
    print(f"event=etcd_deregistered key={key}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in ([], ["install"]):
        try:
            print(install())
        except EtcdInstallError as e:
            print(f"sdproxy: etcd install: {e}", file=sys.stderr)
            return 1
        return 0
    if args[:1] == ["keep"] and len(args) == 5:
        _, endpoint, key, value, ttl = args
        return keep(endpoint, key, value, float(ttl))
    print("usage: python -m proxy.devetcd [install]\n"
          "       python -m proxy.devetcd keep http://127.0.0.1:PORT KEY VALUE TTL",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
