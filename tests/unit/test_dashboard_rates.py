"""The dashboard's windows (proxy.admin.rates) and its server-rendered page."""

from __future__ import annotations

import re

from proxy.admin import dashboard
from proxy.admin.rates import RateWindows, counters_from_views, counters_of, quantile
from proxy.upstream.manager import LATENCY_BUCKETS


def _latency(**by_bucket: int) -> list[int]:
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    for index, n in by_bucket.items():
        counts[int(index[1:])] = n
    return counts


def test_rate_error_rate_and_percentiles_come_from_the_window_deltas() -> None:
    windows = RateWindows()
    windows.add_sample(0.0, {"web": counters_of({200: 1000}, _latency(b3=1000))})
    # 10 s later: 100 more responses, 10 of them sdproxy's own 502, all in bucket 5
    # (10..25 ms).
    windows.add_sample(10.0, {"web": counters_of({200: 1090, "502": 10},
                                                  _latency(b3=1000, b5=100))})
    w = windows.figures()["web"]["10s"]
    assert w["responses"] == 100 and w["rate"] == 10.0
    assert w["error_rate"] == 0.1
    assert w["classes"] == {"1xx": 0, "2xx": 90, "3xx": 0, "4xx": 0, "5xx": 10}
    assert 10.0 < w["p50_ms"] <= 25.0 and w["p50_ms"] < w["p99_ms"] <= 25.0


def test_the_5_minute_window_starts_at_the_oldest_sample_until_it_is_full() -> None:
    windows = RateWindows()
    for second in range(31):
        windows.add_sample(float(second), {"web": counters_of({200: second * 3}, [])})
    figures = windows.figures()["web"]
    assert figures["10s"]["rate"] == 3.0 and figures["10s"]["seconds"] == 10.0
    assert figures["5m"]["seconds"] == 30.0 and figures["5m"]["responses"] == 90


def test_counters_that_went_down_count_as_nothing_not_a_negative_rate() -> None:
    windows = RateWindows()
    windows.add_sample(0.0, {"web": counters_of({200: 500}, [])})
    windows.add_sample(1.0, {"web": counters_of({200: 3}, [])})  # replaced by a reload
    assert windows.figures()["web"]["10s"]["rate"] == 0.0


def test_no_observations_have_no_percentile_and_inf_reads_as_the_top_bound() -> None:
    assert quantile(0.5, [0] * 5) is None
    assert quantile(0.99, _latency(**{f"b{len(LATENCY_BUCKETS)}": 4})) == LATENCY_BUCKETS[-1]


def test_workers_readings_are_summed_per_upstream() -> None:
    ups = [{"name": "web", "responses": {"200": 2}, "metrics": {"latency_counts": [1, 1]}},
           {"name": "web", "responses": {"503": 1}, "metrics": {"latency_counts": [0, 1]}}]
    summed = counters_from_views(ups)["web"]
    assert summed.by_class == (0, 2, 0, 0, 1) and summed.latency == (1, 2)


def _view(state: str, eid: str) -> dict[str, object]:
    return {"id": eid, "address": "127.0.0.1", "port": 8080, "node": "n1", "state": state,
            "reason": "check critical" if state == "down" else "", "tags": ["<b>"],
            "weight": 1, "active": 0, "requests": 3, "failures": 0, "responses": {"200": 3}}


def test_the_page_is_a_plain_table_with_a_down_row_greyed_and_forms_to_drain() -> None:
    up = {"name": "web/x", "mode": "http", "responses": {"200": 3}, "answered": True,
          "endpoints": [_view("healthy", "a/1"), _view("down", "b"), _view("draining", "c")],
          "rates": {"10s": {"seconds": 10.0, "rate": 7.5, "error_rate": 0.02, "p50_ms": 1.5, "p99_ms": 9.0,
                            "classes": {"2xx": 75}}}}
    page = dashboard.render([up], started_at=None, now=0.0)
    assert re.search(r'<tr class="down"><td data-id="b">.*?>down<', page)
    assert '<form method="post" action="/upstreams/web%2Fx/endpoints/a%2F1/drain">' in page
    assert 'action="/upstreams/web%2Fx/endpoints/c/enable"' in page
    assert 'data-k="10s.rate">7.5/s<' in page and 'data-k="10s.error_rate">2.0%<' in page
    assert "&lt;b&gt;" in page and "<b>" not in page.replace("<body>", "")
