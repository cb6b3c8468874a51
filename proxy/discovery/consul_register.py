"""sdproxy in the Consul catalog itself (`[consul] register = true`), as Fabio registers.

Owns the registration of this process with the local Consul agent: service `sdproxy`, id
`sdproxy-<node>-<admin port>` (`<node>`: the agent's node name, so two proxies on two
hosts never share an id), the admin API's address and port, and an HTTP check on
`/ready` every `register_check_interval` (10 s by default). It reaches Consul exactly as
the discovery watcher does (the same `[consul]` address, token, TLS files). Must not
know: pools, listeners; the composition root starts it once the admin API listens and
stops it when the process stops.

Rules:
- Registering is retried with jittered backoff until the agent takes it; afterwards the
  registration is looked at again every check interval and made again when the agent
  lost it (an agent restarted without its state, a `consul services deregister`).
- A clean stop (`stop()`: SIGTERM, SIGINT, or a reload that changes `[consul]` or the
  admin address) deregisters, bounded by `DEREGISTER_TIMEOUT`, while listeners drain.
  A crash deregisters nothing: the check fails, Consul marks the service critical, and
  removes it after `DEREGISTER_CRITICAL_AFTER` of being critical.
- An admin address that is a wildcard (0.0.0.0, ::) is registered as the agent's own
  address (`Member.Addr` of `/v1/agent/self`), the one the agent's check can reach.
- `run()` never raises except CancelledError: every failure is logged
  (`event=self_register_error`) and retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import random
import ssl
from typing import Any
from urllib.parse import quote

import aiohttp

from proxy import __version__
from proxy.config import ConsulConfig
from proxy.discovery.consul import base_url, consul_tls_context
from proxy.discovery.consul_decode import backoff_delay
from proxy.model import Address

SERVICE = "sdproxy"
READY_PATH = "/ready"
CHECK_TIMEOUT_CAP = 5.0  # an HTTP check's timeout: this or the interval, the smaller
DEREGISTER_CRITICAL_AFTER = "10m"  # long enough to be noticed, short enough to not pile up
REQUEST_TIMEOUT = 5.0
DEREGISTER_TIMEOUT = 2.0  # a stop must not wait long on a Consul that does not answer
BACKOFF_BASE = 0.5
BACKOFF_CAP = 10.0

log = logging.getLogger("sdproxy.consul_register")


def service_id(node: str, admin: Address) -> str:
    return f"{SERVICE}-{node}-{admin.port}"


def is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def format_seconds(seconds: float) -> str:
    """A Go duration for Consul: "10s", or milliseconds when fractional."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{max(1, round(seconds * 1000))}ms"


def registration(sid: str, address: str, port: int, interval: float) -> dict[str, Any]:
    """The body of `/v1/agent/service/register` for this proxy."""
    host = f"[{address}]" if ":" in address else address
    return {
        "ID": sid,
        "Name": SERVICE,
        "Address": address,
        "Port": port,
        "Meta": {"version": __version__},
        "Check": {
            "CheckID": f"{sid}:ready",
            "Name": f"sdproxy {READY_PATH}",
            "HTTP": f"http://{host}:{port}{READY_PATH}",
            "Interval": format_seconds(interval),
            "Timeout": format_seconds(min(CHECK_TIMEOUT_CAP, interval)),
            "DeregisterCriticalServiceAfter": DEREGISTER_CRITICAL_AFTER,
        },
    }


class SelfRegistration:
    """Keeps this proxy registered in Consul while it runs; `stop()` deregisters."""

    def __init__(self, consul: ConsulConfig, admin: Address, *,
                 rng: random.Random | None = None) -> None:
        self.consul = consul
        self.admin = admin
        self._rng = rng or random.Random()
        self.address = base_url(consul.address)
        self._headers = {"X-Consul-Token": consul.token} if consul.token else {}
        self._tls: ssl.SSLContext | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        # Read by tests and the log.
        self.service_id: str | None = None  # known once the agent named its node
        self.registered = asyncio.Event()

    def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self._task = asyncio.get_running_loop().create_task(self.run(), name="self-register")

    async def stop(self) -> None:
        """Stop keeping the registration; deregister it (bounded) if it was made."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            if self.service_id is not None and self._session is not None:
                try:
                    await self._request("PUT", "/v1/agent/service/deregister/"
                                        + quote(self.service_id, safe=""),
                                        timeout=DEREGISTER_TIMEOUT)
                    log.info("event=self_deregistered service_id=%s", self.service_id)
                except (aiohttp.ClientError, TimeoutError, OSError, ConsulRefused) as exc:
                    log.warning("event=self_deregister_error service_id=%s error=%s",
                                self.service_id, json.dumps(describe(exc)))
        finally:
            if self._session is not None:
                await self._session.close()

    # -- the loop -------------------------------------------------------------------------
    async def run(self) -> None:
        failures = 0
        while True:
            try:
                await self._ensure_registered()
                failures = 0
                delay = self.consul.register_check_interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - never crash: log, back off, retry
                delay = backoff_delay(failures, self._rng, base=BACKOFF_BASE, cap=BACKOFF_CAP)
                failures += 1
                log.warning("event=self_register_error consul=%s error=%s retry_in=%.3f",
                            self.address, json.dumps(describe(exc)), delay)
            await asyncio.sleep(delay)

    async def _ensure_registered(self) -> None:
        if self.service_id is not None and self.registered.is_set():
            status, _ = await self._get("/v1/agent/service/" + quote(self.service_id, safe=""))
            if status == 200:
                return
            log.warning("event=self_registration_lost service_id=%s status=%d",
                        self.service_id, status)
            self.registered.clear()
        status, me = await self._get("/v1/agent/self")
        if status != 200 or not isinstance(me, dict):
            raise ConsulRefused(f"/v1/agent/self: HTTP {status}")
        node = str(me.get("Config", {}).get("NodeName", ""))
        address = self.admin.host
        if is_wildcard(address):
            address = str(me.get("Member", {}).get("Addr", "")) or "127.0.0.1"
        sid = service_id(node, self.admin)
        body = registration(sid, address, self.admin.port,
                            self.consul.register_check_interval)
        await self._request("PUT", "/v1/agent/service/register", body)
        self.service_id = sid
        self.registered.set()
        log.info("event=self_registered service=%s service_id=%s address=%s check=%s "
                 "interval=%s", SERVICE, sid, f"{address}:{self.admin.port}",
                 body["Check"]["HTTP"], body["Check"]["Interval"])

    # -- requests -------------------------------------------------------------------------
    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.consul.tls:
            return True
        if self._tls is None:
            self._tls = consul_tls_context(self.consul)
        assert self._tls is not None
        return self._tls

    async def _get(self, path: str) -> tuple[int, Any]:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        async with self._session.get(self.address + path, headers=self._headers,
                                     timeout=timeout, ssl=self._ssl(),
                                     server_hostname=self.consul.server_name or None) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text) if resp.status == 200 else text
            except ValueError:
                return resp.status, text

    async def _request(self, method: str, path: str, body: Any = None,
                       timeout: float = REQUEST_TIMEOUT) -> None:
        assert self._session is not None
        limits = aiohttp.ClientTimeout(total=timeout)
        async with self._session.request(method, self.address + path, json=body,
                                         headers=self._headers, timeout=limits,
                                         ssl=self._ssl(),
                                         server_hostname=self.consul.server_name or None
                                         ) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise ConsulRefused(f"{method} {path.split('?')[0]}: HTTP {resp.status}: "
                                    + " ".join(text.split())[:200])


class ConsulRefused(Exception):
    """The agent answered, but not 200 (an ACL token without service:write, ...)."""


def describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "connection refused"
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConsulRefused):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def start_self_registration(consul: ConsulConfig, admin: Address) -> SelfRegistration | None:
    """A started registration when `[consul] register = true`, else None."""
    if not consul.register:
        return None
    registration_ = SelfRegistration(consul, admin)
    registration_.start()
    return registration_
