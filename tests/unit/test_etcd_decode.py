"""etcd_decode: Registrator's keys and the v3 gateway's JSON -> endpoints, without sockets.

The JSON documents are what etcd 3.4's gateway answered to the requests the watcher sends
(copied from a real server, base64 keys and values, int64 fields as strings).
"""

from __future__ import annotations

import base64
import json

import pytest

from proxy.discovery.etcd_decode import (
    DELETE,
    PUT,
    Decoded,
    EtcdAnswerError,
    EtcdDecodeError,
    Event,
    KeyValue,
    RangeAnswer,
    apply_events,
    decode_entries,
    decode_entry,
    decode_range,
    decode_watch_line,
    probe_request,
    range_end,
    range_request,
    service_prefix,
    watch_request,
)
from proxy.model import Endpoint

HEADER = {"cluster_id": "15118495548433857066", "member_id": "13668033151171901709",
          "revision": "7", "raft_term": "2"}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def kv(key: str, value: str) -> dict[str, str]:
    return {"key": b64(key), "create_revision": "2", "mod_revision": "2", "version": "1",
            "value": b64(value)}


# -- keys and request bodies ---------------------------------------------------------------
@pytest.mark.parametrize(("prefix", "service", "expected"), [
    ("", "web", b"/web/"),
    ("/services", "web", b"/services/web/"),
    ("services", "web", b"services/web/"),
])
def test_service_prefix(prefix: str, service: str, expected: bytes) -> None:
    assert service_prefix(prefix, service) == expected


@pytest.mark.parametrize(("start", "end"), [
    (b"/web/", b"/web0"),
    (b"a\xff", b"b"),
    (b"a\xff\xff", b"b"),
    (b"\xff\xff", b"\0"),  # every key from start on
])
def test_range_end_covers_exactly_the_prefix(start: bytes, end: bytes) -> None:
    assert range_end(start) == end


def test_requests_ask_for_every_key_under_the_service() -> None:
    assert range_request(b"/web/") == {"key": b64("/web/"), "range_end": b64("/web0")}
    assert probe_request(b"/web/") == {"key": b64("/web/"), "range_end": b64("/web0"),
                                       "count_only": True}
    assert watch_request(b"/web/", 8) == {"create_request": {
        "key": b64("/web/"), "range_end": b64("/web0"), "start_revision": "8"}}


# -- one key -> one endpoint -----------------------------------------------------------------
@pytest.mark.parametrize(("key", "value", "expected"), [
    (b"/web/host1:web:80", b"10.0.0.1:8080", Endpoint("host1:web:80", "10.0.0.1", 8080)),
    (b"/web/a", b" 10.0.0.1:80\n", Endpoint("a", "10.0.0.1", 80)),  # as a shell writes it
    (b"/web/v6", b"[fd00::1]:80", Endpoint("v6", "fd00::1", 80)),
    (b"/web/named", b"backend.internal:80", Endpoint("named", "backend.internal", 80)),
])
def test_registrator_key_and_value(key: bytes, value: bytes, expected: Endpoint) -> None:
    assert decode_entry(key, value, b"/web/") == expected


@pytest.mark.parametrize(("key", "value", "reason"), [
    (b"/web/", b"10.0.0.1:80", "no id after the service name"),
    (b"/web/a/b", b"10.0.0.1:80", "a deeper key"),
    (b"/web/\xff", b"10.0.0.1:80", "the id is not UTF-8"),
    (b"/web/a", b"10.0.0.1", "not ip:port"),
    (b"/web/a", b"10.0.0.1:0", "port must be 1..65535"),
    (b"/web/a", b"fd00::1:80", "need brackets"),
    (b"/web/a", b'{"host": "10.0.0.1"}', "not ip:port"),
    (b"/web/a", b"\xff", "the value is not UTF-8"),
    (b"/web/a", b"", "not ip:port"),
])
def test_a_broken_key_says_why(key: bytes, value: bytes, reason: str) -> None:
    found = decode_entry(key, value, b"/web/")
    assert isinstance(found, str) and reason in found


def test_entries_sorted_by_id_with_broken_ones_left_out() -> None:
    entries = {b"/web/b": b"10.0.0.2:80", b"/web/a": b"10.0.0.1:80",
               b"/web/bad": b"nope", b"/other/c": b"10.0.0.3:80"}
    decoded = decode_entries(entries, b"/web/")
    assert decoded.endpoints == (Endpoint("a", "10.0.0.1", 80), Endpoint("b", "10.0.0.2", 80))
    assert [key for key, _ in decoded.rejected] == ["/web/bad"]
    # Same keys in another order: the same answer (equal tuples, no spurious change).
    assert decode_entries(dict(reversed(list(entries.items()))), b"/web/") == decoded


def test_no_keys_is_an_empty_answer() -> None:
    assert decode_entries({}, b"/web/") == Decoded(())


def test_events_apply_in_order() -> None:
    entries = {b"/web/a": b"10.0.0.1:80"}
    events = (Event(PUT, b"/web/b", b"10.0.0.2:80"), Event(DELETE, b"/web/a", b""),
              Event(PUT, b"/web/b", b"10.0.0.3:80"), Event(DELETE, b"/web/gone", b""))
    assert apply_events(entries, events) == {b"/web/b": b"10.0.0.3:80"}
    assert entries == {b"/web/a": b"10.0.0.1:80"}  # the input is not changed


# -- gateway answers ---------------------------------------------------------------------------
def test_range_answer() -> None:
    doc = {"header": HEADER, "kvs": [kv("/web/a", "127.0.0.1:80")], "count": "1"}
    assert decode_range(doc) == RangeAnswer(7, (KeyValue(b"/web/a", b"127.0.0.1:80"),))


def test_range_answer_without_keys_has_no_kvs_field() -> None:
    assert decode_range({"header": HEADER}) == RangeAnswer(7, ())


@pytest.mark.parametrize(("doc", "message"), [
    ([], "expected a JSON object"),
    ({"header": {"revision": "x"}}, "range.header.revision: expected an integer"),
    ({"header": HEADER, "kvs": {}}, "range.kvs: expected an array"),
    ({"header": HEADER, "kvs": [{"key": "!!"}]}, "not base64"),
    ({"header": HEADER, "kvs": [{"key": 3}]}, "expected base64 text"),
])
def test_bad_range_answer(doc: object, message: str) -> None:
    with pytest.raises(EtcdDecodeError, match=message):
        decode_range(doc)


def test_gateway_error_is_etcds_own_message() -> None:
    doc = {"error": "etcdserver: mvcc: required revision has been compacted",
           "message": "etcdserver: mvcc: required revision has been compacted", "code": 11}
    with pytest.raises(EtcdAnswerError, match="required revision has been compacted") as info:
        decode_range(doc)
    assert info.value.code == 11


def line(result: dict[str, object]) -> bytes:
    return json.dumps({"result": result}).encode()


def test_watch_created() -> None:
    message = decode_watch_line(line({"header": HEADER, "created": True}))
    assert (message.created, message.canceled, message.revision, message.events) == (
        True, False, 7, ())


def test_watch_events_put_omits_its_type_delete_names_it() -> None:
    message = decode_watch_line(line({"header": HEADER, "events": [
        {"kv": kv("/web/b", "127.0.0.1:81")},
        {"type": "DELETE", "kv": {"key": b64("/web/a"), "mod_revision": "7"}}]}))
    assert message.events == (Event(PUT, b"/web/b", b"127.0.0.1:81"),
                              Event(DELETE, b"/web/a", b""))


def test_watch_canceled_by_compaction() -> None:
    # What etcd 3.4 sends for a start revision below the compacted one: no header revision.
    raw = (b'{"result":{"header":{"cluster_id":"1","member_id":"2","raft_term":"2"},'
           b'"canceled":true,"compact_revision":"4"}}')
    message = decode_watch_line(raw)
    assert (message.canceled, message.compact_revision, message.revision) == (True, 4, 0)


def test_watch_stream_error() -> None:
    raw = json.dumps({"error": {"grpc_code": 14, "http_code": 503,
                                "message": "etcdserver: no leader",
                                "http_status": "Service Unavailable"}}).encode()
    with pytest.raises(EtcdAnswerError, match="no leader") as info:
        decode_watch_line(raw)
    assert info.value.code == 14


@pytest.mark.parametrize(("raw", "message"), [
    (b"{", "invalid JSON"),
    (b'{"result": []}', "watch.result: expected a JSON object"),
    (b'{"result": {"events": [{"type": "EXPIRE"}]}}', "unknown"),
    (b'{"result": {"events": {}}}', "expected an array"),
])
def test_bad_watch_line(raw: bytes, message: str) -> None:
    with pytest.raises(EtcdDecodeError, match=message):
        decode_watch_line(raw)
