"""The processes of a load-test scenario: Consul, demo backends and sdproxy, and the run
that owns them.

- `Child`: a subprocess in its own session whose merged output a thread drains and keeps,
  each line with the wall time it arrived;
- `start_backend(s)`, `start_consul`, `start_service` (backends registered with HTTP
  checks, all passing), `start_sdproxy` (-> `Sdproxy`: admin reads, metrics, log events);
- `run_scenario`, which hands the scenario one ExitStack and closes it on success,
  exception, Ctrl-C or SIGTERM, ending every process pushed on it.

Invariants: every wait is bounded and fails with the child's output; every process is
registered for cleanup the moment it exists; children run in their own sessions, so a
terminal Ctrl-C reaches only the scenario, which then stops them (sdproxy first, so it
drains, then backends, then Consul: the ExitStack's reverse order).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from loadtest.parse import log_wall_time, metric_samples, parse_logfmt
from loadtest.tomlwrite import toml_table
from proxy import devconsul

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 20.0  # seconds for any child to come up
MAX_LINES = 50_000  # output lines kept per child
HEALTH_INTERVAL = "1s"  # Consul HTTP check interval for the backends


class ScenarioError(Exception):
    """A step failed; the message says which and carries what the child printed."""


def say(msg: str = "") -> None:
    print(msg, flush=True)


class LogLine(NamedTuple):
    received: float  # wall time the line was read from the pipe
    text: str


def child_env() -> dict[str, str]:
    """Our environment minus what would point a child at another Consul."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Child:
    """A subprocess in its own session; a thread drains its merged stdout+stderr so it
    never blocks on a full pipe, and keeps every line (up to MAX_LINES) with its arrival
    time. `stop` sends SIGTERM (and SIGCONT, so a stopped child can act on it), then
    SIGKILL after `grace`; it is idempotent."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.lines: list[LogLine] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env=child_env() if env is None else env, cwd=REPO_ROOT)
        self._thread = threading.Thread(target=self._drain, name=f"drain-{name}", daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = LogLine(time.time(), raw.decode(errors="replace").rstrip())
            with self._cond:
                if len(self.lines) < MAX_LINES:
                    self.lines.append(line)
                self._cond.notify_all()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self, n: int = 30) -> str:
        with self._cond:
            lines = [ln.text for ln in self.lines[-n:]]
        return "\n".join("    | " + text for text in lines) or "    | (no output)"

    def matching(self, *needles: str, start: int = 0) -> list[LogLine]:
        """Lines from index `start` on that contain every needle."""
        with self._cond:
            return [ln for ln in self.lines[start:] if all(n in ln.text for n in needles)]

    def wait_for(self, *needles: str, timeout: float = START_TIMEOUT, start: int = 0) -> str:
        """The first line (from index `start`) containing every needle; ScenarioError when
        the child exits or the deadline passes first."""
        return self.wait_line(lambda text: all(n in text for n in needles),
                              " ".join(needles), timeout=timeout, start=start).text

    def wait_line(self, match: Callable[[str], bool], what: str,
                  timeout: float = START_TIMEOUT, start: int = 0) -> LogLine:
        """The first line from index `start` for which `match(text)` holds."""
        deadline = time.monotonic() + timeout
        seen = start
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if match(line.text):
                        return line
                seen = max(seen, len(self.lines))
                if self.proc.poll() is not None:
                    raise ScenarioError(f"{self.name} exited with code {self.proc.returncode} "
                                        f"before it printed {what}:\n{self.output()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ScenarioError(f"{self.name} did not print {what} within "
                                        f"{timeout:g}s:\n{self.output()}")
                self._cond.wait(min(left, 0.2))

    def signal(self, sig: int) -> None:
        """Send `sig` to the child's process group (nothing it forked is left out)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, grace: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            self.signal(signal.SIGCONT)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.signal(signal.SIGCONT)
                self.proc.wait(5)
        self._thread.join(2)


@dataclass
class Backend:
    """A running `python -m proxy.demo.backend` on 127.0.0.1; `GET /` answers `name`."""

    name: str
    port: int
    child: Child

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def kill(self) -> None:
        """kill -9: the kernel closes its sockets, nothing is said to anyone."""
        self.child.signal(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections into the backlog, nobody answers."""
        self.child.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.child.signal(signal.SIGCONT)

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM: aiohttp stops listening and finishes what is in flight."""
        self.child.stop(grace)


def start_backend(stack: contextlib.ExitStack, name: str) -> Backend:
    """Start a backend on a kernel-chosen port; registered on `stack` before any wait."""
    return start_backends(stack, [name])[name]


def start_backends(stack: contextlib.ExitStack, names: Sequence[str]) -> dict[str, Backend]:
    """Start one backend per name, all at once (start-up runs in parallel), each pushed on
    `stack` the moment it exists; return once every one of them listens."""
    children = []
    for name in names:
        child = Child(name, [sys.executable, "-m", "proxy.demo.backend", "--port", "0",
                             "--name", name])
        stack.callback(child.stop, 3.0)
        children.append(child)
    out = {}
    for name, child in zip(names, children):
        line = child.wait_for("event=backend_listening", f"name={name}")
        out[name] = Backend(name, int(parse_logfmt(line)["port"]), child)
    return out


def start_consul(stack: contextlib.ExitStack) -> devconsul.ConsulAgent:
    """A Consul dev agent on free loopback ports, ended (and its log removed) by `stack`."""
    agent = devconsul.ConsulAgent(devconsul.install(log=lambda m: say(f"    {m}")))
    stack.callback(agent.cleanup)  # before start: a half-started agent too
    agent.start()
    return agent


def backend_service(service: str, backend: Backend, *, interval: str = HEALTH_INTERVAL,
                    passing: bool = False) -> dict[str, Any]:
    """The agent registration of `backend` as an instance of `service` with an HTTP check
    on /health (`passing`: the check starts passing instead of critical)."""
    check: dict[str, Any] = {"HTTP": f"http://127.0.0.1:{backend.port}/health",
                             "Interval": interval, "Timeout": interval,
                             "DeregisterCriticalServiceAfter": "1m"}
    if passing:
        check["Status"] = "passing"
    return {"ID": backend.name, "Name": service, "Address": "127.0.0.1",
            "Port": backend.port, "Check": check}


def wait_until(what: str, probe: Callable[[], bool], timeout: float = START_TIMEOUT,
               every: float = 0.05) -> None:
    """Poll `probe` until true; ScenarioError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if probe():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ScenarioError(f"{what}: not within {timeout:g}s")
        time.sleep(every)


def wait_passing(agent: devconsul.ConsulAgent, service: str, ids: Iterable[str]) -> None:
    """Wait until exactly the instances `ids` of `service` pass their checks."""
    want = set(ids)
    wait_until(f"consul: instances {sorted(want)} of {service} passing", lambda: {
        e["Service"]["ID"] for e in agent.get(f"/v1/health/service/{service}?passing") or []
    } == want)


def start_service(stack: contextlib.ExitStack, agent: devconsul.ConsulAgent, service: str,
                  names: Sequence[str]) -> dict[str, Backend]:
    """Start one backend per name, register each as an instance of `service` (HTTP check
    every HEALTH_INTERVAL) and wait until all of them pass."""
    backends = start_backends(stack, names)
    for backend in backends.values():
        agent.register(backend_service(service, backend))
    wait_passing(agent, service, names)
    return backends


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """Blocking GET (setup and teardown only, never inside the load loop)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()



def sdproxy_config(admin: tuple[str, int], listen: tuple[str, int], consul_addr: str,
                   service: str, settings: Mapping[str, Any] | None = None) -> str:
    """A config with one upstream `service` (discovery consul unless `settings` says
    otherwise); a Mapping value in `settings` becomes a subtable (e.g. breaker)."""
    plain = {"mode": "http", "discovery": "consul", "drain_timeout": "2s", **(settings or {})}
    tables = {k: v for k, v in plain.items() if isinstance(v, Mapping)}
    upstream = {"name": service, "listen": f"{listen[0]}:{listen[1]}",
                **{k: v for k, v in plain.items() if k not in tables}}
    parts = [toml_table("[admin]", {"listen": f"{admin[0]}:{admin[1]}"}),
             toml_table("[consul]", {"address": consul_addr}),
             toml_table("[[upstreams]]", upstream)]
    parts += [toml_table(f"[upstreams.{key}]", table) for key, table in tables.items()]
    return "\n".join(parts)


@dataclass
class Sdproxy:
    """A running `python -m proxy run -c FILE` with one upstream."""

    child: Child
    service: str
    listen: tuple[str, int]
    admin: str  # http://127.0.0.1:PORT
    config_text: str

    def upstream(self) -> dict[str, Any]:
        status, body = http_get(f"{self.admin}/upstreams")
        if status != 200:
            raise ScenarioError(f"sdproxy /upstreams answered {status}")
        found: list[dict[str, Any]] = [u for u in json.loads(body) if u["name"] == self.service]
        return found[0]

    def endpoint_ids(self, states: Sequence[str] = ("healthy",)) -> set[str]:
        return {e["id"] for e in self.upstream()["endpoints"] if e["state"] in states}

    def metrics(self) -> str:
        status, body = http_get(f"{self.admin}/metrics")
        if status != 200:
            raise ScenarioError(f"sdproxy /metrics answered {status}")
        return body.decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
        return sum(v for lab, v in metric_samples(self.metrics(), name)
                   if all(lab.get(k) == want for k, want in labels.items()))

    def check_alive(self) -> None:
        """ScenarioError with its output if sdproxy exited (during a run, a failure)."""
        if not self.child.alive():
            raise ScenarioError(f"sdproxy exited during the run:\n{self.child.output()}")

    def events(self, event: str, start: int = 0) -> list[tuple[float, dict[str, str]]]:
        """(wall time from the line's own ts, fields) of every `event=...` log line."""
        out = []
        for line in self.child.matching(f"event={event} ", start=start):
            wall = log_wall_time(line.text)
            out.append((line.received if wall is None else wall, parse_logfmt(line.text)))
        return out


def start_sdproxy(stack: contextlib.ExitStack, consul_addr: str, service: str,
                  settings: Mapping[str, Any] | None = None,
                  expect: Iterable[str] | None = None) -> Sdproxy:
    """Start sdproxy in front of `service`; return once it listens, /ready answers 200
    and (when given) the healthy pool is exactly `expect`. Stopped first by `stack`
    (SIGTERM: it drains) since it is started after Consul and the backends."""
    admin = ("127.0.0.1", devconsul.free_port())
    listen = ("127.0.0.1", devconsul.free_port())
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sdproxy-load-")))
    text = sdproxy_config(admin, listen, consul_addr, service, settings)
    path = workdir / "sdproxy.toml"
    path.write_text(text)
    child = Child("sdproxy", [sys.executable, "-m", "proxy", "run", "-c", str(path)])
    stack.callback(child.stop, 10.0)
    child.wait_for("event=listening", f"upstream={service}")
    proxy = Sdproxy(child, service, listen, f"http://127.0.0.1:{admin[1]}", text)
    try:
        wait_until("sdproxy /ready", lambda: child.alive() and
                   http_get(f"{proxy.admin}/ready")[0] == 200)
        if expect is not None:
            want = set(expect)
            wait_until(f"sdproxy pool {sorted(want)}", lambda: proxy.endpoint_ids() == want)
    except ScenarioError as e:
        raise ScenarioError(f"{e}\n{child.output()}") from None
    return proxy


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM takes the same clean path as Ctrl-C


def run_scenario(name: str, body: Callable[[contextlib.ExitStack], int]) -> int:
    """Run `body(stack)`; whatever happens, close the stack (ending every process pushed
    on it) with SIGINT/SIGTERM ignored so a second Ctrl-C cannot leave orphans."""
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    stack = contextlib.ExitStack()
    try:
        return body(stack)
    except KeyboardInterrupt:
        say(f"\n{name}: interrupted, stopping everything it started")
        return 130
    except (ScenarioError, devconsul.ConsulInstallError, RuntimeError, OSError) as e:
        print(f"loadtest {name}: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            stack.close()
        finally:
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous_term)


def start_sdproxy_on_registry(stack: contextlib.ExitStack, service: str, expect: Iterable[str],
                              discovery: str, section: str,
                              keys: Mapping[str, Any]) -> Sdproxy:
    """sdproxy with one upstream `service` found through `discovery` (etcd, zookeeper),
    configured by the table `section` with `keys`; returned once it listens, `/ready`
    answers and its pool is `expect`; stopped first by `stack` (SIGTERM: it drains), since
    it is started after the registry."""
    admin = ("127.0.0.1", devconsul.free_port())
    listen = ("127.0.0.1", devconsul.free_port())
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sdproxy-load-")))
    # sdproxy_config writes a [consul] table too; nothing here uses it.
    text = (sdproxy_config(admin, listen, "http://127.0.0.1:8500", service,
                           {"discovery": discovery})
            + "\n" + toml_table(section, dict(keys)))
    path = workdir / "sdproxy.toml"
    path.write_text(text)
    child = Child("sdproxy", [sys.executable, "-m", "proxy", "run", "-c", str(path)])
    stack.callback(child.stop, 10.0)
    child.wait_for("event=listening", f"upstream={service}")
    proxy = Sdproxy(child, service, listen, f"http://127.0.0.1:{admin[1]}", text)
    want = set(expect)
    try:
        wait_until("sdproxy /ready", lambda: child.alive() and
                   http_get(f"{proxy.admin}/ready")[0] == 200)
        wait_until(f"sdproxy pool {sorted(want)}", lambda: proxy.endpoint_ids() == want)
    except ScenarioError as e:
        raise ScenarioError(f"{e}\n{child.output()}") from None
    return proxy
