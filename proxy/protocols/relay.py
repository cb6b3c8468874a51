"""A bidirectional byte pipe between two connected asyncio transports.

Owns, for one pair of transports (A and B), moving bytes unchanged both ways once both are
connected: TCP mode relays a client to an instance with it, and the HTTP Upgrade tunnel
can hand over a client and an upstream connection the same way (`Relay.start` takes the
bytes and EOF each side delivered before the hand-over). It knows nothing of listeners,
hosts or retries: its owner learns the end through `on_done`.

Invariants:
- Backpressure both ways, with named limits (uvicorn's flow_control.py): each transport's
  write buffer is capped at HIGH_WATER; when the sink's transport calls `pause_writing`
  the source stops being read until `resume_writing`. So a peer that stops reading costs
  at most about HIGH_WATER plus one read (uvloop reads up to 250 KB) per direction.
- Half-close (RFC 9293 3.6): EOF from one side becomes `write_eof()` on the other
  (after what is buffered); the other direction goes on. When both directions ended the
  transports are closed.
- A close of one side closes the other after flushing what was already accepted; an
  error (reset) aborts the other with a reset (SO_LINGER 0), so the peer sees a failure
  rather than a clean end: a bare `transport.abort()` closes the descriptor, which sends
  a FIN when nothing is left unread, and a cut stream would look whole.
- idle_timeout: no byte in either direction for that long aborts both. One timer per
  relay, re-armed lazily from the time of the last chunk (never one timer per chunk).
- `on_done(relay)` is called exactly once, when both transports are lost, unless the
  relay was handed over (`hand_over`): then its new owner answers for both transports.
- `on_bulk(relay)`, when given, is called after a read of at least BULK_READ bytes: the
  source had a backlog. Its owner may then hand the connection over to a faster mover
  (TCP mode: splice.py); the relay only says when that is possible (`can_hand_over`).
- A transport that reported EOF is never resumed: uvloop must not read past EOF.
- `traffic`, when given, counts the bytes the relay reads: A (the client) -> B in
  `bytes_in`, B -> A in `bytes_out`. What was read before `start` is the owner's to count.
The data path does one write, one clock read, one length test and one addition per
chunk: no logging, no copies, no timers.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Protocol, cast

# Write buffer of each transport, in bytes, before it pauses the opposite reader. uvloop
# and asyncio both default to 64 KiB; 256 KiB keeps a fast loopback transfer streaming
# while still bounding what a client that stops reading can pin in memory.
HIGH_WATER = 256 * 1024
LOW_WATER = HIGH_WATER // 4
# A read this large means the source had a backlog: a bulk transfer (uvloop reads up to
# 256000 bytes at once; interactive traffic comes in far smaller pieces).
BULK_READ = 64 * 1024
# Bytes a `Holding` protocol keeps (e.g. what a client sends while its instance is being
# connected) before it stops reading its transport.
HOLD_HIGH_WATER = 256 * 1024
RESET_LINGER = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


class Traffic(Protocol):
    """Where relayed bytes are counted (an UpstreamRuntime): from and to the client."""

    bytes_in: int
    bytes_out: int


class _Uncounted:
    """Traffic for a relay whose owner does not count."""

    __slots__ = ("bytes_in", "bytes_out")

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0


def abort_with_reset(transport: asyncio.Transport) -> None:
    """Abort `transport` so that its peer gets a reset (RST), not a clean FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_LINGER)
        except OSError:
            pass  # not a TCP socket, or already gone: a plain abort then
    transport.abort()


def keeps_open_after_eof(transport: asyncio.BaseTransport | None) -> bool:
    """What `eof_received` answers: keep a half-closed plain TCP transport open; a TLS one
    cannot be (TLS has no half-close: the transport closes after the peer's close_notify,
    and uvloop logs a warning line for every True it ignores)."""
    return transport is not None and transport.get_extra_info("sslcontext") is None


class Holding(asyncio.Protocol):
    """Keeps what a transport delivers (bytes, EOF, loss) until a Relay takes it over.

    Reading stops once HOLD_HIGH_WATER bytes are held. Subclasses hook `on_lost`.
    """

    __slots__ = ("eof", "held", "held_bytes", "lost", "lost_exc", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.eof = False
        self.lost = False
        self.lost_exc: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.held.append(data)
        self.held_bytes += len(data)
        if self.held_bytes >= HOLD_HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        # Keep the transport: the other direction may still have bytes. A TLS transport
        # closes after EOF whatever we answer (uvloop warns on True), so say False there.
        return keeps_open_after_eof(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_exc = exc
        self.on_lost(exc)

    def on_lost(self, exc: Exception | None) -> None:
        """Hook for subclasses: the transport closed before a Relay took it over."""


class _End(asyncio.Protocol):
    """The protocol of one transport while relayed: forwards to the opposite end."""

    __slots__ = ("eof", "inbound", "lost", "peer", "relay", "transport", "write_paused")

    def __init__(self, relay: Relay, transport: asyncio.Transport, *, inbound: bool) -> None:
        self.relay = relay
        self.transport = transport
        self.inbound = inbound  # this is the client's side: what it reads comes in
        self.peer: _End = self  # set by Relay once both ends exist
        self.eof = False  # this side sent EOF (it is not read any more)
        self.lost = False
        self.write_paused = False  # this transport's write buffer is past HIGH_WATER

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay.closed:
            return
        relay.last_activity = relay.loop.time()
        if self.inbound:
            relay.traffic.bytes_in += len(data)
        else:
            relay.traffic.bytes_out += len(data)
        self.peer.transport.write(data)
        if relay.on_bulk is not None and len(data) >= BULK_READ:
            relay.on_bulk(relay)

    def eof_received(self) -> bool:
        self.eof = True
        self.relay.on_eof(self)
        return keeps_open_after_eof(self.transport)  # the opposite direction goes on

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay.on_lost(self, exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        peer = self.peer
        if not peer.eof and not peer.lost:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        peer = self.peer
        if not peer.eof and not peer.lost and not self.relay.closed:
            peer.transport.resume_reading()


class Relay:
    """Relays bytes between transports `a` and `b` from `start()` until both are lost."""

    __slots__ = ("a", "b", "closed", "done", "idle_timeout", "last_activity", "loop",
                 "on_bulk", "on_done", "timer", "traffic")

    def __init__(self, loop: asyncio.AbstractEventLoop, a: asyncio.Transport,
                 b: asyncio.Transport, *, idle_timeout: float,
                 on_done: Callable[[Relay], None] | None = None,
                 on_bulk: Callable[[Relay], None] | None = None,
                 traffic: Traffic | None = None) -> None:
        self.loop = loop
        self.a = _End(self, a, inbound=True)
        self.b = _End(self, b, inbound=False)
        self.traffic: Traffic = traffic if traffic is not None else _Uncounted()
        self.a.peer = self.b
        self.b.peer = self.a
        self.idle_timeout = idle_timeout
        self.on_done = on_done
        self.on_bulk = on_bulk
        self.closed = False  # closing started: no more bytes are relayed
        self.done = False  # both transports are lost; on_done was called
        self.last_activity = loop.time()
        self.timer: asyncio.TimerHandle | None = None

    def start(self, *, a_data: Iterable[bytes] = (), a_eof: bool = False,
              b_data: Iterable[bytes] = (), b_eof: bool = False) -> None:
        """Take both transports over. `x_data`/`x_eof`: what side x delivered before."""
        ends = (self.a, self.b)
        for end in ends:
            end.transport.set_protocol(end)
        for end in ends:
            # Limits after set_protocol: exceeding them notifies the protocol in place.
            end.transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
            end.write_paused = end.transport.get_write_buffer_size() > HIGH_WATER
        for end, data, eof in ((self.a, a_data, a_eof), (self.b, b_data, b_eof)):
            chunks = list(data)
            if chunks:
                end.peer.transport.writelines(chunks)
            if eof:
                end.eof = True
                self.on_eof(end)
        if self.closed:
            return
        for end in ends:
            # Read each side unless it ended or its sink is full (the hand-over may have
            # left it paused, e.g. by Holding's limit).
            if not end.eof and not end.peer.write_paused:
                end.transport.resume_reading()
            else:
                end.transport.pause_reading()
        if self.idle_timeout > 0:
            self.timer = self.loop.call_at(self.last_activity + self.idle_timeout,
                                           self._on_idle)

    def close(self) -> None:
        """Close both sides after flushing what they hold (shutdown, listener removal)."""
        self._close(abort=False)

    def abort(self) -> None:
        self._close(abort=True)

    @property
    def transports(self) -> tuple[asyncio.Transport, asyncio.Transport]:
        return self.a.transport, self.b.transport

    def can_hand_over(self) -> bool:
        """Both directions open and nothing buffered: the sockets alone hold the state."""
        a, b = self.a, self.b
        return not (self.closed or a.eof or b.eof or a.lost or b.lost
                    or a.transport.get_write_buffer_size()
                    or b.transport.get_write_buffer_size())

    def hand_over(self) -> tuple[asyncio.Transport, asyncio.Transport]:
        """Stop relaying, closing nothing: the caller owns both transports from now on.

        Only when `can_hand_over()`. Their later callbacks (e.g. `connection_lost` once
        the new owner closes them) are ignored and `on_done` is never called.
        """
        assert self.can_hand_over()
        self.closed = True
        self.done = True
        self.on_bulk = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        return self.transports

    # -- events from the ends -----------------------------------------------------------
    def on_eof(self, end: _End) -> None:
        """`end` sent EOF: half-close the opposite side; both ended -> close both."""
        if self.closed:
            return
        peer = end.peer
        if not peer.lost:
            if peer.transport.can_write_eof():
                peer.transport.write_eof()  # sent once the buffered bytes are flushed
            else:
                peer.transport.close()
        if peer.eof:
            self._close(abort=False)

    def on_lost(self, end: _End, exc: Exception | None) -> None:
        if not self.closed:
            # A clean close is passed on after a flush; an error is passed on as one.
            self._close(abort=exc is not None)
        if self.a.lost and self.b.lost and not self.done:
            self.done = True
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if self.on_done is not None:
                self.on_done(self)

    # -- helpers ------------------------------------------------------------------------
    def _close(self, *, abort: bool) -> None:
        self.closed = True
        for end in (self.a, self.b):
            if not end.lost:
                if abort:
                    abort_with_reset(end.transport)
                else:
                    end.transport.close()

    def _on_idle(self) -> None:
        """The lazily re-armed idle timer: abort both when nothing moved for long enough.

        Also bounds a graceful close whose flush never ends (a peer that stopped reading).
        """
        self.timer = None
        if self.done:
            return
        due = self.last_activity + self.idle_timeout
        if self.loop.time() >= due:
            self._close(abort=True)
        else:
            self.timer = self.loop.call_at(due, self._on_idle)
