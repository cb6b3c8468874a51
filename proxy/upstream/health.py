"""Active health checks, the I/O shell: one task per upstream probes its instances.

Owns the probes themselves: http mode, `GET <path>` with `Host: <upstream name>` and
`Connection: close` on a fresh connection, judged by its status line alone; tcp mode, a
connect. Over TLS when the upstream has `[upstreams.tls]`, as its requests go. Each probe is bounded as a whole by `timeout` (connect and answer together).
Probes never use the pooled connections and never touch the breaker or the request
counters. When and whom to probe is `health_state.ProbeSchedule`'s, what a result means
`health_state.HealthState`'s, and what the pool does with it
`UpstreamRuntime.on_probe_result`'s. This is the only module of `proxy.upstream` that does
I/O; the decisions stay testable without it.

Life cycle: `HealthChecker(runtime).start()` once the upstream serves, `stop()` when it
is retired (proxy.app). The checker follows the runtime's config through reloads: checks
turned on start probing, turned off lift every ejection, a changed `[upstreams.health]`
starts a fresh schedule (the instances keep their counts). It probes the catalog's
instances (`runtime.current`), operator-drained ones included, so an operator sees their
health before enabling them. Every worker process probes on its own.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from typing import Final

from proxy.config import HealthConfig
from proxy.tls import ORIGINATIONS, UpstreamTlsConfig, describe
from proxy.upstream.health_state import (
    CONNECTED,
    ProbeResult,
    ProbeSchedule,
    StatusExpectation,
    error_result,
    http_result,
    parse_status_line,
    timeout_result,
)
from proxy.upstream.host import Host
from proxy.upstream.manager import Snapshot, UpstreamRuntime

log = logging.getLogger("sdproxy.health")

# How often, at least, the task of an upstream with checks on looks at its config and at
# the pool (a new instance gets its first probe within RECHECK + one interval). With
# checks off it sleeps until `wake()` (a reload that may have turned them on).
RECHECK: Final = 1.0
STATUS_LINE_LIMIT: Final = 8192  # bytes; a longer first line is not an HTTP answer we read
USER_AGENT: Final = "sdproxy-health"

Probe = Callable[[Host, HealthConfig, str, StatusExpectation, bool, UpstreamTlsConfig | None],
                Awaitable[ProbeResult]]


def _describe(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    return f"connect: {exc.strerror or exc}"


def probe_request(path: str, host_header: str) -> bytes:
    # CR and LF cannot be in a header value (RFC 9110 section 5.5); a name holding them
    # must not split the probe into two requests.
    host = "".join(c for c in host_header if c not in "\r\n")
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\n"
            f"Accept: */*\r\nConnection: close\r\n\r\n").encode("latin-1", "replace")


async def probe_instance(host: Host, cfg: HealthConfig, upstream: str,
                         expectation: StatusExpectation, tcp: bool,
                         tls: UpstreamTlsConfig | None = None) -> ProbeResult:
    """One probe of `host`; never raises except CancelledError.

    With `tls` the probe speaks TLS as requests do (tcp mode: a completed handshake is
    the connect), so an instance whose certificate fails is ejected like a dead one.
    """
    ep = host.endpoint
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(cfg.timeout):
            if tls is None:
                reader, writer = await asyncio.open_connection(ep.address, ep.port,
                                                               limit=STATUS_LINE_LIMIT)
            else:
                origination = ORIGINATIONS.get(tls)
                reader, writer = await asyncio.open_connection(
                    ep.address, ep.port, limit=STATUS_LINE_LIMIT, ssl=origination.context,
                    server_hostname=origination.server_name)
            if tcp:
                return CONNECTED
            writer.write(probe_request(cfg.path, upstream))
            line = await reader.readline()
    except TimeoutError:
        return timeout_result(cfg.timeout)
    except ssl.SSLError as exc:  # first: a failed verification is a ValueError too
        return error_result(f"tls: {describe(exc)}")
    except ValueError:  # StreamReader.readline past the limit
        return error_result("not an HTTP response (status line too long)")
    except OSError as exc:
        return error_result(_describe(exc))
    finally:
        if writer is not None:
            writer.close()
    if not line:
        return error_result("closed before answering")
    status = parse_status_line(line)
    if status is None:
        return error_result("not an HTTP response")
    return http_result(status, cfg.path, expectation)


class HealthChecker:
    """Probes one upstream's instances while its `[upstreams.health]` is on."""

    def __init__(self, runtime: UpstreamRuntime, *, rng: random.Random | None = None,
                 probe: Probe = probe_instance) -> None:
        self.runtime = runtime
        self.rng = rng or random.Random()
        self.probe = probe
        self.config: HealthConfig | None = None
        self.schedule: ProbeSchedule[Host] | None = None
        self.expectation = StatusExpectation(())
        self._synced: Snapshot | None = None  # the snapshot the schedule follows
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._probes: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self.run(), name=f"health-{self.runtime.name}")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._cancel_probes()

    def wake(self) -> None:
        """Look at the config now (a reload changed the upstream)."""
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            delay = self.step(loop.time())
            try:
                async with asyncio.timeout(delay):  # None: until woken
                    await self._wake.wait()
            except TimeoutError:
                pass

    def step(self, now: float) -> float | None:
        """Start the probes due at `now`; return how long until the next look (None: not
        before `wake()`, the checks are off)."""
        cfg = self.runtime.config.health
        if cfg != self.config:
            self._configure(cfg)
        schedule = self.schedule
        if cfg is None or schedule is None:
            return None
        current = self.runtime.current
        if current is not self._synced:  # the catalog changed the pool
            schedule.sync(current.hosts, now)
            self._synced = current
        for host in schedule.take_due(now):
            task = asyncio.get_running_loop().create_task(self._probe_one(host, cfg, schedule))
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)
        due = schedule.next_due()
        return RECHECK if due is None else min(RECHECK, max(0.0, due - now))

    def _configure(self, cfg: HealthConfig | None) -> None:
        self._cancel_probes()  # judged by the old section; the new one probes afresh
        self.config = cfg
        if cfg is None:
            self.schedule = None
            self.runtime.clear_health()
            log.info("event=health_checks upstream=%s on=false", self.runtime.name)
            return
        self.schedule = ProbeSchedule(cfg.interval, self.rng)
        self._synced = None
        self.expectation = StatusExpectation(cfg.expect)
        log.info("event=health_checks upstream=%s on=true check=%s interval=%g timeout=%g "
                 "fall=%d rise=%d", self.runtime.name,
                 "connect" if self._tcp else f"GET {cfg.path}", cfg.interval, cfg.timeout,
                 cfg.fall, cfg.rise)

    @property
    def _tcp(self) -> bool:
        return self.runtime.config.mode == "tcp"

    async def _probe_one(self, host: Host, cfg: HealthConfig,
                         schedule: ProbeSchedule[Host]) -> None:
        loop = asyncio.get_running_loop()
        try:
            result = await self.probe(host, cfg, self.runtime.name, self.expectation,
                                      self._tcp, self.runtime.config.tls)
            if schedule is self.schedule:
                self.runtime.on_probe_result(host, result)
        except Exception:  # a bug must not stop this instance's probes
            log.exception("event=health_probe_bug upstream=%s instance=%s",
                          self.runtime.name, host.id)
        finally:
            schedule.finished(host, loop.time())
            self._wake.set()

    def _cancel_probes(self) -> None:
        for task in list(self._probes):
            task.cancel()
        self._probes.clear()
