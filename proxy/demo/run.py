"""`sdproxy demo`: a newcomer's first run, end to end, on loopback.

Owns the demo's whole life: a real registry (a Consul dev agent by default; etcd with
`--registry etcd`, ZooKeeper with `--registry zookeeper`), three backends registered in it
(Consul: HTTP health checks; etcd: Registrator's keys on leases; ZooKeeper: Curator's
ephemeral znodes), sdproxy in front of them, steady client traffic, a
`kill -9` of backend-2 half way, and a report of what the client saw and when the
registry noticed. What is particular to a registry is a `DemoRegistry` (Consul's here,
the others in a module of their own, e.g. `proxy.demo.etcd`).

Invariants:
- Everything it starts is pushed on one ExitStack the moment it exists, so any exit
  (success, error, Ctrl-C, SIGTERM) stops it again: proxy first (SIGTERM, so it drains),
  then the backends, then Consul. Children run in their own sessions so a terminal
  Ctrl-C reaches only this process, which then stops them in that order.
- Every wait is bounded and fails with the tail of the child's output.
- The client does no retries of its own: every error the proxy lets through is counted.
- Sync work (spawning, registering) happens before the traffic loop; the loop itself
  only awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from proxy import devconsul
from proxy.devinstall import InstallError

SERVICE = "backend-service"
BACKENDS = ("backend-1", "backend-2", "backend-3")
VICTIM = "backend-2"
STEPS = 5
START_TIMEOUT = 20.0  # seconds for any child to come up
REQUEST_TIMEOUT = 5.0  # per client request; far above any healthy failover
CRITICAL_WATCH = 15.0  # how long to wait for the registry to drop the victim


def backend_argv(port: int, name: str) -> list[str]:
    return [sys.executable, "-m", "proxy.demo.backend", "--port", str(port), "--name", name]


def proxy_argv(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "proxy", "run", "-c", str(config_path)]


class DemoError(Exception):
    """A step failed; the message says which and carries what the child printed."""


def say(msg: str = "") -> None:
    print(msg, flush=True)  # flushed: the demo is often watched through a pipe


class Child:
    """A subprocess in its own session; a thread drains its merged output so it never
    blocks on a full pipe, keeping the first lines (startup) and the last ones (errors)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.head: list[str] = []
        self.tail: deque[str] = deque(maxlen=40)
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True, env=env)
        threading.Thread(target=self._drain, name=f"drain-{name}", daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            with self._cond:
                (self.head if len(self.head) < 200 else self.tail).append(line)
                self._cond.notify_all()

    def output(self) -> str:
        with self._cond:
            lines = self.head[-20:] + list(self.tail)
        return "\n".join("    | " + line for line in lines) or "    | (no output)"

    def wait_for(self, *needles: str, timeout: float = START_TIMEOUT) -> str:
        """The first output line containing every needle; DemoError on exit or deadline."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in [*self.head, *self.tail]:
                    if all(n in line for n in needles):
                        return line
                if self.proc.poll() is not None:
                    raise DemoError(f"{self.name} exited with code {self.proc.returncode} "
                                    f"before it printed {' '.join(needles)}:\n{self.output()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DemoError(f"{self.name} did not print {' '.join(needles)} within "
                                    f"{timeout:.0f}s:\n{self.output()}")
                self._cond.wait(min(left, 0.2))  # short: also notices an exit without output

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # the group: nothing it forked is left behind

    def stop(self, grace: float) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(5)


@dataclass(frozen=True)
class Sample:
    t: float  # send time, seconds since traffic started
    latency: float  # seconds
    outcome: str  # "ok", "http 503", or the exception's class name
    backend: str  # which backend answered (the body of a 200)


class DemoRegistry(Protocol):
    """What the demo needs of a registry: start it, register the backends in it, the
    proxy's config for it, and when it stopped offering the killed backend."""

    name: str  # "Consul", "etcd"
    discovery: str  # the upstream's `discovery`
    noticed: str  # what the registry does about a dead instance, for the report
    kept: str  # what happens to the dead instance afterwards, for the interactive hold

    def start(self, stack: contextlib.ExitStack) -> None: ...
    def register(self, stack: contextlib.ExitStack, name: str, child: Child,
                 port: int) -> None: ...
    def wait_registered(self) -> None: ...
    def config(self) -> str: ...
    async def watch_gone(self, session: aiohttp.ClientSession) -> float: ...
    def urls(self) -> dict[str, str]: ...


def demo_config(admin_port: int, listen_port: int, registry_config: str,
                discovery: str = "consul") -> str:
    """The proxy config the demo runs; config/demo.toml is a readable copy of it."""
    return f"""\
# Written by `sdproxy demo`; a readable copy lives in config/demo.toml.
[admin]
listen = "127.0.0.1:{admin_port}"

{registry_config}
[[upstreams]]
name = "{SERVICE}"
listen = "127.0.0.1:{listen_port}"
mode = "http"
discovery = "{discovery}"
drain_timeout = "2s"     # the demo's shutdown should not wait long
"""


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return None


def wait_until(what: str, probe: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise DemoError(f"{what} within {timeout:.0f}s")
        time.sleep(0.1)


class ConsulDemo:
    """A Consul dev agent; backends registered with an HTTP check on /health every 1s."""

    name = "Consul"
    discovery = "consul"
    noticed = "Consul marked it critical"
    kept = "Consul deregisters it after 1 minute (DeregisterCriticalServiceAfter)"

    def start(self, stack: contextlib.ExitStack) -> None:
        say(f"1/{STEPS} starting a Consul dev agent")
        binary = devconsul.install(log=lambda msg: say(f"    {msg}"))
        self.agent = agent = devconsul.ConsulAgent(binary)
        stack.callback(agent.__exit__, None, None, None)  # before start: a half-started one
        agent.start()
        say(f"    Consul at {agent.http_addr} (UI: {agent.http_addr}/ui/)")
        say(f"2/{STEPS} starting {len(BACKENDS)} backends, registered as '{SERVICE}' with "
            "an HTTP check on /health every 1s")

    def register(self, stack: contextlib.ExitStack, name: str, child: Child,
                 port: int) -> None:
        self.agent.register({
            "ID": name, "Name": SERVICE, "Address": "127.0.0.1", "Port": port,
            "Check": {"HTTP": f"http://127.0.0.1:{port}/health", "Interval": "1s",
                      "Timeout": "1s", "DeregisterCriticalServiceAfter": "1m"}})

    def wait_registered(self) -> None:
        # Traffic must start against a full pool, so wait for every first check to pass.
        wait_until("the backends' Consul checks did not all pass", lambda: len(
            self.agent.get(f"/v1/health/service/{SERVICE}?passing") or []) == len(BACKENDS))

    def config(self) -> str:
        return f'[consul]\naddress = "{self.agent.http_addr}"\n'

    async def watch_gone(self, session: aiohttp.ClientSession) -> float:
        """Loop time at which Consul first reports the victim's check critical."""
        url = f"{self.agent.http_addr}/v1/health/checks/{SERVICE}"
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url) as resp:
                    checks: list[dict[str, Any]] = await resp.json()
                if any(c.get("ServiceID") == VICTIM and c.get("Status") == "critical"
                       for c in checks):
                    return loop.time()
            await asyncio.sleep(0.05)

    def urls(self) -> dict[str, str]:
        return {"Consul UI": f"{self.agent.http_addr}/ui/"}


def _etcd_demo() -> DemoRegistry:
    from proxy.demo.etcd import EtcdDemo

    return EtcdDemo()


def _zookeeper_demo() -> DemoRegistry:
    from proxy.demo.zookeeper import ZooKeeperDemo

    return ZooKeeperDemo()


REGISTRIES: dict[str, Callable[[], DemoRegistry]] = {
    "consul": ConsulDemo,
    "etcd": _etcd_demo,
    "zookeeper": _zookeeper_demo,
}


async def drive(url: str, duration: float, rate: float, kill: Callable[[], None],
                registry: DemoRegistry) -> tuple[list[Sample], float, float | None]:
    """Open-loop traffic: request i is sent at t0 + i/rate (loop time, so sleeps never
    accumulate drift) whether or not earlier ones answered. Returns the samples, the kill
    time and the time the registry stopped offering the victim, both relative to t0."""
    loop = asyncio.get_running_loop()
    samples: list[Sample] = []
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        # aiohttp silently resends an idempotent request once when a reused connection
        # drops; that would hide failures the proxy let through. No public switch exists.
        if hasattr(session, "_retry_connection"):
            session._retry_connection = False

        async def one(t0: float) -> None:
            start = loop.time()
            outcome, backend = "ok", ""
            try:
                async with session.get(url) as resp:
                    body = await resp.read()
                if resp.status == 200:
                    backend = body.decode(errors="replace").strip()
                else:
                    outcome = f"http {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as e:
                outcome = type(e).__name__
            samples.append(Sample(start - t0, loop.time() - start, outcome, backend))

        async def kill_then_watch() -> tuple[float, float | None]:
            await asyncio.sleep(max(0.0, t0 + duration / 2 - loop.time()))
            kill()
            killed = loop.time() - t0
            try:
                return killed, await asyncio.wait_for(
                    registry.watch_gone(session), CRITICAL_WATCH) - t0
            except TimeoutError:
                return killed, None

        t0 = loop.time()
        killer = asyncio.create_task(kill_then_watch())  # runs beside the send loop
        tasks: list[asyncio.Task[None]] = []
        for i in range(max(1, round(duration * rate))):
            await asyncio.sleep(max(0.0, t0 + i / rate - loop.time()))
            tasks.append(asyncio.create_task(one(t0)))
        await asyncio.gather(*tasks)
        killed, critical = await killer
    return samples, killed, critical


def pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    s = sorted(values)
    return f"{s[max(0, math.ceil(q * len(s)) - 1)] * 1000:.1f} ms"  # nearest rank


def report(samples: list[Sample], killed: float, critical: float | None, duration: float,
           rate: float, urls: dict[str, str], noticed: str = "Consul marked it critical") -> int:
    """Prints what the client saw; returns the number of errors."""
    phases = {"before kill": [s for s in samples if s.t < killed],
              "after kill": [s for s in samples if s.t >= killed]}
    errors = Counter(s.outcome for s in samples if s.outcome != "ok")
    n_err = sum(errors.values())
    kinds = ", ".join(f"{k} x{v}" for k, v in errors.most_common())
    say(f"  requests sent   {len(samples)} in {duration:g}s (target {rate:g}/s)")
    say(f"  200 OK          {len(samples) - n_err}")
    say(f"  errors          {n_err}" + (f"  ({kinds})" if kinds else ""))
    seen = f"{critical - killed:.2f}s later" if critical is not None else \
        f"not within {CRITICAL_WATCH:.0f}s"
    say(f"  {VICTIM} killed at t={killed:.2f}s (kill -9); {noticed} {seen}")
    say()
    say(f"  {'':16}" + "".join(f"{name:>14}" for name in phases))
    rows: list[tuple[str, Callable[[list[Sample]], str]]] = [
        ("requests", lambda ss: str(len(ss))),
        ("errors", lambda ss: str(sum(s.outcome != "ok" for s in ss))),
        *[(f"latency {label}", lambda ss, q=q: pct([s.latency for s in ss], q))
          for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))],
        *[(name, lambda ss, name=name: str(sum(s.backend == name for s in ss)))
          for name in BACKENDS],
    ]
    for label, cell in rows:
        say(f"  {label:16}" + "".join(f"{cell(ss):>14}" for ss in phases.values()))
    say()
    say("  where to look")
    for label, url in urls.items():
        say(f"    {label:12} {url}")
    say()
    if n_err == 0:
        say(f"verdict: the client saw 0 errors while {VICTIM} died")
    else:
        say(f"verdict: the client saw {n_err} errors in {len(samples)} requests while "
            f"{VICTIM} died ({kinds})")
    return n_err


def run(stack: contextlib.ExitStack, duration: float, rate: float,
        registry: DemoRegistry | None = None) -> int:
    registry = registry or ConsulDemo()
    registry.start(stack)  # says steps 1 and 2
    backends: dict[str, Child] = {}
    for name in BACKENDS:
        port = devconsul.free_port()
        child = backends[name] = Child(name, backend_argv(port, name))
        stack.callback(child.stop, 3.0)
        child.wait_for("event=backend_listening", f"port={port}")
        registry.register(stack, name, child, port)
        say(f"    {name} on 127.0.0.1:{port} (pid {child.proc.pid})")
    registry.wait_registered()

    admin_port, listen_port = devconsul.free_port(), devconsul.free_port()
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sdproxy-demo-")))
    config_path = workdir / "demo.toml"
    config_path.write_text(demo_config(admin_port, listen_port, registry.config(),
                                       registry.discovery))
    say(f"3/{STEPS} starting sdproxy -c {config_path}")
    env = {k: v for k, v in os.environ.items() if k != "CONSUL_HTTP_TOKEN"}
    proxy = Child("sdproxy", proxy_argv(config_path), env=env)
    stack.callback(proxy.stop, 10.0)  # pushed last, so stopped first: it drains cleanly
    proxy.wait_for("event=listening", f"upstream={SERVICE}")
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        wait_until("sdproxy's /ready did not answer 200",
                   lambda: proxy.proc.poll() is None and http_status(admin + "/ready") == 200)
    except DemoError as e:
        raise DemoError(f"{e}:\n{proxy.output()}") from None
    say(f"    listening on 127.0.0.1:{listen_port}, admin page {admin}/")

    url = f"http://127.0.0.1:{listen_port}/"
    say(f"4/{STEPS} sending {rate:g} GET/s to {url} for {duration:g}s; "
        f"kill -9 {VICTIM} at t={duration / 2:g}s")
    samples, killed, critical = asyncio.run(drive(
        url, duration, rate, lambda: backends[VICTIM].signal(signal.SIGKILL), registry))
    if proxy.proc.poll() is not None:
        raise DemoError(f"sdproxy exited with code {proxy.proc.returncode} during the run:\n"
                        f"{proxy.output()}")

    say(f"5/{STEPS} what the client saw")
    report(samples, killed, critical, duration, rate, {
        "admin page": f"{admin}/", "upstreams": f"{admin}/upstreams",
        "metrics": f"{admin}/metrics", **registry.urls()}, registry.noticed)

    if sys.stdin is not None and sys.stdin.isatty() and os.environ.get("SDPROXY_DEMO_HOLD") != "0":
        say()
        say(f"Everything keeps running; {VICTIM} stays dead and {registry.kept}.")
        say("Press Ctrl-C to stop")
        while proxy.proc.poll() is None:
            time.sleep(0.5)
        raise DemoError(f"sdproxy exited with code {proxy.proc.returncode}:\n{proxy.output()}")
    return 0


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM takes the same clean path as Ctrl-C


def main(duration: float, rate: float, registry: str = "consul") -> int:
    if not (duration > 0 and rate > 0):
        print("sdproxy demo: --duration and --rate must be positive", file=sys.stderr)
        return 2
    if registry not in REGISTRIES:
        print(f"sdproxy demo: --registry must be one of {', '.join(REGISTRIES)}",
              file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    # Explicit: a shell that started us in the background set SIGINT to ignored, and the
    # demo promises that SIGINT stops everything it started.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    stack = contextlib.ExitStack()
    try:
        return run(stack, duration, rate, REGISTRIES[registry]())
    except KeyboardInterrupt:
        say("\ninterrupted: stopping everything the demo started")
        return 0
    except (DemoError, InstallError, RuntimeError, OSError) as e:
        print(f"sdproxy demo: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        # Cleanup is bounded; a second Ctrl-C must not cut it short and leave orphans.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            stack.close()
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous)
