"""The access log: one line per HTTP exchange and per TCP connection, written off the loop.

The event loop hands over a record (a plain tuple, `Record`) with `AccessLog.add`, which
formats its line (logfmt or JSON: a few microseconds of CPU, no I/O) and appends it to a
bounded queue. A writer thread writes the queued lines in batches, so neither a slow disk
nor a pipe nobody reads can stall a request. Formatting in the writer instead would not
spare the loop that CPU (the GIL lets one thread run Python at a time) and would add
thread switches: measured under callgrind, about 8,000 more instructions per line. When the queue is full the record is dropped
and counted; when the destination cannot be opened or written (no such directory, no
permission, a full disk) the batch is dropped and counted, the error is logged once, and
the writer tries again with the next batch (opening again at most once per
REOPEN_INTERVAL). Requests never wait for, or fail because of, the access log.

`reopen()` (SIGUSR1) makes the writer close the file and open the path again, so that
logrotate can rename the file and signal, as with nginx's USR1. Destinations: a file path
(opened O_APPEND, created 0644), or "stdout"/"stderr" (never closed).

Must not know HTTP or TCP beyond the record's fields; must never be called from the
writer thread except by itself.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Final, cast

log = logging.getLogger("sdproxy.accesslog")

# One exchange or connection, as the event loop hands it over (formatted by the writer):
# (ts: unix seconds, upstream, client ip, client port, method, path (request target),
#  status (None: the client got none, or TCP), bytes_in, bytes_out (None: not counted),
#  duration in seconds, instance id ("" for sdproxy's own answers), attempts,
#  reason ("" unless sdproxy answered itself or retried), request id)
Record = tuple[float, str, bytes, int, bytes, bytes, int | None, int | None, int | None, float,
               str, int, str, bytes]

FIELDS: Final = ("ts", "upstream", "client", "method", "path", "status", "bytes_in",
                 "bytes_out", "duration_ms", "instance", "attempts", "reason", "request_id")
PATH_LIMIT: Final = 1024  # bytes of the request target kept in a line (SPEC)
STDOUT: Final = "stdout"
STDERR: Final = "stderr"
MAX_QUEUED: Final = 16384  # records waiting for the writer; beyond it they are dropped
# The writer waits this long after the first record of a batch before writing, so that a
# busy proxy writes a few large batches a second rather than a line per request.
FLUSH_DELAY: Final = 0.05
REOPEN_INTERVAL: Final = 1.0  # at most one attempt per second to open a failing path
DROP_REPORT_INTERVAL: Final = 10.0  # seconds between two log lines about a full queue
_FILE_FLAGS: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
# A logfmt value needs quotes when it holds a space, a quote, '=', a backslash or anything
# outside printable ASCII (go-logfmt's rule, plus non-ASCII: lines stay ASCII); a JSON
# string needs escapes for a quote, a backslash, control characters (and, kept ASCII,
# the rest). Values that need nothing are written as they are: the common case, fast.
_LOGFMT_UNSAFE: Final = re.compile(rb'[^\x21\x23-\x3c\x3e-\x5b\x5d-\x7e]')
_JSON_UNSAFE: Final = re.compile(rb'[^\x20\x21\x23-\x5b\x5d-\x7e]')
_KNOWN_LIMIT: Final = 4096  # cached quoted values, cleared when full


def _json_string(value: bytes) -> bytes:
    """`value` as a JSON string literal, quotes included; bytes that are not UTF-8 appear as
    `\\xNN` text, anything beyond ASCII as `\\uNNNN`."""
    return json.dumps(value.decode("utf-8", "backslashreplace")).encode()


def _logfmt_quoted(value: bytes) -> bytes:
    return _json_string(value)


def _json_inner(value: bytes) -> bytes:
    return _json_string(value)[1:-1]  # the template has the quotes


class _Format:
    """Turns records into lines (bytes, newline included) with one %-template.

    One per writer thread: its caches are not shared. What repeats from line to line is
    cached: the date and time of the current second, and the written form of the upstream,
    method, instance and reason (a few combinations serve nearly every line). `template`
    has `%N` for the status and the byte counts: `%d` when all three apply (nearly every
    line), else `absent` (`key=` in logfmt, `null` in JSON) where one does not.
    """

    __slots__ = ("_absent", "_date", "_escape", "_known", "_second", "_some_absent",
                 "_template", "_unsafe")

    def __init__(self, template: bytes, absent: bytes, unsafe: re.Pattern[bytes],
                 escape: Callable[[bytes], bytes]) -> None:
        self._template = template.replace(b"%N", b"%d")
        self._some_absent = template.replace(b"%N", b"%s")
        self._absent = absent
        self._unsafe = unsafe.search
        self._escape = escape
        self._second = -1
        self._date = b""
        self._known: dict[tuple[str, bytes, str, str], tuple[bytes, bytes, bytes, bytes]] = {}

    def _quote(self, value: bytes) -> bytes:
        return value if self._unsafe(value) is None else self._escape(value)

    def _known_values(self, key: tuple[str, bytes, str, str]) -> tuple[bytes, bytes, bytes,
                                                                        bytes]:
        known = self._known
        if len(known) >= _KNOWN_LIMIT:
            known.clear()
        upstream, method, instance, reason = key
        quote = self._quote
        written = known[key] = (quote(upstream.encode()), quote(method),
                                quote(instance.encode()), quote(reason.encode()))
        return written

    def line(self, record: Record) -> bytes:
        (ts, upstream, client_ip, client_port, method, target, status, bytes_in, bytes_out,
         duration, instance, attempts, reason, request_id) = record
        second = int(ts)
        if second != self._second:
            self._second = second
            self._date = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
        key = (upstream, method, instance, reason)
        known = self._known.get(key)
        if known is None:
            known = self._known_values(key)
        path = target[:PATH_LIMIT]
        if self._unsafe(path) is not None:
            path = self._escape(path)
        # A request id is usually ours (hex); one a client sent may hold anything.
        if not request_id.isalnum() and self._unsafe(request_id) is not None:
            request_id = self._escape(request_id)
        if b":" in client_ip:  # IPv6
            client_ip = b"[" + client_ip + b"]"
        if status is not None and bytes_in is not None and bytes_out is not None:
            return self._template % (
                self._date, int((ts - second) * 1000), known[0], client_ip, client_port,
                known[1], path, status, bytes_in, bytes_out, duration * 1000, known[2],
                attempts, known[3], request_id)
        absent = self._absent
        return self._some_absent % (
            self._date, int((ts - second) * 1000), known[0], client_ip, client_port,
            known[1], path, b"%d" % status if status is not None else absent,
            b"%d" % bytes_in if bytes_in is not None else absent,
            b"%d" % bytes_out if bytes_out is not None else absent, duration * 1000,
            known[2], attempts, known[3], request_id)


def logfmt_format() -> _Format:
    """`ts=... upstream=... client=... ...`; an empty or absent value is `key=`."""
    return _Format(b"ts=%s.%03dZ upstream=%s client=%s:%d method=%s path=%s status=%N "
                   b"bytes_in=%N bytes_out=%N duration_ms=%.3f instance=%s attempts=%d "
                   b"reason=%s request_id=%s\n", b"", _LOGFMT_UNSAFE, _logfmt_quoted)


def json_format() -> _Format:
    """One JSON object per line, keys in FIELDS order; an absent number is null."""
    return _Format(b'{"ts":"%s.%03dZ","upstream":"%s","client":"%s:%d","method":"%s",'
                   b'"path":"%s","status":%N,"bytes_in":%N,"bytes_out":%N,'
                   b'"duration_ms":%.3f,"instance":"%s","attempts":%d,"reason":"%s",'
                   b'"request_id":"%s"}\n', b"null", _JSON_UNSAFE, _json_inner)


FORMATS: Final[dict[str, Callable[[], _Format]]] = {
    "logfmt": logfmt_format,
    "json": json_format,
}


def format_line(record: Record, fmt: str = "logfmt") -> str:
    """One record as a line of `fmt`, without its newline (for tests and tools)."""
    return FORMATS[fmt]().line(record)[:-1].decode()


class AccessLog:
    """A destination, its format, the queue the loop fills and the thread that empties it.

    `add` and `reopen` are the only calls for the event loop; both return at once.
    """

    def __init__(self, destination: str, fmt: str = "logfmt", *,
                 max_queued: int = MAX_QUEUED, flush_delay: float = FLUSH_DELAY) -> None:
        self.destination = destination
        self.format = fmt
        self._format_line = FORMATS[fmt]().line  # on the event loop's thread only
        self._max_queued = max_queued
        self._flush_delay = flush_delay
        # Lines, and None for each sync() marker: the writer sets that marker (the first
        # of `_markers`) once it wrote every line queued before it.
        self._queue: deque[bytes | None] = deque()
        self._markers: deque[threading.Event] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reopen_requested = False
        self.dropped_full = 0  # records refused because the queue was full (loop thread)
        self.dropped_failed = 0  # lines lost to a destination that failed (writer thread)
        self.written = 0  # lines written (writer thread)
        self._fd: int | None = None
        self._failing = False  # the destination failed; the error was logged once
        self._next_open = 0.0  # monotonic time before which a failed path is not retried
        self._reported_full = 0  # dropped_full when it was last logged
        self._next_drop_report = 0.0
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_failed

    # -- the event loop's side ------------------------------------------------------------
    def add(self, record: Record) -> None:
        """Format and queue one line (never blocks): dropped when the queue is full."""
        queue = self._queue
        if len(queue) >= self._max_queued:
            self.dropped_full += 1
            return
        queue.append(self._format_line(record))
        if len(queue) == 1:  # the writer may be waiting: one wake-up per batch
            self._wake.set()

    def reopen(self) -> None:
        """Close and open the destination again before the next write (SIGUSR1)."""
        self._reopen_requested = True
        self._wake.set()

    def close(self, timeout: float = 2.0) -> bool:
        """Write what is queued, close, and end the thread; False if it took longer than
        `timeout` (a hung destination: the daemon thread is then left behind)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def sync(self, timeout: float = 5.0) -> bool:
        """Wait until every line added before this call was written or dropped. For tests
        and shutdown: it blocks, so never call it on the event loop."""
        marker = threading.Event()
        self._markers.append(marker)
        self._queue.append(None)
        self._wake.set()
        return marker.wait(timeout)

    # -- the writer thread ----------------------------------------------------------------
    def _run(self) -> None:
        crashed = False
        while True:
            self._wake.wait()
            self._wake.clear()
            stopping = self._stop.wait(self._flush_delay)  # let a batch gather
            try:
                self._write_queued()
            except Exception:
                # A bug costs the lines of this round, never the writer (nor a request).
                if not crashed:
                    crashed = True
                    log.exception("event=access_log_error op=writer")
            if stopping:
                break
        self._close_fd()

    def _write_queued(self) -> None:
        if self._reopen_requested:
            self._reopen()
        queue = self._queue
        take = queue.popleft
        while queue:
            taken = [take() for _ in range(len(queue))]
            markers = taken.count(None)
            lines = ([line for line in taken if line is not None] if markers
                     else cast(list[bytes], taken))
            if lines:
                self._write_lines(lines)
            for _ in range(markers):  # every line queued before each was written
                self._markers.popleft().set()
        dropped = self.dropped_full
        if dropped != self._reported_full and time.monotonic() >= self._next_drop_report:
            self._next_drop_report = time.monotonic() + DROP_REPORT_INTERVAL
            log.warning("event=access_log_dropped reason=queue_full lines=%d total=%d",
                        dropped - self._reported_full, dropped)
            self._reported_full = dropped

    def _reopen(self) -> None:
        """Open the path anew (logrotate renamed the file). A fresh start: a failure is
        logged again, and tried at once."""
        self._reopen_requested = False
        self._close_fd()
        self._failing = False
        self._next_open = 0.0
        if self._open() is not None:
            log.info("event=access_log_reopened path=%s", self.destination)

    def _write_lines(self, lines: list[bytes]) -> None:
        fd = self._fd if self._fd is not None else self._open()
        if fd is None:
            self.dropped_failed += len(lines)
            return
        data = b"".join(lines)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as e:
            self.dropped_failed += len(lines)
            self._fail("write", e)
            return
        self.written += len(lines)
        if self._failing:
            self._failing = False
            log.info("event=access_log_recovered path=%s dropped=%d", self.destination,
                     self.dropped_failed)

    def _open(self) -> int | None:
        if self.destination == STDOUT:
            self._fd = 1
        elif self.destination == STDERR:
            self._fd = 2
        else:
            now = time.monotonic()
            if now < self._next_open:
                return None
            try:
                self._fd = os.open(self.destination, _FILE_FLAGS, 0o644)
            except OSError as e:
                self._next_open = now + REOPEN_INTERVAL
                self._fail("open", e)
                return None
        return self._fd

    def _fail(self, what: str, error: OSError) -> None:
        if not self._failing:  # once per failure, not once per batch
            self._failing = True
            log.error('event=access_log_error path=%s op=%s error="%s" '
                      'detail="access log lines are dropped until it can be written"',
                      self.destination, what, error.strerror or error)

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and fd > 2:
            try:
                os.close(fd)
            except OSError:
                pass
