"""Shared fixtures: a real Consul dev agent, demo backends and the proxy as processes.

Everything runs on loopback. Every process a fixture starts is killed (its whole process
group) at teardown, registrations are removed from the shared agent, and every wait is
bounded. Fixtures, for use by any test:

- `consul` (session): a started `proxy.devconsul.ConsulAgent`.
- `start_backend(name, *, port=0) -> Backend` and `start_backends(*names) -> list[Backend]`.
- `spawn(script, name) -> Backend`: a stand-in backend of the test's own (`python -c
  script`), see `support.procs.launch_script`.
- `service_name(prefix="svc") -> str`: a service name unique in the session's agent.
- `register(backend_or_port, service, **kw) -> Registration`: see
  `support.consul.register_backend`; deregistered at teardown.
- `start_proxy(upstreams, *, defaults=None, consul_wait="10s", workers=1,
  wait_ready=True, timeout=15.0) -> ProxyProcess`: see the fixture's docstring.
- `proxy_for(service, targets, upstream=None, **register_kw) -> (ProxyProcess,
  [Registration])`: targets registered passing, behind a proxy that routes to them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # `from support import ...` however pytest imports us
    sys.path.insert(0, str(TESTS_DIR))

from support.consul import Registration, register_backend, unique_service, wait_passing
from support.procs import (
    Backend,
    BackendTLS,
    ProxyProcess,
    launch_backends,
    launch_proxy,
    launch_script,
)
from support.tomlconf import build_config

from proxy.devconsul import ConsulAgent, free_port

# Defaults every test proxy gets unless the test overrides them: short drains keep
# teardown fast (SPEC: SIGTERM lets in-flight work finish within drain_timeout).
TEST_DEFAULTS: dict[str, Any] = {"drain_timeout": "2s"}


@pytest.fixture(scope="session")
def consul() -> Iterator[ConsulAgent]:
    """One real `consul agent -dev` for the session; tests must use unique service names."""
    agent = ConsulAgent()
    agent.start(timeout=30.0)
    try:
        yield agent
    finally:
        agent.stop()
        try:
            agent.log_path.unlink()
        except OSError:
            pass


@pytest.fixture
def started_backends() -> Iterator[list[Backend]]:
    """Every backend the fixtures below started for a test; all killed at teardown."""
    started: list[Backend] = []
    yield started
    for b in started:
        b.cleanup()


@pytest.fixture
def start_backends(started_backends: list[Backend]) -> Callable[..., list[Backend]]:
    """`start_backends("a", "b", ..., tls=None)`: demo backends started in parallel on free
    ports (with `tls`, a `support.procs.BackendTLS`, serving HTTPS).

    Each is accepting connections when returned; all are killed at teardown.
    """
    def _start(*names: str, host: str = "127.0.0.1", timeout: float = 15.0,
               tls: BackendTLS | None = None) -> list[Backend]:
        backends = launch_backends([(n, 0) for n in names], host=host, timeout=timeout,
                                   tls=tls)
        started_backends.extend(backends)
        return backends

    return _start


@pytest.fixture
def start_backend(started_backends: list[Backend]) -> Callable[..., Backend]:
    """`start_backend(name, *, port=0)`: one demo backend (port 0: a free one)."""
    def _start(name: str, *, port: int = 0, host: str = "127.0.0.1",
               timeout: float = 15.0) -> Backend:
        backend = launch_backends([(name, port)], host=host, timeout=timeout)[0]
        started_backends.append(backend)
        return backend

    return _start


@pytest.fixture
def spawn(started_backends: list[Backend]) -> Callable[[str, str], Backend]:
    """`spawn(script, name)`: run `python -c script` in its own session; it must print
    `event=backend_listening ... port=N` first. Killed (process group) at teardown."""
    def _spawn(script: str, name: str) -> Backend:
        backend = launch_script(script, name)
        started_backends.append(backend)
        return backend

    return _spawn


@pytest.fixture
def service_name() -> Callable[[str], str]:
    """`service_name("web")` -> "web-1a2b3c4d": unique across the shared agent."""
    return unique_service


@pytest.fixture
def register(consul: ConsulAgent) -> Iterator[Callable[..., Registration]]:
    """`register(backend_or_port, service, check="ttl"|"http"|"none", status="passing",
    tags=(), address="127.0.0.1", service_id=None, weight=None, interval="1s")`.

    Service id defaults to `<service>-<backend name or port>`; deregistered at teardown.
    """
    done: list[Registration] = []

    def _register(target: Backend | int, service: str, **kw: Any) -> Registration:
        if isinstance(target, Backend):
            kw.setdefault("service_id", f"{service}-{target.name}")
            port = target.port
        else:
            port = target
        reg = register_backend(consul, service, port, **kw)
        done.append(reg)
        return reg

    yield _register
    for reg in done:
        try:
            consul.deregister(reg.service_id)
        except OSError:
            pass


@pytest.fixture
def start_proxy(consul: ConsulAgent) -> Iterator[Callable[..., ProxyProcess]]:
    """`start_proxy(upstreams, *, defaults=None, consul_wait="10s", workers=1,
    wait_ready=True, timeout=15.0, extra_args=())` -> a started `ProxyProcess`.

    `upstreams`: a mapping `name -> upstream keys` (each without `listen` gets
    `127.0.0.1:<free port>`) or a TOML fragment (`[admin]`/`[consul]` added unless present).
    `[admin] listen` is a free loopback port, `[consul] address` the session agent with
    `wait = consul_wait`; `defaults` is merged over TEST_DEFAULTS into `[defaults]`.
    Returns once every upstream logged `event=listening` and (unless `wait_ready=False`)
    `GET /ready` answered 200; raises `ProxyStartError` with the stderr tail otherwise.
    Every proxy is stopped (SIGTERM, then SIGKILL of its group) at teardown.
    """
    started: list[ProxyProcess] = []

    def _start(upstreams: Mapping[str, Mapping[str, Any]] | str, *,
               defaults: Mapping[str, Any] | None = None, consul_wait: str = "10s",
               workers: int = 1, wait_ready: bool = True, timeout: float = 15.0,
               extra_args: tuple[str, ...] = ()) -> ProxyProcess:
        text = build_config(
            upstreams,
            admin_listen=f"127.0.0.1:{free_port()}",
            consul={"address": consul.http_addr, "wait": consul_wait},
            defaults={**TEST_DEFAULTS, **(defaults or {})},
            listen_for=lambda _name: f"127.0.0.1:{free_port()}",
        )
        proxy = launch_proxy(text, workers=workers, timeout=timeout, wait_ready=wait_ready,
                             extra_args=extra_args)
        started.append(proxy)
        return proxy

    yield _start
    for p in started:
        p.cleanup()


@pytest.fixture
def proxy_for(consul: ConsulAgent, register: Callable[..., Registration],
              start_proxy: Callable[..., ProxyProcess]
              ) -> Callable[..., tuple[ProxyProcess, list[Registration]]]:
    """`proxy_for(service, targets, upstream=None, **register_kw)` -> (proxy, registrations).

    Registers each target under `service` (a Backend, or `(port, id suffix)` for a bare
    port: id `<service>-<suffix>`) with `register(..., **register_kw)`, waits until the
    catalog's passing instances are exactly them, starts a proxy with the upstream
    `{service: upstream}` and returns once it routes to every one of them.
    """
    def _proxy_for(service: str, targets: Sequence[Backend | tuple[int, str]],
                   upstream: Mapping[str, Any] | None = None,
                   **register_kw: Any) -> tuple[ProxyProcess, list[Registration]]:
        regs = []
        for t in targets:
            if isinstance(t, Backend):
                regs.append(register(t, service, **register_kw))
            else:
                port, suffix = t
                regs.append(register(port, service, service_id=f"{service}-{suffix}",
                                     **register_kw))
        ids = {r.service_id for r in regs}
        wait_passing(consul, service, ids)
        proxy = start_proxy({service: dict(upstream or {})})
        proxy.wait_routable(service, ids)
        return proxy, regs

    return _proxy_for
