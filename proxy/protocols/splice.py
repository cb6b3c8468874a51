"""Zero-copy TCP relay on Linux: socket -> pipe -> socket with os.splice (splice(2)).

Owns two raw non-blocking TCP sockets, taken over from a running relay.Relay once its
connection shows bulk traffic (`take_over`), and, per direction, one pipe. Bytes never
enter Python: splice moves page references from one socket into the pipe and from the
pipe into the other. Setting this up costs more than a short connection is worth
(bench/tcp_bulk.py), hence the take-over rather than splicing from the accept. Knows
nothing of hosts, listeners or retries; its owner learns the end through `on_done`.
It keeps relay.py's rules:

- Backpressure both ways, with named limits: a direction reads its source only while
  its pipe is empty, and the pipe holds at most PIPE_SIZE bytes (kernel memory, not
  Python's); a sink that stops reading stops the source. Nothing else is buffered.
- Half-close (RFC 9293 3.6): EOF from a source, once its pipe is flushed, becomes
  shutdown(SHUT_WR) on the sink; the other direction goes on. Both ended -> both close.
- An error (reset, broken pipe) on either socket aborts both (RST, SO_LINGER 0).
- idle_timeout: one lazily re-armed timer per relay, from the time of the last splice.
- `on_done(splice)` is called exactly once, after every descriptor is closed.
Socket readiness comes from the event loop (add_reader/add_writer, level-triggered),
with one exception: uvloop drops a watch whose socket reports EPOLLERR after calling its
callbacks once more, so a reader that keeps watching its source checks SO_ERROR itself.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import sys
from collections.abc import Callable

from proxy.protocols.relay import RESET_LINGER, Relay, Traffic

# splice(2) is Linux-only; os.splice exists from Python 3.10.
AVAILABLE = sys.platform == "linux" and hasattr(os, "splice")

# Bytes one direction's pipe may hold: the most a direction has in flight inside the
# proxy. The kernel's default pipe is 64 KiB; a larger pipe means fewer wake-ups per byte.
PIPE_SIZE = 256 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
# Empty pipes kept for the next connections: making one costs pipe2, fcntl and two
# closes, a good part of a short connection's cost. Only a pipe known empty returns.
PIPE_POOL_SIZE = 64
_pipes: list[tuple[int, int]] = []


def _take_pipe() -> tuple[int, int]:
    if _pipes:
        return _pipes.pop()
    rpipe, wpipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(wpipe, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size or a user's quota: keep the default
    return rpipe, wpipe


def _give_pipe(rpipe: int, wpipe: int, empty: bool) -> None:
    if empty and len(_pipes) < PIPE_POOL_SIZE:
        _pipes.append((rpipe, wpipe))
    else:
        os.close(rpipe)
        os.close(wpipe)


def take_over(relay: Relay, *, on_done: Callable[[Splice], None] | None = None
              ) -> Splice | None:
    """Move a running relay's connection to a Splice; None when it cannot be done now.

    Possible only between chunks, with nothing buffered and both directions open
    (`Relay.can_hand_over`): the kernel's socket buffers then hold all the state, so
    nothing is lost or reordered. Each transport's descriptor is duplicated, then the
    transport is closed: closing a descriptor does no shutdown, so the connection stays
    open on the duplicate. Raises OSError (no descriptors left, say) with the relay
    untouched; the caller should then stop asking.
    """
    if not relay.can_hand_over():
        return None
    transports = relay.transports
    raw = [transport.get_extra_info("socket") for transport in transports]
    if any(sock is None or sock.type != socket.SOCK_STREAM for sock in raw) or any(
            transport.get_extra_info("sslcontext") is not None for transport in transports):
        relay.on_bulk = None  # not plain TCP on both sides (TLS, pipes): never possible
        return None
    socks: list[socket.socket] = []
    try:
        for sock in raw:
            fd = os.dup(sock.fileno())
            # Family and type given: socket() would otherwise ask the kernel for them.
            socks.append(socket.socket(sock.family, socket.SOCK_STREAM, 0, fileno=fd))
        mover = Splice(relay.loop, socks[0], socks[1], idle_timeout=relay.idle_timeout,
                       on_done=on_done, traffic=relay.traffic)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    relay.hand_over()
    for transport in transports:
        transport.abort()  # the loop stops watching it; its descriptor closes, not ours
    mover.start()
    return mover


class _Direction:
    """src -> pipe -> dst. `in_pipe` bytes wait in the pipe for dst to take them."""

    __slots__ = ("done", "dst", "dst_fd", "eof", "in_pipe", "inbound", "rpipe", "src", "src_fd",
                 "wpipe", "writing")

    def __init__(self, src: socket.socket, dst: socket.socket, *, inbound: bool) -> None:
        self.inbound = inbound  # src is the client: these bytes come in
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.rpipe, self.wpipe = _take_pipe()
        self.in_pipe = 0
        self.eof = False  # src sent EOF
        self.done = False  # EOF passed on to dst: this direction ended
        self.writing = False  # waiting for dst to be writable

    def close_pipe(self) -> None:
        _give_pipe(self.rpipe, self.wpipe, self.in_pipe == 0)


class Splice:
    """Relays between connected sockets `a` and `b` from `start()` until both ended."""

    __slots__ = ("a", "ab", "b", "ba", "closed", "idle_timeout", "last_activity", "loop",
                 "on_done", "timer", "traffic")

    def __init__(self, loop: asyncio.AbstractEventLoop, a: socket.socket, b: socket.socket, *,
                 idle_timeout: float, on_done: Callable[[Splice], None] | None = None,
                 traffic: Traffic) -> None:
        self.loop = loop
        self.a = a
        self.b = b
        self.traffic = traffic  # a (the client) -> b counts in, b -> a out
        self.ab = _Direction(a, b, inbound=True)
        try:
            self.ba = _Direction(b, a, inbound=False)
        except OSError:
            self.ab.close_pipe()
            raise
        self.idle_timeout = idle_timeout
        self.on_done = on_done
        self.closed = False
        self.last_activity = loop.time()
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        for d in (self.ab, self.ba):
            self.loop.add_reader(d.src, self._on_readable, d)
        if self.idle_timeout > 0:
            self.timer = self.loop.call_at(self.last_activity + self.idle_timeout,
                                           self._on_idle)

    def close(self) -> None:
        """Close both sockets now (FIN); bytes still in the pipes are dropped."""
        self._finish(abort=False)

    def abort(self) -> None:
        self._finish(abort=True)

    # -- readiness ----------------------------------------------------------------------
    def _on_readable(self, d: _Direction) -> None:
        """src has bytes (or EOF, or an error): move them into the pipe, then on."""
        try:
            n = os.splice(d.src_fd, d.wpipe, PIPE_SIZE, flags=_FLAGS)
        except BlockingIOError:
            n = -1  # a spurious wake-up: nothing to read after all
        except OSError:
            self._finish(abort=True)
            return
        if n == 0:
            d.eof = True
            self.loop.remove_reader(d.src)
        elif n > 0:
            d.in_pipe = n
            self.last_activity = self.loop.time()
        self._flush(d)
        if not (d.writing or d.eof or self.closed):
            # Still watching src. uvloop (libuv's uv_poll) treats EPOLLERR as fatal for a
            # watch: it calls the reader once more and then drops the watch for good. A
            # reset that arrived behind queued bytes would then wait, unread, for the idle
            # timeout; so look for it now, while this is the reader being called.
            self._abort_on_socket_error(d.src)

    def _abort_on_socket_error(self, sock: socket.socket) -> None:
        """Abort both sockets when `sock` holds a pending error (a reset, typically)."""
        try:
            failed = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
        except OSError:
            failed = True
        if failed:
            self._finish(abort=True)

    def _on_writable(self, d: _Direction) -> None:
        self._flush(d)

    def _flush(self, d: _Direction) -> None:
        """Move the pipe into dst as far as it takes; then read src again, or wait."""
        dst = d.dst_fd
        while d.in_pipe:
            try:
                m = os.splice(d.rpipe, dst, d.in_pipe, flags=_FLAGS)
            except BlockingIOError:
                break
            except OSError:
                self._finish(abort=True)
                return
            d.in_pipe -= m
            if d.inbound:
                self.traffic.bytes_in += m
            else:
                self.traffic.bytes_out += m
        loop = self.loop
        if d.in_pipe:  # dst is full: stop reading src (backpressure) until it drains
            if not d.writing:
                d.writing = True
                loop.remove_reader(d.src)
                loop.add_writer(d.dst, self._on_writable, d)
            return
        if d.writing:
            d.writing = False
            loop.remove_writer(d.dst)
            if not d.eof:
                loop.add_reader(d.src, self._on_readable, d)
        if d.eof and not d.done:
            d.done = True
            try:
                d.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # its peer is gone already; the other direction will tell
            if self.ab.done and self.ba.done:
                self._finish(abort=False)

    # -- the end ------------------------------------------------------------------------
    def _finish(self, *, abort: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        loop = self.loop
        for sock in (self.a, self.b):
            loop.remove_reader(sock)
            loop.remove_writer(sock)
        for d in (self.ab, self.ba):
            d.close_pipe()
        for sock in (self.a, self.b):
            if abort:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_LINGER)
                except OSError:
                    pass
            sock.close()
        if self.on_done is not None:
            self.on_done(self)

    def _on_idle(self) -> None:
        self.timer = None
        if self.closed:
            return
        due = self.last_activity + self.idle_timeout
        if self.loop.time() >= due:
            self._finish(abort=True)
        else:
            self.timer = self.loop.call_at(due, self._on_idle)
