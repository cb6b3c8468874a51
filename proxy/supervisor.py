"""The supervisor of `--workers N` (SPEC "Workers"): starts N workers and keeps them.

Rules:
- Worker K (0..N-1) is a fork of this process (proxy.worker.run_worker); the supervisor
  serves nothing itself.
- A worker that exits while the supervisor is not stopping is logged (`event=worker_exit
  worker=K pid=P signal=SIGKILL`, or `code=N`) and restarted: at once the first time in
  EXIT_WINDOW, then after RESTART_BACKOFF, doubling with each further exit of that
  worker, at most RESTART_BACKOFF_MAX (RestartPolicy).
- EXIT_LIMIT exits (of any workers) within EXIT_WINDOW: they fail for a reason that a
  restart does not cure. The others are stopped and the supervisor exits 1, so that a
  service manager (systemd's Restart=on-failure) takes over. So does a worker of the
  first start that could not start (exit STARTUP_FAILED, its reason logged by it): the
  run fails at once, as it does without workers.
- SIGTERM/SIGINT/SIGQUIT: every worker gets SIGTERM and drains; exit 0 once all exited 0 (a clean
  stop), else 1. Bounded: STOP_GRACE past the largest drain_timeout the workers left get
  SIGKILL.
- SIGHUP re-reads the config, so that a worker restarted later starts with the latest
  valid one, and reaches every worker (each reloads itself); SIGUSR1 reaches every worker
  (each reopens its log files); SIGUSR2 is ignored with a log line.
- Signals are blocked and taken with sigtimedwait: handled between two steps of the
  loop, never in the middle of a fork or of the bookkeeping of an exit.
- The supervisor owns the readings directory (proxy.admin.readings): made before the
  first fork, an exited worker's reading marked dead, removed at exit.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from proxy import config as config_mod
from proxy import logs
from proxy.admin.readings import mark_dead
from proxy.config import Config
from proxy.worker import STARTUP_FAILED, SUPERVISED_SIGNALS

log = logging.getLogger("sdproxy.supervisor")

EXIT_LIMIT = 5  # worker exits within EXIT_WINDOW that make the supervisor give up
EXIT_WINDOW = 30.0  # seconds
RESTART_BACKOFF = 0.5  # seconds before a worker's second restart within EXIT_WINDOW
RESTART_BACKOFF_MAX = 5.0
STOP_GRACE = 5.0  # seconds past the largest drain_timeout before a stop kills
KILL_WAIT = 5.0  # seconds to wait for killed workers to be reaped
# Seconds between looks for exited workers without a SIGCHLD: a thread with SIGCHLD
# unblocked (none today) would take the signal, and its default is to discard it.
REAP_INTERVAL = 1.0


class RestartPolicy:
    """When to restart a worker that exited, and when to give up. Pure: times come in."""

    def __init__(self, *, limit: int = EXIT_LIMIT, window: float = EXIT_WINDOW,
                 backoff: float = RESTART_BACKOFF,
                 backoff_max: float = RESTART_BACKOFF_MAX) -> None:
        self.limit = limit
        self.window = window
        self.backoff = backoff
        self.backoff_max = backoff_max
        self._exits: deque[float] = deque()  # every worker's, oldest first
        self._by_worker: dict[int, deque[float]] = {}

    def on_exit(self, worker: int, now: float) -> float | None:
        """Seconds to wait before restarting `worker`, or None: give up."""
        exits = self._record(self._exits, now)
        if len(exits) >= self.limit:
            return None
        own = self._record(self._by_worker.setdefault(worker, deque()), now)
        if len(own) == 1:
            return 0.0  # an isolated exit (an OOM kill, say): full capacity back at once
        return min(self.backoff * 2.0 ** (len(own) - 2), self.backoff_max)

    def recent(self, now: float) -> int:
        """Exits within the window before `now`."""
        return len(self._prune(self._exits, now))

    def _record(self, times: deque[float], now: float) -> deque[float]:
        times.append(now)
        return self._prune(times, now)

    def _prune(self, times: deque[float], now: float) -> deque[float]:
        while times and times[0] <= now - self.window:
            times.popleft()
        return times


def describe_exit(status: int) -> str:
    """A wait status as the log says it: `signal=SIGKILL` or `code=1`."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return f"signal={signal.Signals(number).name}"
        except ValueError:
            return f"signal={number}"
    return f"code={os.waitstatus_to_exitcode(status)}"


def fork_worker(config: Config, number: int, directory: str) -> int:
    """Fork worker `number`; returns its pid (in the child, never returns)."""
    sys.stdout.flush()
    sys.stderr.flush()
    supervisor = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        from proxy.worker import run_worker

        code = run_worker(config, number, directory, supervisor)
    except BaseException:  # the child must never return into the supervisor's code
        log.critical("event=worker_failed worker=%d", number, exc_info=True)
    finally:
        os._exit(code)


@dataclass
class _Worker:
    number: int
    pid: int | None = None  # None: not running
    restart_at: float | None = None  # monotonic time of its due restart


class Supervisor:
    def __init__(self, config: Config, count: int, *,
                 spawn: Callable[[Config, int, str], int] = fork_worker,
                 policy: RestartPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.spawn = spawn
        self.policy = policy or RestartPolicy()
        self.clock = clock
        self.workers = [_Worker(n) for n in range(count)]
        self.directory = ""
        self.stopping = False
        self.restarting = False  # a worker has exited since the first start
        self.exit_code = 0
        self.kill_at = float("inf")  # while stopping: when the workers left get SIGKILL
        self.give_up_at = float("inf")  # after that: when the supervisor stops waiting

    def run(self) -> int:
        try:
            self.directory = tempfile.mkdtemp(prefix="sdproxy-workers-")
        except OSError as e:
            log.error('event=startup_failed error="workers: cannot make a directory: %s"', e)
            print(f"sdproxy: workers: cannot make a directory: {e}", file=sys.stderr)
            return 1
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISED_SIGNALS)
        log.info("event=supervising workers=%d pid=%d readings=%s", len(self.workers),
                 os.getpid(), self.directory)
        try:
            for worker in self.workers:
                self._start(worker)
            code = self._loop()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            shutil.rmtree(self.directory, ignore_errors=True)
        log.info("event=stopped workers=%d code=%d", len(self.workers), code)
        return code

    # -- the loop -----------------------------------------------------------------------
    def _loop(self) -> int:
        while True:
            now = self.clock()
            if self.stopping:
                running = self._running()
                if not running:
                    return self.exit_code
                if now >= self.give_up_at:
                    log.error("event=stop_abandoned workers=%s",
                              ",".join(str(w.number) for w in running))
                    return 1
                if now >= self.kill_at:
                    self.kill_at = float("inf")
                    self.give_up_at = now + KILL_WAIT
                    self.exit_code = 1
                    log.error("event=stop_timeout action=kill workers=%s",
                              ",".join(str(w.number) for w in running))
                    self._send(signal.SIGKILL)
            else:
                for worker in self.workers:
                    if worker.restart_at is not None and worker.restart_at <= now:
                        self._start(worker)
            due = min([w.restart_at for w in self.workers if w.restart_at is not None]
                      + [self.kill_at, self.give_up_at, now + REAP_INTERVAL])
            info = signal.sigtimedwait(SUPERVISED_SIGNALS, max(0.0, due - self.clock()))
            if info is None:
                self._reap()
            else:
                self._on_signal(info.si_signo)

    def _on_signal(self, number: int) -> None:
        if number == signal.SIGCHLD:
            self._reap()
        elif number in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):  # QUIT drains, as nginx
            if not self.stopping:
                log.info("event=stopping signal=%s workers=%d", signal.Signals(number).name,
                         len(self._running()))
                self._stop(0)
        elif number == signal.SIGHUP:
            if not self.stopping:
                self._reread_config()
                self._send(signal.SIGHUP)
        elif number == signal.SIGUSR1:
            self._send(signal.SIGUSR1)
        else:
            log.info("event=signal_ignored signal=%s", signal.Signals(number).name)

    # -- workers ------------------------------------------------------------------------
    def _running(self) -> list[_Worker]:
        return [w for w in self.workers if w.pid is not None]

    def _start(self, worker: _Worker) -> None:
        worker.restart_at = None
        try:
            worker.pid = self.spawn(self.config, worker.number, self.directory)
        except OSError as e:  # no memory or processes left to fork
            log.error('event=worker_start_failed worker=%d error="%s"', worker.number, e)
            self._on_exit(worker, "error=fork")
            return
        log.info("event=worker_started worker=%d pid=%d", worker.number, worker.pid)

    def _reap(self) -> None:
        """Every child that has exited: counted, logged, restarted or given up on."""
        by_pid = {w.pid: w for w in self.workers if w.pid is not None}
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = by_pid.get(pid)
            if worker is None:
                continue
            worker.pid = None
            mark_dead(self.directory, worker.number, pid)
            how = describe_exit(status)
            if self.stopping:
                if status != 0:
                    self.exit_code = 1
                log.info("event=worker_stopped worker=%d pid=%d %s", worker.number, pid, how)
            elif not self.restarting and os.WIFEXITED(status) and \
                    os.WEXITSTATUS(status) == STARTUP_FAILED:
                log.error("event=worker_exit worker=%d pid=%d %s restart=no reason=startup",
                          worker.number, pid, how)
                self._stop(1)
            else:
                self._on_exit(worker, how, pid)

    def _on_exit(self, worker: _Worker, how: str, pid: int = 0) -> None:
        now = self.clock()
        self.restarting = True
        delay = self.policy.on_exit(worker.number, now)
        if delay is None:
            log.error("event=worker_exit worker=%d pid=%d %s restart=no", worker.number, pid,
                      how)
            log.error("event=workers_failing exits=%d window=%gs action=stop",
                      self.policy.recent(now), self.policy.window)
            self._stop(1)
            return
        log.warning("event=worker_exit worker=%d pid=%d %s restart_in=%.2fs", worker.number,
                    pid, how, delay)
        worker.restart_at = now + delay

    def _stop(self, code: int) -> None:
        self.stopping = True
        self.exit_code = code
        drain = max((up.drain_timeout for up in self.config.upstreams), default=0.0)
        self.kill_at = self.clock() + drain + STOP_GRACE
        for worker in self.workers:
            worker.restart_at = None
        self._send(signal.SIGTERM)

    def _send(self, number: int) -> None:
        for worker in self._running():
            assert worker.pid is not None
            try:
                os.kill(worker.pid, number)  # unreaped, so the pid is still this worker's
            except ProcessLookupError:
                pass

    def _reread_config(self) -> None:
        """The config a restarted worker starts with: the latest that loads. A broken one
        is left to the workers to reject (each logs the problem)."""
        try:
            new = config_mod.load(self.config.path, os.environ)
        except config_mod.ConfigError:
            return
        self.config = new
        # The supervisor's own lines follow [log] as the workers' do (they apply it on the
        # same SIGHUP), so one log stream never mixes two formats after a reload.
        logs.setup(new.log.level, new.log.format)
        log.info("event=config_reread config=%s workers=%d", new.path, len(self._running()))
