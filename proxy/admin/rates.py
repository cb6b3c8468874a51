"""Request rate, error rate and latency percentiles over recent windows (the dashboard's).

The upstream runtime already counts responses by status and observes latency into a
bucketed histogram; this module keeps a small ring of per-second copies of those
cumulative counters, taken by the admin once a second (`RateSampler`), so the request
path pays nothing. A window's figures are the differences between the newest copy and
the one WINDOW seconds older: rate = responses / elapsed, error rate = 5xx (an
instance's or sdproxy's own 502/504) / responses, p50/p99 interpolated within the
histogram bucket the rank falls in (the same estimate Prometheus' histogram_quantile
makes). Counters that went down (a worker restarted, a reload replaced the upstream)
count as 0 for that step rather than as a negative rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.upstream.manager import LATENCY_BUCKETS

log = logging.getLogger("sdproxy.admin")

WINDOWS = (("10s", 10.0), ("5m", 300.0))
SAMPLE_INTERVAL = 1.0
_RING = 302  # 5 min of one-per-second samples, and one to spare


@dataclass(frozen=True, slots=True)
class Counters:
    """One upstream's cumulative counters at one moment."""

    by_class: tuple[int, int, int, int, int]  # responses 1xx..5xx
    latency: tuple[int, ...]  # per bucket, not cumulative; +Inf last

    @property
    def responses(self) -> int:
        return sum(self.by_class)


def counters_of(responses: Mapping[Any, Any], latency_counts: Sequence[int]) -> Counters:
    """Counters from a `responses` map (status -> count; keys int or str) and bucket counts."""
    classes = [0, 0, 0, 0, 0]
    for code, n in responses.items():
        index = int(code) // 100 - 1
        if 0 <= index < 5:
            classes[index] += int(n)
    return Counters((classes[0], classes[1], classes[2], classes[3], classes[4]),
                    tuple(int(n) for n in latency_counts))


def add(a: Counters | None, b: Counters) -> Counters:
    if a is None:
        return b
    size = max(len(a.latency), len(b.latency))
    la = a.latency + (0,) * (size - len(a.latency))
    lb = b.latency + (0,) * (size - len(b.latency))
    c = tuple(x + y for x, y in zip(a.by_class, b.by_class, strict=True))
    return Counters((c[0], c[1], c[2], c[3], c[4]), tuple(x + y for x, y in zip(la, lb)))


def quantile(q: float, buckets: Sequence[int],
             bounds: Sequence[float] = LATENCY_BUCKETS) -> float | None:
    """The q-quantile (seconds) of per-bucket counts; None without observations. A rank in
    the +Inf bucket reads as the largest finite bound (all a histogram can say)."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        if n and seen + n >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / n
        seen += n
    return float(bounds[-1])


class RateWindows:
    """The ring of samples and the figures over each window."""

    def __init__(self, size: int = _RING) -> None:
        self._ring: deque[tuple[float, dict[str, Counters]]] = deque(maxlen=size)

    def add_sample(self, at: float, counters: Mapping[str, Counters]) -> None:
        self._ring.append((at, dict(counters)))

    def _baseline(self, now_at: float, seconds: float) -> tuple[float, dict[str, Counters]]:
        """The newest sample at least `seconds` older than `now_at`, else the oldest."""
        chosen = self._ring[0]
        for sample in self._ring:
            if now_at - sample[0] >= seconds - 0.5 * SAMPLE_INTERVAL:
                chosen = sample
            else:
                break
        return chosen

    def figures(self) -> dict[str, dict[str, dict[str, Any]]]:
        """`{upstream: {window: {rate, error_rate, p50_ms, p99_ms, responses, classes,
        seconds}}}`; an upstream not yet sampled twice has no figures."""
        if len(self._ring) < 2:
            return {}
        now_at, newest = self._ring[-1]
        result: dict[str, dict[str, dict[str, Any]]] = {}
        for label, seconds in WINDOWS:
            then_at, oldest = self._baseline(now_at, seconds)
            elapsed = now_at - then_at
            for name, now_c in newest.items():
                then_c = oldest.get(name)
                result.setdefault(name, {})[label] = window_figures(now_c, then_c, elapsed)
        return result


def _deltas(now: Sequence[int], then: Sequence[int] | None) -> list[int]:
    if then is None:
        return [0] * len(now)  # not sampled then: nothing is known about this window
    return [max(0, a - (then[i] if i < len(then) else 0)) for i, a in enumerate(now)]


def window_figures(now: Counters, then: Counters | None, elapsed: float) -> dict[str, Any]:
    classes = _deltas(now.by_class, then.by_class if then else None)
    latency = _deltas(now.latency, then.latency if then else None)
    total = sum(classes)
    p50, p99 = quantile(0.5, latency), quantile(0.99, latency)
    return {
        "seconds": round(elapsed, 1),
        "responses": total,
        "rate": round(total / elapsed, 2) if elapsed > 0 else 0.0,
        "error_rate": round(classes[4] / total, 4) if total else 0.0,
        "p50_ms": None if p50 is None else round(p50 * 1000, 2),
        "p99_ms": None if p99 is None else round(p99 * 1000, 2),
        "classes": {f"{i + 1}xx": n for i, n in enumerate(classes)},
    }


def counters_from_views(upstreams: Iterable[Mapping[str, Any]]) -> dict[str, Counters]:
    """Per upstream name, the counters in readings (views with "metrics"), summed over
    every reading given (the workers' readings, dead ones included: totals stay
    monotonic when a worker dies)."""
    summed: dict[str, Counters] = {}
    for up in upstreams:
        metrics = up.get("metrics") or {}
        name = str(up.get("name"))
        summed[name] = add(summed.get(name),
                           counters_of(up.get("responses") or {},
                                       metrics.get("latency_counts") or ()))
    return summed


class RateSampler:
    """Takes a sample every SAMPLE_INTERVAL on the admin's loop, until stopped."""

    def __init__(self, read: Callable[[], Mapping[str, Counters]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.windows = RateWindows()
        self._read = read
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        self.windows.add_sample(self._clock(), self._read())

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        failed_before = False
        while True:
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 - a bad reading must not stop the figures
                if not failed_before:
                    log.warning('event=dashboard_sample_failed error="%r"', e)
                failed_before = True
            await asyncio.sleep(SAMPLE_INTERVAL)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
