"""Immutable values shared by discovery, the pool and the admin API.

An `Endpoint` is what a catalog says about one instance: its identity and its address.
It knows nothing of runtime state (breakers, counters, connections); that lives in
`upstream.host.Host`, keyed by `Endpoint.id`, so it survives catalog refreshes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class Address(NamedTuple):
    """A `host:port` pair; IPv6 hosts are stored without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance of an upstream service as the catalog describes it."""

    id: str
    address: str
    port: int
    node: str = ""
    datacenter: str = ""
    tags: tuple[str, ...] = ()
    weight: int = 1
    # Consul's aggregated check status ("passing" or "warning"); other kinds say "passing".
    status: str = "passing"
    meta: tuple[tuple[str, str], ...] = field(default=())

    @property
    def hostport(self) -> str:
        return str(Address(self.address, self.port))


@dataclass(frozen=True, slots=True)
class CatalogAnswer:
    """A complete answer of a catalog for one upstream: every usable endpoint.

    `index` is the catalog's version of the answer (Consul's X-Consul-Index) or None
    where the catalog has no such notion.
    """

    endpoints: tuple[Endpoint, ...]
    index: int | None = None
