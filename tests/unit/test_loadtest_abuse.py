"""The pure parts of the abuse scenario: its verdict and phase figures, the attackers'
response counter and flood sizing, and the broken instance's smuggling answer. No
process, no socket: the scenario itself is a benchmark (`python -m loadtest abuse`)."""

from __future__ import annotations

import asyncio
import math

import pytest

from loadtest.attackers import FD_RESERVE, ResponseCounter, distribution, first_status, flood_size
from loadtest.brokenbackend import SMUGGLED_BODY, extra_answer
from loadtest.common import Sample, Summary, read_response, summarize
from loadtest.scenarios.abuse import (
    DESYNC,
    flag_desync,
    outcomes_text,
    p99_ratio,
    phase_of,
    resources,
    verdict,
)
from loadtest.trend import ProcessSample


def ok(t: float, latency: float) -> Sample:
    return Sample(t, latency, "ok", "backend-1")


def phases(base_ms: float, abuse_ms: float, abuse_errors: int = 0) -> dict[str, Summary]:
    base = summarize([ok(i / 100, base_ms / 1000) for i in range(100)])
    abuse = [ok(1 + i / 100, abuse_ms / 1000) for i in range(100)]
    abuse += [Sample(2.0, 0.001, "reset")] * abuse_errors
    return {"baseline": base, "abuse": summarize(abuse)}


# -- verdict ------------------------------------------------------------------------------
def test_verdict_holds_with_no_errors_and_p99_within_the_ratio() -> None:
    assert verdict(phases(2.0, 4.0)) == []  # exactly 2x is within the target


def test_verdict_names_a_p99_beyond_the_ratio() -> None:
    (failure,) = verdict(phases(2.0, 4.2))
    assert "2.10x" in failure and "target <= 2x" in failure


def test_verdict_names_every_phase_with_errors_and_their_kinds() -> None:
    failures = verdict(phases(2.0, 2.0, abuse_errors=3))
    assert failures == ["3 errors for the well-behaved client during abuse (reset x3)"]


def test_verdict_fails_without_a_measured_phase() -> None:
    empty = {"baseline": summarize([]), "abuse": summarize([ok(0, 0.001)])}
    assert verdict(empty) == ["no p99 ratio: a phase without a measured request"]


def test_p99_ratio_is_nan_for_a_zero_or_missing_baseline() -> None:
    assert math.isnan(p99_ratio(summarize([]), summarize([ok(0, 0.001)])))
    assert math.isnan(p99_ratio(summarize([ok(0, 0.0)]), summarize([ok(0, 0.001)])))


# -- samples and phases -------------------------------------------------------------------
def test_flag_desync_turns_a_smuggled_answer_into_an_error() -> None:
    smuggled = Sample(1.0, 0.002, "ok", SMUGGLED_BODY.decode(), reused=True)
    out = flag_desync([ok(0.5, 0.001), smuggled])
    assert [s.outcome for s in out] == ["ok", DESYNC]
    assert out[1].reused and out[1].backend == ""


@pytest.mark.parametrize(("t", "phase"), [
    (0.0, "baseline"), (9.999, "baseline"), (10.0, "abuse"), (29.999, "abuse"),
    (30.0, "after"), (99.0, "after"),
])
def test_phase_of_splits_at_the_abuse_edges(t: float, phase: str) -> None:
    assert phase_of(t, baseline=10.0, duration=20.0) == phase


def test_resources_peaks_and_cpu_share() -> None:
    usage = [ProcessSample(0.0, 40 << 20, 20, 1.0), ProcessSample(1.0, 90 << 20, 300, 1.5),
             ProcessSample(2.0, 60 << 20, 50, 2.0)]
    r = resources(usage)
    assert (r.peak_rss, r.peak_fds) == (90 << 20, 300)
    assert r.cpu_share == pytest.approx(0.5)
    assert math.isnan(resources([]).cpu_share)


def test_outcomes_text_lists_counts_and_durations() -> None:
    fig = {"outcomes": {"http 408": 9, "closed": 1},
           "seconds": {"http 408": {"count": 9, "p50": 2.1, "max": 2.35}}}
    assert outcomes_text(fig) == "http 408 x9 (after p50 2.100 s, max 2.350 s); closed x1"
    assert outcomes_text({}) == "nothing recorded"


# -- attackers ----------------------------------------------------------------------------
RESPONSES = (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nbackend-1"
             b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 3\r\n\r\nbad"
             b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n" + SMUGGLED_BODY)


@pytest.mark.parametrize("step", [1, 2, 5, 11, len(RESPONSES)])
def test_response_counter_counts_status_lines_however_the_bytes_are_split(step: int) -> None:
    counter = ResponseCounter()
    for i in range(0, len(RESPONSES), step):
        counter.feed(RESPONSES[i:i + step])
    assert counter.count == 3
    assert counter.statuses == {"200": 2, "502": 1}
    assert counter.smuggled == 1


def test_response_counter_waits_for_a_whole_status_code() -> None:
    counter = ResponseCounter()
    counter.feed(b"HTTP/1.1 2")
    assert counter.count == 0
    counter.feed(b"04 No Content\r\n\r\n")
    assert (counter.count, counter.statuses) == (1, {"204": 1})


def test_flood_size_leaves_room_for_the_other_attackers() -> None:
    assert flood_size(20000, 20000, others=200) == 20000 - 200 - FD_RESERVE
    assert flood_size(500, 20000, others=200) == 500
    assert flood_size(500, 100, others=200) == 0


def test_first_status() -> None:
    assert first_status(b"HTTP/1.1 503 Service Unavailable\r\n") == "http 503"
    assert first_status(b"") == "closed"
    assert first_status(b"\x00garbage") == "bytes"


def test_distribution() -> None:
    assert distribution([]) == {"count": 0, "p50": None, "max": None}
    assert distribution([3.0, 1.0, 2.0]) == {"count": 3, "p50": 2.0, "max": 3.0}


# -- broken instance ----------------------------------------------------------------------
def test_extra_answer_is_a_whole_response_and_then_one_nobody_asked_for() -> None:
    async def parse() -> list[tuple[int, bytes, bool]]:
        reader = asyncio.StreamReader()
        reader.feed_data(extra_answer("broken-1"))
        reader.feed_eof()
        return [await read_response(reader), await read_response(reader)]

    first, second = asyncio.run(parse())
    assert first == (200, b"broken-1", True)
    assert second == (200, SMUGGLED_BODY, True)
