"""`[zookeeper]` and `discovery = "zookeeper"` in proxy.config.load (SPEC "More registries")."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, ZooKeeperConfig, load
from proxy.model import Address

UPSTREAM = '[[upstreams]]\nname = "web"\nlisten = "127.0.0.1:8081"\ndiscovery = "zookeeper"\n'


def load_text(tmp_path: Path, text: str) -> ZooKeeperConfig:
    path = tmp_path / "sdproxy.toml"
    path.write_text(text, encoding="utf-8")
    return load(str(path), {}).zookeeper


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "sdproxy.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(str(path), {})
    return [p.removeprefix(f"{path}: ") for p in info.value.problems]


def test_defaults(tmp_path: Path) -> None:
    assert load_text(tmp_path, UPSTREAM) == ZooKeeperConfig(
        hosts=(Address("127.0.0.1", 2181),), base="/services")


def test_hosts_and_base(tmp_path: Path) -> None:
    text = ('[zookeeper]\nhosts = ["10.0.0.1:2181", "zk-2.internal:2182", "[fd00::3]:2181"]\n'
            'base = "/dubbo/discovery"\n' + UPSTREAM)
    assert load_text(tmp_path, text) == ZooKeeperConfig(
        hosts=(Address("10.0.0.1", 2181), Address("zk-2.internal", 2182),
               Address("fd00::3", 2181)),
        base="/dubbo/discovery")


@pytest.mark.parametrize("base", ["/", "/services", "/a/b-c/d_e", "/sp ace"])
def test_base_accepted(tmp_path: Path, base: str) -> None:
    assert load_text(tmp_path, f'[zookeeper]\nbase = "{base}"\n' + UPSTREAM).base == base


@pytest.mark.parametrize("base", ["services", "", "/services/", "//services", "/a//b",
                                  "/a/./b", "/a/..", "/a\\u0001b"])
def test_base_refused(tmp_path: Path, base: str) -> None:
    found = problems(tmp_path, f'[zookeeper]\nbase = "{base}"\n' + UPSTREAM)
    assert len(found) == 1 and found[0].startswith(
        "zookeeper.base: expected an absolute ZooKeeper path"), found


@pytest.mark.parametrize("text, key, message", [
    ('[zookeeper]\nhosts = []\n', "zookeeper.hosts", "must not be empty"),
    ('[zookeeper]\nhosts = ["127.0.0.1"]\n', "zookeeper.hosts[0]", 'expected "host:port"'),
    ('[zookeeper]\nhosts = ["127.0.0.1:2181", "zk:0"]\n', "zookeeper.hosts[1]",
     "port must be 1..65535"),
    ('[zookeeper]\nhosts = "127.0.0.1:2181"\n', "zookeeper.hosts", "expected an array"),
    ('[zookeeper]\nchroot = "/x"\n', "zookeeper.chroot", "unknown key"),
])
def test_zookeeper_section_refused(tmp_path: Path, text: str, key: str, message: str) -> None:
    found = problems(tmp_path, text + UPSTREAM)
    assert len(found) == 1 and found[0].startswith(f"{key}: "), found
    assert message in found[0], found


def test_empty_hosts_only_matter_when_an_upstream_uses_zookeeper(tmp_path: Path) -> None:
    text = '[zookeeper]\nhosts = []\n' + UPSTREAM.replace('"zookeeper"', '"consul"')
    assert load_text(tmp_path, text).hosts == ()


@pytest.mark.parametrize("name", ["a/b", ".", ".."])
def test_upstream_name_must_be_a_znode_name(tmp_path: Path, name: str) -> None:
    found = problems(tmp_path, UPSTREAM.replace('"web"', f'"{name}"'))
    assert found == [(f'upstreams[0].name: "{name}" cannot be a znode name (no "/", ".", "..")'
                      ' when discovery = "zookeeper"')]


def test_example_config_lists_the_zookeeper_section() -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "example.toml"
    assert load(str(example), {}).zookeeper == ZooKeeperConfig()
    assert "[zookeeper]" in example.read_text()
