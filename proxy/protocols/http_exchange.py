"""One proxied HTTP request, as I/O: carries out what its ExchangeCore decides.

`Exchange` is the driver of an `l7.exchange_core.ExchangeCore` (it subclasses it: one
object per request). The core decides (which instance, what to write, retry or answer an
error); this module does the I/O it asks for: takes a pooled connection or opens a new
one, writes to the instance and to the client, pauses either side, hands both
connections to a tunnel after a 101, and hands the end of an attempt back to the core
outside the callback that reported it (at the end of the instance's read,
`end_of_read`, or on the next loop turn). The response's head, body and end go from the
upstream connection straight to the core (http_upstream.py carries out their answers).

Driven by callbacks, with no task of its own: `start()` picks an instance and sends on a
pooled connection at once; only opening a new connection runs a task (`connect`). From
then on everything happens in callbacks from the two connections: request body chunks
are written upstream as they arrive (or held while connecting, up to a high-water mark),
response bytes are written to the client once per read of the instance, and each side's
transport pauses the other when its buffer fills.

`ClientSide` is the client connection as an exchange sees it (protocols/http.py's
HttpDownstream implements it), declared here so that this module imports nothing from
http.py. With the access log on, the listener makes `LoggedExchange`s instead: they also
count bytes and hand a record to the access log when they finish. The plain Exchange does
none of that, so with the log off the request path does no access-log work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from proxy.l7.exchange import BODY_HIGH_WATER
from proxy.l7.exchange_core import (
    ABORT_CLIENT,
    ATTEMPT,
    FINISH,
    NO_OUTCOME,
    NOTHING,
    RETRY,
    ExchangeCore,
    ExchangePolicy,
)
from proxy.l7.message import MessageHead
from proxy.outcomes import ABORTED, CONNECT_FAILURE, DONE, RESET, TIMEOUT
from proxy.protocols.http_upstream import ConnectionOwner, UpstreamConnection, connect

if TYPE_CHECKING:
    from proxy.accesslog import AccessLog, Record

log: Final = logging.getLogger("sdproxy.http")

CLIENT_CLOSED: Final = "client-closed"  # the client left before its response was complete


class ClientSide:
    """The client connection as an exchange sees it (implemented by HttpDownstream).
    A concrete class rather than a typing.Protocol; the attributes are the subclass's."""

    transport: asyncio.Transport | None
    client_ip: bytes
    client_port: int
    closed: bool
    write_paused: bool
    last_activity: float  # loop time of the last byte either way

    def abort(self) -> None:
        raise NotImplementedError

    def pause_for_body(self, on: bool) -> None:
        raise NotImplementedError

    def pause_for_upstream(self, on: bool) -> None:
        raise NotImplementedError

    def start_tunnel(self, upstream: asyncio.Transport, upstream_data: bytes) -> None:
        raise NotImplementedError

    def on_exchange_done(self, exchange: Exchange, keep: bool) -> None:
        raise NotImplementedError

    def access_log(self) -> AccessLog | None:
        raise NotImplementedError


class Exchange(ConnectionOwner):
    __slots__ = ("connecting", "down", "loop")

    def __init__(self, down: ClientSide, head: MessageHead, policy: ExchangePolicy,
                 loop: asyncio.AbstractEventLoop, now: float) -> None:
        ExchangeCore.__init__(self, policy, head, down.client_ip, now)
        self.conn: UpstreamConnection | None = None
        self.down = down
        self.loop = loop
        self.connecting: asyncio.Task[UpstreamConnection] | None = None

    # -- the attempts --------------------------------------------------------------------
    def start(self) -> None:
        """Begin the exchange (after the read that completed its request head), or its
        next attempt after one failed: send on a pooled connection at once, or open one."""
        try:
            if self.finished:
                return
            if self.down.closed:
                if self.finish(False) == FINISH:
                    self._finished()
                return
            if self.begin_attempt() != ATTEMPT:
                self._finished()  # answered: no instance (left) to try
                return
            host = self.host
            assert host is not None
            conn = host.pool.take()
            if conn is not None:
                self._send(conn)  # type: ignore[arg-type]
                return
            cfg = self.runtime.config
            # Only a new connection needs a task; a pooled one is used from this callback.
            task = self.loop.create_task(connect(host, cfg.http_parser, cfg.max_header_size,
                                                 cfg.max_header_count, cfg.connect_timeout,
                                                 cfg.tls))
            self.connecting = task
            task.add_done_callback(self._on_connected)
        except Exception:  # noqa: BLE001 -- _failed logs it
            self._failed()

    def end_of_read(self) -> None:
        down = self.down
        down.last_activity = self.read_at
        out = self.out
        if out:
            # flush(), written out: this runs once per read of the instance
            self.out = []
            transport = down.transport
            if not down.closed and transport is not None:
                data = out[0] if len(out) == 1 else b"".join(out)
                self.runtime.bytes_out += len(data)
                transport.write(data)
        outcome = self.settled
        if outcome != NO_OUTCOME:
            self.settled = NO_OUTCOME
            try:
                # _over(outcome), written out: this runs once per request
                action = self.attempt_over(outcome, self.read_at)
                if action == FINISH:
                    self._finished()
                elif action != NOTHING:
                    self._carry_out(action)
            except Exception:  # noqa: BLE001 -- _failed logs it
                self._failed()

    def _guarded(self, step: Callable[..., None], *args: object) -> None:
        """Run one step; a bug costs this request, never the listener."""
        try:
            step(*args)
        except Exception:  # noqa: BLE001 -- _failed logs it
            self._failed()

    def _failed(self) -> None:
        log.exception("event=exchange_error upstream=%s", self.runtime.name)
        if self.internal_error() == FINISH:
            self._finished()

    def _on_connected(self, task: asyncio.Task[UpstreamConnection]) -> None:
        self.connecting = None
        if task.cancelled():
            self._guarded(self._over, ABORTED)
            return
        exc = task.exception()
        if exc is not None:
            if not isinstance(exc, (OSError, TimeoutError)):
                log.error("event=connect_error upstream=%s error=%r", self.runtime.name, exc)
            self.connect_failed()
            self._guarded(self._over, CONNECT_FAILURE)
            return
        conn = task.result()
        if self.down.closed or self.finished:
            conn.close()
            self._guarded(self._over, ABORTED)
            return
        if not conn.is_usable():
            # The instance closed the connection as soon as it accepted it: nothing was
            # sent, so this is a failed connect, retried for any method.
            self.connect_failed()
            self._guarded(self._over, CONNECT_FAILURE)
            return
        self.read_at = self.loop.time()
        self._guarded(self._send, conn)

    def _send(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        # conn.attach(self, ...), written out: this runs once per request
        conn.exchange = self
        conn.parser.expect(self.head.method, self.upgrade)
        transport = conn.transport
        assert transport is not None
        if self.down.write_paused:
            transport.pause_reading()
        was_paused = self.pending_bytes > BODY_HIGH_WATER
        transport.write(self.request_data(self.read_at))
        if was_paused:
            self.down.pause_for_body(False)

    def _over(self, outcome: int) -> None:
        """The current attempt ended: carry out what the core decides."""
        action = self.attempt_over(outcome, self.read_at)
        if action == FINISH:
            self._finished()
        elif action != NOTHING:
            self._carry_out(action)

    def _carry_out(self, action: int) -> None:
        """RETRY or ABORT_CLIENT, from `attempt_over`."""
        if action == RETRY:
            self.start()
        elif action == ABORT_CLIENT:
            self.out.clear()
            self.down.abort()
            self._finished()

    def _over_soon(self, outcome: int) -> None:
        """End the attempt on the next loop turn, outside the callback reporting it."""
        self.loop.call_soon(self._over_later, outcome)

    def _over_later(self, outcome: int) -> None:
        self.read_at = self.loop.time()  # a retry's request_timeout counts from now
        self._guarded(self._over, outcome)

    def _finished(self) -> None:
        """The core finished the exchange: its last bytes go to the client, the
        connections are let go and the client connection handed back."""
        if self.out:
            self.flush()
        if self.connecting is not None:
            self.connecting.cancel()
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.abort()
        self.down.on_exchange_done(self, self.client_keep)

    # -- request body from the client ---------------------------------------------------
    def on_client_body(self, data: bytes) -> None:
        framed = self.client_body(data)
        if framed is not None:
            self.write_upstream(framed)
        elif self.holds_too_much():
            self.down.pause_for_body(True)

    def write_upstream(self, data: bytes) -> None:
        """Request bytes for the instance the current attempt is connected to."""
        conn = self.conn
        if conn is not None and conn.transport is not None:
            conn.transport.write(data)

    def on_client_stalled(self) -> None:
        """The client sent no byte of its request for idle_timeout: 408, and the instance
        is not charged for it."""
        self.client_stalled()
        self.flush()
        if self.connecting is None and not self.attempt_open:
            if self.finish(False) == FINISH:
                self._finished()
        else:
            self.on_client_lost()

    # -- events from the upstream connection --------------------------------------------
    def on_upstream_switched(self, conn: UpstreamConnection, leftover: bytes) -> None:
        """The instance switched protocols: both connections become one byte tunnel."""
        if conn is not self.conn or self.response_head is None:
            return
        self.conn = None
        conn.exchange = None
        transport = conn.transport
        assert transport is not None
        self.down.start_tunnel(transport, leftover)
        if self.switched():
            self._over_soon(DONE)

    def on_upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        outcome = self.upstream_lost()
        self.flush()
        if outcome != NO_OUTCOME:
            self._over_soon(outcome)

    def on_upstream_error(self, conn: UpstreamConnection, detail: str) -> None:
        if conn is not self.conn:
            return
        log.debug("event=upstream_protocol_error upstream=%s instance=%s error=%r",
                  self.runtime.name, conn.host.id, detail)
        self.conn = None
        if self.upstream_failed():
            self._over_soon(RESET)

    def on_upstream_paused(self, paused: bool) -> None:
        self.down.pause_for_upstream(paused)

    def on_request_timeout(self) -> None:
        conn = self.conn
        if self.request_timed_out():
            self.conn = None
            if conn is not None:
                conn.abort()
            self._over_soon(TIMEOUT)

    # -- events from the client connection ----------------------------------------------
    def on_client_lost(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()  # _on_connected ends the attempt
            return
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.abort()
        if self.resolve(ABORTED):
            self._over_soon(ABORTED)

    def on_client_paused(self, paused: bool) -> None:
        conn = self.conn
        if conn is not None and conn.transport is not None:
            if paused:
                conn.transport.pause_reading()
            else:
                conn.transport.resume_reading()

    def on_direct_write(self, size: int, own_status: int) -> None:
        """The client connection answered `own_status` itself (`size` bytes) while this
        exchange was current: what its access-log line says."""
        self.note_own_answer(own_status)

    # -- helpers ------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what this read of the instance produced for the client, in one write:
        a response head and its body usually arrive together and leave together."""
        out = self.out
        if out:
            self.out = []
            down = self.down
            transport = down.transport
            if not down.closed and transport is not None:
                data = out[0] if len(out) == 1 else b"".join(out)
                self.runtime.bytes_out += len(data)
                transport.write(data)


class LoggedExchange(Exchange):
    """An Exchange that writes its access-log line when it finishes.

    It counts what the plain Exchange never needs: request body bytes and bytes written
    to the client; the core keeps the failures and sdproxy's own answer (off the success
    path), which the record names.
    """

    __slots__ = ("began", "body_in", "bytes_out")

    # The overrides call Exchange's methods by name, not through super(): in CPython 3.11
    # a super() call costs about as much again as the call itself, on every request.
    def __init__(self, down: ClientSide, head: MessageHead, policy: ExchangePolicy,
                 loop: asyncio.AbstractEventLoop, now: float) -> None:
        Exchange.__init__(self, down, head, policy, loop, now)
        self.began = time.monotonic()  # the loop's clock counts whole milliseconds (uvloop)
        self.body_in = 0
        self.bytes_out = 0

    def on_client_body(self, data: bytes) -> None:
        self.body_in += len(data)
        Exchange.on_client_body(self, data)

    def flush(self) -> None:
        out = self.out
        if out and not self.down.closed:
            self.bytes_out += sum(map(len, out))
        Exchange.flush(self)

    def end_of_read(self) -> None:
        out = self.out
        if out and not self.down.closed:
            self.bytes_out += sum(map(len, out))
        Exchange.end_of_read(self)

    def on_direct_write(self, size: int, own_status: int) -> None:
        self.bytes_out += size
        Exchange.on_direct_write(self, size, own_status)

    def _finished(self) -> None:
        self.flush()  # an answer of sdproxy's own counts in the record
        access = self.down.access_log()
        if access is not None:  # a reload may have turned it off meanwhile
            access.add(self.record())  # before the connection's state moves on
        Exchange._finished(self)

    def record(self) -> Record:
        """This exchange's access-log record (see accesslog.Record)."""
        head = self.head
        response = self.response_head
        failures = self.failures or []
        status: int | None
        if self.own_status:
            status, instance = self.own_status, ""
        elif response is not None and self.response_started:
            status, instance = response.status, self.tried[-1].id
        else:
            status, instance = None, ""
        down = self.down
        if not self.own_status and (self.aborted or down.closed):
            failures = [*failures, CLIENT_CLOSED]
        # The head as received, counted as it is forwarded: request line, fields, CRLFs.
        head_size = len(head.method) + len(head.target) + 12
        for name, value in head.headers:
            head_size += len(name) + len(value) + 4
        return (time.time(), self.runtime.name, down.client_ip, down.client_port,
                head.method, head.target, status, head_size + 2 + self.body_in,
                self.bytes_out, time.monotonic() - self.began, instance, len(self.tried),
                ",".join(failures), self.request_id)
