"""TCP mode's byte movers and listener on real loopback sockets, in one uvloop loop.

relay.Relay and splice.Splice: each test builds two TCP connections, `left` (the test's
socket) <-> side A and side B <-> `right` (the test's socket). The movers' transports
are the accepted ends, held by relay.Holding until `Relay.start` takes them over, as TCP
mode does; splice tests then hand the relay over at once (`splice.take_over`).
tcp.TcpListener: served on a loopback port with an in-process UpstreamRuntime.
Every wait is bounded (`asyncio.timeout`, or a counted loop); events are awaited where
the code under test offers one.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import pytest
import uvloop

from proxy.config import UpstreamConfig
from proxy.model import Address, CatalogAnswer, Endpoint
from proxy.protocols import relay as relay_mod
from proxy.protocols import splice, tcp
from proxy.protocols.relay import HIGH_WATER, Holding, Relay
from proxy.protocols.splice import PIPE_SIZE, Splice
from proxy.protocols.tcp import TcpListener
from proxy.upstream.manager import UpstreamRuntime

T = TypeVar("T")
WAIT = 10.0  # seconds: the bound of every wait in these tests
MiB = 1 << 20


def run(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a test coroutine on a fresh uvloop loop (the loop the proxy runs on)."""
    async def bounded() -> T:
        async with asyncio.timeout(30):
            return await factory()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(bounded())


async def accepted_pair() -> tuple[Holding, asyncio.StreamReader, asyncio.StreamWriter]:
    """A loopback connection: (server side held by Holding, the test's client streams)."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Holding] = loop.create_future()

    def factory() -> Holding:
        proto = Holding()
        if not accepted.done():
            accepted.set_result(proto)
        return proto

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    held = await accepted
    server.close()
    return held, reader, writer


@dataclass
class Rig:
    relay: Relay
    left_r: asyncio.StreamReader
    left_w: asyncio.StreamWriter
    right_r: asyncio.StreamReader
    right_w: asyncio.StreamWriter
    done: asyncio.Future[None]


async def make_rig(*, idle_timeout: float = 30.0, start: bool = True) -> Rig:
    loop = asyncio.get_running_loop()
    a, left_r, left_w = await accepted_pair()
    b, right_r, right_w = await accepted_pair()
    done: asyncio.Future[None] = loop.create_future()
    assert a.transport is not None and b.transport is not None

    def on_done(_relay: Relay) -> None:
        assert not done.done(), "on_done called twice"
        done.set_result(None)

    relay = Relay(loop, a.transport, b.transport, idle_timeout=idle_timeout, on_done=on_done)
    if start:
        relay.start(a_data=a.held, a_eof=a.eof, b_data=b.held, b_eof=b.eof)
    return Rig(relay, left_r, left_w, right_r, right_w, done)


async def send_all(writer: asyncio.StreamWriter, data: bytes, *, eof: bool) -> None:
    view = memoryview(data)
    for off in range(0, len(data), 64 * 1024):
        writer.write(view[off:off + 64 * 1024])
        await writer.drain()
    if eof:
        writer.write_eof()


async def close_streams(rig: Rig) -> None:
    for w in (rig.left_w, rig.right_w):
        w.close()
    await asyncio.wait_for(rig.done, WAIT)


needs_splice = pytest.mark.skipif(not splice.AVAILABLE, reason="splice(2) is Linux-only")


async def spliced_rig(*, idle_timeout: float = 30.0) -> tuple[Rig, Splice]:
    """A rig whose relay is handed to a Splice at once (nothing buffered yet)."""
    rig = await make_rig(idle_timeout=idle_timeout)
    done = rig.done

    def on_done(_mover: Splice) -> None:
        assert not done.done(), "on_done called twice"
        done.set_result(None)

    rig.relay.on_done = None  # after a hand-over the relay must not report anything
    mover = splice.take_over(rig.relay, on_done=on_done)
    assert mover is not None
    return rig, mover


# Tests of behaviour both movers share run once per mover: the relay itself, and a Splice
# it was handed to at once (nothing buffered yet).
MOVERS = pytest.mark.parametrize("mover", ["relay", pytest.param("splice", marks=needs_splice)])


async def mover_rig(mover: str) -> Rig:
    if mover == "splice":
        rig, _mover = await spliced_rig()
        return rig
    return await make_rig()


# -- bytes ----------------------------------------------------------------------------
@MOVERS
def test_bytes_arrive_intact_both_ways_at_once(mover: str) -> None:
    async def main() -> None:
        rig = await mover_rig(mover)
        up, down = os.urandom(8 * MiB), os.urandom(6 * MiB)
        _, _, got_right, got_left = await asyncio.gather(
            send_all(rig.left_w, up, eof=True), send_all(rig.right_w, down, eof=True),
            rig.right_r.read(), rig.left_r.read())
        assert hashlib.sha256(got_right).digest() == hashlib.sha256(up).digest()
        assert hashlib.sha256(got_left).digest() == hashlib.sha256(down).digest()
        # Both directions ended: the mover closes both sides by itself.
        await asyncio.wait_for(rig.done, WAIT)
        if mover == "relay":
            assert rig.relay.done

    run(main)


def test_bytes_and_eof_held_before_start_are_delivered_first() -> None:
    async def main() -> None:
        rig = await make_rig(start=False)
        relay = rig.relay
        relay.start(a_data=[b"held ", b"bytes"], a_eof=True, b_data=[b"greeting"])
        assert await asyncio.wait_for(rig.right_r.read(), WAIT) == b"held bytes"
        assert await asyncio.wait_for(rig.left_r.readexactly(8), WAIT) == b"greeting"
        await close_streams(rig)

    run(main)


# -- half-close -----------------------------------------------------------------------
@MOVERS
def test_half_close_left_shuts_writing_and_still_receives_everything(mover: str) -> None:
    async def main() -> None:
        rig = await mover_rig(mover)
        request = os.urandom(3 * MiB)
        await send_all(rig.left_w, request, eof=True)
        # The right side sees EOF after every byte ...
        got = await asyncio.wait_for(rig.right_r.read(), WAIT)
        assert got == request
        assert not rig.done.done(), "a half-close must not end the other direction"
        # ... and the opposite direction still flows, then ends the same way.
        reply = os.urandom(2 * MiB) + b"end"
        await send_all(rig.right_w, reply, eof=True)
        assert await asyncio.wait_for(rig.left_r.read(), WAIT) == reply
        await asyncio.wait_for(rig.done, WAIT)

    run(main)


@MOVERS
def test_a_reset_on_one_side_aborts_the_other(mover: str) -> None:
    async def main() -> None:
        rig = await mover_rig(mover)
        rig.left_w.write(b"x")
        assert await asyncio.wait_for(rig.right_r.readexactly(1), WAIT) == b"x"
        # SO_LINGER 0 turns the close into a reset (RST), as a crashed peer's may be.
        sock = rig.left_w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        rig.left_w.transport.abort()
        # A reset, not a clean EOF: a peer must not take a cut stream for a whole one.
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(rig.right_r.readexactly(1), WAIT)
        await asyncio.wait_for(rig.done, WAIT)

    run(main)


def test_a_full_close_on_one_side_is_an_eof_for_the_other() -> None:
    async def main() -> None:
        rig = await make_rig()
        rig.left_w.write(b"last words")
        rig.left_w.close()
        assert await asyncio.wait_for(rig.right_r.read(), WAIT) == b"last words"
        rig.right_w.close()
        await asyncio.wait_for(rig.done, WAIT)

    run(main)


# -- backpressure ---------------------------------------------------------------------
class Flooder(asyncio.Protocol):
    """Writes whenever its transport lets it, until `stop()` or a byte budget ends."""

    CHUNK = 256 * 1024

    def __init__(self, transport: asyncio.Transport, budget: int) -> None:
        self.transport = transport
        self.budget = budget
        self.sent = 0
        self.digest = hashlib.sha256()
        self.chunk = os.urandom(self.CHUNK)
        self.paused = False
        self.pauses: asyncio.Queue[None] = asyncio.Queue()

    def flood(self) -> None:
        while not self.paused and self.sent < self.budget:
            self.transport.write(self.chunk)
            self.digest.update(self.chunk)
            self.sent += self.CHUNK

    def stop(self) -> None:
        self.budget = self.sent

    def pause_writing(self) -> None:
        self.paused = True
        self.pauses.put_nowait(None)

    def resume_writing(self) -> None:
        self.paused = False
        self.flood()


class PauseSpy(asyncio.Protocol):
    """Sits between a transport and the relay's protocol; reports its first pause_writing."""

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner
        self.paused: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if not self.paused.done():
            self.paused.set_result(None)
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def test_a_reader_that_does_not_read_pauses_the_source() -> None:
    async def main() -> None:
        rig = await make_rig()
        relay = rig.relay
        right_t = cast(asyncio.Transport, rig.right_w.transport)
        right_t.pause_reading()  # `right` reads nothing for now
        spy = PauseSpy(relay.b)
        relay.b.transport.set_protocol(spy)
        # `left` floods through a protocol of its own on the same transport.
        left_t = cast(asyncio.Transport, rig.left_w.transport)
        flooder = Flooder(left_t, budget=1024 * MiB)
        left_t.set_protocol(flooder)
        left_t.set_write_buffer_limits(high=1 * MiB)
        flooder.flood()
        # B's write buffer passes HIGH_WATER once the kernel buffers towards `right` fill.
        await asyncio.wait_for(spy.paused, WAIT)
        assert relay.b.write_paused
        assert not relay.a.transport.is_reading(), "the relay kept reading the source"
        # Then the kernel buffers from `left` fill too, and `left` itself is blocked.
        while not flooder.paused:
            await asyncio.wait_for(flooder.pauses.get(), WAIT)
        # Bounded: about HIGH_WATER plus one read is all the relay holds this way.
        held = relay.b.transport.get_write_buffer_size()
        print(f"relay holds {held} bytes for the blocked direction; left sent "
              f"{flooder.sent} bytes (the rest sits in kernel socket buffers)")
        assert held <= HIGH_WATER + 256 * 1024
        assert relay.a.transport.get_write_buffer_size() == 0
        # Reading again drains everything, in order, and the source is read again.
        flooder.stop()
        right_t.resume_reading()
        total = flooder.sent
        digest = hashlib.sha256()
        got = 0
        while got < total:
            data = await asyncio.wait_for(rig.right_r.read(1 * MiB), WAIT)
            assert data, "EOF before every byte arrived"
            digest.update(data)
            got += len(data)
        assert got == total and digest.digest() == flooder.digest.digest()
        assert relay.a.transport.is_reading()
        assert not relay.b.write_paused
        left_t.close()
        rig.right_w.close()
        await asyncio.wait_for(rig.done, WAIT)

    run(main)


def test_write_buffer_limits_are_set_on_both_transports() -> None:
    async def main() -> None:
        rig = await make_rig()
        for end in (rig.relay.a, rig.relay.b):
            assert end.transport.get_write_buffer_limits()[1] == HIGH_WATER
        await close_streams(rig)

    run(main)


# -- idle timeout ---------------------------------------------------------------------
def test_idle_timeout_closes_both_sides() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        idle = 0.3
        rig = await make_rig(idle_timeout=idle)
        # Traffic pushes the deadline back: one byte every idle/3 for about 2 * idle.
        started = loop.time()
        last = started
        for _ in range(6):
            await asyncio.sleep(idle / 3)  # pacing the traffic, not waiting for a state
            rig.left_w.write(b"k")
            assert await asyncio.wait_for(rig.right_r.readexactly(1), WAIT) == b"k"
            last = loop.time()
        assert not rig.done.done(), "closed although bytes kept moving"
        await asyncio.wait_for(rig.done, WAIT)
        closed = loop.time()
        assert closed - last >= idle - 0.05, "closed before idle_timeout passed"
        assert closed - started >= 2 * idle
        # Both peers see the end of their stream.
        for reader in (rig.left_r, rig.right_r):
            try:
                assert await asyncio.wait_for(reader.read(), WAIT) == b""
            except ConnectionError:
                pass  # an abort may reach the peer as a reset

    run(main)


def test_idle_timer_is_one_per_relay_not_one_per_chunk() -> None:
    async def main() -> None:
        rig = await make_rig(idle_timeout=30.0)
        timer = rig.relay.timer
        assert timer is not None
        await send_all(rig.left_w, os.urandom(4 * MiB), eof=True)
        assert len(await asyncio.wait_for(rig.right_r.read(), WAIT)) == 4 * MiB
        assert rig.relay.timer is timer, "the idle timer was re-armed per chunk"
        await close_streams(rig)

    run(main)


def test_module_names_its_limits() -> None:
    assert relay_mod.HIGH_WATER >= 64 * 1024
    assert relay_mod.LOW_WATER < relay_mod.HIGH_WATER
    assert relay_mod.HOLD_HIGH_WATER > 0


# -- splice take-over (Linux) ---------------------------------------------------------
@needs_splice
def test_bulk_read_hands_a_running_relay_over_to_splice_without_losing_a_byte() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, left_r, left_w = await accepted_pair()
        b, right_r, right_w = await accepted_pair()
        assert a.transport is not None and b.transport is not None
        done: asyncio.Future[object] = loop.create_future()
        movers: list[Splice] = []

        def on_bulk(relay: Relay) -> None:
            mover = splice.take_over(relay, on_done=done.set_result)
            if mover is not None:
                movers.append(mover)

        relay = Relay(loop, a.transport, b.transport, idle_timeout=30.0,
                      on_done=done.set_result, on_bulk=on_bulk)
        relay.start()
        # Small chunks first (relayed), then bulk (spliced), in both directions.
        head = b"".join(b"line %d\n" % i for i in range(200))
        left_w.write(head)
        assert await asyncio.wait_for(right_r.readexactly(len(head)), WAIT) == head
        assert not movers
        up, down = os.urandom(16 * MiB), os.urandom(4 * MiB)
        _, _, got_right, got_left = await asyncio.gather(
            send_all(left_w, up, eof=True), send_all(right_w, down, eof=True),
            right_r.read(), left_r.read())
        assert len(movers) == 1, "the bulk transfer was not handed over"
        assert hashlib.sha256(got_right).digest() == hashlib.sha256(up).digest()
        assert hashlib.sha256(got_left).digest() == hashlib.sha256(down).digest()
        assert await asyncio.wait_for(done, WAIT) is movers[0]

    run(main)


class LoopSpy:
    """Stands in for the loop of one Splice: records its readiness (un)registrations."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.calls: list[str] = []
        self.writer_added: asyncio.Future[None] = loop.create_future()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    def add_writer(self, fd: Any, callback: Any, *args: Any) -> None:
        self.calls.append("add_writer")
        if not self.writer_added.done():
            self.writer_added.set_result(None)
        self._loop.add_writer(fd, callback, *args)

    def add_reader(self, fd: Any, callback: Any, *args: Any) -> None:
        self.calls.append("add_reader")
        self._loop.add_reader(fd, callback, *args)


@needs_splice
def test_splice_a_reader_that_does_not_read_stops_the_source() -> None:
    async def main() -> None:
        rig, mover = await spliced_rig()
        spy = LoopSpy(asyncio.get_running_loop())
        mover.loop = cast(asyncio.AbstractEventLoop, spy)
        right_t = cast(asyncio.Transport, rig.right_w.transport)
        right_t.pause_reading()
        left_t = cast(asyncio.Transport, rig.left_w.transport)
        flooder = Flooder(left_t, budget=1024 * MiB)
        left_t.set_protocol(flooder)
        left_t.set_write_buffer_limits(high=1 * MiB)
        flooder.flood()
        # Once the kernel buffers towards `right` are full the splice waits for them to
        # drain, and stops reading `left` meanwhile: at most one pipe is in flight.
        await asyncio.wait_for(spy.writer_added, WAIT)
        direction = mover.ab
        assert direction.writing
        assert 0 < direction.in_pipe <= PIPE_SIZE
        # While `right` reads nothing, the source is not read again, however long `left`
        # keeps pushing (its own buffers fill and block it).
        while not flooder.paused:
            await asyncio.wait_for(flooder.pauses.get(), WAIT)
        assert spy.calls == ["add_writer"] and direction.writing
        print(f"splice holds {direction.in_pipe} bytes in its pipe; left sent {flooder.sent}")
        flooder.stop()
        right_t.resume_reading()
        assert await read_digest(rig.right_r, flooder.sent) == flooder.digest.digest()
        assert not direction.writing and "add_reader" in spy.calls
        left_t.close()
        rig.right_w.close()
        await asyncio.wait_for(rig.done, WAIT)

    run(main)


@needs_splice
def test_splice_idle_timeout_closes_both_sides() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        idle = 0.3
        rig, _mover = await spliced_rig(idle_timeout=idle)
        rig.left_w.write(b"k")
        assert await asyncio.wait_for(rig.right_r.readexactly(1), WAIT) == b"k"
        last = loop.time()
        await asyncio.wait_for(rig.done, WAIT)
        assert loop.time() - last >= idle - 0.05
        for reader in (rig.left_r, rig.right_r):
            try:
                assert await asyncio.wait_for(reader.read(), WAIT) == b""
            except ConnectionError:
                pass  # the abort reaches the peer as a reset

    run(main)


@needs_splice
@pytest.mark.parametrize("left", ["reading", "not-reading"])
def test_splice_a_reset_queued_behind_bytes_still_aborts_the_other_side(left: str) -> None:
    """`right` sends megabytes, then resets; the reset reaches the Splice behind bytes it
    has not moved yet. `not-reading`: `left` reads nothing until after the reset, so the
    source is paused (backpressure) when the reset arrives. Either way `left` must get a
    reset, not wait for the idle timeout (uvloop stops watching a socket once it reports
    EPOLLERR, after one last call of its reader)."""
    async def main() -> None:
        rig, mover = await spliced_rig()
        spy = LoopSpy(asyncio.get_running_loop())
        mover.loop = cast(asyncio.AbstractEventLoop, spy)
        left_t = cast(asyncio.Transport, rig.left_w.transport)

        async def read_until_reset() -> int:
            got = 0
            for _ in range(100_000):  # bounded; 8 MiB arrive in far fewer reads
                data = await rig.left_r.read(1 * MiB)
                assert data, "the reset was passed on as a clean EOF"
                got += len(data)
            return got

        reading: asyncio.Task[int] | None = None
        if left == "reading":
            reading = asyncio.create_task(read_until_reset())
        else:
            left_t.pause_reading()
        rig.right_w.write(os.urandom(8 * MiB))
        if reading is None:
            await asyncio.wait_for(spy.writer_added, WAIT)  # towards `left` is full
            assert mover.ba.writing
        else:
            await asyncio.wait_for(rig.right_w.drain(), WAIT)
        sock = rig.right_w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        rig.right_w.transport.abort()
        if reading is None:
            left_t.resume_reading()
            reading = asyncio.create_task(read_until_reset())
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reading, WAIT)
        await asyncio.wait_for(rig.done, WAIT)

    run(main)


def test_no_hand_over_while_bytes_are_buffered_or_a_side_ended() -> None:
    async def main() -> None:
        rig = await make_rig()
        relay = rig.relay
        assert relay.can_hand_over()
        rig.left_w.write_eof()
        assert await asyncio.wait_for(rig.right_r.read(), WAIT) == b""
        assert not relay.can_hand_over(), "half-closed: the shutdown may still be queued"
        if splice.AVAILABLE:
            assert splice.take_over(relay) is None
        await close_streams(rig)

    run(main)


async def read_digest(reader: asyncio.StreamReader, total: int) -> bytes:
    digest = hashlib.sha256()
    got = 0
    while got < total:
        data = await asyncio.wait_for(reader.read(1 * MiB), WAIT)
        assert data, f"EOF after {got} of {total} bytes"
        digest.update(data)
        got += len(data)
    assert got == total
    return digest.digest()


# -- TcpListener in process: retries, limits, bookkeeping -----------------------------
def make_listener(ports: list[int], **cfg: Any) -> TcpListener:
    config = UpstreamConfig(name="t", listen=Address("127.0.0.1", 1), mode="tcp",
                            discovery="static", **cfg)
    rt = UpstreamRuntime(config)
    rt.on_catalog_answer(CatalogAnswer(tuple(
        Endpoint(id=f"127.0.0.1:{p}", address="127.0.0.1", port=p) for p in ports)))
    return watch(TcpListener(rt, asyncio.get_running_loop()))


async def serve(listener: TcpListener) -> tuple[asyncio.Server, tuple[str, int]]:
    server = await asyncio.get_running_loop().create_server(
        listener.protocol_factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[:2]


async def echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 * MiB):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WatchedSet(set[Any]):
    """A listener's `open` set that reports when it becomes empty."""

    def __init__(self) -> None:
        super().__init__()
        self.emptied = asyncio.Event()

    def add(self, item: Any) -> None:
        self.emptied.clear()
        super().add(item)

    def discard(self, item: Any) -> None:
        super().discard(item)
        if not self:
            self.emptied.set()


def watch(listener: TcpListener) -> TcpListener:
    listener.open = WatchedSet()
    return listener


async def settled(listener: TcpListener) -> None:
    """Wait until every client of the listener has finished (bounded)."""
    watched = listener.open
    assert isinstance(watched, WatchedSet), "make the listener with watch()"
    if watched:
        await asyncio.wait_for(watched.emptied.wait(), WAIT)


def assert_released(listener: TcpListener) -> None:
    rt = listener.runtime
    assert listener.connections == 0 and not listener.open
    assert rt.in_flight == 0 and rt.retries_in_flight == 0
    assert all(h.active == 0 for h in rt.all_hosts()), [h.active for h in rt.all_hosts()]
    assert all(not h.status_counts for h in rt.all_hosts()), "a bogus status was counted"


def test_listener_retries_a_refused_connect_and_releases_everything() -> None:
    async def main() -> None:
        echo, port = await echo_server()
        dead = closed_port()
        listener = make_listener([dead, port])
        server, addr = await serve(listener)
        for i in range(4):
            reader, writer = await asyncio.open_connection(*addr)
            writer.write(b"ping %d" % i)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), WAIT) == b"ping %d" % i
            writer.close()
        await settled(listener)
        assert_released(listener)
        rt = listener.runtime
        assert rt.hosts[f"127.0.0.1:{dead}"].failures >= 1
        assert rt.failovers.get("connect-failure", 0) >= 1
        server.close()
        echo.close()

    run(main)


def test_listener_with_no_reachable_instance_closes_the_client_without_a_byte() -> None:
    async def main() -> None:
        # retries = 2 by default: both instances fail, then none is left to try. As in
        # HTTP mode (a 502 naming the failed instance), that is a failed connect, not a
        # connection closed for want of an instance: no third attempt is begun.
        listener = make_listener([closed_port(), closed_port()])
        server, addr = await serve(listener)
        reader, writer = await asyncio.open_connection(*addr)
        writer.write(b"anyone?")
        try:
            assert await asyncio.wait_for(reader.read(), WAIT) == b""
        except ConnectionResetError:
            pass  # unread bytes make the kernel answer the close with a reset
        writer.close()
        await settled(listener)
        assert_released(listener)
        rt = listener.runtime
        assert rt.no_host_responses == 0 and rt.failovers == {"connect-failure": 1}
        assert sum(h.failures for h in rt.all_hosts()) == 2
        assert sum(h.requests for h in rt.all_hosts()) == 2
        server.close()

    run(main)


def test_listener_closes_connections_beyond_max_connections_at_once() -> None:
    async def main() -> None:
        echo, port = await echo_server()
        listener = make_listener([port], max_connections=1)
        server, addr = await serve(listener)
        r1, w1 = await asyncio.open_connection(*addr)
        w1.write(b"one")
        assert await asyncio.wait_for(r1.readexactly(3), WAIT) == b"one"
        r2, w2 = await asyncio.open_connection(*addr)
        assert await asyncio.wait_for(r2.read(), WAIT) == b""
        assert listener.rejected_connections == 1 and listener.connections == 1
        w1.write(b"still")
        assert await asyncio.wait_for(r1.readexactly(5), WAIT) == b"still"
        for w in (w1, w2):
            w.close()
        await settled(listener)
        assert_released(listener)
        server.close()
        echo.close()

    run(main)


def test_a_client_leaving_while_connecting_stops_the_connect_and_releases_the_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        # A listener whose accept queue is full (backlog 0 holds one connection, which
        # nobody accepts): further SYNs are dropped and connects hang.
        blackhole = socket.create_server(("127.0.0.1", 0), backlog=0)
        filler = [socket.create_connection(blackhole.getsockname(), timeout=WAIT)]
        listener = make_listener([blackhole.getsockname()[1]], connect_timeout=30.0)
        picked: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        real_open = tcp.TcpClient._open

        async def open_(client: tcp.TcpClient, host: Any, timeout: float) -> Holding:
            if not picked.done():  # the attempt has begun: the connect starts now
                picked.set_result(host)
            return await real_open(client, host, timeout)

        monkeypatch.setattr(tcp.TcpClient, "_open", open_)
        server, addr = await serve(listener)
        try:
            _reader, writer = await asyncio.open_connection(*addr)
            writer.write(b"held while connecting")
            host = await asyncio.wait_for(picked, WAIT)  # the connect attempt is under way
            assert host.active == 1 and listener.connections == 1
            # Leaving is a reset (or a close the proxy learns of as one): a mere EOF is
            # a half-close, and a half-closed client still waits for its answer.
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            await settled(listener)
            assert_released(listener)
            assert host.failures == 0, "the client leaving is not the instance's failure"
        finally:
            server.close()
            for s in (*filler, blackhole):
                s.close()

    run(main)


def test_listener_close_all_ends_relayed_connections() -> None:
    async def main() -> None:
        echo, port = await echo_server()
        listener = make_listener([port])
        server, addr = await serve(listener)
        reader, writer = await asyncio.open_connection(*addr)
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), WAIT) == b"x"
        assert listener.busy()
        listener.close_all()
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        await settled(listener)
        assert not listener.busy()
        assert_released(listener)
        writer.close()
        server.close()
        echo.close()

    run(main)


@needs_splice
def test_listener_hands_bulk_connections_to_splice_and_releases_everything() -> None:
    async def main() -> None:
        echo, port = await echo_server()
        listener = make_listener([port])
        assert listener.zero_copy
        server, addr = await serve(listener)
        reader, writer = await asyncio.open_connection(*addr)
        payload = os.urandom(16 * MiB)
        _, echoed = await asyncio.gather(send_all(writer, payload, eof=True),
                                         read_digest(reader, len(payload)))
        assert echoed == hashlib.sha256(payload).digest()
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        writer.close()
        await settled(listener)
        assert listener.spliced_connections == 1
        assert_released(listener)
        server.close()
        echo.close()

    run(main)


def test_hash_balance_keeps_a_client_address_on_one_instance() -> None:
    async def main() -> None:
        servers: list[asyncio.Server] = []
        ports: list[int] = []
        for i in range(3):
            async def name_it(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                              i: int = i) -> None:
                writer.write(b"instance %d" % i)
                writer.close()

            server = await asyncio.start_server(name_it, "127.0.0.1", 0)
            servers.append(server)
            ports.append(server.sockets[0].getsockname()[1])
        listener = make_listener(ports, balance="hash")
        proxy_server, addr = await serve(listener)
        seen = set()
        for _ in range(12):
            reader, writer = await asyncio.open_connection(*addr)
            seen.add(await asyncio.wait_for(reader.read(), WAIT))
            writer.close()
        assert len(seen) == 1, f"one client address went to {sorted(seen)}"
        await settled(listener)
        assert_released(listener)
        proxy_server.close()
        for server in servers:
            server.close()

    run(main)


def test_a_connection_to_a_removed_instance_is_closed_after_drain_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp, "DRAIN_SWEEP_INTERVAL", 0.05)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        echo, port = await echo_server()
        listener = make_listener([port], drain_timeout=0.3)
        server, addr = await serve(listener)
        reader, writer = await asyncio.open_connection(*addr)
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), WAIT) == b"x"
        removed = loop.time()
        listener.runtime.reconcile(())  # the instance left the catalog
        host = next(iter(listener.runtime.draining.values()))
        still = b"still served while draining"
        writer.write(still)
        assert await asyncio.wait_for(reader.readexactly(len(still)), WAIT) == still
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        assert loop.time() - removed >= 0.3
        writer.close()
        await settled(listener)
        assert_released(listener)
        assert host.active == 0 and not listener.runtime.draining
        listener.close_all()
        server.close()
        echo.close()

    run(main)


def test_a_connect_timeout_is_retried_on_another_instance() -> None:
    async def main() -> None:
        blackhole = socket.create_server(("127.0.0.1", 0), backlog=0)
        filler = socket.create_connection(blackhole.getsockname(), timeout=WAIT)
        echo, port = await echo_server()
        hole = blackhole.getsockname()[1]
        listener = make_listener([hole, port], connect_timeout=0.2)
        server, addr = await serve(listener)
        try:
            for i in range(3):  # round robin: the blackhole comes first at least once
                reader, writer = await asyncio.open_connection(*addr)
                writer.write(b"t%d" % i)
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(), WAIT) == b"t%d" % i
                writer.close()
            await settled(listener)
            assert_released(listener)
            rt = listener.runtime
            assert rt.hosts[f"127.0.0.1:{hole}"].failures >= 1
            assert rt.failovers.get("connect-failure", 0) >= 1
        finally:
            server.close()
            echo.close()
            filler.close()
            blackhole.close()

    run(main)
