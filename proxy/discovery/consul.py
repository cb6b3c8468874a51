"""Consul discovery: one blocking-query loop per upstream on `/v1/health/service/<name>`.

Owns the conversation with the Consul HTTP API for one upstream: the blocking query
(`index`, `wait`, `stale`, `dc`, `X-Consul-Token`), the index reset rules, pacing
(backoff with full jitter after errors, a token bucket against answers that come back
at once unchanged) and the aiohttp session when none is handed in. What an answer means
(passing rules, address fallback, weights, tags) is `consul_decode`'s, which is pure.
Must not know: pools, balancers, breakers; it only reports to its `CatalogSink`.

Invariants:
- `run()` never raises except `CancelledError`: every failure (connection refused,
  timeout, non-200, bad JSON, even a bug in decode or in the sink) is logged, reported
  with `sink.on_catalog_error("consul <address>: <what>")` and retried after backoff.
- `sink.on_catalog_answer` is called with complete answers only: the first one, each one
  whose endpoint tuple differs from the last emitted, and the first one after an error
  (even if unchanged), so that the sink learns the catalog answers again and can clear
  its staleness. A sink treats an identical answer as a no-op.
- Time and randomness are injected (`clock`, `rng`); the only sleeping is in `_pause`.

TODO(datacenter failover): SPEC's `datacenters` failover order is a later issue. For now
a non-empty `upstream.datacenters` means: query only its first entry (as `dc`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp

from proxy.config import ConsulConfig, UpstreamConfig
from proxy.discovery import CatalogSink
from proxy.discovery.consul_decode import (
    DecodeError,
    TokenBucket,
    backoff_delay,
    decode,
    next_index,
    parse_index,
)
from proxy.model import CatalogAnswer, Endpoint

# Consul adds up to wait/16 of random extra time to a blocking query; on top of that we
# allow this much for the network and a busy server before calling it a timeout.
TIMEOUT_MARGIN = 5.0
CONNECT_TIMEOUT = 5.0
BACKOFF_BASE = 0.1  # first retry after an error waits uniform(0, 0.1 s)
BACKOFF_CAP = 5.0
# Unchanged answers that come back at once: 3 quick ones, then at most one request a
# second. Changed answers are never delayed: they are what we are waiting for.
PACE_BURST = 3
PACE_INTERVAL = 1.0
ERROR_BODY_CHARS = 200  # of a non-200 body quoted in the error


class ConsulHTTPError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}" if body else f"HTTP {status}")


def format_wait(seconds: float) -> str:
    """Consul's `wait` as a Go duration: "55s", or milliseconds when fractional."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{max(1, round(seconds * 1000))}ms"


def base_url(address: str) -> str:
    # $CONSUL_HTTP_ADDR is often written without a scheme ("127.0.0.1:8500").
    address = address.rstrip("/")
    return address if "://" in address else f"http://{address}"


class ConsulWatcher:
    """Watches one upstream's instances in Consul and reports changes to `sink`."""

    def __init__(self, consul: ConsulConfig, upstream: UpstreamConfig, sink: CatalogSink, *,
                 session: aiohttp.ClientSession | None = None,
                 rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 log: logging.Logger | None = None) -> None:
        self.consul = consul
        self.upstream = upstream
        self.sink = sink
        self._session = session
        self._rng = rng or random.Random()
        self._clock = clock
        self._log = log or logging.getLogger("sdproxy.discovery.consul")
        self.address = base_url(consul.address)
        self.url = f"{self.address}/v1/health/service/{quote(upstream.name, safe='')}"
        # TODO(datacenter failover): walk `datacenters` in order; only the first for now.
        self.datacenter = upstream.datacenters[0] if upstream.datacenters else consul.datacenter
        self.timeout = consul.wait + consul.wait / 16 + TIMEOUT_MARGIN
        self._headers = {"X-Consul-Token": consul.token} if consul.token else {}
        self._pace = TokenBucket(PACE_BURST, PACE_INTERVAL)
        self._index = 0  # what the next request sends; 0 = no index (answer at once)
        self._emitted: tuple[Endpoint, ...] | None = None
        self._failures = 0  # consecutive errors, drives the backoff
        # Read by the admin API.
        self.last_index = 0  # X-Consul-Index of the last good answer
        self.last_success: float | None = None  # clock() of the last good answer
        self.errors = 0  # errors since start

    # -- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        session = self._session
        owned = session is None
        if session is None:
            session = aiohttp.ClientSession()
        try:
            while True:
                try:
                    delay = await self.poll_once(session)
                except Exception:  # noqa: BLE001 - last resort: poll_once reports its own
                    self._log.exception("event=catalog_bug upstream=%s", self.upstream.name)
                    delay = BACKOFF_CAP
                await self._pause(delay)
        finally:
            if owned:
                await session.close()

    async def _pause(self, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)

    async def poll_once(self, session: aiohttp.ClientSession) -> float:
        """One blocking query and its report; returns the delay before the next one."""
        try:
            body, index_header = await self._fetch(session)
            endpoints = decode(body, tags=self.upstream.tags,
                               include_warning=self.upstream.include_warning,
                               datacenter=self.datacenter)
            return self._on_answer(endpoints, index_header)
        except asyncio.CancelledError:
            raise
        # Never crash (DESIGN habit 10): whatever failed, report it, back off, try again.
        except Exception as exc:  # noqa: BLE001
            return self._on_error(exc)

    def _params(self) -> dict[str, str]:
        params = {"wait": format_wait(self.consul.wait)}
        if self._index > 0:
            params["index"] = str(self._index)
        if self.consul.stale:
            params["stale"] = ""
        if self.datacenter:
            params["dc"] = self.datacenter
        return params

    async def _fetch(self, session: aiohttp.ClientSession) -> tuple[Any, str | None]:
        timeout = aiohttp.ClientTimeout(total=self.timeout, sock_connect=CONNECT_TIMEOUT)
        # No `passing=1`: decode decides, so that warning instances can be included.
        async with session.get(self.url, params=self._params(), headers=self._headers,
                               timeout=timeout) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise ConsulHTTPError(resp.status, " ".join(text.split())[:ERROR_BODY_CHARS])
            try:
                body = json.loads(text)
            except ValueError as exc:
                raise DecodeError(f"invalid JSON: {exc}") from exc
            return body, resp.headers.get("X-Consul-Index")

    # -- outcomes ---------------------------------------------------------------------
    def _on_answer(self, endpoints: tuple[Endpoint, ...], index_header: str | None) -> float:
        recovered = self._failures > 0
        self._index = next_index(self._index, index_header)
        index = parse_index(index_header)
        changed = self._emitted is None or endpoints != self._emitted
        if changed or recovered:
            self.sink.on_catalog_answer(CatalogAnswer(endpoints, index))
            # Only after the sink took it: if it raised, the next answer is sent again.
            self._emitted = endpoints
            self._log.info("event=catalog_answer upstream=%s index=%s endpoints=%d "
                           "changed=%s recovered=%s", self.upstream.name, index,
                           len(endpoints), str(changed).lower(), str(recovered).lower())
        self._failures = 0
        self.last_index = index if index is not None else self._index
        self.last_success = self._clock()
        if changed:
            return 0.0
        # Unchanged: fine after a full wait, a busy loop if it keeps coming back at once.
        return self._pace.take(self._clock())

    def _on_error(self, exc: Exception) -> float:
        what = self._describe(exc)
        error = f"consul {self.address}: {what}"
        self.errors += 1
        # Start over with a plain read: the index we held may mean nothing to the server
        # that answers next (another server, a restored snapshot).
        self._index = 0
        delay = backoff_delay(self._failures, self._rng, base=BACKOFF_BASE, cap=BACKOFF_CAP)
        self._failures += 1
        if not isinstance(exc, (aiohttp.ClientError, TimeoutError, ConsulHTTPError,
                                DecodeError)):
            # Not the network, not Consul: a bug (in decode or the sink). Keep the trace.
            self._log.error("event=catalog_bug upstream=%s", self.upstream.name,
                            exc_info=exc)
        self._log.warning("event=catalog_error upstream=%s error=%s retry_in=%.3f",
                          self.upstream.name, json.dumps(error), delay)
        try:
            self.sink.on_catalog_error(error)
        except Exception:  # noqa: BLE001 - a broken sink must not stop the watch either
            self._log.exception("event=sink_error upstream=%s", self.upstream.name)
        return delay

    def _describe(self, exc: Exception) -> str:
        if isinstance(exc, aiohttp.ClientConnectorError):
            if isinstance(exc.os_error, ConnectionRefusedError):
                return "connection refused"
            return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
        if isinstance(exc, aiohttp.ServerTimeoutError):  # connect or read step timed out
            return f"timeout: {exc}"
        if isinstance(exc, TimeoutError):  # the whole request passed wait + jitter + margin
            return f"timeout after {self.timeout:g}s"
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            return "server disconnected"
        if isinstance(exc, ConsulHTTPError):
            return str(exc)
        if isinstance(exc, DecodeError):
            return f"bad answer: {exc}"
        if isinstance(exc, aiohttp.ClientError):
            return f"{type(exc).__name__}: {exc}"
        return f"internal error: {type(exc).__name__}: {exc}"
