"""A real ZooKeeper for the demo, the tests and the load tests; a Curator-style registrant.

- `install()`: Debian bookworm's ZooKeeper 3.8 server jar (`libzookeeper-java`, the jar
  that `zookeeperd` runs) and the jars its standalone server loads (slf4j with its simple
  binding, dropwizard metrics, snappy-java), unpacked into `~/.cache/sdproxy/zookeeper` by
  `proxy.devinstall` (the machine's apt setup is not changed). The packages' own scripts and
  their JRE dependency are not needed: the machine's `java` runs the server class.
  `SDPROXY_ZOOKEEPER_CLASSPATH` uses jars you already have; `SDPROXY_JAVA` another java.
- `ZooKeeperServer`: a standalone server on a free loopback port with a data dir of its
  own and a minimal zoo.cfg (admin server off, four-letter words off: ZooKeeper keeps
  `srvr` whatever the list says, because its own tools need it, and `wait_ready` uses
  it); `kill()` then `start()` is a crash and a restart at the same address with the
  same data (its sessions and znodes survive, as a real restart's do).
- `curator_instance()`: the JSON Apache Curator's `JsonInstanceSerializer` writes for a
  service instance; `python -m proxy.devzk register ...` holds one such ephemeral znode in
  a session of its own until SIGTERM (a clean stop deletes it) or SIGKILL (ZooKeeper
  removes it when the session expires). With `--while-pid PID` it also dies, abruptly,
  when process PID does, as Curator dies with the service it runs in.

Runs outside the data path: blocking sockets, subprocesses and kazoo calls on purpose.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from proxy.devconsul import free_port
from proxy.devinstall import InstallError, cache_dir, fetch_packages
from proxy.devprocess import DevServer

ZOOKEEPER_SUITE = "bookworm"  # ZooKeeper 3.8, built for the OpenJDK 17 it runs on here
PACKAGES = ("libzookeeper-java", "libslf4j-java", "libdropwizard-metrics-java",
            "libsnappy-java")
# What org.apache.zookeeper.server.ZooKeeperServerMain loads in standalone mode with the
# NIO connection factory (the jar's manifest lists more: jetty for the admin server, netty,
# jackson, commons-cli for the command-line tools).
SERVER_JARS = ("zookeeper.jar", "zookeeper-jute.jar", "slf4j-api.jar", "slf4j-simple.jar",
               "metrics-core.jar", "snappy-java.jar")
JAR_DIR = Path("usr/share/java")
SERVER_MAIN = "org.apache.zookeeper.server.ZooKeeperServerMain"
JVM_OPTIONS = ("-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
               "-Djava.net.preferIPv4Stack=true")
TICK_MS = 500  # sessions may be 2..60 ticks: a killed registrant's znode goes within 1 s


class ZooKeeperInstallError(InstallError):
    pass


def installed_classpath(environ: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    override = env.get("SDPROXY_ZOOKEEPER_CLASSPATH")
    if override:
        return override
    jars = [cache_dir(env) / "zookeeper" / JAR_DIR / jar for jar in SERVER_JARS]
    return os.pathsep.join(map(str, jars)) if all(j.exists() for j in jars) else None


def install(environ: Mapping[str, str] | None = None, log: Any = None) -> str:
    """The server's Java classpath, fetching and unpacking the packages first if missing."""
    env = os.environ if environ is None else environ
    found = installed_classpath(env)
    if found:
        return found
    target = cache_dir(env) / "zookeeper"
    fetch_packages(PACKAGES, ZOOKEEPER_SUITE, target, error=ZooKeeperInstallError,
                   hint="set SDPROXY_ZOOKEEPER_CLASSPATH instead", log=log)
    classpath = installed_classpath(env)
    if classpath is None:
        missing = [j for j in SERVER_JARS if not (target / JAR_DIR / j).exists()]
        raise ZooKeeperInstallError(f"packages unpacked but {', '.join(missing)} missing "
                                    f"in {target / JAR_DIR}")
    return classpath


def java_binary(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    java = env.get("SDPROXY_JAVA") or shutil.which("java")
    if not java:
        raise ZooKeeperInstallError("no java on PATH: install a JRE (Debian: "
                                    "default-jre-headless) or set SDPROXY_JAVA")
    return java


def zoo_cfg(data_dir: Path, port: int, tick_ms: int = TICK_MS) -> str:
    return "\n".join([
        f"tickTime={tick_ms}",
        f"dataDir={data_dir}",
        f"clientPort={port}",
        "clientPortAddress=127.0.0.1",
        f"minSessionTimeout={2 * tick_ms}",
        f"maxSessionTimeout={60 * tick_ms}",
        "admin.enableServer=false",
        "4lw.commands.whitelist=",
        "",
    ])


def srvr(host: str, port: int, timeout: float = 1.0) -> str:
    """ZooKeeper's `srvr` answer ("Zookeeper version: ..."); raises OSError."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(b"srvr")
        chunks = []
        while chunk := sock.recv(4096):  # the server closes after answering
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


class ZooKeeperServer(DevServer):
    """A standalone ZooKeeper on 127.0.0.1 and a free port; a context manager that ends it
    and removes its data dir and log."""

    def __init__(self, classpath: str | None = None, *, port: int | None = None,
                 java: str | None = None, tick_ms: int = TICK_MS) -> None:
        self.classpath = classpath or install()
        self.java = java or java_binary()
        self.port = port or free_port()
        self.tick_ms = tick_ms
        self.dir = Path(tempfile.mkdtemp(prefix="zookeeper-"))
        (self.dir / "data").mkdir()
        self.cfg_path = self.dir / "zoo.cfg"
        self.cfg_path.write_text(zoo_cfg(self.dir / "data", self.port, tick_ms))
        self.log_path = self.dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def hosts(self) -> str:
        """The connect string a client takes: `127.0.0.1:PORT`."""
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [self.java, *JVM_OPTIONS, "-cp", self.classpath, SERVER_MAIN,
                str(self.cfg_path)]

    NAME = "zookeeper"

    def is_ready(self) -> bool:
        """It answers `srvr` (it serves clients from then on)."""
        return srvr("127.0.0.1", self.port).startswith("Zookeeper version")

    def cleanup(self) -> None:
        """Stop the server and remove its data dir and log; idempotent."""
        super().cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)


def curator_instance(service: str, instance_id: str, address: str, port: int | None, *,
                     ssl_port: int | None = None, payload: Any = None,
                     registered_ms: int | None = None) -> bytes:
    """A service instance as Curator's JsonInstanceSerializer writes it (ServiceInstance
    fields; `serviceType` DYNAMIC: an ephemeral znode)."""
    return json.dumps({
        "name": service, "id": instance_id, "address": address, "port": port,
        "sslPort": ssl_port, "payload": payload,
        "registrationTimeUTC": int(time.time() * 1000) if registered_ms is None
        else registered_ms,
        "serviceType": "DYNAMIC", "uriSpec": None,
    }).encode()


def instance_path(base: str, service: str, instance_id: str) -> str:
    return f"{base.rstrip('/')}/{service}/{instance_id}"


def die_with(pid: int) -> None:
    """End this process abruptly once process `pid` has exited (a thread waits on its
    pidfd, which becomes readable at exit even before the parent reaps it). No cleanup:
    the ZooKeeper session is left to expire, as a crashed service's would be."""
    pidfd = os.pidfd_open(pid)

    def wait() -> None:
        select.select([pidfd], [], [])
        print(f"event=zk_registrant_exit reason=pid_{pid}_exited", flush=True)
        os._exit(1)

    threading.Thread(target=wait, name="die-with", daemon=True).start()


def register_main(args: argparse.Namespace) -> int:
    """Hold one ephemeral instance znode until SIGTERM/SIGINT (then delete it)."""
    from kazoo.client import KazooClient

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.while_pid:
        die_with(args.while_pid)
    client = KazooClient(hosts=args.hosts, timeout=args.session_timeout)
    client.start(timeout=15)
    path = instance_path(args.base, args.service, args.id)
    client.create(path, curator_instance(args.service, args.id, args.address, args.port),
                  ephemeral=True, makepath=True)
    print(f"event=zk_registered path={path} session=0x{client.client_id[0]:x}", flush=True)
    stop.wait()
    client.stop()  # closes the session: ZooKeeper deletes the ephemeral znode at once
    client.close()
    print(f"event=zk_deregistered path={path}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.devzk")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("install", help="fetch ZooKeeper's jars; print the classpath")
    reg = sub.add_parser("register", help="hold a Curator-style ephemeral instance znode")
    reg.add_argument("--hosts", required=True)
    reg.add_argument("--base", default="/services")
    reg.add_argument("--service", required=True)
    reg.add_argument("--id", required=True)
    reg.add_argument("--address", default="127.0.0.1")
    reg.add_argument("--port", type=int, required=True)
    reg.add_argument("--session-timeout", type=float, default=1.0,
                     help="seconds; ZooKeeper removes the znode this long after a crash")
    reg.add_argument("--while-pid", type=int, default=0,
                     help="exit abruptly (no session close) when this process exits")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command in (None, "install"):
        try:
            print(install())
        except ZooKeeperInstallError as e:
            print(f"sdproxy: zookeeper install: {e}", file=sys.stderr)
            return 1
        return 0
    return register_main(args)


if __name__ == "__main__":
    sys.exit(main())
