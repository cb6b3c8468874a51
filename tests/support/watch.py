"""What a catalog watcher's integration test needs: a recording sink and the watcher's task.

`QueueSink` is a `proxy.discovery.CatalogSink` that queues every answer and error for the
test to await (bounded by the sink's `step`, a failure bound, not a measurement); it has
no `on_catalog_alive`, so a watcher takes the path of a sink without one. `AliveSink`
adds it and counts the calls. `FailingOnceSink` raises from its first answer, as a buggy
sink would. `running(watcher)` runs `watcher.run()` as a task for the body of a `with`
and then `stop`s it: cancelled, within a bound, and ended by that cancellation only (a
watcher's `run()` must never end any other way).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from proxy.model import CatalogAnswer

T = TypeVar("T")
STEP = 2.0  # default bound for one expected report to arrive
STOP_TIMEOUT = 5.0  # bound for a cancelled run() to end


class QueueSink:
    """Records what the watcher reports, for the test to await."""

    def __init__(self, step: float = STEP) -> None:
        self.step = step
        self.answers: asyncio.Queue[CatalogAnswer] = asyncio.Queue()
        self.errors: asyncio.Queue[str] = asyncio.Queue()

    def on_catalog_answer(self, answer: CatalogAnswer) -> None:
        self.answers.put_nowait(answer)

    def on_catalog_error(self, error: str) -> None:
        self.errors.put_nowait(error)

    async def answer_where(self, pred: Callable[[CatalogAnswer], bool],
                           timeout: float | None = None) -> CatalogAnswer:
        """The next queued answer for which `pred` holds (earlier ones are dropped)."""
        return await self._next_where(self.answers, pred, timeout)

    async def error_where(self, pred: Callable[[str], bool],
                          timeout: float | None = None) -> str:
        """The next queued error for which `pred` holds (earlier ones are dropped)."""
        return await self._next_where(self.errors, pred, timeout)

    async def error(self, timeout: float | None = None) -> str:
        """The next queued error."""
        return await self.error_where(lambda _: True, timeout)

    async def _next_where(self, queue: asyncio.Queue[T], pred: Callable[[T], bool],
                          timeout: float | None) -> T:
        async with asyncio.timeout(self.step if timeout is None else timeout):
            while True:
                item = await queue.get()
                if pred(item):
                    return item

    def drain(self) -> list[CatalogAnswer]:
        """Every answer queued so far, in order, without waiting."""
        out = []
        while not self.answers.empty():
            out.append(self.answers.get_nowait())
        return out


class AliveSink(QueueSink):
    """A QueueSink that also hears of unchanged answers (`on_catalog_alive`)."""

    def __init__(self, step: float = STEP) -> None:
        super().__init__(step)
        self.alive = 0  # unchanged good answers

    def on_catalog_alive(self) -> None:
        self.alive += 1


class FailingOnceSink(QueueSink):
    """Raises from its first `on_catalog_answer`, then records as a QueueSink does."""

    calls = 0

    def on_catalog_answer(self, answer: CatalogAnswer) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("boom")
        super().on_catalog_answer(answer)


def ids(answer: CatalogAnswer) -> set[str]:
    return {e.id for e in answer.endpoints}


class Watcher(Protocol):
    def run(self) -> Coroutine[Any, Any, None]: ...


async def stop(task: asyncio.Task[None]) -> None:
    """Cancel a watcher's run() and check it ended by cancellation, within a bound."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        async with asyncio.timeout(STOP_TIMEOUT):
            await task
    # run() must only ever end by cancellation: no other exception escaped.
    assert task.cancelled()


@contextlib.asynccontextmanager
async def running(watcher: Watcher) -> AsyncIterator[asyncio.Task[None]]:
    """`watcher.run()` as a task for the body of the `async with`, then `stop`ped."""
    task = asyncio.create_task(watcher.run())
    try:
        yield task
    finally:
        await stop(task)
