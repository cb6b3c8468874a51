"""`[upstreams.tls]` and `[upstreams.listen_tls]` in the config (SPEC "TLS").

The files are real: a private CA and certificates made per module (support.tls), loaded
the way the proxy loads them, so `sdproxy check` rejects exactly what would fail to start.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.tls import IssuedCertificate, TestCA
from test_cli_check import sdproxy

from proxy.config import ConfigError, load
from proxy.tls import ListenTlsConfig, UpstreamTlsConfig

UPSTREAM = '[[upstreams]]\nname = "web"\nlisten = "127.0.0.1:8081"\n'


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("pem"))


@pytest.fixture(scope="module")
def leaf(ca: TestCA) -> IssuedCertificate:
    return ca.issue("web", ["web", "127.0.0.1"], client=True)


@pytest.fixture(scope="module")
def other(ca: TestCA) -> IssuedCertificate:
    return ca.issue("other", ["other"])


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sdproxy.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def problems(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, {})
    return [p.removeprefix(f"{path}: ") for p in info.value.problems]


def test_tls_table_present_means_on_with_the_upstream_name(tmp_path: Path, ca: TestCA) -> None:
    up = load(write(tmp_path, UPSTREAM + f'[upstreams.tls]\nca_file = "{ca.ca_file}"\n'),
              {}).upstreams[0]
    assert up.tls == UpstreamTlsConfig(upstream="web", server_name="web",
                                       ca_file=str(ca.ca_file))
    assert up.listen_tls is None
    plain = load(write(tmp_path, UPSTREAM), {}).upstreams[0]
    assert (plain.tls, plain.listen_tls) == (None, None)


def test_every_tls_key(tmp_path: Path, ca: TestCA, leaf: IssuedCertificate) -> None:
    text = UPSTREAM + (f'[upstreams.tls]\nenabled = true\nca_file = "{ca.ca_file}"\n'
                       f'server_name = "api.internal"\nverify = false\n'
                       f'cert_file = "{leaf.cert_file}"\nkey_file = "{leaf.key_file}"\n'
                       f'[upstreams.listen_tls]\ncert_file = "{leaf.cert_file}"\n'
                       f'key_file = "{leaf.key_file}"\n')
    up = load(write(tmp_path, text), {}).upstreams[0]
    assert up.tls == UpstreamTlsConfig(upstream="web", server_name="api.internal",
                                       ca_file=str(ca.ca_file), verify=False,
                                       cert_file=str(leaf.cert_file),
                                       key_file=str(leaf.key_file))
    assert up.listen_tls == ListenTlsConfig(str(leaf.cert_file), str(leaf.key_file))


def test_defaults_tls_is_inherited_and_can_be_turned_off(tmp_path: Path, ca: TestCA) -> None:
    text = (f'[defaults.tls]\nca_file = "{ca.ca_file}"\n' + UPSTREAM
            + '[[upstreams]]\nname = "old"\nlisten = "127.0.0.1:8082"\n'
            + "[upstreams.tls]\nenabled = false\n")
    web, old = load(write(tmp_path, text), {}).upstreams
    assert web.tls is not None and (web.tls.ca_file, web.tls.server_name) == (
        str(ca.ca_file), "web")
    assert old.tls is None


def test_problems_name_the_key(tmp_path: Path, ca: TestCA, leaf: IssuedCertificate,
                               other: IssuedCertificate) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    missing = tmp_path / "missing.pem"
    cases = [
        (f'[upstreams.tls]\ncert_file = "{leaf.cert_file}"\n',
         ["upstreams[0].tls.key_file: required with cert_file"]),
        (f'[upstreams.tls]\nkey_file = "{leaf.key_file}"\n',
         ["upstreams[0].tls.cert_file: required with key_file"]),
        ('[upstreams.tls]\nverfy = false\n', ["upstreams[0].tls.verfy: unknown key"]),
        ('[upstreams.tls]\nverify = "no"\n',
         ["upstreams[0].tls.verify: expected a boolean, got string"]),
        (f'[upstreams.tls]\nca_file = "{missing}"\n',
         [(f'upstreams[0].tls.ca_file: upstream "web": cannot read "{missing}": '
          "No such file or directory")]),
        (f'[upstreams.tls]\nca_file = "{garbage}"\n',
         [f'upstreams[0].tls.ca_file: upstream "web": "{garbage}" holds no PEM certificate']),
        (f'[upstreams.tls]\ncert_file = "{leaf.cert_file}"\nkey_file = "{other.key_file}"\n',
         [(f'upstreams[0].tls.key_file: upstream "web": "{other.key_file}" is not the '
          f'private key of "{leaf.cert_file}": KEY_VALUES_MISMATCH')]),
        (f'[upstreams.listen_tls]\ncert_file = "{leaf.cert_file}"\n',
         ["upstreams[0].listen_tls.key_file: required"]),
        (f'[upstreams.listen_tls]\ncert_file = "{garbage}"\nkey_file = "{leaf.key_file}"\n',
         [(f'upstreams[0].listen_tls.cert_file: upstream "web": "{garbage}" holds no PEM '
          "certificate")]),
        (f'[upstreams.listen_tls]\ncert_file = "{leaf.cert_file}"\nkey_file = "{garbage}"\n',
         [(f'upstreams[0].listen_tls.key_file: upstream "web": "{garbage}" holds no PEM '
          "private key")]),
        (f'[upstreams.listen_tls]\ncert_file = "{leaf.cert_file}"\nkey_file = "{missing}"\n',
         [f'upstreams[0].listen_tls.key_file: upstream "web": cannot read "{missing}"']),
        ('[upstreams.listen_tls]\ncert_file = ""\nkey_file = "k.pem"\n',
         ["upstreams[0].listen_tls.cert_file: must not be empty"]),
        ((f'[upstreams.listen_tls]\ncert = "c.pem"\ncert_file = "{leaf.cert_file}"\n'
         f'key_file = "{leaf.key_file}"\n'), ["upstreams[0].listen_tls.cert: unknown key"]),
    ]
    for text, want in cases:
        found = problems(tmp_path, UPSTREAM + text)
        assert len(found) == len(want), (text, found)
        for got, expected in zip(found, want, strict=True):
            assert got.startswith(expected), (got, expected)


def test_sdproxy_check_reports_a_mismatched_pair(tmp_path: Path, leaf: IssuedCertificate,
                                                 other: IssuedCertificate) -> None:
    path = write(tmp_path, UPSTREAM + f'[upstreams.listen_tls]\ncert_file = "{leaf.cert_file}"'
                                      f'\nkey_file = "{other.key_file}"\n')
    result = sdproxy("check", "-c", path)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(f'{path}: upstreams[0].listen_tls.key_file: upstream "web": '
                                    f'"{other.key_file}" is not the private key'), result.stderr


def test_a_routed_listener_takes_listen_tls_of_its_own_or_from_defaults(
        tmp_path: Path, leaf: IssuedCertificate, other: IssuedCertificate) -> None:
    routed = ('[[upstreams]]\nname = "web"\n\n[[listeners]]\nlisten = "127.0.0.1:8080"\n'
              'routes = [{ path_prefix = "/", upstream = "web" }]\n')
    own = f'[listeners.listen_tls]\ncert_file = "{leaf.cert_file}"\nkey_file = "{leaf.key_file}"\n'
    (lc,) = load(write(tmp_path, routed + own), {}).listeners
    assert lc.defaults.listen_tls == ListenTlsConfig(str(leaf.cert_file), str(leaf.key_file))
    inherited = (f'[defaults.listen_tls]\ncert_file = "{leaf.cert_file}"\n'
                 f'key_file = "{leaf.key_file}"\n\n')
    (lc,) = load(write(tmp_path, inherited + routed), {}).listeners
    assert lc.defaults.listen_tls == ListenTlsConfig(str(leaf.cert_file), str(leaf.key_file))
    # A mismatched pair names the listener's key and the listener.
    bad = f'[listeners.listen_tls]\ncert_file = "{leaf.cert_file}"\nkey_file = "{other.key_file}"\n'
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, routed + bad), {})
    assert "sdproxy.toml: listeners[0].listen_tls.key_file: listener 127.0.0.1:8080: " \
        in str(caught.value), str(caught.value)
