"""A process's memory and file descriptors over time, and whether they trend.

- `ProcessSample`, `sample_process`: VmRSS, open file descriptors and CPU seconds of one
  process at one moment, read from /proc (Linux only);
- `open_fds`: how many descriptors a process holds;
- `fit_line`: the least-squares line through (t, value) points;
- `trend`: that line's slope per minute over the points after a warm-up, with a verdict
  against a threshold ("flat", "growing", "shrinking");
- `default_warm_up`: how much of a run's start a trend leaves out.

Used by the soak scenario and bench/memory_per_connection.py. Everything but the /proc
readers takes data and returns data (tests/unit/test_loadtest_soak.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

from loadtest.benchprocs import cpu_seconds, rss_bytes

MIN_POINTS = 3  # a slope through fewer points says nothing about a trend


def open_fds(pid: int) -> int:
    """Open file descriptors of a process (0 once it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@dataclass(frozen=True, slots=True)
class ProcessSample:
    t: float  # seconds on the run's clock
    rss: int  # bytes
    fds: int
    cpu: float  # seconds of CPU used since the process started


def sample_process(pid: int, t: float) -> ProcessSample:
    return ProcessSample(t, rss_bytes(pid), open_fds(pid), cpu_seconds(pid))


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line through `points` [(x, y)]; needs two
    distinct x values (ValueError otherwise)."""
    n = len(points)
    if n < 2:
        raise ValueError("a line needs at least two points")
    mean_x = math.fsum(x for x, _ in points) / n
    mean_y = math.fsum(y for _, y in points) / n
    sxx = math.fsum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        raise ValueError("a line needs two distinct x values")
    sxy = math.fsum((x - mean_x) * (y - mean_y) for x, y in points)
    slope = sxy / sxx
    return slope, mean_y - slope * mean_x


@dataclass(frozen=True)
class Trend:
    """The least-squares line through the points after `start` (seconds), per minute."""

    start: float  # first t used
    end: float  # last t used
    points: int
    per_minute: float  # slope, value units per minute (NaN with too few points)
    intercept: float  # value at t = 0 of the line (units)
    threshold: float  # |per_minute| below this is flat
    verdict: str  # "flat", "growing", "shrinking" or "too few samples"

    def at(self, t: float) -> float:
        """The fitted value at time t (seconds)."""
        return self.intercept + self.per_minute * t / 60.0

    @property
    def flat(self) -> bool:
        return self.verdict == "flat"


def trend(points: Sequence[tuple[float, float]], *, warm_up: float,
          threshold_per_minute: float) -> Trend:
    """The trend of `points` [(t seconds, value)] from t >= `warm_up` on: flat when the
    slope's magnitude is below `threshold_per_minute`."""
    kept = sorted(p for p in points if p[0] >= warm_up)
    start = kept[0][0] if kept else math.nan
    end = kept[-1][0] if kept else math.nan
    if len(kept) < MIN_POINTS or start == end:
        return Trend(start, end, len(kept), math.nan, math.nan, threshold_per_minute,
                     "too few samples")
    slope, intercept = fit_line(kept)
    per_minute = slope * 60.0
    if abs(per_minute) < threshold_per_minute:
        verdict = "flat"
    else:
        verdict = "growing" if per_minute > 0 else "shrinking"
    return Trend(start, end, len(kept), per_minute, intercept, threshold_per_minute, verdict)


def default_warm_up(run_seconds: float) -> float:
    """The start of a run a trend leaves out: 2 minutes, or a quarter of a run shorter
    than 8 minutes (caches, pools and the allocator's arenas fill first)."""
    return min(120.0, run_seconds / 4)
