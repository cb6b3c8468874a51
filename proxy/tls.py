"""TLS for upstreams and listeners (SPEC "TLS"): building, caching and reloading SSLContexts.

Owns the contexts sdproxy uses to speak TLS, apart from Consul's (discovery/consul.py):
- origination, `[upstreams.tls]`: a client context per section, shared by the HTTP
  connections, the TCP relays and the health probes of that upstream. `ORIGINATIONS`
  memoizes them by the (frozen) section, so the data path looks one up with a dict get
  and never reads a file once `prepare` ran (the app prepares every upstream before it
  listens, and rebuilds them all on SIGHUP so renewed client certificates are used);
- termination, `[upstreams.listen_tls]`: `ServingCertificate` holds a listener's server
  context. A reload validates the new pair in a fresh context first and only then loads
  it into the live one: new handshakes get the new certificate (OpenSSL copies the
  certificate into each connection when it starts), open connections keep theirs, and a
  bad or missing file leaves the old certificate serving.

Every problem with a file is a `TlsFileError` naming the config key it came from, so
`sdproxy check` (proxy.config) and a reload report it in the user's terms. This module
reads files but knows no sockets, loops or listeners.
"""

from __future__ import annotations

import logging
import re
import ssl
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class UpstreamTlsConfig:
    """`[upstreams.tls]`: sdproxy speaks TLS to the instances (SPEC "TLS"). Present and
    `enabled` (the default) = on; the contexts are built here."""

    upstream: str  # the upstream this section belongs to, for log lines
    server_name: str  # SNI and the name certificates must carry; default: the upstream name
    ca_file: str = ""  # "" = the system's CAs
    verify: bool = True  # false: encrypted, but any certificate is accepted
    cert_file: str = ""  # a client certificate, for instances that ask for one (mTLS)
    key_file: str = ""


@dataclass(frozen=True)
class ListenTlsConfig:
    """`[upstreams.listen_tls]`: the listener terminates TLS; SIGHUP reloads the files."""

    cert_file: str
    key_file: str


log = logging.getLogger("sdproxy.tls")

# Clients older than TLS 1.2 are not worth the risk (RFC 8996 deprecates 1.0 and 1.1).
MINIMUM_VERSION: Final = ssl.TLSVersion.TLSv1_2


class TlsFileError(Exception):
    """A TLS file that cannot be used; `key` is its config key (`cert_file`, ...)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def describe(error: BaseException) -> str:
    """A short reason for an ssl or OS error: "KEY_VALUES_MISMATCH", "hostname mismatch"."""
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        return str(error.verify_message)
    if isinstance(error, ssl.SSLError):  # the reason, not the OpenSSL source line
        text = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(error.args[-1]))
        return error.reason or re.sub(r"^\[[A-Z0-9_]+\]\s*", "", text)
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error) or type(error).__name__


def _readable(key: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise TlsFileError(key, f'cannot read "{path}": {describe(e)}') from None


def _load_pair(context: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    """Load a certificate and its key into `context`; a failure names the file at fault
    (OpenSSL says only "PEM lib" for either)."""
    _readable("cert_file", cert_file)
    _readable("key_file", key_file)
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as e:
        reason = describe(e)
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert_file)
        except ssl.SSLError:
            raise TlsFileError("cert_file", f'"{cert_file}" holds no PEM certificate: '
                                            f"{reason}") from None
        if "KEY_VALUES_MISMATCH" in reason:
            raise TlsFileError("key_file", f'"{key_file}" is not the private key of '
                                           f'"{cert_file}": {reason}') from None
        raise TlsFileError("key_file", f'"{key_file}" holds no PEM private key: '
                                       f"{reason}") from None


def client_context(*, ca_file: str = "", cert_file: str = "", key_file: str = "",
                   verify: bool = True) -> ssl.SSLContext:
    """A context for connecting to instances; raises TlsFileError.

    `ca_file` "" trusts the system's CAs. `verify = false` accepts any certificate (and
    any name): the connection is encrypted but not authenticated.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = MINIMUM_VERSION
    if ca_file:
        _readable("ca_file", ca_file)
        try:
            context.load_verify_locations(cafile=ca_file)
        except ssl.SSLError as e:
            raise TlsFileError("ca_file", f'"{ca_file}" holds no PEM certificate: '
                                          f"{describe(e)}") from None
    elif verify:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert_file or key_file:
        _load_pair(context, cert_file, key_file)
    return context


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A listener's context serving `cert_file`/`key_file`; raises TlsFileError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    _load_pair(context, cert_file, key_file)
    return context


# -- origination: [upstreams.tls] ---------------------------------------------------------
class Origination:
    """What connecting to one upstream's instances over TLS needs."""

    __slots__ = ("context", "server_name", "upstream")

    def __init__(self, cfg: UpstreamTlsConfig) -> None:
        self.context = client_context(ca_file=cfg.ca_file, cert_file=cfg.cert_file,
                                      key_file=cfg.key_file, verify=cfg.verify)
        self.server_name = cfg.server_name  # SNI, and the name the certificate must carry
        self.upstream = cfg.upstream


class Originations:
    """Client contexts by `[upstreams.tls]` section, built once and shared."""

    def __init__(self) -> None:
        self._built: dict[UpstreamTlsConfig, Origination] = {}

    def prepare(self, cfg: UpstreamTlsConfig) -> Origination:
        """The section's context, built now if it is not yet (raises TlsFileError)."""
        built = self._built.get(cfg)
        if built is None:
            built = self._built[cfg] = Origination(cfg)
        return built

    def get(self, cfg: UpstreamTlsConfig) -> Origination:
        """On the data path: the prepared context (built here only if the app did not)."""
        built = self._built.get(cfg)
        return built if built is not None else self.prepare(cfg)

    def reload(self, wanted: list[UpstreamTlsConfig]) -> None:
        """SIGHUP: rebuild the contexts of `wanted` from their files, forget the others.

        A section whose files no longer load keeps its previous context, with one error
        line naming the upstream and the key.
        """
        fresh: dict[UpstreamTlsConfig, Origination] = {}
        for cfg in wanted:
            try:
                fresh[cfg] = Origination(cfg)
            except TlsFileError as e:
                log.error('event=tls_reload_failed upstream=%s key=tls.%s error="%s"',
                          cfg.upstream, e.key, e.reason.replace('"', "'"))
                if cfg in self._built:
                    fresh[cfg] = self._built[cfg]
        self._built = fresh


ORIGINATIONS: Final = Originations()  # per process: each worker builds its own


def log_connect_failure(origination: Origination, instance: str, error: BaseException) -> None:
    """One line per TLS handshake an instance failed (the caller fails the connect over)."""
    log.warning('event=upstream_tls_failed upstream=%s instance=%s server_name=%s '
                'reason="%s"', origination.upstream, instance, origination.server_name,
                describe(error).replace('"', "'"))


# -- termination: [upstreams.listen_tls] --------------------------------------------------
class ServingCertificate:
    """The certificate one listener serves, reloadable in place."""

    __slots__ = ("cert_file", "context", "key_file", "upstream")

    def __init__(self, upstream: str, cfg: ListenTlsConfig) -> None:
        self.upstream = upstream
        self.cert_file = cfg.cert_file
        self.key_file = cfg.key_file
        self.context = server_context(cfg.cert_file, cfg.key_file)

    def reload(self, cfg: ListenTlsConfig) -> bool:
        """Serve `cfg`'s files from the next handshake on; False (and one error line, the
        old certificate still served) when they do not load."""
        try:
            server_context(cfg.cert_file, cfg.key_file)  # validate before touching the live one
            self.context.load_cert_chain(cfg.cert_file, cfg.key_file)
        except TlsFileError as e:
            log.error('event=tls_reload_failed upstream=%s key=listen_tls.%s error="%s"',
                      self.upstream, e.key, e.reason.replace('"', "'"))
            return False
        except (OSError, ssl.SSLError) as e:  # replaced between the two loads
            log.error('event=tls_reload_failed upstream=%s key=listen_tls.cert_file '
                      'error="%s"', self.upstream, describe(e).replace('"', "'"))
            return False
        self.cert_file, self.key_file = cfg.cert_file, cfg.key_file
        return True
