"""One proxied HTTP request: pick an instance, send, relay the response, retry on failure.

Driven by callbacks, with no task of its own: `start()` picks an instance and sends on a
pooled connection at once; only opening a new connection runs a task (`connect`). From
then on everything happens in callbacks from the two connections: request body chunks
are written upstream as they arrive (or buffered while connecting, up to a high-water
mark), response bytes are written to the client once per read of the instance, and each
side's transport pauses the other when its buffer fills.

Each attempt ends exactly once (`_resolve`, or the connect task's callback) with DONE,
ABORTED or a failure kind (connect-failure, reset, timeout, or the status of a retried
5xx), handled by `_attempt_over` once the callback that reported it has returned (at the
end of the instance's read, or on the next loop turn): finish, retry on an untried
instance (`l7.exchange.may_retry`), or answer an error. `_finish` runs once.

With the access log on, the listener makes `LoggedExchange`s instead: they also count
bytes and failed attempts and hand a record to the access log at `_finish`. The plain
Exchange does none of that, so with the log off the request path does no access-log work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from proxy.l7.exchange import (
    BODY_HIGH_WATER,
    CONNECT_FAILURE,
    REPLAY_LIMIT,
    RESET,
    TIMEOUT,
    may_retry,
)
from proxy.l7.headers import (
    LAST_CHUNK,
    REASONS,
    chunk,
    encode_error,
    encode_interim,
    encode_request,
    encode_response,
    encode_switching,
    is_upgrade_request,
    next_request_id,
    request_id_of,
)
from proxy.l7.message import CHUNKED, HOST, NO_BODY, UNTIL_CLOSE, MessageHead
from proxy.protocols.http_upstream import UpstreamConnection, connect

if TYPE_CHECKING:
    from proxy.accesslog import Record
    from proxy.protocols.http import Destination, HttpDownstream
    from proxy.upstream.host import Host

log: Final = logging.getLogger("sdproxy.http")

INFINITY: Final = float("inf")
DONE: Final = "done"
ABORTED: Final = "aborted"

# The access log's `reason` for the statuses sdproxy answers itself, when no failed
# attempt explains them (a 502 or 504 after failed attempts is explained by those).
OWN_REASONS: Final[dict[int, str]] = {
    400: "bad-request",
    408: "client-timeout",
    431: "head-too-large",
    502: "internal-error",
    503: "no-instance",
    404: "no-route",
}
# sdproxy's own answers: a routed listener's 404 beside the l7 ones.
_OWN_PHRASES: Final[dict[int, bytes]] = {**REASONS, 404: b"Not Found"}
CLIENT_CLOSED: Final = "client-closed"  # the client left before its response was complete


class Exchange:
    __slots__ = (
        "attempt",
        "attempt_open",
        "attempt_started",
        "body_done",
        "body_log",
        "body_log_bytes",
        "body_sent",
        "cfg",
        "chunk_response",
        "chunked_request",
        "client_keep",
        "conn",
        "connecting",
        "deadline",
        "down",
        "finished",
        "head",
        "host",
        "loop",
        "out",
        "pending",
        "pending_bytes",
        "request_bytes",
        "request_id",
        "response_head",
        "response_started",
        "runtime",
        "settled",
        "started",
        "to",
        "tried",
        "upgrade",
    )

    def __init__(self, down: HttpDownstream, head: MessageHead, to: Destination) -> None:
        self.down = down
        self.head = head
        self.to = to  # the upstream this request goes to: the listener's, or its route's
        self.runtime = to.runtime
        self.cfg = to.cfg
        self.loop = down.loop
        self.body_done = head.framing == NO_BODY
        self.chunked_request = head.framing == CHUNKED
        self.pending: list[bytes] = []  # framed body chunks not yet written to `conn`
        self.pending_bytes = 0
        self.body_log: list[bytes] | None = []  # every framed chunk, while replayable
        self.body_log_bytes = 0
        self.body_sent = False  # some body bytes reached some instance
        self.conn: UpstreamConnection | None = None
        self.host: Host | None = None
        self.attempt = 0
        self.tried: list[Host] = []
        self.attempt_started = 0.0
        self.attempt_open = False  # an attempt's outcome is still to come
        self.connecting: asyncio.Task[UpstreamConnection] | None = None
        self.finished = False
        self.settled: str | None = None  # an outcome reported within a read of the instance
        self.deadline = INFINITY  # of the current attempt's response head
        self.response_head: MessageHead | None = None
        self.response_started = False
        self.chunk_response = False
        self.client_keep = head.keep_alive
        self.out: list[bytes] = []  # for the client, written once per read of the instance
        # A 101 hands both connections to a tunnel.
        self.upgrade = head.upgrade and is_upgrade_request(head)
        self.started = self.loop.time()
        request_id = request_id_of(head)
        added = b""
        if request_id is None:  # SPEC: one is added, whether or not the access log is on
            request_id = added = next_request_id()
        self.request_id = request_id
        self.request_bytes = encode_request(head, client_ip=down.client_ip,
                                            default_host=to.default_host,
                                            request_id=added)

    # -- the attempts, driven by callbacks -----------------------------------------------
    def start(self) -> None:
        """Begin the exchange (after the read that completed the request head)."""
        self.runtime.in_flight += 1
        try:
            self._next_attempt()
        except Exception:  # noqa: BLE001 -- _failed logs it
            self._failed()

    def settle(self) -> None:
        """Handle the outcome reported during the instance's read that just ended."""
        outcome = self.settled
        if outcome is not None:
            self.settled = None
            try:
                self._attempt_over(outcome)
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
        self.client_keep = False  # the connection closes after this
        if not self.response_started:
            self._respond_error(502, "internal error")
        self._finish(False)

    def _next_attempt(self) -> None:
        if self.finished:
            return
        if self.down.closed:
            self._finish(False)
            return
        rt = self.runtime
        tried = self.tried
        self.attempt += 1
        host = rt.pick(tried, self.to.hash_key(self.head, self.down.client_ip))
        if host is None:
            if self.to.unrouted:
                self._finish(self._respond_error(404, self._no_route()))
                return
            rt.no_host_responses += 1
            if tried:
                names = ", ".join(h.id for h in tried)
                keep = self._respond_error(502, f"no instance could be reached (tried {names})")
            else:
                keep = self._respond_error(503, "no passing instance")
            self._finish(keep)
            return
        tried.append(host)
        host.active += 1
        host.requests += 1
        self.host = host
        if len(tried) > 1:
            rt.retries_in_flight += 1
        conn = host.pool.take()
        if conn is not None:
            self._send(conn)  # type: ignore[arg-type]
            return
        cfg = self.cfg
        # Only a new connection needs a task; a pooled one is used from this callback.
        task = self.loop.create_task(connect(host, cfg.http_parser, cfg.max_header_size,
                                             cfg.max_header_count, cfg.connect_timeout,
                                             cfg.tls))
        self.connecting = task
        task.add_done_callback(self._on_connected)

    def _on_connected(self, task: asyncio.Task[UpstreamConnection]) -> None:
        self.connecting = None
        if task.cancelled():
            self._attempt_over(ABORTED)
            return
        exc = task.exception()
        if exc is not None:
            if not isinstance(exc, (OSError, TimeoutError)):
                log.error("event=connect_error upstream=%s error=%r", self.runtime.name, exc)
            if self.host is not None:
                self.host.on_failure()
            self._attempt_over(CONNECT_FAILURE)
            return
        conn = task.result()
        if self.down.closed or self.finished:
            conn.close()
            self._attempt_over(ABORTED)
            return
        if not conn.is_usable():
            # The instance closed the connection as soon as it accepted it: nothing was
            # sent, so this is a failed connect, retried for any method.
            conn.host.on_failure()
            self._attempt_over(CONNECT_FAILURE)
            return
        self._guarded(self._send, conn)

    def _send(self, conn: UpstreamConnection) -> None:
        self.attempt_open = True  # its outcome comes through _resolve
        self.conn = conn
        conn.attach(self, self.head.method, self.upgrade)
        self.response_head = None
        transport = conn.transport
        assert transport is not None
        if self.down.write_paused:
            transport.pause_reading()
        body = self.body_log if self.body_log is not None else self.pending
        if body:
            transport.write(b"".join((self.request_bytes, *body)))
            self.body_sent = True
        else:
            transport.write(self.request_bytes)
        if self.pending:
            self.pending = []
            self.pending_bytes = 0
            self.down.pause_for_body(False)
        if self.body_done:  # _request_sent(), written out: this runs once per request
            self.attempt_started = now = self.loop.time()
            self.deadline = now + self.cfg.request_timeout

    def _request_sent(self) -> None:
        """The whole request reached the instance: from now on, its answer is late after
        request_timeout (SPEC: a client still sending is never the instance's fault)."""
        self.attempt_started = now = self.loop.time()
        self.deadline = now + self.cfg.request_timeout  # the listener's sweep watches it

    def _attempt_over(self, outcome: str) -> None:
        """The current attempt ended with `outcome`: finish, retry, or answer an error."""
        self.deadline = INFINITY
        rt = self.runtime
        host = self.host
        if host is not None:
            self.host = None
            rt.release(host)
            if len(self.tried) > 1:
                rt.retries_in_flight -= 1
        if self.finished:
            return
        if outcome == DONE:
            rt.latency.observe(self.loop.time() - self.started)
            self._finish(self.client_keep)
            return
        self._note_failure(outcome)  # ABORTED (the client left) or a failure: not DONE
        if outcome == ABORTED:
            self._finish(False)
            return
        if self.response_started:  # failed mid-response: the client sees a cut body
            self.down.abort()
            self._finish(False)
            return
        cfg = self.cfg
        replayable = self.body_log is not None or not self.body_sent
        if (may_retry(outcome, method=self.head.method, replayable=replayable,
                      attempt=self.attempt, retries=cfg.retries,
                      retry_on=self.to.retry_on)
                and rt.has_untried(self.tried) and rt.retry_allowed(outcome)):
            rt.count_failover(outcome)
            self._guarded(self._next_attempt)
            return
        failed = host.id if host is not None else "?"
        if outcome == TIMEOUT:
            keep = self._respond_error(504, f"instance {failed} did not answer within "
                                            f"{cfg.request_timeout:g}s")
        else:
            keep = self._respond_error(502, f"instance {failed} failed: {outcome}")
        self._finish(keep)

    def _finish(self, keep: bool) -> None:
        if self.finished:
            return
        self.finished = True
        self.runtime.in_flight -= 1
        self.deadline = INFINITY
        if self.connecting is not None:
            self.connecting.cancel()
        if self.conn is not None:
            self.conn.abort()
            self.conn = None
        self.down.on_exchange_done(self, keep)

    # -- request body from the client ---------------------------------------------------
    def on_client_body(self, data: bytes) -> None:
        framed = chunk(data) if self.chunked_request else data
        self._add_body(framed)

    def on_client_end(self) -> None:
        if self.chunked_request:
            self._add_body(LAST_CHUNK)
        self.body_done = True
        if self.conn is not None and self.attempt_open and self.response_head is None:
            self._request_sent()

    def on_client_stalled(self) -> None:
        """The client sent no byte of its request for idle_timeout: 408, and the instance
        is not charged for it."""
        self.client_keep = False
        self._respond_error(408, f"request not complete: nothing received for "
                                 f"{self.cfg.idle_timeout:g}s")
        if self.connecting is None and not self.attempt_open:
            self._finish(False)
        else:
            self.on_client_lost()

    def _add_body(self, framed: bytes) -> None:
        log_ = self.body_log
        if log_ is not None:
            self.body_log_bytes += len(framed)
            if self.body_log_bytes > REPLAY_LIMIT:
                self.body_log = None
            else:
                log_.append(framed)
        conn = self.conn
        if conn is not None and conn.transport is not None and self.response_head is None:
            conn.transport.write(framed)
            self.body_sent = True
        elif conn is None:
            self.pending.append(framed)
            self.pending_bytes += len(framed)
            if self.pending_bytes > BODY_HIGH_WATER:
                self.down.pause_for_body(True)

    # -- events from the upstream connection --------------------------------------------
    def on_response_head(self, conn: UpstreamConnection, head: MessageHead) -> None:
        if conn is not self.conn:
            return
        if 100 <= head.status < 200 and head.status != 101:
            # RFC 9110 section 15.2: no 1xx to an HTTP/1.0 client.
            if not self.response_started and self.head.version == b"1.1":
                self.out.append(encode_interim(head))
            return
        self.deadline = INFINITY
        now = self.down.last_activity = self.loop.time()
        host = conn.host
        host.record_latency(now - self.attempt_started, now)
        status = head.status
        if status == 101:
            if not self.upgrade or self.response_started:
                self.on_upstream_error(conn, "101 without an upgrade on offer")
                conn.close()
                return
            host.on_success(101)
            self.response_head = head
            self.response_started = True
            self.runtime.count_response(101)
            switching = encode_switching(head)
            self.down.write(switching)
            self.on_direct_write(len(switching), 0)
            return  # the tunnel starts with on_upstream_switched
        key = str(status) if status >= 500 else ""
        if key and key in self.to.retry_on:
            host.on_failure(status)
            replayable = self.body_log is not None or not self.body_sent
            if (may_retry(key, method=self.head.method, replayable=replayable,
                          attempt=self.attempt, retries=self.cfg.retries,
                          retry_on=self.to.retry_on)
                    and self.runtime.has_untried(self.tried)
                    and self.runtime.retry_allowed(key)):
                self.conn = None
                conn.exchange = None
                conn.close()
                self._resolve(key, settle_after_read=True)
                return
        else:
            host.on_success(status)
        self.response_head = head
        if not self.body_done or self.upgrade:
            # The client is still sending a body nobody reads, or offered a protocol the
            # instance declined: bytes after this request are not HTTP we can trust.
            self.client_keep = False
        data, self.chunk_response, self.client_keep = encode_response(
            head, request_version=self.head.version, request_keep_alive=self.client_keep)
        self.response_started = True
        responses = self.runtime.responses  # count_response(status), written out: per request
        responses[status] = responses.get(status, 0) + 1
        self.out.append(data)

    def on_response_body(self, data: bytes) -> None:
        self.down.last_activity = self.loop.time()
        if self.response_started:
            self.out.append(chunk(data) if self.chunk_response else data)

    def on_response_end(self, conn: UpstreamConnection) -> None:
        if conn is not self.conn or self.response_head is None or self.response_head.status == 101:
            return
        if self.chunk_response:
            self.out.append(LAST_CHUNK)
        self.conn = None
        conn.exchange = None  # what the instance sends after this is owed to nobody
        head = self.response_head
        if not (head.keep_alive and self.body_done and head.framing != UNTIL_CLOSE
                and conn.park()):
            conn.close()
        self._resolve(DONE, settle_after_read=True)

    def on_upstream_switched(self, conn: UpstreamConnection, leftover: bytes) -> None:
        """The instance switched protocols: both connections become one byte tunnel."""
        if conn is not self.conn or self.response_head is None:
            return
        self.conn = None
        conn.exchange = None
        transport = conn.transport
        assert transport is not None
        self.down.start_tunnel(transport, leftover)
        self._resolve(DONE)

    def on_upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        if conn is not self.conn:
            return
        self.conn = None
        head = self.response_head
        if head is not None and head.framing == UNTIL_CLOSE:
            if self.chunk_response:
                self.out.append(LAST_CHUNK)
            self.flush()
            self._resolve(DONE)  # the close is the end of such a body (RFC 9112 6.3)
            return
        conn.host.on_failure()
        self._resolve(RESET)

    def on_upstream_error(self, conn: UpstreamConnection, detail: str) -> None:
        if conn is not self.conn:
            return
        log.debug("event=upstream_protocol_error upstream=%s instance=%s error=%r",
                  self.runtime.name, conn.host.id, detail)
        self.conn = None
        conn.host.on_failure()
        self._resolve(RESET)

    def on_upstream_paused(self, paused: bool) -> None:
        self.down.pause_for_upstream(paused)

    def on_request_timeout(self) -> None:
        self.deadline = INFINITY
        conn = self.conn
        if conn is None or self.response_head is not None:
            return
        self.conn = None
        conn.host.on_failure()
        conn.abort()
        self._resolve(TIMEOUT)

    # -- events from the client connection ----------------------------------------------
    def on_client_lost(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()  # _on_connected ends the attempt
            return
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.abort()
        self._resolve(ABORTED)

    def on_client_paused(self, paused: bool) -> None:
        conn = self.conn
        if conn is not None and conn.transport is not None:
            if paused:
                conn.transport.pause_reading()
            else:
                conn.transport.resume_reading()

    # -- helpers ------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what this read of the instance produced for the client, in one write:
        a response head and its body usually arrive together and leave together."""
        out = self.out
        if out:
            self.out = []
            down = self.down
            if not down.closed and down.transport is not None:
                data = out[0] if len(out) == 1 else b"".join(out)
                self.runtime.bytes_out += len(data)
                down.transport.write(data)

    def _resolve(self, outcome: str, settle_after_read: bool = False) -> None:
        """End the current attempt once. Never handled inside the parser or protocol
        callback that reported it: from inside the instance's parser, once its read ends
        (`settle`); from elsewhere, on the next loop turn."""
        self.deadline = INFINITY
        if self.attempt_open:
            self.attempt_open = False
            if settle_after_read:
                self.settled = outcome
            else:
                self.loop.call_soon(self._guarded, self._attempt_over, outcome)

    def _respond_error(self, status: int, detail: str) -> bool:
        keep = self.client_keep and self.body_done
        self.runtime.count_response(status)
        answer = encode_error(status, _OWN_PHRASES[status], self.runtime.name, detail, keep)
        self.down.write(answer)
        self.response_started = True
        self.on_direct_write(len(answer), status)
        return keep

    def _no_route(self) -> str:
        host = host_field(self.head)
        shown = "(none)" if host is None else host.decode("latin-1")
        return (f"no route for host {shown} and path "
                f"{self.head.target[:200].decode('latin-1')}")

    # Hooks for LoggedExchange, called off the success path only; nothing here.
    def on_direct_write(self, size: int, own_status: int) -> None:
        """`size` bytes went to the client outside `flush`: sdproxy's own answer (its
        `own_status`), or a 101 head (0)."""

    def _note_failure(self, outcome: str) -> None:
        """An attempt ended otherwise than DONE."""


class LoggedExchange(Exchange):
    """An Exchange that writes its access-log line when it finishes.

    It counts what the plain Exchange never needs: request body bytes, bytes written to
    the client, the outcome of each failed attempt, the status of sdproxy's own answer.
    """

    __slots__ = ("aborted", "began", "body_in", "bytes_out", "failures", "own_status")

    # The overrides call Exchange's methods by name, not through super(): in CPython 3.11
    # a super() call costs about as much again as the call itself, on every request.
    def __init__(self, down: HttpDownstream, head: MessageHead, to: Destination) -> None:
        Exchange.__init__(self, down, head, to)
        self.began = time.monotonic()  # the loop's clock counts whole milliseconds (uvloop)
        self.body_in = 0
        self.bytes_out = 0
        self.failures: list[str] = []  # outcomes of failed attempts, in order
        self.own_status = 0  # the status of an answer sdproxy made itself
        self.aborted = False

    def on_client_body(self, data: bytes) -> None:
        self.body_in += len(data)
        Exchange.on_client_body(self, data)

    def flush(self) -> None:
        out = self.out
        if out and not self.down.closed:
            self.bytes_out += sum(map(len, out))
        Exchange.flush(self)

    def on_direct_write(self, size: int, own_status: int) -> None:
        self.bytes_out += size
        if own_status:
            self.own_status = own_status
            if own_status in (502, 504) and self.failures:
                return  # explained by the failed attempts
            self.failures.append(OWN_REASONS.get(own_status, str(own_status)))

    def _note_failure(self, outcome: str) -> None:
        if outcome == ABORTED:
            self.aborted = True
        else:
            self.failures.append(outcome)

    def _finish(self, keep: bool) -> None:
        if self.finished:
            return
        access = self.down.listener.access
        if access is not None:  # a reload may have turned it off meanwhile
            access.add(self.record())  # before the connection's state moves on
        Exchange._finish(self, keep)

    def record(self) -> Record:
        """This exchange's access-log record (see accesslog.Record)."""
        head = self.head
        response = self.response_head
        failures = self.failures
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


_HOST_NAME: Final = b"host"


def host_field(head: MessageHead) -> bytes | None:
    """The request's Host value; None when it has none (an HTTP/1.0 request may not)."""
    kinds = head.kinds
    if kinds is not None and not kinds & HOST:
        return None
    for name, value in head.headers:
        if len(name) == 4 and name.lower() == _HOST_NAME:
            return value
    return None
