"""proxy.tls: contexts built from real PEM files, reloaded in place, old ones kept on error.

The served certificate is read back from a real handshake on loopback (support.tls
`served_serial`), so "the live context serves the new pair" is observed, not assumed.
"""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import threading
from pathlib import Path

import pytest
from support.tls import IssuedCertificate, TestCA, served_serial

from proxy.tls import (
    ListenTlsConfig,
    Originations,
    ServingCertificate,
    TlsFileError,
    UpstreamTlsConfig,
    client_context,
)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("pem"))


@pytest.fixture(scope="module")
def first(ca: TestCA) -> IssuedCertificate:
    return ca.issue("first", ["127.0.0.1"])


@pytest.fixture(scope="module")
def second(ca: TestCA) -> IssuedCertificate:
    return ca.issue("second", ["127.0.0.1"])


def copy_pair(pair: IssuedCertificate, into: Path) -> ListenTlsConfig:
    cert, key = into / "serving.pem", into / "serving-key.pem"
    shutil.copyfile(pair.cert_file, cert)
    shutil.copyfile(pair.key_file, key)
    return ListenTlsConfig(str(cert), str(key))


def serve_once(context: ssl.SSLContext) -> tuple[tuple[str, int], threading.Thread]:
    """Accept one connection on loopback and complete its handshake with `context`."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5.0)

    def accept() -> None:
        with listener:
            conn, _ = listener.accept()
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)  # until the client closes
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return listener.getsockname(), thread


def serial_served_by(context: ssl.SSLContext) -> int:
    addr, thread = serve_once(context)
    serial = served_serial(addr)
    thread.join(5.0)
    return serial


def test_reload_serves_the_new_pair_to_new_handshakes(
        tmp_path: Path, first: IssuedCertificate, second: IssuedCertificate) -> None:
    cfg = copy_pair(first, tmp_path)
    serving = ServingCertificate("web", cfg)
    assert serial_served_by(serving.context) == first.serial
    copy_pair(second, tmp_path)
    assert serving.reload(cfg)
    assert serial_served_by(serving.context) == second.serial


def test_a_reload_that_fails_keeps_the_old_pair_and_says_why(
        tmp_path: Path, first: IssuedCertificate, second: IssuedCertificate,
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = copy_pair(first, tmp_path)
    serving = ServingCertificate("web", cfg)
    Path(cfg.key_file).write_bytes(second.key_file.read_bytes())  # not the cert's key
    with caplog.at_level(logging.ERROR, logger="sdproxy.tls"):
        assert not serving.reload(cfg)
    assert serial_served_by(serving.context) == first.serial
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("event=tls_reload_failed upstream=web key=listen_tls.key_file ")
    assert "KEY_VALUES_MISMATCH" in line


def test_originations_are_built_once_and_kept_when_a_reload_fails(
        tmp_path: Path, ca: TestCA, caplog: pytest.LogCaptureFixture) -> None:
    ca_file = tmp_path / "ca.pem"
    shutil.copyfile(ca.ca_file, ca_file)
    cfg = UpstreamTlsConfig(upstream="web", server_name="web", ca_file=str(ca_file))
    gone = UpstreamTlsConfig(upstream="old", server_name="old", ca_file=str(ca_file))
    originations = Originations()
    built = originations.prepare(cfg)
    originations.prepare(gone)
    assert originations.get(cfg) is built and built.server_name == "web"
    originations.reload([cfg])  # files fine: a fresh context; `gone` is forgotten
    renewed = originations.get(cfg)
    assert renewed is not built
    ca_file.write_text("not a certificate\n")
    with caplog.at_level(logging.ERROR, logger="sdproxy.tls"):
        originations.reload([cfg, gone])
    assert originations.get(cfg) is renewed  # the previous context serves on
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" error=")[0] for line in lines] == [
        "event=tls_reload_failed upstream=web key=tls.ca_file",
        "event=tls_reload_failed upstream=old key=tls.ca_file"]
    with pytest.raises(TlsFileError):  # and one never built has nothing to fall back on
        originations.get(gone)


@pytest.mark.parametrize("verify", [True, False])
def test_client_context_verifies_unless_told_not_to(ca: TestCA, verify: bool) -> None:
    context = client_context(ca_file=str(ca.ca_file), verify=verify)
    assert context.check_hostname is verify
    assert context.verify_mode == (ssl.CERT_REQUIRED if verify else ssl.CERT_NONE)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
