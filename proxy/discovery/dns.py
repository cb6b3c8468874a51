"""DNS discovery: one re-resolve loop per upstream against the `[dns]` nameservers.

Owns the conversation with the nameservers for one upstream: the queries (SRV
`<name>.<domain>`, then A/AAAA for SRV targets the answer did not carry addresses for;
or A `<name>.<domain>` with `dns_type = "A"`), pacing (every `interval`, sooner when a
record's TTL above 0 is smaller; after an error, jittered backoff but never later than
`interval`) and the dnspython asyncio resolver. What a response means (records ->
endpoints, priorities, weights, TTLs) is `dns_decode`'s, which is pure. Must not know:
pools, balancers, breakers; it only reports to its `CatalogSink`.

Why TCP: Consul trims UDP answers silently, without setting TC: 3 records without EDNS,
as many as fit the EDNS size with it (19 SRV instances at 1232 bytes), so a UDP client
would route to a few instances and never learn of the rest. Every query therefore goes
over TCP (RFC 7766 makes TCP support mandatory for nameservers; Consul and Docker's
embedded DNS answer on it). A nameserver that is down then refuses at once instead of
timing out. Nameservers are asked in the configured order (resolv.conf semantics) and
only the configured ones: never the system resolver, never a blocking call.

Invariants:
- `run()` never raises except `CancelledError`: every failure (no nameserver answered,
  timeout, SERVFAIL, a malformed answer, even a bug in decode or in the sink) is logged,
  reported with `sink.on_catalog_error("dns <nameservers>: <what>")` and retried, and the
  last answer stays in force.
- NXDOMAIN and an empty answer are answers (no endpoints), not errors: Consul answers
  NXDOMAIN when no instance passes.
- An SRV target whose lookup the nameserver answers negatively (NXDOMAIN, no address,
  REFUSED, SERVFAIL) is left out of the answer and logged once (a permanently broken
  registration must not freeze the whole upstream); a target lookup that no nameserver
  answered fails the whole lookup, so a dying nameserver cannot shrink the pool.
- `sink.on_catalog_answer` gets the first answer, each one whose endpoint tuple differs
  from the last emitted, and the first one after an error (even if unchanged) so that
  the sink can clear its staleness. Endpoints are sorted, so equal answers compare equal.
  Every other good answer (unchanged) calls the sink's optional `on_catalog_alive()`.
- Time and randomness are injected (`clock`, `rng`); the only sleeping is in `_pause`,
  which `reread()` cuts short.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.inet
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from dns.asyncresolver import Resolver as AsyncResolver
from dns.name import Name as DnsName

from proxy.config import DnsConfig, UpstreamConfig
from proxy.discovery import CatalogSink
from proxy.discovery.consul_decode import backoff_delay
from proxy.discovery.dns_decode import (
    MIN_DELAY,
    Addresses,
    Decoded,
    DnsDecodeError,
    decode_a,
    decode_addresses,
    decode_srv,
    next_delay,
    query_name,
    srv_endpoints,
)
from proxy.model import Address, CatalogAnswer, Endpoint

# Per try and per query. The nameservers are local (a Consul agent, Docker's embedded
# DNS), so a second is long; the lifetime leaves room for a retry or the next server.
QUERY_TIMEOUT = 1.0
QUERY_LIFETIME = 3.0
BACKOFF_BASE = 0.1  # first retry after an error waits uniform(0, 0.1 s)
BACKOFF_CAP = 5.0  # and never longer than the interval (see _on_error)


class SetupError(Exception):
    """The config cannot be turned into queries (a nameserver that is not an IP, ...)."""


class TargetLookupFailed(Exception):
    """No nameserver answered the address lookup of an SRV target."""

    def __init__(self, target: dns.name.Name, cause: Exception) -> None:
        super().__init__(f"{target}: {describe(cause)}")
        self.cause = cause


def make_resolver(config: DnsConfig) -> AsyncResolver:
    """An asyncio resolver that asks only `config.nameservers`, in order, without cache.

    Raises SetupError for a nameserver that is not an IP address: resolving its name
    would need the system resolver, which blocks.
    """
    if not config.nameservers:
        raise SetupError("no nameservers configured")
    nameservers: list[str | dns.nameserver.Nameserver] = []
    for ns in config.nameservers:
        if not dns.inet.is_address(ns.host):
            raise SetupError(f"nameserver {ns} is not an IP address")
        nameservers.append(dns.nameserver.Do53Nameserver(ns.host, ns.port))
    resolver = AsyncResolver(configure=False)  # never read /etc/resolv.conf
    resolver.nameservers = nameservers
    resolver.timeout = QUERY_TIMEOUT
    resolver.lifetime = QUERY_LIFETIME
    resolver.cache = None  # every lookup must see the catalog as it is now
    resolver.rotate = False
    return resolver


def _server(text: str) -> str:
    """dnspython's "Do53:127.0.0.1@8600" as "127.0.0.1:8600"."""
    kind, _, rest = text.partition(":")
    host, at, port = rest.rpartition("@")
    if kind != "Do53" or not at or not port.isdigit():
        return text
    return str(Address(host, int(port)))


def _what(error: object) -> str:
    if isinstance(error, str):  # an rcode the server answered with
        return f"answered {error}"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, dns.exception.Timeout):
        return "timeout"
    if isinstance(error, EOFError):
        return "connection closed"
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return f"{type(error).__name__}: {error}"


def _errors(exc: dns.exception.DNSException) -> list[tuple[Any, ...]]:
    errors = exc.kwargs.get("errors") if isinstance(exc.kwargs, dict) else None
    return list(errors or [])


def describe(exc: BaseException) -> str:
    """One short line for a failed lookup, naming each server and what it did."""
    if isinstance(exc, TargetLookupFailed):
        return f"target {exc}"
    if isinstance(exc, (dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout)):
        seen: dict[str, None] = {}  # a server retried the same way is named once
        for err in _errors(exc):
            seen.setdefault(f"{_server(str(err[0]))} {_what(err[3])}", None)
        if isinstance(exc, dns.resolver.LifetimeTimeout):
            head = f"timeout after {exc.kwargs.get('timeout', 0):.1f}s"
            return f"{head} ({'; '.join(seen)})" if seen else head
        return "; ".join(seen) or "no nameserver answered"
    if isinstance(exc, dns.exception.Timeout):
        return "timeout"
    if isinstance(exc, dns.resolver.YXDOMAIN):
        return "answered YXDOMAIN"
    if isinstance(exc, DnsDecodeError):
        return f"bad answer: {exc}"
    if isinstance(exc, SetupError):
        return str(exc)
    if isinstance(exc, dns.exception.DNSException):
        return f"{type(exc).__name__}: {exc}"
    return f"internal error: {type(exc).__name__}: {exc}"


def answered_negatively(exc: Exception) -> bool:
    """True when every nameserver tried answered with an rcode (REFUSED, SERVFAIL, ...):
    it works, it just has no address for this name."""
    if not isinstance(exc, dns.resolver.NoNameservers):
        return False
    errors = _errors(exc)
    return bool(errors) and all(isinstance(err[3], str) for err in errors)


class DnsWatcher:
    """Resolves one upstream's instances through DNS and reports changes to `sink`."""

    def __init__(self, dns: DnsConfig, upstream: UpstreamConfig, sink: CatalogSink, *,
                 resolver: AsyncResolver | None = None,
                 rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 log: logging.Logger | None = None) -> None:
        # `dns` is the config section in here; the body must not use the dnspython
        # package by that name (hence `AsyncResolver`).
        self.config = dns
        self.upstream = upstream
        self.sink = sink
        self._rng = rng or random.Random()
        self._clock = clock
        self._log = log or logging.getLogger("sdproxy.discovery.dns")
        self.interval = dns.interval
        self.mode = "A" if upstream.dns_type.upper() == "A" else "SRV"
        self.servers = ",".join(str(ns) for ns in dns.nameservers) or "-"
        self._setup_error: SetupError | None = None
        self._resolver: AsyncResolver | None = None
        self.qname: DnsName | None = None
        try:
            self.qname = query_name(upstream.name, dns.domain)
            self._resolver = resolver or make_resolver(dns)
        except (SetupError, DnsDecodeError) as exc:
            # Reported from run(), like any other failure: a constructor that raised
            # would take the whole process down over one upstream's config.
            self._setup_error = SetupError(str(exc))
        self._wake = asyncio.Event()
        self._emitted: tuple[Endpoint, ...] | None = None
        self._failures = 0  # consecutive errors, drives the backoff
        self._unresolved: dict[str, str] = {}  # SRV targets left out last time -> why
        # Optional sink method, looked up as consul.py does (a sink may predate it): told
        # of unchanged answers, so the sink's staleness counts from the last answer, not
        # from the last change.
        self._on_alive: Callable[[], None] | None = getattr(sink, "on_catalog_alive", None)
        # Read by the admin API.
        self.last_success: float | None = None  # clock() of the last good answer
        self.errors = 0  # errors since start

    # -- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        task = asyncio.current_task()
        while True:
            try:
                delay = await self.poll_once()
            except Exception:  # noqa: BLE001 - last resort: poll_once reports its own
                self._log.exception("event=catalog_bug upstream=%s", self.upstream.name)
                delay = max(self.interval, MIN_DELAY)
            # Python 3.11's asyncio.wait_for (inside dnspython's queries) can swallow a
            # cancellation that lands as its inner future completes; the request stays
            # counted on the task, so honour it here rather than loop on forever.
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            await self._pause(delay)

    def reread(self) -> None:
        """Resolve again now (SIGHUP) instead of at the next interval."""
        self._wake.set()

    async def _pause(self, delay: float) -> None:
        if delay > 0 and not self._wake.is_set():
            try:
                # asyncio.timeout, not wait_for: it never loses a cancellation.
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass
        self._wake.clear()

    async def poll_once(self) -> float:
        """One lookup and its report; returns the seconds to wait before the next one."""
        started = self._clock()
        try:
            decoded = await self.resolve()
            delay = self._on_answer(decoded)
        except asyncio.CancelledError:
            raise
        # Never crash (DESIGN habit 10): whatever failed, report it, back off, try again.
        except Exception as exc:  # noqa: BLE001
            return self._on_error(exc)
        # The interval runs from the start of this lookup, not from its end.
        return max(0.0, delay - (self._clock() - started))

    # -- queries ----------------------------------------------------------------------
    async def resolve(self) -> Decoded:
        """The upstream's current endpoints according to the nameservers."""
        if self._setup_error is not None:
            raise self._setup_error
        assert self.qname is not None
        if self.mode == "A":
            return decode_a(await self._query(self.qname, dns.rdatatype.A),
                            self.upstream.port)
        answer = decode_srv(await self._query(self.qname, dns.rdatatype.SRV))
        pending = answer.pending
        results = await asyncio.gather(*(self._lookup_target(t) for t in pending),
                                       return_exceptions=True)
        resolved: dict[dns.name.Name, Addresses] = {}
        unresolved: dict[str, str] = {}
        for target, result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):  # CancelledError and the like
                    raise result
                if not answered_negatively(result):
                    raise TargetLookupFailed(target, result)
                unresolved[target.to_text()] = describe(result)
                continue
            resolved[target] = result
            if not result.addresses:
                unresolved[target.to_text()] = "no address"
        self._note_unresolved(unresolved)
        return srv_endpoints(answer, resolved)

    async def _lookup_target(self, target: dns.name.Name) -> Addresses:
        """A, else AAAA, of an SRV target, through the same nameservers."""
        found = decode_addresses(await self._query(target, dns.rdatatype.A))
        if found.addresses:
            return found
        v6 = decode_addresses(await self._query(target, dns.rdatatype.AAAA))
        return v6 if v6.addresses else Addresses((), found.ttl)

    async def _query(self, qname: dns.name.Name,
                     rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
        """The response to one question; NXDOMAIN is a response, not an error."""
        assert self._resolver is not None
        try:
            answer = await self._resolver.resolve(qname, rdtype, tcp=True, search=False,
                                                  raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            # The negative answer itself: decode reads its SOA for the negative TTL.
            response: dns.message.Message = exc.kwargs["responses"][qname]
            return response
        return answer.response

    def _note_unresolved(self, unresolved: dict[str, str]) -> None:
        # Logged when it starts, not on every interval: the registration stays broken
        # until someone fixes it, and one line says so.
        for target, why in unresolved.items():
            if self._unresolved.get(target) != why:
                self._log.warning("event=dns_target_unresolved upstream=%s target=%s "
                                  "error=%s", self.upstream.name, target, json.dumps(why))
        self._unresolved = unresolved

    # -- outcomes ---------------------------------------------------------------------
    def _on_answer(self, decoded: Decoded) -> float:
        recovered = self._failures > 0
        endpoints = decoded.endpoints
        changed = self._emitted is None or endpoints != self._emitted
        if changed or recovered:
            self.sink.on_catalog_answer(CatalogAnswer(endpoints))
            # Only after the sink took it: if it raised, the next answer is sent again.
            self._emitted = endpoints
            self._log.info("event=catalog_answer upstream=%s endpoints=%d changed=%s "
                           "recovered=%s ttl=%s", self.upstream.name, len(endpoints),
                           str(changed).lower(), str(recovered).lower(),
                           decoded.ttl if decoded.ttl is not None else "-")
        elif self._on_alive is not None:
            self._on_alive()  # unchanged, but fresh: the sink's staleness clock restarts
        self._failures = 0
        self.last_success = self._clock()
        return next_delay(decoded.ttl, self.interval)

    def _on_error(self, exc: Exception) -> float:
        error = f"dns {self.servers}: {self._question()}: {describe(exc)}"
        self.errors += 1
        # Backoff spreads retries, but a nameserver that is back must be seen within
        # the interval, as it would be without the error.
        delay = min(backoff_delay(self._failures, self._rng, base=BACKOFF_BASE,
                                  cap=BACKOFF_CAP), max(self.interval, MIN_DELAY))
        self._failures += 1
        if not isinstance(exc, (dns.exception.DNSException, DnsDecodeError, SetupError,
                                TargetLookupFailed)):
            # Not the network, not the nameserver: a bug (in decode or the sink).
            self._log.error("event=catalog_bug upstream=%s", self.upstream.name,
                            exc_info=exc)
        self._log.warning("event=catalog_error upstream=%s error=%s retry_in=%.3f",
                          self.upstream.name, json.dumps(error), delay)
        try:
            self.sink.on_catalog_error(error)
        except Exception:  # noqa: BLE001 - a broken sink must not stop the watch either
            self._log.exception("event=sink_error upstream=%s", self.upstream.name)
        return delay

    def _question(self) -> str:
        name = self.qname.to_text() if self.qname is not None else repr(self.upstream.name)
        return f"{self.mode} {name}"

