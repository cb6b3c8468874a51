"""TLS to instances and from clients (SPEC "TLS": `[upstreams.tls]`, `[upstreams.listen_tls]`).

Real processes on loopback: demo backends serving HTTPS with certificates of a private
CA the module makes (support.tls), one of them requiring a client certificate, and the
proxy, with static discovery (no catalog is involved in TLS). One proxy serves every
upstream of the first test; the reload test has its own, since it rewrites files.

- HTTPS to the instances, verified against the test CA under the default server name
  (the upstream's name), with keep-alive connections reused over TLS; the active health
  checks probe over TLS (a plain probe would fail against an HTTPS instance).
- An instance whose certificate does not carry the name: a failed connect, failed over,
  charged to its breaker and logged with upstream, instance and reason; 502 when it is
  the only one; its probes fail with the TLS reason.
- mTLS: an instance that requires a client certificate gets the configured one; without
  one configured the client gets 502.
- tcp mode: plain client -> TLS to the instance (origination).
- listen_tls in http and tcp modes (X-Forwarded-Proto: https unless the client sent one); SIGHUP swaps the served certificate (seen through
  its serial number) while a connection opened before goes on, and a bad file on a
  reload keeps the old certificate with one error line.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.http import RawConnection, fetch
from support.procs import Backend, BackendTLS, ProxyProcess, launch_proxy
from support.tls import IssuedCertificate, TestCA, served_serial
from support.tomlconf import build_config

from proxy.devconsul import free_port

pytestmark = pytest.mark.timeout(60)

UPSTREAM = "tls-upstream"  # the name the instances' certificates carry
StartBackends = Callable[..., list[Backend]]


@dataclass(frozen=True)
class Pki:
    ca: TestCA
    instance: IssuedCertificate  # for UPSTREAM, localhost and 127.0.0.1
    stranger: IssuedCertificate  # signed by the CA, for another name only
    client: IssuedCertificate  # sdproxy's client certificate (mTLS)
    listener: IssuedCertificate  # what sdproxy serves to its clients
    renewed: IssuedCertificate  # the listener's next certificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = TestCA(tmp_path_factory.mktemp("tls-pki"))
    return Pki(ca=ca,
               instance=ca.issue("instance", [UPSTREAM, "localhost", "127.0.0.1"]),
               stranger=ca.issue("stranger", ["elsewhere.test"]),
               client=ca.issue("client", ["sdproxy"], server=False, client=True),
               listener=ca.issue("listener", ["localhost", "127.0.0.1"]),
               renewed=ca.issue("renewed", ["localhost", "127.0.0.1"]))


@pytest.fixture
def proxies() -> Iterator[list[ProxyProcess]]:
    started: list[ProxyProcess] = []
    yield started
    for proxy in started:
        proxy.cleanup()


def start_proxy(proxies: list[ProxyProcess], upstreams: dict[str, dict[str, Any]]
                ) -> ProxyProcess:
    text = build_config(upstreams, admin_listen=f"127.0.0.1:{free_port()}",
                        consul={"address": f"127.0.0.1:{free_port()}"},
                        defaults={"drain_timeout": "1s"},
                        listen_for=lambda _name: f"127.0.0.1:{free_port()}")
    proxy = launch_proxy(text)
    proxies.append(proxy)
    return proxy


def static(*backends: Backend) -> dict[str, Any]:
    return {"discovery": "static", "endpoints": [f"127.0.0.1:{b.port}" for b in backends]}


def client_context(pki: Pki) -> ssl.SSLContext:
    """What a client of a TLS listener uses: it trusts the test CA."""
    context = ssl.create_default_context(cafile=str(pki.ca.ca_file))
    return context


async def poll(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """`check()` (run in a thread) until it returns a true value; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = await asyncio.to_thread(check)
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {timeout}s: {what}")
        await asyncio.sleep(0.05)


async def test_tls_to_instances_and_from_clients(
        pki: Pki, start_backends: StartBackends, proxies: list[ProxyProcess]) -> None:
    started = time.monotonic()
    a, b = start_backends("a", "b", tls=BackendTLS(pki.instance.cert_file,
                                                   pki.instance.key_file))
    (stranger,) = start_backends("stranger", tls=BackendTLS(pki.stranger.cert_file,
                                                            pki.stranger.key_file))
    (mutual,) = start_backends("mutual", tls=BackendTLS(
        pki.instance.cert_file, pki.instance.key_file, client_ca=pki.ca.ca_file))
    (plain,) = start_backends("plain")
    trust = {"ca_file": str(pki.ca.ca_file)}
    client_cert = {"cert_file": str(pki.client.cert_file),
                   "key_file": str(pki.client.key_file)}
    health = {"path": "/health", "interval": "100ms", "timeout": "1s", "fall": 1, "rise": 1}
    listen_tls = {"cert_file": str(pki.listener.cert_file),
                  "key_file": str(pki.listener.key_file)}
    proxy = start_proxy(proxies, {
        UPSTREAM: {**static(a, b), "tls": trust, "health": health},
        "tls-failover": {**static(a, stranger), "tls": {**trust, "server_name": UPSTREAM},
                         "breaker": {"failures": 2, "reset_timeout": "1m"}},
        "tls-none-verifies": {**static(stranger), "tls": {**trust, "server_name": UPSTREAM},
                              "health": health},
        "tls-mutual": {**static(mutual), "tls": {**trust, **client_cert,
                                                 "server_name": UPSTREAM}},
        "tls-mutual-no-cert": {**static(mutual), "tls": {**trust, "server_name": UPSTREAM}},
        "tls-tcp": {**static(a), "mode": "tcp", "tls": {**trust, "server_name": UPSTREAM}},
        "tls-no-verify": {**static(stranger), "tls": {"verify": False}},
        "tls-listen-http": {**static(plain), "listen_tls": listen_tls},
        "tls-listen-tcp": {**static(plain), "mode": "tcp", "listen_tls": listen_tls},
    })

    # HTTPS to the instances under the upstream's own name; keep-alive reused over TLS.
    addr = proxy.listen(UPSTREAM)
    async with await RawConnection.open(addr) as conn:
        peers: dict[str, set[str]] = {"a": set(), "b": set()}
        for _ in range(6):
            resp = await conn.request("GET", "/headers")
            assert resp.status == 200, resp.text
            # A plain listener: the instance is told the client came over http.
            assert json.loads(resp.body)["x-forwarded-proto"] == "http", resp.text
            peers[resp.header("X-Backend") or "?"].add(resp.text.split('"_peer": "')[1]
                                                       .split('"')[0])
    assert {name: len(ports) for name, ports in peers.items()} == {"a": 1, "b": 1}, peers
    # Probes over TLS: both instances pass them and stay in the pool.
    def probed_twice() -> list[dict[str, Any]]:
        eps = proxy.endpoints(UPSTREAM)
        return eps if all(ep["health_checks"].get("pass", 0) >= 2 for ep in eps) else []

    eps = await poll(probed_twice, "two passed probes of each instance")
    assert [ep["state"] for ep in eps] == ["healthy", "healthy"], eps
    assert not any(ep["health_checks"].get("fail", 0) or ep["health_checks"].get("error", 0)
                   for ep in eps), eps

    # A certificate without the name: failed over, charged, logged; 502 when alone.
    failover = proxy.listen("tls-failover")
    for _ in range(6):
        resp = await fetch(failover)
        assert (resp.status, resp.text) == (200, "a"), resp.text
    stranger_id = f"127.0.0.1:{stranger.port}"
    ep = next(e for e in proxy.endpoints("tls-failover") if e["id"] == stranger_id)
    assert ep["failures"] == 2 and ep["state"] == "open", ep
    lines = [e for e in proxy.events("upstream_tls_failed") if e["upstream"] == "tls-failover"]
    assert lines and lines[0]["instance"] == stranger_id, proxy.stderr_tail()
    assert "hostname mismatch" in lines[0]["reason"].lower(), lines[0]
    print(f"\nlog line: {lines[0]}")
    resp = await fetch(proxy.listen("tls-none-verifies"))
    assert resp.status == 502, resp.text
    ejected = await poll(lambda: [e for e in proxy.endpoints("tls-none-verifies")
                                  if e["state"] == "ejected"], "the stranger is ejected")
    assert ejected[0]["reason"].startswith("health: tls: "), ejected[0]
    assert "mismatch" in ejected[0]["reason"].lower(), ejected[0]

    # verify = false: encrypted, and a certificate for another name from an unknown CA
    # (no ca_file: the system's CAs) is accepted.
    resp = await fetch(proxy.listen("tls-no-verify"))
    assert (resp.status, resp.text) == (200, "stranger"), resp.text

    # mTLS: the instance requires a client certificate and gets sdproxy's.
    resp = await fetch(proxy.listen("tls-mutual"))
    assert (resp.status, resp.text) == (200, "mutual")
    # Without one: TLS 1.3 reports the refusal after the handshake, on the first read, so
    # it is a reset of the attempt rather than a failed connect; the client gets 502.
    resp = await fetch(proxy.listen("tls-mutual-no-cert"))
    assert resp.status == 502, resp.text

    # tcp mode: the client speaks plain HTTP to sdproxy, sdproxy TLS to the instance.
    resp = await fetch(proxy.listen("tls-tcp"))
    assert (resp.status, resp.text) == (200, "a")

    # listen_tls: clients speak TLS to sdproxy, in http and in tcp mode.
    for name in ("tls-listen-http", "tls-listen-tcp"):
        resp = await fetch(proxy.listen(name), tls=client_context(pki))
        assert (resp.status, resp.text) == (200, "plain"), name
        serial = await asyncio.to_thread(served_serial, proxy.listen(name))
        assert serial == pki.listener.serial
    # A TLS listener tells the instance the client came over https (X-Forwarded-Proto),
    # unless the client said itself (as on a plain listener: sdproxy may sit behind another
    # proxy); on keep-alive and on the fast path (head forwarded as received) alike.
    async with await RawConnection.open(proxy.listen("tls-listen-http"),
                                        tls=client_context(pki)) as conn:
        resp = await conn.request("GET", "/headers")
        assert json.loads(resp.body)["x-forwarded-proto"] == "https", resp.text
        resp = await conn.request("GET", "/headers", headers=[("X-Forwarded-Proto", "http")])
        assert json.loads(resp.body)["x-forwarded-proto"] == "http", resp.text
        resp = await conn.request("GET", "/headers", headers=[("Connection", "x-hop"),
                                                              ("X-Hop", "1")])
        seen = json.loads(resp.body)
        assert seen["x-forwarded-proto"] == "https" and "x-hop" not in seen, resp.text
    # A plain client of a TLS listener gets no HTTP answer.
    with pytest.raises((ConnectionError, OSError, asyncio.IncompleteReadError)):
        await fetch(proxy.listen("tls-listen-http"), timeout=3.0)
    assert "Traceback" not in proxy.stderr_text(), proxy.stderr_tail()
    # Every line is one logfmt event: the tcp-mode TLS connections that ended above left no
    # stray warning (uvloop's "returning true from eof_received() has no effect ...").
    assert "eof_received" not in proxy.stderr_text(), proxy.stderr_tail()
    print(f"test ran {time.monotonic() - started:.1f}s")


async def test_sighup_reloads_the_listener_certificate(
        pki: Pki, start_backends: StartBackends, proxies: list[ProxyProcess],
        tmp_path: Path) -> None:
    started = time.monotonic()
    (plain,) = start_backends("plain")
    cert, key = tmp_path / "serving.pem", tmp_path / "serving-key.pem"
    cert.write_bytes(pki.listener.cert_file.read_bytes())
    key.write_bytes(pki.listener.key_file.read_bytes())
    proxy = start_proxy(proxies, {
        "reloading": {**static(plain), "listen_tls": {"cert_file": str(cert),
                                                      "key_file": str(key)}}})
    addr = proxy.listen("reloading")
    assert await asyncio.to_thread(served_serial, addr) == pki.listener.serial

    before = await RawConnection.open(addr, tls=client_context(pki))
    try:
        assert (await before.request("GET", "/")).status == 200
        cert.write_bytes(pki.renewed.cert_file.read_bytes())
        key.write_bytes(pki.renewed.key_file.read_bytes())
        proxy.proc.send_signal(signal.SIGHUP)
        await poll(lambda: proxy.events("reloaded"), "the reload")
        assert await asyncio.to_thread(served_serial, addr) == pki.renewed.serial
        # The connection opened before the reload goes on, with its certificate.
        resp = await before.request("GET", "/")
        assert (resp.status, resp.text) == (200, "plain")
        resp = await fetch(addr, tls=client_context(pki))
        assert (resp.status, resp.text) == (200, "plain")

        # A broken renewal: the old (renewed) certificate keeps serving, one error line.
        key.write_text("not a key\n")
        rejected_before = len(proxy.events("reload_rejected"))
        proxy.proc.send_signal(signal.SIGHUP)
        lines = await poll(lambda: proxy.events("reload_rejected")[rejected_before:],
                           "the rejection")
        assert len(lines) == 1
        assert "upstreams[0].listen_tls.key_file" in lines[0]["problems"], lines[0]
        assert 'upstream \'reloading\'' in lines[0]["problems"], lines[0]
        print(f"\nlog line: {lines[0]}")
        assert await asyncio.to_thread(served_serial, addr) == pki.renewed.serial
        resp = await before.request("GET", "/")
        assert resp.status == 200
    finally:
        await before.close()

    # listen_tls taken out by a reload: a new, plain listener on the same address.
    proxy.config_path.write_text(build_config(
        {"reloading": {**static(plain), "listen": f"127.0.0.1:{addr[1]}"}},
        admin_listen=f"127.0.0.1:{proxy.admin_addr[1]}",
        consul={"address": f"127.0.0.1:{free_port()}"}))
    reloads = len(proxy.events("reloaded"))
    proxy.proc.send_signal(signal.SIGHUP)
    (reloaded,) = await poll(lambda: proxy.events("reloaded")[reloads:], "the second reload")
    assert reloaded["added"] == "reloading", reloaded  # replaced: retired, then added
    resp = await fetch(addr)
    assert (resp.status, resp.text) == (200, "plain")
    print(f"test ran {time.monotonic() - started:.1f}s")


async def test_a_routed_listener_terminates_tls_and_reloads_its_certificate(
        pki: Pki, start_backends: StartBackends, proxies: list[ProxyProcess],
        tmp_path: Path) -> None:
    """`[[listeners]]` with `listen_tls`: the same termination and SIGHUP reload as an
    upstream's own listener, in front of its routes."""
    (plain,) = start_backends("plain")
    cert, key = tmp_path / "routed.pem", tmp_path / "routed-key.pem"
    cert.write_bytes(pki.listener.cert_file.read_bytes())
    key.write_bytes(pki.listener.key_file.read_bytes())
    listen = f"127.0.0.1:{free_port()}"
    text = build_config(
        f'[[upstreams]]\nname = "behind"\ndiscovery = "static"\n'
        f'endpoints = ["127.0.0.1:{plain.port}"]\n\n'
        f'[[listeners]]\nlisten = "{listen}"\n'
        f'routes = [{{ path_prefix = "/", upstream = "behind" }}]\n'
        f'[listeners.listen_tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n',
        admin_listen=f"127.0.0.1:{free_port()}", consul={"address": f"127.0.0.1:{free_port()}"})
    proxy = launch_proxy(text)
    proxies.append(proxy)
    (line,) = [e for e in proxy.events("listening") if e.get("listener") == listen]
    assert line["tls"] == "on", line
    addr = ("127.0.0.1", int(listen.rsplit(":", 1)[1]))
    resp = await fetch(addr, tls=client_context(pki))
    assert (resp.status, resp.text) == (200, "plain")
    assert await asyncio.to_thread(served_serial, addr) == pki.listener.serial
    # Its routes' instances are told the client came over https, as behind an upstream's.
    resp = await fetch(addr, path="/headers", tls=client_context(pki))
    assert json.loads(resp.body)["x-forwarded-proto"] == "https", resp.text

    cert.write_bytes(pki.renewed.cert_file.read_bytes())
    key.write_bytes(pki.renewed.key_file.read_bytes())
    proxy.proc.send_signal(signal.SIGHUP)
    await poll(lambda: proxy.events("reloaded"), "the reload")
    assert await asyncio.to_thread(served_serial, addr) == pki.renewed.serial
    resp = await fetch(addr, tls=client_context(pki))
    assert (resp.status, resp.text) == (200, "plain")
