"""One worker of `--workers N`: a ProxyApp forked by the supervisor (proxy.supervisor).

A worker serves every listener and the admin API, each shared with its siblings through
SO_REUSEPORT, so any worker may answer an admin request; it publishes what it reads of
its own state for the others to merge (proxy.admin.readings). Its log lines carry
`worker=K`. It ends when its supervisor does (PR_SET_PDEATHSIG on Linux), so a killed
supervisor leaves no worker holding the ports, and then removes the readings directory.

Signals: the supervisor blocks the signals it handles before it forks, so one sent
between a fork and the worker's own handlers is held, not acted on by its default (a
SIGHUP would kill). The worker unblocks them in `start()`, which `serve()` calls once its
handlers are installed: a held SIGTERM then stops it, a held SIGHUP reloads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from proxy.admin.readings import PUBLISH_INTERVAL, ReadingFiles
from proxy.app import ProxyApp, cannot_listen, run_app
from proxy.config import Config

log = logging.getLogger("sdproxy.app")

# What the supervisor takes itself (sigtimedwait) and so keeps blocked in its children
# until they can handle them.
SUPERVISED_SIGNALS = frozenset({signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                                signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2})

_PR_SET_PDEATHSIG = 1  # linux/prctl.h

# The exit code of a worker that never finished starting (a listener it cannot bind, say):
# the supervisor then knows a restart would fail the same way.
STARTUP_FAILED = 3


class WorkerApp(ProxyApp):
    """A ProxyApp that shares its admin address and publishes its readings."""

    def __init__(self, config: Config, *, worker: int, readings: ReadingFiles) -> None:
        super().__init__(config, reuse_port=True, admin=True)
        self.worker = worker
        self.workers = readings  # what the admin gathers every worker's numbers through
        self.started = False  # listeners and admin open
        self._publisher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # serve() has installed this process's signal handlers: take what was held.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SUPERVISED_SIGNALS)
        loop = asyncio.get_running_loop()
        self._publisher = loop.create_task(self._publish_readings(), name="publish-readings")
        await super().start()
        self.started = True

    async def _start_admin(self) -> None:
        """ProxyApp's admin, bound with SO_REUSEPORT: every worker serves it."""
        from aiohttp import web

        from proxy.admin.server import build_app

        listen = self.config.admin.listen
        # handle_signals=False: the composition root owns SIGTERM/SIGHUP.
        runner = web.AppRunner(build_app(self), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, listen.host, listen.port, reuse_address=True,
                           reuse_port=True)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise cannot_listen("admin", listen, e) from None
        self.admin_runner = runner
        log.info("event=admin_listening listen=%s", listen)

    async def stop(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
        await super().stop()
        self._write_reading()  # the last counts, which the sums keep once this worker exits

    async def _publish_readings(self) -> None:
        while True:
            self._write_reading()
            await asyncio.sleep(PUBLISH_INTERVAL)

    def _write_reading(self) -> None:
        from proxy.admin.views import process_reading

        self.workers.publish(process_reading(self))


def tag_log_records(worker: int) -> None:
    """Every log line of this process names its worker: `worker=K` ahead of the event.

    A record factory rather than a handler's formatter, so it survives a logging setup
    that replaces the handlers. Messages that are not strings are left alone.
    """
    make = logging.getLogRecordFactory()
    prefix = f"worker={worker} "

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        record.worker = worker
        if isinstance(record.msg, str):
            record.msg = prefix + record.msg
        return record

    logging.setLogRecordFactory(factory)


def end_with(supervisor: int) -> None:
    """Get SIGTERM (a drain) when the supervisor dies; exit now if it already has."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != supervisor:
        os._exit(1)


def run_worker(config: Config, worker: int, directory: str | Path, supervisor: int) -> int:
    """The forked child's whole life; returns its exit code."""
    end_with(supervisor)
    tag_log_records(worker)
    app = WorkerApp(config, worker=worker, readings=ReadingFiles(directory, worker))
    code = run_app(app)
    if os.getppid() != supervisor:
        # Orphaned: the supervisor was killed and cannot remove the readings any more.
        shutil.rmtree(directory, ignore_errors=True)
    return STARTUP_FAILED if code and not app.started else code
