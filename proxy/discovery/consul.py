"""Consul discovery: blocking-query loops per upstream on `/v1/health/service/<name>`.

Owns the conversation with the Consul HTTP API for one upstream: the blocking queries
(`index`, `wait`, `stale`, `dc`, `X-Consul-Token`), the index reset rules, pacing
(backoff with full jitter after errors, a token bucket against answers that come back
at once unchanged) and the aiohttp session when none is handed in. What an answer means
(passing rules, address fallback, weights, tags) and which datacenter wins are
`consul_decode`'s, which is pure. Must not know: pools, balancers, breakers; it only
reports to its `CatalogSink`.

One request to the agent (`get_json`: token, TLS via `ConsulTLS`, status and JSON rules)
and the wording of its failures (`describe_error`) are shared with `catalog_routes`, the
watch on the service list.

Datacenter failover (SPEC "Routing rules"): with `datacenters = ["dc1", "dc2"]` there is
one blocking query per datacenter (`dc=dc1`, `dc=dc2`, all through the configured agent,
which forwards over the WAN), each with its own index, backoff and pacing, and each
keeping its latest decoded answer. After any change the combined answer is recomputed
with `select_datacenter` (the first datacenter in list order with a usable instance) and
emitted when it differs from the last one emitted. With `datacenters` empty there is one
query, for `consul.datacenter` ("" = the agent's own).

TLS and ACLs (SPEC "TLS"): with an `https://` address every request uses one
`ssl.SSLContext` built from the config (`consul_tls_context`: the CA or the system's, the
client certificate, no verification when `verify = false`), built at the first request
and again after SIGHUP (`reread`), so renewed certificate files are picked up; the token
(already read from `token_file` by the config) goes in `X-Consul-Token`. Consul refuses an
unknown token with 403 and silently filters what a token may not read, so an answer
emptied by ACLs looks like "no instances": both are errors here (`ConsulACLError`), which
keep the last pool. An empty answer is checked once with Consul's own ACL question
(`/v1/internal/acl/authorize`, service:read on this service); a Consul that cannot answer
it (ACLs off: 401; a version without it) leaves the empty answer as it is.

Invariants:
- `run()` never raises except `CancelledError`: every failure (connection refused,
  timeout, non-200, bad JSON, even a bug in decode or in the sink) is logged, reported
  with `sink.on_catalog_error("consul <address>: <what>")` and retried after backoff.
  A datacenter's failure keeps its last answer in force for the selection.
- `sink.on_catalog_answer` is called with complete answers only: the first decided one,
  each one whose endpoint tuple differs from the last emitted, and the first one after
  errors once no datacenter is failing any more (even if unchanged), so that the sink
  learns the catalog answers again and can clear its staleness. A sink treats an
  identical answer as a no-op.
- Every other good answer, unchanged, calls the sink's optional `on_catalog_alive()` (when
  no datacenter is failing), so the sink's staleness counts from the last answer, not
  from the last change.
- Instances listed but not passing (`DownInstance`s, every datacenter's, in failover
  order) go to the sink's optional `on_catalog_down(down)` whenever that list changed,
  before the answer they came with: the pool never sees them, an operator does.
- Time and randomness are injected (`clock`, `rng`); the only sleeping is in `_pause`.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from proxy.config import ConsulConfig, UpstreamConfig
from proxy.discovery import CatalogSink
from proxy.discovery.consul_decode import (
    DecodeError,
    DownInstance,
    TokenBucket,
    backoff_delay,
    decode_answer,
    next_index,
    parse_index,
    select_datacenter,
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
ACL_LACKS = "ACL: token lacks service:read/node:read"  # how every ACL error starts
AUTHORIZE_PATH = "/v1/internal/acl/authorize"
AUTHORIZE_TIMEOUT = CONNECT_TIMEOUT + TIMEOUT_MARGIN
# An agent past `limits { http_max_conns_per_client }` (200 by default) for our address
# answers a new connection with 429 or resets it: each watch holds one connection, so the
# usual cause is sdproxy's own watches (or other clients on the same host).
HTTP_TOO_MANY_REQUESTS = 429
CONN_LIMIT_HINT = (" (restarting, or past the agent's limits { http_max_conns_per_client } for "
                   "this address? each watch holds one connection)")


class ConsulHTTPError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}" if body else f"HTTP {status}")
        self.status = status


class ConsulACLError(Exception):
    """Consul refused the token (403), or ACLs filtered the service out of the answer."""


class ConsulTLSSetupError(Exception):
    """The CA, certificate or key files could not be loaded (they changed since `check`)."""


def consul_tls_context(consul: ConsulConfig) -> ssl.SSLContext | None:
    """The client side of TLS to Consul, or None for an `http://` address.

    Raises OSError or ssl.SSLError when a file cannot be loaded."""
    if not consul.tls:
        return None
    context = ssl.create_default_context(cafile=consul.ca_file or None)
    if consul.cert_file:
        context.load_cert_chain(consul.cert_file, consul.key_file or None)
    if not consul.verify:  # $CONSUL_HTTP_SSL_VERIFY=false: neither chain nor name
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class ConsulTLS:
    """The `ssl` argument of every request to one agent: the context built from the
    `[consul]` files at first use and again after `reread()` (SIGHUP: renewed files);
    True (aiohttp's default) for an `http://` address."""

    def __init__(self, consul: ConsulConfig) -> None:
        self.consul = consul
        self._context: ssl.SSLContext | None = None

    def reread(self) -> None:
        self._context = None

    def context(self) -> ssl.SSLContext | bool:
        if not self.consul.tls:
            return True
        if self._context is None:
            try:
                self._context = consul_tls_context(self.consul)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise ConsulTLSSetupError(_ssl_reason(exc)) from exc
        assert self._context is not None  # an https address always has one
        return self._context


# What a Consul request may fail with that is the network's or Consul's, not a bug of ours.
CONSUL_ERRORS: tuple[type[Exception], ...] = (
    aiohttp.ClientError, TimeoutError, ConsulHTTPError, DecodeError, ConsulACLError,
    ConsulTLSSetupError)


def token_hint(consul: ConsulConfig) -> str:
    """Where the token came from, for an ACL error message."""
    if consul.token_file:
        return f"; token read from {consul.token_file}"
    return "" if consul.token else "; no token set"


async def get_json(session: aiohttp.ClientSession, url: str, *, consul: ConsulConfig,
                   tls: ConsulTLS, params: dict[str, str], timeout: float,
                   acl_lacks: str = ACL_LACKS) -> tuple[Any, Mapping[str, str]]:
    """GET one Consul API resource: (decoded JSON body, response headers).

    Sends `X-Consul-Token`, the TLS context and server name of `[consul]`. Raises
    ConsulACLError for 403 (its message starts with `acl_lacks`, what the token needs
    here), ConsulHTTPError for any other non-200, DecodeError for a body that is not
    JSON, and whatever aiohttp raises for the network."""
    headers = {"X-Consul-Token": consul.token} if consul.token else {}
    client_timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=CONNECT_TIMEOUT)
    async with session.get(url, params=params, headers=headers, timeout=client_timeout,
                           ssl=tls.context(),
                           server_hostname=consul.server_name or None) as resp:
        text = await resp.text()
        if resp.status != 200:
            detail = " ".join(text.split())[:ERROR_BODY_CHARS]
            if resp.status == 403:
                raise ConsulACLError(f"{acl_lacks} (HTTP 403: {detail}{token_hint(consul)})")
            raise ConsulHTTPError(resp.status, detail)
        try:
            return json.loads(text), resp.headers
        except ValueError as exc:
            raise DecodeError(f"invalid JSON: {exc}") from exc


def format_wait(seconds: float) -> str:
    """Consul's `wait` as a Go duration: "55s", or milliseconds when fractional."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{max(1, round(seconds * 1000))}ms"


def base_url(address: str) -> str:
    # $CONSUL_HTTP_ADDR is often written without a scheme ("127.0.0.1:8500").
    address = address.rstrip("/")
    return address if "://" in address else f"http://{address}"


@dataclass(eq=False)
class DatacenterWatch:
    """The blocking-query state of one datacenter's query (mutable, owned by the watcher)."""

    name: str  # the `dc` parameter; "" = the agent's own datacenter
    pace: TokenBucket
    index: int = 0  # what the next request sends; 0 = no index (answer at once)
    failures: int = 0  # consecutive errors, drives the backoff
    answer: tuple[Endpoint, ...] | None = None  # latest decoded answer; kept across errors
    down: tuple[DownInstance, ...] = ()  # the not-passing instances of that answer
    answer_index: int | None = None  # its X-Consul-Index
    last_success: float | None = None  # clock() of the last good answer
    errors: int = 0  # errors since start

    @property
    def unreachable(self) -> bool:
        """Failed before it ever answered: the selection passes over it."""
        return self.answer is None and self.failures > 0


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
        # Failover order, duplicates dropped; one entry ("" = the agent's own) without it.
        self.datacenters: tuple[str, ...] = (tuple(dict.fromkeys(upstream.datacenters))
                                             or (consul.datacenter,))
        self.failover = len(self.datacenters) > 1
        self.datacenter = self.datacenters[0]
        self.timeout = consul.wait + consul.wait / 16 + TIMEOUT_MARGIN
        self._headers = {"X-Consul-Token": consul.token} if consul.token else {}
        self._tls = ConsulTLS(consul)
        self._server_name = consul.server_name or None  # else the address's host
        self.watches: dict[str, DatacenterWatch] = {
            dc: DatacenterWatch(dc, TokenBucket(PACE_BURST, PACE_INTERVAL))
            for dc in self.datacenters}
        self._emitted: tuple[Endpoint, ...] | None = None
        # Optional sink method (UpstreamRuntime has it; CatalogSink does not declare it):
        # told of unchanged answers, so that `last_update` and `stale_seconds` measure
        # from the last answer, not from the last change.
        self._on_alive: Callable[[], None] | None = getattr(sink, "on_catalog_alive", None)
        # Optional as well: told of the instances listed but not passing.
        self._on_down: Callable[[tuple[DownInstance, ...]], None] | None = getattr(
            sink, "on_catalog_down", None)
        self._emitted_down: tuple[DownInstance, ...] = ()
        # Read by the admin API and tests.
        self.selected: str | None = None  # datacenter of the last emitted answer
        self.last_index = 0  # X-Consul-Index of the last good answer (any datacenter)
        self.last_success: float | None = None  # clock() of the last good answer
        self.errors = 0  # errors since start, all datacenters

    # -- the loops --------------------------------------------------------------------
    async def run(self) -> None:
        session = self._session
        owned = session is None
        if session is None:
            session = aiohttp.ClientSession()
        try:
            if not self.failover:
                await self._watch(session, self.datacenter)
            else:
                # Children never raise except CancelledError (see _watch), so the group
                # only ends by cancellation, which it passes on to every query.
                async with asyncio.TaskGroup() as group:
                    for dc in self.datacenters:
                        group.create_task(self._watch(session, dc),
                                          name=f"consul-{self.upstream.name}-{dc}")
        finally:
            if owned:
                await session.close()

    async def _watch(self, session: aiohttp.ClientSession, datacenter: str) -> None:
        while True:
            try:
                delay = await self.poll_once(session, datacenter)
            except Exception:  # noqa: BLE001 - last resort: poll_once reports its own
                self._log.exception("event=catalog_bug upstream=%s", self.upstream.name)
                delay = BACKOFF_CAP
            await self._pause(delay)

    async def _pause(self, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)

    def reread(self) -> None:
        """SIGHUP: load the TLS files again at the next request (renewed certificates)."""
        self._tls.reread()

    async def poll_once(self, session: aiohttp.ClientSession,
                        datacenter: str | None = None) -> float:
        """One blocking query of `datacenter` (default: the first) and its report;
        returns the delay before that datacenter's next query."""
        watch = self.watches[self.datacenter if datacenter is None else datacenter]
        try:
            body, index_header = await self._fetch(session, watch)
            endpoints, down = decode_answer(body, tags=self.upstream.tags,
                                            include_warning=self.upstream.include_warning,
                                            datacenter=watch.name)
            return self._on_answer(watch, endpoints, index_header, down)
        except asyncio.CancelledError:
            raise
        # Never crash (DESIGN habit 10): whatever failed, report it, back off, try again.
        except Exception as exc:  # noqa: BLE001
            return self._on_error(watch, exc)

    def _params(self, watch: DatacenterWatch) -> dict[str, str]:
        params = {"wait": format_wait(self.consul.wait)}
        if watch.index > 0:
            params["index"] = str(watch.index)
        if self.consul.stale:
            params["stale"] = ""
        if watch.name:
            params["dc"] = watch.name
        return params

    async def _fetch(self, session: aiohttp.ClientSession,
                     watch: DatacenterWatch) -> tuple[Any, str | None]:
        # No `passing=1`: decode decides, so that warning instances can be included.
        body, headers = await get_json(session, self.url, consul=self.consul, tls=self._tls,
                                       params=self._params(watch), timeout=self.timeout)
        index = headers.get("X-Consul-Index")
        # Empty: no instance, or ACLs filtered them all out. Asked once per turn to empty.
        if body == [] and watch.answer != () and await self._service_read_denied(session,
                                                                                 watch):
            raise ConsulACLError(f'{ACL_LACKS} (service:read on "{self.upstream.name}" is '
                                 f"denied, so Consul answered an empty list"
                                 f"{self._token_hint()})")
        return body, index

    async def _service_read_denied(self, session: aiohttp.ClientSession,
                                   watch: DatacenterWatch) -> bool:
        """Whether Consul says this token may not read the service; False when it cannot
        say (ACLs off, or a Consul without the endpoint)."""
        question = [{"Resource": "service", "Segment": self.upstream.name, "Access": "read"}]
        params = {"dc": watch.name} if watch.name else {}
        timeout = aiohttp.ClientTimeout(total=AUTHORIZE_TIMEOUT, sock_connect=CONNECT_TIMEOUT)
        async with session.post(self.address + AUTHORIZE_PATH, json=question, params=params,
                                headers=self._headers, timeout=timeout,
                                ssl=self._tls.context(),
                                server_hostname=self._server_name) as resp:
            if resp.status != 200:
                return False
            try:
                answers = json.loads(await resp.text())
                return any(a.get("Allow") is False for a in answers)
            except (ValueError, TypeError, AttributeError):
                return False

    def _token_hint(self) -> str:
        return token_hint(self.consul)

    # -- outcomes ---------------------------------------------------------------------
    def _on_answer(self, watch: DatacenterWatch, endpoints: tuple[Endpoint, ...],
                   index_header: str | None, down: tuple[DownInstance, ...] = ()) -> float:
        recovered = watch.failures > 0
        watch.index = next_index(watch.index, index_header)
        index = parse_index(index_header)
        changed = watch.answer is None or endpoints != watch.answer or down != watch.down
        watch.answer = endpoints
        watch.down = down
        watch.answer_index = index if index is not None else watch.index
        now = self._clock()
        watch.last_success = self.last_success = now
        self.last_index = watch.answer_index
        # Cleared before publishing so that "no datacenter is failing" sees this one
        # answer; if the sink raises, _on_error counts the failure again and the next
        # answer is sent again.
        watch.failures = 0
        healthy = not any(w.failures for w in self.watches.values())
        emitted = self._publish(watch, recovered=recovered and healthy)
        if not emitted and healthy and self._on_alive is not None:
            self._on_alive()  # unchanged, but fresh: the sink's staleness clock restarts
        if changed:
            return 0.0
        # Unchanged: fine after a full wait, a busy loop if it keeps coming back at once.
        return watch.pace.take(now)

    def _publish(self, cause: DatacenterWatch, *, recovered: bool = False) -> bool:
        """Recompute the combined answer; emit it when it changed (or on `recovered`).

        Returns whether the sink was called."""
        self._publish_down()
        answers = {w.name: w.answer for w in self.watches.values() if w.answer is not None}
        unreachable = [w.name for w in self.watches.values() if w.unreachable]
        selection = select_datacenter(self.datacenters, answers, unreachable)
        if selection is None:
            return False  # undecided: a datacenter before any usable one has not answered
        selected, endpoints = selection
        changed = self._emitted is None or endpoints != self._emitted
        if not (changed or recovered):
            return False
        # The version of what is routed: the chosen datacenter's index (when none has an
        # instance, the first that answered), each datacenter counting its own.
        source = self.watches[selected] if selected else next(
            w for w in self.watches.values() if w.answer is not None)
        self.sink.on_catalog_answer(CatalogAnswer(endpoints, source.answer_index))
        # Only after the sink took it: if it raised, the next answer is sent again.
        self._emitted = endpoints
        previous, self.selected = self.selected, selected
        self._log.info("event=catalog_answer upstream=%s index=%s endpoints=%d "
                       "changed=%s recovered=%s%s", self.upstream.name, source.answer_index,
                       len(endpoints), str(changed).lower(), str(recovered).lower(),
                       self._dc_fields(cause, selected, previous))
        return True

    def _publish_down(self) -> None:
        down = tuple(d for w in self.watches.values() for d in w.down)
        if down != self._emitted_down and self._on_down is not None:
            self._on_down(down)
            self._emitted_down = down

    def _dc_fields(self, cause: DatacenterWatch, selected: str,
                   previous: str | None) -> str:
        if not self.failover:
            return ""
        fields = f" dc={cause.name} selected={selected or '-'}"
        if previous is not None and previous != selected:
            fields += f" failover_from={previous or '-'}"
        return fields

    def _on_error(self, watch: DatacenterWatch, exc: Exception) -> float:
        what = self._describe(exc)
        where = f"consul {self.address} dc={watch.name}" if self.failover else \
            f"consul {self.address}"
        error = f"{where}: {what}"
        self.errors += 1
        watch.errors += 1
        # Start over with a plain read: the index we held may mean nothing to the server
        # that answers next (another server, a restored snapshot).
        watch.index = 0
        delay = backoff_delay(watch.failures, self._rng, base=BACKOFF_BASE, cap=BACKOFF_CAP)
        first_failure = watch.failures == 0
        watch.failures += 1
        if not isinstance(exc, CONSUL_ERRORS):
            # Not the network, not Consul: a bug (in decode or the sink). Keep the trace.
            self._log.error("event=catalog_bug upstream=%s", self.upstream.name,
                            exc_info=exc)
        self._log.warning("event=catalog_error upstream=%s error=%s retry_in=%.3f%s",
                          self.upstream.name, json.dumps(error), delay,
                          f" dc={watch.name}" if self.failover else "")
        try:
            self.sink.on_catalog_error(error)
        except Exception:  # noqa: BLE001 - a broken sink must not stop the watch either
            self._log.exception("event=sink_error upstream=%s", self.upstream.name)
        if self.failover and first_failure and watch.answer is None:
            # Unreachable before its first answer: the next datacenters may decide now.
            try:
                self._publish(watch)
            except Exception:  # noqa: BLE001 - as above; the next answer retries it
                self._log.exception("event=sink_error upstream=%s", self.upstream.name)
        return delay

    def _describe(self, exc: Exception) -> str:
        return describe_error(exc, self.timeout)


def describe_error(exc: Exception, timeout: float) -> str:
    """One phrase for what went wrong with a Consul request that had `timeout` seconds."""
    if isinstance(exc, ConsulACLError):
        return str(exc)
    if isinstance(exc, ConsulTLSSetupError):
        return f"TLS: cannot load the CA, certificate or key file: {exc}"
    tls_failure = _ssl_error_in(exc) if isinstance(exc, aiohttp.ClientError) else None
    if tls_failure is not None:
        return _describe_tls(tls_failure)
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "connection refused"
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ServerTimeoutError):  # connect or read step timed out
        return f"timeout: {exc}"
    if isinstance(exc, TimeoutError):  # the whole request passed wait + jitter + margin
        return f"timeout after {timeout:g}s"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        # What an agent past its per-client limit mostly does to a new connection.
        return f"server disconnected{CONN_LIMIT_HINT}"
    if isinstance(exc, aiohttp.ClientOSError) and exc.errno == errno.ECONNRESET:
        return f"connection reset by the agent{CONN_LIMIT_HINT}"
    if isinstance(exc, ConsulHTTPError) and exc.status == HTTP_TOO_MANY_REQUESTS:
        return f"{exc}{CONN_LIMIT_HINT}"
    if isinstance(exc, ConsulHTTPError):
        return str(exc)
    if isinstance(exc, DecodeError):
        return f"bad answer: {exc}"
    if isinstance(exc, aiohttp.ClientError):
        return f"{type(exc).__name__}: {exc}"
    return f"internal error: {type(exc).__name__}: {exc}"


def _ssl_error_in(exc: BaseException) -> ssl.SSLError | None:
    """The ssl.SSLError behind an aiohttp error, if any (aiohttp keeps it in different
    places: `certificate_error`, `os_error`, or the exception's cause)."""
    seen: BaseException | None = exc
    for _ in range(4):  # a short chain; never loop on a cycle
        if seen is None:
            return None
        if isinstance(seen, aiohttp.ClientConnectorError):
            # Some of aiohttp's own errors are ssl.SSLError subclasses too: ask them first.
            inner = getattr(seen, "certificate_error", None) or seen.os_error
            if isinstance(inner, ssl.SSLError):
                return inner
        elif isinstance(seen, ssl.SSLError) and not isinstance(seen, aiohttp.ClientError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _describe_tls(error: ssl.SSLError) -> str:
    reason = _ssl_reason(error)
    if isinstance(error, ssl.SSLCertVerificationError):
        return (f"TLS: the agent's certificate did not verify: {reason} (check ca_file or "
                f"$CONSUL_CACERT, and server_name or $CONSUL_TLS_SERVER_NAME)")
    if "ALERT" in reason and "CERTIFICATE" in reason:
        return (f"TLS: the agent refused our client certificate: {reason} (verify_incoming "
                f"needs cert_file/key_file or $CONSUL_CLIENT_CERT/$CONSUL_CLIENT_KEY)")
    if "WRONG_VERSION_NUMBER" in reason:
        return f"TLS: {reason} (does the agent serve https on this port?)"
    return f"TLS: {reason}"


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"{exc.reason}: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    return str(exc)
