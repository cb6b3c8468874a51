"""Configuration: TOML file -> frozen dataclasses, every default in one place.

`load(path, environ)` is pure apart from reading the file: it never reads `os.environ`
itself, so tests pass whatever environment they need. Every problem found is collected
and reported at once as `FILE: key.path: message` (array entries by index:
`upstreams[0].breaker.failures`). Unknown keys are errors: a typo must not be ignored.
Components receive only their own section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from proxy.model import Address

MODES = ("http", "tcp")
DISCOVERY_KINDS = ("consul", "dns", "file", "static")
BALANCERS = ("round_robin", "least_conn", "random", "p2c", "hash")
HTTP_PARSERS = ("httptools", "h11")
DNS_TYPES = ("SRV", "A")
RETRY_ON = ("connect-failure", "reset", "timeout", "502", "503", "504")


@dataclass(frozen=True)
class AdminConfig:
    listen: Address = Address("127.0.0.1", 9901)


@dataclass(frozen=True)
class ConsulConfig:
    address: str = "http://127.0.0.1:8500"  # $CONSUL_HTTP_ADDR overrides the default
    token: str = ""  # $CONSUL_HTTP_TOKEN overrides the default
    datacenter: str = ""
    wait: float = 55.0
    stale: bool = True


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[Address, ...] = (Address("127.0.0.1", 8600),)
    domain: str = "service.consul"
    interval: float = 1.0


@dataclass(frozen=True)
class BreakerConfig:
    failures: int = 5
    reset_timeout: float = 10.0


@dataclass(frozen=True)
class HealthConfig:
    path: str = "/health"
    interval: float = 2.0


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    listen: Address
    mode: str = "http"
    discovery: str = "consul"
    tags: tuple[str, ...] = ()
    include_warning: bool = False
    datacenters: tuple[str, ...] = ()
    endpoints: tuple[Address, ...] = ()
    file: str = ""
    dns_type: str = "SRV"
    port: int = 0
    balance: str = "round_robin"
    hash_key: str = "source_ip"
    connect_timeout: float = 1.0
    request_timeout: float = 30.0
    idle_timeout: float = 60.0
    header_timeout: float = 10.0
    max_header_size: int = 65536
    http_parser: str = "httptools"
    max_connections: int = 10000
    retries: int = 2
    retry_on: tuple[str, ...] = RETRY_ON
    drain_timeout: float = 30.0
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    health: HealthConfig | None = None  # only when [upstreams.health] is present


@dataclass(frozen=True)
class Config:
    path: str
    admin: AdminConfig = field(default_factory=AdminConfig)
    consul: ConsulConfig = field(default_factory=ConsulConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()


class ConfigError(Exception):
    """Raised by `load` with every problem found, each `FILE: key.path: message`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load(path: str, environ: Mapping[str, str]) -> Config:
    raise NotImplementedError
