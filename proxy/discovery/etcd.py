"""etcd discovery: one v3 watch per upstream on Registrator's keys, through etcd's JSON gateway.

Owns the conversation with etcd for one upstream: a linearizable range of every key under
`<prefix>/<service>/` (the complete answer, at a revision), then a watch from that
revision + 1 that streams every later PUT and DELETE (a TTL lapse is a DELETE), the
probe that tells a quiet stream from a dead one, reconnection with jittered backoff
across the configured endpoints, and the aiohttp session when none is handed in. What
keys and answers mean is `etcd_decode`'s, which is pure. Must not know: pools, balancers,
breakers; it only reports to its `CatalogSink`.

Why the JSON gateway over aiohttp rather than a gRPC client (aetcd): aiohttp is already
here, the gateway is part of every etcd 3.4+ server (`/v3/kv/range`, `/v3/watch` as a
stream of one JSON object a line), and grpcio would add a large compiled dependency and
its threads to a process whose idle size is a target.

Rules:
- Every (re)connection starts with a fresh range: after any error the watcher knows
  nothing it did not read again, so a restarted or restored etcd, or another member with
  other history, cannot leave a stale key in the pool. The watch starts at the range's
  revision + 1, so no change between the two is lost.
- A watch that etcd cancels because its start revision was compacted (it fell behind)
  is read again at once: no error, no backoff.
- Liveness: the watch asks for `hasleader` (gRPC metadata through the gateway), so a
  member that loses its leader ends the stream instead of going quiet. While the stream
  is quiet for `probe_interval`, one count-only range (linearizable: it needs a leader)
  must answer within `PROBE_TIMEOUT`; if it does not, the stream is dropped and the
  watcher reconnects (to the next endpoint, if there are several). A probe is not a
  poll: it reads no keys, and no change is learnt from it.
- `run()` never raises except `CancelledError`: connection refused, a stream that ends,
  a gateway error, bad JSON, even a bug in decode or in the sink, is logged, reported
  with `sink.on_catalog_error("etcd <endpoint>: <what>")` and retried after backoff,
  and the last pool stays in force (its `stale_seconds` grows).
- `sink.on_catalog_answer` gets the first answer, each one whose endpoints differ from
  the last emitted, and the first one after errors (even if unchanged), so the sink can
  clear its staleness. Every other sign of life (a watch message that changes nothing,
  a probe that answered) calls the sink's optional `on_catalog_alive()`.
- Time and randomness are injected (`clock`, `rng`); the only sleeping is in `_pause`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.config import EtcdConfig, UpstreamConfig
from proxy.discovery import CatalogSink
from proxy.discovery.consul_decode import backoff_delay
from proxy.discovery.etcd_decode import (
    Decoded,
    EtcdAnswerError,
    EtcdDecodeError,
    WatchMessage,
    apply_events,
    decode_entries,
    decode_range,
    decode_watch_line,
    probe_request,
    range_request,
    service_prefix,
    watch_request,
)
from proxy.model import CatalogAnswer, Endpoint

CONNECT_TIMEOUT = 3.0
REQUEST_TIMEOUT = 5.0  # a range: one small linearizable read
PROBE_INTERVAL = 5.0  # a stream quiet this long is probed
PROBE_TIMEOUT = 3.0
BACKOFF_BASE = 0.1  # first retry after an error waits uniform(0, 0.1 s)
BACKOFF_CAP = 5.0
MAX_LINE = 64 * 1024 * 1024  # one watch message; etcd's own default limit is 1.5 MiB a
# request, but a message carries many events
ERROR_BODY_CHARS = 200
# gRPC metadata through the gateway (its "Grpc-Metadata-" prefix): etcd's
# rpctypes.MetadataRequireLeaderKey, which ends the stream when the member has no leader.
REQUIRE_LEADER = {"Grpc-Metadata-hasleader": "true"}


class EtcdHTTPError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}" if body else f"HTTP {status}")


class StreamEnded(Exception):
    """The watch stream ended (the server closed it, or went away)."""


class WatchCanceled(Exception):
    """etcd canceled the watch for another reason than compaction."""


class ProbeFailed(Exception):
    """The stream was quiet and the probe got no answer in time."""


class Compacted(Exception):
    """The watch's start revision was compacted: read the range again."""


class EtcdWatcher:
    """Watches one upstream's keys in etcd and reports changes to `sink`."""

    def __init__(self, etcd: EtcdConfig, upstream: UpstreamConfig, sink: CatalogSink, *,
                 session: aiohttp.ClientSession | None = None,
                 rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 probe_interval: float = PROBE_INTERVAL,
                 log: logging.Logger | None = None) -> None:
        self.config = etcd
        self.upstream = upstream
        self.sink = sink
        self._session = session
        self._rng = rng or random.Random()
        self._clock = clock
        self.probe_interval = probe_interval
        self._log = log or logging.getLogger("sdproxy.discovery.etcd")
        self.endpoints = tuple(e.rstrip("/") for e in etcd.endpoints) or ("",)
        self.start = service_prefix(etcd.prefix, upstream.name)
        self._endpoint = 0  # index into endpoints of the one in use
        self._entries: dict[bytes, bytes] = {}  # every key under `start` -> its value
        self._emitted: tuple[Endpoint, ...] | None = None
        self._failures = 0  # consecutive errors, drives the backoff
        self._rejected: dict[str, str] = {}  # keys left out last time -> why
        self._heard = 0.0  # clock() when etcd last said something on this connection
        # Optional sink method, looked up as consul.py does.
        self._on_alive: Callable[[], None] | None = getattr(sink, "on_catalog_alive", None)
        # Read by the admin API and tests.
        self.revision = 0  # the store revision our entries are as of
        self.last_success: float | None = None
        self.errors = 0
        self.compactions = 0  # watches re-read because etcd compacted their start

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._endpoint]

    # -- the loop -----------------------------------------------------------------------
    async def run(self) -> None:
        session = self._session
        owned = session is None
        if session is None:
            # No total timeout (the watch is a stream that lasts); each call sets its own.
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        try:
            while True:
                try:
                    delay = await self.watch_once(session)
                except Exception:  # noqa: BLE001 - last resort: watch_once reports its own
                    self._log.exception("event=catalog_bug upstream=%s", self.upstream.name)
                    delay = BACKOFF_CAP
                await self._pause(delay)
        finally:
            if owned:
                await session.close()

    async def _pause(self, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)

    async def watch_once(self, session: aiohttp.ClientSession) -> float:
        """Range, then watch until the stream breaks; returns the delay before the next
        attempt (0 after a compaction, the backoff after an error)."""
        try:
            await self._range(session)
            await self._watch(session)
        except asyncio.CancelledError:
            raise
        except Compacted:
            self.compactions += 1
            self._log.info("event=etcd_compacted upstream=%s revision=%d", self.upstream.name,
                           self.revision)
            return 0.0
        # Never crash (DESIGN habit 10): whatever failed, report it, back off, try again.
        except Exception as exc:  # noqa: BLE001
            return self._on_error(exc)
        raise AssertionError("unreachable: _watch returns only by raising")

    # -- requests -----------------------------------------------------------------------
    async def _post(self, session: aiohttp.ClientSession, path: str, body: dict[str, Any],
                    timeout: float) -> Any:
        limits = aiohttp.ClientTimeout(total=timeout, sock_connect=CONNECT_TIMEOUT)
        async with session.post(self.endpoint + path, json=body, timeout=limits) as resp:
            text = await resp.text()
            if resp.status != 200:
                _raise_gateway_error(resp.status, text)
        try:
            return json.loads(text)
        except ValueError as exc:
            raise EtcdDecodeError(f"invalid JSON: {exc}") from None

    async def _range(self, session: aiohttp.ClientSession) -> None:
        answer = decode_range(await self._post(session, "/v3/kv/range",
                                               range_request(self.start), REQUEST_TIMEOUT))
        self._entries = {kv.key: kv.value for kv in answer.kvs}
        self.revision = answer.revision
        self._on_answer()

    async def _probe(self, session: aiohttp.ClientSession) -> None:
        try:
            decode_range(await self._post(session, "/v3/kv/range", probe_request(self.start),
                                          PROBE_TIMEOUT))
        except TimeoutError:
            raise ProbeFailed(f"the watch was quiet for {self.probe_interval:g}s and a "
                              f"probe got no answer within {PROBE_TIMEOUT:g}s") from None
        self._heard = self._clock()
        self._alive()

    async def _watch(self, session: aiohttp.ClientSession) -> None:
        limits = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT,
                                       sock_read=None)
        body = watch_request(self.start, self.revision + 1)
        async with session.post(self.endpoint + "/v3/watch", json=body, timeout=limits,
                                headers=REQUIRE_LEADER) as resp:
            if resp.status != 200:
                _raise_gateway_error(resp.status, await resp.text())
            self._heard = self._clock()
            # The reader is never cancelled while this connection is wanted (a cancelled
            # readline loses the part of a line it had taken); the probe runs beside it.
            reader = asyncio.create_task(self._read_stream(resp),
                                         name=f"etcd-watch-{self.upstream.name}")
            try:
                while True:
                    quiet = self._clock() - self._heard
                    if quiet < self.probe_interval:
                        await asyncio.wait({reader}, timeout=self.probe_interval - quiet)
                    if reader.done():
                        reader.result()  # raises what ended the stream
                        raise StreamEnded("the watch stream ended")
                    if self._clock() - self._heard >= self.probe_interval:
                        await self._probe(session)
            finally:
                if not reader.done():
                    reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader

    async def _read_stream(self, resp: aiohttp.ClientResponse) -> None:
        # Split on our own: the gateway writes one JSON object a line, and a line may be
        # larger than aiohttp's readline limit (one message carries many events).
        pending = bytearray()
        async for chunk in resp.content.iter_any():
            self._heard = self._clock()
            pending += chunk
            while (end := pending.find(b"\n")) >= 0:
                line = bytes(pending[:end])
                del pending[:end + 1]
                if line.strip():
                    self._on_message(decode_watch_line(line))
            if len(pending) > MAX_LINE:
                raise EtcdDecodeError(f"a watch message over {MAX_LINE} bytes")
        raise StreamEnded("the server closed the watch stream")

    # -- outcomes -----------------------------------------------------------------------
    def _on_message(self, message: WatchMessage) -> None:
        if message.canceled:
            if message.compact_revision > 0:
                raise Compacted()
            raise WatchCanceled(f"etcd canceled the watch: {message.cancel_reason or '-'}")
        if message.revision:
            self.revision = max(self.revision, message.revision)
        if message.events:
            self._entries = apply_events(self._entries, message.events)
            self._on_answer()
        else:
            self._alive()  # created, or a progress notification: the watch is live

    def _on_answer(self) -> None:
        recovered = self._failures > 0
        decoded = decode_entries(self._entries, self.start)
        self._note_rejected(decoded)
        endpoints = decoded.endpoints
        changed = self._emitted is None or endpoints != self._emitted
        self.last_success = self._clock()
        if changed or recovered:
            self.sink.on_catalog_answer(CatalogAnswer(endpoints, self.revision))
            # Only after the sink took it: if it raised, the next answer is sent again.
            self._emitted = endpoints
            self._failures = 0
            self._log.info("event=catalog_answer upstream=%s revision=%d endpoints=%d "
                           "changed=%s recovered=%s", self.upstream.name, self.revision,
                           len(endpoints), str(changed).lower(), str(recovered).lower())
        else:
            self._alive()

    def _alive(self) -> None:
        self.last_success = self._clock()
        if self._failures == 0 and self._on_alive is not None:
            self._on_alive()  # unchanged, but fresh: the sink's staleness clock restarts

    def _note_rejected(self, decoded: Decoded) -> None:
        # Logged when it starts, not on every change: the registration stays broken
        # until someone fixes it, and one line says so.
        rejected = dict(decoded.rejected)
        for key, why in rejected.items():
            if self._rejected.get(key) != why:
                self._log.warning("event=etcd_key_ignored upstream=%s key=%s error=%s",
                                  self.upstream.name, json.dumps(key), json.dumps(why))
        self._rejected = rejected

    def _on_error(self, exc: Exception) -> float:
        error = f"etcd {self.endpoint}: {describe(exc)}"
        self.errors += 1
        delay = backoff_delay(self._failures, self._rng, base=BACKOFF_BASE, cap=BACKOFF_CAP)
        self._failures += 1
        # The next attempt goes to the next endpoint: this one may be the one that is down.
        self._endpoint = (self._endpoint + 1) % len(self.endpoints)
        if not isinstance(exc, (aiohttp.ClientError, TimeoutError, EtcdHTTPError,
                                EtcdDecodeError, EtcdAnswerError, StreamEnded,
                                WatchCanceled, ProbeFailed)):
            # Not the network, not etcd: a bug (in decode or the sink). Keep the trace.
            self._log.error("event=catalog_bug upstream=%s", self.upstream.name, exc_info=exc)
        self._log.warning("event=catalog_error upstream=%s error=%s retry_in=%.3f",
                          self.upstream.name, json.dumps(error), delay)
        try:
            self.sink.on_catalog_error(error)
        except Exception:  # noqa: BLE001 - a broken sink must not stop the watch either
            self._log.exception("event=sink_error upstream=%s", self.upstream.name)
        return delay


def _raise_gateway_error(status: int, text: str) -> None:
    """A non-200 answer: etcd's own message when the gateway sent one."""
    try:
        doc = json.loads(text)
        if isinstance(doc, dict):
            decode_range(doc)  # raises EtcdAnswerError for an error document
    except (ValueError, EtcdDecodeError):
        pass
    raise EtcdHTTPError(status, " ".join(text.split())[:ERROR_BODY_CHARS])


def describe(exc: BaseException) -> str:
    """One short line for what went wrong."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "connection refused"
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the watch stream broke off (the server went away mid-stream)"
    if isinstance(exc, aiohttp.ClientOSError):
        return f"connection lost: {exc.strerror or exc}"
    if isinstance(exc, TimeoutError):
        return f"timeout after {REQUEST_TIMEOUT:g}s"
    if isinstance(exc, (StreamEnded, WatchCanceled, ProbeFailed, EtcdHTTPError)):
        return str(exc)
    if isinstance(exc, EtcdAnswerError):
        return f"etcd answered: {exc}"
    if isinstance(exc, EtcdDecodeError):
        return f"bad answer: {exc}"
    if isinstance(exc, aiohttp.ClientError):
        return f"{type(exc).__name__}: {exc}"
    return f"internal error: {type(exc).__name__}: {exc}"
