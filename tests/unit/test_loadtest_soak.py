"""The soak scenario's judgement: the least-squares slope of RSS and fds after a warm-up
and its verdict (loadtest.trend), the report's verdict line, and its traffic client's
idle timeout (loadtest.mixed) over a real loopback socket."""

from __future__ import annotations

import argparse
import asyncio
import math

import pytest

from loadtest.mixed import MixedClient
from loadtest.scenarios.soak import SoakReport
from loadtest.trend import ProcessSample, default_warm_up, fit_line, trend

KiB = 1024
MiB = 1024 * KiB


# -- fit_line -----------------------------------------------------------------------------
def test_fit_line_recovers_an_exact_line() -> None:
    slope, intercept = fit_line([(x, 3.0 * x - 7.0) for x in (0.0, 10.0, 20.0, 35.0)])
    assert slope == pytest.approx(3.0)
    assert intercept == pytest.approx(-7.0)


def test_fit_line_of_symmetric_noise_is_its_mean() -> None:
    slope, intercept = fit_line([(0, 10), (1, 12), (2, 10), (3, 12)])
    assert slope == pytest.approx(0.4)  # the least-squares answer, worked by hand
    assert intercept == pytest.approx(10.4)


@pytest.mark.parametrize("points", [[], [(1.0, 2.0)], [(5.0, 1.0), (5.0, 9.0)]])
def test_fit_line_needs_two_distinct_x(points: list[tuple[float, float]]) -> None:
    with pytest.raises(ValueError):
        fit_line(points)


# -- trend --------------------------------------------------------------------------------
def minutes(values: list[float], every: float = 10.0) -> list[tuple[float, float]]:
    """One value every `every` seconds from t=0."""
    return [(i * every, v) for i, v in enumerate(values)]


def test_noise_around_a_level_is_flat() -> None:
    # 30 minutes of RSS in KiB, +/- 400 KiB of allocator noise around 40 MiB.
    points = minutes([40 * KiB + (400 if i % 2 else -400) for i in range(181)])
    t = trend(points, warm_up=120, threshold_per_minute=64)
    assert t.verdict == "flat" and t.flat
    assert abs(t.per_minute) < 64
    assert t.points == 181 - 12  # samples at t >= 120 s
    assert (t.start, t.end) == (120, 1800)


def test_a_steady_leak_is_growing_at_its_rate() -> None:
    points = minutes([40 * KiB + 100 * (i * 10 / 60) for i in range(181)])  # 100 KiB/min
    t = trend(points, warm_up=120, threshold_per_minute=64)
    assert t.verdict == "growing" and not t.flat
    assert t.per_minute == pytest.approx(100)
    assert t.at(600) == pytest.approx(40 * KiB + 1000)


def test_a_falling_line_is_shrinking() -> None:
    t = trend(minutes([100 - 2 * i for i in range(30)]), warm_up=0, threshold_per_minute=1)
    assert t.verdict == "shrinking"
    assert t.per_minute == pytest.approx(-12)  # -2 per 10 s


def test_the_warm_up_ramp_is_left_out() -> None:
    ramp = [30 * KiB + 1000 * i for i in range(12)]  # +6 MiB/min for the first 2 minutes
    points = minutes(ramp + [41 * KiB] * 169)
    assert trend(points, warm_up=120, threshold_per_minute=64).verdict == "flat"
    assert trend(points, warm_up=0, threshold_per_minute=64).verdict == "growing"


def test_a_slope_equal_to_the_threshold_is_not_flat() -> None:
    t = trend(minutes([i * 10 / 60 * 64 for i in range(20)]), warm_up=0,
              threshold_per_minute=64)
    assert t.per_minute == pytest.approx(64)
    assert t.verdict == "growing"


@pytest.mark.parametrize("points", [[], [(130.0, 1.0), (140.0, 2.0)], [(60.0, 1.0)] * 5])
def test_too_few_samples_after_the_warm_up_give_no_slope(
        points: list[tuple[float, float]]) -> None:
    t = trend(points + [(10.0, 5.0)], warm_up=120, threshold_per_minute=64)
    assert t.verdict == "too few samples" and not t.flat
    assert math.isnan(t.per_minute)


def test_default_warm_up_is_two_minutes_or_a_quarter_of_a_short_run() -> None:
    assert default_warm_up(30 * 60) == 120
    assert default_warm_up(3 * 60) == 45


# -- the report's verdict -------------------------------------------------------------------
def report_of(rss_kib: list[float], fds: list[int]) -> SoakReport:
    args = argparse.Namespace(flat_kib_per_min=64.0, flat_fds_per_min=1.0, churn_period=4.0,
                              sample=10.0)
    resources = [ProcessSample(i * 10.0, int(r * KiB), f, i * 0.1)
                 for i, (r, f) in enumerate(zip(rss_kib, fds))]
    return SoakReport([], [], resources, resources[0], 120.0, len(resources) * 10.0, args)


def test_report_calls_a_flat_run_flat_and_names_the_peak() -> None:
    rss = [30 * KiB + 500 * i for i in range(12)] + [41 * KiB + (50 if i % 3 else 0)
                                                      for i in range(60)]
    report = report_of(rss, [30 + i % 4 for i in range(72)])
    verdict = report.verdict()
    assert verdict.startswith("verdict: RSS flat (")
    assert "fds flat (" in verdict
    assert f"peak RSS {(41 * KiB + 50) / KiB:.1f} MiB" in verdict
    assert "0 failed requests out of 0" in verdict


def test_report_calls_a_leak_growing() -> None:
    report = report_of([40 * KiB + 50 * i for i in range(72)], [30 + i for i in range(72)])
    assert "RSS growing (+300.00 KiB/min)" in report.verdict()
    assert "fds growing (+6.00 fds/min)" in report.verdict()


# -- MixedClient's idle timeout, over a real socket -----------------------------------------
async def test_client_gives_up_a_connection_parked_past_its_idle_timeout() -> None:
    accepted = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    addr = server.sockets[0].getsockname()[:2]
    try:
        keeps, drops = MixedClient(idle_timeout=60.0), MixedClient(idle_timeout=0.0)
        for client in (keeps, drops):
            first = await client.get(addr)
            second = await client.get(addr)
            assert (first.status, first.body, first.reused) == (200, b"ok", False)
            assert second.status == 200
            assert second.reused is (client is keeps)
        assert keeps.connects == 1  # reused: parked well within its idle timeout
        assert drops.connects == 2  # parked past an idle timeout of 0: closed, a new one
        keeps.close()
        drops.close()
    finally:
        server.close()
        await server.wait_closed()
    assert accepted == 3
