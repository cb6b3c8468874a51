"""`[consul] register = true`: sdproxy in the Consul catalog itself (SPEC "More registries").

Against the session's real Consul dev agent and sdproxy as a process: the registration
(service `sdproxy`, id `sdproxy-<node>-<admin port>`, the admin address, an HTTP check
on /ready), its removal on SIGTERM, a `kill -9` that leaves the check to turn critical,
and a registration lost by the agent that sdproxy makes again. The check interval is
shortened to 1 s through `register_check_interval` so that every wait stays short.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from support.procs import ProxyProcess
from support.tomlconf import toml_table

from proxy.devconsul import ConsulAgent, free_port

pytestmark = pytest.mark.timeout(60)

StartProxy = Callable[..., ProxyProcess]
INTERVAL = 1.0


def config(consul: ConsulAgent, **consul_keys: Any) -> str:
    return "\n".join([
        toml_table("[consul]", {"address": consul.http_addr, "register": True,
                                "register_check_interval": f"{INTERVAL:g}s", **consul_keys}),
        toml_table("[[upstreams]]", {"name": "static-only", "listen": f"127.0.0.1:{free_port()}",
                                     "discovery": "static", "endpoints": ["127.0.0.1:9"]}),
    ])


def service_id(consul: ConsulAgent, proxy: ProxyProcess) -> str:
    return f"sdproxy-{consul.node}-{proxy.admin_addr[1]}"


def own_check(consul: ConsulAgent, sid: str) -> dict[str, Any] | None:
    checks: dict[str, dict[str, Any]] = consul.get("/v1/agent/checks") or {}
    return next((c for c in checks.values() if c.get("ServiceID") == sid), None)


def wait_until(what: str, probe: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.05)


def status_of(consul: ConsulAgent, sid: str) -> str | None:
    check = own_check(consul, sid)
    return None if check is None else str(check["Status"])


def test_registered_with_a_ready_check_and_deregistered_on_sigterm(
        consul: ConsulAgent, start_proxy: StartProxy) -> None:
    proxy = start_proxy(config(consul))
    sid = service_id(consul, proxy)
    services = wait_until("registered", lambda: (consul.get("/v1/agent/services") or {})
                          .get(sid), timeout=5.0)
    host, port = proxy.admin_addr
    assert (services["Service"], services["Address"], services["Port"]) == ("sdproxy", host,
                                                                            port)
    check = own_check(consul, sid)
    assert check is not None
    assert check["Name"] == "sdproxy /ready"
    assert check["Type"] == "http"
    definition = consul.get(f"/v1/agent/service/{sid}")
    assert definition["ID"] == sid
    # The agent runs the check on /ready; sdproxy is ready (its one upstream answered).
    started = time.monotonic()
    wait_until("check passing", lambda: status_of(consul, sid) == "passing", INTERVAL * 3 + 2)
    print(f"\nregistered as {sid}; check passing {time.monotonic() - started:.2f}s later")
    # Consul 1.8 keeps no check definition to read back; its output names the URL it got.
    output = str((own_check(consul, sid) or {}).get("Output", ""))
    assert f"HTTP GET http://{host}:{port}/ready: 200 OK" in output, output
    assert [e for e in proxy.events("self_registered") if e.get("service_id") == sid]

    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(10) == 0
    assert sid not in (consul.get("/v1/agent/services") or {})  # gone before the exit
    assert [e for e in proxy.events("self_deregistered") if e.get("service_id") == sid]


def test_a_crash_leaves_consul_to_mark_it_critical(consul: ConsulAgent,
                                                   start_proxy: StartProxy) -> None:
    proxy = start_proxy(config(consul))
    sid = service_id(consul, proxy)
    try:
        wait_until("check passing", lambda: status_of(consul, sid) == "passing", 10.0)
        proxy.proc.kill()  # kill -9: nothing deregisters
        proxy.proc.wait(5)
        killed = time.monotonic()
        # Next run of the check: connection refused -> critical (interval + timeout bound).
        wait_until("check critical", lambda: status_of(consul, sid) == "critical",
                   INTERVAL * 3 + 2)
        print(f"\nkill -9 -> Consul marked {sid} critical {time.monotonic() - killed:.2f}s "
              "later; it stays registered (DeregisterCriticalServiceAfter 10m)")
        assert sid in (consul.get("/v1/agent/services") or {})
    finally:
        consul.deregister(sid)


def test_a_lost_registration_is_made_again(consul: ConsulAgent,
                                           start_proxy: StartProxy) -> None:
    proxy = start_proxy(config(consul))
    sid = service_id(consul, proxy)
    wait_until("registered", lambda: sid in (consul.get("/v1/agent/services") or {}), 5.0)
    consul.deregister(sid)  # as `consul services deregister` or an agent that lost state
    wait_until("registered again", lambda: sid in (consul.get("/v1/agent/services") or {}),
               INTERVAL * 3 + 2)
    assert proxy.events("self_registration_lost")


def test_off_by_default(consul: ConsulAgent, start_proxy: StartProxy) -> None:
    proxy = start_proxy({"off": {"discovery": "static", "endpoints": ["127.0.0.1:9"]}})
    sid = service_id(consul, proxy)
    assert not proxy.events("self_registered")
    assert sid not in (consul.get("/v1/agent/services") or {})


def test_reload_turns_it_on_and_off(consul: ConsulAgent, start_proxy: StartProxy) -> None:
    proxy = start_proxy(config(consul, register=False))
    sid = service_id(consul, proxy)
    text = proxy.config_path.read_text()
    assert "register = false" in text
    proxy.config_path.write_text(text.replace("register = false", "register = true"))
    proxy.proc.send_signal(signal.SIGHUP)
    wait_until("registered after SIGHUP",
               lambda: sid in (consul.get("/v1/agent/services") or {}), 5.0)
    proxy.config_path.write_text(text)
    proxy.proc.send_signal(signal.SIGHUP)
    wait_until("deregistered after SIGHUP",
               lambda: sid not in (consul.get("/v1/agent/services") or {}), 5.0)
    assert proxy.proc.poll() is None
