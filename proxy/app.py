"""Composition root: wire watchers, pools, listeners and the admin API; signals; workers.

Start order: one watcher per upstream, a short bounded wait for the first catalog
answers (so the first requests find a pool, as Fabio waits for its first table), then
the listeners (one log line each once it accepts), then the admin API.

Signals (SPEC):
- SIGHUP re-reads the config. Upstreams are matched by name: a new one is started, a
  removed one stops accepting at once and drains (in-flight work gets `drain_timeout`), one
  whose `listen` or `mode` changed is replaced that way; any other change is applied in
  place, so its listener keeps its connections and its instances keep their state (the
  watcher restarts only when what it asks the catalog changed). A config that does not
  load is rejected with one log line and the running one stays.
- SIGTERM/SIGINT (and SIGQUIT, nginx's graceful stop) close every listener at once, give
  in-flight work up to the largest `drain_timeout`, and exit 0.
- SIGHUP also re-reads the TLS files (SPEC "TLS"): a listener's certificate
  (`listen_tls`) is loaded into its live context, so new handshakes get it and open
  connections keep theirs; the upstreams' client contexts are rebuilt. A file that does
  not load rejects the reload (as any invalid config) and the old certificate serves on.
- SIGUSR1 reopens the access log file (logrotate renames it, then signals, as for nginx).
- SIGUSR2 is ignored with a log line: no signal a user may send by habit kills sdproxy
  without draining.

Logging (`[log]`): the level (`--log-level`, through $SDPROXY_LOG_LEVEL, wins over the
file, across reloads and in every worker) and format of sdproxy's own lines, and the access log, which every listener gets as
`listener.access` (None when off). A reload that changes `[log]` applies it: a new access
log replaces the old one in every listener, and the old one writes what it holds, then
closes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
import uvloop

from proxy import config as config_mod
from proxy import logs
from proxy.accesslog import AccessLog
from proxy.config import ACCESS_OFF, Config, ListenerConfig, LogConfig, UpstreamConfig
from proxy.discovery import Rereadable
from proxy.discovery.catalog_routes import CatalogRoutesWatch, TagRoute
from proxy.discovery.consul_register import SelfRegistration, start_self_registration
from proxy.discovery.registry import UnsupportedDiscovery, make_watcher
from proxy.model import Address, CatalogAnswer, Endpoint
from proxy.protocols import Listener, make_listener
from proxy.protocols.http import HttpListener
from proxy.routing import Route
from proxy.tls import ORIGINATIONS, ServingCertificate, TlsFileError
from proxy.upstream.balancers import make_balancer
from proxy.upstream.health import HealthChecker
from proxy.upstream.manager import UpstreamRuntime

log = logging.getLogger("sdproxy.app")

FIRST_ANSWER_WAIT = 3.0  # seconds to wait for first catalog answers before listening
# Consul's default `limits { http_max_conns_per_client }`: the agent resets connections
# from one address beyond it, and every blocking query (watch) holds one.
CONSUL_CONNS_PER_CLIENT = 200
WATCHES_WARN_ABOVE = 190  # sdproxy's watches past this: one warning line
ACCESS_CLOSE_TIMEOUT = 2.0  # seconds the access log gets to write what it holds at a stop
DRAIN_POLL = 0.02  # how often a drain looks whether in-flight work has finished

# Upstream keys that change what the watcher asks the catalog: a change restarts it.
_DISCOVERY_KEYS = ("discovery", "tags", "include_warning", "datacenters", "endpoints", "file",
                   "dns_type", "port")


class StartupError(Exception):
    """A failure to start that the user can act on (exit code 1)."""


@dataclass
class Served:
    """Everything that serves one upstream."""

    runtime: UpstreamRuntime
    watcher: object
    watch_task: asyncio.Task[None]
    listener: Listener | None = None
    server: asyncio.base_events.Server | None = None
    draining: list[asyncio.Task[None]] = field(default_factory=list)
    health: HealthChecker | None = None  # follows [upstreams.health] through reloads
    serving: ServingCertificate | None = None  # [upstreams.listen_tls]; SIGHUP reloads it


@dataclass
class RoutedListener:
    """A `[[listeners]]` entry being served: one port, a route table over the upstreams."""

    config: ListenerConfig
    runtime: UpstreamRuntime  # its own: connection limits and its own answers (404)
    listener: HttpListener
    server: asyncio.base_events.Server | None = None
    # catalog_routes: the watch, and the tag routes it last reported, by service.
    catalog_task: asyncio.Task[None] | None = None
    tag_routes: dict[str, tuple[TagRoute, ...]] = field(default_factory=dict)
    tags_seen: asyncio.Event = field(default_factory=asyncio.Event)
    serving: ServingCertificate | None = None  # its listen_tls; SIGHUP reloads it
    # What the table was last built from: a change that leaves it equal builds nothing.
    table_input: list[tuple[Route, UpstreamRuntime]] = field(default_factory=list)
    # The table entries of each routed service's tags, made once per change of its tags
    # or runtime (the same objects each time: comparing table_input is identity checks).
    tag_route_objects: dict[str, tuple[tuple[TagRoute, ...], UpstreamRuntime,
                                       tuple[tuple[Route, UpstreamRuntime], ...]]] = field(
        default_factory=dict)


class AnswerSink:
    """The sink of a catalog upstream's watcher: passes everything on to its runtime, and
    tells the app when the first answer came (its routes can be added then, not at the
    next poll)."""

    def __init__(self, runtime: UpstreamRuntime, on_first_answer: Callable[[], None]) -> None:
        self.runtime = runtime
        self._on_first_answer: Callable[[], None] | None = on_first_answer

    def on_catalog_answer(self, answer: CatalogAnswer) -> None:
        self.runtime.on_catalog_answer(answer)
        first, self._on_first_answer = self._on_first_answer, None
        if first is not None:
            first()

    def on_catalog_error(self, error: str) -> None:
        self.runtime.on_catalog_error(error)

    def on_catalog_alive(self) -> None:
        self.runtime.on_catalog_alive()

    def on_catalog_down(self, down: Iterable[tuple[Endpoint, str]]) -> None:
        self.runtime.on_catalog_down(down)


class ProxyApp:
    def __init__(self, config: Config, *, reuse_port: bool = False, admin: bool = True) -> None:
        self.config = config
        self.reuse_port = reuse_port
        self.with_admin = admin
        self.served: dict[str, Served] = {}
        # What the admin API reads, replaced whole on every change.
        self.upstreams: dict[str, UpstreamRuntime] = {}
        self.listeners: dict[str, Listener] = {}
        self.admin_runner: object | None = None
        self.started_at = time.time()
        self.stop_requested = asyncio.Event()
        self.retiring: set[asyncio.Task[None]] = set()
        self.self_registration: SelfRegistration | None = None  # [consul] register = true
        self.access: AccessLog | None = None  # what every listener writes its lines to
        # [[listeners]] by address, and the upstreams their catalog routes made (by name).
        self.routed: dict[Address, RoutedListener] = {}
        self.catalog_served: dict[str, Served] = {}
        # One HTTP session (connection pool) for every Consul watch of this app; made at
        # the first watch, closed by stop().
        self.consul_session: aiohttp.ClientSession | None = None
        # The jitter of every Consul watch's backoff and every catalog upstream's health
        # probes: a random.Random holds 2.5 KiB of state, two per routed service else.
        self.rng = random.Random()
        self.watches_warned = False  # the near-the-agent's-limit warning is out
        self.routes_refresh: asyncio.Handle | None = None  # a table rebuild scheduled

    # -- start --------------------------------------------------------------------------
    async def start(self) -> None:
        self.access = open_access_log(self.config.log)
        for up in self.config.upstreams:
            self.served[up.name] = self._watch(up, UpstreamRuntime(up))
        self._publish()
        await self._wait_first_answers(FIRST_ANSWER_WAIT, list(self.served))
        for name in list(self.served):
            await self._listen(name)
        for lc in self.config.listeners:
            await self._open_routed(lc)
        self._publish()
        self._warn_near_watch_limit()  # configured Consul upstreams count too
        if self.with_admin:
            await self._start_admin()
            self.self_registration = start_self_registration(self.config.consul,
                                                             self.config.admin.listen)

    def _watch(self, up: UpstreamConfig, runtime: UpstreamRuntime,
               sink: AnswerSink | None = None) -> Served:
        # Consul watches share one session (a session per watch costs about 7 KiB more
        # per watch, hundreds of times over with catalog routes) and one rng.
        shared = ({"session": self._consul_session(), "rng": self.rng}
                  if up.discovery == "consul" else {})
        try:
            watcher = make_watcher(self.config, up, sink or runtime, **shared)
        except UnsupportedDiscovery as e:
            raise StartupError(str(e)) from None
        task = asyncio.get_running_loop().create_task(watcher.run(), name=f"watch-{up.name}")
        return Served(runtime, watcher, task)

    async def _listen(self, name: str) -> None:
        served = self.served[name]
        runtime = served.runtime
        addr = runtime.config.listen
        if addr is None:  # reached only through the routes of [[listeners]]
            if runtime.config.tls is not None:
                try:
                    ORIGINATIONS.prepare(runtime.config.tls)
                except TlsFileError as e:  # checked by config.load; replaced since, then
                    raise StartupError(f"upstream {name}: tls.{e.key}: {e.reason}") from None
            served.health = HealthChecker(runtime)
            served.health.start()
            return
        loop = asyncio.get_running_loop()
        try:
            listener = make_listener(runtime, loop)
        except KeyError as e:
            raise StartupError(f"upstream {name}: {e.args[0]}") from None
        if hasattr(listener, "access"):
            listener.access = self.access
        up = runtime.config
        table = "tls"
        try:
            # Built before the first connection needs them: files are read here, once.
            if up.tls is not None:
                ORIGINATIONS.prepare(up.tls)
            table = "listen_tls"
            serving = ServingCertificate(name, up.listen_tls) if up.listen_tls else None
        except TlsFileError as e:  # checked by config.load; replaced since, then
            listener.close_all()
            raise StartupError(f"upstream {name}: {table}.{e.key}: {e.reason}") from None
        try:
            # A client that never finishes its handshake is held no longer than one
            # that never finishes its request head.
            server = await loop.create_server(
                listener.protocol_factory, addr.host, addr.port, reuse_address=True,
                reuse_port=self.reuse_port, backlog=1024,
                ssl=serving.context if serving else None,
                ssl_handshake_timeout=up.header_timeout if serving else None)
        except OSError as e:
            listener.close_all()
            raise cannot_listen(f"upstream {name}", addr, e) from None
        served.listener, served.server, served.serving = listener, server, serving
        served.health = HealthChecker(runtime)
        served.health.start()
        log.info("event=listening upstream=%s listen=%s mode=%s discovery=%s tls=%s "
                 "upstream_tls=%s", name, addr, up.mode, up.discovery,
                 "on" if serving else "off", "on" if up.tls else "off")

    async def _start_admin(self) -> None:
        from proxy.admin.server import start_admin

        listen = self.config.admin.listen
        try:
            self.admin_runner = await start_admin(self, listen)
        except OSError as e:
            raise cannot_listen("admin", listen, e) from None
        log.info("event=admin_listening listen=%s", listen)

    def _publish(self) -> None:
        # A routed listener is listed too, as "listener ADDR": its connections, its own
        # answers (404) and its routes (proxy.admin.state.routes_of).
        self.upstreams = {n: s.runtime for n, s in [*self.catalog_served.items(),
                                                    *self.served.items()]}
        self.listeners = {n: s.listener for n, s in self.served.items() if s.listener}
        for routed in self.routed.values():
            self.upstreams[routed.runtime.name] = routed.runtime
            self.listeners[routed.runtime.name] = routed.listener

    async def _wait_first_answers(self, timeout: float, names: list[str]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not all(self.served[n].runtime.answered for n in names):
            if loop.time() >= deadline:
                missing = [n for n in names if not self.served[n].runtime.answered]
                log.warning("event=first_answer_missing upstreams=%s", ",".join(missing))
                return
            await asyncio.sleep(0.01)  # startup only: watchers have no "answered" event

    # -- reload -------------------------------------------------------------------------
    async def reload(self) -> None:
        try:
            new = config_mod.load(self.config.path, os.environ)
        except config_mod.ConfigError as e:
            log.error('event=reload_rejected config=%s problems="%s"', self.config.path,
                      "; ".join(p.replace('"', "'") for p in e.problems))
            return
        old, self.config = self.config, new
        if new.log != old.log:
            self._apply_log(new.log)
        wanted = {up.name: up for up in new.upstreams}
        # Renewed client certificates and CAs: new connections use them from now on.
        ORIGINATIONS.reload([up.tls for up in new.upstreams if up.tls is not None])
        shared_changed = {"consul": old.consul != new.consul, "dns": old.dns != new.dns,
                          "etcd": old.etcd != new.etcd,
                          "zookeeper": old.zookeeper != new.zookeeper}
        added, removed, changed = [], [], []
        for name in [n for n in self.served if n not in wanted]:
            self._retire(name)
            removed.append(name)
        for name, up in wanted.items():
            served = self.served.get(name)
            if served is None:
                added.append(name)
            elif _listener_shape(up) != _listener_shape(served.runtime.config):
                self._retire(name)  # a new address, protocol or TLS on/off: a new listener
                added.append(name)
            elif up != served.runtime.config or shared_changed.get(up.discovery, False):
                self._reconfigure(served, up, shared_changed)
                changed.append(name)
            elif isinstance(served.watcher, Rereadable):
                served.watcher.reread()  # SIGHUP also means "look at the file again"
            if name not in added and served is not None and served.serving is not None \
                    and up.listen_tls is not None:
                served.serving.reload(up.listen_tls)  # the files may have been renewed
        for name in added:
            self.served[name] = self._watch(wanted[name], UpstreamRuntime(wanted[name]))
        self._publish()
        await self._wait_first_answers(FIRST_ANSWER_WAIT, added)
        failed = []
        for name in added:
            try:
                await self._listen(name)
            except StartupError as e:
                log.error('event=reload_listen_failed upstream=%s error="%s"', name, e)
                self._retire(name)
                failed.append(name)
        self._publish()
        await self._reload_routed(old, new)
        if self.with_admin and old.admin.listen != new.admin.listen:
            await self._restart_admin()
        if self.with_admin and (old.consul, old.admin) != (new.consul, new.admin):
            if self.self_registration is not None:
                await self.self_registration.stop()
            self.self_registration = start_self_registration(new.consul, new.admin.listen)
        log.info("event=reloaded config=%s added=%s removed=%s changed=%s failed=%s",
                 new.path, ",".join(added) or "-", ",".join(removed) or "-",
                 ",".join(changed) or "-", ",".join(failed) or "-")

    def _apply_log(self, cfg: LogConfig) -> None:
        """A reload changed [log]: the event log's level and format now; the access log is
        replaced in every listener (new lines go to the new one at once) and the old one
        closes once it wrote what it holds, off the event loop."""
        logs.setup(cfg.level, cfg.format)
        old = self.access
        if old is not None and (old.destination, old.format) == (cfg.access, cfg.access_format):
            return
        self.access = open_access_log(cfg)
        for served in self.served.values():
            if served.listener is not None and hasattr(served.listener, "access"):
                served.listener.access = self.access
        for routed in self.routed.values():
            routed.listener.access = self.access
        if old is not None:
            self._close_access_later(old)
        log.info("event=access_log_configured access=%s format=%s", cfg.access,
                 cfg.access_format)

    def _close_access_later(self, access: AccessLog) -> None:
        task = asyncio.get_running_loop().create_task(close_access_log(access),
                                                      name="access-log-close")
        self.retiring.add(task)  # keep a reference until it ends; stop() awaits it
        task.add_done_callback(self.retiring.discard)

    def _reconfigure(self, served: Served, up: UpstreamConfig,
                     shared_changed: dict[str, bool]) -> None:
        """Apply a changed upstream in place: its listener and its hosts stay."""
        runtime = served.runtime
        before = runtime.config
        runtime.config = up
        if up.balance != before.balance:
            runtime.balancer = make_balancer(up.balance, clock=runtime.monotonic)
        if up.tls != before.tls:  # pooled connections speak the old way: not reused
            for host in runtime.all_hosts():
                host.pool.close_all()
        if served.listener is not None and hasattr(served.listener, "reconfigure"):
            served.listener.reconfigure(up)
        if served.health is not None and up.health != before.health:
            served.health.wake()  # off, it sleeps until told: checks may be on now
        asks_differently = any(getattr(up, k) != getattr(before, k) for k in _DISCOVERY_KEYS)
        if asks_differently or shared_changed.get(up.discovery, False):
            served.watch_task.cancel()
            fresh = self._watch(up, runtime)
            served.watcher, served.watch_task = fresh.watcher, fresh.watch_task

    def _retire(self, name: str) -> None:
        """Stop accepting for `name` now; drain its in-flight work in the background."""
        self._retire_served(name, self.served.pop(name))

    def _retire_served(self, name: str, served: Served) -> None:
        served.watch_task.cancel()
        if served.health is not None:
            served.health.stop()
        if served.server is not None:
            served.server.close()
        task = asyncio.get_running_loop().create_task(self._drain(served), name=f"drain-{name}")
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)

    async def _drain(self, served: Served) -> None:
        listener = served.listener
        loop = asyncio.get_running_loop()
        deadline = loop.time() + served.runtime.config.drain_timeout
        runtime = served.runtime
        # An upstream reached only through routes has no listener of its own: its own
        # requests in flight are what the drain waits for.
        while ((listener.busy() if listener is not None else runtime.in_flight > 0)
               and loop.time() < deadline):
            await asyncio.sleep(DRAIN_POLL)  # bounded by drain_timeout
        if listener is not None:
            listener.close_all()
        for host in served.runtime.all_hosts():
            host.pool.close_all()
        log.info("event=upstream_stopped upstream=%s", served.runtime.name)

    async def _restart_admin(self) -> None:
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()  # type: ignore[attr-defined]
            self.admin_runner = None
        try:
            await self._start_admin()
        except StartupError as e:
            log.error('event=admin_restart_failed error="%s"', e)

    # -- routed listeners ([[listeners]]) ------------------------------------------------
    #
    # A routed listener is an HttpListener whose own runtime has no instances (it holds
    # the connection limits of [defaults] and counts its own 404s) and whose route table
    # picks each request's upstream. Every change (a reload, a catalog tag) builds a new
    # table from the current runtimes and swaps it in one assignment; open connections and
    # requests already routed are untouched.

    async def _open_routed(self, lc: ListenerConfig) -> None:
        loop = asyncio.get_running_loop()
        cfg = dataclasses.replace(lc.defaults, name=f"listener {lc.listen}", discovery="none")
        runtime = UpstreamRuntime(cfg)
        runtime.answered = True  # nothing to wait for: it has no catalog
        routed = RoutedListener(lc, runtime, HttpListener(runtime, loop))
        routed.listener.access = self.access
        self.routed[lc.listen] = routed
        self._set_routes(routed)
        if lc.catalog_routes:
            self._start_catalog_routes(routed)
            # As at start: the first table before the first client, within a bound.
            try:
                await asyncio.wait_for(routed.tags_seen.wait(), FIRST_ANSWER_WAIT)
            except TimeoutError:
                log.warning("event=catalog_routes_missing listen=%s", lc.listen)
            await self._wait_catalog_answers(list(self.catalog_served))
        listen_tls = lc.defaults.listen_tls
        try:
            if listen_tls is not None:
                routed.serving = ServingCertificate(runtime.name, listen_tls)
        except TlsFileError as e:  # checked by config.load; replaced since, then
            self._close_routed(lc.listen)
            raise StartupError(f"listener {lc.listen}: listen_tls.{e.key}: {e.reason}") from None
        serving = routed.serving
        try:
            routed.server = await loop.create_server(
                routed.listener.protocol_factory, lc.listen.host, lc.listen.port,
                reuse_address=True, reuse_port=self.reuse_port, backlog=1024,
                ssl=serving.context if serving else None,
                ssl_handshake_timeout=lc.defaults.header_timeout if serving else None)
        except OSError as e:
            self._close_routed(lc.listen)
            raise cannot_listen(f"listener {lc.listen}", lc.listen, e) from None
        log.info("event=listening listener=%s routes=%d catalog_routes=%s tls=%s", lc.listen,
                 len(lc.routes), str(lc.catalog_routes).lower(), "on" if serving else "off")

    def _set_routes(self, routed: RoutedListener, renew: bool = False) -> None:
        """Build `routed`'s table from the current runtimes: configured routes first (they
        win over a tag route with the same host and prefix), then the tag routes of
        services whose catalog answered (a route with no pool yet would only 503).

        Nothing is built when the routes and their runtimes are the ones of the table in
        force (a tag change of another listener, a service that has not answered yet).
        `renew` (a reload: configs may have changed in place) builds the table and every
        upstream's ExchangePolicy afresh; otherwise an upstream already routed keeps its
        policy."""
        routes: list[tuple[Route, UpstreamRuntime]] = []
        for rc in routed.config.routes:
            runtime = self._runtime_of(rc.upstream)
            if runtime is not None:
                routes.append((Route(rc.host, rc.path_prefix, rc.upstream, rc.strip_prefix),
                               runtime))
        made = routed.tag_route_objects
        for service in [s for s in made if s not in routed.tag_routes]:
            del made[service]
        served_get, catalog_get = self.served.get, self.catalog_served.get  # per service
        for service, tag_routes in sorted(routed.tag_routes.items()):
            served = served_get(service) or catalog_get(service)
            if served is None or not served.runtime.answered:
                continue
            runtime = served.runtime
            entry = made.get(service)
            if entry is None or entry[0] is not tag_routes or entry[1] is not runtime:
                entry = made[service] = (tag_routes, runtime, tuple(
                    (Route(tag.host or "", tag.path_prefix, service, source="catalog"),
                     runtime) for tag in tag_routes))
            routes += entry[2]
        if routes == routed.table_input and not renew and routed.listener.routes is not None:
            return  # same routes to the same runtimes: the table in force is right
        routed.listener.set_routes(routes, keep_policies=not renew)
        routed.table_input = routes

    def _routable(self, name: str) -> bool:
        """Whether a table may hold (or get) routes to this upstream: it has answered."""
        runtime = self._runtime_of(name)
        return runtime is not None and runtime.answered

    def _runtime_of(self, name: str) -> UpstreamRuntime | None:
        """The runtime of an upstream by name: a configured one wins over a catalog one."""
        served = self.served.get(name) or self.catalog_served.get(name)
        return served.runtime if served is not None else None

    @property
    def dynamic_upstreams(self) -> frozenset[str]:
        """Upstreams made for catalog routes: /ready does not wait for them (a service
        that registers must not make the proxy unready while its first answer comes)."""
        return frozenset(self.catalog_served)

    def _refresh_all_routes(self, renew: bool = False) -> None:
        if self.routes_refresh is not None:  # done now: the scheduled one has nothing left
            self.routes_refresh.cancel()
            self.routes_refresh = None
        for routed in self.routed.values():
            self._set_routes(routed, renew)

    def _schedule_routes_refresh(self) -> None:
        """Rebuild the tables at the next loop iteration: the catalog upstreams that
        answered meanwhile (hundreds at start) are added by one rebuild, not one each."""
        if self.routes_refresh is None:
            self.routes_refresh = asyncio.get_running_loop().call_soon(self._scheduled_refresh)

    def _scheduled_refresh(self) -> None:
        self.routes_refresh = None
        self._refresh_all_routes()

    def _consul_session(self) -> aiohttp.ClientSession:
        """The app's one session for Consul. No limit on its pool: each watch holds one
        connection for its blocking query, so the watches are what bound it (aiohttp's
        default of 100 would queue the 101st watch behind the others' long polls)."""
        if self.consul_session is None or self.consul_session.closed:
            self.consul_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0))
        return self.consul_session

    def _start_catalog_routes(self, routed: RoutedListener) -> None:
        def on_change(mapping: dict[str, tuple[TagRoute, ...]]) -> None:
            if self.routed.get(routed.config.listen) is not routed:
                return  # closed or replaced meanwhile
            before, routed.tag_routes = routed.tag_routes, dict(mapping)
            routed.tags_seen.set()
            # The watch hands an unchanged service's routes as the same tuple.
            touched = [s for s in before.keys() | mapping.keys()
                       if before.get(s) is not mapping.get(s)]
            self._sync_catalog_upstreams(touched=touched)

        watch = CatalogRoutesWatch(self.config.consul, routed.config.tag_prefix, on_change,
                                   session=self._consul_session())
        routed.catalog_task = asyncio.get_running_loop().create_task(
            watch.run(), name=f"catalog-routes-{routed.config.listen}")

    def _sync_catalog_upstreams(self, renew: bool = False,
                                touched: list[str] | None = None) -> None:
        """One upstream (Consul discovery, the listener's defaults) per service that some
        listener's tags route to and the config does not name; started and stopped as
        the tags change. A new one's routes appear once its catalog answered (its sink
        schedules the rebuild). Costs set operations over the names, and a config only
        for the services added. `touched`: the only services whose tags changed; when
        none of them is routable yet (a new service, until its first answer), no table
        can change and none is looked at."""
        wanted: set[str] = set()
        for routed in self.routed.values():
            wanted.update(routed.tag_routes)
        wanted.difference_update(self.served)
        added = sorted(wanted.difference(self.catalog_served))
        removed = sorted(set(self.catalog_served).difference(wanted))
        for name in added:
            defaults = next(r.config.defaults for r in self.routed.values()
                            if name in r.tag_routes)
            up = dataclasses.replace(defaults, name=name, listen=None, discovery="consul")
            runtime = UpstreamRuntime(up)
            served = self.catalog_served[name] = self._watch(
                up, runtime, AnswerSink(runtime, self._schedule_routes_refresh))
            if up.health is not None:  # fixed for its life: a reload does not change it
                # (without, a checker would still wake each second: hundreds of wake-ups
                # a second with hundreds of routed services)
                served.health = HealthChecker(served.runtime, rng=self.rng)
                served.health.start()
        if touched is None or renew or any(self._routable(name) for name in touched):
            self._refresh_all_routes(renew)  # routes to removed services go before they stop
        for name in removed:
            self._retire_served(name, self.catalog_served.pop(name))
        if added or removed or renew:
            self._publish()
        if added or removed:
            log.info("event=catalog_upstreams added=%s removed=%s", ",".join(added) or "-",
                     ",".join(removed) or "-")
            self._warn_near_watch_limit()

    def _warn_near_watch_limit(self) -> None:
        """One warning line when sdproxy's watches (one connection to the agent each)
        pass WATCHES_WARN_ABOVE, again only after they fell back below it."""
        watches = self._consul_watches()
        if watches <= WATCHES_WARN_ABOVE:
            self.watches_warned = False
        elif not self.watches_warned:
            self.watches_warned = True
            log.warning('event=consul_watches_near_limit watches=%d agent_default_limit=%d '
                        'hint="each watch holds one connection to the Consul agent, which '
                        'resets connections from one address beyond limits { '
                        'http_max_conns_per_client } (default %d): raise it on the agent"',
                        watches, CONSUL_CONNS_PER_CLIENT, CONSUL_CONNS_PER_CLIENT)

    def _consul_watches(self) -> int:
        """Blocking queries this app holds on the agent: one per catalog upstream, per
        datacenter of a configured Consul upstream, per listener's service-list watch."""
        configured = sum(max(1, len(s.runtime.config.datacenters))
                         for s in self.served.values()
                         if s.runtime.config.discovery == "consul")
        listeners = sum(1 for r in self.routed.values() if r.catalog_task is not None)
        return len(self.catalog_served) + configured + listeners

    async def _wait_catalog_answers(self, names: list[str]) -> None:
        """Until each of these catalog upstreams answered (or is gone), within a bound."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FIRST_ANSWER_WAIT
        while loop.time() < deadline:
            waiting = [n for n in names if n in self.catalog_served
                       and not self.catalog_served[n].runtime.answered]
            if not waiting:
                return
            await asyncio.sleep(0.005)  # start only; bounded

    async def _reload_routed(self, old: Config, new: Config) -> None:
        """Apply a reload to the routed listeners: matched by address, a changed one keeps
        its socket and connections; every table is rebuilt on the reloaded upstreams."""
        wanted = {lc.listen: lc for lc in new.listeners}
        for listen in [a for a in self.routed if a not in wanted]:
            self._close_routed(listen)
        for listen, lc in wanted.items():
            routed = self.routed.get(listen)
            if routed is not None and (lc.defaults.listen_tls is None) != (routed.serving is None):
                self._close_routed(listen)  # TLS on or off: a new socket, as for an upstream
                routed = None
            if routed is None:
                try:
                    await self._open_routed(lc)
                except StartupError as e:
                    log.error('event=reload_listen_failed listener=%s error="%s"', listen, e)
                continue
            before, routed.config = routed.config, lc
            if routed.serving is not None and lc.defaults.listen_tls is not None:
                routed.serving.reload(lc.defaults.listen_tls)  # the files may have been renewed
            if lc.defaults != before.defaults:
                routed.runtime.config = dataclasses.replace(
                    lc.defaults, name=routed.runtime.name, discovery="none")
                routed.listener.reconfigure(routed.runtime.config)
            if (lc.catalog_routes, lc.tag_prefix) != (before.catalog_routes, before.tag_prefix) \
                    or new.consul != old.consul:
                if routed.catalog_task is not None:
                    routed.catalog_task.cancel()
                    routed.catalog_task = None
                routed.tag_routes = {}
                if lc.catalog_routes:
                    self._start_catalog_routes(routed)
        self._sync_catalog_upstreams(renew=True)  # configs may have changed in place

    def _close_routed(self, listen: Address, stopping: bool = False) -> None:
        """Stop accepting on a routed listener now; drain its requests in the background.
        Its table stays as it is: a kept-alive client's next request is still routed
        while the listener drains (`stopping`: every table stays, nothing is rebuilt)."""
        routed = self.routed.pop(listen)
        if routed.catalog_task is not None:
            routed.catalog_task.cancel()
        if routed.server is not None:
            routed.server.close()
        if not stopping:
            self._sync_catalog_upstreams()
        task = asyncio.get_running_loop().create_task(self._drain_routed(routed),
                                                      name=f"drain-{listen}")
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)

    async def _drain_routed(self, routed: RoutedListener) -> None:
        listener = routed.listener
        loop = asyncio.get_running_loop()
        deadline = loop.time() + routed.config.defaults.drain_timeout
        while listener.busy() and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL)  # bounded by drain_timeout
        listener.close_all()
        log.info("event=listener_stopped listener=%s", routed.config.listen)

    # -- stop ---------------------------------------------------------------------------
    async def stop(self) -> None:
        """Close listeners at once, let in-flight work finish within drain_timeout."""
        for name in list(self.served):
            self._retire(name)
        for listen in list(self.routed):
            self._close_routed(listen, stopping=True)
        for name in list(self.catalog_served):
            self._retire_served(name, self.catalog_served.pop(name))
        if self.self_registration is not None:  # while the listeners drain
            await self.self_registration.stop()
            self.self_registration = None
        await asyncio.gather(*list(self.retiring), return_exceptions=True)
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()  # type: ignore[attr-defined]
        if self.routes_refresh is not None:
            self.routes_refresh.cancel()
        if self.consul_session is not None:  # every watch was cancelled above
            await self.consul_session.close()
        access, self.access = self.access, None
        if access is not None:  # the drained requests' lines are queued: write them
            await close_access_log(access)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        loop.add_signal_handler(signal.SIGUSR1, self._on_reopen_signal)
        loop.add_signal_handler(signal.SIGUSR2, ignore_signal, signal.SIGUSR2)
        try:
            await self.start()
            await self.stop_requested.wait()
        finally:
            await self.stop()
            log.info("event=stopped")

    def _on_stop_signal(self, sig: int) -> None:
        log.info("event=stopping signal=%s", signal.Signals(sig).name)
        self.stop_requested.set()

    def _on_reopen_signal(self) -> None:
        access = self.access
        log.info("event=reopening_logs signal=SIGUSR1 access=%s",
                 access.destination if access is not None else ACCESS_OFF)
        if access is not None:
            access.reopen()  # the writer thread reopens the path; this returns at once

    def _on_reload_signal(self) -> None:
        log.info("event=reloading signal=SIGHUP config=%s", self.config.path)
        task = asyncio.get_running_loop().create_task(self.reload(), name="reload")
        self.retiring.add(task)  # keep a reference until it ends
        task.add_done_callback(self.retiring.discard)


def _listener_shape(up: UpstreamConfig) -> tuple[object, ...]:
    """What the listening socket itself is made of: a change needs a new listener."""
    return up.listen, up.mode, up.listen_tls is not None


# Signals that stop sdproxy with a drain. SIGQUIT (Ctrl-\) would otherwise kill it on
# the spot; nginx reads it as a graceful stop too.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def ignore_signal(sig: int) -> None:
    log.info("event=signal_ignored signal=%s", signal.Signals(sig).name)


def open_access_log(cfg: LogConfig) -> AccessLog | None:
    """The access log [log] asks for, its writer thread started; None when off."""
    if cfg.access == ACCESS_OFF:
        return None
    return AccessLog(cfg.access, cfg.access_format)


async def close_access_log(access: AccessLog) -> None:
    """Let `access` write what it holds and close, in a thread (it may wait on a disk)."""
    if not await asyncio.to_thread(access.close, ACCESS_CLOSE_TIMEOUT):
        log.warning("event=access_log_close_timeout path=%s timeout=%g", access.destination,
                    ACCESS_CLOSE_TIMEOUT)


def cannot_listen(what: str, addr: Address, error: OSError) -> StartupError:
    """The user's message for a listen address that cannot be bound."""
    if error.errno == errno.EADDRINUSE:
        return StartupError(f"{what}: address in use: {addr} is held by another process")
    return StartupError(f"{what}: cannot listen on {addr}: {error.strerror or error}")


def refuse_addresses_in_use(config: Config) -> None:
    """Raise StartupError when another process already holds a listen address of `config`.

    Workers share each listener with SO_REUSEPORT, and the kernel lets any process of the
    same user join such a group: a second `sdproxy run --workers N` on the same port would
    start silently and get part of the clients. So before anything of ours binds, every
    address (each upstream's `listen`, then `admin.listen`) is bound once here without
    SO_REUSEPORT, which fails while any socket listens there, and released at once.
    SO_REUSEADDR as the real listeners have it: connections in TIME_WAIT hold nothing.
    Not listened on, so it never accepts a connection.

    What remains: between this probe and the workers' own binds (process start plus the
    first-answer wait, at most FIRST_ANSWER_WAIT) a process binding with SO_REUSEPORT can
    still join, and a listener opened by a SIGHUP reload is not probed.
    """
    wanted = [(f"upstream {up.name}", up.listen) for up in config.upstreams
              if up.listen is not None]
    wanted += [(f"listeners[{i}]", lc.listen) for i, lc in enumerate(config.listeners)]
    wanted.append(("admin", config.admin.listen))
    for what, addr in wanted:
        try:
            # Every address the name stands for, as loop.create_server binds them.
            infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except OSError:
            continue  # the real bind reports an unresolvable host
        for family, kind, proto, _name, sockaddr in infos:
            probe = socket.socket(family, kind, proto)
            try:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(sockaddr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise cannot_listen(what, addr, e) from None
                # Any other problem (no such local address, a privileged port) is the
                # real bind's to report, with the message it has always had.
            finally:
                probe.close()


def _startup_failed(error: StartupError) -> int:
    log.error('event=startup_failed error="%s"', error)
    print(f"sdproxy: {error}", file=sys.stderr)
    return 1


def run_app(app: ProxyApp) -> int:
    """Serve `app` on a uvloop loop until it stops; the process's exit code."""
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(app.serve())
    except StartupError as e:
        return _startup_failed(e)
    return 0


def run_process(config: Config, *, reuse_port: bool, admin: bool) -> int:
    return run_app(ProxyApp(config, reuse_port=reuse_port, admin=admin))


def main(config: Config, workers: int = 1) -> int:
    logs.setup(config.log.level, config.log.format)
    try:
        refuse_addresses_in_use(config)
    except StartupError as e:
        return _startup_failed(e)
    if workers == 1:
        return run_process(config, reuse_port=False, admin=True)
    return run_workers(config, workers)


def run_workers(config: Config, workers: int) -> int:
    """N processes sharing every listener and the admin API with SO_REUSEPORT, kept up by
    a supervisor (proxy.supervisor; one worker: proxy.worker).

    Each worker watches the catalog itself: a blocking query is one idle HTTP request per
    upstream per `wait`, so N workers cost Consul N of those (see the README), and no
    worker depends on another to learn of a change.
    """
    from proxy.supervisor import Supervisor

    return Supervisor(config, workers).run()
