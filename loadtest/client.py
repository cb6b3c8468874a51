"""An HTTP/1.1 client for load generation, over raw asyncio streams.

`HttpClient` keeps a bounded keep-alive pool per address, one request in flight per
connection, and never retries, never reconnects on its own and never hides a failure:
whatever the socket says is raised, for the load generator (`loadtest.load`) to count.
`read_response` reads one response (1xx skipped; Content-Length, chunked or until-close
bodies) and is pure enough to test on a fed StreamReader.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from typing import NamedTuple

POOL_SIZE = 1000  # connections per address the client may open


Addr = tuple[str, int]


class Response(NamedTuple):
    status: int
    body: bytes
    reused: bool  # sent on a kept-alive connection


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def stale(self) -> bool:
        """The peer closed it while it was idle (what any pooled client checks)."""
        return self.reader.at_eof() or self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class HttpClient:
    """HTTP/1.1 GETs over raw asyncio streams with a keep-alive pool per address.

    At most `pool_size` connections per address, one request in flight on each; a
    request takes an idle connection (dropping ones the peer closed meanwhile), else
    opens one, else waits for one to be released. It never retries, never reconnects
    on its own and never hides a failure: whatever the socket says is raised.
    """

    def __init__(self, pool_size: int = POOL_SIZE, host_header: str = "loadtest") -> None:
        self.pool_size = pool_size
        self.host_header = host_header
        self._idle: dict[Addr, list[_Conn]] = {}
        self._open: Counter[Addr] = Counter()
        self._waiters: dict[Addr, deque[asyncio.Future[None]]] = {}
        self.connects = 0

    async def get(self, addr: Addr, path: str = "/") -> Response:
        conn, reused = await self._acquire(addr)
        keep = False
        try:
            conn.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
                              "User-Agent: sdproxy-loadtest\r\n\r\n".encode())
            status, body, keep = await read_response(conn.reader)
            return Response(status, body, reused)
        finally:  # an exception or a cancellation (timeout) closes the connection
            self._release(addr, conn, keep)

    async def _acquire(self, addr: Addr) -> tuple[_Conn, bool]:
        while True:
            idle = self._idle.setdefault(addr, [])
            while idle:
                conn = idle.pop()
                if not conn.stale():
                    return conn, True
                conn.close()
                self._open[addr] -= 1
            if self._open[addr] < self.pool_size:
                self._open[addr] += 1
                try:
                    reader, writer = await asyncio.open_connection(*addr)
                except BaseException:
                    self._open[addr] -= 1
                    self._wake(addr)
                    raise
                self.connects += 1
                return _Conn(reader, writer), False
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(addr, deque()).append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()

    def _release(self, addr: Addr, conn: _Conn, keep: bool) -> None:
        if keep and not conn.stale():
            self._idle.setdefault(addr, []).append(conn)
        else:
            conn.close()
            self._open[addr] -= 1
        self._wake(addr)

    def _wake(self, addr: Addr) -> None:
        waiters = self._waiters.get(addr)
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """One response: (status, body, connection reusable). Skips 1xx; Content-Length,
    chunked or until-close bodies. IncompleteReadError when the peer closes early."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        try:
            status = int(rest[:3])
        except ValueError:
            raise ValueError(f"bad status line {lines[0]!r}") from None
        if 100 <= status < 200:
            continue
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip().lower()
        keep = version == "HTTP/1.1" and "close" not in headers.get("connection", "")
        if status in (204, 304):
            return status, b"", keep
        if "chunked" in headers.get("transfer-encoding", ""):
            parts: list[bytes] = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await _trailers(reader)
                    return status, b"".join(parts), keep
                parts.append((await reader.readexactly(size + 2))[:-2])
        if "content-length" in headers:
            return status, await reader.readexactly(int(headers["content-length"])), keep
        return status, await reader.read(), False  # until close


async def _trailers(reader: asyncio.StreamReader) -> None:
    while (await reader.readuntil(b"\r\n")) != b"\r\n":
        pass

