"""The client side of HTTP mode: one asyncio.Protocol per client connection.

Feeds bytes to the configured request parser and hands each request to an `Exchange`
(http_exchange.py) with the ExchangePolicy of the upstream it is for: the listener's
own (`listener.policy`) or, on a routed listener, the one its route table picks for the
request's Host and path. Requests are served one at a time; a pipelined request's events
are queued until the previous response ends. Owns the per-connection limits: the header
deadline (408), the head size and field count (431), malformed requests (400),
`max_connections` (503), `idle_timeout` for a connection where nothing moves either way
(408 for a stalled request body, else a reset), and which reasons currently pause
reading from the client. With the access log on (`listener.access`), requests become
`LoggedExchange`s, and the answers this module makes without an exchange (400, 408, 431,
503) get their access-log lines here.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import struct
import termios
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final, cast

from proxy.config import UpstreamConfig
from proxy.l7.exchange_core import OWN_REASONS, ExchangePolicy
from proxy.l7.headers import REASONS, encode_error, host_field
from proxy.l7.message import HeadTooLarge, MessageHead, ParseError
from proxy.l7.parsers import PARSERS
from proxy.protocols.http_exchange import ClientSide, Exchange, LoggedExchange
from proxy.protocols.relay import Relay, abort_with_reset
from proxy.routing import Route, RouteTable, strip_prefix
from proxy.upstream.manager import UpstreamRuntime

if TYPE_CHECKING:
    from proxy.accesslog import AccessLog

log: Final = logging.getLogger("sdproxy.http")

# Reasons to stop reading from the client, as bits.
INFINITY: Final = float("inf")

_PAUSE_PIPELINE: Final = 1  # a further request waits for the current response
_PAUSE_BODY: Final = 2  # request body buffered past the high-water mark while connecting
_PAUSE_UPSTREAM: Final = 4  # the instance's socket buffer is full
_PAUSE_UPGRADE: Final = 8  # bytes after an Upgrade request wait for the instance's answer

# Kinds of queued parser events (pipelined requests).
_HEAD: Final = 0
_BODY: Final = 1
_END: Final = 2

# Deadlines (header_timeout, request_timeout, idle_timeout) are checked by one sweep per
# listener instead of a timer per request: arming and cancelling a timer costs about 3 µs,
# three times per request; a sweep costs one comparison per open connection per tick.
MAX_SWEEP_INTERVAL: Final = 0.25
MIN_SWEEP_INTERVAL: Final = 0.01
POOL_SWEEP_INTERVAL: Final = 1.0  # idle pooled connections are closed with this precision


def sweep_interval(cfg: UpstreamConfig) -> float:
    """Fine enough that each deadline fires within about a tenth of itself."""
    return max(MIN_SWEEP_INTERVAL, min(MAX_SWEEP_INTERVAL, cfg.request_timeout / 10,
                                       cfg.header_timeout / 4))


class HttpListener:
    """Shared state of one HTTP listener: its upstream (or, with `routes`, the route
    table that picks one per request) and connection count."""

    def __init__(self, runtime: UpstreamRuntime, loop: asyncio.AbstractEventLoop) -> None:
        self.runtime = runtime
        self.cfg: UpstreamConfig = runtime.config
        self.loop = loop
        # The listener terminates TLS: requests go upstream with X-Forwarded-Proto: https.
        # Fixed for the listener's life (a reload that adds or drops TLS opens a new one);
        # a routed listener's app sets it before set_routes, whose policies carry it.
        self.client_tls = self.cfg.listen_tls is not None
        # What each exchange is handed: the upstream it works for, its limits and rules.
        self.policy = ExchangePolicy(runtime, client_tls=self.client_tls)
        # A listener of [[listeners]]: `runtime` is its own (connection limits, its own
        # answers); each request's upstream comes from this table (set_routes).
        self.routes: RouteTable[ExchangePolicy] | None = None
        # Whose idle pooled connections this listener's sweep expires: its upstream, or
        # every upstream its routes lead to (worked out once per table, not per sweep).
        self.pooled: list[UpstreamRuntime] = [runtime]
        self.connections = 0
        self.rejected_connections = 0
        self.access: AccessLog | None = None  # set by the app when [log] access is on
        self.open: set[HttpDownstream] = set()
        self.tick = sweep_interval(self.cfg)
        self._next_pool_sweep = loop.time() + POOL_SWEEP_INTERVAL
        self._sweeper: asyncio.TimerHandle | None = loop.call_later(self.tick, self._sweep)

    def protocol_factory(self) -> asyncio.Protocol:
        if self.connections >= self.cfg.max_connections:
            return _Refusal(self)  # no parser or state for a connection refused at once
        return HttpDownstream(self)

    def reconfigure(self, cfg: UpstreamConfig) -> None:
        """A reload changed the upstream: new connections use `cfg`, open ones keep theirs."""
        self.cfg = cfg
        self.policy = ExchangePolicy(self.runtime, unrouted=self.routes is not None,
                                     client_tls=self.client_tls)
        self.tick = sweep_interval(cfg)

    def set_routes(self, routes: list[tuple[Route, UpstreamRuntime]],
                   keep_policies: bool = False) -> None:
        """Make this a routed listener with `routes` (the first of two with the same host
        and prefix wins), swapped in one assignment: requests already routed keep their
        upstream, open connections stay.

        `keep_policies`: the runtimes' configs did not change since the last table (a
        catalog change, not a reload), so an upstream already in the table keeps its
        ExchangePolicy object and only new upstreams get one: a change costs a policy per
        added upstream, not one per routed upstream."""
        known: dict[int, ExchangePolicy] = {}
        if keep_policies and self.routes is not None:
            for entry in self.routes.entries:
                known[id(entry.target.runtime)] = entry.target
        destinations: dict[int, ExchangePolicy] = {}
        for _route, runtime in routes:
            key = id(runtime)
            if key not in destinations:
                # By id: the old table's policies keep their runtimes alive, so an id
                # in `known` is still that runtime's.
                policy = known.get(key)
                destinations[key] = (policy if policy is not None
                                     else ExchangePolicy(runtime, client_tls=self.client_tls))
        if not (keep_policies and self.policy.unrouted):
            self.policy = ExchangePolicy(self.runtime, unrouted=True, client_tls=self.client_tls)
        self.routes = RouteTable(((route, destinations[id(runtime)]) for route, runtime in routes),
                                 previous=self.routes)
        self.pooled = [d.runtime for d in destinations.values()]
        self.tick = min([sweep_interval(self.cfg),
                         *(sweep_interval(d.runtime.config) for d in destinations.values())])

    def route(self, head: MessageHead, routes: RouteTable[ExchangePolicy]) -> ExchangePolicy:
        """The destination of a request on a routed listener; a stripped prefix rewrites
        `head`'s target (Exchange forwards what the head says)."""
        host = host_field(head)
        routed = routes.lookup(host, head.target)
        if routed is None:
            return self.policy  # unrouted: the exchange answers 404
        routed.requests += 1
        if routed.strip:
            strip_prefix(head, routed, host)
        return routed.target

    def busy(self) -> bool:
        """Some request or tunnel is in flight (shutdown waits for these)."""
        return any(conn.exchange is not None or conn.tunnel is not None for conn in self.open)

    def _sweep(self) -> None:
        """Fire the deadlines that passed: a head not complete within header_timeout (408),
        a response head not arrived within request_timeout (counted from the end of the
        request), a connection where no byte moved either way for idle_timeout (a stalled
        body, a client that stopped reading, a response stuck in our write buffer)."""
        now = self.loop.time()
        idle_limit = self.cfg.idle_timeout
        for conn in list(self.open):
            exchange = conn.exchange
            if exchange is None:
                if conn.head_deadline <= now:
                    conn.on_header_timeout()
                    continue
            elif exchange.deadline <= now:
                exchange.on_request_timeout()
                continue
            elif exchange.deadline != INFINITY:
                continue  # waiting for the instance: request_timeout's business
            if now - conn.last_activity > idle_limit and not conn.wrote_since_last_sweep():
                log.info("event=idle_timeout upstream=%s idle_timeout=%g", self.runtime.name,
                         idle_limit)
                conn.on_idle_timeout()
        if now >= self._next_pool_sweep:
            self._next_pool_sweep = now + POOL_SWEEP_INTERVAL
            before = now - idle_limit
            for runtime in self.pooled:
                for host in runtime.all_hosts():
                    host.pool.expire(before)
        self._sweeper = self.loop.call_later(self.tick, self._sweep)

    def close_all(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.open):
            if conn.tunnel is not None:
                conn.tunnel.close()
            elif conn.transport is not None:
                conn.transport.close()


class _Refusal(asyncio.Protocol):
    """A connection beyond max_connections: 503 and closed, at the least cost per
    connection (a flood of them must not slow the clients being served)."""

    def __init__(self, listener: HttpListener) -> None:
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        listener = self.listener
        listener.rejected_connections += 1
        transport = cast(asyncio.Transport, transport)
        runtime = listener.runtime
        answer = encode_error(503, REASONS[503], runtime.name, "too many connections", False)
        runtime.count_response(503)
        runtime.bytes_out += len(answer)
        transport.write(answer)
        transport.close()
        access = listener.access
        if access is not None:
            peer = transport.get_extra_info("peername") or ("", 0)
            access.add((time.time(), listener.runtime.name, str(peer[0]).encode(), peer[1], b"",
                        b"", 503, 0, len(answer), 0.0, "", 0, "max-connections", b""))


class HttpDownstream(asyncio.Protocol, ClientSide):
    def __init__(self, listener: HttpListener) -> None:
        self.listener = listener
        self.runtime = listener.runtime
        self.cfg = listener.cfg
        self.loop = listener.loop
        self.transport: asyncio.Transport | None = None
        self.parser = PARSERS[self.cfg.http_parser][0](self, self.cfg.max_header_size)
        self.client_ip = b"-"
        self.client_port = 0
        self.exchange: Exchange | None = None
        self.starting: Exchange | None = None  # its head was parsed; starts after this read
        self.in_request = False  # the current exchange's request has not ended yet
        self.final = False  # a request without keep-alive ended: later bytes are ignored
        self.held: list[bytes] | None = None  # bytes after an Upgrade request, for the tunnel
        self.tunnel: Relay | None = None
        # Events of pipelined requests that wait for the current response: the first is
        # always a request head (everything before it belongs to the current exchange).
        self.queue: deque[tuple[int, Any]] = deque()
        self.head_deadline = INFINITY  # when a head not complete by then gets 408
        self.head_bytes = 0  # bytes received since the last response ended
        self.requests_done = 0
        self.paused = 0
        self.write_paused = False
        self.closed = False
        self.last_activity = self.loop.time()  # last byte from the client or the instance
        self.unsent = 0  # bytes the client has not taken (ours and the kernel's), last seen

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = str(peer[0]).encode()
            self.client_port = peer[1]
        listener = self.listener
        listener.connections += 1
        listener.open.add(self)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        self.runtime.bytes_in += len(data)
        if self.closed or self.final:
            return
        self.last_activity = self.loop.time()
        if self.held is not None:
            self.held.append(data)
            return
        if self.exchange is None:
            self.head_bytes += len(data)
        try:
            offset = self.parser.feed(data)
            if offset is not None:
                # An Upgrade request ended: what follows belongs to the new protocol if the
                # instance switches (101), and is dropped with the connection if not.
                self.held = [data[offset:]] if offset < len(data) else []
                self._set_paused(_PAUSE_UPGRADE, True)
        except HeadTooLarge as too_large:  # one name per type (mypyc types it once)
            self._reject(431, str(too_large))
        except ParseError as malformed:
            self._reject(400, f"malformed request: {malformed}")
        exchange = self.starting
        if exchange is not None:
            # Started once the whole read is parsed, so that a request's end (or a bad byte
            # after it) is known first; within this callback, not a loop turn later.
            self.starting = None
            exchange.start()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed and self not in self.listener.open:
            return
        self.closed = True
        self.listener.connections -= 1
        self.listener.open.discard(self)
        self._clear_header_deadline()
        if self.exchange is not None:
            self.exchange.on_client_lost()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.exchange is not None:
            self.exchange.on_client_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        self.last_activity = self.loop.time()  # the client reads again
        if self.exchange is not None:
            self.exchange.on_client_paused(False)

    # -- parser sink --------------------------------------------------------------------
    def on_head(self, head: MessageHead) -> None:
        if head.method == b"CONNECT":
            raise ParseError("CONNECT is not supported")  # no tunnels to arbitrary hosts
        if len(head.headers) > self.cfg.max_header_count:
            raise HeadTooLarge(f"request head with more than {self.cfg.max_header_count} "
                               f"fields")
        if self.exchange is not None or self.queue:
            self.queue.append((_HEAD, head))
            self._set_paused(_PAUSE_PIPELINE, True)
            return
        # _begin(head), written out: this runs once per request
        self.head_deadline = INFINITY
        listener = self.listener
        routes = listener.routes
        to = listener.policy if routes is None else listener.route(head, routes)
        if listener.access is None:
            self.exchange = self.starting = Exchange(self, head, to, self.loop,
                                                     self.last_activity)
        else:
            self.exchange = self.starting = LoggedExchange(self, head, to, self.loop,
                                                           self.last_activity)
        self.in_request = True

    def on_body(self, data: bytes) -> None:
        if self.in_request and not self.queue:
            self.exchange.on_client_body(data)  # type: ignore[union-attr]
        else:
            self.queue.append((_BODY, data))

    def on_end(self) -> None:
        if self.in_request and not self.queue:
            # _end_request(), written out: this runs once per request
            self.in_request = False
            exchange = self.exchange
            assert exchange is not None
            last = exchange.client_end(self.last_activity)
            if last is not None:
                exchange.write_upstream(last)
            if not exchange.head.keep_alive:
                self.final = True  # the connection closes after this response
        else:
            self.queue.append((_END, None))

    def _begin(self, head: MessageHead) -> None:
        self.head_deadline = INFINITY
        listener = self.listener
        now = self.loop.time()
        routes = listener.routes
        to = listener.policy if routes is None else listener.route(head, routes)
        if listener.access is None:
            self.exchange = self.starting = Exchange(self, head, to, self.loop, now)
        else:
            self.exchange = self.starting = LoggedExchange(self, head, to, self.loop, now)
        self.in_request = True

    def _end_request(self) -> None:
        self.in_request = False
        exchange = self.exchange
        assert exchange is not None
        last = exchange.client_end(self.loop.time())
        if last is not None:
            exchange.write_upstream(last)
        if not exchange.head.keep_alive:
            self.final = True  # the connection closes after this response

    def _next_from_queue(self) -> None:
        """Start the first queued request and hand it the body and end queued with it;
        later requests stay queued (each turn takes only its own events: linear time)."""
        queue = self.queue
        while queue:
            kind, value = queue[0]
            if kind == _HEAD:
                if self.exchange is not None:
                    return
                queue.popleft()
                self._begin(value)
            elif kind == _BODY:
                queue.popleft()
                self.exchange.on_client_body(value)  # type: ignore[union-attr]
            else:
                queue.popleft()
                self._end_request()

    # -- called by the exchange ---------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.runtime.bytes_out += len(data)
            self.transport.write(data)

    def abort(self) -> None:
        """Cut the connection with a reset: what the kernel still holds for the client is
        dropped with it (a plain close would leave it queued, behind a FIN, for a client
        that may never read it)."""
        if self.transport is not None:
            abort_with_reset(self.transport)

    def pause_for_body(self, on: bool) -> None:
        self._set_paused(_PAUSE_BODY, on)

    def pause_for_upstream(self, on: bool) -> None:
        self._set_paused(_PAUSE_UPSTREAM, on)

    def start_tunnel(self, upstream: asyncio.Transport, upstream_data: bytes) -> None:
        """After a 101: relay bytes both ways between the client and the instance."""
        assert self.transport is not None
        self._clear_header_deadline()
        held, self.held = self.held or [], None  # counted in as they were read
        self.runtime.bytes_out += len(upstream_data)
        self.paused = 0
        relay = self.tunnel = Relay(self.loop, self.transport, upstream,
                                    idle_timeout=self.cfg.idle_timeout, on_done=self._on_tunnel_done,
                                    traffic=self.runtime)
        relay.start(a_data=held, b_data=[upstream_data] if upstream_data else [])

    def _on_tunnel_done(self, relay: Relay) -> None:
        self.closed = True
        self.tunnel = None
        self.listener.connections -= 1
        self.listener.open.discard(self)

    def on_exchange_done(self, exchange: Exchange, keep: bool) -> None:
        self.exchange = None
        if self.tunnel is not None or (self.closed and self not in self.listener.open):
            return  # the relay owns both transports now
        self.in_request = False
        self.requests_done += 1
        self.paused &= ~(_PAUSE_BODY | _PAUSE_UPSTREAM)
        if self.closed:
            return
        if not keep:
            self.closed = True
            self._clear_header_deadline()
            if self.transport is not None:
                self.transport.close()
            return
        self.head_bytes = 0
        if self.queue:
            self._next_from_queue()
        pipelined = self.starting
        if pipelined is not None:
            # Its turn comes on the next loop turn, so that a run of requests answered at
            # once (503s, say) does not recurse.
            self.starting = None
            self.loop.call_soon(pipelined.start)
        if self.exchange is None:
            self.head_deadline = self.loop.time() + self.cfg.header_timeout
        if not self.queue:
            if self.paused:
                self._set_paused(_PAUSE_PIPELINE, False)
        elif self.transport is not None and not self.paused:
            self.transport.resume_reading()

    def access_log(self) -> AccessLog | None:
        return self.listener.access

    # -- helpers ------------------------------------------------------------------------
    def _set_paused(self, reason: int, on: bool) -> None:
        before = self.paused
        self.paused = before | reason if on else before & ~reason
        transport = self.transport
        if transport is None or self.closed:
            return
        if self.paused and not before:
            transport.pause_reading()
        elif before and not self.paused:
            transport.resume_reading()

    def _arm_header_deadline(self) -> None:
        self.head_deadline = self.loop.time() + self.cfg.header_timeout

    def _clear_header_deadline(self) -> None:
        self.head_deadline = INFINITY

    def _log_rejected(self, access: AccessLog, status: int, size: int) -> None:
        """The access-log line of a request answered before its head was complete."""
        timeout = self.cfg.header_timeout
        if status == 408:  # the deadline, armed when the head began, passed
            waited = timeout
            reason = "header-timeout"
        else:
            left = self.head_deadline - self.loop.time()
            waited = 0.0 if left == INFINITY else max(0.0, timeout - left)
            reason = OWN_REASONS[status]
        access.add((time.time(), self.runtime.name, self.client_ip, self.client_port, b"", b"",
                    status, self.head_bytes, size, waited, "", 0, reason, b""))

    def unsent_bytes(self) -> int:
        """Bytes written for the client that it has not taken yet: ours and the kernel's."""
        transport = self.transport
        if transport is None:
            return 0
        unsent = transport.get_write_buffer_size()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                                         b"\0\0\0\0"))[0]
            except OSError:
                pass
        return unsent

    def wrote_since_last_sweep(self) -> bool:
        """Whether the client took bytes since the last look: a slow reader makes progress
        without any callback while our buffer stays below its high-water mark."""
        unsent = self.unsent_bytes()
        if unsent == self.unsent:
            return False
        self.unsent = unsent
        self.last_activity = self.loop.time()
        return True

    def on_idle_timeout(self) -> None:
        """No byte moved either way for idle_timeout."""
        exchange = self.exchange
        if exchange is not None and not exchange.response_started:
            exchange.on_client_stalled()  # 408 for a request body that stopped coming
        elif exchange is None and not self.closed and not self.unsent:
            self.closed = True  # an idle keep-alive connection: close quietly
            self._clear_header_deadline()
            if self.transport is not None:
                self.transport.close()
        else:  # a client that stopped reading: what we hold for it is dropped
            self.abort()

    def on_header_timeout(self) -> None:
        self.head_deadline = INFINITY
        if self.exchange is not None or self.closed:
            return
        if self.head_bytes or not self.requests_done:
            self._reject(408, f"request head not complete within {self.cfg.header_timeout:g}s")
        elif self.unsent_bytes():  # still reading the last response, or stopped reading:
            self._arm_header_deadline()  # idle_timeout decides, and a new head gets its due
        else:  # an idle keep-alive connection: close quietly, as HAProxy does
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def _reject(self, status: int, detail: str) -> None:
        """Answer a client error ourselves and close the connection."""
        exchange = self.exchange
        answer = encode_error(status, REASONS[status], self.runtime.name, detail, False)
        if exchange is not None:
            started = exchange.response_started
            if not started:
                exchange.on_direct_write(len(answer), status)  # its access-log line says so
            exchange.on_client_lost()
            if started:
                self.abort()
                return
        elif self.listener.access is not None:
            self._log_rejected(self.listener.access, status, len(answer))
        self.runtime.count_response(status)
        self.write(answer)
        self.closed = True
        self._clear_header_deadline()
        if self.transport is not None:
            self.transport.close()
