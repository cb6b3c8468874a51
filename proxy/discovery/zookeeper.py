"""ZooKeeper discovery: one upstream's instances as the children of `<base>/<name>`.

Owns the conversation with ZooKeeper for one upstream (SPEC "More registries"): a
session, the reads of the service znode's children and of each child's data, each read
leaving a ZooKeeper watch behind (one-shot: a fired watch is re-armed by the read it
causes), and what to report when the session is lost. What a child's data means is
`zookeeper_decode`'s, which is pure. Must not know: pools, balancers, breakers; it only
reports to its `CatalogSink`.

The client is kazoo, run in its own threads (a connection thread and kazoo's callback
threads); aiozk, the asyncio client, was tried first and left: it notices a dead server
only at its next heartbeat, waits up to 60 s (2^n, no jitter) between reconnection
attempts, and cannot close a client that never connected. Nothing of kazoo's blocks the
event loop: requests are queued with kazoo's `*_async` calls, and every callback from a
kazoo thread (request completions, watches, session state changes) is handed to the loop
with `call_soon_threadsafe`, so all of this module's state is touched by the loop's
thread only. Starting and stopping the client (thread starts and joins) run in a worker
thread of the watcher's own. Kazoo's own log lines (one per failed connection attempt)
stay out of sdproxy's log: the last one is quoted in this module's error instead.

How a change reaches the pool: a watch fires (children changed: the child list is read
again and new children's data; data changed or deleted: that child is read again), the
reads re-arm the watches, the answer is decoded and emitted when its endpoints differ.
The answer's index is the server's zxid when it was read (as X-Consul-Index is Consul's
Raft index): `/upstreams` shows it as `catalog_index`.

Session states (kazoo's, from Curator's): SUSPENDED (the connection dropped, the session
may live on) and LOST (the session expired or was closed) keep the last pool and report
an error, so `stale_seconds` grows from that moment; kazoo reconnects with jittered
backoff (capped at RECONNECT_MAX_DELAY) and, after an expiry, opens a new session. Every
CONNECTED is followed by a full read (watches may have been lost with the connection),
whose answer is emitted even when unchanged so the sink clears its staleness. Should kazoo
give up on a client (authentication failed), a new client is made after a backoff.

Invariants:
- `run()` never raises except `CancelledError`: connection loss, ACL refusals, timeouts,
  bad znodes, even a bug in decode or in the sink, are logged, reported with
  `sink.on_catalog_error("zookeeper <hosts>: <what>")` (once per distinct problem) and
  retried (after a jittered backoff, or when the session is back).
- `sink.on_catalog_answer` gets complete answers only: the first full read, each whose
  endpoints differ from the last emitted, the first after a problem. A service znode that
  does not exist is an answer with no instances (and an exists-watch for its creation).
- While connected and read, the pool is fresh by construction (the watches are armed):
  `on_catalog_alive()` is called every ALIVE_INTERVAL and at the moment the connection
  drops, so `last_update` and `stale_seconds` measure from the last moment it was known
  fresh. A znode left out by decode is logged when the set of such znodes changes.
- After cancellation nothing reaches the sink: callbacks still queued are dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import (
    ConnectionClosedError,
    ConnectionLoss,
    KazooException,
    NoAuthError,
    NoNodeError,
    SessionExpiredError,
)
from kazoo.protocol.states import EventType, KazooState, KeeperState
from kazoo.retry import KazooRetry

from proxy.config import UpstreamConfig, ZooKeeperConfig
from proxy.discovery import CatalogSink
from proxy.discovery.consul_decode import backoff_delay
from proxy.discovery.zookeeper_decode import decode
from proxy.model import CatalogAnswer, Endpoint

SESSION_TIMEOUT = 10.0  # what we ask for; the server bounds it (min 2, max 20 ticks)
RECONNECT_MAX_DELAY = 2.0  # kazoo's backoff between connection attempts: 0.1 s doubling
READ_TIMEOUT = SESSION_TIMEOUT  # one full read; a live connection answers in milliseconds
CONNECT_GRACE = 1.0  # not connected this long at start: report it (kazoo keeps trying)
ALIVE_INTERVAL = 5.0  # while connected: tell the sink the pool is fresh this often
BACKOFF_BASE = 0.1  # after a failed read: uniform(0, 0.1 s), doubling
BACKOFF_CAP = 5.0
LOST_CONNECTION = (ConnectionLoss, SessionExpiredError, ConnectionClosedError)


class LastWords(logging.Handler):
    """Keeps kazoo's latest warning (why a connection failed, e.g. "Connection dropped:
    socket connection error: Connection refused") for this module's own error line."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:  # a kazoo thread
        message = record.getMessage()
        if message != "Transition to CONNECTING":  # follows the line that says why
            self.last = message.removeprefix("Connection dropped: ")


def kazoo_logger(last_words: LastWords) -> logging.Logger:
    """A logger of the client's own, outside logging's registry: kazoo's per-attempt
    warnings (and tracebacks) go to `last_words`, not to sdproxy's one-event-per-line log."""
    # Unregistered on purpose: one per client, freed with it (getLogger's live forever).
    logger = logging.Logger("sdproxy.discovery.zookeeper.kazoo", logging.WARNING)  # noqa: LOG001
    logger.addHandler(last_words)
    logger.propagate = False
    return logger


def service_path(base: str, service: str) -> str:
    return f"{base.rstrip('/')}/{service}"


class ZooKeeperWatcher:
    """Watches the children of `<base>/<upstream name>` and reports changes to `sink`."""

    def __init__(self, zookeeper: ZooKeeperConfig, upstream: UpstreamConfig,
                 sink: CatalogSink, *, session_timeout: float = SESSION_TIMEOUT,
                 rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 log: logging.Logger | None = None) -> None:
        self.upstream = upstream
        self.sink = sink
        self.hosts = ",".join(str(a) for a in zookeeper.hosts)
        self.path = service_path(zookeeper.base, upstream.name)
        self.session_timeout = session_timeout
        self._rng = rng or random.Random()
        self._clock = clock
        self._log = log or logging.getLogger("sdproxy.discovery.zookeeper")
        self._name = upstream.name
        self._on_alive: Callable[[], None] | None = getattr(sink, "on_catalog_alive", None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None  # the KazooClient of this session
        self._wake = asyncio.Event()
        self._closed = False  # cancelled: callbacks still queued must not reach the sink
        self._last_words = LastWords()
        # Session and read state; the loop's thread only.
        self._connected = False
        self._client_gone = False  # kazoo gave up on this client (auth failed): a new one
        self._children_dirty = True  # read the child list (and re-arm its watch)
        self._dirty: set[str] = set()  # children whose data to read (and re-arm)
        self._data: dict[str, bytes] = {}  # child znode name -> its data
        self._emitted: tuple[Endpoint, ...] | None = None
        self._skipped: tuple[tuple[str, str], ...] = ()
        self._problem: str | None = None  # the error in force, reported once
        self._failures = 0  # consecutive failed reads, drives the backoff
        # The watch callable handed to kazoo: one object, so kazoo keeps one per path.
        self._watch = self._on_watch_threaded
        # Read by the admin API and tests.
        self.last_success: float | None = None  # clock() of the last full read
        self.errors = 0  # distinct problems reported since start
        self.reads = 0  # full or partial reads that succeeded

    # -- commands ---------------------------------------------------------------------
    def reread(self) -> None:
        """SIGHUP: read the children and their data again now. Loop thread only."""
        self._mark_all_dirty()
        self._wake.set()

    # -- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        self._loop = loop = asyncio.get_running_loop()
        # Starting and stopping a client start and join threads: one worker thread of our
        # own does both, so a stop always runs after the start it undoes.
        lifecycle = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zookeeper-start")
        try:
            while True:
                client = self._make_client()
                try:
                    await loop.run_in_executor(lifecycle, client.start_async)
                    await self._serve(client)  # returns when kazoo gave up on the client
                finally:
                    client.remove_listener(self._on_state_threaded)
                    # Submitted at once: a second cancellation cannot keep it from running.
                    await loop.run_in_executor(lifecycle, self._stop_client, client)
                self._failures += 1
                await asyncio.sleep(backoff_delay(self._failures - 1, self._rng,
                                                  base=BACKOFF_BASE, cap=BACKOFF_CAP))
        finally:
            self._closed = True
            lifecycle.shutdown(wait=False)  # what was submitted still runs

    def _make_client(self) -> Any:
        self._connected = self._client_gone = False
        client = KazooClient(
            hosts=self.hosts, timeout=self.session_timeout,
            connection_retry=KazooRetry(max_tries=-1, delay=0.1, backoff=2, max_jitter=0.5,
                                        max_delay=RECONNECT_MAX_DELAY),
            logger=kazoo_logger(self._last_words))
        client.add_listener(self._on_state_threaded)
        self._client = client
        return client

    def _stop_client(self, client: Any) -> None:
        """Close the session and join the client's threads (a worker thread); never raises."""
        try:
            client.stop()
            client.close()
        except Exception:  # noqa: BLE001 - a client that will not stop is dropped
            self._log.exception("event=zookeeper_stop_error upstream=%s", self._name)

    async def _serve(self, client: Any) -> None:
        while not self._client_gone:
            if not self._connected:
                self._wake.clear()  # the state change that woke us is handled: wait anew
                woken = await self._until_woken(CONNECT_GRACE if self._problem is None
                                                else ALIVE_INTERVAL)
                if not woken and not self._connected and self._problem is None:
                    self._on_problem(f"cannot connect{self._why()} (retrying)")
                continue
            self._wake.clear()  # before reading: a watch that fires meanwhile reads again
            try:
                await self._read(client)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - never crash (DESIGN habit 10)
                self._mark_all_dirty()
                self._failures += 1
                if isinstance(exc, LOST_CONNECTION) and await self._until_woken(CONNECT_GRACE):
                    continue  # the session state change it announced says what happened
                self._on_problem(self._describe(exc), exc)
                await self._until_woken(backoff_delay(self._failures - 1, self._rng,
                                                      base=BACKOFF_BASE, cap=BACKOFF_CAP))
                continue
            self._failures = 0
            if not await self._until_woken(ALIVE_INTERVAL):
                self._alive()

    async def _until_woken(self, timeout: float) -> bool:
        """Wait for a watch, a session change or reread(); False after `timeout`."""
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            return False
        return True

    async def _read(self, client: Any) -> None:
        """Read what the fired watches name (re-arming them) and publish the answer."""
        async with asyncio.timeout(READ_TIMEOUT):
            if self._children_dirty:
                self._children_dirty = False
                if not await self._read_children(client):
                    return  # created between two reads: _wake is set, read again
            dirty, self._dirty = self._dirty, set()
            names = sorted(dirty)
            answers = await asyncio.gather(
                *(self._ask(client.get_async(f"{self.path}/{name}", watch=self._watch))
                  for name in names), return_exceptions=True)
            for name, answer in zip(names, answers, strict=True):
                if isinstance(answer, NoNodeError):
                    self._data.pop(name, None)  # deleted since the listing: its watch fired
                elif isinstance(answer, BaseException):
                    raise answer
                else:
                    self._data[name] = answer[0] or b""
        self.reads += 1
        # The server's zxid as of the last answer (kazoo sets it before completing it).
        self._publish(int(client.last_zxid or 0))

    async def _read_children(self, client: Any) -> bool:
        """The child list, with a child watch; False when it should be read again."""
        try:
            children = await self._ask(client.get_children_async(self.path, watch=self._watch))
        except NoNodeError:
            # No service znode: no instances. An exists-watch says when it appears.
            if await self._ask(client.exists_async(self.path, watch=self._watch)) is not None:
                self._children_dirty = True
                self._wake.set()
                return False
            children = []
        names = set(children)
        for gone in self._data.keys() - names:
            del self._data[gone]
        self._dirty |= names - self._data.keys()
        return True

    def _ask(self, result: Any) -> asyncio.Future[Any]:
        """A kazoo IAsyncResult as a future of this loop (settled in the loop's thread)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(done: Any) -> None:  # the loop's thread
            if future.done():
                return  # cancelled (timeout, stop)
            if done.exception is not None:
                future.set_exception(done.exception)
            else:
                future.set_result(done.value)

        result.rawlink(lambda done: self._post(settle, done))
        return future

    # -- from kazoo's threads -----------------------------------------------------------
    def _post(self, callback: Callable[[Any], None], arg: Any) -> None:
        """Run `callback(arg)` in the loop's thread (called from a kazoo thread)."""
        loop = self._loop
        if loop is None or self._closed:
            return
        try:
            loop.call_soon_threadsafe(callback, arg)
        except RuntimeError:
            pass  # the loop is closed: the process is stopping

    def _on_state_threaded(self, state: str) -> None:
        # kazoo's finer state now (by the time the loop runs, kazoo may have moved on).
        keeper_state = getattr(self._client, "client_state", None)
        self._post(self._on_state, (state, keeper_state, self._last_words.last))

    def _on_watch_threaded(self, event: Any) -> None:
        self._post(self._on_watch, event)

    # -- in the loop's thread -------------------------------------------------------------
    def _on_state(self, change: tuple[str, str | None, str]) -> None:
        if self._closed:
            return
        state, keeper_state, why = change
        if state == KazooState.CONNECTED:
            self._connected = True
            self._mark_all_dirty()  # watches may have gone with the connection: read all
            self._log.info("event=zookeeper_connected upstream=%s hosts=%s session=%s",
                           self._name, self.hosts, self._session_hex())
        elif state == KazooState.SUSPENDED:
            self._connected = False
            self._alive()  # fresh until this moment: stale_seconds counts from here
            self._on_problem(f"connection lost{f' ({why})' if why else ''}; "
                             "keeping the last pool while reconnecting")
        elif state == KazooState.LOST and keeper_state == KeeperState.AUTH_FAILED:
            self._connected = False
            self._client_gone = True  # kazoo stops trying: _serve returns, run() starts anew
            self._on_problem("authentication failed; keeping the last pool")
        elif state == KazooState.LOST:
            self._connected = False
            self._on_problem("session expired; keeping the last pool, opening a new session")
        self._wake.set()

    def _on_watch(self, event: Any) -> None:
        if self._closed:
            return
        if event.type == EventType.CHILD or (event.path == self.path
                                             and event.type != EventType.NONE):
            self._children_dirty = True
        elif event.type in (EventType.CHANGED, EventType.DELETED, EventType.CREATED):
            self._dirty.add(event.path.rpartition("/")[2])
        else:
            return  # NONE: a session event; _on_state has it
        self._wake.set()

    def _mark_all_dirty(self) -> None:
        self._children_dirty = True
        self._dirty |= self._data.keys()

    # -- outcomes ---------------------------------------------------------------------
    def _publish(self, index: int) -> None:
        decoded = decode(self._data)
        if decoded.skipped != self._skipped:
            self._skipped = decoded.skipped
            for name, reason in decoded.skipped:
                self._log.warning("event=zookeeper_instance_skipped upstream=%s znode=%s "
                                  "reason=%s", self._name, json.dumps(f"{self.path}/{name}"),
                                  json.dumps(reason))
        recovered = self._problem is not None
        changed = self._emitted is None or decoded.endpoints != self._emitted
        if changed or recovered:
            self.sink.on_catalog_answer(CatalogAnswer(decoded.endpoints, index))
            self._emitted = decoded.endpoints  # only after the sink took it
            self._log.info("event=catalog_answer upstream=%s zookeeper=%s index=%d "
                           "endpoints=%d changed=%s recovered=%s", self._name,
                           json.dumps(self.path), index, len(decoded.endpoints),
                           str(changed).lower(), str(recovered).lower())
        elif self._on_alive is not None:
            self._on_alive()
        self._problem = None
        self.last_success = self._clock()

    def _alive(self) -> None:
        """The pool is fresh now (connected, read, watches armed), if it is."""
        if self._emitted is None or self._problem is not None or self._on_alive is None:
            return
        try:
            self._on_alive()
        except Exception:  # noqa: BLE001 - a broken sink must not stop the watch
            self._log.exception("event=sink_error upstream=%s", self._name)

    def _on_problem(self, what: str, exc: BaseException | None = None) -> None:
        if what == self._problem:
            return  # reported already; the last answer is still in force
        self._problem = what
        self.errors += 1
        if exc is not None and not isinstance(exc, (KazooException, TimeoutError)):
            # Not ZooKeeper: a bug (in decode or the sink). Keep the trace.
            self._log.error("event=catalog_bug upstream=%s", self._name, exc_info=exc)
        error = f"zookeeper {self.hosts}: {what}"
        self._log.warning("event=catalog_error upstream=%s zookeeper=%s error=%s", self._name,
                          json.dumps(self.path), json.dumps(error))
        try:
            self.sink.on_catalog_error(error)
        except Exception:  # noqa: BLE001 - a broken sink must not stop the watch
            self._log.exception("event=sink_error upstream=%s", self._name)

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, NoAuthError):
            return f"not allowed to read {self.path} (ZooKeeper ACL)"
        if isinstance(exc, TimeoutError):
            return f"no answer to a read within {READ_TIMEOUT:g}s"
        if isinstance(exc, KazooException):
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return f"internal error: {type(exc).__name__}: {exc}"

    def _why(self) -> str:
        return f": {self._last_words.last}" if self._last_words.last else ""

    def _session_hex(self) -> str:
        client_id = self._client.client_id if self._client is not None else None
        return f"0x{client_id[0]:x}" if client_id else "-"

