"""Composition root: wire watchers, pools, listeners and the admin API; signals; workers.

Start order: one watcher per upstream, a short bounded wait for the first catalog
answers (so the first requests find a pool, as Fabio waits for its first table), then
the listeners (one log line each once it accepts), then the admin API. SIGTERM/SIGINT
close the listeners at once and give in-flight requests up to `drain_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time

import uvloop

from proxy import logs
from proxy.config import Config
from proxy.discovery.registry import UnsupportedDiscovery, make_watcher
from proxy.protocols import Listener, make_listener
from proxy.upstream.manager import UpstreamRuntime

log = logging.getLogger("sdproxy.app")

FIRST_ANSWER_WAIT = 3.0  # seconds to wait for first catalog answers before listening


class StartupError(Exception):
    """A failure to start that the user can act on (exit code 1)."""


class ProxyApp:
    def __init__(self, config: Config, *, reuse_port: bool = False, admin: bool = True) -> None:
        self.config = config
        self.reuse_port = reuse_port
        self.with_admin = admin
        self.upstreams: dict[str, UpstreamRuntime] = {}
        self.listeners: dict[str, Listener] = {}
        self.servers: dict[str, asyncio.base_events.Server] = {}
        self.watch_tasks: dict[str, asyncio.Task[None]] = {}
        self.admin_runner: object | None = None
        self.started_at = time.time()
        self.stop_requested = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for up in self.config.upstreams:
            runtime = UpstreamRuntime(up)
            self.upstreams[up.name] = runtime
            try:
                watcher = make_watcher(self.config, up, runtime)
            except UnsupportedDiscovery as e:
                raise StartupError(str(e)) from None
            self.watch_tasks[up.name] = loop.create_task(watcher.run(), name=f"watch-{up.name}")
        await self._wait_first_answers(FIRST_ANSWER_WAIT)
        for name, runtime in self.upstreams.items():
            try:
                listener = make_listener(runtime, loop)
            except KeyError as e:
                raise StartupError(f"upstream {name}: {e.args[0]}") from None
            addr = runtime.config.listen
            try:
                server = await loop.create_server(listener.protocol_factory, addr.host, addr.port,
                                                  reuse_address=True, reuse_port=self.reuse_port,
                                                  backlog=1024)
            except OSError as e:
                raise StartupError(f"upstream {name}: cannot listen on {addr}: {e.strerror or e}")
            self.listeners[name] = listener
            self.servers[name] = server
            log.info("event=listening upstream=%s listen=%s mode=%s discovery=%s", name, addr,
                     runtime.config.mode, runtime.config.discovery)
        if self.with_admin:
            from proxy.admin.server import start_admin

            listen = self.config.admin.listen
            try:
                self.admin_runner = await start_admin(self, listen)
            except OSError as e:
                raise StartupError(f"admin: cannot listen on {listen}: {e.strerror or e}")
            log.info("event=admin_listening listen=%s", listen)

    async def _wait_first_answers(self, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not all(rt.answered for rt in self.upstreams.values()):
            if asyncio.get_running_loop().time() >= deadline:
                missing = [n for n, rt in self.upstreams.items() if not rt.answered]
                log.warning("event=first_answer_missing upstreams=%s", ",".join(missing))
                return
            await asyncio.sleep(0.01)  # startup only: watchers have no "answered" event yet

    async def stop(self) -> None:
        """Close listeners at once, let in-flight requests finish within drain_timeout."""
        for server in self.servers.values():
            server.close()
        drain = max((rt.config.drain_timeout for rt in self.upstreams.values()), default=0.0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain
        while loop.time() < deadline and any(lst.busy() for lst in self.listeners.values()):
            await asyncio.sleep(0.02)  # shutdown only: bounded by drain_timeout
        for listener in self.listeners.values():
            listener.close_all()
        for task in self.watch_tasks.values():
            task.cancel()
        await asyncio.gather(*self.watch_tasks.values(), return_exceptions=True)
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()  # type: ignore[attr-defined]
        for runtime in self.upstreams.values():
            for host in runtime.all_hosts():
                host.pool.close_all()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        try:
            await self.start()
            await self.stop_requested.wait()
        finally:
            await self.stop()
            log.info("event=stopped")

    def _on_stop_signal(self, sig: int) -> None:
        log.info("event=stopping signal=%s", signal.Signals(sig).name)
        self.stop_requested.set()


def run_process(config: Config, *, reuse_port: bool, admin: bool) -> int:
    app = ProxyApp(config, reuse_port=reuse_port, admin=admin)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(app.serve())
    except StartupError as e:
        log.error("event=startup_failed error=%r", str(e))
        print(f"sdproxy: {e}", file=sys.stderr)
        return 1
    return 0


def main(config: Config, workers: int = 1) -> int:
    logs.setup()
    if workers == 1:
        return run_process(config, reuse_port=False, admin=True)
    return run_workers(config, workers)


def run_workers(config: Config, workers: int) -> int:
    """N processes sharing every listener with SO_REUSEPORT; worker 0 serves the admin API."""
    children: list[int] = []
    for index in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = run_process(config, reuse_port=True, admin=index == 0)
            finally:
                os._exit(code)
        children.append(pid)

    def forward(sig: int, _frame: object) -> None:
        for child in children:
            try:
                os.kill(child, sig)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    worst = 0
    for child in children:
        _pid, status = os.waitpid(child, 0)
        worst = max(worst, os.waitstatus_to_exitcode(status) if status else 0)
    return 1 if worst else 0
