"""The upstream side of an HTTP exchange: one keep-alive connection to one instance.

A thin asyncio.Protocol around a response parser. While an exchange owns the connection,
every parser event and transport callback is forwarded to it; while idle in its host's
pool, any byte or close from the instance makes it unusable (it is then discarded).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Any

from proxy.l7.message import MessageHead, ParseError
from proxy.l7.parsers import PARSERS
from proxy.tls import ORIGINATIONS, log_connect_failure

if TYPE_CHECKING:
    from proxy.config import UpstreamTlsConfig
    from proxy.protocols.http_exchange import Exchange
    from proxy.upstream.host import Host


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
        self.exchange: Exchange | None = None
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

    def attach(self, exchange: Exchange, request_method: bytes, upgrade: bool = False) -> None:
        self.exchange = exchange
        self.parser.expect(request_method, upgrade)

    def _drop(self) -> None:
        """Out of step with its requests: never used again."""
        self.host.pool.discard(self)
        self.close()

    def park(self) -> bool:
        """Return the connection to its host's pool; False if it must be closed instead."""
        self.exchange = None
        if self.closed or self.host.draining or not self.host.pool.put(self):
            return False
        self.reused = True
        self.idle_since = self.loop.time()
        return True

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # bytes from an idle instance: protocol violation, drop it
            self._drop()
            return
        try:
            offset = self.parser.feed(data)
        except ParseError as e:
            offset = None
            self.close()
            exchange.on_upstream_error(self, f"invalid response: {e}")
        exchange.flush()
        if offset is not None:  # 101: what follows the head is the new protocol's
            exchange.on_upstream_switched(self, data[offset:])
        if exchange.settled is not None:  # the response ended in this read
            exchange.settle()

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

    # -- parser sink: forwarded to the owning exchange ----------------------------------
    def on_head(self, head: MessageHead) -> None:
        if len(head.headers) > self.max_fields:
            raise ParseError(f"response head with more than {self.max_fields} fields")
        if self.exchange is not None:
            self.exchange.on_response_head(self, head)
        else:  # a response nobody asked for (after the one that ended): out of step
            self._drop()

    def on_body(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange.on_response_body(data)
        else:  # bytes after the response ended (SPEC: never forwarded): out of step
            self._drop()

    def on_end(self) -> None:
        if self.exchange is not None:
            self.exchange.on_response_end(self)
        else:
            self._drop()


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
