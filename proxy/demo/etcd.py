"""`sdproxy demo --registry etcd`: the demo's registry is a real etcd, written the Registrator way.

Owns the etcd half of the demo: a single-member etcd on free loopback ports
(`proxy.devetcd`, installed from Debian's `etcd-server` like Consul is), and one key per
backend, `/services/backend-service/<name>` = `127.0.0.1:<port>`, kept on a lease of
`LEASE_TTL` seconds that is refreshed while the backend process lives, as Registrator
keeps its TTL keys fresh while a container runs. When the demo `kill -9`s backend-2 its
lease is no longer refreshed and the key lapses: sdproxy's etcd watch sees the DELETE and
drops the instance (meanwhile, failed connects were retried on the others).

Blocking calls (etcd's client, process polls) run before and after the traffic loop; the
loop itself only awaits (`watch_gone` reads the keys with aiohttp).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib

import aiohttp

from proxy import devetcd
from proxy.demo.run import BACKENDS, SERVICE, STEPS, VICTIM, Child, say, wait_until

PREFIX = "/services"
LEASE_TTL = 2.0  # seconds a dead backend's key outlives it


class EtcdDemo:
    name = "etcd"
    discovery = "etcd"
    noticed = f"its key lapsed from etcd (lease TTL {LEASE_TTL:g}s)"
    kept = "its key is gone from etcd"

    def __init__(self) -> None:
        self.key_prefix = f"{PREFIX}/{SERVICE}/"

    def start(self, stack: contextlib.ExitStack) -> None:
        say(f"1/{STEPS} starting etcd")
        binary = devetcd.install(log=lambda msg: say(f"    {msg}"))
        self.server = server = devetcd.EtcdServer(binary)
        stack.callback(server.cleanup)  # before start: a half-started one too
        server.start()
        say(f"    etcd at {server.url} (data in {server.data_dir})")
        say(f"2/{STEPS} starting {len(BACKENDS)} backends, each registered as "
            f"{self.key_prefix}<name> = ip:port on a {LEASE_TTL:g}s lease refreshed while it "
            "runs (Registrator's layout)")

    def register(self, stack: contextlib.ExitStack, name: str, child: Child,
                 port: int) -> None:
        registration = devetcd.Registration(
            self.server, self.key_prefix + name, f"127.0.0.1:{port}", LEASE_TTL,
            alive=lambda: child.proc.poll() is None)
        stack.callback(registration.stop_refreshing)

    def wait_registered(self) -> None:
        wait_until("the backends' keys are not all in etcd", lambda: len(
            self.server.range_prefix(self.key_prefix)) == len(BACKENDS))

    def config(self) -> str:
        return f'[etcd]\nendpoints = ["{self.server.url}"]\nprefix = "{PREFIX}"\n'

    async def watch_gone(self, session: aiohttp.ClientSession) -> float:
        """Loop time at which etcd first no longer holds the victim's key."""
        victim = base64.b64encode((self.key_prefix + VICTIM).encode()).decode()
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with session.post(f"{self.server.url}/v3/kv/range",
                                        json={"key": victim, "count_only": True}) as resp:
                    answer = await resp.json()
                if resp.status == 200 and int(answer.get("count", 0)) == 0:
                    return loop.time()
            await asyncio.sleep(0.05)

    def urls(self) -> dict[str, str]:
        return {"etcd": f"{self.server.url} (keys under {self.key_prefix})"}
