"""The ZooKeeper side of a load-test scenario: ZooKeeper itself, sdproxy with
`discovery = "zookeeper"`, and our own child watch beside it (what ZooKeeper lets any
watcher see, and when).

- `start_zookeeper`: a standalone ZooKeeper (`proxy.devzk`) on a free loopback port,
  ended and its data dir removed by the scenario's ExitStack;
- `zk_session`: a kazoo session of the scenario's own (it owns the ephemeral instance
  znodes it creates), closed by the stack;
- `start_sdproxy_zookeeper`: sdproxy in front of one service read from ZooKeeper,
  returned once it listens, `/ready` answers and its pool is the expected one;
- `ChildWatcher`: kazoo's ChildrenWatch in a session of its own, recording the wall time
  and the children after every change.

Every wait is bounded; every process is pushed on the stack the moment it exists.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from loadtest.procs import (
    Sdproxy,
    say,
    start_sdproxy_on_registry,
)
from proxy import devzk


def start_zookeeper(stack: contextlib.ExitStack) -> devzk.ZooKeeperServer:
    server = devzk.ZooKeeperServer(devzk.install(log=lambda m: say(f"    {m}")))
    stack.callback(server.cleanup)  # before start: a half-started server too
    server.start()
    return server


def zk_session(stack: contextlib.ExitStack, hosts: str) -> Any:
    """A started KazooClient, stopped (its session closed) by `stack`."""
    from kazoo.client import KazooClient

    client = KazooClient(hosts=hosts)
    client.start(timeout=15)
    stack.callback(client.close)
    stack.callback(client.stop)
    return client


def start_sdproxy_zookeeper(stack: contextlib.ExitStack, hosts: str, base: str, service: str,
                            expect: Iterable[str]) -> Sdproxy:
    """sdproxy with one upstream `service` from ZooKeeper; stopped first by `stack`
    (SIGTERM: it drains) since it is started after ZooKeeper."""
    return start_sdproxy_on_registry(stack, service, expect, "zookeeper", "[zookeeper]",
                                     {"hosts": [hosts], "base": base})


class ChildWatcher:
    """Our own watcher of `path`'s children (kazoo's ChildrenWatch, re-armed after every
    event, in `session`): `answers` is [(wall time, children)] after every change."""

    def __init__(self, session: Any, path: str) -> None:
        from kazoo.recipe.watchers import ChildrenWatch

        self.answers: list[tuple[float, frozenset[str]]] = []
        self.lock = threading.Lock()
        ChildrenWatch(session, path, self._on_children)

    def _on_children(self, children: list[str]) -> None:  # a kazoo thread
        now = time.time()
        with self.lock:
            self.answers.append((now, frozenset(children)))

    def first(self, after: float, holds: Callable[[frozenset[str]], bool],
              timeout: float = 1.0) -> float | None:
        """Wall time of the first answer since `after` for which `holds(ids)`."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                found = next((t for t, ids in self.answers if t >= after and holds(ids)), None)
            if found is not None or time.monotonic() > deadline:
                return found
            time.sleep(0.001)
