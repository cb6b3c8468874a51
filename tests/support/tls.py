"""A private certificate authority for tests, and reading what a TLS server serves.

`TestCA(directory)` makes a CA (the `cryptography` package, valid for a day from five
minutes ago) and writes `ca.pem`; `ca.issue(stem, names)` writes `<stem>.pem` and
`<stem>-key.pem`, a certificate for those DNS names and IP addresses signed by it, and
returns its serial number, so a test can tell which certificate a server handed out
(`served_serial`). Consul's test certificates (`support.consul.make_certificates`) are
made by it too.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_VALID_BEFORE = datetime.timedelta(minutes=5)  # the same clock, but not to the second
_VALID_FOR = datetime.timedelta(days=1)


@dataclass(frozen=True)
class IssuedCertificate:
    cert_file: Path
    key_file: Path
    serial: int


class TestCA:
    """A self-signed CA in `directory`; every certificate it issues is written there."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, common_name: str = "sdproxy test CA") -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        self._valid = (now - _VALID_BEFORE, now + _VALID_FOR)
        self._key = ec.generate_private_key(ec.SECP256R1())
        usage = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                              content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False,
                              encipher_only=False, decipher_only=False)
        self._cert = (x509.CertificateBuilder().subject_name(_name(common_name))
                      .issuer_name(_name(common_name)).public_key(self._key.public_key())
                      .serial_number(x509.random_serial_number())
                      .not_valid_before(self._valid[0]).not_valid_after(self._valid[1])
                      .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                     critical=True)
                      .add_extension(usage, critical=True)
                      .sign(self._key, hashes.SHA256()))
        stem = "ca" if common_name == "sdproxy test CA" else _file_stem(common_name)
        self.ca_file = _write_cert(directory / f"{stem}.pem", self._cert)

    def issue(self, stem: str, names: list[str], *, server: bool = True,
              client: bool = False) -> IssuedCertificate:
        """A certificate for `names` (DNS names or IP addresses; the first is its CN)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID

        key = ec.generate_private_key(ec.SECP256R1())
        alt_names: list[x509.GeneralName] = []
        for name in names:
            try:
                alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt_names.append(x509.DNSName(name))
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        serial = x509.random_serial_number()
        cert = (x509.CertificateBuilder().subject_name(_name(names[0]))
                .issuer_name(self._cert.subject).public_key(key.public_key())
                .serial_number(serial)
                .not_valid_before(self._valid[0]).not_valid_after(self._valid[1])
                .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .sign(self._key, hashes.SHA256()))
        return IssuedCertificate(_write_cert(self.directory / f"{stem}.pem", cert),
                                 _write_key(self.directory / f"{stem}-key.pem", key), serial)


def served_serial(addr: tuple[str, int], timeout: float = 5.0) -> int:
    """The serial number of the certificate a TLS server at `addr` serves now (blocking;
    any certificate is accepted: the test asks which one, not whether it is trusted)."""
    from cryptography import x509

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(addr, timeout=timeout) as raw, \
            context.wrap_socket(raw) as conn:
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def _name(common_name: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _file_stem(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower())


def _write_cert(path: Path, cert: Any) -> Path:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: Any) -> Path:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path
