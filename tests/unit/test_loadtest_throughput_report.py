"""loadtest throughput's report (ratio rows, targets, verdicts) and wrk's report parser."""

from __future__ import annotations

import argparse

import pytest

from loadtest.benchprocs import ToolError
from loadtest.scenarios.throughput import Env, Row, report
from loadtest.wrk import parse_wrk


def _env() -> Env:
    args = argparse.Namespace(threads=1, connections=50, duration=10.0, repeat=1,
                              bulk_gib=2.0, latency_rate=2000.0)
    return Env(args, ["sdproxy", "haproxy"], [], 0, "", {}, None)


def _row(case: str, proxy: str, *, done: float, cpu_s: float, p99_ms: float) -> Row:
    return Row(case, proxy, rps=done / 10, p99_ms=p99_ms, cpu_s=cpu_s, seconds=10.0, done=done)


def _ratio_line(text: str, metric: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.strip().startswith(metric))
    return line[len(metric) + 2:].split()


def test_http_ratio_and_verdicts() -> None:
    rows = [_row("http", "sdproxy", done=200_000, cpu_s=10.0, p99_ms=6.0),
            _row("http", "haproxy", done=400_000, cpu_s=10.0, p99_ms=3.0)]
    text = report(rows, 39.5, _env())
    assert _ratio_line(text, "http small: req per proxy cpu-s")[:3] == ["0.500", ">=", "0.90"]
    assert _ratio_line(text, "http small: req per proxy cpu-s")[3] == "MISS"
    assert _ratio_line(text, "http small: p99 latency (wrk, saturated)")[:4] == \
        ["2.000", "<=", "1.50", "MISS"]
    assert _ratio_line(text, "idle RSS, one upstream (MiB)")[:4] == ["39.5", "<=", "40", "PASS"]


def test_latency_case_has_its_own_table_and_ratio() -> None:
    rows = [Row("latency", "sdproxy", rps=2000, p50_ms=0.5, p99_ms=1.2, cpu_s=2.0,
                seconds=10.0, done=20_000),
            Row("latency", "haproxy", rps=2000, p50_ms=0.4, p99_ms=1.0, cpu_s=1.0,
                seconds=10.0, done=20_000)]
    text = report(rows, None, _env())
    assert "Latency at 2000 GETs/s" in text
    assert "Small requests" not in text  # the latency rows are not wrk rows
    assert _ratio_line(text, "http p99 at 2000 req/s (open model)")[:4] == \
        ["1.200", "<=", "1.50", "PASS"]


WRK_REPORT = """Running 10s test @ http://127.0.0.1:8080/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.41ms  512.33us  15.20ms   90.12%
    Req/Sec    20.79k     1.02k   22.10k    71.00%
  Latency Distribution
     50%    2.35ms
     75%    2.60ms
     90%    2.90ms
     99%  850.00us
  206873 requests in 10.00s, 31.17MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:  20686.47
Transfer/sec:      3.12MB
"""


def test_parse_wrk_reads_rate_percentiles_and_errors() -> None:
    result = parse_wrk(WRK_REPORT)
    assert result.requests == 206873
    assert result.rps == 20686.47
    assert result.latency_ms[50] == 2.35
    assert result.p99_ms == 0.85  # microseconds converted
    assert (result.non_2xx, result.read_errors, result.timeouts) == (7, 3, 2)
    assert result.error_text() == "non-2xx 7, read 3, timeout 2"


def test_parse_wrk_without_a_rate_is_an_error() -> None:
    with pytest.raises(ToolError):
        parse_wrk("unable to connect to 127.0.0.1:8080 Connection refused\n")
