"""Configuration: TOML file -> frozen dataclasses, every default in one place.

`load(path, environ)` is pure apart from reading files (the config, and for `[consul]`
the token file and TLS files it names, and the upstreams' TLS files, to check them): it never reads `os.environ` itself,
so tests pass whatever environment they need. `[consul]` keys that Consul's own clients
take from the environment resolve here, once: a key in the file, else the variable, else
the default; a key written as "" is unset (SPEC "TLS"). Every problem found is collected
and reported at once as `FILE: key.path: message` (array entries by index:
`upstreams[0].breaker.failures`). Unknown keys are errors: a typo must not be ignored.
Components receive only their own section.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, Union
from urllib.parse import urlsplit

from proxy import tls
from proxy.model import Address
from proxy.tls import ListenTlsConfig, UpstreamTlsConfig

MODES = ("http", "tcp")
DISCOVERY_KINDS = ("consul", "dns", "file", "static", "etcd", "zookeeper")
BALANCERS = ("round_robin", "least_conn", "random", "p2c", "hash")
HTTP_PARSERS = ("httptools", "h11")
DNS_TYPES = ("SRV", "A")
RETRY_ON = ("connect-failure", "reset", "timeout", "502", "503", "504")
LOG_LEVELS = ("debug", "info", "warning", "error")
# `sdproxy run --log-level` sets it, so that workers and reloads keep the level; unlike
# Consul's variables it wins over the file, as the command line does.
LOG_LEVEL_ENV = "SDPROXY_LOG_LEVEL"
LOG_FORMATS = ("logfmt", "json")
ACCESS_OFF = "off"


@dataclass(frozen=True)
class AdminConfig:
    listen: Address = Address("127.0.0.1", 9901)  # noqa: RUF009 (an immutable NamedTuple)
    # Bearer token for the admin's write actions (drain/enable). Without it they are
    # allowed only when `listen` is a loopback address (proxy.admin.auth).
    token: str = field(default="", repr=False)


@dataclass(frozen=True)
class ConsulConfig:
    """Resolved values: the file's key, else Consul's environment variable, else this."""

    address: str = "http://127.0.0.1:8500"  # $CONSUL_HTTP_ADDR; https:// means TLS
    token: str = field(default="", repr=False)  # or read from token_file; $CONSUL_HTTP_TOKEN
    datacenter: str = ""
    wait: float = 55.0
    stale: bool = True
    token_file: str = ""  # the file `token` was read from; $CONSUL_HTTP_TOKEN_FILE
    ca_file: str = ""  # $CONSUL_CACERT; "" = the system's CAs
    cert_file: str = ""  # $CONSUL_CLIENT_CERT: a client certificate (verify_incoming)
    key_file: str = ""  # $CONSUL_CLIENT_KEY
    server_name: str = ""  # $CONSUL_TLS_SERVER_NAME: the name the agent's cert must carry
    verify: bool = True  # $CONSUL_HTTP_SSL_VERIFY
    register: bool = False  # register sdproxy itself (service "sdproxy", check on /ready)
    register_check_interval: float = 10.0

    @property
    def tls(self) -> bool:
        return self.address.startswith("https://")


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[Address, ...] = (Address("127.0.0.1", 8600),)
    domain: str = "service.consul"
    interval: float = 1.0


@dataclass(frozen=True)
class EtcdConfig:
    """Where `discovery = "etcd"` reads Registrator's keys `<prefix>/<service>/<id>`."""

    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)  # tried in order
    prefix: str = ""


@dataclass(frozen=True)
class ZooKeeperConfig:
    """Curator's service-discovery layout: instances are the children of `<base>/<name>`."""

    hosts: tuple[Address, ...] = (Address("127.0.0.1", 2181),)
    base: str = "/services"


@dataclass(frozen=True)
class BreakerConfig:
    failures: int = 5
    reset_timeout: float = 10.0


@dataclass(frozen=True)
class RetryBudgetConfig:
    """Retries in flight <= max(min_concurrency, percent % of requests in flight); a
    failed connect is retried whatever the budget (`UpstreamRuntime.retry_allowed`)."""

    percent: float = 20.0
    min_concurrency: int = 3


@dataclass(frozen=True)
class HealthConfig:
    """sdproxy's own active checks; present in the config = on (SPEC "Active health
    checks"). The rules they drive are `proxy.upstream.health_state`'s."""

    path: str = "/health"  # http: GET path; tcp mode: a connect
    interval: float = 2.0  # per instance, with +-10 % jitter
    timeout: float = 1.0  # a probe slower than this failed
    fall: int = 3  # consecutive failed probes -> ejected
    rise: int = 2  # consecutive good probes -> back in the pool
    expect: tuple[str, ...] = ("2xx",)  # status classes ("2xx") or codes ("404") that pass


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    # None: reached only through the routes of [[listeners]] (no listener of its own).
    listen: Address | None
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
    max_header_count: int = 100
    http_parser: str = "httptools"
    max_connections: int = 10000
    retries: int = 2
    retry_on: tuple[str, ...] = RETRY_ON
    drain_timeout: float = 30.0
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    retry_budget: RetryBudgetConfig = field(default_factory=RetryBudgetConfig)
    health: HealthConfig | None = None  # only when [upstreams.health] is present
    tls: UpstreamTlsConfig | None = None  # [upstreams.tls], when present and enabled
    listen_tls: ListenTlsConfig | None = None  # [upstreams.listen_tls], when present


@dataclass(frozen=True)
class LogConfig:
    """sdproxy's own event log (stderr) and the access log (SPEC "Logging")."""

    level: str = "info"  # `sdproxy run --log-level` ($SDPROXY_LOG_LEVEL) overrides it
    format: str = "logfmt"
    access: str = ACCESS_OFF  # off | stderr | stdout | a file path
    access_format: str = "logfmt"


@dataclass(frozen=True)
class RouteConfig:
    """One entry of a listener's `routes` (SPEC "Routing several upstreams on one
    listener"); proxy.routing owns the matching rules."""

    upstream: str
    host: str = ""  # "" any host; a name, or "*.domain"
    path_prefix: str = "/"
    strip_prefix: bool = False


@dataclass(frozen=True)
class ListenerConfig:
    """A `[[listeners]]` entry: one HTTP port in front of several upstreams."""

    listen: Address
    # [defaults] as an upstream: the connection limits of this listener (header_timeout,
    # max_header_size, max_connections, ...) and the template of catalog-route upstreams.
    defaults: UpstreamConfig
    mode: str = "http"
    routes: tuple[RouteConfig, ...] = ()
    catalog_routes: bool = False  # also route by Consul service tags, Fabio-style
    tag_prefix: str = "urlprefix-"


@dataclass(frozen=True)
class Config:
    path: str
    admin: AdminConfig = field(default_factory=AdminConfig)
    consul: ConsulConfig = field(default_factory=ConsulConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    etcd: EtcdConfig = field(default_factory=EtcdConfig)
    zookeeper: ZooKeeperConfig = field(default_factory=ZooKeeperConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()
    log: LogConfig = field(default_factory=LogConfig)
    listeners: tuple[ListenerConfig, ...] = ()


class ConfigError(Exception):
    """Raised by `load` with every problem found, each `FILE: key.path: message`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load(path: str, environ: Mapping[str, str]) -> Config:
    """Read and validate the TOML file at `path`; raise ConfigError with every problem."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
    except ValueError as e:  # TOMLDecodeError, or bytes that are not UTF-8
        raise ConfigError([f"{path}: invalid TOML: {e}"]) from None

    p = _Problems(path)
    upstream_tables = doc.pop("upstreams", [])
    listener_tables = doc.pop("listeners", [])
    top = _read(p, "", doc, _TOP)
    admin = AdminConfig(**top.get("admin", {}))
    cfg = Config(
        path=path,
        admin=admin,
        consul=_resolve_consul(p, top.get("consul", {}), environ),
        dns=DnsConfig(**top.get("dns", {})),
        etcd=EtcdConfig(**top.get("etcd", {})),
        zookeeper=ZooKeeperConfig(**top.get("zookeeper", {})),
        upstreams=_read_upstreams(p, upstream_tables, top.get("defaults", {}), admin.listen),
        log=_resolve_log(p, top.get("log", {}), environ),
    )
    cfg = _with_listeners(p, cfg, listener_tables, top.get("defaults", {}))
    if not cfg.dns.nameservers and any(u.discovery == "dns" for u in cfg.upstreams):
        p.add("dns.nameservers", 'must not be empty when an upstream uses discovery = "dns"')
    if not cfg.etcd.endpoints and any(u.discovery == "etcd" for u in cfg.upstreams):
        p.add("etcd.endpoints", 'must not be empty when an upstream uses discovery = "etcd"')
    if not cfg.zookeeper.hosts and any(u.discovery == "zookeeper" for u in cfg.upstreams):
        p.add("zookeeper.hosts",
              'must not be empty when an upstream uses discovery = "zookeeper"')
    if p.items:
        raise ConfigError(p.items)
    return cfg


# --- problems and value converters ---------------------------------------------------
#
# A converter takes a raw TOML value and returns the typed value or raises _Invalid.
# _Invalid carries (key-path suffix, message) pairs so that an array reports each bad
# entry under its own index (`upstreams[0].retry_on[2]`) rather than only the first.


class _Problems:
    def __init__(self, path: str) -> None:
        self.path = path
        self.items: list[str] = []
        self.failed: set[str] = set()  # key paths whose value was rejected

    def add(self, key: str, message: str) -> None:
        self.items.append(f"{self.path}: {key}: {message}")


class _Invalid(Exception):
    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__(errors)
        self.errors = errors


Convert = Callable[[Any], Any]
Schema = Mapping[str, Union[Convert, "Schema"]]  # a nested Schema is a subtable

_TOML_KINDS = {bool: "boolean", int: "integer", str: "string", list: "array", dict: "table"}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(us|µs|ms|s|m|h)")
_DURATION_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _fail(message: str) -> NoReturn:
    raise _Invalid([("", message)])


def _kind(value: object) -> str:
    return _TOML_KINDS.get(type(value), type(value).__name__)  # float, datetime keep theirs


def _typed(kind: type, name: str) -> Convert:
    def convert(value: object) -> Any:
        if type(value) is not kind:  # exact type: a bool must not pass as an integer
            _fail(f"expected {name}, got {_kind(value)}")
        return value

    return convert


def _where(convert: Convert, ok: Callable[[Any], bool], message: str) -> Convert:
    """`convert`, then a rule on its result; `message` may show the value as {0}."""

    def check(value: object) -> Any:
        out = convert(value)
        if not ok(out):
            _fail(message.format(out))
        return out

    return check


_string = _typed(str, "a string")
_boolean = _typed(bool, "a boolean")
_nonempty_string = _where(_string, bool, "must not be empty")
_http_path = _where(_string, lambda s: s.startswith("/"), 'must start with "/", got "{0}"')


def _integer(low: int, high: int | None = None) -> Convert:
    rule = f"at least {low}" if high is None else f"{low}..{high}"
    in_range: Callable[[int], bool] = lambda n: low <= n and (high is None or n <= high)
    return _where(_typed(int, "an integer"), in_range, f"must be {rule}, got {{0}}")


def _percent(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(f"expected a number, got {type(value).__name__}")
    if not 0 <= value <= 100:
        _fail(f"must be 0..100, got {value}")
    return float(value)


def _choice(choices: tuple[str, ...]) -> Convert:
    return _where(
        _string, lambda s: s in choices, f'must be one of {", ".join(choices)}; got "{{0}}"'
    )


def _duration(positive: bool = False) -> Convert:
    """Seconds as a float, from "250ms", "1m30s", "1.5s" or a bare number of seconds."""

    def convert(value: object) -> float:
        if isinstance(value, str):
            if value.startswith("-"):
                _fail("must not be negative")
            parts = _DURATION_PART.findall(value)
            if not parts or "".join(n + u for n, u in parts) != value:
                _fail(f'expected a duration like "250ms", "2s" or "1m", got "{value}"')
            seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
            if not math.isfinite(seconds):
                _fail(f"must be a finite number of seconds, got {value}")
            if seconds < 0:
                _fail("must not be negative")
        else:
            _fail(f"expected a duration (string with a unit or seconds), got {_kind(value)}")
        if positive and seconds == 0:
            _fail("must be greater than 0")  # a zero interval or timeout would spin or fail
        return seconds

    return convert


def _address(value: object) -> Address:
    text = _string(value)
    if "://" in text:
        _fail(f'expected "host:port" without a scheme, got "{text}"')
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            _fail(f'expected "[IPv6]:port", got "{text}"')
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            _fail(f'"{host}" is not an IPv6 address')
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            _fail(f'expected "host:port", got "{text}"')
        if ":" in host:
            _fail(f'IPv6 addresses need brackets: "[{host}]:{port}"')
    if not host or any(c.isspace() or c in "/[]" for c in host):
        _fail(f'invalid host in "{text}"')
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        _fail(f'port must be 1..65535, got "{port}"')
    return Address(host, int(port))


def _list_of(item: Convert) -> Convert:
    def convert(value: object) -> tuple[Any, ...]:
        if not isinstance(value, list):
            _fail(f"expected an array, got {_kind(value)}")
        out: list[Any] = []
        errors: list[tuple[str, str]] = []
        for i, entry in enumerate(value):
            try:
                out.append(item(entry))
            except _Invalid as e:
                errors += [(f"[{i}]{at}", message) for at, message in e.errors]
        if errors:
            raise _Invalid(errors)
        return tuple(out)

    return convert


def _is_hash_key(text: str) -> bool:
    kind, sep, name = text.partition(":")
    if not sep:
        return text in ("source_ip", "path")
    return kind in ("header", "cookie") and bool(name) and not any(c.isspace() for c in name)


_hash_key = _where(
    _string, _is_hash_key, 'must be source_ip, path, header:NAME or cookie:NAME; got "{0}"'
)


def _with_scheme(address: str) -> str:
    # Consul's own clients accept "127.0.0.1:8500" in $CONSUL_HTTP_ADDR and mean http.
    return address if "://" in address else f"http://{address}"


def _is_http_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _is_ip(address: Address) -> bool:
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        return False
    return True


# A nameserver given by name would need the (blocking) system resolver to find it.
_ip_address = _where(_address, _is_ip, "a nameserver must be an IP address, got {0}")

# "host:port" stays without a scheme here: $CONSUL_HTTP_SSL picks it in _resolve_consul.
_consul_address = _where(
    _string,
    lambda text: _is_http_url(_with_scheme(text)),
    'expected "http(s)://host:port" or "host:port", got "{0}"',
)


# An etcd client URL as etcdctl's --endpoints takes it; https is not supported (yet).
_etcd_endpoint = _where(
    _string,
    lambda text: urlsplit(text).scheme == "http" and bool(urlsplit(text).netloc)
    and urlsplit(text).path in ("", "/"),
    'expected "http://host:port", got "{0}"',
)
# Registrator's -prefix: "" or a key path such as "/services", without a trailing "/".
_etcd_prefix = _where(
    _string,
    lambda text: not text.endswith("/"),
    'must not end with "/" (keys are <prefix>/<service>/<id>), got "{0}"',
)


class _Unset:
    """A `[consul]` key written as "": as if absent, so the environment still applies."""


_UNSET = _Unset()


def _or_unset(convert: Convert) -> Convert:
    def convert_or_unset(value: object) -> Any:
        return _UNSET if value == "" else convert(value)

    return convert_or_unset


def _upstream_only(value: object) -> NoReturn:
    _fail("allowed only in [[upstreams]], not in [defaults]")


def _is_znode_path(path: str) -> bool:
    """ZooKeeper's own path rules: absolute, no empty, "." or ".." segment, no trailing
    "/" (except the root itself), no control characters."""
    if path == "/":
        return True
    segments = path.split("/")
    return (path.startswith("/") and all(s not in ("", ".", "..") for s in segments[1:])
            and not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in path))


_znode_path = _where(_string, _is_znode_path,
                     'expected an absolute ZooKeeper path like "/services", got "{0}"')


# --- schemas: the keys each table accepts -----------------------------------------------

_BREAKER: Schema = {"failures": _integer(1), "reset_timeout": _duration()}
_RETRY_BUDGET: Schema = {"percent": _percent, "min_concurrency": _integer(0)}
_STATUS_CLASS = re.compile(r"[1-5]xx")


def _expected_status(value: object) -> str:
    """One `expect` entry: a class "2xx" or a code (404 or "404"), as a string."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 100 <= value <= 599:
            _fail(f"a status code must be 100..599, got {value}")
        return str(value)
    text: str = _string(value).lower()
    if _STATUS_CLASS.fullmatch(text):
        return text
    if text.isascii() and text.isdigit() and 100 <= int(text) <= 599:
        return str(int(text))
    _fail(f'expected a status class like "2xx" or a code like 404, got "{value}"')


def _expect(value: object) -> tuple[str, ...]:
    """`expect = "2xx"` or `expect = ["2xx", "3xx", 404]`."""
    if not isinstance(value, list):
        return (_expected_status(value),)
    entries = _list_of(_expected_status)(value)
    if not entries:
        _fail("must name at least one status class or code")
    return tuple(dict.fromkeys(entries))


_HEALTH: Schema = {
    "path": _http_path,
    "interval": _duration(positive=True),
    "timeout": _duration(positive=True),
    "fall": _integer(1),
    "rise": _integer(1),
    "expect": _expect,
}
_UPSTREAM_TLS: Schema = {
    "enabled": _boolean,
    "ca_file": _string,
    "server_name": _string,
    "verify": _boolean,
    "cert_file": _string,
    "key_file": _string,
}
_LISTEN_TLS: Schema = {"cert_file": _nonempty_string, "key_file": _nonempty_string}
# Every upstream key that [defaults] may set as well.
_INHERITED: Schema = {
    "mode": _choice(MODES),
    "tags": _list_of(_string),
    "include_warning": _boolean,
    "datacenters": _list_of(_nonempty_string),
    "endpoints": _list_of(_address),
    "file": _string,
    "dns_type": _choice(DNS_TYPES),
    "port": _integer(0, 65535),
    "balance": _choice(BALANCERS),
    "hash_key": _hash_key,
    "connect_timeout": _duration(positive=True),
    "request_timeout": _duration(positive=True),
    "idle_timeout": _duration(positive=True),
    "header_timeout": _duration(positive=True),
    "max_header_size": _integer(1024),
    "max_header_count": _integer(1),
    "http_parser": _choice(HTTP_PARSERS),
    "max_connections": _integer(1),
    "retries": _integer(0),
    "retry_on": _list_of(_choice(RETRY_ON)),
    "drain_timeout": _duration(),
    "breaker": _BREAKER,
    "retry_budget": _RETRY_BUDGET,
    "health": _HEALTH,
    "tls": _UPSTREAM_TLS,
    "listen_tls": _LISTEN_TLS,
}
_UPSTREAM_ONLY: Schema = {
    "name": _nonempty_string,
    "listen": _address,
    "discovery": _choice(DISCOVERY_KINDS),
}
_UPSTREAM: Schema = {**_UPSTREAM_ONLY, **_INHERITED}
_DEFAULTS: Schema = {**{k: _upstream_only for k in _UPSTREAM_ONLY}, **_INHERITED}
_TOP: Schema = {
    "admin": {"listen": _address, "token": _string},
    "consul": {
        "address": _or_unset(_consul_address),
        "token": _or_unset(_string),
        "datacenter": _string,
        "wait": _duration(),
        "stale": _boolean,
        "token_file": _or_unset(_string),
        "ca_file": _or_unset(_string),
        "cert_file": _or_unset(_string),
        "key_file": _or_unset(_string),
        "server_name": _or_unset(_string),
        "verify": _or_unset(_boolean),
        "register": _boolean,
        "register_check_interval": _duration(positive=True),
    },
    "dns": {
        "nameservers": _list_of(_ip_address),
        "domain": _nonempty_string,
        "interval": _duration(positive=True),
    },
    "etcd": {
        "endpoints": _list_of(_etcd_endpoint),
        "prefix": _etcd_prefix,
    },
    "zookeeper": {
        "hosts": _list_of(_address),
        "base": _znode_path,
    },
    "defaults": _DEFAULTS,
    "log": {
        "level": _choice(LOG_LEVELS),
        "format": _choice(LOG_FORMATS),
        # "off", "stderr", "stdout", or a file path (opened by the access log's writer, so
        # a path that cannot be written costs log lines, never the start).
        "access": _nonempty_string,
        "access_format": _choice(LOG_FORMATS),
    },
}


def _resolve_log(p: _Problems, log: dict[str, Any], environ: Mapping[str, str]) -> LogConfig:
    level = environ.get(LOG_LEVEL_ENV, "")
    if level in LOG_LEVELS:
        log["level"] = level
    elif level:
        p.add(f"${LOG_LEVEL_ENV}", f'must be one of {", ".join(LOG_LEVELS)}; got "{level}"')
    return LogConfig(**log)


# --- [consul]: the file, then Consul's environment variables, then the default -----------
#
# The variables are the ones Consul's own CLI and API client read, with their meaning:
# an empty variable is unset; CONSUL_HTTP_ADDR may be "host:port" (the scheme then comes
# from CONSUL_HTTP_SSL) or a URL; CONSUL_HTTP_TOKEN_FILE wins over CONSUL_HTTP_TOKEN.

_CONSUL_ENV = {  # key -> the variable that sets it when the file does not
    "address": "CONSUL_HTTP_ADDR",
    "ca_file": "CONSUL_CACERT",
    "cert_file": "CONSUL_CLIENT_CERT",
    "key_file": "CONSUL_CLIENT_KEY",
    "server_name": "CONSUL_TLS_SERVER_NAME",
    "verify": "CONSUL_HTTP_SSL_VERIFY",
}
_CONSUL_DEFAULT_ADDRESS = "127.0.0.1:8500"  # the scheme: $CONSUL_HTTP_SSL, else http
_TLS_FILE_KEYS = ("ca_file", "cert_file", "key_file", "server_name")
# Go's strconv.ParseBool, which Consul uses for CONSUL_HTTP_SSL and CONSUL_HTTP_SSL_VERIFY.
_GO_BOOLS = {**dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
             **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False)}


def _go_bool(text: str) -> bool:
    if text not in _GO_BOOLS:
        _fail(f'expected true or false, got "{text}"')
    return _GO_BOOLS[text]


_CONSUL_ENV_CONVERT: dict[str, Convert] = {
    "address": _consul_address,
    "verify": _go_bool,
}


def _resolve_consul(p: _Problems, own: dict[str, Any],
                    environ: Mapping[str, str]) -> ConsulConfig:
    """ConsulConfig from the file's `[consul]` keys (already converted) and the environment."""
    values = {key: value for key, value in own.items() if value is not _UNSET}
    in_file = set(values)
    env_var: dict[str, str] = {}  # key -> the variable its value came from, for messages

    def from_env(key: str, var: str, convert: Convert = _string) -> None:
        text = environ.get(var, "")
        if key in values or not text:
            return
        env_var[key] = var
        try:
            values[key] = convert(text)
        except _Invalid as e:
            p.failed.add(f"consul.{key}")
            p.add(f"consul.{key}", f"from ${var}: {e.errors[0][1]}")

    for key, var in _CONSUL_ENV.items():
        from_env(key, var, _CONSUL_ENV_CONVERT.get(key, _string))
    use_ssl = False
    if environ.get("CONSUL_HTTP_SSL"):
        try:
            use_ssl = _go_bool(environ["CONSUL_HTTP_SSL"])
        except _Invalid as e:
            p.add("consul.address", f"from $CONSUL_HTTP_SSL: {e.errors[0][1]}")
    address = str(values.get("address", _CONSUL_DEFAULT_ADDRESS)).rstrip("/")
    if "://" not in address:
        address = f"{'https' if use_ssl else 'http'}://{address}"
    elif use_ssl and "address" in env_var and address.startswith("http://"):
        address = "https://" + address.removeprefix("http://")  # as Consul: never back to http
    values["address"] = address

    # One token, from one place: the file's token or token_file, else the variables.
    if "token" in in_file and "token_file" in in_file:
        p.add("consul.token_file", "set token or token_file, not both")
    elif "token" not in in_file:
        from_env("token_file", "CONSUL_HTTP_TOKEN_FILE")
        if "token_file" not in values:
            from_env("token", "CONSUL_HTTP_TOKEN")
        if "token_file" in values:
            values["token"] = _read_token(p, values["token_file"], env_var.get("token_file"))

    consul = ConsulConfig(**values)
    if consul.tls:
        _check_consul_tls(p, consul, env_var)
    else:
        for key in _TLS_FILE_KEYS:  # a variable meant for another Consul is no mistake here
            if key in in_file:
                p.add(f"consul.{key}", f'is for https only, but consul.address is "{address}"')
    return consul


def _read_token(p: _Problems, path: str, var: str | None) -> str:
    source = f"from ${var}: " if var else ""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()  # as Consul: surrounding whitespace is not the token
    except (OSError, ValueError) as e:
        p.add("consul.token_file", f'{source}cannot read "{path}": {_reason(e)}')
        return ""
    if not token:
        p.add("consul.token_file", f'{source}"{path}" is empty')
    return token


def _check_consul_tls(p: _Problems, consul: ConsulConfig, env_var: dict[str, str]) -> None:
    """The TLS files load as the watcher will load them; each problem names its key."""

    def problem(key: str, message: str) -> None:
        source = f"from ${env_var[key]}: " if key in env_var else ""
        p.add(f"consul.{key}", source + message)

    unreadable = set()
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(consul, key)
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                problem(key, f'cannot read "{path}": {_reason(e)}')
                unreadable.add(key)
    if consul.key_file and not consul.cert_file:
        problem("key_file", "needs cert_file (the client certificate the key belongs to)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if consul.ca_file and "ca_file" not in unreadable:
        try:
            context.load_verify_locations(cafile=consul.ca_file)
        except ssl.SSLError as e:
            problem("ca_file", f'"{consul.ca_file}" holds no PEM certificate: {_reason(e)}')
    if consul.cert_file and not unreadable & {"cert_file", "key_file"}:
        try:
            context.load_cert_chain(consul.cert_file, consul.key_file or None)
        except ssl.SSLError as e:
            key = f'key_file "{consul.key_file}"' if consul.key_file else "no key_file"
            problem("cert_file", f'"{consul.cert_file}" with {key}: not a PEM certificate '
                                 f"and its private key: {_reason(e)}")


def _reason(e: Exception) -> str:
    if isinstance(e, ssl.SSLError):  # "KEY_VALUES_MISMATCH", not the OpenSSL source line
        return e.reason or re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(e.args[-1]))
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)


# --- reading tables ---------------------------------------------------------------------


def _read(p: _Problems, prefix: str, table: object, schema: Schema) -> dict[str, Any]:
    """Convert the known keys of `table`; report unknown keys and bad values under prefix."""
    if not isinstance(table, dict):
        p.add(prefix, f"expected a table, got {_kind(table)}")
        return {}
    out: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{prefix}.{key}" if prefix else key
        spec = schema.get(key)
        if spec is None:
            p.add(path, "unknown key")
        elif isinstance(spec, Mapping):
            out[key] = _read(p, path, value, spec)
        else:
            try:
                out[key] = spec(value)
            except _Invalid as e:
                p.failed.add(path)
                for at, message in e.errors:
                    p.add(path + at, message)
    return out


def _read_upstreams(
    p: _Problems, tables: object, defaults: dict[str, Any], admin_listen: Address
) -> tuple[UpstreamConfig, ...]:
    if not isinstance(tables, list):
        p.add("upstreams", f"expected an array of tables ([[upstreams]]), got {_kind(tables)}")
        return ()
    out: list[UpstreamConfig] = []
    # The first holder of each name and listen address, named in a duplicate's problem.
    names: dict[object, str] = {}
    listens: dict[object, str] = {}
    if "admin.listen" not in p.failed:  # else it is the default, not what the user wrote
        listens[admin_listen] = "admin.listen"
    for i, table in enumerate(tables):
        prefix = f"upstreams[{i}]"
        own = _read(p, prefix, table, _UPSTREAM)
        if isinstance(table, dict) and "name" not in table:
            p.add(f"{prefix}.name", "required")
        if "name" not in own or (isinstance(table, dict) and "listen" in table
                                 and "listen" not in own):
            continue  # already reported; nothing sensible to build
        merged = {"listen": None, **defaults, **own}
        # Subtables merge key by key: an upstream may override one breaker field and
        # inherit the other from [defaults.breaker].
        merged["breaker"] = BreakerConfig(**_subtable(defaults, own, "breaker"))
        merged["retry_budget"] = RetryBudgetConfig(**_subtable(defaults, own, "retry_budget"))
        if "health" in defaults or "health" in own:
            merged["health"] = HealthConfig(**_subtable(defaults, own, "health"))
        name = own["name"]
        merged["tls"] = _upstream_tls(p, prefix, name, _subtable(defaults, own, "tls"),
                                      "tls" in defaults or "tls" in own)
        merged["listen_tls"] = _listen_tls(p, prefix, f'upstream "{name}"',
                                           _subtable(defaults, own, "listen_tls"),
                                           "listen_tls" in defaults or "listen_tls" in own)
        upstream = UpstreamConfig(**merged)
        _check_upstream(p, prefix, upstream)
        _claim(p, names, upstream.name, f"{prefix}.name")
        if upstream.listen is not None:
            _claim(p, listens, upstream.listen, f"{prefix}.listen")
        out.append(upstream)
    return tuple(out)


def _upstream_tls(p: _Problems, prefix: str, name: str, table: dict[str, Any],
                  present: bool) -> UpstreamTlsConfig | None:
    """`[upstreams.tls]` merged over `[defaults.tls]`; its files must load (proxy.tls)."""
    if not present or not table.pop("enabled", True):
        return None
    table["server_name"] = table.get("server_name") or name
    cfg = UpstreamTlsConfig(upstream=name, **table)
    if _tls_keys_failed(p, prefix, "tls"):
        return cfg
    if cfg.cert_file and not cfg.key_file:
        p.add(f"{prefix}.tls.key_file", "required with cert_file (the client certificate's "
                                         "private key)")
    elif cfg.key_file and not cfg.cert_file:
        p.add(f"{prefix}.tls.cert_file", "required with key_file (the client certificate "
                                          "the key belongs to)")
    else:
        try:
            tls.client_context(ca_file=cfg.ca_file, cert_file=cfg.cert_file,
                               key_file=cfg.key_file, verify=cfg.verify)
        except tls.TlsFileError as e:
            p.add(f"{prefix}.tls.{e.key}", f'upstream "{name}": {e.reason}')
    return cfg


def _listen_tls(p: _Problems, prefix: str, whose: str, table: dict[str, Any],
                present: bool) -> ListenTlsConfig | None:
    """`[upstreams.listen_tls]` (or a `[[listeners]]` entry's): both files required, and
    they must be a matching pair.

    A file problem names the upstream (`whose`: `upstream "web"`, `listener ADDR`) as well
    as the key: on a SIGHUP it is what the rejection's log line says, and certificates are
    renewed by upstream, not by index.
    """
    if not present:
        return None
    missing = [key for key in ("cert_file", "key_file") if key not in table]
    for key in missing:
        if not _tls_keys_failed(p, prefix, "listen_tls"):
            p.add(f"{prefix}.listen_tls.{key}", "required (the certificate the listener "
                                                 "serves and its private key)")
    if missing:
        return None
    cfg = ListenTlsConfig(**table)
    if not _tls_keys_failed(p, prefix, "listen_tls"):
        try:
            tls.server_context(cfg.cert_file, cfg.key_file)
        except tls.TlsFileError as e:
            p.add(f"{prefix}.listen_tls.{e.key}", f"{whose}: {e.reason}")
    return cfg


def _tls_keys_failed(p: _Problems, prefix: str, table: str) -> bool:
    """A key of this TLS table (own or [defaults]) was already rejected: its files are
    not worth loading, the user has that problem to fix first."""
    return any(key.startswith((f"{prefix}.{table}.", f"defaults.{table}."))
               for key in p.failed)


def _subtable(defaults: dict[str, Any], own: dict[str, Any], key: str) -> dict[str, Any]:
    return {**defaults.get(key, {}), **own.get(key, {})}


def _claim(p: _Problems, holders: dict[object, str], value: object, key: str) -> None:
    if value in holders:
        p.add(key, f'"{value}" is already used by {holders[value]}')
    holders.setdefault(value, key)


def _check_upstream(p: _Problems, prefix: str, u: UpstreamConfig) -> None:
    """Rules that tie one key to another, checked on the merged (inherited) values."""
    read = ("discovery", "endpoints", "file", "dns_type", "port")
    if any(f"{where}.{key}" in p.failed for where in (prefix, "defaults") for key in read):
        return  # a rejected key fell back to its default; a rule on it would mislead
    if u.discovery == "static" and not u.endpoints:
        p.add(f"{prefix}.endpoints", 'required (at least one) when discovery = "static"')
    if u.discovery == "file" and not u.file:
        p.add(f"{prefix}.file", 'required when discovery = "file"')
    if u.discovery == "dns" and u.dns_type == "A" and u.port == 0:
        p.add(f"{prefix}.port", 'required (1..65535) when dns_type = "A"')
    if u.discovery == "zookeeper" and ("/" in u.name or not _is_znode_path(f"/{u.name}")):
        p.add(f"{prefix}.name", f'"{u.name}" cannot be a znode name (no "/", ".", "..") '
                                'when discovery = "zookeeper"')


# --- [[listeners]]: one port, several upstreams by route -------------------------------
#
# Kept apart from [[upstreams]]: read after them, since routes name upstreams, and an
# upstream without `listen` must be reached by some route.

_ROUTE_HOST = re.compile(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
                         r"(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?")
_route_host = _where(_string, lambda s: s == "" or bool(_ROUTE_HOST.fullmatch(s)),
                     'expected a host name or "*.domain" (no port), got "{0}"')
_ROUTE: Schema = {
    "host": _route_host,
    "path_prefix": _http_path,
    "upstream": _nonempty_string,
    "strip_prefix": _boolean,
}
_LISTENER: Schema = {
    "listen": _address,
    "mode": _choice(("http",)),  # routes are by Host and path: HTTP only
    "catalog_routes": _boolean,
    "tag_prefix": _nonempty_string,
    "listen_tls": _LISTEN_TLS,  # else [defaults.listen_tls], as for an upstream's listener
}


def _with_listeners(p: _Problems, cfg: Config, tables: object,
                    defaults: dict[str, Any]) -> Config:
    """`cfg` with its [[listeners]]; problems of theirs, and upstreams without `listen`
    that no route reaches, reported on `p`."""
    listeners: list[ListenerConfig] = []
    if not isinstance(tables, list):
        p.add("listeners", f"expected an array of tables ([[listeners]]), got {_kind(tables)}")
        tables = []
    upstreams = {u.name: u for u in cfg.upstreams}
    template = _listener_template(defaults)
    # Addresses already held, for a listener's duplicate-address problem.
    listens: dict[object, str] = {}
    if "admin.listen" not in p.failed:
        listens[cfg.admin.listen] = "admin.listen"
    for i, u in enumerate(cfg.upstreams):
        if u.listen is not None:
            listens.setdefault(u.listen, f"upstreams[{i}].listen")
    routed: set[str] = set()
    for i, table in enumerate(tables):
        prefix = f"listeners[{i}]"
        route_tables = table.pop("routes", []) if isinstance(table, dict) else []
        own = _read(p, prefix, table, _LISTENER)
        if isinstance(table, dict) and "listen" not in table:
            p.add(f"{prefix}.listen", "required")
        routes = _read_routes(p, prefix, route_tables, upstreams)
        routed.update(r.upstream for r in routes)
        if not routes and not own.get("catalog_routes", False) and isinstance(table, dict):
            p.add(f"{prefix}.routes", "required (at least one) unless catalog_routes = true")
        if "listen" not in own:
            continue
        _claim(p, listens, own["listen"], f"{prefix}.listen")
        listen_tls = template.get("listen_tls")
        if "listen_tls" in own:
            listen_tls = _listen_tls(p, prefix, f'listener {own["listen"]}',
                                     own.pop("listen_tls"), True)
        listeners.append(ListenerConfig(
            defaults=UpstreamConfig(**{**template, "listen": own["listen"],
                                       "listen_tls": listen_tls}),
            routes=routes, **own))
    for i, u in enumerate(cfg.upstreams):
        if u.listen is None and u.name not in routed:
            p.add(f"upstreams[{i}].listen", "required, unless a route of [[listeners]] "
                                            "names this upstream")
    return dataclasses.replace(cfg, listeners=tuple(listeners))


def _read_routes(p: _Problems, prefix: str, tables: object,
                 upstreams: Mapping[str, UpstreamConfig]) -> tuple[RouteConfig, ...]:
    if not isinstance(tables, list):
        p.add(f"{prefix}.routes", f"expected an array of tables, got {_kind(tables)}")
        return ()
    out: list[RouteConfig] = []
    seen: dict[tuple[str, str], str] = {}  # (host, path_prefix) -> the first route's key
    for j, table in enumerate(tables):
        key = f"{prefix}.routes[{j}]"
        own = _read(p, key, table, _ROUTE)
        if isinstance(table, dict) and "upstream" not in table:
            p.add(f"{key}.upstream", "required")
        if "upstream" not in own:
            continue
        route = RouteConfig(**own)
        target = upstreams.get(route.upstream)
        if target is None:
            p.add(f"{key}.upstream", f'no upstream named "{route.upstream}"')
        elif target.mode != "http":
            p.add(f"{key}.upstream", f'upstream "{route.upstream}" has mode = '
                                     f'"{target.mode}"; routes need "http"')
        where = (_normal_route_host(route.host), route.path_prefix)
        if where in seen:
            p.add(key, f'same host and path_prefix as {seen[where]} '
                       f'("{route.host or "*"}{route.path_prefix}")')
            continue
        seen[where] = key
        out.append(route)
    return tuple(out)


def _normal_route_host(host: str) -> str:
    return host.lower().rstrip(".")  # as proxy.routing compares them


def _listener_template(defaults: dict[str, Any]) -> dict[str, Any]:
    """[defaults] as the fields of an UpstreamConfig, read the way an upstream that sets
    nothing of its own is (its own problems were reported with [defaults])."""
    scratch = _Problems("")
    built = _read_upstreams(scratch, [{"name": "-"}], defaults, Address("", 0))
    if built:
        return {**built[0].__dict__, "name": ""}
    return {"name": ""}
