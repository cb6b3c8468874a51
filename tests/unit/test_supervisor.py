"""The supervisor's restart rules (proxy.supervisor.RestartPolicy) with a stepped clock,
and how an exit is described in the log. The processes themselves are exercised in
tests/integration/test_workers.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from proxy.supervisor import EXIT_LIMIT, EXIT_WINDOW, RestartPolicy, describe_exit


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
