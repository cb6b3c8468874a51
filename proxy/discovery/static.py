"""Static discovery: the config's `endpoints` list, answered once."""

from __future__ import annotations

import asyncio

from proxy.config import UpstreamConfig
from proxy.discovery import CatalogSink
from proxy.model import CatalogAnswer, Endpoint


def decode(upstream: UpstreamConfig) -> CatalogAnswer:
    return CatalogAnswer(tuple(
        Endpoint(id=str(addr), address=addr.host, port=addr.port) for addr in upstream.endpoints))


class StaticWatcher:
    def __init__(self, upstream: UpstreamConfig, sink: CatalogSink) -> None:
        self.upstream = upstream
        self.sink = sink

    async def run(self) -> None:
        self.sink.on_catalog_answer(decode(self.upstream))
        await asyncio.Event().wait()  # nothing changes until a reload replaces the watcher
