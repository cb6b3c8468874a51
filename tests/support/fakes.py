"""Stand-ins the code under test is handed instead of the real thing, no I/O.

- `FakeClock`: a clock (`clock()` -> seconds) that moves only when the test moves it, for
  the `clock=`/`monotonic=` a component takes (DESIGN "Inject time").
- `State` and `Listener`: what `proxy.admin` reads (`proxy.admin.state.AppState` and a
  listener's counters), without an application around them.
- `serve_admin(state)`: the admin API (`proxy.admin.server.start_admin`) on a free
  loopback port, as the composition root runs it, with a client session and its base URL.
- `HeadSink` and `parse_request`: the heads a real parser (httptools or h11) makes of
  bytes, for tests of what is done with a head.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from proxy.admin.server import start_admin
from proxy.devconsul import free_port
from proxy.l7.message import MessageHead
from proxy.l7.parsers import PARSERS
from proxy.model import Address
from proxy.upstream.manager import UpstreamRuntime

T0 = 1_700_000_000.0  # a wall-clock reading (unix time) for tests that need one


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Listener:
    connections: int = 0
    rejected_connections: int = 0


@dataclass
class State:
    upstreams: dict[str, UpstreamRuntime]
    listeners: dict[str, Any] = field(default_factory=dict)
    started_at: float = T0


class HeadSink:
    """A parser sink that keeps the heads the parser makes (bodies are dropped)."""

    def __init__(self) -> None:
        self.heads: list[MessageHead] = []

    def on_head(self, head: MessageHead) -> None:
        self.heads.append(head)

    def on_body(self, data: bytes) -> None:
        pass

    def on_end(self) -> None:
        pass


def parse_request(raw: bytes, parser: str = "httptools") -> MessageHead:
    """The head `parser` (a name in proxy.l7.parsers.PARSERS) makes of one request."""
    sink = HeadSink()
    PARSERS[parser][0](sink, 65536).feed(raw)
    (head,) = sink.heads
    return head


@asynccontextmanager
async def serve_admin(state: Any) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """start_admin on a free loopback port; (a client session, `http://127.0.0.1:PORT`)."""
    port = free_port()
    runner = await start_admin(state, Address("127.0.0.1", port))
    try:
        async with aiohttp.ClientSession() as session:
            yield session, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
