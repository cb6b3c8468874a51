"""What a route changes in a request head (proxy.protocols.http.strip_prefix, host_field),
read off the head as it is forwarded."""

from __future__ import annotations

import pytest
from support.fakes import parse_request

from proxy.l7.headers import encode_request, host_field
from proxy.l7.message import MessageHead
from proxy.routing import Route, RouteTable, strip_prefix


def parse(raw: bytes, parser: str) -> MessageHead:
    return parse_request(raw, parser)


def forwarded(raw: bytes, parser: str, prefix: str = "/v1/") -> bytes:
    head = parse(raw, parser)
    routed = RouteTable([(Route("", prefix, "u", strip_prefix=True), "u")]).lookup(
        host_field(head), head.target)
    assert routed is not None
    strip_prefix(head, routed, host_field(head))
    return encode_request(head, client_ip=b"10.0.0.1", default_host=b"u")


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_strip_sets_the_target_and_the_forwarded_fields(parser: str) -> None:
    out = forwarded(b"GET /v1/users?x=1 HTTP/1.1\r\nHost: Api.Example:8080\r\n"
                    b"Connection: keep-alive, X-Drop\r\nX-Drop: 1\r\n\r\n", parser)
    lines = out.split(b"\r\n")
    assert lines[0] == b"GET /users?x=1 HTTP/1.1"
    assert b"Host: Api.Example:8080" in lines  # Host kept as sent
    assert b"X-Forwarded-Prefix: /v1" in lines
    assert b"X-Forwarded-Host: Api.Example:8080" in lines
    assert not any(line.lower().startswith(b"x-drop") for line in lines)  # hop-by-hop


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_clients_prefix_is_replaced_and_its_forwarded_host_kept(parser: str) -> None:
    out = forwarded(b"GET /v1/ HTTP/1.1\r\nHost: a\r\nx-forwarded-prefix: /evil\r\n"
                    b"X-Forwarded-Host: front\r\n\r\n", parser)
    lines = out.split(b"\r\n")
    assert lines[0] == b"GET / HTTP/1.1"
    assert [x for x in lines if x.lower().startswith(b"x-forwarded-prefix")] == \
        [b"x-forwarded-prefix: /v1"]
    assert [x for x in lines if x.lower().startswith(b"x-forwarded-host")] == \
        [b"X-Forwarded-Host: front"]


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_host_field(parser: str) -> None:
    assert host_field(parse(b"GET / HTTP/1.1\r\nX-A: b\r\nHOST: h:1\r\n\r\n", parser)) == b"h:1"
    assert host_field(parse(b"GET / HTTP/1.0\r\n\r\n", parser)) is None


async def test_a_catalog_change_keeps_the_policies_of_untouched_upstreams() -> None:
    import asyncio

    from proxy.config import UpstreamConfig
    from proxy.protocols.http import HttpListener
    from proxy.upstream.manager import UpstreamRuntime

    def runtime(name: str) -> UpstreamRuntime:
        return UpstreamRuntime(UpstreamConfig(name=name, listen=None, discovery="none"))

    own, ua, ub = runtime("listener"), runtime("ua"), runtime("ub")
    listener = HttpListener(own, asyncio.get_running_loop())
    try:
        listener.set_routes([(Route("", "/a/", "ua"), ua)])
        first = listener.routes
        assert first is not None
        policy_a, unrouted = first.entries[0].target, listener.policy
        assert unrouted.unrouted and policy_a.runtime is ua
        # A service added by the catalog: only it gets a new policy.
        listener.set_routes([(Route("", "/a/", "ua"), ua), (Route("", "/b/", "ub"), ub)],
                            keep_policies=True)
        second = listener.routes
        assert second is not None and second is not first
        assert second.entries[0].target is policy_a
        assert second.entries[1].target.runtime is ub
        assert listener.policy is unrouted
        assert listener.pooled == [ua, ub]
        # A reload (configs may have changed in place): every policy afresh.
        listener.set_routes([(Route("", "/a/", "ua"), ua)])
        third = listener.routes
        assert third is not None
        assert third.entries[0].target is not policy_a
        assert third.entries[0].target.runtime is ua
        assert listener.policy is not unrouted and listener.policy.unrouted
    finally:
        listener.close_all()
