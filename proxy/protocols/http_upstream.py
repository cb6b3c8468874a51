"""The upstream side of an HTTP exchange: one keep-alive connection to one instance.

A thin asyncio.Protocol around a response parser. While an exchange owns the connection,
every parser event and transport callback is forwarded to it; while idle in its host's
pool, any byte or close from the instance makes it unusable (it is then discarded).

`ConnectionOwner` is the exchange as this connection sees it: the events it reports.
http_exchange.Exchange implements them; declaring them here keeps this module free of
any import from there (the layers import downwards only: http -> http_exchange ->
http_upstream -> l7.exchange_core).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Any

from proxy.l7.exchange_core import (
    NOTHING,
    PARK,
    REJECT,
    RETRY_5XX,
    ExchangeCore,
)
from proxy.l7.message import MessageHead, ParseError
from proxy.l7.parsers import PARSERS
from proxy.tls import ORIGINATIONS, log_connect_failure
from proxy.upstream.host import Host

if TYPE_CHECKING:
    from proxy.tls import UpstreamTlsConfig


class ConnectionOwner(ExchangeCore):
    """An exchange that owns an UpstreamConnection: what the connection reports to it.
    A concrete class rather than a typing.Protocol, so that compiled calls bind. The
    response's head, body and end go straight to the core's methods; the connection
    carries out what they return (close, park) itself."""

    __slots__ = ("conn",)

    conn: UpstreamConnection | None  # the one carrying the attempt (set by the subclass)

    def on_upstream_switched(self, conn: UpstreamConnection, leftover: bytes) -> None:
        raise NotImplementedError

    def on_upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        raise NotImplementedError

    def on_upstream_error(self, conn: UpstreamConnection, detail: str) -> None:
        raise NotImplementedError

    def on_upstream_paused(self, paused: bool) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Write what the core queued for the client (`out`)."""
        raise NotImplementedError

    def end_of_read(self) -> None:
        """A read of the instance was handled: write what it produced for the client, in
        one write, and carry out the attempt's outcome if it was `settled` meanwhile."""
        raise NotImplementedError


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "closed",
        "exchange",
        "host",
        "idle_since",
        "loop",
        "max_fields",
        "parser",
        "reused",
        "transport",
    )

    def __init__(self, host: Host, parser_name: str, max_head: int, max_fields: int,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.host = host
        self.max_fields = max_fields
        self.transport: asyncio.Transport | None = None
        self.parser = PARSERS[parser_name][1](self, max_head)
        self.exchange: ConnectionOwner | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0  # when it was parked; the listener's sweep expires it
        self.loop = loop

    # -- pool interface -----------------------------------------------------------------
    def is_usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def attach(self, exchange: ConnectionOwner, request_method: bytes, upgrade: bool = False) -> None:
        self.exchange = exchange
        self.parser.expect(request_method, upgrade)

    def _drop(self) -> None:
        """Out of step with its requests: never used again."""
        self.host.pool.discard(self)
        self.close()

    def park(self, now: float) -> bool:
        """Return the connection to its host's pool, idle since monotonic `now` (the
        clock of the read that ended its response); False if it must be closed instead."""
        self.exchange = None
        if self.closed or self.host.draining or not self.host.pool.put(self):
            return False
        self.reused = True
        self.idle_since = now
        return True

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # bytes from an idle instance: protocol violation, drop it
            self._drop()
            return
        exchange.read_at = self.loop.time()  # the one clock read for this read
        try:
            offset = self.parser.feed(data)
        except ParseError as invalid:
            offset = None
            self.close()
            exchange.on_upstream_error(self, f"invalid response: {invalid}")
        if offset is not None:  # 101: what follows the head is the new protocol's
            exchange.flush()
            exchange.on_upstream_switched(self, data[offset:])
        exchange.end_of_read()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        exchange = self.exchange
        if exchange is not None:
            exchange.on_upstream_lost(self, exc)
        else:
            self.host.pool.discard(self)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.on_upstream_paused(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.on_upstream_paused(False)

    # -- parser sink: to the owning exchange's core; its answers carried out here -------
    def on_head(self, head: MessageHead) -> None:
        if len(head.headers) > self.max_fields:
            raise ParseError(f"response head with more than {self.max_fields} fields")
        exchange = self.exchange
        if exchange is None:  # a response nobody asked for (after the one that ended)
            self._drop()
            return
        if exchange.conn is not self:
            return
        action = exchange.response_head_received(head, exchange.read_at)
        if action == REJECT:
            exchange.on_upstream_error(self, "101 without an upgrade on offer")
            self.close()
        elif action == RETRY_5XX:  # its body is not read: the connection goes
            exchange.conn = None
            self.exchange = None
            self.close()

    def on_body(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.response_body(data)
        else:  # bytes after the response ended (SPEC: never forwarded): out of step
            self._drop()

    def on_end(self) -> None:
        exchange = self.exchange
        if exchange is None:
            self._drop()
            return
        if exchange.conn is not self:
            return
        action = exchange.response_end()
        if action == NOTHING:
            return
        exchange.conn = None
        self.exchange = None  # what the instance sends after this is owed to nobody
        if action != PARK or not self.park(exchange.read_at):
            self.close()


async def connect(host: Host, parser_name: str, max_head: int, max_fields: int,
                  timeout: float, tls: UpstreamTlsConfig | None = None) -> UpstreamConnection:
    """Open a new connection to `host` within `timeout` (OSError or TimeoutError).

    With `tls` ([upstreams.tls]) the TLS handshake is part of the connect and of its
    timeout; a certificate that does not verify is an OSError (ssl.SSLError) like a
    refused connect, so the caller fails over and charges the breaker, and it is logged
    here with the instance and the reason.
    """
    loop = asyncio.get_running_loop()
    ep = host.endpoint
    factory: Any = lambda: UpstreamConnection(host, parser_name, max_head, max_fields, loop)
    if tls is None:
        async with asyncio.timeout(timeout):
            _transport, conn = await loop.create_connection(factory, ep.address, ep.port)
        return conn  # type: ignore[no-any-return]
    origination = ORIGINATIONS.get(tls)
    try:
        async with asyncio.timeout(timeout):
            _transport, conn = await loop.create_connection(
                factory, ep.address, ep.port, ssl=origination.context,
                server_hostname=origination.server_name)
    except ssl.SSLError as e:
        log_connect_failure(origination, host.id, e)
        raise
    return conn  # type: ignore[no-any-return]
