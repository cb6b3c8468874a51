"""TCP mode (`mode = "tcp"`): the listener and one protocol per client connection.

Owns what happens between accepting a client and handing both sockets to a byte mover:
the `max_connections` limit, picking and connecting an instance, retrying a failed
connect on another instance before the first byte is relayed, and the bookkeeping of a
relayed connection. Moving the bytes is relay.py's job (splice.py's, for bulk
connections on Linux). Must not know HTTP, nor how the movers move bytes.

Invariants:
- A client beyond `max_connections` open ones is closed at once, without a byte; the
  ones already open are unaffected.
- An accepted client counts in `listener.connections` and `runtime.in_flight` until its
  relay ends (or, if it never started, until it is closed): `_finish` runs exactly once.
- Each attempt holds `host.active` from the pick until it fails, or, once connected, until
  the relay ends; `runtime.release(host)` runs exactly once per attempt.
- A connect failure (refused, reset, `connect_timeout`) counts against that instance and
  is retried on an instance not tried yet, at most `retries` times, only when
  "connect-failure" is in `retry_on` (the retry budget never refuses a failed connect:
  `UpstreamRuntime.retry_allowed`). Nothing reaches the
  client before an instance accepted; when none does the client is closed without a byte.
- While connecting, client bytes and EOF are held (relay.Holding, bounded by
  HOLD_HIGH_WATER, then reading pauses) and delivered first once the relay starts.
- A connection to an instance removed from the catalog goes on for `drain_timeout`,
  then is closed (SPEC "Routing rules": in-flight work finishes within drain_timeout).
- With the access log on (`listener.access`), every accepted connection, refused ones
  included, gets one line when it ends (`_finish`).

TLS (SPEC "TLS"): `[upstreams.tls]` originates TLS to the instances (the client speaks
plain TCP to sdproxy), `[upstreams.listen_tls]` terminates it from clients (the app gives
the listener's server its context). Either way the connection stays on relay.py.

Byte movers: every connection starts on relay.py. With `ZERO_COPY` (read once per
listener; on by default where splice(2) exists) a connection whose relay reports bulk
traffic is taken over by splice.py, which moves bytes without copying them through
Python. See ZERO_COPY's comment for the measurement; bench/tcp_bulk.py repeats it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import TYPE_CHECKING, Protocol

from proxy.config import UpstreamConfig
from proxy.l7.exchange import CONNECT_FAILURE, may_retry
from proxy.protocols import splice
from proxy.protocols.relay import Holding, Relay, Traffic, abort_with_reset
from proxy.tls import ORIGINATIONS, log_connect_failure
from proxy.upstream.host import Host
from proxy.upstream.manager import UpstreamRuntime

if TYPE_CHECKING:
    from proxy.accesslog import AccessLog

log = logging.getLogger("sdproxy.tcp")

# Hand bulk connections over to splice(2) where the platform has it. Measured with
# bench/tcp_bulk.py on loopback: splice halves the proxy's CPU per GiB but costs more per
# connection than it saves on a short one, hence the take-over on the first large read
# instead of splicing from the accept.
ZERO_COPY = splice.AVAILABLE


# How often a listener looks for connections to removed instances past drain_timeout.
# One sweep per listener costs less than a timer per connection.
DRAIN_SWEEP_INTERVAL = 1.0


class Mover(Protocol):
    """What moves a connected pair's bytes: relay.Relay or splice.Splice."""

    def close(self) -> None: ...


class TcpListener:
    """Shared state of one TCP listener: its upstream, its open clients and counts."""

    def __init__(self, runtime: UpstreamRuntime, loop: asyncio.AbstractEventLoop) -> None:
        self.runtime = runtime
        self.cfg: UpstreamConfig = runtime.config
        self.loop = loop
        self.retry_on = frozenset(self.cfg.retry_on)
        # `balance = "hash"`: a TCP connection's only key is its source address, whatever
        # `hash_key` says (path, header and cookie exist only in HTTP mode).
        self.hash_source = self.cfg.balance == "hash"
        self.zero_copy = ZERO_COPY and not _encrypted(self.cfg)
        self.connections = 0  # open client connections (connecting or relayed)
        self.rejected_connections = 0  # closed at once: max_connections reached
        self.spliced_connections = 0  # taken over by splice(2) after a bulk read
        self.access: AccessLog | None = None  # set by the app when [log] access is on
        self.open: set[TcpClient] = set()
        # Draining Host objects (by identity, as the runtime keys them) -> first seen.
        self._drain_seen: dict[int, float] = {}
        self._sweeper: asyncio.TimerHandle | None = loop.call_later(DRAIN_SWEEP_INTERVAL,
                                                                     self._sweep_draining)

    def protocol_factory(self) -> TcpClient:
        return TcpClient(self)

    def reconfigure(self, cfg: UpstreamConfig) -> None:
        """A reload changed the upstream: new connections use `cfg`, open ones keep theirs."""
        self.cfg = cfg
        self.retry_on = frozenset(cfg.retry_on)
        self.hash_source = cfg.balance == "hash"
        self.zero_copy = ZERO_COPY and not _encrypted(cfg)

    def busy(self) -> bool:
        """Some client connection is open (shutdown gives these drain_timeout)."""
        return bool(self.open)

    def close_all(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for client in list(self.open):
            client.close()

    def _sweep_draining(self) -> None:
        """Close connections whose instance left the catalog more than drain_timeout ago.

        An instance's drain is timed from the first sweep that finds it draining; nothing
        is scanned while no instance of this upstream drains.
        """
        draining = self.runtime.draining  # removed instances with work in flight
        seen = self._drain_seen
        if draining or seen:
            now = self.loop.time()
            current = {id(host) for host in draining.values()}
            for gone in [key for key in seen if key not in current]:
                del seen[gone]  # finished, or back in the catalog
            for key in current:
                seen.setdefault(key, now)
            due = [c for c in self.open if c.host is not None and c.host.draining
                   and now - seen.get(id(c.host), now) >= c.drain_timeout]
            if due:
                log.info("event=tcp_drained upstream=%s connections=%d", self.runtime.name,
                         len(due))
                for client in due:
                    client.close()
        self._sweeper = self.loop.call_later(DRAIN_SWEEP_INTERVAL, self._sweep_draining)


def _encrypted(cfg: UpstreamConfig) -> bool:
    """TLS on either side: the bytes pass through OpenSSL, splice(2) cannot move them."""
    return cfg.tls is not None or cfg.listen_tls is not None


def record_connected(host: Host) -> None:
    """An established connection is a success for the instance's breaker.

    Not `Host.on_success(0)`: that would count a bogus status 0 in `status_counts`, which
    /metrics and /upstreams show as response codes.
    """
    host.consecutive_failures = 0
    host.breaker.record_success()


class ConnectionTraffic:
    """One connection's bytes, for its access-log line, added to its upstream's as well
    (a relay counts into one Traffic; this one passes every addition on)."""

    __slots__ = ("_in", "_out", "_upstream")

    def __init__(self, upstream: Traffic) -> None:
        self._upstream = upstream
        self._in = 0
        self._out = 0

    @property
    def bytes_in(self) -> int:
        return self._in

    @bytes_in.setter
    def bytes_in(self, value: int) -> None:
        self._upstream.bytes_in += value - self._in
        self._in = value

    @property
    def bytes_out(self) -> int:
        return self._out

    @bytes_out.setter
    def bytes_out(self, value: int) -> None:
        self._upstream.bytes_out += value - self._out
        self._out = value


class TcpClient(Holding):
    """One client connection: held while its instance is connected, then relayed."""

    __slots__ = ("drain_timeout", "finished", "host", "key", "listener", "mover", "peer",
                 "rejected", "started", "task", "traffic", "tried")

    def __init__(self, listener: TcpListener) -> None:
        super().__init__()
        self.listener = listener
        self.task: asyncio.Task[None] | None = None
        self.host: Host | None = None  # the connected instance, once the relay started
        self.mover: Mover | None = None  # the Relay, or the Splice that took over from it
        self.rejected = False
        self.finished = False
        self.key: bytes | None = None  # what a hash balancer hashes: the client's address
        self.drain_timeout = listener.cfg.drain_timeout
        self.tried: list[Host] = []  # instances picked for this connection, in order
        # For the access log only (when on): the client's address and the accept time.
        self.peer: tuple[str, int] = ("", 0)
        self.started = 0.0
        self.traffic: ConnectionTraffic | None = None  # this connection's bytes, once relayed

    # -- asyncio.Protocol (until the relay takes the transport over) --------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        listener = self.listener
        if listener.access is not None:
            self.started = time.monotonic()  # uvloop's clock counts whole milliseconds
            self.peer = transport.get_extra_info("peername") or self.peer
        if listener.connections >= listener.cfg.max_connections:
            listener.rejected_connections += 1
            self.rejected = True
            transport.close()
            if listener.access is not None:
                self._log(listener.access, "max-connections")
            return
        listener.connections += 1
        listener.open.add(self)
        listener.runtime.in_flight += 1
        if listener.hash_source:
            peer = transport.get_extra_info("peername")
            self.key = str(peer[0]).encode() if peer else None
        task = self.task = listener.loop.create_task(self._connect())
        task.add_done_callback(self._on_connect_done)

    def on_lost(self, exc: Exception | None) -> None:
        """The client left while its instance was being connected: stop connecting."""
        if self.task is not None and not self.task.done():
            self.task.cancel()

    # -- commands -----------------------------------------------------------------------
    def close(self) -> None:
        """Close the client (and its instance); a relay flushes what each side holds."""
        if self.mover is not None:
            self.mover.close()
            return
        if self.task is not None:
            self.task.cancel()
        if self.transport is not None:
            self.transport.close()

    # -- connecting ---------------------------------------------------------------------
    async def _connect(self) -> None:
        listener = self.listener
        rt = listener.runtime
        cfg = listener.cfg  # this connection keeps the config it was accepted under
        tried = self.tried
        while True:
            host = rt.pick(tried, self.key)
            if host is None:
                rt.no_host_responses += 1
                log.debug("event=tcp_no_instance upstream=%s tried=%d", rt.name, len(tried))
                return
            tried.append(host)
            host.active += 1
            host.requests += 1
            retrying = len(tried) > 1
            if retrying:
                rt.retries_in_flight += 1
            upstream: Holding | None = None
            try:
                upstream = await self._open(host, cfg)
            except (OSError, TimeoutError):
                host.on_failure()
            finally:  # also on cancellation: the client left
                if retrying:
                    rt.retries_in_flight -= 1
                if upstream is None:
                    rt.release(host)
            if upstream is not None:
                self._start_relay(host, upstream, cfg.idle_timeout)
                return
            if self.lost or not may_retry(CONNECT_FAILURE, method=b"", replayable=True,
                                          attempt=len(tried), retries=cfg.retries,
                                          retry_on=listener.retry_on):
                return
            rt.count_failover(CONNECT_FAILURE)

    async def _open(self, host: Host, cfg: UpstreamConfig) -> Holding:
        """Connect to `host`; its bytes and EOF are held until the relay starts.

        With `[upstreams.tls]` the handshake is part of the connect (and of
        connect_timeout): a certificate that does not verify fails it like a refusal.
        """
        ep = host.endpoint
        loop = self.listener.loop
        if cfg.tls is None:
            async with asyncio.timeout(cfg.connect_timeout):
                _transport, upstream = await loop.create_connection(Holding, ep.address,
                                                                    ep.port)
            return upstream
        origination = ORIGINATIONS.get(cfg.tls)
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                _transport, upstream = await loop.create_connection(
                    Holding, ep.address, ep.port, ssl=origination.context,
                    server_hostname=origination.server_name)
        except ssl.SSLError as e:
            log_connect_failure(origination, host.id, e)
            raise
        return upstream

    def _start_relay(self, host: Host, upstream: Holding, idle_timeout: float) -> None:
        listener = self.listener
        rt = listener.runtime
        record_connected(host)
        client = self.transport
        up = upstream.transport
        assert client is not None and up is not None
        if self.lost or client.is_closing():  # the client left as the connect completed
            up.close()
            rt.release(host)
            return
        if upstream.lost:  # accepted and closed at once (a refusal banner, say)
            if upstream.lost_exc is None:
                rt.bytes_out += upstream.held_bytes
                client.writelines(upstream.held)
                client.close()
            else:
                abort_with_reset(client)
            rt.release(host)
            return
        self.host = host
        traffic: Traffic = rt
        if listener.access is not None:  # its line gets this connection's own counts
            traffic = self.traffic = ConnectionTraffic(rt)
        relay = Relay(listener.loop, client, up, idle_timeout=idle_timeout,
                      on_done=self._on_mover_done,
                      on_bulk=self._on_bulk if listener.zero_copy else None, traffic=traffic)
        self.mover = relay
        traffic.bytes_in += self.held_bytes  # read before the relay: counted here
        traffic.bytes_out += upstream.held_bytes
        held, self.held, self.held_bytes = self.held, [], 0
        relay.start(a_data=held, a_eof=self.eof, b_data=upstream.held, b_eof=upstream.eof)

    def _on_bulk(self, relay: Relay) -> None:
        """The relay saw a bulk read: move the connection to splice(2) if it can be now."""
        try:
            mover = splice.take_over(relay, on_done=self._on_mover_done)
        except OSError as e:  # out of descriptors, say: this connection stays relayed
            relay.on_bulk = None
            log.debug("event=tcp_splice_unavailable upstream=%s error=%r",
                      self.listener.runtime.name, str(e))
            return
        if mover is not None:
            self.mover = mover
            self.listener.spliced_connections += 1

    def _on_connect_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A bug must cost one connection, never the listener.
            log.error("event=tcp_connect_error upstream=%s", self.listener.runtime.name,
                      exc_info=task.exception())
        if self.mover is None:
            if self.transport is not None and not self.lost:
                self.transport.close()  # no instance: the client gets no byte
            self._finish()

    # -- the end ------------------------------------------------------------------------
    def _on_mover_done(self, _mover: object) -> None:
        if self.host is not None:
            self.listener.runtime.release(self.host)
        self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        listener = self.listener
        listener.connections -= 1
        listener.open.discard(self)
        listener.runtime.in_flight -= 1
        if listener.access is not None:
            self._log(listener.access, self._reason())

    def _reason(self) -> str:
        """Why this connection was not relayed, or needed more than one attempt."""
        if self.mover is None:
            if self.lost:
                return "client-closed"
            return "connect-failure" if self.tried else "no-instance"
        return "connect-failure" if len(self.tried) > 1 else ""

    def _log(self, access: AccessLog, reason: str) -> None:
        """This connection's access-log line: no method, path or status in TCP mode; the
        bytes relayed each way (0 when it never was)."""
        ip, port = self.peer[0], self.peer[1]
        host = self.host
        traffic = self.traffic
        bytes_in, bytes_out = (traffic.bytes_in, traffic.bytes_out) if traffic else (0, 0)
        duration = time.monotonic() - self.started if self.started else 0.0
        access.add((time.time(), self.listener.runtime.name, str(ip).encode(), port, b"", b"",
                    None, bytes_in, bytes_out, duration, host.id if host is not None else "",
                    len(self.tried), reason, b""))
