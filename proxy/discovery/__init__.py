"""Catalog watchers: one module per discovery kind, chosen by the config's `discovery`.

A watcher owns the conversation with one catalog for one upstream and emits only
complete answers (`CatalogAnswer`) to its sink, and only when the answer changed. It
never crashes: errors are reported to the sink and retried with jittered backoff.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from proxy.model import CatalogAnswer


class CatalogSink(Protocol):
    """What a watcher reports to (the upstream manager)."""

    def on_catalog_answer(self, answer: CatalogAnswer) -> None:
        """A complete, changed answer: every endpoint that may receive traffic."""

    def on_catalog_error(self, error: str) -> None:
        """The catalog could not be read; the last answer stays in force."""

    def on_catalog_alive(self) -> None:
        """The catalog answered, unchanged: the pool is fresh (clears staleness)."""


class Watcher(Protocol):
    async def run(self) -> None:
        """Watch until cancelled. Must not raise except CancelledError."""


@runtime_checkable
class Rereadable(Protocol):
    def reread(self) -> None:
        """Look at the catalog again now (SIGHUP), without waiting for the next change."""
