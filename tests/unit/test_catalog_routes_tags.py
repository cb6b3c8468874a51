"""Reading Consul tags into routes, and the watch's handling of one answer, without I/O
(proxy.discovery.catalog_routes)."""

from __future__ import annotations

import logging

import pytest
from support.fakes import FakeClock

from proxy.config import ConsulConfig
from proxy.discovery.catalog_routes import (
    OPTIONS_NOTE,
    CatalogRoutesWatch,
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
    for bad in ([], {"web": "urlprefix-/"}, None):
        with pytest.raises(DecodeError):
            decode_services(bad)
    # A tag that is not a string is found when the service's tags are read.
    with pytest.raises(DecodeError, match="not a string"):
        scan_tags(decode_services({"web": ["urlprefix-/", 1]}), PREFIX)


# -- the watch's handling of one answer (no I/O: handle_answer is fed decoded answers) ----
class Given:
    def __init__(self, fail_first: bool = False) -> None:
        self.maps: list[dict[str, tuple[TagRoute, ...]]] = []
        self.fail_first = fail_first

    def __call__(self, routes: dict[str, tuple[TagRoute, ...]]) -> None:
        self.maps.append(routes)
        if self.fail_first and len(self.maps) == 1:
            raise RuntimeError("route table bug")


def new_watch(given: Given) -> CatalogRoutesWatch:
    return CatalogRoutesWatch(ConsulConfig(), PREFIX, given, clock=FakeClock())


def test_watch_gives_the_first_map_even_empty_then_only_changes() -> None:
    given = Given()
    watch = new_watch(given)
    watch.handle_answer({"consul": []}, "5")
    assert given.maps == [{}]
    # Wake-ups that change no route: an untagged service comes, its tags change, it goes.
    for answer in ({"consul": [], "db": []}, {"consul": [], "db": ["v2"]}, {"consul": []}):
        watch.handle_answer(answer, "6")
    assert given.maps == [{}]
    watch.handle_answer({"consul": [], "web": ["urlprefix-/web"]}, "7")
    watch.handle_answer({"consul": [], "web": ["v1", "urlprefix-/web"]}, "8")  # same route
    watch.handle_answer({"consul": [], "web": ["urlprefix-/w2"]}, "9")
    watch.handle_answer({"consul": [], "web": []}, "10")  # tag removed
    watch.handle_answer({"consul": [], "web": ["urlprefix-/web"]}, "11")
    watch.handle_answer({"consul": []}, "12")  # deregistered
    assert given.maps == [{}, {"web": (TagRoute("web", None, "/web"),)},
                          {"web": (TagRoute("web", None, "/w2"),)}, {},
                          {"web": (TagRoute("web", None, "/web"),)}, {}]
    assert watch.routes == {} and watch.last_index == 12


def test_watch_index_rules() -> None:
    watch = new_watch(Given())
    watch.handle_answer({}, "100")
    assert watch.index == 100
    watch.handle_answer({}, "40")  # went backwards: read afresh
    assert (watch.index, watch.last_index) == (0, 40)
    watch.handle_answer({}, None)
    assert watch.index == 0


def test_watch_logs_a_malformed_tag_once_while_it_stays(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sdproxy.discovery.catalog_routes")
    watch = new_watch(Given())
    bad = {"odd": ["urlprefix-nohost", "urlprefix-/x strip=/x"]}
    watch.handle_answer(bad, "1")
    watch.handle_answer({**bad, "db": []}, "2")
    watch.handle_answer({"odd": [*bad["odd"], "v2"]}, "3")  # its tags changed, still there
    watch.handle_answer({}, "4")
    watch.handle_answer(bad, "5")  # gone and back: logged again
    malformed = [r.getMessage() for r in caplog.records if "tag_route_malformed" in r.message]
    ignored = [r.getMessage() for r in caplog.records
               if "tag_route_options_ignored" in r.message]
    line = ('event=tag_route_malformed service="odd" tag="urlprefix-nohost" reason="no \'/\' '
            'in the route: it is [host]/path (TCP routes such as :3306 are not supported)"')
    assert malformed == [line, line]
    assert len(ignored) == 2 and '"urlprefix-/x strip=/x"' in ignored[0]
    changes = [r.getMessage() for r in caplog.records if "event=tag_routes " in r.message]
    assert changes[0] == ("event=tag_routes index=1 services=1 routes=1 added=odd removed=- "
                          "changed=-")


def test_watch_gives_the_map_again_after_on_change_raised() -> None:
    given = Given(fail_first=True)
    watch = new_watch(given)
    answer = {"web": ["urlprefix-/web"]}
    with pytest.raises(RuntimeError):
        watch.handle_answer(answer, "1")
    assert watch.routes is None
    watch.handle_answer(answer, "2")  # unchanged, but not yet taken
    assert given.maps == [{"web": (TagRoute("web", None, "/web"),)}] * 2
    assert watch.routes == given.maps[-1]
    watch.handle_answer(answer, "3")
    assert len(given.maps) == 2


def test_watch_reads_only_changed_services() -> None:
    # An unchanged tag list is not read again: a bad tag already read is not raised twice,
    # and the map of 500 services is rebuilt from what was read before.
    watch = new_watch(Given())
    services = {f"s{i}": [f"urlprefix-/s{i}"] for i in range(500)}
    watch.handle_answer(services, "1")
    first = watch.routes
    assert first is not None and len(first) == 500
    watch.handle_answer({**services, "s7": ["urlprefix-/seven"]}, "2")
    assert watch.routes is not None
    assert watch.routes["s7"] == (TagRoute("s7", None, "/seven"),)
    assert watch.routes["s8"] is first["s8"]
