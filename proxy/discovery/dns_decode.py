"""Pure rules for reading DNS: SRV and A responses -> endpoints, and when to ask again.

Owns: what a DNS response means for routing (which records become which endpoints, at
which address, port and weight), how a target's addresses are found inside a response,
and how long the answer may be trusted before the next lookup. Must not know: sockets,
asyncio, resolvers, clocks or randomness; the I/O shell (`discovery/dns.py`) sends the
queries and hands the responses (`dns.message.Message`) in.

Rules:
- NOERROR and NXDOMAIN are answers. NXDOMAIN and NOERROR without records (NODATA) mean
  "no instance": Consul answers NXDOMAIN when no instance of a service passes. Any other
  rcode, or a response that is not a well-formed answer to its question, raises
  `DnsDecodeError`: the caller keeps the last good pool rather than route on it.
- CNAMEs in the answer are followed (`QueryMessage.resolve_chaining`).
- SRV (RFC 2782): weight `max(1, weight)`, since weight 0 means "rarely" there, not
  "never", and our balancers read 0 as "no traffic". Target "." means "no service here"
  and port 0 cannot be routed to: both are skipped. Only the lowest priority value
  that still yields an address is used: higher values are the backups of RFC 2782, used
  once no instance of a lower one is left (Consul answers priority 1 for every instance).
- An SRV target's addresses come from the response itself (A and AAAA records in the
  additional or answer section, following CNAMEs there), as Consul sends them for
  `<node>.node.<dc>.consul.` and `<hex>.addr.<dc>.consul.` targets. A target without
  them is `pending`: the shell looks it up and passes the result to `srv_endpoints`. A
  target with several addresses yields one endpoint per address.
- A mode: every A record of the name, each at the upstream's fixed port, weight 1.
- Endpoint ids are `address:port` (`[v6]:port`), as SPEC says for dns discovery. Records
  with the same id (two SRV records for one socket address) are merged, keeping the
  highest weight. Output is sorted by id: equal answers give equal tuples.
- TTL: the smallest TTL above 0 among the records an answer was built from (CNAMEs,
  the answer, the target addresses used; for negative answers the SOA's negative TTL,
  RFC 2308 section 5). TTL 0 (Consul's default) means "do not cache", which gives no
  earlier deadline: the configured interval applies. `next_delay` combines them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import groupby
from typing import cast

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.IN.SRV
import dns.rrset

from proxy.model import Address, Endpoint

# CNAME links followed inside one response before giving up on a target's address.
MAX_CHAIN = 16
# The shortest wait between two lookups, whatever the interval (a guard against a
# zero or negative interval spinning the loop; config forbids them anyway).
MIN_DELAY = 0.05

ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)


class DnsDecodeError(ValueError):
    """The response is not an answer we can route on."""


@dataclass(frozen=True, slots=True)
class Addresses:
    """The addresses of one name and the smallest TTL above 0 they carried."""

    addresses: tuple[str, ...]
    ttl: int | None = None


@dataclass(frozen=True, slots=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    target: dns.name.Name


@dataclass(frozen=True, slots=True)
class SrvAnswer:
    """An SRV response read, before the pending targets are resolved."""

    records: tuple[SrvRecord, ...]
    known: Mapping[dns.name.Name, Addresses] = field(default_factory=dict)
    ttl: int | None = None

    @property
    def pending(self) -> tuple[dns.name.Name, ...]:
        """Targets whose addresses the response did not carry, each once, in order."""
        seen: dict[dns.name.Name, None] = {}
        for record in self.records:
            if record.target not in self.known:
                seen.setdefault(record.target, None)
        return tuple(seen)


@dataclass(frozen=True, slots=True)
class Decoded:
    """A complete answer: the endpoints and the smallest TTL above 0 behind them."""

    endpoints: tuple[Endpoint, ...]
    ttl: int | None = None


# -- names and delays -------------------------------------------------------------------

def query_name(name: str, domain: str) -> dns.name.Name:
    """`<name>.<domain>` as an absolute name; `name` alone when `domain` is empty."""
    name, domain = name.strip("."), domain.strip(".")
    try:
        return dns.name.from_text(f"{name}.{domain}" if domain else name)
    except dns.exception.DNSException as exc:  # label too long, empty label, ...
        raise DnsDecodeError(f"invalid query name {name!r} in {domain!r}: {exc}") from exc


def positive_min(ttls: Iterable[int | None]) -> int | None:
    """The smallest TTL above 0, or None when there is none."""
    positive = [t for t in ttls if t is not None and t > 0]
    return min(positive) if positive else None


def next_delay(ttl: int | None, interval: float) -> float:
    """Seconds until the next lookup: `interval`, or the TTL when it is above 0 and less."""
    delay = max(interval, MIN_DELAY)
    if ttl is not None and ttl > 0:
        delay = min(delay, float(ttl))
    return delay


def endpoint_id(address: str, port: int) -> str:
    return str(Address(address, port))


# -- reading responses ------------------------------------------------------------------

def _chain(response: dns.message.Message) -> tuple[dns.rrset.RRset | None, int | None]:
    """The answer RRset for the question (after CNAMEs) or None, and its TTL."""
    rcode = response.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        raise DnsDecodeError(f"answered {dns.rcode.to_text(rcode)}")
    if not isinstance(response, dns.message.QueryMessage):
        raise DnsDecodeError("not a query response")
    try:
        chained = response.resolve_chaining()
    except dns.exception.DNSException as exc:  # CNAME loop, answer with NXDOMAIN, ...
        raise DnsDecodeError(f"malformed answer: {type(exc).__name__}: {exc}") from exc
    if chained.answer is None:
        # Negative answer: resolve_chaining folded in the SOA's negative TTL (RFC 2308).
        return None, positive_min([chained.minimum_ttl])
    ttls: list[int | None] = [c.ttl for c in chained.cnames]
    ttls.append(chained.answer.ttl)
    return chained.answer, positive_min(ttls)


def decode_addresses(response: dns.message.Message) -> Addresses:
    """A or AAAA lookup of an SRV target -> its addresses (none for NXDOMAIN/NODATA)."""
    rrset, ttl = _chain(response)
    if rrset is None or rrset.rdtype not in ADDRESS_TYPES:
        return Addresses((), ttl)
    return Addresses(tuple(dict.fromkeys(rd.address for rd in rrset)), ttl)


def addresses_in(response: dns.message.Message, name: dns.name.Name) -> Addresses | None:
    """The addresses a response carries for `name` (answer or additional section),
    following CNAMEs there; None when it carries none."""
    sections = (response.answer, response.additional)
    ttls: list[int | None] = []
    for _ in range(MAX_CHAIN):
        found: list[str] = []
        for rdtype in ADDRESS_TYPES:
            for section in sections:
                rrset = response.get_rrset(section, name, dns.rdataclass.IN, rdtype)
                if rrset:
                    found.extend(rd.address for rd in rrset)
                    ttls.append(rrset.ttl)
        if found:
            return Addresses(tuple(dict.fromkeys(found)), positive_min(ttls))
        cname = None
        for section in sections:
            cname = response.get_rrset(section, name, dns.rdataclass.IN, dns.rdatatype.CNAME)
            if cname:
                break
        if not cname:
            return None
        ttls.append(cname.ttl)
        name = cname[0].target
    return None


def decode_srv(response: dns.message.Message) -> SrvAnswer:
    """An SRV response -> its usable records and the target addresses it carried."""
    rrset, ttl = _chain(response)
    if rrset is None:
        return SrvAnswer((), {}, ttl)
    if rrset.rdtype != dns.rdatatype.SRV:
        raise DnsDecodeError(f"expected SRV records, got {dns.rdatatype.to_text(rrset.rdtype)}")
    records: list[SrvRecord] = []
    known: dict[dns.name.Name, Addresses] = {}
    for rd in (cast(dns.rdtypes.IN.SRV.SRV, r) for r in rrset):
        # RFC 2782: target "." means the service is decidedly not available there.
        if rd.target == dns.name.root or rd.port == 0:
            continue
        records.append(SrvRecord(rd.priority, max(1, rd.weight), rd.port, rd.target))
        if rd.target not in known:
            found = addresses_in(response, rd.target)
            if found is not None:
                known[rd.target] = found
    return SrvAnswer(tuple(records), known, ttl)


def srv_endpoints(answer: SrvAnswer,
                  resolved: Mapping[dns.name.Name, Addresses] | None = None) -> Decoded:
    """Endpoints of the lowest priority that has any address.

    `resolved` holds what the shell found for `answer.pending`; a target missing from
    both it and `answer.known` (its lookup found nothing) is left out.
    """
    resolved = resolved or {}
    by_priority = sorted(answer.records, key=lambda r: r.priority)
    for _, group in groupby(by_priority, key=lambda r: r.priority):
        endpoints: list[Endpoint] = []
        ttls: list[int | None] = [answer.ttl]
        for record in group:
            found = answer.known.get(record.target) or resolved.get(record.target)
            if found is None or not found.addresses:
                continue
            ttls.append(found.ttl)
            node = record.target.to_text(omit_final_dot=True)
            endpoints.extend(
                Endpoint(id=endpoint_id(ip, record.port), address=ip, port=record.port,
                         node=node, weight=record.weight)
                for ip in found.addresses)
        if endpoints:
            return Decoded(merge(endpoints), positive_min(ttls))
    return Decoded((), answer.ttl)


def decode_a(response: dns.message.Message, port: int) -> Decoded:
    """An A response (Docker Swarm `tasks.<service>` style) -> `ip:port` endpoints."""
    rrset, ttl = _chain(response)
    if rrset is None:
        return Decoded((), ttl)
    if rrset.rdtype != dns.rdatatype.A:
        raise DnsDecodeError(f"expected A records, got {dns.rdatatype.to_text(rrset.rdtype)}")
    return Decoded(merge(Endpoint(id=endpoint_id(rd.address, port), address=rd.address,
                                  port=port) for rd in rrset), ttl)


def merge(endpoints: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    """One endpoint per id (the highest weight wins), sorted by id."""
    by_id: dict[str, Endpoint] = {}
    for e in endpoints:
        have = by_id.get(e.id)
        if have is None or e.weight > have.weight:
            by_id[e.id] = e
    return tuple(by_id[k] for k in sorted(by_id))
