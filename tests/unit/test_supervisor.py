"""The supervisor (proxy.supervisor): its restart rules with a stepped clock, how an exit
is described in the log, and its loop over real forked children that stand in for workers
(exit at once, die by SIGKILL, stop on SIGTERM). Real workers are exercised in
tests/integration/test_workers.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.config import Config, load
from proxy.supervisor import EXIT_LIMIT, EXIT_WINDOW, RestartPolicy, Supervisor, describe_exit


def test_a_workers_first_exit_restarts_at_once_then_backs_off_doubling() -> None:
    policy = RestartPolicy(limit=100, backoff=0.5, backoff_max=5.0)
    delays = [policy.on_exit(0, now=float(t)) for t in range(7)]
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_backoff_is_per_worker() -> None:
    policy = RestartPolicy()
    assert policy.on_exit(0, now=0.0) == 0.0
    assert policy.on_exit(0, now=1.0) == 0.5
    assert policy.on_exit(1, now=2.0) == 0.0  # worker 1's first exit: not slowed by 0's


def test_exits_older_than_the_window_are_forgotten() -> None:
    policy = RestartPolicy()
    assert policy.on_exit(0, now=0.0) == 0.0
    assert policy.on_exit(0, now=EXIT_WINDOW + 1) == 0.0  # an isolated exit again
    assert policy.recent(now=EXIT_WINDOW + 1) == 1


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_the_fifth_exit_within_the_window_gives_up_whichever_workers(workers: int) -> None:
    policy = RestartPolicy()
    decisions = [policy.on_exit(i % workers, now=i * (EXIT_WINDOW - 1) / EXIT_LIMIT)
                 for i in range(EXIT_LIMIT)]
    assert all(d is not None for d in decisions[:-1])
    assert decisions[-1] is None
    assert EXIT_LIMIT == 5 and EXIT_WINDOW == 30.0  # SPEC: 5 within 30 s


def test_exits_spread_wider_than_the_window_never_give_up() -> None:
    policy = RestartPolicy()
    step = EXIT_WINDOW / (EXIT_LIMIT - 1) + 0.1  # never EXIT_LIMIT within one window
    assert all(policy.on_exit(0, now=i * step) is not None for i in range(50))


def _status_of(code: str) -> int:
    """The wait status of a real child that runs `code`."""
    proc = subprocess.Popen([sys.executable, "-c", code])
    _, status = os.waitpid(proc.pid, 0)
    proc.returncode = 0  # reaped here; keep Popen from waiting again
    return status


@pytest.mark.parametrize(("code", "said"), [
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "signal=SIGKILL"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "signal=SIGSEGV"),
    ("raise SystemExit(3)", "code=3"),
    ("pass", "code=0"),
])
def test_describe_exit(code: str, said: str) -> None:
    assert describe_exit(_status_of(code)) == said


def test_supervised_signals_include_every_one_a_user_sends_by_habit() -> None:
    from proxy.worker import SUPERVISED_SIGNALS

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                signal.SIGUSR2):
        assert sig in SUPERVISED_SIGNALS


# --- the loop, with real child processes standing in for workers --------------------------


def _config(tmp_path: Path) -> Config:
    path = tmp_path / "sdproxy.toml"
    path.write_text('[[upstreams]]\nname = "web"\nlisten = "127.0.0.1:1"\n'
                    'discovery = "static"\nendpoints = ["127.0.0.1:2"]\n'
                    'drain_timeout = "1s"\n')
    return load(str(path), {})


def _child(body: Callable[[], None]) -> Callable[[Config, int, str], int]:
    """A `spawn` that forks a child running `body` (never returning into pytest)."""
    def spawn(config: Config, number: int, directory: str) -> int:
        pid = os.fork()
        if pid == 0:
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
                body()
            finally:
                os._exit(70)
        return pid
    return spawn


def _exit_with(code: int) -> Callable[[], None]:
    return lambda: os._exit(code)


def _serve_until_sigterm() -> None:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    time.sleep(20)  # bounded: the test's SIGTERM comes long before


def test_a_worker_of_the_first_start_that_cannot_start_ends_the_run_at_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from proxy.worker import STARTUP_FAILED

    supervisor = Supervisor(_config(tmp_path), 2, spawn=_child(_exit_with(STARTUP_FAILED)))
    t0 = time.monotonic()
    assert supervisor.run() == 1
    assert time.monotonic() - t0 < 3
    assert "reason=startup" in caplog.text and "restart_in" not in caplog.text


def test_workers_that_keep_dying_are_restarted_then_given_up_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    supervisor = Supervisor(_config(tmp_path), 2, spawn=_child(die))
    assert supervisor.run() == 1
    exits = [r.getMessage() for r in caplog.records if "event=worker_exit" in r.getMessage()]
    assert len(exits) == EXIT_LIMIT
    assert all("signal=SIGKILL" in line for line in exits)
    assert "restart=no" in exits[-1] and "event=workers_failing exits=5" in caplog.text
    assert not os.path.exists(supervisor.directory)  # the readings directory is removed


def test_sigterm_stops_every_worker_and_a_clean_stop_exits_0(tmp_path: Path) -> None:
    supervisor = Supervisor(_config(tmp_path), 2, spawn=_child(_serve_until_sigterm))
    main = threading.get_ident()
    # Thread-directed, to the thread that blocks it: the process default would kill pytest.
    timer = threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGTERM))
    timer.start()
    try:
        assert supervisor.run() == 0
    finally:
        timer.cancel()
    assert all(w.pid is None for w in supervisor.workers)


def test_a_worker_that_does_not_stop_cleanly_makes_the_stop_exit_1(tmp_path: Path) -> None:
    def ignore_sigterm() -> None:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(4))
        time.sleep(20)

    supervisor = Supervisor(_config(tmp_path), 1, spawn=_child(ignore_sigterm))
    timer = threading.Timer(0.5, signal.pthread_kill, (threading.get_ident(), signal.SIGTERM))
    timer.start()
    try:
        assert supervisor.run() == 1
    finally:
        timer.cancel()
