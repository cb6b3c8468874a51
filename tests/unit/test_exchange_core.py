"""proxy.l7.exchange_core.ExchangeCore driven with events, and the HTTP drivers
(protocols/http*.py) driven through in-memory transports: no sockets, no timers.

The core is handed a real UpstreamRuntime (real hosts, breakers and balancer) and heads
from the real parser; the driver tests give HttpDownstream and UpstreamConnection a
`FakeTransport` that records what is written, with a pooled upstream connection already
in the host's pool, so a whole exchange runs inside `data_received` calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from support.fakes import HeadSink, parse_request

from proxy.config import UpstreamConfig
from proxy.l7.exchange import REPLAY_LIMIT
from proxy.l7.exchange_core import (
    ABORT_CLIENT,
    ATTEMPT,
    CLOSE,
    FINISH,
    FORWARD,
    NO_OUTCOME,
    NOTHING,
    PARK,
    REJECT,
    RETRY,
    RETRY_5XX,
    SWITCH,
    ExchangeCore,
    ExchangePolicy,
)
from proxy.l7.message import MessageHead
from proxy.l7.parsers import PARSERS
from proxy.model import Address, Endpoint
from proxy.outcomes import CONNECT_FAILURE, DONE, RESET, STATUS_503, TIMEOUT
from proxy.protocols.http import HttpDownstream, HttpListener
from proxy.protocols.http_upstream import UpstreamConnection
from proxy.upstream.host import Host
from proxy.upstream.manager import UpstreamRuntime

T = 100.0  # the loop time events are reported at


def request(raw: bytes) -> MessageHead:
    return parse_request(raw)


def response(raw: bytes, method: bytes = b"GET", upgrade: bool = False) -> MessageHead:
    sink = HeadSink()
    parser = PARSERS["httptools"][1](sink, 65536)
    parser.expect(method, upgrade)
    parser.feed(raw)
    return sink.heads[0]


GET = b"GET /a HTTP/1.1\r\nHost: web\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"


def runtime(hosts: str = "abc", **config: Any) -> UpstreamRuntime:
    rt = UpstreamRuntime(UpstreamConfig(name="web", listen=Address("127.0.0.1", 8081),
                                        **config))
    rt.reconcile(tuple(Endpoint(id=h, address="127.0.0.1", port=9000 + i)
                       for i, h in enumerate(hosts)))
    return rt


def core(rt: UpstreamRuntime, raw: bytes = GET) -> ExchangeCore:
    return ExchangeCore(ExchangePolicy(rt), request(raw), b"10.0.0.9", T)


def attempt(exchange: ExchangeCore) -> tuple[Host, bytes]:
    """Begin an attempt and send the request on a connection: its host and bytes."""
    assert exchange.begin_attempt() == ATTEMPT
    host = exchange.host
    assert host is not None
    return host, exchange.request_data(T)


# -- retries -------------------------------------------------------------------------------
def test_a_retried_5xx_goes_to_an_instance_not_tried_yet() -> None:
    # hash on the path: the balancer's first choice is the same host every time, so only
    # the exclusion of tried hosts can move a retry elsewhere.
    rt = runtime("abc", balance="hash", hash_key="path", retries=2)
    exchange = core(rt)
    seen = []
    for _ in range(2):
        host, _data = attempt(exchange)
        seen.append(host.id)
        assert exchange.response_head_received(response(UNAVAILABLE), T) == RETRY_5XX
        assert exchange.settled == STATUS_503 and not exchange.attempt_open
        assert exchange.attempt_over(STATUS_503, T) == RETRY
    host, _data = attempt(exchange)
    seen.append(host.id)
    assert len(set(seen)) == 3, seen
    # retries (2) spent: the third 503 is the answer
    assert exchange.response_head_received(response(UNAVAILABLE), T) == FORWARD
    assert exchange.out[0].startswith(b"HTTP/1.1 503 ")
    assert rt.failovers == {"503": 2}


def test_a_5xx_is_not_retried_on_an_instance_already_tried() -> None:
    rt = runtime("ab", balance="hash", hash_key="path", retries=5)
    exchange = core(rt)
    first, _ = attempt(exchange)
    assert exchange.response_head_received(response(UNAVAILABLE), T) == RETRY_5XX
    assert exchange.attempt_over(STATUS_503, T) == RETRY
    second, _ = attempt(exchange)
    assert second is not first
    # both tried: a further 503 goes to the client rather than to `first` again
    assert exchange.response_head_received(response(UNAVAILABLE), T) == FORWARD
    assert [h.id for h in exchange.tried] == [first.id, second.id]


def test_a_failed_connect_is_retried_even_for_post_but_a_reset_is_not() -> None:
    post = b"POST /a HTTP/1.1\r\nHost: web\r\nContent-Length: 0\r\n\r\n"
    rt = runtime("ab")
    exchange = core(rt, post)
    assert exchange.begin_attempt() == ATTEMPT
    exchange.connect_failed()
    assert exchange.attempt_over(CONNECT_FAILURE, T) == RETRY
    host, _data = attempt(exchange)
    assert exchange.upstream_failed()  # the instance reset after the request was sent
    assert exchange.attempt_over(RESET, T) == FINISH
    assert exchange.out[0].startswith(b"HTTP/1.1 502 ")
    assert f"instance {host.id} failed: reset".encode() in exchange.out[0]
    assert exchange.failures == ["connect-failure", "reset"]


def test_a_body_longer_than_the_replay_limit_is_not_replayed() -> None:
    put = b"PUT /a HTTP/1.1\r\nHost: web\r\nContent-Length: %d\r\n\r\n" % (REPLAY_LIMIT + 1)
    rt = runtime("ab")
    exchange = core(rt, put)
    attempt(exchange)
    assert exchange.client_body(b"x" * (REPLAY_LIMIT + 1)) is not None  # streamed once
    assert exchange.body_log is None
    exchange.upstream_failed()
    assert exchange.attempt_over(RESET, T) == FINISH


def test_no_instance_answers_503_and_every_one_tried_502() -> None:
    exchange = core(runtime(""))
    assert exchange.begin_attempt() == FINISH
    assert exchange.out[0].startswith(b"HTTP/1.1 503 ") and exchange.own_status == 503
    rt = runtime("a")
    exchange = core(rt)
    attempt(exchange)
    exchange.upstream_failed()
    assert exchange.attempt_over(RESET, T) == FINISH  # retries left, no instance left
    assert exchange.out[0].startswith(b"HTTP/1.1 502 ")
    assert rt.in_flight == 0 and rt.hosts["a"].active == 0


def test_a_response_head_late_after_the_request_ended_is_a_504() -> None:
    rt = runtime("a", request_timeout=5.0)
    exchange = core(rt)
    attempt(exchange)
    assert exchange.deadline == T + 5.0
    assert exchange.request_timed_out()
    assert exchange.attempt_over(TIMEOUT, T + 5) == FINISH
    assert exchange.out[0].startswith(b"HTTP/1.1 504 ")


def test_a_response_cut_midway_cuts_the_client_connection() -> None:
    exchange = core(runtime("ab"))
    attempt(exchange)
    assert exchange.response_head_received(response(OK), T) == FORWARD
    assert exchange.upstream_lost() == RESET
    assert exchange.attempt_over(RESET, T) == ABORT_CLIENT
    assert exchange.finished and not exchange.client_keep


# -- framing and reuse ------------------------------------------------------------------------
def test_a_keep_alive_response_parks_its_connection_and_a_closing_one_does_not() -> None:
    exchange = core(runtime("a"))
    attempt(exchange)
    assert exchange.response_head_received(response(OK), T) == FORWARD
    exchange.response_body(b"ok")
    assert exchange.response_end() == PARK
    assert exchange.settled == DONE
    assert exchange.attempt_over(DONE, T) == FINISH and exchange.client_keep
    assert b"".join(exchange.out).endswith(b"\r\n\r\nok")
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    exchange = core(runtime("a"))
    attempt(exchange)
    exchange.response_head_received(response(closing), T)
    assert exchange.response_end() == CLOSE


def test_a_body_held_while_connecting_goes_with_the_head_and_pauses_the_client() -> None:
    post = b"POST /a HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
    exchange = core(runtime("a"), post)
    assert exchange.begin_attempt() == ATTEMPT
    assert exchange.client_body(b"x" * 300_000) is None
    assert exchange.holds_too_much()
    assert exchange.client_end(T) is None
    data = exchange.request_data(T)
    assert data.endswith(b"x" * 10 + b"\r\n0\r\n\r\n") and not exchange.pending
    assert exchange.client_body(b"more") == b"4\r\nmore\r\n"  # connected: written at once


# -- upgrades ---------------------------------------------------------------------------------
WEBSOCKET = (b"GET /ws HTTP/1.1\r\nHost: web\r\nUpgrade: websocket\r\n"
             b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             b"Sec-WebSocket-Version: 13\r\n\r\n")
SWITCHING = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
             b"Connection: Upgrade\r\n\r\n")


def test_an_upgrade_offer_is_forwarded_and_a_101_switches() -> None:
    exchange = core(runtime("a"), WEBSOCKET)
    assert exchange.upgrade
    _host, data = attempt(exchange)
    lines = data.lower().split(b"\r\n")
    assert b"upgrade: websocket" in lines
    assert any(line.startswith(b"connection:") and b"upgrade" in line for line in lines)
    assert exchange.response_head_received(response(SWITCHING, upgrade=True), T) == SWITCH
    assert exchange.out[0].startswith(b"HTTP/1.1 101 ")
    assert exchange.response_end() == NOTHING  # the tunnel follows, not the pool
    assert exchange.switched()
    assert exchange.attempt_over(DONE, T) == FINISH


def test_a_101_nobody_offered_is_rejected() -> None:
    exchange = core(runtime("a"))
    attempt(exchange)
    assert exchange.response_head_received(response(SWITCHING), T) == REJECT


def test_nothing_settled_is_no_outcome() -> None:
    assert NO_OUTCOME < 0
    assert core(runtime("a")).settled == NO_OUTCOME


# -- the drivers, on in-memory transports -------------------------------------------------
class FakeTransport:
    """An asyncio.Transport that keeps what is written (no socket)."""

    def __init__(self, peer: tuple[str, int] = ("10.0.0.9", 40000)) -> None:
        self.written: list[bytes] = []
        self.closing = False
        self.aborted = False
        self.reading = True
        self.peer = peer

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def take(self) -> bytes:
        data, self.written = b"".join(self.written), []
        return data

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default

    def set_protocol(self, protocol: object) -> None:
        self.protocol = protocol

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.closing = True

    def writelines(self, data: list[bytes]) -> None:
        self.written.extend(data)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def pooled(rt: UpstreamRuntime, host_id: str,
           loop: asyncio.AbstractEventLoop) -> tuple[UpstreamConnection, FakeTransport]:
    """An idle connection to `host_id`, parked in its pool as after an earlier request."""
    host = rt.hosts[host_id]
    conn = UpstreamConnection(host, "httptools", 65536, 100, loop)
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    assert conn.park(loop.time())
    return conn, transport


def client(listener: HttpListener) -> tuple[HttpDownstream, FakeTransport]:
    down = listener.protocol_factory()
    assert isinstance(down, HttpDownstream)
    transport = FakeTransport()
    down.connection_made(transport)  # type: ignore[arg-type]
    return down, transport


def test_a_pooled_connection_is_reused_for_the_next_request(
        loop: asyncio.AbstractEventLoop) -> None:
    rt = runtime("a")
    listener = HttpListener(rt, loop)
    conn, upstream = pooled(rt, "a", loop)
    down, downstream = client(listener)
    for n in range(3):
        down.data_received(GET)
        assert upstream.take().startswith(b"GET /a HTTP/1.1\r\n"), n  # on the pooled one
        conn.data_received(OK)
        assert downstream.take().endswith(b"\r\n\r\nok")
        assert down.exchange is None and not downstream.closing
        assert rt.hosts["a"].pool.take() is conn  # back in the pool after each response
        assert conn.park(loop.time())
    assert rt.hosts["a"].requests == 3 and rt.hosts["a"].active == 0
    listener.close_all()


def test_an_upgrade_offer_reaches_the_instance_and_101_starts_a_tunnel(
        loop: asyncio.AbstractEventLoop) -> None:
    rt = runtime("a")
    listener = HttpListener(rt, loop)
    conn, upstream = pooled(rt, "a", loop)
    down, downstream = client(listener)
    down.data_received(WEBSOCKET + b"early frame")
    sent = upstream.take().lower()
    assert b"\r\nupgrade: websocket\r\n" in sent
    assert b"early frame" not in sent  # held for the tunnel, not sent as HTTP
    conn.data_received(SWITCHING + b"server frame")
    to_client = downstream.take()
    assert to_client.startswith(b"HTTP/1.1 101 ") and to_client.endswith(b"server frame")
    assert upstream.take() == b"early frame"  # the tunnel carries both ways
    assert down.tunnel is not None
    assert rt.hosts["a"].pool.take() is None  # a tunnel's connection is never pooled
    down.tunnel.close()
    listener.close_all()


def test_a_connection_past_max_connections_is_refused_and_counted(
        loop: asyncio.AbstractEventLoop) -> None:
    rt = runtime("a", max_connections=1)
    listener = HttpListener(rt, loop)
    client(listener)
    refused = listener.protocol_factory()
    transport = FakeTransport()
    refused.connection_made(transport)  # type: ignore[arg-type]
    assert transport.take().startswith(b"HTTP/1.1 503 ") and transport.closing
    assert listener.rejected_connections == 1 and listener.connections == 1
    assert rt.responses == {503: 1}
    listener.close_all()


def test_a_503_retried_by_the_driver_goes_to_the_other_pooled_instance(
        loop: asyncio.AbstractEventLoop) -> None:
    rt = runtime("ab", balance="hash", hash_key="path")
    listener = HttpListener(rt, loop)
    conns = {h: pooled(rt, h, loop) for h in "ab"}
    down, downstream = client(listener)
    down.data_received(GET)
    exchange = down.exchange
    assert exchange is not None
    first = next(h for h, (_, t) in conns.items() if t.written)
    other = "b" if first == "a" else "a"
    conns[first][0].data_received(UNAVAILABLE)
    assert conns[first][1].closing  # a retried 5xx's connection is not reused
    # the retry starts when the read that brought the 503 ends, on the other instance
    assert conns[other][1].take().startswith(b"GET /a ")
    conns[other][0].data_received(OK)
    assert downstream.take().endswith(b"ok")
    assert [h.id for h in exchange.tried] == [first, other]
    assert rt.failovers == {"503": 1} and down.exchange is None
    listener.close_all()
