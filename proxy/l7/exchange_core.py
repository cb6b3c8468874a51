"""The state and decisions of one proxied HTTP exchange, with no I/O: `ExchangeCore`.

Owns everything about one request that does not touch a socket or the event loop: the
instance picked for each attempt (through the UpstreamRuntime it is handed), the replay
buffer and the body held while connecting, the framing of both directions, the retry
decision, the tunnel switch and the error sdproxy answers with. In the manner of h11's
`Connection`, a driver (protocols/http_exchange.py) reports events to it, with the time
read once by the caller (`now`), and carries out what each returns:

- an action code (`ATTEMPT`, `FINISH`, `RETRY`, ...: plain ints, no allocation), or
- bytes to write to the instance (None: nothing to write now),

and bytes for the client queue up in `out`, which the driver writes once per read of the
instance. Each attempt ends exactly once: `resolve` marks the end (the driver hands the
outcome back to `attempt_over` outside the callback that reported it), and
`attempt_over` decides: finish, retry on an untried instance, or answer an error.

The driver subclasses this class (one object per request, calls bound by mypyc); the
tests drive it directly with in-memory fakes (tests/unit/test_exchange_core.py).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Final

from proxy.l7.exchange import BODY_HIGH_WATER, REPLAY_LIMIT
from proxy.l7.hashkey import KeyFunction, key_function
from proxy.l7.headers import (
    LAST_CHUNK,
    PROTO_HTTP,
    PROTO_HTTPS,
    REASONS,
    chunk,
    encode_error,
    encode_interim,
    encode_request,
    encode_response,
    encode_switching,
    host_field,
    is_upgrade_request,
    next_request_id,
    request_id_of,
)
from proxy.l7.message import CHUNKED, NO_BODY, UNTIL_CLOSE, MessageHead
from proxy.outcomes import (
    ABORTED,
    BY_STATUS,
    DONE,
    LABELS,
    RESET,
    STATUS_502,
    TIMEOUT,
)
from proxy.upstream.host import Host
from proxy.upstream.manager import LATENCY_BUCKETS, UpstreamRuntime

INFINITY: Final = float("inf")

# How an attempt ended: proxy.outcomes' codes (DONE, RESET, STATUS_503, ...), or none yet.
NO_OUTCOME: Final = -1  # `settled` when no outcome waits

# What the driver does after an event (returned by the event methods).
NOTHING: Final = 0
ATTEMPT: Final = 1  # connect to `host` (or take one of its pooled connections) and send
FINISH: Final = 2  # write `out` to the client, then hand the connection back (`client_keep`)
RETRY: Final = 3  # the attempt failed and is retried: begin the next attempt
ABORT_CLIENT: Final = 4  # cut the client's connection (a response failed midway), finish
FORWARD: Final = 5  # a response head was accepted: its body follows
SWITCH: Final = 6  # a 101 was accepted: the tunnel starts after this read
REJECT: Final = 7  # the instance broke the protocol: close its connection (a reset)
RETRY_5XX: Final = 8  # a retried 5xx: close the instance's connection unread
PARK: Final = 9  # the response ended: the connection may go back to the pool
CLOSE: Final = 10  # the response ended: the connection must be closed

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


class ExchangePolicy:
    """What an exchange needs from its upstream's configuration, built once per upstream
    (and per reload), not per request: the runtime it works for and the limits."""

    __slots__ = ("default_host", "hash_key", "idle_timeout", "proto_line", "request_timeout",
                 "runtime", "unrouted")

    def __init__(self, runtime: UpstreamRuntime, unrouted: bool = False,
                 client_tls: bool = False) -> None:
        cfg = runtime.config
        self.runtime = runtime
        # Clients of this listener came over TLS (it terminates it): X-Forwarded-Proto says
        # https when the client sent none.
        self.proto_line = PROTO_HTTPS if client_tls else PROTO_HTTP
        # A routed listener's own policy, handed to a request that matched no route: it is
        # answered 404 before any attempt (its runtime has no instances to try).
        self.unrouted = unrouted
        self.request_timeout: float = cfg.request_timeout
        self.idle_timeout: float = cfg.idle_timeout
        # None unless a hash balancer needs a key: most requests make no call for it.
        self.hash_key: KeyFunction | None = (key_function(cfg.balance, cfg.hash_key)
                                             if cfg.balance == "hash" else None)
        self.default_host = runtime.name.encode()  # Host for an HTTP/1.0 request without one


class ExchangeCore:
    __slots__ = (
        "aborted",
        "attempt_open",
        "attempt_started",
        "body_done",
        "body_log",
        "body_log_bytes",
        "body_sent",
        "chunk_response",
        "chunked_request",
        "client_ip",
        "client_keep",
        "connected",
        "deadline",
        "failures",
        "finished",
        "head",
        "host",
        "out",
        "own_status",
        "pending",
        "pending_bytes",
        "policy",
        "read_at",
        "request_bytes",
        "request_id",
        "response_head",
        "response_started",
        "runtime",
        "settled",
        "started",
        "tried",
        "upgrade",
    )

    def __init__(self, policy: ExchangePolicy, head: MessageHead, client_ip: bytes,
                 now: float) -> None:
        self.policy = policy
        self.runtime = policy.runtime
        self.head = head
        self.client_ip = client_ip
        self.body_done = head.framing == NO_BODY
        self.chunked_request = head.framing == CHUNKED
        self.pending: list[bytes] = []  # framed body chunks not yet written to an instance
        self.pending_bytes = 0
        self.body_log: list[bytes] | None = []  # every framed chunk, while replayable
        self.body_log_bytes = 0
        self.body_sent = False  # some body bytes reached some instance
        self.connected = False  # the current attempt has a connection to write to
        self.host: Host | None = None
        self.tried: list[Host] = []
        self.attempt_started = 0.0
        self.attempt_open = False  # an attempt's outcome is still to come
        self.finished = False
        self.settled = NO_OUTCOME  # an outcome reported within a read of the instance
        self.deadline = INFINITY  # of the current attempt's response head
        self.response_head: MessageHead | None = None
        self.response_started = False
        self.chunk_response = False
        # Whether the client connection may stay open after this response; once
        # `finished`, whether it does.
        self.client_keep = head.keep_alive
        self.out: list[bytes] = []  # for the client, written once per read of the instance
        # A 101 hands both connections to a tunnel.
        self.upgrade = head.upgrade and is_upgrade_request(head)
        self.started = now
        policy.runtime.in_flight += 1  # until `finish`, which runs exactly once
        self.read_at = now  # when the instance's read being handled was read (its clock)
        # Off the success path: what the access log says of failures.
        self.failures: list[str] | None = None  # failed attempts and own answers, in order
        self.own_status = 0  # the status of an answer sdproxy made itself
        self.aborted = False
        request_id = request_id_of(head)
        added = b""
        if request_id is None:  # SPEC: one is added, whether or not the access log is on
            request_id = added = next_request_id()
        self.request_id = request_id
        self.request_bytes = encode_request(head, client_ip=client_ip,
                                            default_host=policy.default_host,
                                            request_id=added, proto_line=policy.proto_line)

    # -- attempts -----------------------------------------------------------------------
    def begin_attempt(self) -> int:
        """Pick an untried instance: ATTEMPT (it is `host`), or FINISH with an error in
        `out` when none is left (503 if none was tried, else 502)."""
        tried = self.tried
        policy = self.policy
        if policy.unrouted:
            return self.finish(self.answer_error(404, self._no_route()))
        hash_key = policy.hash_key
        host = self.runtime.begin_attempt(
            tried, None if hash_key is None else hash_key(self.head, self.client_ip))
        if host is None:
            if tried:
                names = ", ".join(h.id for h in tried)
                keep = self.answer_error(502, f"no instance could be reached (tried {names})")
            else:
                keep = self.answer_error(503, "no passing instance")
            return self.finish(keep)
        self.host = host
        return ATTEMPT

    def request_data(self, now: float) -> bytes:
        """A connection for the current attempt is ready: what to write on it (the head,
        and the body received so far). From now on the attempt's outcome must come."""
        self.attempt_open = True
        self.connected = True
        self.response_head = None
        body = self.body_log if self.body_log is not None else self.pending
        data = self.request_bytes
        if body:
            data = b"".join((data, *body))
            self.body_sent = True
        if self.pending:
            self.pending = []
            self.pending_bytes = 0
        if self.body_done:  # the whole request goes now: its answer is due from now on
            self.attempt_started = now
            self.deadline = now + self.policy.request_timeout
        return data

    def resolve(self, outcome: int, settle_after_read: bool = False) -> bool:
        """End the current attempt once, with `outcome`. Never decided inside the
        callback that reported it: within the instance's read, `settled` keeps it for the
        driver to settle when the read ends; otherwise True asks the driver to call
        `attempt_over` on the next loop turn."""
        self.deadline = INFINITY
        self.connected = False
        if self.attempt_open:
            self.attempt_open = False
            if settle_after_read:
                self.settled = outcome
                return False
            return True
        return False

    def attempt_over(self, outcome: int, now: float) -> int:
        """The current attempt ended with `outcome`: FINISH, RETRY, ABORT_CLIENT or
        NOTHING (the exchange had finished already)."""
        self.deadline = INFINITY
        rt = self.runtime
        host = self.host
        if host is not None:
            self.host = None
            rt.end_attempt(host, self.tried)
        if self.finished:
            return NOTHING
        if outcome == DONE:
            # rt.latency.observe(now - self.started), written out: once per request
            latency = rt.latency
            seconds = now - self.started
            latency.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            latency.total += seconds
            latency.count += 1
            # finish(self.client_keep), written out: this runs once per request
            self.finished = True
            rt.in_flight -= 1
            self.connected = False
            return FINISH
        self._note_failure(outcome)
        if outcome == ABORTED:
            return self.finish(False)
        if self.response_started:  # failed mid-response: the client sees a cut body
            self.finish(False)
            return ABORT_CLIENT
        # A retried 5xx gets here only after should_retry said yes when its head came.
        if outcome >= STATUS_502 or rt.should_retry(outcome, self.head.method,
                                                    self.replayable(), self.tried):
            return RETRY
        failed = host.id if host is not None else "?"
        if outcome == TIMEOUT:
            keep = self.answer_error(504, f"instance {failed} did not answer within "
                                          f"{self.policy.request_timeout:g}s")
        else:
            keep = self.answer_error(502, f"instance {failed} failed: {LABELS[outcome]}")
        return self.finish(keep)

    def replayable(self) -> bool:
        """Whether the request can be sent again: its body is all kept, or none was sent."""
        return self.body_log is not None or not self.body_sent

    def finish(self, keep: bool) -> int:
        """End the exchange (once): the driver writes `out`, releases the connections
        and hands the client connection back, kept open if `keep`."""
        if self.finished:
            return NOTHING
        self.finished = True
        self.client_keep = keep
        self.runtime.in_flight -= 1
        self.deadline = INFINITY
        self.connected = False
        return FINISH

    def internal_error(self) -> int:
        """A bug in handling this request: 502 if nothing was answered yet; the client
        connection closes after it."""
        self.client_keep = False
        if not self.response_started:
            self.answer_error(502, "internal error")
        return self.finish(False)

    # -- the request body, from the client ----------------------------------------------
    def client_body(self, data: bytes) -> bytes | None:
        """Request body bytes: what to write to the instance now, if anything (else they
        are held while connecting; past BODY_HIGH_WATER `holds_too_much` says to stop
        reading the client)."""
        return self._add_body(chunk(data) if self.chunked_request else data)

    def client_end(self, now: float) -> bytes | None:
        """The request ended: its last bytes for the instance, if any."""
        data = self._add_body(LAST_CHUNK) if self.chunked_request else None
        self.body_done = True
        if self.connected and self.attempt_open and self.response_head is None:
            # The whole request reached the instance: from now on, its answer is late
            # after request_timeout (SPEC: a client still sending is never its fault).
            self.attempt_started = now
            self.deadline = now + self.policy.request_timeout
        return data

    def _add_body(self, framed: bytes) -> bytes | None:
        log_ = self.body_log
        if log_ is not None:
            self.body_log_bytes += len(framed)
            if self.body_log_bytes > REPLAY_LIMIT:
                self.body_log = None
            else:
                log_.append(framed)
        if self.connected:
            if self.response_head is None:
                self.body_sent = True
                return framed
            return None  # answered already: the rest of the body is read and dropped
        self.pending.append(framed)
        self.pending_bytes += len(framed)
        return None

    def holds_too_much(self) -> bool:
        """The body held while connecting grew past BODY_HIGH_WATER: stop the client."""
        return self.pending_bytes > BODY_HIGH_WATER

    def client_stalled(self) -> None:
        """The client sent no byte of its request for idle_timeout: 408 (in `out`), and
        the instance is not charged for it."""
        self.client_keep = False
        self.answer_error(408, "request not complete: nothing received for "
                               f"{self.policy.idle_timeout:g}s")

    # -- the response, from the instance ------------------------------------------------
    def response_head_received(self, head: MessageHead, now: float) -> int:
        """A response head: NOTHING (a 1xx, relayed to an HTTP/1.1 client), FORWARD,
        SWITCH (a 101 to an Upgrade offer), REJECT (a 101 nobody offered) or RETRY_5XX (a
        listed 5xx that is retried: the attempt is over, settled after this read)."""
        status = head.status
        if 100 <= status < 200 and status != 101:
            # RFC 9110 section 15.2: no 1xx to an HTTP/1.0 client.
            if not self.response_started and self.head.version == b"1.1":
                self.out.append(encode_interim(head))
            return NOTHING
        self.deadline = INFINITY
        host = self.host
        assert host is not None
        if status == 101:
            host.record_latency(now - self.attempt_started, now)
            if not self.upgrade or self.response_started:
                return REJECT
            host.on_success(101)
            self.response_head = head
            self.response_started = True
            self.runtime.count_response(101)
            self.out.append(encode_switching(head))
            return SWITCH
        code = BY_STATUS.get(status, 0) if status >= 500 else 0
        if code and self.runtime.retry_on >> code & 1:  # a 5xx listed in retry_on
            host.record_latency(now - self.attempt_started, now)
            host.on_failure(status)
            if self.runtime.should_retry(code, self.head.method, self.replayable(),
                                         self.tried):
                self.resolve(code, settle_after_read=True)
                return RETRY_5XX
        else:  # record_latency and on_success in one call
            host.answered(status, now - self.attempt_started, now)
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
        return FORWARD

    def response_body(self, data: bytes) -> None:
        if self.response_started:
            self.out.append(chunk(data) if self.chunk_response else data)

    def response_end(self) -> int:
        """The response ended: PARK its connection if it may carry another request (the
        driver closes it if the pool refuses), else CLOSE; the attempt is DONE once this
        read ends. NOTHING for the end of a 101 head (the tunnel follows)."""
        head = self.response_head
        if head is None or head.status == 101:
            return NOTHING
        if self.chunk_response:
            self.out.append(LAST_CHUNK)
        # resolve(DONE, settle_after_read=True), written out: this runs once per request
        self.deadline = INFINITY
        self.connected = False
        if self.attempt_open:
            self.attempt_open = False
            self.settled = DONE
        if head.keep_alive and self.body_done and head.framing != UNTIL_CLOSE:
            return PARK
        return CLOSE

    def switched(self) -> bool:
        """The instance switched protocols and both connections became a tunnel: the
        attempt is DONE (True: the driver calls `attempt_over` next loop turn)."""
        return self.resolve(DONE)

    def upstream_lost(self) -> int:
        """The instance's connection closed under the attempt. A body framed by the close
        ends with it (RFC 9112 section 6.3: DONE); otherwise a RESET, charged to the
        instance. The outcome for the driver to hand to `attempt_over` next loop turn, or
        NO_OUTCOME when no attempt was open."""
        head = self.response_head
        if head is not None and head.framing == UNTIL_CLOSE:
            if self.chunk_response:
                self.out.append(LAST_CHUNK)
            return DONE if self.resolve(DONE) else NO_OUTCOME
        return RESET if self.upstream_failed() else NO_OUTCOME

    def upstream_failed(self) -> bool:
        """The instance broke the protocol or reset: a RESET charged to it."""
        host = self.host
        if host is not None:
            host.on_failure()
        return self.resolve(RESET)

    def connect_failed(self) -> None:
        """The connection for the current attempt could not be made (or closed at once):
        charged to the instance; the driver calls `attempt_over(CONNECT_FAILURE)`."""
        host = self.host
        if host is not None:
            host.on_failure()

    def request_timed_out(self) -> bool:
        """The deadline for the response head passed: True if an attempt was waiting for
        one (then the driver aborts its connection and, next loop turn, `attempt_over`)."""
        self.deadline = INFINITY
        if not self.connected or self.response_head is not None:
            return False
        host = self.host
        if host is not None:
            host.on_failure()
        return self.resolve(TIMEOUT)

    # -- answers sdproxy makes itself ----------------------------------------------------
    def answer_error(self, status: int, detail: str) -> bool:
        """Queue sdproxy's own answer `status` for the client; whether the client's
        connection may stay open after it."""
        keep = self.client_keep and self.body_done
        self.runtime.count_response(status)
        self.out.append(encode_error(status, REASONS[status], self.runtime.name, detail, keep))
        self.response_started = True
        self.note_own_answer(status)
        return keep

    def _no_route(self) -> str:
        host = host_field(self.head)
        shown = "(none)" if host is None else host.decode("latin-1")
        return f"no route for host {shown} and path {self.head.target[:200].decode('latin-1')}"

    def note_own_answer(self, status: int) -> None:
        """sdproxy answered `status` itself (here, or the client connection did)."""
        self.own_status = status
        if status in (502, 504) and self.failures:
            return  # explained by the failed attempts
        self._note(OWN_REASONS.get(status, str(status)))

    def _note_failure(self, outcome: int) -> None:
        if outcome == ABORTED:
            self.aborted = True
        else:
            self._note(LABELS[outcome])

    def _note(self, reason: str) -> None:
        failures = self.failures
        if failures is None:
            self.failures = [reason]
        else:
            failures.append(reason)
