"""ZooKeeper discovery's pure part: Curator instance znodes -> endpoints, as tables.

The instances are written by `proxy.devzk.curator_instance`, the same bytes Curator's
JsonInstanceSerializer writes (and the integration test and the demo register), plus
hand-written variants for what other registrants put there.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.devzk import curator_instance
from proxy.discovery.zookeeper_decode import (
    MAX_INSTANCE_BYTES,
    DecodeError,
    decode,
    decode_instance,
)
from proxy.model import Endpoint


def doc(**fields: Any) -> bytes:
    base: dict[str, Any] = {"name": "web", "id": "x", "address": "10.0.0.1", "port": 8080,
                            "sslPort": None, "payload": None,
                            "registrationTimeUTC": 1700000000000, "serviceType": "DYNAMIC",
                            "uriSpec": None}
    base.update(fields)
    return json.dumps(base).encode()


# -- one instance: what routes ---------------------------------------------------------------
@pytest.mark.parametrize("data, address, port, meta", [
    pytest.param(curator_instance("web", "id-in-json", "10.0.0.1", 8080), "10.0.0.1", 8080,
                 (), id="curator-serializer"),
    pytest.param(doc(address="fd00::1"), "fd00::1", 8080, (), id="ipv6"),
    pytest.param(doc(address="[fd00::1]"), "fd00::1", 8080, (), id="ipv6-bracketed"),
    pytest.param(doc(address="web-1.internal"), "web-1.internal", 8080, (), id="hostname"),
    pytest.param(doc(sslPort=8443), "10.0.0.1", 8080, (("ssl_port", "8443"),),
                 id="ssl-port-kept-as-meta"),
    pytest.param(doc(payload={"any": ["thing"]}, uriSpec={"parts": []}), "10.0.0.1", 8080,
                 (), id="payload-and-uri-spec-ignored"),
    pytest.param(doc(enabled=True), "10.0.0.1", 8080, (), id="enabled-true"),
    pytest.param(json.dumps({"address": "10.0.0.1", "port": 1}).encode(), "10.0.0.1", 1, (),
                 id="only-address-and-port"),
    pytest.param(doc(port=65535), "10.0.0.1", 65535, (), id="highest-port"),
])
def test_instance_routes(data: bytes, address: str, port: int,
                         meta: tuple[tuple[str, str], ...]) -> None:
    assert decode_instance("znode-name", data) == Endpoint(
        id="znode-name", address=address, port=port, meta=meta)


def test_id_is_the_znode_name_not_the_json_id() -> None:
    endpoint = decode_instance("b2f0c9", doc(id="something-else"))
    assert endpoint is not None and endpoint.id == "b2f0c9"


def test_enabled_false_leaves_the_instance_out() -> None:
    assert decode_instance("a", doc(enabled=False)) is None


# -- one instance: what is refused, and why --------------------------------------------------
@pytest.mark.parametrize("data, reason", [
    pytest.param(b"", "empty znode", id="empty"),
    pytest.param(b"10.0.0.1:8080", "invalid JSON", id="not-json"),
    pytest.param(b"\xff\xfe{", "invalid JSON", id="not-utf8"),
    pytest.param(b"[1, 2]", "expected a JSON object, got array", id="array"),
    pytest.param(doc(address=None), "address: expected a non-empty string, got null",
                 id="no-address"),
    pytest.param(doc(address=""), "address: expected a non-empty string, got empty string",
                 id="empty-address"),
    pytest.param(doc(address="10.0.0.1:8080"), "is neither a host name nor an IP",
                 id="address-with-port"),
    pytest.param(doc(address="[web]"), "is neither a host name nor an IP",
                 id="brackets-around-a-name"),
    pytest.param(doc(address="web 1"), "address: invalid host", id="space-in-host"),
    pytest.param(doc(port=None), "no port", id="null-port"),
    pytest.param(doc(port=None, sslPort=8443), "no port, only sslPort 8443",
                 id="only-ssl-port"),
    pytest.param(doc(port="8080"), "port: expected an integer, got string", id="port-string"),
    pytest.param(doc(port=True), "port: expected an integer, got boolean", id="port-bool"),
    pytest.param(doc(port=80.5), "port: expected an integer, got number", id="port-float"),
    pytest.param(doc(port=0), "port: must be 1..65535, got 0", id="port-zero"),
    pytest.param(doc(port=65536), "port: must be 1..65535, got 65536", id="port-too-high"),
    pytest.param(doc(sslPort="x"), "sslPort: expected an integer, got string",
                 id="ssl-port-string"),
    pytest.param(b"{" + b" " * MAX_INSTANCE_BYTES + b"}", "larger than", id="too-large"),
])
def test_instance_refused(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason.replace("[", r"\[").replace("(", r"\(")):
        decode_instance("a", data)


# -- a service's children -------------------------------------------------------------------
def test_children_sorted_by_id_whatever_the_listing_order() -> None:
    children = {"c": doc(port=3), "a": doc(port=1), "b": doc(port=2)}
    decoded = decode(children)
    assert [(e.id, e.port) for e in decoded.endpoints] == [("a", 1), ("b", 2), ("c", 3)]
    assert decoded.skipped == ()
    assert decode(dict(reversed(children.items()))) == decoded


def test_a_broken_znode_is_skipped_and_the_others_route() -> None:
    decoded = decode({"good": doc(), "broken": b"not json", "off": doc(enabled=False)})
    assert [e.id for e in decoded.endpoints] == ["good"]
    assert [name for name, _ in decoded.skipped] == ["broken", "off"]
    reasons = dict(decoded.skipped)
    assert reasons["broken"].startswith("invalid JSON")
    assert reasons["off"] == "disabled (enabled: false)"


def test_no_children_is_an_empty_answer() -> None:
    assert decode({}).endpoints == ()
