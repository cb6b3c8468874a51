"""sdproxy against a Consul agent with TLS and ACLs (SPEC "TLS", issue 11 item 2).

One agent of this module's own (not the session's): its API is HTTPS only with
`verify_incoming` (a client must show a certificate from the test's CA, made here with
`cryptography`), and ACLs are on in default-deny. A policy with `service:read` and
`node:read` and a token holding it are made with the master token, which also registers
the instances. No mocks: real Consul, real backends, the real proxy process.

- sdproxy configured by `[consul]` keys (`ca_file`, `cert_file`, `key_file`, `server_name`,
  `token_file`) routes to the instances; a wrong token written into the token file and
  SIGHUP give one clear `catalog_error` line per failure naming the upstream, and the
  last pool keeps serving (its staleness grows); so does a token without `service:read`
  (Consul answers it with an empty list, not 403); the right token again clears it.
- sdproxy configured by Consul's environment variables only (the file spells out
  `address = ""` and `token = ""`, which must not shadow them) routes too.
- The watcher in-process against the same agent: what each TLS or ACL mistake reads like,
  and `reread` (SIGHUP) loading renewed certificate files.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from support import procs
from support.consul import (
    SERVER_NAME,
    CertificateFiles,
    make_certificates,
    register_backend,
    unique_service,
    wait_passing,
)
from support.http import fetch
from support.procs import Backend, ProxyProcess, launch_proxy
from support.tomlconf import build_config, toml_table
from support.watch import QueueSink, ids, running

from proxy.config import ConsulConfig, UpstreamConfig
from proxy.devconsul import AgentTLS, ConsulAgent, free_port
from proxy.discovery.consul import ACL_LACKS, ConsulWatcher
from proxy.model import Address

pytestmark = pytest.mark.timeout(90)

READ_RULES = 'service_prefix "" { policy = "read" }\nnode_prefix "" { policy = "read" }\n'
NODE_ONLY_RULES = 'node_prefix "" { policy = "read" }\n'
WAIT = "2s"  # short blocking queries: a restarted watch answers quickly

StartBackends = Callable[..., list[Backend]]


@dataclass(frozen=True)
class SecuredConsul:
    agent: ConsulAgent
    pem: CertificateFiles
    reader_token: str  # service:read and node:read
    node_only_token: str  # node:read, no service:read


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredConsul]:
    pem = make_certificates(tmp_path_factory.mktemp("consul-tls"))
    tls = AgentTLS(ca_file=str(pem.ca_file), cert_file=str(pem.server_cert),
                   key_file=str(pem.server_key), client_cert=str(pem.client_cert),
                   client_key=str(pem.client_key), verify_incoming=True)
    agent = ConsulAgent(node="tls-acl", tls=tls, acl_master_token=str(uuid.uuid4()))
    try:
        agent.start(timeout=30.0)
        yield SecuredConsul(agent, pem,
                            agent.create_token(READ_RULES, "sdproxy: service:read, node:read"),
                            agent.create_token(NODE_ONLY_RULES, "no service:read"))
    finally:
        agent.cleanup()


@pytest.fixture
def proxies() -> Iterator[list[ProxyProcess]]:
    started: list[ProxyProcess] = []
    yield started
    for proxy in started:
        proxy.cleanup()


def register_two(secured: SecuredConsul, start_backends: StartBackends,
                 prefix: str) -> tuple[str, list[Backend], list[str]]:
    service = unique_service(prefix)
    backends = start_backends(f"{prefix}-a", f"{prefix}-b")
    ids_ = [register_backend(secured.agent, service, b.port,
                             service_id=f"{service}-{b.name}").service_id for b in backends]
    wait_passing(secured.agent, service, ids_)
    return service, backends, ids_


def config_text(service: str, consul: dict[str, Any] | str) -> str:
    """A config whose `[consul]` is `consul` (keys, or a literal TOML table)."""
    table = consul if isinstance(consul, str) else toml_table("[consul]", consul)
    return build_config(table + "\n" + toml_table("[[upstreams]]", {
        "name": service, "listen": f"127.0.0.1:{free_port()}"}),
        admin_listen=f"127.0.0.1:{free_port()}", consul={},
        defaults={"drain_timeout": "2s"})


def launch_with_env(text: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                    ) -> ProxyProcess:
    """`launch_proxy` with `env` added to the child's environment. `_child_env` drops the
    test's own CONSUL_HTTP_ADDR/TOKEN; here they are exactly what is under test."""
    base = procs._child_env
    monkeypatch.setattr(procs, "_child_env", lambda: {**base(), **env})
    try:
        return launch_proxy(text)
    finally:
        monkeypatch.setattr(procs, "_child_env", base)


async def served_by(addr: tuple[str, int], n: int) -> set[str]:
    """`n` GETs through the proxy, each must answer 200; the backends that answered."""
    bodies = set()
    for _ in range(n):
        resp = await fetch(addr, timeout=3.0)
        assert resp.status == 200, (resp.status, resp.text)
        bodies.add(resp.text)
    return bodies


async def wait_event(proxy: ProxyProcess, event: str, pred: Callable[[dict[str, str]], bool],
                     after: int, timeout: float = 10.0) -> dict[str, str]:
    """The first `event` line past the first `after` ones for which `pred` holds."""
    deadline = time.monotonic() + timeout
    while True:
        for line in (await asyncio.to_thread(proxy.events, event))[after:]:
            if pred(line):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no matching event={event} within {timeout}s:\n"
                                 f"{proxy.stderr_tail()}")
        await asyncio.sleep(0.05)


# -- the proxy process, configured by [consul] keys ---------------------------------------
async def test_config_keys_then_wrong_tokens_keep_the_last_pool(
        secured: SecuredConsul, start_backends: StartBackends, proxies: list[ProxyProcess],
        tmp_path: Path) -> None:
    started = time.monotonic()
    service, backends, ids_ = register_two(secured, start_backends, "tlskeys")
    token_file = tmp_path / "consul-token"
    token_file.write_text(secured.reader_token + "\n")
    pem = secured.pem
    proxy = launch_proxy(config_text(service, {
        "address": secured.agent.http_addr, "ca_file": str(pem.ca_file),
        "cert_file": str(pem.client_cert), "key_file": str(pem.client_key),
        "server_name": SERVER_NAME, "token_file": str(token_file), "wait": WAIT}))
    proxies.append(proxy)
    proxy.wait_routable(service, ids_)
    addr = proxy.listen(service)
    assert await served_by(addr, 6) == {b.name for b in backends}
    assert proxy.events("catalog_error") == []

    for token, because in [(str(uuid.uuid4()), "HTTP 403: ACL not found"),
                           (secured.node_only_token,
                            f'service:read on "{service}" is denied')]:
        errors_before = len(proxy.events("catalog_error"))
        token_file.write_text(token + "\n")
        proxy.proc.send_signal(signal.SIGHUP)  # the config, and so the token, is read again
        error = await wait_event(proxy, "catalog_error",
                                 lambda e: e.get("upstream") == service, errors_before)
        print(f"\nlog line: {error}")
        assert error["error"].startswith(f"consul {secured.agent.http_addr}: {ACL_LACKS} (")
        assert because in error["error"]
        assert f"token read from {token_file}" in error["error"]
        # The last pool keeps serving, and the admin API says how stale it is.
        stales = []
        for _ in range(3):
            assert await served_by(addr, 4) == {b.name for b in backends}
            up = await asyncio.to_thread(proxy.upstream, service)
            assert {ep["id"] for ep in up["endpoints"]} == set(ids_)
            assert up["last_error"].startswith(f"consul {secured.agent.http_addr}: {ACL_LACKS}")
            stales.append(up["stale_seconds"])
            await asyncio.sleep(0.3)
        print(f"stale_seconds while refused: {stales}")
        assert 0 < stales[0] < stales[1] < stales[2]
        lines = [e for e in proxy.events("catalog_error")[errors_before:]]
        assert lines and all(e.get("upstream") == service for e in lines)

    token_file.write_text(secured.reader_token + "\n")
    proxy.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10.0
    while (await asyncio.to_thread(proxy.upstream, service))["stale_seconds"] != 0:
        assert time.monotonic() < deadline, proxy.stderr_tail()
        await asyncio.sleep(0.05)
    assert await served_by(addr, 4) == {b.name for b in backends}
    print(f"test ran {time.monotonic() - started:.1f}s")


# -- the proxy process, configured by Consul's environment variables only ----------------
async def test_environment_variables_only(
        secured: SecuredConsul, start_backends: StartBackends, proxies: list[ProxyProcess],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    service, backends, ids_ = register_two(secured, start_backends, "tlsenv")
    pem = secured.pem
    # Spelled-out empty keys, as config/example.toml has them: unset, not "no token".
    consul_table = f'[consul]\naddress = ""\ntoken = ""\nca_file = ""\nwait = "{WAIT}"\n'
    env = {
        "CONSUL_HTTP_ADDR": f"127.0.0.1:{secured.agent.http_port}",  # no scheme: see SSL
        "CONSUL_HTTP_SSL": "true",
        "CONSUL_CACERT": str(pem.ca_file),
        "CONSUL_CLIENT_CERT": str(pem.client_cert),
        "CONSUL_CLIENT_KEY": str(pem.client_key),
        "CONSUL_TLS_SERVER_NAME": SERVER_NAME,
        "CONSUL_HTTP_TOKEN": secured.reader_token,
    }
    proxy = launch_with_env(config_text(service, consul_table), env, monkeypatch)
    proxies.append(proxy)
    proxy.wait_routable(service, ids_)
    assert await served_by(proxy.listen(service), 6) == {b.name for b in backends}
    assert proxy.events("catalog_error") == []

    # CONSUL_HTTP_TOKEN_FILE wins over CONSUL_HTTP_TOKEN, as in Consul's own client; and
    # CONSUL_HTTP_SSL_VERIFY=false needs neither the CA nor the server name.
    token_file = tmp_path / "token"
    token_file.write_text(secured.reader_token)
    unverified = {k: v for k, v in env.items()
                  if k not in ("CONSUL_CACERT", "CONSUL_TLS_SERVER_NAME")}
    proxy = launch_with_env(config_text(service, consul_table), {
        **unverified, "CONSUL_HTTP_TOKEN": "not-this-one",
        "CONSUL_HTTP_TOKEN_FILE": str(token_file), "CONSUL_HTTP_SSL_VERIFY": "false"},
        monkeypatch)
    proxies.append(proxy)
    proxy.wait_routable(service, ids_)
    assert await served_by(proxy.listen(service), 4) == {b.name for b in backends}


# -- the watcher in-process: what each mistake reads like --------------------------------
def watcher_for(secured: SecuredConsul, service: str, sink: QueueSink,
                **changes: Any) -> ConsulWatcher:
    pem = secured.pem
    consul = ConsulConfig(address=secured.agent.http_addr, token=secured.reader_token,
                          wait=2.0, ca_file=str(pem.ca_file), cert_file=str(pem.client_cert),
                          key_file=str(pem.client_key), server_name=SERVER_NAME)
    return ConsulWatcher(replace(consul, **changes),
                         UpstreamConfig(name=service, listen=Address("127.0.0.1", 0)), sink,
                         rng=random.Random(3))


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({}, None),
        ({"verify": False, "ca_file": "", "server_name": ""}, None),
        ({"cert_file": "", "key_file": ""}, "TLS: the agent refused our client certificate"),
        ({"ca_file": "OTHER_CA"}, ("TLS: the agent's certificate did not verify: "
                                  "CERTIFICATE_VERIFY_FAILED")),
        ({"server_name": "other.dc1.consul"}, ("TLS: the agent's certificate did not verify: "
                                              "CERTIFICATE_VERIFY_FAILED: Hostname mismatch")),
        ({"token": "WRONG"}, f"{ACL_LACKS} (HTTP 403: ACL not found)"),
        ({"token": "NODE_ONLY"}, f"{ACL_LACKS} (service:read on "),
        ({"token": ""}, "; no token set)"),
    ],
    ids=["ok", "verify-off", "no-client-cert", "unknown-ca", "wrong-name", "wrong-token",
         "no-service-read", "no-token"],
)
async def test_watcher_tls_and_acl_outcomes(secured: SecuredConsul, changes: dict[str, Any],
                                            error: str | None) -> None:
    service = unique_service("tlsw")
    reg = register_backend(secured.agent, service, free_port())
    stand_ins = {"OTHER_CA": str(secured.pem.other_ca_file), "WRONG": str(uuid.uuid4()),
                 "NODE_ONLY": secured.node_only_token}
    changes = {k: stand_ins.get(v, v) if isinstance(v, str) else v for k, v in changes.items()}
    sink = QueueSink(step=5.0)
    watcher = watcher_for(secured, service, sink, **changes)
    try:
        async with running(watcher):
            if error is None:
                assert ids(await sink.answer_where(lambda a: True)) == {reg.service_id}
            else:
                got = await sink.error()
                print(f"\n{'/'.join(changes) or '-'}: {got}")
                assert got.startswith(f"consul {secured.agent.http_addr}: ")
                assert error in got
                assert sink.answers.empty()  # an error is never an (empty) answer
    finally:
        secured.agent.deregister(reg.service_id)


async def test_sighup_reread_loads_renewed_certificate_files(
        secured: SecuredConsul, tmp_path: Path) -> None:
    """`reread` (what SIGHUP calls when the config is unchanged) loads the files again:
    here the client certificate is replaced by one from a CA the agent does not trust,
    so the requests after `reread` are refused."""
    service = unique_service("tlsrot")
    reg = register_backend(secured.agent, service, free_port())
    cert, key = tmp_path / "client.pem", tmp_path / "client-key.pem"
    cert.write_bytes(secured.pem.client_cert.read_bytes())
    key.write_bytes(secured.pem.client_key.read_bytes())
    sink = QueueSink(step=5.0)
    watcher = watcher_for(secured, service, sink, cert_file=str(cert), key_file=str(key))
    try:
        async with running(watcher):
            assert ids(await sink.answer_where(lambda a: True)) == {reg.service_id}
            stranger = make_certificates(tmp_path / "stranger")
            cert.write_bytes(stranger.client_cert.read_bytes())
            key.write_bytes(stranger.client_key.read_bytes())
            watcher.reread()
            error = await sink.error()
            assert "TLS: the agent refused our client certificate" in error
    finally:
        secured.agent.deregister(reg.service_id)
