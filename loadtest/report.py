"""Statistics and reports of load-test samples: percentiles, timeline buckets, summaries,
plain-text tables and timeline plots. Data in, data (or a PNG) out.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from loadtest.load import Sample

BUCKET = 0.1  # seconds per timeline bucket


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
