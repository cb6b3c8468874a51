"""Pure parsers for what the load tests' children print and serve: logfmt log lines, the
`ts` those lines carry, and Prometheus text. Data in, data out; no process, no socket.
"""

from __future__ import annotations

import calendar
import re
import time

LOGFMT_PAIR = re.compile(r'([A-Za-z_][\w.\-]*)=("(?:[^"\\]|\\.)*"|\S*)')
LOG_TS = re.compile(r"ts=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z")


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

