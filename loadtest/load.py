"""Open-model load and the clock it is measured on.

- `paced_load`: request i is due at t0 + i/rate whether or not earlier ones answered, and
  its latency is measured from that due time, so a stalled server cannot hide behind a
  stalled client (no coordinated omission); `load_with_fault` is the same with one fault
  injected at a given time; `warm_up` sends a few unrecorded requests first;
- `Timeline`: one clock for samples, faults and log lines; `CheckWatcher`: Consul check
  transitions via blocking queries, on that clock;
- `classify`: a short, stable name for what went wrong with one request;
- `run_async`: a coroutine on uvloop when installed.

Latency is always seconds from the scheduled send time, errors included; time is seconds
since the load started (`Timeline.t0`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from loadtest.client import Response

T = TypeVar("T")
REQUEST_TIMEOUT = 5.0  # per client request, from its scheduled send time


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run with uvloop when installed (less client CPU on a small machine)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


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

    def mark_time(self, prefix: str) -> float:
        """The time of the first mark whose label starts with `prefix`."""
        return next(t for t, label in self.marks if label.startswith(prefix))


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

