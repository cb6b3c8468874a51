"""decode() on answers recorded from a real Consul (tests/fixtures/consul/record.py), plus
the datacenter failover choice (select_datacenter) and the blocking-query rules:
next_index, backoff_delay, TokenBucket. No I/O, no loop."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest

from proxy.discovery.consul_decode import (
    DecodeError,
    TokenBucket,
    aggregate_status,
    backoff_delay,
    decode,
    decode_answer,
    next_index,
    parse_index,
    select_datacenter,
)
from proxy.model import Endpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "consul"


def answer(name: str) -> Any:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def ids(name: str, tags: tuple[str, ...] = (), include_warning: bool = False) -> list[str]:
    return [e.id for e in decode(answer(name), tags=tags, include_warning=include_warning,
                                 datacenter="dc9")]


# -- which instances are usable -----------------------------------------------------------
@pytest.mark.parametrize("fixture, tags, include_warning, expected", [
    ("passing", (), False, ["passing-1"]),
    ("critical", (), False, []),
    ("critical", (), True, []),
    ("warning", (), False, []),
    ("warning", (), True, ["warning-1"]),
    ("twochecks", (), False, []),  # one critical check out of two excludes
    ("twochecks", (), True, []),
    ("nochecks", (), False, ["nochecks-1"]),  # only the node's serfHealth: passing
    ("maintenance", (), True, []),  # maintenance is a critical check
    ("nodeaddr", (), False, ["nodeaddr-1"]),
    ("meta", (), False, ["meta-1"]),
    ("unknown", (), True, []),
    ("tagged", (), False, ["tagged-1", "tagged-2", "tagged-3"]),
    ("tagged", ("v2",), False, ["tagged-1", "tagged-2"]),
    ("tagged", ("primary", "v2"), False, ["tagged-1"]),
    ("tagged", ("PRIMARY",), False, ["tagged-1"]),  # case-insensitive, as Consul's ?tag=
    ("tagged", ("primary", "v3"), False, []),
    ("weighted", (), False, ["weighted-1"]),
    ("weighted", (), True, ["weighted-1", "weighted-2"]),  # weighted-0: Warning weight 0
    ("mixed", (), False, ["mixed-node", "mixed-pass"]),
    ("mixed", (), True, ["mixed-node", "mixed-pass", "mixed-two", "mixed-warn"]),
    ("mixed", ("blue",), True, ["mixed-node", "mixed-pass", "mixed-warn"]),
    ("mixed", ("blue", "canary"), True, ["mixed-node"]),
])
def test_usable_instances(fixture: str, tags: tuple[str, ...], include_warning: bool,
                          expected: list[str]) -> None:
    assert ids(fixture, tags, include_warning) == expected


# -- what an endpoint says ----------------------------------------------------------------
@pytest.mark.parametrize("fixture, include_warning, sid, fields", [
    ("passing", False, "passing-1",
     {"address": "192.0.2.1", "port": 9001, "node": "sdproxy-dev", "datacenter": "dc1",
      "tags": (), "weight": 1, "status": "passing", "meta": ()}),
    ("nodeaddr", False, "nodeaddr-1", {"address": "127.0.0.1", "port": 9005}),
    ("warning", True, "warning-1", {"status": "warning", "weight": 1}),
    ("weighted", True, "weighted-1", {"status": "passing", "weight": 5}),
    ("weighted", True, "weighted-2", {"status": "warning", "weight": 1}),
    ("tagged", False, "tagged-1", {"tags": ("primary", "v2")}),
    ("meta", False, "meta-1", {"meta": (("version", "1.2.3"), ("zone", "a"))}),
    ("mixed", True, "mixed-warn", {"weight": 2, "status": "warning", "tags": ("blue",)}),
    ("mixed", True, "mixed-node", {"address": "127.0.0.1", "meta": (("owner", "team-a"),)}),
])
def test_endpoint_fields(fixture: str, include_warning: bool, sid: str,
                         fields: dict[str, Any]) -> None:
    found = {e.id: e for e in decode(answer(fixture), tags=(),
                                     include_warning=include_warning, datacenter="dc9")}
    endpoint = found[sid]
    assert isinstance(endpoint, Endpoint)
    for name, value in fields.items():
        assert getattr(endpoint, name) == value, name


def test_order_does_not_matter() -> None:
    entries = answer("mixed")
    forward = decode(entries, tags=(), include_warning=True, datacenter="dc1")
    backward = decode(list(reversed(entries)), tags=(), include_warning=True, datacenter="dc1")
    assert forward == backward
    assert [e.id for e in forward] == sorted(e.id for e in forward)


# -- edges real Consul 1.8 does not produce on a dev agent (edited recordings) ---------------
def edited(name: str, **service: Any) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = copy.deepcopy(answer(name))
    for key, value in service.items():
        if value is DELETE:
            del entries[0]["Service"][key]
        else:
            entries[0]["Service"][key] = value
    return entries


DELETE = object()


@pytest.mark.parametrize("service, expected_weight", [
    ({"Weights": DELETE}, 1),  # older Consul / catalog registrations: no Weights
    ({"Weights": None}, 1),
    ({"Weights": {"Passing": 7}}, 7),
    ({"Weights": {"Warning": 3}}, 1),
    ({"Weights": {"Passing": 0, "Warning": 1}}, None),  # 0 = do not route
    ({"Port": 0}, None),  # registered without a port: nothing to connect to
])
def test_weights_and_ports(service: dict[str, Any], expected_weight: int | None) -> None:
    got = decode(edited("passing", **service), tags=(), include_warning=False,
                 datacenter="dc1")
    assert [e.weight for e in got] == ([] if expected_weight is None else [expected_weight])


def test_null_meta_and_tags() -> None:
    (e,) = decode(edited("passing", Meta=None, Tags=None), tags=(), include_warning=False,
                  datacenter="dc1")
    assert (e.meta, e.tags) == ((), ())


def test_datacenter_falls_back_to_the_one_asked() -> None:
    entries = answer("passing")
    del entries[0]["Node"]["Datacenter"]
    (e,) = decode(entries, tags=(), include_warning=False, datacenter="dc7")
    assert e.datacenter == "dc7"


def test_unknown_check_status_counts_as_critical() -> None:
    entries = answer("passing")
    entries[0]["Checks"][-1]["Status"] = "bogus"
    assert decode(entries, tags=(), include_warning=True, datacenter="dc1") == ()


def test_same_service_id_on_two_nodes_gets_distinct_ids() -> None:
    entries = answer("passing")
    other = copy.deepcopy(entries[0])
    other["Node"]["Node"] = "node-b"
    other["Checks"][-1]["Status"] = "critical"  # counted even when not usable
    got = decode(entries + [other], tags=(), include_warning=False, datacenter="dc1")
    assert [e.id for e in got] == ["passing-1@sdproxy-dev"]


@pytest.mark.parametrize("mutate", [
    lambda a: {"not": "a list"},
    lambda a: ["not an object"],
    lambda a: [{k: v for k, v in a[0].items() if k != "Service"}],
    lambda a: [{**a[0], "Service": {**a[0]["Service"], "Port": "9001"}}],
    lambda a: [{**a[0], "Service": {**a[0]["Service"], "Port": True}}],
    lambda a: [{**a[0], "Service": {**a[0]["Service"], "ID": None}}],
    lambda a: [{**a[0], "Service": {**a[0]["Service"], "Tags": "v2"}}],
    lambda a: [{**a[0], "Service": {**a[0]["Service"], "Weights": {"Passing": "5"}}}],
    lambda a: [{**a[0], "Checks": "passing"}],
    lambda a: [{**a[0], "Service": {**a[0]["Service"], "Address": ""},
                "Node": {**a[0]["Node"], "Address": ""}}],
], ids=["not-list", "entry-not-object", "no-service", "port-string", "port-bool", "id-null",
        "tags-string", "weight-string", "checks-string", "no-address"])
def test_broken_answers_raise(mutate: Any) -> None:
    with pytest.raises(DecodeError):
        decode(mutate(answer("passing")), tags=(), include_warning=False, datacenter="dc1")


@pytest.mark.parametrize("statuses, expected", [
    ([], "passing"),
    (["passing", "passing"], "passing"),
    (["passing", "warning"], "warning"),
    (["warning", "critical"], "critical"),
    (["maintenance"], "critical"),
    (["passing", "unknown-status"], "critical"),
])
def test_aggregate_status(statuses: list[str], expected: str) -> None:
    assert aggregate_status([{"Status": s} for s in statuses]) == expected


# -- datacenter failover ------------------------------------------------------------------
def eps(dc: str, *names: str) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(id=f"{dc}-{n}", address="127.0.0.1", port=9000 + i, datacenter=dc)
                 for i, n in enumerate(names))


DC1, DC2, DC3 = eps("dc1", "a", "b"), eps("dc2", "a"), eps("dc3", "a")
ORDER = ("dc1", "dc2", "dc3")


@pytest.mark.parametrize("answers, unreachable, expected", [
    # the first datacenter with an instance wins, whatever the others say
    ({"dc1": DC1, "dc2": DC2, "dc3": DC3}, (), ("dc1", DC1)),
    ({"dc1": DC1}, (), ("dc1", DC1)),  # later ones need not have answered
    ({"dc1": DC1}, ("dc2",), ("dc1", DC1)),
    # the next only when none is left
    ({"dc1": (), "dc2": DC2, "dc3": DC3}, (), ("dc2", DC2)),
    ({"dc1": (), "dc2": (), "dc3": DC3}, (), ("dc3", DC3)),
    ({"dc1": (), "dc2": (), "dc3": ()}, (), ("", ())),
    # not heard from yet: no decision rather than a premature failover
    ({}, (), None),
    ({"dc2": DC2}, (), None),
    ({"dc1": (), "dc3": DC3}, (), None),
    ({"dc1": ()}, (), None),
    # failed before it ever answered: passed over like an empty one
    ({"dc2": DC2}, ("dc1",), ("dc2", DC2)),
    ({"dc1": (), "dc3": DC3}, ("dc2",), ("dc3", DC3)),
    ({"dc3": ()}, ("dc1", "dc2"), ("", ())),
    # ... but nothing answered at all stays undecided (/ready must not say ready)
    ({}, ("dc1", "dc2", "dc3"), None),
    # answers of datacenters outside the order never count
    ({"dc9": eps("dc9", "x")}, ("dc1", "dc2", "dc3"), None),
], ids=["first-wins", "first-alone", "first-next-unreachable", "second", "third", "all-empty",
        "nothing", "first-pending", "second-pending", "rest-pending", "skip-unreachable",
        "skip-unreachable-middle", "empty-and-unreachable", "all-unreachable", "foreign"])
def test_select_datacenter(answers: dict[str, tuple[Endpoint, ...]],
                           unreachable: tuple[str, ...],
                           expected: tuple[str, tuple[Endpoint, ...]] | None) -> None:
    assert select_datacenter(ORDER, answers, unreachable) == expected


def test_select_datacenter_follows_recovery() -> None:
    """dc1 empties -> dc2; dc1 back -> dc1 again (the order is the preference)."""
    answers = {"dc1": DC1, "dc2": DC2}
    assert select_datacenter(ORDER[:2], answers) == ("dc1", DC1)
    answers["dc1"] = ()
    assert select_datacenter(ORDER[:2], answers) == ("dc2", DC2)
    answers["dc1"] = DC1[:1]
    assert select_datacenter(ORDER[:2], answers) == ("dc1", DC1[:1])


# -- blocking-query index rules -----------------------------------------------------------
@pytest.mark.parametrize("previous, header, expected", [
    (0, "42", 42),        # first answer
    (42, "42", 42),       # wait expired, nothing changed
    (42, "57", 57),       # changed
    (42, "41", 0),        # went backwards: reset, read afresh
    (0, "0", 1),          # Consul bug: never block on 0 (would answer at once forever)
    (0, "-3", 1),
    (42, "0", 1),         # bogus 0 is not "backwards": the answer is in hand, block on 1
    (1, "0", 1),          # ... and stays blocking while Consul keeps saying 0
    (42, None, 0),        # no header: start over
    (42, "", 0),
    (42, "abc", 0),
    (42, " 43 ", 43),
])
def test_next_index(previous: int, header: str | None, expected: int) -> None:
    assert next_index(previous, header) == expected


@pytest.mark.parametrize("header, expected", [("7", 7), (None, None), ("x", None)])
def test_parse_index(header: str | None, expected: int | None) -> None:
    assert parse_index(header) == expected


# -- pacing -------------------------------------------------------------------------------
class MaxRandom(random.Random):
    """uniform() returns the upper bound, so the ceiling of the backoff is observable."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.mark.parametrize("attempt, ceiling", [
    (0, 0.1), (1, 0.2), (2, 0.4), (5, 3.2), (6, 5.0), (60, 5.0), (10_000, 5.0)])
def test_backoff_ceiling_doubles_to_the_cap(attempt: int, ceiling: float) -> None:
    assert backoff_delay(attempt, MaxRandom(), base=0.1, cap=5.0) == pytest.approx(ceiling)


def test_backoff_is_full_jitter() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(6, rng, base=0.1, cap=5.0) for _ in range(500)]
    assert all(0.0 <= d <= 5.0 for d in delays)
    assert min(delays) < 0.5 and max(delays) > 4.5  # spread over the whole range


def test_token_bucket_allows_a_burst_then_paces() -> None:
    bucket = TokenBucket(burst=3, interval=1.0)
    t = 100.0
    assert [bucket.take(t) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(t) == pytest.approx(1.0)
    t += 1.0  # the caller waited as told
    assert bucket.take(t) == pytest.approx(1.0)  # still one request per interval
    t += 1.0
    t += 60.0  # a full blocking wait later the burst is back, but no more than it
    assert [bucket.take(t) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(t) > 0


# -- instances listed but not passing (SPEC "Instance state and reason") ------------------
def down(name: str, tags: tuple[str, ...] = (), include_warning: bool = False
         ) -> list[tuple[str, str, str]]:
    _, listed = decode_answer(answer(name), tags=tags, include_warning=include_warning,
                              datacenter="dc9")
    return [(d.endpoint.id, d.endpoint.status, d.reason) for d in listed]


@pytest.mark.parametrize("fixture, include_warning, expected", [
    ("passing", False, []),
    ("critical", False, [("critical-1", "critical", "critical-1-ttl: critical")]),
    # Maintenance mode: its reason is in Notes.
    ("maintenance", False, [("maintenance-1", "critical", "recording")]),
    ("twochecks", True, [("twochecks-1", "critical", "twochecks-1-b: critical")]),
    ("warning", False, [("warning-1", "warning", "warning-1-ttl: warning")]),
    ("warning", True, []),
])
def test_not_passing_instances_come_apart_with_their_reason(
        fixture: str, include_warning: bool, expected: list[tuple[str, str, str]]) -> None:
    assert down(fixture, include_warning=include_warning) == expected


def test_down_reason_is_the_worst_checks_output_cut_to_200() -> None:
    entries = answer("critical")
    entries[0]["Checks"][1]["Output"] = "  HTTP GET http://x/health: 500 " + "x" * 300 + "\n"
    [(_, _, reason)] = down_of(entries)
    assert reason.startswith("HTTP GET http://x/health: 500 x") and len(reason) == 200


def test_down_instances_follow_the_tag_filter() -> None:
    assert [i for i, *_ in down("mixed", include_warning=True)] == ["mixed-crit"]
    assert down("mixed", tags=("canary",), include_warning=True) == []


def test_a_broken_down_instance_is_left_out_not_the_answer() -> None:
    entries = answer("passing") + answer("critical")
    entries[1]["Service"]["Port"] = "9001"  # not a number: it can only be dropped
    usable, listed = decode_answer(entries, tags=(), include_warning=False, datacenter="dc9")
    assert [e.id for e in usable] == ["passing-1"] and listed == ()


def down_of(entries: Any) -> list[tuple[str, str, str]]:
    _, listed = decode_answer(entries, tags=(), include_warning=False, datacenter="dc9")
    return [(d.endpoint.id, d.endpoint.status, d.reason) for d in listed]
