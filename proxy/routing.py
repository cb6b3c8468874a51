"""The route table of one listener: which upstream a request goes to, by Host and path.

Owns the matching rules of SPEC "Routing several upstreams on one listener" and what a
stripping route changes in a request head (`strip_prefix`), and nothing else: it knows
neither sockets nor runtimes (the value a route leads to is the caller's,
`target`), so it is unit-tested as plain data and compiled with mypyc.

Rules:
- Host groups are tried from the most specific: the exact host, then `*.domain` from the
  longest domain to the shortest (`*.example.com` matches `a.example.com` and
  `b.a.example.com`, not `example.com`), then the routes without a host. In the first
  group that has a matching prefix, the longest prefix wins.
- Host matching ignores case, a `:port` and a final dot; a request without a Host field
  only reaches routes without a host.
- Prefixes match the request path as strings (`/api` matches `/apix`, as Fabio and
  Traefik's PathPrefix do); an absolute-form target is matched on its path.

Cost per request: a dict lookup on the Host value as sent (it gives the host groups to
try, in order, worked out once per distinct value: case, port and wildcards are not
redone per request; skipped when no route names a host), then per group one dict lookup
per distinct prefix length present, longest first, never a scan of the routes. A table
is immutable once built; a change builds a new one, which the listener swaps in one
assignment. Each entry's request counter is carried into the next table by the route's
key, so a counter never goes backwards across changes; an entry whose route and target did
not change is carried over as it is (a change to one route of 500 builds one entry, and
the dicts that index them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Generic, TypeVar

from proxy.l7.message import MessageHead

T = TypeVar("T")

ANY_HOST: Final = ""  # Route.host of a route that matches every host
# Host values whose groups a table remembers; past it the memo starts afresh (clients
# choose the Host they send: the memo must stay bounded).
MAX_REMEMBERED_HOSTS: Final = 1024


class Route:
    """One route as configured or derived from a catalog tag. `host` is "" for any host,
    a lowercase name, or `*.domain`; `path_prefix` starts with "/"."""

    __slots__ = ("host", "path_prefix", "source", "strip_prefix", "upstream")

    def __init__(self, host: str, path_prefix: str, upstream: str, strip_prefix: bool = False,
                 source: str = "config") -> None:
        self.host = normal_host(host)
        self.path_prefix = path_prefix
        self.upstream = upstream
        self.strip_prefix = strip_prefix
        self.source = source  # "config" or "catalog"

    def key(self) -> tuple[str, str, str]:
        """What identifies a route's traffic (its metric label set)."""
        return (self.upstream, self.host, self.path_prefix)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Route) and (self.host, self.path_prefix, self.upstream,
                                              self.strip_prefix, self.source)
                == (other.host, other.path_prefix, other.upstream, other.strip_prefix,
                    other.source))

    def __hash__(self) -> int:
        return hash((self.host, self.path_prefix, self.upstream, self.strip_prefix))

    def __repr__(self) -> str:
        return (f"Route({self.host or '*'}{self.path_prefix} -> {self.upstream}"
                f"{' strip' if self.strip_prefix else ''} {self.source})")


def normal_host(host: str) -> str:
    """A configured host as the table keys it: lowercase, without a port or final dot."""
    return _host_key(host.encode("idna" if not host.isascii() else "ascii")).decode()


class Routed(Generic[T]):
    """A route in a built table, with what the request path needs precomputed."""

    __slots__ = ("forwarded_prefix", "prefix", "requests", "route", "strip", "target")

    def __init__(self, route: Route, target: T) -> None:
        self.route = route
        self.target = target
        self.prefix = route.path_prefix.encode()
        self.strip = route.strip_prefix and route.path_prefix != "/"
        # X-Forwarded-Prefix: what was taken off, without the "/" the path keeps.
        self.forwarded_prefix = self.prefix.rstrip(b"/") or b"/"
        self.requests = 0  # requests this route took (the caller counts)

    def rewrite(self, target: bytes) -> bytes:
        """The request target, of a request this route matched, with the prefix stripped,
        keeping a leading "/" (`/x/a` under `/x/` -> `/a`; an absolute-form target is
        forwarded in origin form)."""
        path = target if target[:1] == b"/" else path_of(target)
        rest = path[len(self.prefix):]
        if rest[:1] == b"/":
            return rest
        return b"/" + rest


class _Group(Generic[T]):
    """The routes of one host (or `*.domain`, or any host), by prefix."""

    __slots__ = ("by_prefix", "lengths")

    def __init__(self) -> None:
        self.by_prefix: dict[bytes, Routed[T]] = {}
        self.lengths: tuple[int, ...] = ()  # distinct prefix lengths, longest first

    def add(self, routed: Routed[T]) -> None:
        self.by_prefix[routed.prefix] = routed

    def seal(self) -> None:
        """Once every route is added (not per add: a table of n routes is built in O(n))."""
        self.lengths = tuple(sorted({len(p) for p in self.by_prefix}, reverse=True))

    def match(self, path: bytes) -> Routed[T] | None:
        by_prefix = self.by_prefix
        size = len(path)
        for n in self.lengths:
            if n <= size:
                found = by_prefix.get(path[:n])
                if found is not None:
                    return found
        return None


class RouteTable(Generic[T]):
    """An immutable table; `lookup(host, target)` picks the route of one request."""

    __slots__ = ("any_host", "by_host", "entries", "exact", "no_host", "wildcards")

    def __init__(self, routes: Iterable[tuple[Route, T]],
                 previous: RouteTable[T] | None = None) -> None:
        """Routes with the same host and prefix: the first one given wins (config checks
        reject such duplicates; between a configured route and a tag route, the caller
        gives the configured one first)."""
        self.exact: dict[bytes, _Group[T]] = {}
        self.wildcards: dict[bytes, _Group[T]] = {}  # "*.example.com" keyed b"example.com"
        self.any_host: _Group[T] | None = None
        self.entries: list[Routed[T]] = []
        # Host value as sent -> the groups to try for it, most specific first.
        self.by_host: dict[bytes | None, tuple[_Group[T], ...]] = {}
        before: dict[tuple[str, str, str], Routed[T]] = {}
        if previous is not None:
            for old in previous.entries:
                before[old.route.key()] = old
        for route, target in routes:
            group = self._group_of(route.host)
            routed = before.get(route.key())
            if routed is None or routed.target is not target or (
                    routed.route is not route and routed.route != route):
                fresh: Routed[T] = Routed(route, target)
                if routed is not None:
                    fresh.requests = routed.requests
                routed = fresh
            # else: the same route to the same target is carried over whole, so that a
            # request counted on the old table while this one is built is not lost.
            if routed.prefix in group.by_prefix:
                continue
            group.add(routed)
            self.entries.append(routed)
        for group in [*self.exact.values(), *self.wildcards.values(), *self._any_host_only()]:
            group.seal()
        # What every host gets when no route names one (and a request without Host).
        self.no_host: tuple[_Group[T], ...] = self._any_host_only()

    def _any_host_only(self) -> tuple[_Group[T], ...]:
        # Not inline in __init__: there mypy still takes `self.any_host` for the None
        # assigned above (narrowing survives the calls that set it), and mypyc checks that.
        any_host = self.any_host
        return () if any_host is None else (any_host,)

    def _group_of(self, host: str) -> _Group[T]:
        if host == ANY_HOST:
            if self.any_host is None:
                self.any_host = _Group()
            return self.any_host
        groups = self.exact
        key = host.encode()
        if host.startswith("*."):
            groups, key = self.wildcards, key[2:]
        group = groups.get(key)
        if group is None:
            group = groups[key] = _Group()
        return group

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, host: bytes | None, target: bytes) -> Routed[T] | None:
        """The route for a request with this Host field value (None: none sent) and
        request target; None when no route matches (the caller answers 404)."""
        path = target if target[:1] == b"/" else path_of(target)
        if self.exact or self.wildcards:
            groups = self.by_host.get(host)
            if groups is None:
                groups = self._groups_for(host)
        else:
            groups = self.no_host
        for group in groups:
            found = group.match(path)
            if found is not None:
                return found
        return None

    def _groups_for(self, host: bytes | None) -> tuple[_Group[T], ...]:
        """The groups a Host value tries, most specific first; remembered (bounded)."""
        groups: list[_Group[T]] = []
        if host:
            key = _host_key(host)
            group = self.exact.get(key)
            if group is not None:
                groups.append(group)
            dot = key.find(b".")
            while dot >= 0:  # a.b.example.com: b.example.com, then example.com, ...
                group = self.wildcards.get(key[dot + 1:])
                if group is not None:
                    groups.append(group)
                dot = key.find(b".", dot + 1)
        if self.any_host is not None:
            groups.append(self.any_host)
        found = tuple(groups)
        if len(self.by_host) >= MAX_REMEMBERED_HOSTS:
            self.by_host.clear()
        self.by_host[host] = found
        return found


def _host_key(host: bytes) -> bytes:
    """`Example.COM:8080` -> `example.com`; `[::1]:80` -> `[::1]`."""
    if host[:1] == b"[":
        end = host.find(b"]")
        if end > 0:
            host = host[:end + 1]
    else:
        colon = host.find(b":")
        if colon >= 0:
            host = host[:colon]
        if host[-1:] == b".":
            host = host[:-1]
    return host.lower()


def path_of(target: bytes) -> bytes:
    """The path of an absolute-form target (`http://h/p?q` -> `/p?q`, `http://h` -> `/`);
    any other target is returned as it is (`*` then matches no prefix)."""
    scheme = target.find(b"://")
    if scheme < 0:
        return target
    slash = target.find(b"/", scheme + 3)
    return target[slash:] if slash >= 0 else b"/"


# -- what a stripping route changes in a request head ------------------------------------

_X_FORWARDED_HOST: Final = b"x-forwarded-host"
_X_FORWARDED_PREFIX: Final = b"x-forwarded-prefix"


def strip_prefix(head: MessageHead, routed: Routed[T], host: bytes | None) -> None:
    """Forward `head` with the route's prefix taken off its target (a leading "/" kept),
    `X-Forwarded-Prefix` set to that prefix (a client's replaced) and `X-Forwarded-Host` to
    the Host it asked for (a client's kept, as X-Forwarded-Proto: sdproxy sits behind the
    frontend that knows). Fields are replaced in place or appended, so the parser's
    indexes of the hop-by-hop fields stay right. The access log shows the rewritten
    target: what the instance was asked."""
    head.target = routed.rewrite(head.target)
    head.raw = None  # the head as received is not what goes on: encode it field by field
    headers = head.headers
    prefix = routed.forwarded_prefix
    replaced = has_host = False
    for i, (name, _value) in enumerate(headers):
        size = len(name)
        if size == 18 and name.lower() == _X_FORWARDED_PREFIX:
            headers[i] = (name, prefix)
            replaced = True
        elif size == 16 and name.lower() == _X_FORWARDED_HOST:
            has_host = True
    if not replaced:
        headers.append((b"X-Forwarded-Prefix", prefix))
    if not has_host and host is not None:
        headers.append((b"X-Forwarded-Host", host))
