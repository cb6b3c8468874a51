"""`sdproxy demo --registry zookeeper`: the demo's registry is a real ZooKeeper, written the
way Apache Curator's service discovery writes it.

Owns the ZooKeeper half of the demo: a standalone ZooKeeper on a free loopback port
(`proxy.devzk`, installed from Debian's ZooKeeper jars like Consul is), and one ephemeral
znode per backend, `/services/backend-service/<name>` holding Curator's instance JSON.
Each znode is held by a registrant (`python -m proxy.devzk register --while-pid`) that
dies with its backend, as Curator dies with the service it runs in: when the demo
`kill -9`s backend-2 its registrant exits at once without closing its session, which
ZooKeeper then expires (`SESSION_TIMEOUT` later), deleting the znode. sdproxy's child
watch sees the deletion and drops the instance (meanwhile, failed connects were retried
on the others). A clean stop (SIGTERM) closes the session, which deletes the znode.

Blocking calls (kazoo's client, process starts) run before and after the traffic loop;
the loop itself only awaits (`watch_gone` asks ZooKeeper from a worker thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any

import aiohttp

from proxy import devzk
from proxy.demo.run import BACKENDS, SERVICE, STEPS, VICTIM, Child, say

BASE = "/services"
SESSION_TIMEOUT = 2.0  # seconds a dead backend's znode outlives it


class ZooKeeperDemo:
    name = "ZooKeeper"
    discovery = "zookeeper"
    noticed = f"ZooKeeper deleted its znode (session timeout {SESSION_TIMEOUT:g}s)"
    kept = "its znode is gone from ZooKeeper"

    def __init__(self) -> None:
        self.service_path = f"{BASE}/{SERVICE}"

    def start(self, stack: contextlib.ExitStack) -> None:
        from kazoo.client import KazooClient

        say(f"1/{STEPS} starting ZooKeeper")
        classpath = devzk.install(log=lambda msg: say(f"    {msg}"))
        self.server = server = devzk.ZooKeeperServer(classpath)
        stack.callback(server.cleanup)  # before start: a half-started one too
        server.start()
        say(f"    ZooKeeper at {server.hosts} (data in {server.dir})")
        self.client = client = KazooClient(hosts=server.hosts)  # the demo's own look
        client.start(timeout=15)
        stack.callback(client.close)
        stack.callback(client.stop)
        say(f"2/{STEPS} starting {len(BACKENDS)} backends, each registered as the ephemeral "
            f"znode {self.service_path}/<name> (Curator's JSON) by a registrant that dies "
            f"with it, in a {SESSION_TIMEOUT:g}s session")

    def register(self, stack: contextlib.ExitStack, name: str, child: Child,
                 port: int) -> None:
        registrant = Child(f"{name}-registrant", [
            sys.executable, "-m", "proxy.devzk", "register", "--hosts", self.server.hosts,
            "--base", BASE, "--service", SERVICE, "--id", name, "--port", str(port),
            "--session-timeout", f"{SESSION_TIMEOUT:g}", "--while-pid", str(child.proc.pid)])
        # Stopped before its backend (stack order): its session closes, its znode goes.
        stack.callback(registrant.stop, 3.0)
        registrant.wait_for("event=zk_registered")  # the znode exists

    def wait_registered(self) -> None:
        pass  # each register() returned once its znode existed

    def config(self) -> str:
        return f'[zookeeper]\nhosts = ["{self.server.hosts}"]\nbase = "{BASE}"\n'

    async def watch_gone(self, session: aiohttp.ClientSession) -> float:
        """Loop time at which ZooKeeper first no longer holds the victim's znode."""
        victim = devzk.instance_path(BASE, SERVICE, VICTIM)
        loop = asyncio.get_running_loop()
        while await asyncio.to_thread(_exists, self.client, victim):
            await asyncio.sleep(0.05)
        return loop.time()

    def urls(self) -> dict[str, str]:
        return {"ZooKeeper": f"{self.server.hosts} (znodes under {self.service_path})"}


def _exists(client: Any, path: str) -> bool:
    return client.exists(path) is not None
