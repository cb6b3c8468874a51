"""FileWatcher on a real file in tmp_path with the real poll loop, then the whole proxy.

The first part runs the watcher as a task with a recording sink; every wait is for an
event (`asyncio.timeout` around a queue), never sleep-and-check. Delays from a change
to the answer are printed (`pytest -s`) and held to SPEC's "within a second".

The last test runs real processes: two demo backends and `python -m proxy run` on a
config with `discovery = "file"`, and moves traffic by rewriting the services file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.procs import Backend, ProxyProcess, launch_backends, launch_proxy
from support.tomlconf import toml_table
from support.watch import QueueSink, ids, running

from proxy.config import UpstreamConfig
from proxy.devconsul import free_port
from proxy.discovery.file import FileWatcher
from proxy.model import Address

SPEC_DELAY = 1.0  # SPEC: a change is picked up within a second
STEP = 2.0  # bound for one expected report to arrive (a failure, not a measurement)


def content(*entries: str, name: str = "web") -> str:
    return json.dumps({name: list(entries), "other-service": ["10.9.9.9:9"]})


def write_in_place(path: Path, text: str) -> None:
    """Truncate and rewrite the same inode, as `echo > file` or an editor without backup."""
    with open(path, "w") as f:
        f.write(text)


def replace_atomically(path: Path, text: str) -> None:
    """Write a sibling and rename it over `path` (new inode), as well-behaved writers do."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.asynccontextmanager
async def watching(path: Path, **kw: Any) -> AsyncIterator[tuple[FileWatcher, QueueSink]]:
    sink = QueueSink(STEP)
    upstream = UpstreamConfig(name="web", listen=Address("127.0.0.1", 0), discovery="file",
                              file=str(path))
    watcher = FileWatcher(upstream, sink, **kw)
    async with running(watcher):  # run() ends only by cancellation: nothing else escaped
        yield watcher, sink


# -- the watcher on a real file ------------------------------------------------------------
async def test_in_place_rewrite_is_picked_up_within_a_second(tmp_path: Path) -> None:
    path = tmp_path / "services.json"
    path.write_text(content("10.0.0.1:80"))
    async with watching(path) as (_, sink):
        await sink.answer_where(lambda a: ids(a) == {"10.0.0.1:80"})
        ino = path.stat().st_ino
        started = time.perf_counter()
        write_in_place(path, content("10.0.0.1:80", "10.0.0.2:80"))
        await sink.answer_where(lambda a: ids(a) == {"10.0.0.1:80", "10.0.0.2:80"})
        delay = time.perf_counter() - started
        print(f"\nin-place rewrite -> answer: {delay * 1000:.1f} ms")
        assert path.stat().st_ino == ino
        assert delay < SPEC_DELAY


async def test_atomic_replace_is_picked_up_within_a_second(tmp_path: Path) -> None:
    path = tmp_path / "services.json"
    path.write_text(content("10.0.0.1:80", "10.0.0.2:80"))
    async with watching(path) as (_, sink):
        await sink.answer_where(lambda a: ids(a) == {"10.0.0.1:80", "10.0.0.2:80"})
        ino = path.stat().st_ino
        started = time.perf_counter()
        replace_atomically(path, content("10.0.0.2:80"))
        await sink.answer_where(lambda a: ids(a) == {"10.0.0.2:80"})
        delay = time.perf_counter() - started
        print(f"\nrename (os.replace) -> answer: {delay * 1000:.1f} ms")
        assert path.stat().st_ino != ino
        assert delay < SPEC_DELAY


async def test_half_written_file_keeps_the_last_pool_and_reports(tmp_path: Path) -> None:
    path = tmp_path / "services.json"
    good = content("10.0.0.1:80", "10.0.0.2:80")
    path.write_text(good)
    async with watching(path) as (watcher, sink):
        first = await sink.answer_where(lambda a: True)
        write_in_place(path, good[: len(good) // 2])  # the writer stopped halfway
        error = await sink.error_where(lambda e: True)
        assert error.startswith(f"file {path}: invalid JSON: ")
        # The error was reported by the look that read the broken file; an answer from
        # that look would already be queued.
        assert sink.answers.empty()
        assert watcher.endpoints == first.endpoints
        write_in_place(path, good.replace("10.0.0.2:80", "10.0.0.3:80"))
        await sink.answer_where(lambda a: ids(a) == {"10.0.0.1:80", "10.0.0.3:80"})
        assert sink.errors.empty()  # one report for one problem


async def test_deleted_then_restored(tmp_path: Path) -> None:
    path = tmp_path / "services.json"
    path.write_text(content("10.0.0.1:80"))
    async with watching(path) as (watcher, sink):
        first = await sink.answer_where(lambda a: True)
        path.unlink()
        assert await sink.error_where(lambda e: True) == f"file {path}: missing"
        assert sink.answers.empty() and watcher.endpoints == first.endpoints
        path.write_text(content("10.0.0.1:80"))
        # Unchanged, but the first good read after an error is emitted: the sink learns
        # the catalog is fresh again.
        again = await sink.answer_where(lambda a: True)
        assert again.endpoints == first.endpoints
        assert sink.errors.empty()


async def test_missing_at_start_emits_nothing_until_the_file_appears(tmp_path: Path) -> None:
    path = tmp_path / "services.json"
    async with watching(path) as (watcher, sink):
        assert await sink.error_where(lambda e: True) == f"file {path}: missing"
        assert sink.answers.empty() and watcher.endpoints is None
        replace_atomically(path, content("10.0.0.1:80"))
        await sink.answer_where(lambda a: ids(a) == {"10.0.0.1:80"})


async def test_reread_reads_at_once_although_mtime_and_size_did_not_change(
        tmp_path: Path) -> None:
    path = tmp_path / "services.json"
    path.write_text(content("10.0.0.1:80"))
    old = time.time_ns() - 3600 * 10**9
    os.utime(path, ns=(old, old))
    # A poll a minute away: only reread() can make the watcher look within the test.
    async with watching(path, poll_interval=60.0) as (watcher, sink):
        await sink.answer_where(lambda a: ids(a) == {"10.0.0.1:80"})
        before = path.stat()
        write_in_place(path, content("10.0.0.7:80"))  # same length
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = path.stat()
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        started = time.perf_counter()
        watcher.reread()
        await sink.answer_where(lambda a: ids(a) == {"10.0.0.7:80"}, timeout=SPEC_DELAY)
        print(f"\nreread() -> answer: {(time.perf_counter() - started) * 1000:.1f} ms")


# -- the whole proxy -----------------------------------------------------------------------
@pytest.fixture
def backends() -> Iterator[Callable[..., list[Backend]]]:
    """`backends("a", "b")`: demo backends; each stopped with SIGTERM, then killed."""
    started: list[Backend] = []

    def _start(*names: str) -> list[Backend]:
        new = launch_backends([(n, 0) for n in names])
        started.extend(new)
        return new

    yield _start
    for b in started:
        # stop_signal SIGKILLs past its timeout (and re-raises); cleanup reaps what is left.
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            b.stop_signal(signal.SIGTERM, timeout=5.0)
        b.cleanup()


def get_body(addr: tuple[str, int]) -> str:
    host, port = addr
    with urllib.request.urlopen(f"http://{host}:{port}/", timeout=5.0) as resp:
        assert resp.status == 200
        return str(resp.read().decode())


def test_proxy_routes_by_the_file_and_follows_a_rewrite(
        tmp_path: Path, backends: Callable[..., list[Backend]]) -> None:
    a, b = backends("file-a", "file-b")
    services = tmp_path / "services.json"
    services.write_text(json.dumps({"filesvc": [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]}))
    config = "\n".join([
        toml_table("[admin]", {"listen": f"127.0.0.1:{free_port()}"}),
        toml_table("[defaults]", {"drain_timeout": "2s"}),
        toml_table("[[upstreams]]", {"name": "filesvc", "listen": f"127.0.0.1:{free_port()}",
                                     "mode": "http", "discovery": "file",
                                     "file": str(services)}),
    ])
    proxy: ProxyProcess = launch_proxy(config)  # waits for event=listening and /ready 200
    try:
        addr = proxy.listen("filesvc")
        seen = {get_body(addr) for _ in range(10)}
        assert seen == {"file-a", "file-b"}

        started = time.monotonic()
        write_in_place(services, json.dumps({"filesvc": [f"127.0.0.1:{b.port}"]}))
        last_a = started  # when a request last reached file-a after the rewrite
        streak = 0
        deadline = started + 5.0
        while streak < 50:  # traffic has moved once 50 requests in a row reach file-b
            assert time.monotonic() < deadline, "traffic never moved to file-b alone"
            body = get_body(addr)
            if body == "file-a":
                last_a, streak = time.monotonic(), 0
            else:
                assert body == "file-b"
                streak += 1
        delay = last_a - started
        print(f"\nproxy: file rewrite -> traffic only to file-b: {delay * 1000:.1f} ms")
        assert delay < SPEC_DELAY
        answers = proxy.events("catalog_answer")
        assert answers and all(e.get("file") == str(services) for e in answers)
    finally:
        code = proxy.stop(timeout=10.0)  # SIGTERM, then SIGKILL of its group
        proxy.cleanup()
    assert code == 0
