"""Routes that services declare themselves, as Consul tags in Fabio's `urlprefix-` syntax.

Owns two things: reading a catalog's tags into routes (`scan_tags`, `routes_from_tags`,
pure) and the blocking-query watch on `/v1/catalog/services` that feeds them
(`CatalogRoutesWatch`). Must not know: the route table, upstreams, listeners; it hands
the whole map, service -> routes, to its `on_change` (SPEC "Routing several upstreams on
one listener").

Tag syntax, with `tag_prefix = "urlprefix-"` (Fabio's; the prefix is case-sensitive):
- `urlprefix-/api`            any host, path prefix `/api`
- `urlprefix-api.example/v1`  host `api.example`, path prefix `/v1`
- `urlprefix-api.example/`    host `api.example`, every path
- `urlprefix-*.example/`      every subdomain of `example` (the route table's `*.domain`)
The host is lowercased and a `:port` dropped, as routing ignores both. Whatever follows
the first blank is a Fabio option (`strip=/api`, `proto=https`, `weight=0.5`, ...):
sdproxy ignores options — tag routes never strip a prefix — and logs that it did
(`event=tag_route_options_ignored`). A tag whose route has no `/`, or an invalid host
(a wildcard other than a leading `*.`, a bad port), or a path with `?`, `#`, a backslash,
a blank or a control character is malformed: it gives no route and is logged
(`event=tag_route_malformed service=... tag=... reason=...`); Fabio's TCP routes
(`urlprefix-:3306 proto=tcp`) are among those. A service's routes are deduplicated and
sorted, so that the map does not change when only the order of the catalog's tags does.
Services without a route tag are absent.

The watch follows `consul.ConsulWatcher`'s rules and shares its request code (`get_json`:
token, TLS files, 403 and JSON rules; `describe_error`):
- Blocking queries with `index`, `wait`, `stale` and `dc` from `[consul]`; the next index
  comes from `next_index` (an index that goes backwards, or none, reads afresh with 0);
  after an error the index is 0 and the retry waits a full-jitter backoff; unchanged
  answers that come back at once are paced by a token bucket.
- `on_change` is called with the map of the first good answer (even a map without any
  route; never before Consul has answered once), then only when the map differs from the last one
  given: a wake-up for a service without a route tag, or for a health change, gives
  nothing. If `on_change` raises, the map counts as not given (logged as an error, given
  again at the next answer, after backoff and a fresh read).
- An answer is read incrementally (`handle_answer`): only services whose tag list
  changed are read again, so with 500 services an answer costs the event loop well
  under a millisecond, most of it JSON (`bench/tag_routes.py` measures it).
- Errors (agent unreachable, 403 — the token lacks `service:read` —, an empty service
  list — ACLs hide every service, as there is always "consul" —, any other status, a
  bad answer, TLS) are logged `event=tag_routes_error` and go to the optional
  `on_error`; they never change the map: the last one given stays in force.
- A malformed tag (or one with ignored options) is logged when it appears in an answer,
  not again at every wake-up while it stays; after it went away and came back, again.
- `run()` never raises except CancelledError. Time and randomness are injected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiohttp

from proxy.config import ConsulConfig
from proxy.discovery.consul import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    CONSUL_ERRORS,
    PACE_BURST,
    PACE_INTERVAL,
    TIMEOUT_MARGIN,
    ConsulACLError,
    ConsulTLS,
    base_url,
    describe_error,
    format_wait,
    get_json,
    token_hint,
)
from proxy.discovery.consul_decode import (
    DecodeError,
    TokenBucket,
    backoff_delay,
    next_index,
    parse_index,
)

SERVICES_PATH = "/v1/catalog/services"
# What a 403 on the service list means: the token may not list (read) services.
ACL_LACKS_SERVICE_READ = "ACL: token lacks service:read"
LOGGED_NAMES = 10  # service names quoted in a change's log line; the rest are counted
MAX_HOST_CHARS = 253  # RFC 1035's limit on a name's text form
# One DNS label (letters, digits, "-", "_"; no "-" at either end). Underscores are not
# valid in host names, but Consul service names and real Host headers carry them.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
HOST_PATTERN = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")
IPV6_LITERAL = re.compile(r"\[[0-9a-f:.]+\]")
# No query or fragment in a prefix (a request's path never contains them), no control
# character or DEL (they never reach routing), no backslash.
BAD_PATH_CHARS = re.compile(r"[?#\\\x00-\x20\x7f]")
ROUTE_AND_OPTIONS = re.compile(r"(\S*)(?:\s+(.*))?", re.DOTALL)
OPTIONS_NOTE = "options ignored (sdproxy tag routes never strip a prefix)"


# -- reading tags (pure) ---------------------------------------------------------------
@dataclass(frozen=True)
class TagRoute:
    """One route a service declared: requests for `host` (None: any host) whose path
    starts with `path_prefix` go to `service`, path unchanged."""

    service: str
    host: str | None  # None: any host
    path_prefix: str  # always starts with "/"


@dataclass(frozen=True)
class TagNote:
    """A route tag that could not be read as written: `malformed` gives no route; else
    the route was made and only the tag's Fabio options were ignored."""

    service: str
    tag: str
    reason: str
    malformed: bool


class TagScan(NamedTuple):
    routes: dict[str, tuple[TagRoute, ...]]
    notes: tuple[TagNote, ...]


class MalformedTag(ValueError):
    """The reason a route tag gives no route."""


def split_options(text: str) -> tuple[str, str]:
    """A tag after its prefix -> (route, Fabio options): the route ends at the first
    blank; a tag that starts with a blank has an empty route."""
    match = ROUTE_AND_OPTIONS.fullmatch(text)
    assert match is not None  # the pattern matches any text
    return match[1], (match[2] or "").strip()


def parse_route(route: str) -> tuple[str | None, str]:
    """`host/path` or `/path` (the tag after its prefix, options removed) -> (host or
    None, path prefix); raises MalformedTag with the reason."""
    if not route:
        raise MalformedTag("empty route")
    slash = route.find("/")
    if slash < 0:
        raise MalformedTag("no '/' in the route: it is [host]/path (TCP routes such as "
                           ":3306 are not supported)")
    host_text, path = route[:slash], route[slash:]
    if BAD_PATH_CHARS.search(path):
        raise MalformedTag("the path has a '?', '#', backslash, blank or control character")
    return (parse_host(host_text) if host_text else None), path


def parse_host(text: str) -> str:
    """A route's host, lowercased and without a `:port`; raises MalformedTag."""
    host = text.lower()
    if host.startswith("["):  # an IPv6 literal, maybe with a port: [::1]:8080
        end = host.find("]")
        literal, rest = host[:end + 1], host[end + 1:]
        if end < 0 or not IPV6_LITERAL.fullmatch(literal) or not _is_port_suffix(rest):
            raise MalformedTag(f"invalid host {text!r}")
        return literal
    name, colon, port = host.partition(":")
    if colon and not _is_port_suffix(colon + port):
        raise MalformedTag(f"invalid port in host {text!r}")
    if len(name) > MAX_HOST_CHARS or not HOST_PATTERN.fullmatch(name):
        raise MalformedTag(f"invalid host {text!r} (a name, or *.domain)")
    return name


def _is_port_suffix(text: str) -> bool:
    return text == "" or (text[0] == ":" and text[1:].isdigit() and len(text) <= 6)


def scan_service(service: str, tags: Sequence[str], tag_prefix: str
                 ) -> tuple[tuple[TagRoute, ...], tuple[TagNote, ...]]:
    """The routes one service's tags declare (deduplicated, sorted) and its notes.

    Raises DecodeError for a tag that is not a string (a catalog answer gone wrong)."""
    found: set[TagRoute] = set()
    notes: list[TagNote] = []
    for tag in tags:
        if not isinstance(tag, str):
            raise DecodeError(f"service {service!r}: a tag is not a string: {tag!r}")
        if not tag.startswith(tag_prefix):
            continue
        route, options = split_options(tag[len(tag_prefix):])
        try:
            host, path = parse_route(route)
        except MalformedTag as exc:
            notes.append(TagNote(service, tag, str(exc), malformed=True))
            continue
        found.add(TagRoute(service, host, path))
        if options:
            notes.append(TagNote(service, tag, OPTIONS_NOTE, malformed=False))
    return tuple(sorted(found, key=_route_order)), tuple(notes)


def scan_tags(tags_by_service: Mapping[str, Sequence[str]], tag_prefix: str) -> TagScan:
    """Every route the services' tags declare, and every tag that could not be read as
    written. Services without a route tag are absent from the routes."""
    routes: dict[str, tuple[TagRoute, ...]] = {}
    notes: list[TagNote] = []
    for service in sorted(tags_by_service):
        found, noted = scan_service(service, tags_by_service[service], tag_prefix)
        if found:
            routes[service] = found
        notes.extend(noted)
    return TagScan(routes, tuple(notes))


def _route_order(route: TagRoute) -> tuple[bool, str, str]:
    return (route.host is None, route.host or "", route.path_prefix)


def routes_from_tags(tags_by_service: dict[str, list[str]],
                     tag_prefix: str) -> dict[str, tuple[TagRoute, ...]]:
    """The routes the services' tags declare; services without such a tag are absent."""
    return scan_tags(tags_by_service, tag_prefix).routes


def decode_services(body: Any) -> dict[str, list[Any]]:
    """`/v1/catalog/services` JSON -> {service: tags}; raises DecodeError.

    Only the shape is checked here; each tag is checked by `scan_service`, so that an
    answer costs a scan only for the services whose tags changed (see the watch)."""
    if not isinstance(body, dict):
        raise DecodeError(f"expected an object of services, got {type(body).__name__}")
    services: dict[str, list[Any]] = {}
    for name, tags in body.items():
        if tags is None:  # some Consul versions write null for a service without tags
            tags = []
        elif type(tags) is not list:
            raise DecodeError(f"service {name!r}: tags are not a list")
        services[name] = tags
    return services


# -- the watch -----------------------------------------------------------------------------
RoutesMap = dict[str, tuple[TagRoute, ...]]


class ScannedService(NamedTuple):
    """One service of the last answer as the watch read it: its tags as Consul listed
    them (an unchanged list is not read again), its routes and notes."""

    tags: list[Any]
    routes: tuple[TagRoute, ...]
    notes: tuple[TagNote, ...]


class CatalogRoutesWatch:
    """Watches the catalog's service list and gives `on_change` the routes its tags
    declare: once at the first answer, then whenever they change."""

    def __init__(self, consul: ConsulConfig, tag_prefix: str,
                 on_change: Callable[[RoutesMap], None], *,
                 on_error: Callable[[str], None] | None = None,
                 session: aiohttp.ClientSession | None = None,
                 rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 log: logging.Logger | None = None) -> None:
        self.consul = consul
        self.tag_prefix = tag_prefix
        self.on_change = on_change
        self.on_error = on_error
        self._session = session
        self._rng = rng or random.Random()
        self._clock = clock
        self._log = log or logging.getLogger("sdproxy.discovery.catalog_routes")
        self.address = base_url(consul.address)
        self.url = self.address + SERVICES_PATH
        self.timeout = consul.wait + consul.wait / 16 + TIMEOUT_MARGIN
        self._tls = ConsulTLS(consul)
        self._pace = TokenBucket(PACE_BURST, PACE_INTERVAL)
        self._scanned: dict[str, ScannedService] = {}  # of the last good answer
        # True from the first answer until on_change has taken a map without raising.
        self._pending = True
        self.index = 0  # what the next query sends; 0 = no index (answer at once)
        self.failures = 0  # consecutive errors, drives the backoff
        # Read by the admin API and tests.
        self.routes: RoutesMap | None = None  # the map last given to on_change
        self.last_index = 0  # X-Consul-Index of the last good answer
        self.last_success: float | None = None  # clock() of the last good answer
        self.last_error: str | None = None  # cleared by a good answer
        self.errors = 0  # since start

    def reread(self) -> None:
        """SIGHUP: load the TLS files again at the next request (renewed certificates)."""
        self._tls.reread()

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
                    self._log.exception("event=tag_routes_bug")
                    delay = BACKOFF_CAP
                if delay > 0:
                    await asyncio.sleep(delay)
        finally:
            if owned:
                await session.close()

    async def poll_once(self, session: aiohttp.ClientSession) -> float:
        """One blocking query and its outcome; returns the delay before the next one."""
        try:
            body, headers = await get_json(session, self.url, consul=self.consul,
                                           tls=self._tls, params=self._params(),
                                           timeout=self.timeout,
                                           acl_lacks=ACL_LACKS_SERVICE_READ)
            services = decode_services(body)
            if not services:
                # Every catalog lists "consul" (its servers register it), so an empty list
                # is ACLs hiding every service from this token, not a catalog without
                # routes: an error, which keeps the last map (Consul 1.8 answers so
                # instead of 403, and sends no X-Consul-Results-Filtered-By-ACLs).
                raise ConsulACLError(
                    f"{ACL_LACKS_SERVICE_READ} (Consul listed no service at all, not even "
                    f'"consul": ACLs hide every service from this token'
                    f"{token_hint(self.consul)})")
            return self.handle_answer(services, headers.get("X-Consul-Index"))
        except asyncio.CancelledError:
            raise
        # Never crash (DESIGN habit 10): whatever failed, report it, back off, try again.
        except Exception as exc:  # noqa: BLE001
            return self._on_error(exc)

    def _params(self) -> dict[str, str]:
        params = {"wait": format_wait(self.consul.wait)}
        if self.index > 0:
            params["index"] = str(self.index)
        if self.consul.stale:
            params["stale"] = ""
        if self.consul.datacenter:
            params["dc"] = self.consul.datacenter
        return params

    def handle_answer(self, services: dict[str, list[Any]], index_header: str | None) -> float:
        """One good answer (decoded, with its X-Consul-Index): give the map if it changed;
        returns the delay before the next query. Raises what on_change raises."""
        self.index = next_index(self.index, index_header)
        index = parse_index(index_header)
        if index is not None:
            self.last_index = index
        now = self._clock()
        self.last_success = now
        self.failures = 0
        self.last_error = None
        # Only the services whose tags changed are read again: with hundreds of services,
        # reading all of them at every answer would hold the event loop for milliseconds.
        previous = self._scanned
        scanned: dict[str, ScannedService] = {}
        touched: list[str] = []  # services whose routes changed
        for service, tags in services.items():
            old = previous.get(service)
            if old is not None and old.tags == tags:
                scanned[service] = old
                continue
            routes, notes = scan_service(service, tags, self.tag_prefix)
            scanned[service] = ScannedService(tags, routes, notes)
            self._log_new_notes(notes, old.notes if old is not None else ())
            if routes != (old.routes if old is not None else ()):
                touched.append(service)
        touched += [s for s, old in previous.items() if old.routes and s not in scanned]
        self._scanned = scanned
        if not (touched or self._pending):
            # Unchanged: fine after a full wait, a busy loop if it keeps coming back at once.
            return self._pace.take(now)
        routes_map = {s: entry.routes for s, entry in scanned.items() if entry.routes}
        self._pending = True
        self.on_change(routes_map)
        # Only once on_change took it: if it raised, the next answer gives it again.
        self._pending = False
        self.routes = routes_map
        self._log_change(previous, scanned, touched)
        return 0.0

    def _log_new_notes(self, notes: tuple[TagNote, ...], known: tuple[TagNote, ...]) -> None:
        for note in notes:
            if note in known:
                continue
            event = "tag_route_malformed" if note.malformed else "tag_route_options_ignored"
            self._log.warning("event=%s service=%s tag=%s reason=%s", event,
                              json.dumps(note.service), json.dumps(note.tag),
                              json.dumps(note.reason))

    def _log_change(self, previous: dict[str, ScannedService],
                    scanned: dict[str, ScannedService], touched: list[str]) -> None:
        def had(service: str) -> bool:
            entry = previous.get(service)
            return entry is not None and bool(entry.routes)

        def has(service: str) -> bool:
            entry = scanned.get(service)
            return entry is not None and bool(entry.routes)

        added = [s for s in touched if has(s) and not had(s)]
        removed = [s for s in touched if had(s) and not has(s)]
        changed = [s for s in touched if had(s) and has(s)]
        assert self.routes is not None
        self._log.info("event=tag_routes index=%d services=%d routes=%d added=%s removed=%s "
                       "changed=%s", self.last_index, len(self.routes),
                       sum(len(r) for r in self.routes.values()), _names(added),
                       _names(removed), _names(changed))

    def _on_error(self, exc: Exception) -> float:
        error = f"consul {self.address}: {describe_error(exc, self.timeout)}"
        self.errors += 1
        self.last_error = error
        # Start over with a plain read: the index we held may mean nothing to the server
        # that answers next (another server, a restored snapshot).
        self.index = 0
        delay = backoff_delay(self.failures, self._rng, base=BACKOFF_BASE, cap=BACKOFF_CAP)
        self.failures += 1
        if not isinstance(exc, CONSUL_ERRORS):
            # Not the network, not Consul: a bug (here or in on_change). Keep the trace.
            self._log.error("event=tag_routes_bug", exc_info=exc)
        self._log.warning("event=tag_routes_error error=%s retry_in=%.3f", json.dumps(error),
                          delay)
        if self.on_error is not None:
            try:
                self.on_error(error)
            except Exception:  # noqa: BLE001 - a broken callback must not stop the watch
                self._log.exception("event=tag_routes_bug")
        return delay


def _names(services: list[str]) -> str:
    """Up to LOGGED_NAMES names, comma-separated, and how many more: `a,b+3`; `-` if none."""
    if not services:
        return "-"
    shown = ",".join(services[:LOGGED_NAMES])
    more = len(services) - LOGGED_NAMES
    return f"{shown}+{more}" if more > 0 else shown
