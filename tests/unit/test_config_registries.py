"""proxy.config for the other registries: `[etcd]`, `discovery = "etcd"`, `[consul] register`."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import Config, ConfigError, ConsulConfig, EtcdConfig, load

REPO = Path(__file__).resolve().parents[2]
UPSTREAM = '[[upstreams]]\nname = "web"\nlisten = "127.0.0.1:8081"\n'


def load_text(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "sdproxy.toml"
    path.write_text(text, encoding="utf-8")
    return load(str(path), {})


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "sdproxy.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(str(path), {})
    return [p.removeprefix(f"{path}: ") for p in info.value.problems]


def test_defaults(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, UPSTREAM)
    assert cfg.etcd == EtcdConfig(endpoints=("http://127.0.0.1:2379",), prefix="")
    assert (cfg.consul.register, cfg.consul.register_check_interval) == (False, 10.0)


def test_etcd_upstream(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[etcd]\nendpoints = ["http://127.0.0.1:2379", '
                              '"http://127.0.0.2:2379/"]\nprefix = "/services"\n'
                              + UPSTREAM + 'discovery = "etcd"\n')
    assert cfg.etcd.endpoints == ("http://127.0.0.1:2379", "http://127.0.0.2:2379/")
    assert cfg.etcd.prefix == "/services"
    assert cfg.upstreams[0].discovery == "etcd"


def test_register(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[consul]\nregister = true\nregister_check_interval = "2s"\n')
    assert cfg.consul == ConsulConfig(register=True, register_check_interval=2.0)


@pytest.mark.parametrize(("text", "problem"), [
    ('[etcd]\nendpoints = ["http://127.0.0.1:2379", "127.0.0.1:2379"]\n',
     'etcd.endpoints[1]: expected "http://host:port", got "127.0.0.1:2379"'),
    ('[etcd]\nendpoints = ["https://127.0.0.1:2379"]\n',
     'etcd.endpoints[0]: expected "http://host:port"'),
    ('[etcd]\nendpoints = ["http://127.0.0.1:2379/v3"]\n',
     'etcd.endpoints[0]: expected "http://host:port"'),
    ('[etcd]\nendpoints = "http://127.0.0.1:2379"\n',
     "etcd.endpoints: expected an array, got string"),
    ('[etcd]\nprefix = "/services/"\n', 'etcd.prefix: must not end with "/"'),
    ('[etcd]\nprefx = "/services"\n', "etcd.prefx: unknown key"),
    ('[etcd]\nendpoints = []\n' + UPSTREAM + 'discovery = "etcd"\n',
     'etcd.endpoints: must not be empty when an upstream uses discovery = "etcd"'),
    ('[consul]\nregister = "yes"\n', "consul.register: expected a boolean, got string"),
    ('[consul]\nregister_check_interval = "0s"\n',
     "consul.register_check_interval: must be greater than 0"),
    (UPSTREAM + 'discovery = "etc"\n',
     "upstreams[0].discovery: must be one of consul, dns, file, static, etcd"),
])
def test_problems_name_the_key(tmp_path: Path, text: str, problem: str) -> None:
    found = problems(tmp_path, text)
    assert any(p.startswith(problem) for p in found), found


def test_example_config_spells_out_the_new_keys() -> None:
    cfg = load(str(REPO / "config" / "example.toml"), {})
    assert cfg.etcd == EtcdConfig()
    assert (cfg.consul.register, cfg.consul.register_check_interval) == (False, 10.0)
    text = (REPO / "config" / "example.toml").read_text()
    assert "[etcd]" in text and "register = false" in text
