"""proxy.config.load: TOML -> frozen dataclasses, every problem named by its key path."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest
from support.consul import CertificateFiles, make_certificates

from proxy.config import (
    RETRY_ON,
    BreakerConfig,
    Config,
    ConfigError,
    ConsulConfig,
    HealthConfig,
    UpstreamConfig,
    load,
)
from proxy.model import Address

REPO = Path(__file__).resolve().parents[2]

# A minimal valid upstream; tests append keys or subtables after it.
UPSTREAM = '[[upstreams]]\nname = "web"\nlisten = "127.0.0.1:8081"\n'


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sdproxy.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def load_text(tmp_path: Path, text: str, environ: Mapping[str, str] | None = None) -> Config:
    return load(write(tmp_path, text), environ or {})


def problems(tmp_path: Path, text: str) -> list[str]:
    """The problems of an invalid config, without the `FILE: ` prefix."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert all(p.startswith(f"{path}: ") for p in info.value.problems)
    return [p.removeprefix(f"{path}: ") for p in info.value.problems]


def keys(found: list[str]) -> list[str]:
    return [p.split(": ", 1)[0] for p in found]


def only_upstream(tmp_path: Path, text: str) -> UpstreamConfig:
    cfg = load_text(tmp_path, text)
    assert len(cfg.upstreams) == 1
    return cfg.upstreams[0]


# --- the SPEC example and the shipped configs ------------------------------------------


def test_spec_example_loads_with_spec_values() -> None:
    cfg = load(str(REPO / "config" / "example.toml"), {})
    assert cfg.admin.listen == Address("127.0.0.1", 9901)
    assert cfg.consul.address == "http://127.0.0.1:8500"
    assert (cfg.consul.token, cfg.consul.datacenter) == ("", "")
    assert (cfg.consul.wait, cfg.consul.stale) == (55.0, True)
    assert cfg.dns.nameservers == (Address("127.0.0.1", 8600),)
    assert (cfg.dns.domain, cfg.dns.interval) == ("service.consul", 1.0)
    [u] = cfg.upstreams
    assert u == UpstreamConfig(
        name="backend-service",
        listen=Address("127.0.0.1", 8081),
        mode="http",
        discovery="consul",
        tags=(),
        include_warning=False,
        datacenters=(),
        endpoints=(),
        file="",
        dns_type="SRV",
        port=0,
        balance="round_robin",
        hash_key="source_ip",
        connect_timeout=1.0,
        request_timeout=30.0,
        idle_timeout=60.0,
        header_timeout=10.0,
        max_header_size=65536,
        max_header_count=100,
        http_parser="httptools",
        max_connections=10000,
        retries=2,
        retry_on=("connect-failure", "reset", "timeout", "502", "503", "504"),
        drain_timeout=30.0,
        breaker=BreakerConfig(failures=5, reset_timeout=10.0),
        health=HealthConfig(path="/health", interval=2.0, timeout=1.0, fall=3, rise=2,
                            expect=("2xx",)),
    )
    assert cfg.admin.token == ""


def test_static_example_loads() -> None:
    [u] = load(str(REPO / "config" / "static.toml"), {}).upstreams
    assert u.discovery == "static"
    assert u.endpoints == (Address("127.0.0.1", 9001), Address("127.0.0.1", 9002))


def test_empty_file_is_valid_with_builtin_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load(path, {}) == Config(path=path)


def test_upstream_gets_builtin_defaults(tmp_path: Path) -> None:
    u = only_upstream(tmp_path, UPSTREAM)
    assert u == UpstreamConfig(name="web", listen=Address("127.0.0.1", 8081))
    assert u.health is None
    assert u.retry_on == RETRY_ON


# --- durations -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("literal", "seconds"),
    [
        ('"250ms"', 0.25),
        ('"2s"', 2.0),
        ('"1m"', 60.0),
        ('"1h"', 3600.0),
        ('"1.5s"', 1.5),
        ('"500us"', 0.0005),
        ('"1m30s"', 90.0),
        ('"0s"', 0.0),
        ("3", 3.0),
        ("0.5", 0.5),
        ("0", 0.0),
    ],
)
def test_duration(tmp_path: Path, literal: str, seconds: float) -> None:
    cfg = load_text(tmp_path, f"[consul]\nwait = {literal}\n")
    assert cfg.consul.wait == pytest.approx(seconds)
    assert isinstance(cfg.consul.wait, float)


@pytest.mark.parametrize(
    ("literal", "message"),
    [
        ('"-1s"', "must not be negative"),
        ("-1", "must not be negative"),
        ("-0.5", "must not be negative"),
        ('"2"', "expected a duration"),
        ('"abc"', "expected a duration"),
        ('"2 s"', "expected a duration"),
        ('"1d"', "expected a duration"),
        ('""', "expected a duration"),
        ("true", "got boolean"),
        ("[1]", "got array"),
        ("inf", "finite"),
        ("nan", "finite"),
    ],
)
def test_bad_duration(tmp_path: Path, literal: str, message: str) -> None:
    [problem] = problems(tmp_path, f"[consul]\nwait = {literal}\n")
    assert problem.startswith("consul.wait: ")
    assert message in problem


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (UPSTREAM + 'connect_timeout = "0s"\n', "upstreams[0].connect_timeout"),
        (UPSTREAM + "request_timeout = 0\n", "upstreams[0].request_timeout"),
        ('[dns]\ninterval = "0ms"\n', "dns.interval"),
        (UPSTREAM + "[upstreams.health]\ninterval = 0\n", "upstreams[0].health.interval"),
    ],
)
def test_zero_interval_or_timeout_is_rejected(tmp_path: Path, text: str, key: str) -> None:
    assert problems(tmp_path, text) == [f"{key}: must be greater than 0"]


def test_zero_drain_timeout_is_allowed(tmp_path: Path) -> None:
    assert only_upstream(tmp_path, UPSTREAM + "drain_timeout = 0\n").drain_timeout == 0.0


# --- addresses -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("literal", "address"),
    [
        ("127.0.0.1:8081", Address("127.0.0.1", 8081)),
        ("0.0.0.0:1", Address("0.0.0.0", 1)),
        ("localhost:65535", Address("localhost", 65535)),
        ("backend.service.consul:80", Address("backend.service.consul", 80)),
        ("[::1]:8080", Address("::1", 8080)),
        ("[::]:443", Address("::", 443)),
        ("[2001:db8::42]:9000", Address("2001:db8::42", 9000)),
    ],
)
def test_address(tmp_path: Path, literal: str, address: Address) -> None:
    cfg = load_text(tmp_path, f'[admin]\nlisten = "{literal}"\n')
    assert cfg.admin.listen == address
    if address.host[0].isdigit() or ":" in address.host:  # nameservers: IP addresses only
        text = f'[dns]\nnameservers = ["{literal}"]\n'
        assert load_text(tmp_path, text).dns.nameservers == (address,)


def test_a_nameserver_given_by_name_is_refused(tmp_path: Path) -> None:
    found = problems(tmp_path, '[dns]\nnameservers = ["consul.local:8600"]\n')
    assert found == [
        "dns.nameservers[0]: a nameserver must be an IP address, got consul.local:8600"]


@pytest.mark.parametrize(
    ("literal", "message"),
    [
        ('"127.0.0.1"', 'expected "host:port"'),
        ('"127.0.0.1:0"', "port must be 1..65535"),
        ('"127.0.0.1:65536"', "port must be 1..65535"),
        ('"127.0.0.1:-1"', "port must be 1..65535"),
        ('"127.0.0.1:http"', "port must be 1..65535"),
        ('"127.0.0.1:"', "port must be 1..65535"),
        ('"::1:80"', "IPv6 addresses need brackets"),
        ('"[::1]"', 'expected "[IPv6]:port"'),
        ('"[::1]80"', 'expected "[IPv6]:port"'),
        ('"[not-ipv6]:80"', "is not an IPv6 address"),
        ('":80"', "invalid host"),
        ('"http://x:80"', "without a scheme"),
        ('"x/y:80"', "invalid host"),
        ("8081", "expected a string, got integer"),
    ],
)
def test_bad_address(tmp_path: Path, literal: str, message: str) -> None:
    [problem] = problems(tmp_path, f'[[upstreams]]\nname = "web"\nlisten = {literal}\n')
    assert problem.startswith("upstreams[0].listen: ")
    assert message in problem


def test_bad_addresses_in_lists_are_named_by_index(tmp_path: Path) -> None:
    text = (
        '[dns]\nnameservers = ["127.0.0.1:53", "nope", "[::1]:53", "x:0"]\n'
        + UPSTREAM
        + 'discovery = "static"\nendpoints = ["127.0.0.1:9001", "127.0.0.1"]\n'
    )
    assert keys(problems(tmp_path, text)) == [
        "dns.nameservers[1]",
        "dns.nameservers[3]",
        "upstreams[0].endpoints[1]",
    ]


# --- defaults inheritance ----------------------------------------------------------------


def test_defaults_are_inherited_and_overridden(tmp_path: Path) -> None:
    text = """
[defaults]
connect_timeout = "2s"
retries = 5
mode = "tcp"
balance = "least_conn"
tags = ["blue"]
retry_on = ["connect-failure"]

[defaults.breaker]
failures = 7
reset_timeout = "3s"

[[upstreams]]
name = "a"
listen = "127.0.0.1:8081"

[[upstreams]]
name = "b"
listen = "127.0.0.1:8082"
retries = 0
mode = "http"
tags = []

[upstreams.breaker]
failures = 1
"""
    a, b = load_text(tmp_path, text).upstreams
    assert (a.connect_timeout, a.retries, a.mode, a.balance) == (2.0, 5, "tcp", "least_conn")
    assert (a.tags, a.retry_on) == (("blue",), ("connect-failure",))
    assert a.breaker == BreakerConfig(failures=7, reset_timeout=3.0)
    assert (b.connect_timeout, b.retries, b.mode, b.tags) == (2.0, 0, "http", ())
    # The subtable merges key by key: failures overridden, reset_timeout inherited.
    assert b.breaker == BreakerConfig(failures=1, reset_timeout=3.0)
    # Keys set nowhere keep the built-in defaults.
    assert (a.request_timeout, b.max_connections) == (30.0, 10000)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (UPSTREAM, None),
        (UPSTREAM + "[upstreams.health]\n", HealthConfig()),
        (UPSTREAM + '[upstreams.health]\npath = "/ping"\n', HealthConfig("/ping", 2.0)),
        ('[defaults.health]\ninterval = "5s"\n' + UPSTREAM, HealthConfig("/health", 5.0)),
        (
            '[defaults.health]\ninterval = "5s"\n' + UPSTREAM + '[upstreams.health]\npath = "/p"\n',
            HealthConfig("/p", 5.0),
        ),
        (UPSTREAM + "health = {}\n", HealthConfig()),
    ],
)
def test_health_only_when_a_table_says_so(
    tmp_path: Path, text: str, expected: HealthConfig | None
) -> None:
    assert only_upstream(tmp_path, text).health == expected


def test_health_keys_of_the_spec(tmp_path: Path) -> None:
    text = UPSTREAM + ('[upstreams.health]\npath = "/ready"\ninterval = "500ms"\n'
                       'timeout = "250ms"\nfall = 4\nrise = 1\n'
                       'expect = ["2xx", "3XX", 404, "429", "2xx"]\n')
    assert only_upstream(tmp_path, text).health == HealthConfig(
        "/ready", 0.5, timeout=0.25, fall=4, rise=1, expect=("2xx", "3xx", "404", "429"))


@pytest.mark.parametrize(("value", "expected"), [('"5xx"', ("5xx",)), ("204", ("204",)),
                                                 ('["200"]', ("200",))])
def test_health_expect_takes_one_value_or_an_array(tmp_path: Path, value: str,
                                                   expected: tuple[str, ...]) -> None:
    text = UPSTREAM + f"[upstreams.health]\nexpect = {value}\n"
    assert only_upstream(tmp_path, text).health == HealthConfig(expect=expected)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("expect = []", "upstreams[0].health.expect: must name at least one"),
        ('expect = "6xx"', 'upstreams[0].health.expect: expected a status class like "2xx"'),
        ('expect = ["2xx", 99]', "upstreams[0].health.expect[1]: a status code must be 100..599"),
        ('expect = ["2xx", "ok"]', "upstreams[0].health.expect[1]: expected a status class"),
        ("expect = true", "upstreams[0].health.expect: expected a string, got boolean"),
        ("fall = 0", "upstreams[0].health.fall: must be at least 1, got 0"),
        ("rise = 0", "upstreams[0].health.rise: must be at least 1, got 0"),
        ('timeout = "0s"', "upstreams[0].health.timeout: must be greater than 0"),
    ],
)
def test_bad_health_keys_are_named(tmp_path: Path, body: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, UPSTREAM + f"[upstreams.health]\n{body}\n")
    assert any(problem in line for line in err.value.problems), err.value.problems


def test_admin_token_is_read_and_not_shown(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[admin]\nlisten = "0.0.0.0:9901"\ntoken = "s3cret"\n')
    assert cfg.admin.token == "s3cret"
    assert "s3cret" not in repr(cfg)


def test_defaults_health_applies_to_every_upstream(tmp_path: Path) -> None:
    text = (
        "[defaults.health]\n"
        '[[upstreams]]\nname = "a"\nlisten = "127.0.0.1:1"\n'
        '[[upstreams]]\nname = "b"\nlisten = "127.0.0.1:2"\n'
    )
    assert [u.health for u in load_text(tmp_path, text).upstreams] == [HealthConfig()] * 2


# --- environment -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "environ", "address", "token"),
    [
        ("", {}, "http://127.0.0.1:8500", ""),
        ("", {"CONSUL_HTTP_ADDR": "http://10.0.0.1:8500"}, "http://10.0.0.1:8500", ""),
        ("", {"CONSUL_HTTP_ADDR": "10.0.0.1:8500"}, "http://10.0.0.1:8500", ""),
        ("", {"CONSUL_HTTP_ADDR": "https://c:8501"}, "https://c:8501", ""),
        ("", {"CONSUL_HTTP_ADDR": ""}, "http://127.0.0.1:8500", ""),
        ("", {"CONSUL_HTTP_TOKEN": "s3cr3t"}, "http://127.0.0.1:8500", "s3cr3t"),
        (
            '[consul]\naddress = "http://file:8500"\ntoken = "from-file"\n',
            {"CONSUL_HTTP_ADDR": "http://env:8500", "CONSUL_HTTP_TOKEN": "from-env"},
            "http://file:8500",
            "from-file",
        ),
        (
            '[consul]\ntoken = ""\n',  # "" = unset (SPEC "TLS"): the environment applies
            {"CONSUL_HTTP_ADDR": "env:8500", "CONSUL_HTTP_TOKEN": "from-env"},
            "http://env:8500",
            "from-env",
        ),
        ('[consul]\naddress = "127.0.0.1:8500"\n', {}, "http://127.0.0.1:8500", ""),
    ],
)
def test_consul_environment_fallback(
    tmp_path: Path, text: str, environ: dict[str, str], address: str, token: str
) -> None:
    consul = load_text(tmp_path, text, environ).consul
    assert (consul.address, consul.token) == (address, token)


def test_load_never_reads_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(os.environ, "CONSUL_HTTP_ADDR", "http://from-os:8500")
    monkeypatch.setitem(os.environ, "CONSUL_HTTP_TOKEN", "from-os")
    consul = load_text(tmp_path, "", {}).consul
    assert (consul.address, consul.token) == ("http://127.0.0.1:8500", "")


# --- validation: one rule per row, each naming its key path ------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        # enums
        (UPSTREAM + 'mode = "udp"\n', 'upstreams[0].mode: must be one of http, tcp; got "udp"'),
        (UPSTREAM + 'discovery = "zk"\n', "upstreams[0].discovery: must be one of"),
        (UPSTREAM + 'balance = "fastest"\n', "upstreams[0].balance: must be one of"),
        (UPSTREAM + 'http_parser = "pico"\n', "upstreams[0].http_parser: must be one of"),
        (UPSTREAM + 'dns_type = "AAAA"\n', "upstreams[0].dns_type: must be one of"),
        (UPSTREAM + 'retry_on = ["reset", "500"]\n', "upstreams[0].retry_on[1]: must be one of"),
        ('[defaults]\nbalance = "fastest"\n', "defaults.balance: must be one of"),
        # types
        (UPSTREAM + 'retries = "2"\n', "upstreams[0].retries: expected an integer, got string"),
        (UPSTREAM + "retries = true\n", "upstreams[0].retries: expected an integer, got boolean"),
        (UPSTREAM + "retries = 2.0\n", "upstreams[0].retries: expected an integer, got float"),
        (
            UPSTREAM + 'include_warning = "yes"\n',
            "upstreams[0].include_warning: expected a boolean",
        ),
        (UPSTREAM + 'tags = "web"\n', "upstreams[0].tags: expected an array, got string"),
        (UPSTREAM + 'tags = ["a", 1]\n', "upstreams[0].tags[1]: expected a string, got integer"),
        (UPSTREAM + 'datacenters = ["dc1", ""]\n', "upstreams[0].datacenters[1]: must not be"),
        (UPSTREAM + "file = 1\n", "upstreams[0].file: expected a string"),
        (UPSTREAM + "breaker = 5\n", "upstreams[0].breaker: expected a table, got integer"),
        ('[consul]\nstale = "true"\n', "consul.stale: expected a boolean, got string"),
        ("[consul]\ntoken = 1\n", "consul.token: expected a string, got integer"),
        ("[consul]\ndatacenter = false\n", "consul.datacenter: expected a string"),
        ('[consul]\naddress = "ftp://c:21"\n', 'consul.address: expected "http(s)://host:port"'),
        ('[dns]\nnameservers = "127.0.0.1:53"\n', "dns.nameservers: expected an array"),
        ('[dns]\ndomain = ""\n', "dns.domain: must not be empty"),
        ("admin = 1\n", "admin: expected a table, got integer"),
        ('upstreams = "web"\n', "upstreams: expected an array of tables"),
        ("upstreams = [1]\n", "upstreams[0]: expected a table, got integer"),
        # ranges
        (UPSTREAM + "retries = -1\n", "upstreams[0].retries: must be at least 0, got -1"),
        ("[defaults]\nretries = -1\n", "defaults.retries: must be at least 0, got -1"),
        (UPSTREAM + "max_connections = 0\n", "upstreams[0].max_connections: must be at least 1"),
        (UPSTREAM + "max_header_size = 1023\n", "upstreams[0].max_header_size: must be at least"),
        (UPSTREAM + "max_header_count = 0\n", "upstreams[0].max_header_count: must be at least"),
        (UPSTREAM + "port = 65536\n", "upstreams[0].port: must be 0..65535, got 65536"),
        (
            UPSTREAM + "[upstreams.breaker]\nfailures = 0\n",
            "upstreams[0].breaker.failures: must be at least 1, got 0",
        ),
        ("[defaults.breaker]\nfailures = 0\n", "defaults.breaker.failures: must be at least 1"),
        (
            UPSTREAM + '[upstreams.breaker]\nreset_timeout = "-1s"\n',
            "upstreams[0].breaker.reset_timeout: must not",
        ),
        (
            UPSTREAM + '[upstreams.health]\npath = "health"\n',
            "upstreams[0].health.path: must start",
        ),
        # required keys
        ('[[upstreams]]\nlisten = "127.0.0.1:8081"\n', "upstreams[0].name: required"),
        ('[[upstreams]]\nname = ""\nlisten = "127.0.0.1:1"\n', "upstreams[0].name: must not be"),
        ('[[upstreams]]\nname = "web"\n', "upstreams[0].listen: required"),
        ('[defaults]\nname = "web"\n', "defaults.name: allowed only in [[upstreams]]"),
        ('[defaults]\nlisten = "127.0.0.1:1"\n', "defaults.listen: allowed only in [[upstreams]]"),
        ('[defaults]\ndiscovery = "dns"\n', "defaults.discovery: allowed only in [[upstreams]]"),
        # rules across keys
        (UPSTREAM + 'discovery = "static"\n', "upstreams[0].endpoints: required"),
        (UPSTREAM + 'discovery = "static"\nendpoints = []\n', "upstreams[0].endpoints: required"),
        (UPSTREAM + 'discovery = "file"\n', 'upstreams[0].file: required when discovery = "file"'),
        (UPSTREAM + 'discovery = "dns"\ndns_type = "A"\n', "upstreams[0].port: required"),
        (
            "[dns]\nnameservers = []\n" + UPSTREAM + 'discovery = "dns"\n',
            "dns.nameservers: must not be empty",
        ),
    ],
)
def test_validation_rule(tmp_path: Path, text: str, problem: str) -> None:
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    assert found[0].startswith(problem)


@pytest.mark.parametrize(
    "text",
    [
        UPSTREAM + 'discovery = "static"\nendpoints = ["127.0.0.1:9001"]\n',
        UPSTREAM + 'discovery = "file"\nfile = "/etc/services.json"\n',
        UPSTREAM + 'discovery = "dns"\ndns_type = "A"\nport = 8080\n',
        UPSTREAM + 'discovery = "dns"\n',  # SRV carries the port itself
        UPSTREAM + 'discovery = "consul"\nport = 0\nfile = ""\n',
        '[defaults]\nendpoints = ["127.0.0.1:9001"]\n' + UPSTREAM + 'discovery = "static"\n',
        "[dns]\nnameservers = []\n" + UPSTREAM,  # no dns upstream needs them
        UPSTREAM + 'include_warning = true\ntags = ["v2"]\ndatacenters = ["dc1", "dc2"]\n',
    ],
)
def test_valid_combinations(tmp_path: Path, text: str) -> None:
    load_text(tmp_path, text)


@pytest.mark.parametrize("hash_key", ["source_ip", "path", "header:X-User", "cookie:sid"])
def test_good_hash_key(tmp_path: Path, hash_key: str) -> None:
    u = only_upstream(tmp_path, UPSTREAM + f'balance = "hash"\nhash_key = "{hash_key}"\n')
    assert (u.balance, u.hash_key) == ("hash", hash_key)


@pytest.mark.parametrize(
    "hash_key", ["ip", "header:", "cookie:", "header:X User", "query:id", "Source_IP", ""]
)
def test_bad_hash_key(tmp_path: Path, hash_key: str) -> None:
    text = UPSTREAM + f'balance = "hash"\nhash_key = "{hash_key}"\n'
    [problem] = problems(tmp_path, text)
    assert problem.startswith("upstreams[0].hash_key: must be source_ip, path, header:NAME")


def test_duplicate_names_and_listen_addresses(tmp_path: Path) -> None:
    text = (
        '[admin]\nlisten = "127.0.0.1:9000"\n'
        '[[upstreams]]\nname = "a"\nlisten = "127.0.0.1:8081"\n'
        '[[upstreams]]\nname = "a"\nlisten = "127.0.0.1:8082"\n'
        '[[upstreams]]\nname = "c"\nlisten = "127.0.0.1:8081"\n'
        '[[upstreams]]\nname = "d"\nlisten = "127.0.0.1:9000"\n'
        '[[upstreams]]\nname = "e"\nlisten = "[::1]:8081"\n'  # another host: no clash
    )
    assert problems(tmp_path, text) == [
        'upstreams[1].name: "a" is already used by upstreams[0].name',
        'upstreams[2].listen: "127.0.0.1:8081" is already used by upstreams[0].listen',
        'upstreams[3].listen: "127.0.0.1:9000" is already used by admin.listen',
    ]


def test_a_rejected_key_causes_no_follow_up_problems(tmp_path: Path) -> None:
    text = (
        '[admin]\nlisten = "nowhere"\n'  # falls back to 127.0.0.1:9901 internally
        '[[upstreams]]\nname = "a"\nlisten = "127.0.0.1:9901"\n'
        'discovery = "static"\nendpoints = "127.0.0.1:9001"\n'
    )
    assert keys(problems(tmp_path, text)) == ["admin.listen", "upstreams[0].endpoints"]
    assert "required" not in " ".join(problems(tmp_path, text))


# --- unknown keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("colour = 1\n", "colour"),
        ("[upstream]\n", "upstream"),
        ('[consul]\ntokn = "x"\n', "consul.tokn"),
        ('[admin]\nlisn = "127.0.0.1:1"\n', "admin.lisn"),
        ("[dns]\nttl = 1\n", "dns.ttl"),
        ("[defaults]\nretrys = 1\n", "defaults.retrys"),
        ("[defaults.breaker]\nfailure = 1\n", "defaults.breaker.failure"),
        (UPSTREAM + "retrys = 3\n", "upstreams[0].retrys"),
        (UPSTREAM + "[upstreams.breaker]\nfailure = 3\n", "upstreams[0].breaker.failure"),
        (UPSTREAM + '[upstreams.health]\npth = "/"\n', "upstreams[0].health.pth"),
        (UPSTREAM + "[upstreams.outlier]\n", "upstreams[0].outlier"),
        (
            UPSTREAM + UPSTREAM.replace("8081", "8082").replace("web", "api") + "x = 1\n",
            "upstreams[1].x",
        ),
    ],
)
def test_unknown_key(tmp_path: Path, text: str, key: str) -> None:
    assert problems(tmp_path, text) == [f"{key}: unknown key"]


# --- reporting ---------------------------------------------------------------------------


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = (
        '[consul]\nwait = "forever"\n'
        "[defaults]\nretries = -1\n"
        '[[upstreams]]\nname = "a"\nlisten = "127.0.0.1:8081"\nmode = "udp"\n'
        "[upstreams.breaker]\nfailures = 0\n"
        '[[upstreams]]\nname = "b"\nlisten = "nowhere"\ncolour = "red"\n'
    )
    assert keys(problems(tmp_path, text)) == [
        "consul.wait",
        "defaults.retries",
        "upstreams[0].mode",
        "upstreams[0].breaker.failures",
        "upstreams[1].listen",
        "upstreams[1].colour",
    ]


def test_problem_format_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, UPSTREAM + "[upstreams.breaker]\nfailures = 0\n")
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert info.value.problems == [
        f"{path}: upstreams[0].breaker.failures: must be at least 1, got 0"
    ]
    assert str(info.value) == info.value.problems[0]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: str(d / "missing.toml"), "cannot read: No such file or directory"),
        (lambda d: str(d), "cannot read"),
        (lambda d: write(d, "[consul\n"), "invalid TOML"),
        (lambda d: write(d, "retries = \n"), "invalid TOML"),
        (lambda d: write(d, "[a]\n[a]\n"), "invalid TOML"),
    ],
)
def test_unreadable_file_is_one_problem(tmp_path: Path, make: object, message: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(ConfigError) as info:
        load(path, {})
    [problem] = info.value.problems
    assert problem.startswith(f"{path}: {message}")


def test_file_that_is_not_utf8_is_one_problem(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load(str(path), {})
    [problem] = info.value.problems
    assert problem.startswith(f"{path}: invalid TOML")


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, UPSTREAM + 'tags = ["a"]\n')
    with pytest.raises(AttributeError):
        cfg.upstreams[0].retries = 3  # type: ignore[misc]
    assert isinstance(cfg.upstreams[0].tags, tuple)


# --- [consul] TLS and ACL keys: the file, then Consul's variables, then the default -------


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> CertificateFiles:
    return make_certificates(tmp_path_factory.mktemp("pem"))


def consul_of(tmp_path: Path, text: str, environ: Mapping[str, str]) -> ConsulConfig:
    return load_text(tmp_path, text, environ).consul


def env_problems(tmp_path: Path, text: str, environ: Mapping[str, str]) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, environ)
    return [p.removeprefix(f"{path}: ") for p in info.value.problems]


def test_example_config_spells_out_defaults_without_shadowing_the_environment() -> None:
    # issue 11: config/example.toml wrote address/token out and ignored the variables.
    environ = {"CONSUL_HTTP_ADDR": "10.0.0.7:8500", "CONSUL_HTTP_TOKEN": "from-env"}
    consul = load(str(REPO / "config" / "example.toml"), environ).consul
    assert (consul.address, consul.token) == ("http://10.0.0.7:8500", "from-env")
    assert (consul.ca_file, consul.verify) == ("", True)


@pytest.mark.parametrize(
    ("key", "var"),
    [
        ("ca_file", "CONSUL_CACERT"),
        ("cert_file", "CONSUL_CLIENT_CERT"),
        ("key_file", "CONSUL_CLIENT_KEY"),
    ],
)
def test_tls_file_keys_file_then_environment(
    tmp_path: Path, pem: CertificateFiles, key: str, var: str
) -> None:
    # The client cert and key come as a pair; the other one is always in the file.
    pair = {"cert_file": f'key_file = "{pem.client_key}"\n',
            "key_file": f'cert_file = "{pem.client_cert}"\n', "ca_file": ""}[key]
    mine = {"ca_file": pem.ca_file, "cert_file": pem.client_cert,
            "key_file": pem.client_key}[key]
    https = '[consul]\naddress = "https://c:8501"\n' + pair
    assert getattr(consul_of(tmp_path, https, {var: str(mine)}), key) == str(mine)
    written = https + f'{key} = "{mine}"\n'
    assert getattr(consul_of(tmp_path, written, {var: "/elsewhere"}), key) == str(mine)
    unset = https + f'{key} = ""\n'  # "" = unset: the variable applies
    assert getattr(consul_of(tmp_path, unset, {var: str(mine)}), key) == str(mine)
    if key == "ca_file":
        assert consul_of(tmp_path, https, {var: ""}).ca_file == ""  # empty variable = unset


@pytest.mark.parametrize(
    ("text", "environ", "address"),
    [
        ("", {"CONSUL_HTTP_SSL": "true"}, "https://127.0.0.1:8500"),
        ("", {"CONSUL_HTTP_ADDR": "c:8501", "CONSUL_HTTP_SSL": "1"}, "https://c:8501"),
        # As Consul's client: with CONSUL_HTTP_SSL=true an http:// variable never means http.
        ("", {"CONSUL_HTTP_ADDR": "http://c:8501", "CONSUL_HTTP_SSL": "true"}, "https://c:8501"),
        ("", {"CONSUL_HTTP_ADDR": "https://c:8501", "CONSUL_HTTP_SSL": "false"},
         "https://c:8501"),
        ("", {"CONSUL_HTTP_ADDR": "https://c:8501/"}, "https://c:8501"),
        ('[consul]\naddress = "c:8501"\n', {"CONSUL_HTTP_SSL": "true"}, "https://c:8501"),
        # A scheme written in the file is a key in the file: it wins.
        ('[consul]\naddress = "http://c:8500"\n', {"CONSUL_HTTP_SSL": "true"},
         "http://c:8500"),
        ('[consul]\naddress = ""\n', {"CONSUL_HTTP_ADDR": "https://env:8501"},
         "https://env:8501"),
        ('[consul]\naddress = ""\n', {}, "http://127.0.0.1:8500"),
    ],
)
def test_consul_address_and_scheme(
    tmp_path: Path, text: str, environ: dict[str, str], address: str
) -> None:
    consul = consul_of(tmp_path, text, environ)
    assert consul.address == address
    assert consul.tls == address.startswith("https://")


@pytest.mark.parametrize(
    ("text", "environ", "verify", "server_name"),
    [
        ("", {}, True, ""),
        ("", {"CONSUL_HTTP_SSL_VERIFY": "false", "CONSUL_TLS_SERVER_NAME": "s.dc1"}, False,
         "s.dc1"),
        ("verify = true\nserver_name = \"f\"\n",
         {"CONSUL_HTTP_SSL_VERIFY": "false", "CONSUL_TLS_SERVER_NAME": "s.dc1"}, True, "f"),
        ('verify = ""\nserver_name = ""\n',
         {"CONSUL_HTTP_SSL_VERIFY": "0", "CONSUL_TLS_SERVER_NAME": "s.dc1"}, False, "s.dc1"),
        ("verify = false\n", {"CONSUL_HTTP_SSL_VERIFY": "true"}, False, ""),
    ],
)
def test_verify_and_server_name(
    tmp_path: Path, text: str, environ: dict[str, str], verify: bool, server_name: str
) -> None:
    consul = consul_of(tmp_path, '[consul]\naddress = "https://c:8501"\n' + text, environ)
    assert (consul.verify, consul.server_name) == (verify, server_name)


def test_token_sources_and_their_precedence(tmp_path: Path) -> None:
    file_token = tmp_path / "file-token"
    file_token.write_text("  from-token-file\n")  # surrounding whitespace is not the token
    env_token = tmp_path / "env-token"
    env_token.write_text("from-env-file\n")
    both = {"CONSUL_HTTP_TOKEN": "from-env", "CONSUL_HTTP_TOKEN_FILE": str(env_token)}

    def token(text: str, environ: dict[str, str]) -> tuple[str, str]:
        consul = consul_of(tmp_path, "[consul]\n" + text, environ)
        return consul.token, consul.token_file

    assert token("", {"CONSUL_HTTP_TOKEN": "from-env"}) == ("from-env", "")
    # As Consul's client: the token file wins over CONSUL_HTTP_TOKEN.
    assert token("", both) == ("from-env-file", str(env_token))
    # Either key in the file beats both variables.
    assert token('token = "from-file"\n', both) == ("from-file", "")
    assert token(f'token_file = "{file_token}"\n', both) == ("from-token-file", str(file_token))
    assert token('token = ""\ntoken_file = ""\n', both) == ("from-env-file", str(env_token))
    assert token('token = ""\n', {"CONSUL_HTTP_TOKEN": "from-env"}) == ("from-env", "")
    assert token("", {"CONSUL_HTTP_TOKEN": "", "CONSUL_HTTP_TOKEN_FILE": ""}) == ("", "")


def test_token_is_not_in_the_repr(tmp_path: Path) -> None:
    consul = consul_of(tmp_path, '[consul]\ntoken = "s3cr3t-token"\n', {})
    assert "s3cr3t-token" not in repr(consul)


def test_token_file_problems_name_the_key_and_the_variable(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    assert env_problems(tmp_path, f'[consul]\ntoken_file = "{missing}"\n', {}) == [
        f'consul.token_file: cannot read "{missing}": No such file or directory']
    assert env_problems(tmp_path, "", {"CONSUL_HTTP_TOKEN_FILE": str(missing)}) == [
        (f'consul.token_file: from $CONSUL_HTTP_TOKEN_FILE: cannot read "{missing}": '
        "No such file or directory")]
    assert env_problems(tmp_path, f'[consul]\ntoken_file = "{empty}"\n', {}) == [
        f'consul.token_file: "{empty}" is empty']
    assert env_problems(tmp_path, f'[consul]\ntoken = "t"\ntoken_file = "{empty}"\n', {}) == [
        "consul.token_file: set token or token_file, not both"]


def test_tls_files_are_checked_and_problems_name_the_key(
    tmp_path: Path, pem: CertificateFiles
) -> None:
    https = '[consul]\naddress = "https://c:8501"\n'
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    missing = tmp_path / "missing.pem"
    cases = [
        (f'ca_file = "{missing}"\n', {},
         [f'consul.ca_file: cannot read "{missing}": No such file or directory']),
        ("", {"CONSUL_CACERT": str(missing)},
         [(f'consul.ca_file: from $CONSUL_CACERT: cannot read "{missing}": '
          "No such file or directory")]),
        (f'ca_file = "{garbage}"\n', {}, [f'consul.ca_file: "{garbage}" holds no PEM']),
        # The client key does not belong to the server certificate.
        (f'cert_file = "{pem.server_cert}"\nkey_file = "{pem.client_key}"\n', {},
         [(f'consul.cert_file: "{pem.server_cert}" with key_file "{pem.client_key}": '
          "not a PEM certificate and its private key: KEY_VALUES_MISMATCH")]),
        (f'key_file = "{pem.client_key}"\n', {}, ["consul.key_file: needs cert_file"]),
        ("verify = \"no\"\n", {}, ["consul.verify: expected a boolean, got string"]),
        ("", {"CONSUL_HTTP_SSL_VERIFY": "nope"},
         ['consul.verify: from $CONSUL_HTTP_SSL_VERIFY: expected true or false, got "nope"']),
    ]
    for text, environ, want in cases:
        found = env_problems(tmp_path, https + text, environ)
        assert len(found) == len(want), (text, found)
        for got, expected in zip(found, want, strict=True):
            assert got.startswith(expected), (got, expected)


def test_consul_environment_problems_name_the_variable(tmp_path: Path) -> None:
    assert env_problems(tmp_path, "", {"CONSUL_HTTP_ADDR": "unix:///run/consul.sock"}) == [
        ('consul.address: from $CONSUL_HTTP_ADDR: expected "http(s)://host:port" or '
        '"host:port", got "unix:///run/consul.sock"')]
    assert env_problems(tmp_path, "", {"CONSUL_HTTP_SSL": "yes"}) == [
        'consul.address: from $CONSUL_HTTP_SSL: expected true or false, got "yes"']


def test_tls_keys_in_the_file_need_an_https_address(tmp_path: Path, pem: CertificateFiles
                                                    ) -> None:
    text = f'[consul]\naddress = "http://c:8500"\nca_file = "{pem.ca_file}"\n'
    assert env_problems(tmp_path, text, {}) == [
        'consul.ca_file: is for https only, but consul.address is "http://c:8500"']
    # The same from the environment is no mistake: the variables may be meant for another
    # Consul, and Consul's own client ignores them with http too.
    consul = consul_of(tmp_path, "", {"CONSUL_CACERT": "/nowhere", "CONSUL_CLIENT_CERT": "/x"})
    assert (consul.tls, consul.ca_file) == (False, "/nowhere")


def test_https_with_every_tls_key_loads(tmp_path: Path, pem: CertificateFiles) -> None:
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    consul = consul_of(tmp_path, (
        '[consul]\naddress = "https://127.0.0.1:8501"\n'
        f'ca_file = "{pem.ca_file}"\ncert_file = "{pem.client_cert}"\n'
        f'key_file = "{pem.client_key}"\nserver_name = "server.dc1.consul"\n'
        f'token_file = "{token}"\n'), {})
    assert consul == ConsulConfig(
        address="https://127.0.0.1:8501", token="t0ken", token_file=str(token),
        ca_file=str(pem.ca_file), cert_file=str(pem.client_cert),
        key_file=str(pem.client_key), server_name="server.dc1.consul", verify=True)
