"""The route table's rules (SPEC "Routing several upstreams on one listener"), as data."""

from __future__ import annotations

import pytest

from proxy.routing import Route, RouteTable, path_of


def table(*routes: Route) -> RouteTable[str]:
    return RouteTable((r, r.upstream) for r in routes)


def pick(t: RouteTable[str], host: bytes | None, target: bytes) -> str | None:
    found = t.lookup(host, target)
    return None if found is None else found.target


MIXED = table(
    Route("api.example", "/v1/", "api-v1"),
    Route("api.example", "/", "api"),
    Route("*.example", "/", "wild"),
    Route("*.example", "/v1/", "wild-v1"),
    Route("*.a.example", "/", "wild-a"),
    Route("", "/static/", "assets"),
    Route("", "/", "fallback"),
)


@pytest.mark.parametrize(("host", "target", "expected"), [
    # exact host first, the longest prefix within it
    (b"api.example", b"/v1/users", "api-v1"),
    (b"api.example", b"/v2/users", "api"),
    (b"api.example", b"/static/x.css", "api"),  # its own group has a match: "/"
    # case and port ignored, a final dot too
    (b"API.Example:8080", b"/v1/x", "api-v1"),
    (b"api.example.", b"/v1/x", "api-v1"),
    # wildcard: any depth, the most specific domain first
    (b"www.example", b"/x", "wild"),
    (b"www.example", b"/v1/x", "wild-v1"),
    (b"b.a.example", b"/v1/x", "wild-a"),
    (b"x.y.example", b"/", "wild"),
    # `*.example` is not `example`
    (b"example", b"/x", "fallback"),
    # other hosts, no host at all: the any-host group
    (b"other.test", b"/static/a", "assets"),
    (b"other.test", b"/index.html", "fallback"),
    (None, b"/static/a", "assets"),
    (b"", b"/x", "fallback"),
    # IPv6 literal with a port
    (b"[::1]:8080", b"/static/", "assets"),
])
def test_most_specific_host_group_then_longest_prefix(host: bytes | None, target: bytes,
                                                      expected: str) -> None:
    assert pick(MIXED, host, target) == expected


def test_a_group_without_a_matching_prefix_falls_through_to_the_next() -> None:
    t = table(Route("api.example", "/v1/", "api"), Route("*.example", "/v2/", "wild"),
              Route("", "/v3/", "any"))
    assert pick(t, b"api.example", b"/v1/a") == "api"
    assert pick(t, b"api.example", b"/v2/a") == "wild"
    assert pick(t, b"api.example", b"/v3/a") == "any"
    assert pick(t, b"api.example", b"/v4/a") is None


def test_no_match_anywhere_is_none() -> None:
    t = table(Route("api.example", "/", "api"))
    assert pick(t, b"other.example", b"/") is None
    assert pick(t, None, b"/") is None
    assert pick(table(), b"x", b"/") is None


def test_prefixes_match_as_strings_and_the_query_is_not_the_path() -> None:
    t = table(Route("", "/api", "api"), Route("", "/api/", "api-slash"))
    assert pick(t, None, b"/apix") == "api"  # as Fabio and Traefik's PathPrefix
    assert pick(t, None, b"/api/x") == "api-slash"
    assert pick(t, None, b"/api?x=/api/") == "api"
    assert pick(t, None, b"/ap") is None


def test_absolute_form_and_asterisk_targets() -> None:
    t = table(Route("", "/v1/", "v1"), Route("", "/", "root"))
    assert pick(t, b"h", b"http://h/v1/x?q") == "v1"
    assert pick(t, b"h", b"http://h") == "root"
    assert pick(t, b"h", b"*") is None  # OPTIONS *: no path, no prefix
    assert path_of(b"https://h:8443/a/b") == b"/a/b"


@pytest.mark.parametrize(("prefix", "target", "forwarded", "prefix_header"), [
    ("/x/", b"/x/a", b"/a", b"/x"),
    ("/x/", b"/x/", b"/", b"/x"),
    ("/x", b"/x/a", b"/a", b"/x"),
    ("/x", b"/x", b"/", b"/x"),
    ("/x", b"/xy", b"/y", b"/x"),
    ("/x", b"/x?q=1", b"/?q=1", b"/x"),
    ("/x/", b"http://h/x/a?b", b"/a?b", b"/x"),
])
def test_strip_prefix_keeps_a_leading_slash(prefix: str, target: bytes, forwarded: bytes,
                                            prefix_header: bytes) -> None:
    routed = table(Route("", prefix, "u", strip_prefix=True)).lookup(b"h", target)
    assert routed is not None and routed.strip
    assert routed.rewrite(target) == forwarded
    assert routed.forwarded_prefix == prefix_header


def test_stripping_the_root_prefix_is_no_strip() -> None:
    routed = table(Route("", "/", "u", strip_prefix=True)).lookup(b"h", b"/a")
    assert routed is not None and not routed.strip


def test_configured_hosts_are_normalised() -> None:
    assert Route("API.Example:80", "/", "u").host == "api.example"
    assert Route("*.Example.", "/", "u").host == "*.example"
    assert pick(table(Route("API.Example", "/", "u")), b"api.example", b"/") == "u"


def test_the_first_of_two_identical_routes_wins() -> None:
    t = table(Route("", "/a/", "config"), Route("", "/a/", "tag", source="catalog"))
    assert pick(t, None, b"/a/x") == "config"
    assert len(t) == 1


def test_counters_carry_into_the_next_table_by_route() -> None:
    a, b = Route("", "/a/", "ua"), Route("", "/b/", "ub")
    first = table(a, b)
    for target in (b"/a/1", b"/a/2", b"/b/1"):
        found = first.lookup(None, target)
        assert found is not None
        found.requests += 1
    second = RouteTable([(Route("", "/a/", "ua"), "ua"), (Route("", "/c/", "uc"), "uc")],
                        previous=first)
    assert {e.route.path_prefix: e.requests for e in second.entries} == {"/a/": 2, "/c/": 0}


def test_lookup_cost_does_not_grow_with_routes_of_one_length() -> None:
    # 100 services under /svc-NN/ : one prefix length, so one dict lookup per request.
    t = table(*(Route("", f"/svc-{i:02d}/", f"s{i}") for i in range(100)))
    group = t.any_host
    assert group is not None and group.lengths == (len("/svc-00/"),)
    assert pick(t, None, b"/svc-42/x") == "s42"


def test_the_host_memo_stays_bounded_and_gives_the_same_answers() -> None:
    from proxy.routing import MAX_REMEMBERED_HOSTS

    t = table(Route("a.example", "/", "a"), Route("*.example", "/", "wild"),
              Route("", "/", "any"))
    for i in range(MAX_REMEMBERED_HOSTS * 2 + 5):
        assert pick(t, f"h{i}.example:{i}".encode(), b"/") == "wild"
        assert pick(t, b"A.example", b"/") == "a"
        assert len(t.by_host) <= MAX_REMEMBERED_HOSTS
    assert pick(t, b"other", b"/") == "any"


def test_an_unchanged_route_to_the_same_target_is_carried_over_whole() -> None:
    a, b = Route("", "/a/", "ua"), Route("", "/b/", "ub")
    first = RouteTable([(a, "A"), (b, "B")])
    entry_a = first.lookup(None, b"/a/")
    entry_b = first.lookup(None, b"/b/")
    assert entry_a is not None and entry_b is not None
    entry_b.requests = 5
    # /a/ unchanged; /b/ now leads elsewhere: a new entry, its counter kept.
    second = RouteTable([(Route("", "/a/", "ua"), "A"), (b, "B2"),
                         (Route("", "/c/", "uc"), "C")], previous=first)
    assert second.lookup(None, b"/a/x") is entry_a
    moved = second.lookup(None, b"/b/x")
    assert moved is not None and moved is not entry_b
    assert (moved.target, moved.requests) == ("B2", 5)
    # A request counted on the old table after the new one was built still counts.
    entry_a.requests += 1
    assert [e.requests for e in second.entries] == [1, 5, 0]
