"""Shared infrastructure for the load-test scenarios: processes, traffic, timeline, report.

What it owns, top to bottom:
- **processes**: `Child` (a subprocess in its own session whose merged output a thread
  drains and keeps, each line with the wall time it arrived), `start_backend(s)`,
  `start_consul`, `start_service` (backends registered with HTTP checks, all passing),
  `start_sdproxy` (-> `Sdproxy`: admin reads, metrics, log events), and `run_scenario`,
  which hands the scenario one ExitStack and closes it on success, exception, Ctrl-C or
  SIGTERM, ending every process pushed on it;
- **traffic**: `HttpClient` (a raw-socket HTTP/1.1 keep-alive client with a bounded pool
  per address, one request in flight per connection, which never retries), `warm_up`,
  `paced_load` (an open-model generator: request i is due at t0 + i/rate whether or not
  earlier ones answered, and its latency is measured from that due time, so a stalled
  server cannot hide behind a stalled client: no coordinated omission) and
  `load_with_fault` (the same with one fault injected at a given time); `run_async`
  runs a coroutine on uvloop when installed;
- **observation**: `Timeline` (one clock for samples, faults and log lines),
  `CheckWatcher` (Consul check transitions via blocking queries), log and metric parsers;
- **report**: `percentile`, `bucketize`, `summarize`, `format_table`, `plot_timelines`.

The pure parts (percentiles, bucketing, error classification, table and log parsing)
take data and return data; `tests/unit/test_loadtest_common.py` covers them.

Invariants: every wait is bounded and fails with the child's output; every process is
registered for cleanup the moment it exists; children run in their own sessions, so a
terminal Ctrl-C reaches only the scenario, which then stops them (sdproxy first, so it
drains, then backends, then Consul: the ExitStack's reverse order). Latency is always
seconds from the scheduled send time, errors included; time is seconds since the load
started (`Timeline.t0`).
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import aiohttp

from proxy import devconsul

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 20.0  # seconds for any child to come up
REQUEST_TIMEOUT = 5.0  # per client request, from its scheduled send time
POOL_SIZE = 1000  # connections per address the client may open
BUCKET = 0.1  # seconds per timeline bucket
MAX_LINES = 50_000  # output lines kept per child
HEALTH_INTERVAL = "1s"  # Consul HTTP check interval for the backends
LOGFMT_PAIR = re.compile(r'([A-Za-z_][\w.\-]*)=("(?:[^"\\]|\\.)*"|\S*)')
LOG_TS = re.compile(r"ts=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z")


class ScenarioError(Exception):
    """A step failed; the message says which and carries what the child printed."""


def say(msg: str = "") -> None:
    print(msg, flush=True)


# === processes ==========================================================================
class LogLine(NamedTuple):
    received: float  # wall time the line was read from the pipe
    text: str


def child_env() -> dict[str, str]:
    """Our environment minus what would point a child at another Consul."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN")}
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


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for what we write
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def sdproxy_config(admin: tuple[str, int], listen: tuple[str, int], consul_addr: str,
                   service: str, settings: Mapping[str, Any] | None = None) -> str:
    """A config with one upstream `service` (discovery consul unless `settings` says
    otherwise); a Mapping value in `settings` becomes a subtable (e.g. breaker)."""
    plain = {"mode": "http", "discovery": "consul", "drain_timeout": "2s", **(settings or {})}
    lines = [f'[admin]\nlisten = "{admin[0]}:{admin[1]}"\n', f'[consul]\naddress = "{consul_addr}"\n',
             "[[upstreams]]", f'name = "{service}"', f'listen = "{listen[0]}:{listen[1]}"']
    tables = {k: v for k, v in plain.items() if isinstance(v, Mapping)}
    lines += [f"{k} = {toml_value(v)}" for k, v in plain.items() if k not in tables]
    for key, table in tables.items():
        lines.append(f"\n[upstreams.{key}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


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


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run with uvloop when installed (less client CPU on a small machine)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


# === parsing ============================================================================
def parse_logfmt(line: str) -> dict[str, str]:
    """`a=1 b="x y"` -> {"a": "1", "b": "x y"}."""
    out: dict[str, str] = {}
    for key, raw in LOGFMT_PAIR.findall(line):
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = bytes(raw[1:-1], "utf-8").decode("unicode_escape")
        out[key] = raw
    return out


def log_wall_time(line: str) -> float | None:
    """The `ts=2024-01-02T03:04:05.678Z` of a log line as epoch seconds (UTC), or None."""
    m = LOG_TS.search(line)
    if m is None:
        return None
    whole = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S"))
    frac = m.group(2) or ""
    return whole + (int(frac) / 10 ** len(frac) if frac else 0.0)


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Samples of metric `name` in Prometheus text format: (labels, value)."""
    out = []
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        rest = line[len(name):]
        labels: dict[str, str] = {}
        if rest.startswith("{"):
            inner, _, rest = rest[1:].partition("}")
            labels = {k: v.strip('"') for k, v in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*")', inner)}
        elif not rest.startswith(" "):
            continue  # another metric whose name starts with `name`
        try:
            out.append((labels, float(rest.split()[0])))
        except (IndexError, ValueError):
            continue
    return out


# === HTTP client ========================================================================
Addr = tuple[str, int]


class Response(NamedTuple):
    status: int
    body: bytes
    reused: bool  # sent on a kept-alive connection


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def stale(self) -> bool:
        """The peer closed it while it was idle (what any pooled client checks)."""
        return self.reader.at_eof() or self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class HttpClient:
    """HTTP/1.1 GETs over raw asyncio streams with a keep-alive pool per address.

    At most `pool_size` connections per address, one request in flight on each; a
    request takes an idle connection (dropping ones the peer closed meanwhile), else
    opens one, else waits for one to be released. It never retries, never reconnects
    on its own and never hides a failure: whatever the socket says is raised.
    """

    def __init__(self, pool_size: int = POOL_SIZE, host_header: str = "loadtest") -> None:
        self.pool_size = pool_size
        self.host_header = host_header
        self._idle: dict[Addr, list[_Conn]] = {}
        self._open: Counter[Addr] = Counter()
        self._waiters: dict[Addr, deque[asyncio.Future[None]]] = {}
        self.connects = 0

    async def get(self, addr: Addr, path: str = "/") -> Response:
        conn, reused = await self._acquire(addr)
        keep = False
        try:
            conn.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
                              "User-Agent: sdproxy-loadtest\r\n\r\n".encode())
            status, body, keep = await read_response(conn.reader)
            return Response(status, body, reused)
        finally:  # an exception or a cancellation (timeout) closes the connection
            self._release(addr, conn, keep)

    async def _acquire(self, addr: Addr) -> tuple[_Conn, bool]:
        while True:
            idle = self._idle.setdefault(addr, [])
            while idle:
                conn = idle.pop()
                if not conn.stale():
                    return conn, True
                conn.close()
                self._open[addr] -= 1
            if self._open[addr] < self.pool_size:
                self._open[addr] += 1
                try:
                    reader, writer = await asyncio.open_connection(*addr)
                except BaseException:
                    self._open[addr] -= 1
                    self._wake(addr)
                    raise
                self.connects += 1
                return _Conn(reader, writer), False
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(addr, deque()).append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()

    def _release(self, addr: Addr, conn: _Conn, keep: bool) -> None:
        if keep and not conn.stale():
            self._idle.setdefault(addr, []).append(conn)
        else:
            conn.close()
            self._open[addr] -= 1
        self._wake(addr)

    def _wake(self, addr: Addr) -> None:
        waiters = self._waiters.get(addr)
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """One response: (status, body, connection reusable). Skips 1xx; Content-Length,
    chunked or until-close bodies. IncompleteReadError when the peer closes early."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        try:
            status = int(rest[:3])
        except ValueError:
            raise ValueError(f"bad status line {lines[0]!r}") from None
        if 100 <= status < 200:
            continue
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip().lower()
        keep = version == "HTTP/1.1" and "close" not in headers.get("connection", "")
        if status in (204, 304):
            return status, b"", keep
        if "chunked" in headers.get("transfer-encoding", ""):
            parts: list[bytes] = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await _trailers(reader)
                    return status, b"".join(parts), keep
                parts.append((await reader.readexactly(size + 2))[:-2])
        if "content-length" in headers:
            return status, await reader.readexactly(int(headers["content-length"])), keep
        return status, await reader.read(), False  # until close


async def _trailers(reader: asyncio.StreamReader) -> None:
    while (await reader.readuntil(b"\r\n")) != b"\r\n":
        pass


# === load ===============================================================================
@dataclass(frozen=True, slots=True)
class Sample:
    """One request. `t`: scheduled send time (s since t0); `latency`: s from `t` to the
    response or the error; `lag`: how late the generator actually sent it."""

    t: float
    latency: float
    outcome: str  # "ok", "http 503", "refused", "reset", "eof", "timeout", ...
    backend: str = ""  # which backend answered (the body of a 2xx)
    lag: float = 0.0
    reused: bool = False  # sent on a kept-alive connection

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


def classify(exc: BaseException) -> str:
    """A short, stable name for what went wrong with one request."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "truncated" if exc.partial else "eof"  # eof: closed before any byte
    module = type(exc).__module__
    if module.startswith("dns."):
        return f"dns {type(exc).__name__}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"oserror {errno.errorcode.get(exc.errno, exc.errno)}"
    return type(exc).__name__


class Timeline:
    """One clock for a run: `t0` pairs a monotonic and a wall reading taken together, so
    samples (monotonic) and log lines (wall `ts`) land on the same axis. `marks` are the
    faults and what followed, (t, label)."""

    def __init__(self) -> None:
        self.t0_mono = time.monotonic()
        self.t0_wall = time.time()
        self.marks: list[tuple[float, str]] = []

    def now(self) -> float:
        return time.monotonic() - self.t0_mono

    def from_wall(self, wall: float) -> float:
        return wall - self.t0_wall

    def mark(self, label: str, t: float | None = None) -> float:
        t = self.now() if t is None else t
        self.marks.append((t, label))
        return t


async def warm_up(send: Callable[[], Awaitable[Response]], count: int = 50) -> None:
    """A few unrecorded requests, one at a time, before the clock starts: imports, code
    paths and the first connections are warm, so t=0 measures the server, not us."""
    for _ in range(count):
        with contextlib.suppress(Exception):
            async with asyncio.timeout(REQUEST_TIMEOUT):
                await send()


async def paced_load(send: Callable[[], Awaitable[Response]], *, rate: float,
                     duration: float, timeline: Timeline,
                     timeout: float = REQUEST_TIMEOUT) -> list[Sample]:
    """Open-model load: request i is due at t0 + i/rate (on `timeline`'s clock) and sent
    then, whatever earlier requests are doing. Each one's latency runs from its due time
    to its answer (so generator lag is charged to latency, never hidden) and it fails
    with `timeout` `timeout` seconds after its due time. Returns every sample, in
    completion order."""
    samples: list[Sample] = []
    t0 = timeline.t0_mono
    clock = time.monotonic

    async def one(due: float) -> None:
        lag = clock() - due
        outcome, backend, reused = "ok", "", False
        try:
            async with asyncio.timeout(max(0.0, due + timeout - clock())):
                resp = await send()
            reused = resp.reused
            if 200 <= resp.status < 300:
                backend = resp.body[:64].decode(errors="replace").strip()
            else:
                outcome = f"http {resp.status}"
        # Every failure is a sample; none may stop the run.
        except Exception as e:  # noqa: BLE001
            outcome = classify(e)
        samples.append(Sample(due - t0, clock() - due, outcome, backend, lag, reused))

    tasks: set[asyncio.Task[None]] = set()
    for i in range(max(1, round(duration * rate))):
        due = t0 + i / rate
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(list(tasks))  # each is bounded by `timeout`
    return samples


async def load_with_fault(send: Callable[[], Awaitable[Response]], *, rate: float,
                          duration: float, timeline: Timeline, fault_at: float,
                          fault: Callable[[], None], label: str,
                          watcher: CheckWatcher | None = None,
                          timeout: float = REQUEST_TIMEOUT) -> list[Sample]:
    """`paced_load` with `fault()` called at `fault_at` s (marked `label` on the
    timeline) and `watcher` running beside it; both end with the load."""
    async def inject() -> None:
        await asyncio.sleep(max(0.0, fault_at - timeline.now()))
        fault()
        timeline.mark(label)

    side = [asyncio.create_task(inject())]
    if watcher is not None:
        side.append(asyncio.create_task(watcher.run()))
    try:
        return await paced_load(send, rate=rate, duration=duration, timeline=timeline,
                                timeout=timeout)
    finally:
        for task in side:
            task.cancel()
        await asyncio.gather(*side, return_exceptions=True)


class CheckWatcher:
    """Consul check transitions of one service, via blocking queries on
    /v1/health/checks/SERVICE: `events` is [(t, service_id, status)] on `timeline`."""

    def __init__(self, consul_addr: str, service: str, timeline: Timeline) -> None:
        self.url = f"{consul_addr}/v1/health/checks/{service}"
        self.timeline = timeline
        self.events: list[tuple[float, str, str]] = []
        self._last: dict[str, str] = {}

    async def run(self) -> None:
        """Until cancelled."""
        index = 0
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    async with session.get(self.url, params={"index": index, "wait": "5s"}) as r:
                        checks = await r.json() if r.status == 200 else None
                        new = int(r.headers.get("X-Consul-Index", "0"))
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    await asyncio.sleep(0.1)
                    continue
                if checks is None:
                    await asyncio.sleep(0.1)
                    continue
                index = new if new >= index else 0
                t = self.timeline.now()
                for check in checks:
                    sid, status = check.get("ServiceID", ""), check.get("Status", "")
                    if self._last.get(sid) != status:
                        self._last[sid] = status
                        self.events.append((t, sid, status))

    def first(self, service_id: str, status: str, after: float = -math.inf) -> float | None:
        return next((t for t, sid, st in self.events
                     if sid == service_id and st == status and t >= after), None)


# === statistics and report ==============================================================
def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 1] (0 is the minimum, 1 the maximum); NaN when
    empty. Works on unsorted input."""
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


@dataclass(frozen=True)
class Bucket:
    """Requests scheduled in [t, t + width): counts and latency percentiles (s)."""

    t: float
    width: float
    ok: int
    errors: int
    p50: float
    p99: float

    @property
    def ok_rate(self) -> float:
        return self.ok / self.width

    @property
    def error_rate(self) -> float:
        return self.errors / self.width


def bucketize(samples: Iterable[Sample], width: float = BUCKET,
              end: float | None = None) -> list[Bucket]:
    """Samples grouped by scheduled send time into consecutive buckets from 0 to `end`
    (default: the last sample); empty buckets are kept with NaN latencies."""
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        # The epsilon keeps t = k * width in bucket k despite float error (0.3 // 0.1 == 2).
        groups.setdefault(max(0, math.floor(s.t / width + 1e-9)), []).append(s)
    if end is None:
        count = max(groups) + 1 if groups else 0
    else:
        count = math.ceil(end / width - 1e-9)
    out = []
    for i in range(count):
        group = groups.get(i, [])
        lat = [s.latency for s in group]
        ok = sum(1 for s in group if s.ok)
        out.append(Bucket(round(i * width, 9), width, ok, len(group) - ok,
                          percentile(lat, 0.5), percentile(lat, 0.99)))
    return out


@dataclass
class Summary:
    requests: int
    ok: int
    errors: int
    kinds: Counter[str]
    p50: float
    p90: float
    p99: float
    max: float
    backends: Counter[str]
    first_error: float | None  # scheduled time of the first failed request
    last_error: float | None
    lag_p99: float

    @property
    def error_window(self) -> float:
        """Seconds from the first failed request to the last one (0 without errors)."""
        if self.first_error is None or self.last_error is None:
            return 0.0
        return self.last_error - self.first_error


def summarize(samples: Sequence[Sample]) -> Summary:
    lat = [s.latency for s in samples]
    errs = sorted(s.t for s in samples if not s.ok)
    return Summary(
        requests=len(samples), ok=sum(1 for s in samples if s.ok), errors=len(errs),
        kinds=Counter(s.outcome for s in samples if not s.ok),
        p50=percentile(lat, 0.5), p90=percentile(lat, 0.9), p99=percentile(lat, 0.99),
        max=percentile(lat, 1.0), backends=Counter(s.backend for s in samples if s.ok),
        first_error=errs[0] if errs else None, last_error=errs[-1] if errs else None,
        lag_p99=percentile([s.lag for s in samples], 0.99))


def ms(seconds: float | None) -> str:
    """Seconds as a short millisecond string; '-' for None/NaN."""
    if seconds is None or math.isnan(seconds):
        return "-"
    value = seconds * 1000
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms" if value < 1000 else \
        f"{value:.0f} ms"


def kinds_text(kinds: Counter[str]) -> str:
    return ", ".join(f"{k} x{n}" for k, n in kinds.most_common()) or "-"


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    ncol = max(len(r) for r in cells)
    cells = [r + [""] * (ncol - len(r)) for r in cells]
    widths = [max(len(r[i]) for r in cells) for i in range(ncol)]
    lines = []
    for n, row in enumerate(cells):
        line = "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                         for i, c in enumerate(row))
        lines.append("  " + line.rstrip())
        if n == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_rows(columns: Sequence[Summary],
                 backends: Sequence[str] = ()) -> list[list[object]]:
    """The common rows of a report table, one column per Summary."""
    rows: list[list[object]] = [
        ["requests", *(s.requests for s in columns)],
        ["ok", *(s.ok for s in columns)],
        ["errors", *(s.errors for s in columns)],
        ["latency p50", *(ms(s.p50) for s in columns)],
        ["latency p90", *(ms(s.p90) for s in columns)],
        ["latency p99", *(ms(s.p99) for s in columns)],
        ["latency max", *(ms(s.max) for s in columns)],
    ]
    rows += [[f"answered by {b}", *(s.backends.get(b, 0) for s in columns)] for b in backends]
    return rows


def split_at(samples: Sequence[Sample], t: float) -> tuple[list[Sample], list[Sample]]:
    """(scheduled before t, scheduled at or after t)."""
    return [s for s in samples if s.t < t], [s for s in samples if s.t >= t]


# === plotting ===========================================================================
@dataclass
class Panel:
    """One timeline to draw: a label, its buckets and its marks [(t, label)]."""

    label: str
    buckets: list[Bucket]
    marks: list[tuple[float, str]] = field(default_factory=list)


def plot_timelines(path: str, title: str, panels: Sequence[Panel]) -> None:
    """Per panel two stacked axes sharing time: requests/s (ok, errors) per bucket and
    latency p50/p99 per bucket (log scale); a dashed vertical line and a label at every
    mark. Panels stack as rows; all share the time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    n = len(panels)
    fig, axes = plt.subplots(2 * n, 1, figsize=(12, 4.6 * n + 0.6), sharex=True,
                             gridspec_kw={"height_ratios": [3, 2] * n}, squeeze=False)
    rate_top = max([b.ok_rate + b.error_rate for p in panels for b in p.buckets] + [1]) * 1.35
    lat = [v * 1000 for p in panels for b in p.buckets for v in (b.p50, b.p99)
           if not math.isnan(v) and v > 0]
    lat_lim = (min(lat) / 1.5, max(lat) * 1.5) if lat else (0.1, 10.0)
    colors = ["#d62728", "#7f7f7f", "#9467bd", "#8c564b", "#17becf", "#bcbd22"]
    for i, panel in enumerate(panels):
        top, bottom = axes[2 * i][0], axes[2 * i + 1][0]
        xs = [b.t + b.width / 2 for b in panel.buckets]
        width = panel.buckets[0].width if panel.buckets else BUCKET
        top.plot(xs, [b.ok_rate for b in panel.buckets], color="#2ca02c", lw=1.3,
                 label="ok/s", drawstyle="steps-mid")
        top.bar(xs, [b.error_rate for b in panel.buckets], width=width, color="#d62728",
                alpha=0.8, label="errors/s")
        top.set_ylabel("requests/s\n(per 100 ms)" if abs(width - 0.1) < 1e-9 else
                       "requests/s")
        top.set_ylim(0, rate_top)
        top.set_title(panel.label, loc="left", fontsize=10, fontweight="bold")
        top.grid(alpha=0.3)
        top.legend(loc="lower left", fontsize=8)
        bottom.plot(xs, [b.p50 * 1000 for b in panel.buckets], color="#1f77b4", lw=1.2,
                    label="p50", drawstyle="steps-mid")
        bottom.plot(xs, [b.p99 * 1000 for b in panel.buckets], color="#ff7f0e", lw=1.2,
                    label="p99", drawstyle="steps-mid")
        bottom.set_yscale("log")
        bottom.set_ylim(*lat_lim)  # the same scale in every panel, so rows compare
        bottom.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        bottom.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        bottom.yaxis.set_minor_formatter(NullFormatter())
        bottom.set_ylabel("latency (ms, log)")
        bottom.grid(alpha=0.3, which="both")
        bottom.legend(loc="upper left", fontsize=8)
        for k, (t, label) in enumerate(sorted(panel.marks)):
            color = colors[k % len(colors)]
            for ax in (top, bottom):
                ax.axvline(t, color=color, ls="--", lw=1)
            top.annotate(f"{label} (t={t:.2f}s)", xy=(t, 1), xycoords=("data", "axes fraction"),
                         xytext=(4, -12 - 13 * k), textcoords="offset points", fontsize=8,
                         color=color, bbox={"boxstyle": "round,pad=0.2", "fc": "white",
                                            "ec": color, "alpha": 0.85})
    axes[-1][0].set_xlabel("time since load start (s), requests bucketed by scheduled send time")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
