"""asyncio.Protocol shells, one listener kind per `mode`.

A listener serves one upstream on one address: `protocol_factory()` makes the Protocol
for each accepted connection; `connections`/`rejected_connections` feed the admin API;
`busy()` and `close_all()` let shutdown drain it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from proxy.upstream.manager import UpstreamRuntime


class Listener(Protocol):
    connections: int
    rejected_connections: int

    def protocol_factory(self) -> asyncio.BaseProtocol: ...

    def busy(self) -> bool: ...

    def close_all(self) -> None: ...


def _http(runtime: UpstreamRuntime, loop: asyncio.AbstractEventLoop) -> Listener:
    from proxy.protocols.http import HttpListener

    return HttpListener(runtime, loop)


def _tcp(runtime: UpstreamRuntime, loop: asyncio.AbstractEventLoop) -> Listener:
    from proxy.protocols.tcp import TcpListener

    return TcpListener(runtime, loop)


LISTENERS: dict[str, Callable[[UpstreamRuntime, asyncio.AbstractEventLoop], Listener]] = {
    "http": _http,
    "tcp": _tcp,
}


def make_listener(runtime: UpstreamRuntime, loop: asyncio.AbstractEventLoop) -> Listener:
    mode = runtime.config.mode
    if mode not in LISTENERS:
        raise KeyError(f"mode {mode!r} is not available (available: {', '.join(LISTENERS)})")
    return LISTENERS[mode](runtime, loop)
