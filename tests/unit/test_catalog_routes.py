"""Reading Consul tags into routes (proxy.discovery.catalog_routes, the pure part)."""

from __future__ import annotations

import pytest

from proxy.discovery.catalog_routes import (
    OPTIONS_NOTE,
    TagNote,
    TagRoute,
    decode_services,
    routes_from_tags,
    scan_tags,
)
from proxy.discovery.consul_decode import DecodeError

PREFIX = "urlprefix-"


def one_route(tag: str, prefix: str = PREFIX) -> TagRoute | None:
    routes = routes_from_tags({"svc": [tag]}, prefix).get("svc", ())
    assert len(routes) <= 1
    return routes[0] if routes else None


@pytest.mark.parametrize(("tag", "host", "path"), [
    ("urlprefix-/api", None, "/api"),
    ("urlprefix-/", None, "/"),
    ("urlprefix-/api/v1/", None, "/api/v1/"),
    ("urlprefix-api.example/v1", "api.example", "/v1"),
    ("urlprefix-api.example/", "api.example", "/"),
    ("urlprefix-API.Example/V1", "api.example", "/V1"),  # host ignores case, path does not
    ("urlprefix-api.example:8080/v1", "api.example", "/v1"),  # routing ignores a :port
    ("urlprefix-*.example/", "*.example", "/"),
    ("urlprefix-my_svc.service.consul/x", "my_svc.service.consul", "/x"),
    ("urlprefix-127.0.0.1/x", "127.0.0.1", "/x"),
    ("urlprefix-[::1]:8080/x", "[::1]", "/x"),
    ("urlprefix-/a%20b", None, "/a%20b"),  # kept as written: paths match encoded
    ("urlprefix-/x strip=/x", None, "/x"),  # options ignored: tag routes never strip
    ("urlprefix-/x proto=https tlsskipverify=true", None, "/x"),
    ("urlprefix-/x\tstrip=/x", None, "/x"),  # any blank ends the route
])
def test_route_tags(tag: str, host: str | None, path: str) -> None:
    assert one_route(tag) == TagRoute("svc", host, path)


@pytest.mark.parametrize(("tag", "reason"), [
    ("urlprefix-", "empty route"),
    ("urlprefix- /x", "empty route"),
    ("urlprefix-api.example", "no '/'"),
    ("urlprefix-:3306 proto=tcp", "no '/'"),  # Fabio's TCP route
    ("urlprefix-api..example/", "invalid host"),
    ("urlprefix-api.example./", "invalid host"),
    ("urlprefix--api.example/", "invalid host"),
    ("urlprefix-api.*.example/", "invalid host"),
    ("urlprefix-*/", "invalid host"),
    ("urlprefix-a@b/", "invalid host"),
    ("urlprefix-api.example:http/", "invalid port"),
    ("urlprefix-api.example:/", "invalid port"),
    ("urlprefix-api.example:123456/", "invalid port"),
    ("urlprefix-[::1/x", "invalid host"),
    ("urlprefix-[::1]x/x", "invalid host"),
    ("urlprefix-/x?y=1", "the path has"),
    ("urlprefix-/x#top", "the path has"),
    ("urlprefix-/x\\y", "the path has"),
    ("urlprefix-/x\x00", "the path has"),
    ("urlprefix-" + "a" * 254 + "/", "invalid host"),
])
def test_malformed_tags_give_no_route_and_a_reason(tag: str, reason: str) -> None:
    scan = scan_tags({"svc": [tag]}, PREFIX)
    assert scan.routes == {}
    (note,) = scan.notes
    assert (note.service, note.tag, note.malformed) == ("svc", tag, True)
    assert note.reason.startswith(reason), note.reason


def test_options_are_noted_but_the_route_stands() -> None:
    scan = scan_tags({"svc": ["urlprefix-/x strip=/x"]}, PREFIX)
    assert scan.routes == {"svc": (TagRoute("svc", None, "/x"),)}
    assert scan.notes == (TagNote("svc", "urlprefix-/x strip=/x", OPTIONS_NOTE, False),)


def test_services_without_a_route_tag_are_absent() -> None:
    tags = {"consul": [], "db": ["primary", "v2"], "web": ["urlprefix-/web", "blue"],
            "odd": ["urlprefix-nohost"]}
    assert routes_from_tags(tags, PREFIX) == {"web": (TagRoute("web", None, "/web"),)}


def test_prefix_is_case_sensitive_and_configurable() -> None:
    assert one_route("URLPREFIX-/x") is None
    assert one_route("urlprefix-/x", prefix="route=") is None
    assert one_route("route=/x", prefix="route=") == TagRoute("svc", None, "/x")
    assert one_route("route=api.example/", prefix="route=") == TagRoute("svc", "api.example",
                                                                        "/")


def test_several_routes_per_service_deduplicated_in_a_stable_order() -> None:
    tags = ["urlprefix-/b", "urlprefix-b.example/", "urlprefix-/a", "urlprefix-/a strip=/a",
            "urlprefix-A.example/", "urlprefix-a.example:80/"]
    expected = (TagRoute("svc", "a.example", "/"), TagRoute("svc", "b.example", "/"),
                TagRoute("svc", None, "/a"), TagRoute("svc", None, "/b"))
    assert routes_from_tags({"svc": tags}, PREFIX) == {"svc": expected}
    # The catalog may list the same tags in another order: the map is the same.
    assert routes_from_tags({"svc": list(reversed(tags))}, PREFIX) == {"svc": expected}


def test_two_services_may_declare_the_same_route() -> None:
    # Not this module's call: the route table decides what two claims to one route mean.
    routes = routes_from_tags({"a": ["urlprefix-/x"], "b": ["urlprefix-/x"]}, PREFIX)
    assert routes == {"a": (TagRoute("a", None, "/x"),), "b": (TagRoute("b", None, "/x"),)}


def test_a_malformed_tag_does_not_hide_the_good_ones() -> None:
    scan = scan_tags({"svc": ["urlprefix-bad", "urlprefix-/good"]}, PREFIX)
    assert scan.routes == {"svc": (TagRoute("svc", None, "/good"),)}
    assert [n.tag for n in scan.notes] == ["urlprefix-bad"]


def test_decode_services() -> None:
    assert decode_services({"consul": [], "web": ["a", "b"], "old": None}) == {
        "consul": [], "web": ["a", "b"], "old": []}
    for bad in ([], {"web": "urlprefix-/"}, {"web": [1]}, None):
        with pytest.raises(DecodeError):
            decode_services(bad)
