"""The etcd side of a load-test scenario: etcd itself, sdproxy with `discovery = "etcd"`, and
our own etcd watch beside it (what etcd lets any watcher see, and when).

- `start_etcd`: a single-member etcd (`proxy.devetcd`) on free loopback ports, ended and
  its data dir removed by the scenario's ExitStack;
- `start_sdproxy_etcd`: sdproxy in front of one service read from etcd, returned once it
  listens, `/ready` answers and its pool is the expected one;
- `EtcdEventWatcher`: a thread holding one `/v3/watch` stream on the service's keys,
  recording the wall time and the instance ids after every message with events.

Every wait is bounded; every process is pushed on the stack the moment it exists.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterable

from loadtest.procs import (
    Sdproxy,
    say,
    start_sdproxy_on_registry,
)
from proxy import devetcd


def start_etcd(stack: contextlib.ExitStack) -> devetcd.EtcdServer:
    server = devetcd.EtcdServer(devetcd.install(log=lambda m: say(f"    {m}")))
    stack.callback(server.cleanup)  # before start: a half-started server too
    server.start()
    return server


def start_sdproxy_etcd(stack: contextlib.ExitStack, etcd_url: str, prefix: str, service: str,
                       expect: Iterable[str]) -> Sdproxy:
    """sdproxy with one upstream `service` from etcd; stopped first by `stack` (SIGTERM:
    it drains) since it is started after etcd."""
    return start_sdproxy_on_registry(stack, service, expect, "etcd", "[etcd]",
                                     {"endpoints": [etcd_url], "prefix": prefix})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class EtcdEventWatcher(threading.Thread):
    """Our own etcd watcher on every key under `start` (bytes, e.g. b"/services/web/"):
    `answers` is [(wall time, ids)] after every message with events. `stop()` closes the
    stream, which ends the thread at once."""

    def __init__(self, server: devetcd.EtcdServer, start: bytes) -> None:
        super().__init__(name="etcd-event-watcher", daemon=True)
        self.server = server
        self.start_key = start
        self.answers: list[tuple[float, frozenset[str]]] = []
        self.lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._stopped = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        prefix = self.start_key.decode()
        entries = set(self.server.range_prefix(prefix))
        revision = self.server.revision()
        end = devetcd.prefix_end(prefix).encode()
        body = json.dumps({"create_request": {"key": _b64(self.start_key),
                                              "range_end": _b64(end),
                                              "start_revision": str(revision + 1)}})
        self._conn = http.client.HTTPConnection("127.0.0.1", self.server.client_port,
                                                timeout=None)
        try:
            self._conn.request("POST", "/v3/watch", body=body,
                               headers={"Content-Type": "application/json"})
            resp = self._conn.getresponse()
            self.ready.set()
            while not self._stopped.is_set():
                line = resp.readline()
                if not line:
                    return
                now = time.time()
                result = json.loads(line).get("result", {})
                events = result.get("events", [])
                if not events:
                    continue
                for event in events:
                    key = base64.b64decode(event["kv"]["key"]).decode()
                    if event.get("type") == "DELETE":
                        entries.discard(key)
                    else:
                        entries.add(key)
                ids = frozenset(k[len(prefix):] for k in entries)
                with self.lock:
                    self.answers.append((now, ids))
        except (OSError, ValueError, http.client.HTTPException):
            return  # stop() closed the socket, or etcd went away: the report says "n"
        finally:
            self.ready.set()

    def stop(self) -> None:
        self._stopped.set()
        if self._conn is not None and self._conn.sock is not None:
            with contextlib.suppress(OSError):
                self._conn.sock.shutdown(2)

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
