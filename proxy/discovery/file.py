"""File discovery: watch one containerpilot services.json for one upstream.

Owns the conversation with the file: when to look (a stat every `poll_interval`, and at
once on `reread()`, which the app calls on SIGHUP), when to read it again, and what to
report. What the bytes mean is `file_decode`'s, which is pure. Must not know: pools,
balancers, breakers; it only reports to its `CatalogSink`.

How a change is noticed: the file's signature (device, inode, size, mtime, ctime) is
compared with the one of the last read. A rewrite in place changes size, mtime and ctime;
a replace by rename (the atomic way, and Kubernetes' symlink swap, since stat follows
links) changes the inode. ctime is there because a writer can restore mtime (`cp -p`,
`rsync -t`, `os.utime`) but never ctime. Timestamps are coarse (a kernel tick, a second on
some network file systems), so a file changed within `RACY_WINDOW_NS` of being read may
change again without its signature moving: such a read is not trusted and the next poll
reads again (git's "racily clean" rule). Reads are cheap; emission is only on change.

Invariants:
- `run()` never raises except `CancelledError`: a missing or unreadable file, a
  half-written one, even a bug in decode or in the sink, is logged, reported with
  `sink.on_catalog_error("file PATH: <what>")` and looked at again at the next poll.
- An error is reported once per distinct problem (while the file stays missing, one
  report, not four a second); the last good answer stays in force meanwhile.
- `sink.on_catalog_answer` gets complete answers only: the first good one, each one whose
  endpoints differ from the last emitted, and the first good one after an error (even if
  unchanged), so that the sink learns the catalog is fresh again. Before the first good
  read nothing is emitted: the upstream stays unanswered and `/ready` says not ready.
- The event loop never waits on the file system: stat and read run in a worker thread
  (`asyncio.to_thread`), because a stat on a network file system can block for seconds
  and the data path shares the loop. Time is injected (`clock`, `wall_ns`), and so is
  the stat, for tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from proxy.config import UpstreamConfig
from proxy.discovery import CatalogSink
from proxy.discovery.file_decode import MAX_FILE_BYTES, DecodeError, decode
from proxy.model import CatalogAnswer, Endpoint

POLL_INTERVAL = 0.25  # seconds between stats: SPEC asks for a change within a second
# A read of a file whose mtime or ctime is this recent is re-done at the next poll: a
# further write within the same timestamp tick would leave the signature unchanged.
RACY_WINDOW_NS = 1_000_000_000


class Signature(NamedTuple):
    """What a stat tells about a file's version; any difference means "read it again"."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int


def stat_signature(path: str) -> Signature:
    """os.stat (following symlinks) -> Signature; raises OSError."""
    st = os.stat(path)
    return Signature(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class Look:
    """What one look at the file saw: its signature, and its bytes if they were read."""

    signature: Signature
    data: bytes | None  # None: the signature is the known one, the file was not read
    racy: bool = False  # read too soon after a change to trust the signature


def look_at(path: str, known: Signature | None, stat: Callable[[str], Signature],
            wall_ns: Callable[[], int]) -> Look:
    """Stat `path` and read it unless its signature is `known`. Runs in a worker thread.

    The signature is taken before the read: if the file changes between the two, the
    next poll sees a signature other than the recorded one and reads again.
    """
    sig = stat(path)
    if sig == known:
        return Look(sig, None)
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)  # +1: decode reports a file that is too large
    racy = wall_ns() - max(sig.mtime_ns, sig.ctime_ns) < RACY_WINDOW_NS
    return Look(sig, data, racy)


def describe_os_error(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "missing"
    return f"cannot read: {exc.strerror or exc}"


def logfmt_value(text: str) -> str:
    """`text` as one logfmt value: bare when it is a simple token, else JSON-quoted."""
    if text and not any(c.isspace() or c in '"=\\' for c in text):
        return text
    return json.dumps(text)


class FileWatcher:
    """Watches `upstream.file` for the list under `upstream.name`; reports to `sink`."""

    def __init__(self, upstream: UpstreamConfig, sink: CatalogSink, *,
                 poll_interval: float = POLL_INTERVAL,
                 clock: Callable[[], float] = time.monotonic,
                 wall_ns: Callable[[], int] = time.time_ns,
                 stat: Callable[[str], Signature] = stat_signature,
                 log: logging.Logger | None = None) -> None:
        self.upstream = upstream
        self.sink = sink
        self.path = upstream.file
        self.poll_interval = poll_interval
        self._clock = clock
        self._wall_ns = wall_ns
        self._stat = stat
        self._log = log or logging.getLogger("sdproxy.discovery.file")
        self._name = upstream.name
        self._file_field = logfmt_value(self.path)
        # Signature of the last read we trust; None: read at the next look.
        self._known: Signature | None = None
        self._emitted: tuple[Endpoint, ...] | None = None
        self._problem: str | None = None  # the error in force, reported once
        self._forced = False  # reread() asked for a read whatever the signature says
        self._wake = asyncio.Event()
        # Read by the admin API and tests.
        self.last_success: float | None = None  # clock() of the last good read
        self.errors = 0  # distinct problems reported since start
        self.reads = 0  # times the file was read (not merely stat'ed)

    @property
    def endpoints(self) -> tuple[Endpoint, ...] | None:
        """The answer in force (last emitted), None before the first good read."""
        return self._emitted

    # -- commands ---------------------------------------------------------------------
    def reread(self) -> None:
        """Read the file now, even if its signature did not change (SIGHUP).

        Call from the event loop's thread (a loop signal handler is).
        """
        self._forced = True
        self._wake.set()

    # -- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            # Taken before the look: a reread() during it wakes the pause at once and
            # forces one more read, so a SIGHUP is never lost.
            force, self._forced = self._forced, False
            self._wake.clear()
            try:
                await self.poll_once(force=force)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - last resort: poll_once reports its own
                self._log.exception("event=catalog_bug upstream=%s file=%s", self._name,
                                    self._file_field)
                self._known = None  # read again next time rather than trust this one
            await self._pause()

    async def _pause(self) -> None:
        try:
            async with asyncio.timeout(self.poll_interval):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def poll_once(self, *, force: bool = False) -> None:
        """One look at the file and its report; `force` reads even an unchanged file."""
        try:
            look = await asyncio.to_thread(look_at, self.path, None if force else self._known,
                                           self._stat, self._wall_ns)
        except OSError as exc:
            self._known = None  # missing or unreadable: read whatever appears next
            self._on_problem(describe_os_error(exc))
            return
        if look.data is None:
            return  # unchanged since the last read we trust
        self.reads += 1
        self._known = None if look.racy else look.signature
        try:
            endpoints = decode(look.data, self._name)
        except DecodeError as exc:
            # Probably half-written: its writer's next write changes the signature.
            self._on_problem(str(exc))
            return
        self._on_endpoints(endpoints)

    # -- outcomes ---------------------------------------------------------------------
    def _on_endpoints(self, endpoints: tuple[Endpoint, ...]) -> None:
        recovered = self._problem is not None
        changed = self._emitted is None or endpoints != self._emitted
        if changed or recovered:
            try:
                self.sink.on_catalog_answer(CatalogAnswer(endpoints))
            except Exception:
                self._known = None  # the sink did not take it: offer it again next poll
                raise
            self._emitted = endpoints
            self._log.info("event=catalog_answer upstream=%s file=%s endpoints=%d "
                           "changed=%s recovered=%s", self._name, self._file_field,
                           len(endpoints), str(changed).lower(), str(recovered).lower())
        self._problem = None
        self.last_success = self._clock()

    def _on_problem(self, what: str) -> None:
        if what == self._problem:
            return  # reported already; the last good answer is still in force
        self._problem = what
        self.errors += 1
        self._log.warning("event=catalog_error upstream=%s file=%s error=%s", self._name,
                          self._file_field, json.dumps(what))
        try:
            self.sink.on_catalog_error(f"file {self.path}: {what}")
        except Exception:  # noqa: BLE001 - a broken sink must not stop the watch
            self._log.exception("event=sink_error upstream=%s", self._name)
