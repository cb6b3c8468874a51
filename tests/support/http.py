"""A minimal HTTP/1.x client on asyncio streams, for tests that must see the wire.

Why not aiohttp's client here: it retries an idempotent request once when a reused
keep-alive connection turns out closed, which would hide exactly the failures the
failover tests count, and it refuses to send malformed requests. This client:
- never retries and never reconnects on its own: one `RawConnection` is one TCP socket;
- sends whatever bytes it is given (`send`), or a request it formats (`request`);
- reads one response at a time (Content-Length, chunked, or until close), skipping
  1xx interim responses; every read is bounded by a timeout.
`paced_requests` drives a fixed request rate with one fresh connection per request.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Self

READ_LIMIT = 1 << 20  # StreamReader line limit: response heads up to 1 MiB


@dataclass
class Response:
    status: int
    reason: str
    version: str  # "HTTP/1.1"
    headers: list[tuple[str, str]]
    body: bytes
    closed: bool = False  # the body was delimited by the server closing the connection

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k.lower() == name]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class ProtocolError(Exception):
    """The server's bytes were not a valid HTTP/1.x response."""


@dataclass
class RawConnection:
    """One client TCP connection. Use `await RawConnection.open(addr)`; close when done."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    host_header: str = "localhost"
    _closed: bool = field(default=False, repr=False)

    @classmethod
    async def open(cls, addr: tuple[str, int], timeout: float = 5.0, *,
                   tls: ssl.SSLContext | None = None) -> RawConnection:
        """Connect to `addr` (with `tls`, over TLS: the handshake is part of `timeout`)."""
        host, port = addr
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=READ_LIMIT, ssl=tls), timeout)
        return cls(reader, writer, host_header=f"{host}:{port}")

    @property
    def local_port(self) -> int:
        return int(self.writer.get_extra_info("sockname")[1])

    async def send(self, data: bytes, timeout: float = 10.0) -> None:
        """Write raw bytes and wait until the transport's buffer drained (bounded)."""
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), timeout)

    async def request(
        self,
        method: str = "GET",
        path: str = "/",
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        version: str = "HTTP/1.1",
        host: str | None = None,
        close: bool = False,
        timeout: float = 10.0,
    ) -> Response:
        """Send one request and read its response.

        Adds `Host` (unless given in `headers` or `host=""`), `Content-Length` when there is
        a body (unless the caller framed it), and `Connection: close` when `close`.
        """
        names = {k.lower() for k, _ in headers}
        lines = [f"{method} {path} {version}"]
        if "host" not in names and host != "":
            lines.append(f"Host: {host or self.host_header}")
        lines += [f"{k}: {v}" for k, v in headers]
        if body and "content-length" not in names and "transfer-encoding" not in names:
            lines.append(f"Content-Length: {len(body)}")
        if close and "connection" not in names:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        await self.send(head + body, timeout)
        return await self.read_response(head_request=(method == "HEAD"), timeout=timeout)

    async def read_response(self, *, head_request: bool = False,
                            timeout: float = 10.0) -> Response:
        """Read the next final response (1xx skipped) within `timeout` seconds."""
        return await asyncio.wait_for(self._read_response(head_request), timeout)

    async def _read_response(self, head_request: bool) -> Response:
        while True:
            try:
                raw = await self.reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as e:
                if not e.partial:
                    raise ConnectionError("connection closed before a response") from None
                raise ProtocolError(f"truncated response head: {e.partial[:200]!r}") from None
            head = raw.decode("latin-1").split("\r\n")
            parts = head[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/"):
                raise ProtocolError(f"bad status line: {head[0]!r}")
            version, status = parts[0], int(parts[1])
            reason = parts[2] if len(parts) > 2 else ""
            headers: list[tuple[str, str]] = []
            for line in head[1:]:
                if not line:
                    continue
                k, sep, v = line.partition(":")
                if not sep:
                    raise ProtocolError(f"bad header line: {line!r}")
                headers.append((k.strip(), v.strip()))
            if 100 <= status < 200 and status != 101:
                continue
            resp = Response(status, reason, version, headers, b"")
            break
        te = (resp.header("transfer-encoding") or "").lower()
        cl = resp.header("content-length")
        if head_request or status in (204, 304) or status == 101:
            return resp
        if "chunked" in te:
            resp.body = await self._read_chunked()
        elif cl is not None:
            resp.body = await self.reader.readexactly(int(cl))
        else:
            resp.body = await self.reader.read(-1)
            resp.closed = True
        return resp

    async def _read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await self.reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                return bytes(out)
            out += await self.reader.readexactly(size)
            if await self.reader.readexactly(2) != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")

    async def wait_closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True once the server closed (EOF or reset) within `timeout`; False if still open.

        Raises ProtocolError if the server sends more bytes instead.
        """
        try:
            data = await asyncio.wait_for(self.reader.read(1), timeout)
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        if data:
            raise ProtocolError(f"unexpected bytes after the response: {data!r}")
        return True

    async def close(self) -> None:
        """Close the socket; never raises, never waits more than a second."""
        if self._closed:
            return
        self._closed = True
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        except (TimeoutError, OSError):
            pass

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def fetch(addr: tuple[str, int], method: str = "GET", path: str = "/", *,
                headers: Sequence[tuple[str, str]] = (), body: bytes = b"",
                timeout: float = 10.0, tls: ssl.SSLContext | None = None) -> Response:
    """One request on a fresh connection with `Connection: close`; no retry of any kind."""
    conn = await RawConnection.open(addr, timeout, tls=tls)
    try:
        return await conn.request(method, path, headers=headers, body=body, close=True,
                                  timeout=timeout)
    finally:
        await conn.close()


@dataclass
class Sample:
    """One request of a paced run; times are `time.monotonic()` seconds."""

    start: float
    end: float
    status: int | None
    body: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200


async def paced_requests(
    addr: tuple[str, int],
    *,
    rate: float,
    duration: float,
    path: str = "/",
    timeout: float = 5.0,
    stop: asyncio.Event | None = None,
    on_sample: Callable[[Sample], None] | None = None,
) -> list[Sample]:
    """GET `path` at `rate` per second for `duration` seconds (or until `stop` is set).

    Each request runs on its own fresh connection, concurrently with the others, so a slow
    one does not lower the rate. Returns every sample in start order once all finished
    (each bounded by `timeout`); errors are recorded in `Sample.error`, never raised.
    """

    async def one(start: float) -> Sample:
        try:
            resp = await fetch(addr, "GET", path, timeout=timeout)
            sample = Sample(start, time.monotonic(), resp.status, resp.text)
        except Exception as e:  # noqa: BLE001 - every failure is a data point here
            sample = Sample(start, time.monotonic(), None, "", f"{type(e).__name__}: {e}")
        if on_sample is not None:
            on_sample(sample)
        return sample

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    tasks: list[asyncio.Task[Sample]] = []
    i = 0
    while True:
        due = t0 + i / rate
        if due - t0 >= duration or (stop is not None and stop.is_set()):
            break
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(time.monotonic())))
        i += 1
    return list(await asyncio.gather(*tasks))


async def all_ok(addr: tuple[str, int], n: int) -> set[str]:
    """`n` GETs, each must answer 200; the set of bodies (backend names) that answered."""
    bodies = set()
    for _ in range(n):
        resp = await fetch(addr, timeout=3.0)
        assert resp.status == 200, (resp.status, resp.text)
        bodies.add(resp.text)
    return bodies


async def seconds_until(what: str, predicate: Callable[[], bool], timeout: float) -> float:
    """Poll `predicate` (blocking, so in a thread) until true; the seconds it took."""
    started = time.monotonic()
    while not await asyncio.to_thread(predicate):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started
