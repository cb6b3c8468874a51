"""Mixed traffic for long runs: one paced stream per kind of request, through an HTTP and
a TCP listener of sdproxy.

A `Kind` is a name, a rate, a per-request timeout and `send`, a coroutine that makes one
request and returns a `Response`, or raises: what the socket said, or `Mismatch` when
the answer is not the one asked for. `paced_load` (loadtest.load) drives each kind and
counts every outcome. `mixed_kinds` builds the standard mix against the demo backend
(proxy.demo.backend) behind the HTTP listener and `loadtest.fastbackend sink`s behind
the TCP listener:
- GETs on kept-alive connections, and GETs on a new connection each (`Connection: close`);
- POSTs of 1 KiB and of 300 KB to /upload, the byte count checked;
- chunked 64 KiB downloads, checked against their SHA-256;
- slow readers: 1 MiB read 8 KiB every 20 ms on a socket with a small receive buffer, so
  the proxy's write side backs up;
- aborted downloads: 4 MiB asked for, 64 KiB read, then the connection reset (RST) or
  closed (FIN), alternately;
- TCP exchanges: 4 KiB, 64 KiB or 1 MiB sent, half-closed, the sink's byte count read back.

An aborted download that was aborted as planned is a success. Rates are per second.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import re
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from loadtest.client import Addr, HttpClient, Response, read_response
from proxy.demo.backend import expected_download_sha256

KiB = 1024
MiB = 1024 * KiB
SLOW_READ_CHUNK = 8 * KiB
SLOW_READ_PAUSE = 0.020  # seconds between two reads of a slow reader
SLOW_READER_RCVBUF = 16 * KiB  # asked of the kernel; it doubles it
ABORT_AFTER = 64 * KiB
CLIENT_IDLE_TIMEOUT = 5.0  # seconds; sdproxy closes idle keep-alive connections at 10
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)


class Mismatch(Exception):
    """The answer arrived but is not the one asked for (wrong size, hash or status)."""


@dataclass(frozen=True)
class Kind:
    name: str
    rate: float  # requests per second
    timeout: float  # seconds per request, from its scheduled send time
    send: Callable[[], Awaitable[Response]]


class MixedClient(HttpClient):
    """`HttpClient` plus requests with any method and a body, on the same keep-alive pool
    (one request in flight per connection, never retried), and a client-side idle
    timeout: a connection parked longer than `idle_timeout` is closed rather than reused.

    Why: sdproxy closes a keep-alive connection idle for header_timeout (10 s by default).
    Reusing one just as it does so fails the request ("reset"), the keep-alive race every
    client avoids by giving up idle connections before the server does (or by retrying,
    which this client never does). Over a long run the pool's least recently used
    connections reach that age after every burst."""

    def __init__(self, idle_timeout: float = CLIENT_IDLE_TIMEOUT) -> None:
        super().__init__()
        self.idle_timeout = idle_timeout
        self._parked_at: dict[object, float] = {}  # idle connection -> when it was parked

    async def _acquire(self, addr: Addr) -> tuple[Any, bool]:
        idle = self._idle.get(addr)
        if idle:  # most recently used last: the old ones are at the front
            limit = time.monotonic() - self.idle_timeout
            while idle and self._parked_at.get(idle[0], limit) <= limit:
                old = idle.pop(0)
                self._parked_at.pop(old, None)
                old.close()
                self._open[addr] -= 1
        conn, reused = await super()._acquire(addr)
        self._parked_at.pop(conn, None)
        return conn, reused

    def _release(self, addr: Addr, conn: Any, keep: bool) -> None:
        super()._release(addr, conn, keep)
        if keep and not conn.stale():
            self._parked_at[conn] = time.monotonic()

    async def request(self, addr: Addr, method: str, path: str, body: bytes = b"") -> Response:
        conn, reused = await self._acquire(addr)
        keep = False
        try:
            conn.writer.write(f"{method} {path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
                              f"User-Agent: sdproxy-loadtest\r\nContent-Length: {len(body)}"
                              "\r\n\r\n".encode())
            if body:
                conn.writer.write(body)
            await conn.writer.drain()
            status, data, keep = await read_response(conn.reader)
            return Response(status, data, reused)
        finally:  # an exception or a cancellation (timeout) closes the connection
            self._release(addr, conn, keep)


async def _connect(addr: Addr, rcvbuf: int | None = None,
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A new connection; with `rcvbuf`, a small kernel receive buffer set before connect
    (so the window advertised stays small)."""
    if rcvbuf is None:
        return await asyncio.open_connection(*addr)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, addr)
        return await asyncio.open_connection(sock=sock, limit=rcvbuf)
    except BaseException:
        sock.close()
        raise


def _get_head(path: str, *, close: bool) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: loadtest\r\nUser-Agent: sdproxy-loadtest\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode()


async def get_new_connection(addr: Addr, path: str = "/") -> Response:
    """One GET on a connection of its own, `Connection: close`."""
    reader, writer = await _connect(addr)
    try:
        writer.write(_get_head(path, close=True))
        status, body, _ = await read_response(reader)
        return Response(status, body, False)
    finally:
        writer.close()


async def upload(client: MixedClient, addr: Addr, body: bytes) -> Response:
    """POST `body` to /upload on a kept-alive connection; the backend's count must match."""
    resp = await client.request(addr, "POST", "/upload", body)
    if resp.status == 200:
        try:
            counted = json.loads(resp.body)["bytes"]
        except (ValueError, KeyError, TypeError):
            counted = None
        if counted != len(body):
            raise Mismatch(f"upload of {len(body)} bytes answered {resp.body[:80]!r}")
    return resp


async def chunked_download(client: MixedClient, addr: Addr, nbytes: int, seed: int,
                           digest: str) -> Response:
    """GET a chunked /download on a kept-alive connection; the body's hash must match."""
    resp = await client.request(addr, "GET", f"/download?bytes={nbytes}&seed={seed}&chunked=1")
    if resp.status == 200 and hashlib.sha256(resp.body).hexdigest() != digest:
        raise Mismatch(f"chunked download: {len(resp.body)} bytes, wrong hash")
    return resp


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, int]:
    """(status, Content-Length) of a response head (-1 when the length is absent)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    found = CONTENT_LENGTH.search(head)
    return status, int(found.group(1)) if found else -1


async def slow_download(addr: Addr, nbytes: int, seed: int, digest: str) -> Response:
    """GET /download of `nbytes` on a connection of its own, read SLOW_READ_CHUNK bytes
    every SLOW_READ_PAUSE seconds; the body's hash must match."""
    reader, writer = await _connect(addr, rcvbuf=SLOW_READER_RCVBUF)
    try:
        writer.write(_get_head(f"/download?bytes={nbytes}&seed={seed}", close=True))
        status, length = await _read_head(reader)
        if status != 200:
            return Response(status, b"", False)
        if length != nbytes:
            raise Mismatch(f"slow download: Content-Length {length}, asked for {nbytes}")
        hasher, got = hashlib.sha256(), 0
        while got < nbytes:
            chunk = await reader.read(min(SLOW_READ_CHUNK, nbytes - got))
            if not chunk:
                raise asyncio.IncompleteReadError(b"x", nbytes - got)
            hasher.update(chunk)
            got += len(chunk)
            await asyncio.sleep(SLOW_READ_PAUSE)
        if hasher.hexdigest() != digest:
            raise Mismatch("slow download: wrong hash")
        return Response(200, b"", False)
    finally:
        writer.close()


async def aborted_download(addr: Addr, nbytes: int, reset: bool) -> Response:
    """GET /download of `nbytes`, read ABORT_AFTER bytes of the body, then reset (`reset`:
    SO_LINGER 0, an RST) or close (FIN) the connection mid-response."""
    reader, writer = await _connect(addr)
    try:
        writer.write(_get_head(f"/download?bytes={nbytes}&seed=1", close=False))
        status, _ = await _read_head(reader)
        if status != 200:
            return Response(status, b"", False)
        await reader.readexactly(ABORT_AFTER)
        return Response(200, b"", False)
    finally:
        if reset:
            writer.transport.abort()
        else:
            writer.close()


async def tcp_exchange(addr: Addr, payload: bytes) -> Response:
    """Send `payload` through the TCP listener, half-close, read the sink's count."""
    reader, writer = await _connect(addr)
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        line = await reader.readline()
        if line.strip() != str(len(payload)).encode():
            raise Mismatch(f"tcp: sent {len(payload)} bytes, the sink counted {line!r}")
        return Response(200, b"", False)
    finally:
        writer.close()


def mixed_kinds(client: MixedClient, http: Addr, tcp: Addr, scale: float = 1.0) -> list[Kind]:
    """The standard mix (about 140 requests/s at scale 1) against `http` (demo backends)
    and `tcp` (sinks)."""
    small, large = b"s" * KiB, bytes(range(256)) * (300_000 // 256) + b"x" * (300_000 % 256)
    chunked_digest = expected_download_sha256(64 * KiB, 7)
    slow_digest = expected_download_sha256(MiB, 3)
    resets = itertools.cycle((True, False))
    tcp_payloads = itertools.cycle([b"t" * (4 * KiB)] * 6 + [b"u" * (64 * KiB)] * 3
                                   + [b"v" * MiB])

    def kind(name: str, rate: float, timeout: float,
             send: Callable[[], Awaitable[Response]]) -> Kind:
        return Kind(name, rate * scale, timeout, send)

    return [
        kind("GET keep-alive", 80, 5, lambda: client.get(http)),
        kind("GET new connection", 20, 5, lambda: get_new_connection(http)),
        kind("POST 1 KiB", 15, 5, lambda: upload(client, http, small)),
        kind("POST 300 KB", 2, 10, lambda: upload(client, http, large)),
        kind("GET chunked 64 KiB", 10, 5,
             lambda: chunked_download(client, http, 64 * KiB, 7, chunked_digest)),
        kind("slow reader 1 MiB", 0.5, 30, lambda: slow_download(http, MiB, 3, slow_digest)),
        kind("aborted mid-response", 1, 10,
             lambda: aborted_download(http, 4 * MiB, next(resets))),
        kind("TCP send + count", 10, 10, lambda: tcp_exchange(tcp, next(tcp_payloads))),
    ]
