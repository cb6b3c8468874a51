"""The pure parts of the load-test infrastructure: percentiles, timeline bucketing,
error classification, report tables, log/metric parsing, the HTTP response reader and
the SRV codec of dns-vs-proxy. No process, no socket."""

from __future__ import annotations

import asyncio
import math
from collections import Counter

import dns.message
import dns.rrset
import pytest

from loadtest.common import (
    Sample,
    bucketize,
    classify,
    format_table,
    log_wall_time,
    metric_samples,
    parse_logfmt,
    percentile,
    read_response,
    sdproxy_config,
    split_at,
    summarize,
)
from loadtest.scenarios.dns_vs_proxy import SrvRecord, build_query, choose, parse_srv_response


# -- percentile ---------------------------------------------------------------------------
@pytest.mark.parametrize(("q", "want"), [
    (0.0, 1), (0.01, 1), (0.5, 50), (0.9, 90), (0.99, 99), (0.999, 100), (1.0, 100),
])
def test_percentile_is_nearest_rank(q: float, want: float) -> None:
    values = list(range(100, 0, -1))  # unsorted on purpose
    assert percentile(values, q) == want


def test_percentile_of_one_value_is_that_value() -> None:
    assert [percentile([7.0], q) for q in (0, 0.5, 1)] == [7.0, 7.0, 7.0]


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(percentile([], 0.5))


def test_percentile_small_sets() -> None:
    # nearest rank: ceil(q * n)-th smallest
    assert percentile([10, 20, 30, 40], 0.5) == 20
    assert percentile([10, 20, 30, 40], 0.51) == 30
    assert percentile([10, 20, 30, 40], 0.99) == 40


# -- bucketing ----------------------------------------------------------------------------
def s(t: float, latency: float = 0.001, outcome: str = "ok") -> Sample:
    return Sample(t, latency, outcome)


def test_bucketize_counts_ok_and_errors_per_bucket() -> None:
    buckets = bucketize([s(0.0), s(0.05), s(0.1, outcome="refused"), s(0.15), s(0.25)], 0.1)
    assert [(b.t, b.ok, b.errors) for b in buckets] == [(0.0, 2, 0), (0.1, 1, 1), (0.2, 1, 0)]
    assert buckets[0].ok_rate == pytest.approx(20.0)
    assert buckets[1].error_rate == pytest.approx(10.0)


def test_bucketize_puts_exact_multiples_in_their_own_bucket() -> None:
    # i / rate lands on bucket edges; float division must not shift them (0.3 // 0.1 == 2)
    rate = 500
    buckets = bucketize([s(i / rate) for i in range(rate)], 0.1)
    assert [b.ok for b in buckets] == [50] * 10


def test_bucketize_keeps_empty_buckets_up_to_end() -> None:
    buckets = bucketize([s(0.05)], 0.1, end=0.5)
    assert len(buckets) == 5
    assert [b.ok for b in buckets] == [1, 0, 0, 0, 0]
    assert math.isnan(buckets[3].p50) and math.isnan(buckets[3].p99)


def test_bucketize_latency_percentiles_include_errors() -> None:
    samples = [s(0.01 * i, latency=0.001) for i in range(9)] + [s(0.09, 1.0, "timeout")]
    (bucket,) = bucketize(samples, 0.1)
    assert bucket.p50 == 0.001
    assert bucket.p99 == 1.0
    assert (bucket.ok, bucket.errors) == (9, 1)


def test_bucketize_nothing() -> None:
    assert bucketize([], 0.1) == []
    assert len(bucketize([], 0.1, end=1.0)) == 10


def test_summarize_and_split() -> None:
    samples = [s(0.0), s(1.0, 0.002, "refused"), s(1.5, 0.003, "reset"), s(2.0)]
    samples = [Sample(x.t, x.latency, x.outcome, "b1" if x.outcome == "ok" else "")
               for x in samples]
    total = summarize(samples)
    assert (total.requests, total.ok, total.errors) == (4, 2, 2)
    assert total.kinds == Counter({"refused": 1, "reset": 1})
    assert total.error_window == pytest.approx(0.5)
    assert total.backends == Counter({"b1": 2})
    before, after = split_at(samples, 1.0)
    assert [x.t for x in before] == [0.0] and [x.t for x in after] == [1.0, 1.5, 2.0]
    assert summarize([]).error_window == 0.0


# -- classification -----------------------------------------------------------------------
@pytest.mark.parametrize(("exc", "want"), [
    (TimeoutError(), "timeout"),
    (ConnectionRefusedError(111, "refused"), "refused"),
    (ConnectionResetError(104, "reset"), "reset"),
    (BrokenPipeError(32, "pipe"), "reset"),
    (asyncio.IncompleteReadError(b"", 10), "eof"),
    (asyncio.IncompleteReadError(b"HTTP/1.1 2", 10), "truncated"),
    (OSError(113, "no route"), "oserror EHOSTUNREACH"),
    (ValueError("bad status line"), "ValueError"),
])
def test_classify(exc: BaseException, want: str) -> None:
    assert classify(exc) == want


# -- report and parsing -------------------------------------------------------------------
def test_format_table_aligns_columns() -> None:
    text = format_table(["", "a", "bb"], [["requests", 1, 22], ["p99", "3.0 ms", "-"]])
    assert text.splitlines() == [
        "                 a  bb",
        "  --------  ------  --",
        "  requests       1  22",
        "  p99       3.0 ms   -",
    ]


def test_parse_logfmt_and_ts() -> None:
    line = ('ts=2024-05-06T07:08:09.123Z level=info event=pool_change upstream=web '
            'added=a,b removed=- note="x y"')
    fields = parse_logfmt(line)
    assert fields["event"] == "pool_change" and fields["added"] == "a,b"
    assert fields["note"] == "x y"
    assert log_wall_time(line) == pytest.approx(1714979289.123)
    assert log_wall_time("no ts here") is None


def test_metric_samples() -> None:
    text = ("# HELP sdproxy_failovers_total x\n# TYPE sdproxy_failovers_total counter\n"
            'sdproxy_failovers_total{upstream="web",reason="reset"} 3.0\n'
            'sdproxy_failovers_total{upstream="web",reason="timeout"} 2.0\n'
            "sdproxy_failovers_total_other 9\n"
            "sdproxy_catalog_updates_total 4\n")
    got = metric_samples(text, "sdproxy_failovers_total")
    assert got == [({"upstream": "web", "reason": "reset"}, 3.0),
                   ({"upstream": "web", "reason": "timeout"}, 2.0)]
    assert metric_samples(text, "sdproxy_catalog_updates_total") == [({}, 4.0)]


def test_sdproxy_config_writes_subtables() -> None:
    text = sdproxy_config(("127.0.0.1", 1), ("127.0.0.1", 2), "http://127.0.0.1:3", "web",
                          {"request_timeout": "1s", "breaker": {"failures": 3}})
    assert 'request_timeout = "1s"' in text
    assert text.index("[upstreams.breaker]") > text.index('request_timeout = "1s"')
    assert "failures = 3" in text


# -- HTTP response reader -----------------------------------------------------------------
async def read(data: bytes) -> tuple[int, bytes, bool]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return await read_response(reader)


async def test_read_response_content_length() -> None:
    assert await read(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiXX") == (200, b"hi", True)


async def test_read_response_chunked_and_interim() -> None:
    data = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Unavailable\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n")
    assert await read(data) == (503, b"abc", True)


async def test_read_response_close_and_until_eof() -> None:
    assert await read(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n") \
        == (200, b"", False)
    assert await read(b"HTTP/1.0 200 OK\r\n\r\nbody") == (200, b"body", False)


async def test_read_response_eof_before_any_byte() -> None:
    with pytest.raises(asyncio.IncompleteReadError) as info:
        await read(b"")
    assert classify(info.value) == "eof"


# -- SRV codec (dns-vs-proxy) ---------------------------------------------------------------
def test_srv_query_is_what_dnspython_parses() -> None:
    msg = dns.message.from_wire(build_query(0x1234, "web.service.consul"))
    assert msg.id == 0x1234
    assert msg.question[0].to_text() == "web.service.consul. IN SRV"


def test_parse_srv_response_with_compression_and_additional() -> None:
    query = dns.message.make_query("web.service.consul", "SRV")
    resp = dns.message.make_response(query)
    resp.answer.append(dns.rrset.from_text(
        "web.service.consul.", 0, "IN", "SRV", "1 1 8080 7f000001.addr.dc1.consul.",
        "1 1 8081 node-b.node.dc1.consul."))
    resp.additional.append(dns.rrset.from_text("7f000001.addr.dc1.consul.", 0, "IN", "A",
                                               "127.0.0.1"))
    resp.additional.append(dns.rrset.from_text("node-b.node.dc1.consul.", 0, "IN", "TXT",
                                               '"meta"'))
    qid, rcode, records = parse_srv_response(resp.to_wire())
    assert (qid, rcode) == (query.id, 0)
    assert sorted(records) == [
        SrvRecord(1, 1, 8080, "7f000001.addr.dc1.consul", "127.0.0.1"),
        SrvRecord(1, 1, 8081, "node-b.node.dc1.consul", None),
    ]


def test_choose_prefers_lowest_priority() -> None:
    import random

    recs = [SrvRecord(2, 1, 1, "a", None), SrvRecord(1, 0, 2, "b", None),
            SrvRecord(1, 0, 3, "c", None)]
    picked = {choose(recs, random.Random(i)).port for i in range(50)}
    assert picked == {2, 3}
