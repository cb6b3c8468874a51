"""The life of one registry server process started for the demo and the tests.

Consul agents, etcd members and ZooKeeper servers start, wait, crash and stop the same
way; each subclass says only how to run it (`command`), how to tell it serves
(`is_ready`) and what it leaves on disk (`cleanup`). The process runs in a session of
its own, so a kill reaches whatever it spawned and a Ctrl-C in the terminal does not
reach it before the demo has stopped its clients.

Outside the data path: blocking waits and polling are on purpose here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Self

READY_POLL_SECONDS = 0.05
STOP_GRACE_SECONDS = 5.0


class DevServer:
    """A server process with its log in `log_path`; a context manager that ends it."""

    NAME = "server"  # in error messages: "<NAME> exited 1: <log tail>"
    START_TIMEOUT = 30.0

    proc: subprocess.Popen[bytes] | None
    log_path: Path

    def command(self) -> list[str]:
        raise NotImplementedError

    def is_ready(self) -> bool:
        """One probe of whether it serves; may raise OSError or ValueError (not yet)."""
        raise NotImplementedError

    def spawn(self) -> Self:
        """Start the process without waiting for it (see `wait_ready`); a no-op while it
        runs, so `with server.start():` never starts a second process on the same ports."""
        if self.alive():
            return self
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def wait_ready(self, timeout: float | None = None) -> Self:
        timeout = self.START_TIMEOUT if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"{self.NAME} exited {code}: {self.log_tail()}")
            try:
                if self.is_ready():
                    return self
            except (OSError, ValueError):
                pass
            time.sleep(READY_POLL_SECONDS)
        self.kill()
        raise RuntimeError(f"{self.NAME} did not serve within {timeout}s: {self.log_tail()}")

    def start(self, timeout: float | None = None) -> Self:
        return self.spawn().wait_ready(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def send(self, sig: int) -> None:
        """Signal the process's whole session (it may have spawned helpers)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                self.proc.send_signal(sig)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; reaped either way."""
        if self.proc is not None and self.proc.poll() is None:
            self.send(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self.send(signal.SIGKILL)
                self.proc.wait(STOP_GRACE_SECONDS)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL (a crash: no leave, no graceful close) and reap; `start()` brings it
        back on the same ports."""
        if self.proc is not None and self.proc.poll() is None:
            self.send(signal.SIGKILL)
            self.proc.wait(STOP_GRACE_SECONDS)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets open but answers nothing (a hang)."""
        self.send(signal.SIGSTOP)

    def resume(self) -> None:
        self.send(signal.SIGCONT)

    def cleanup(self) -> None:
        """Stop (resuming a paused process first) and remove the log; subclasses remove
        their data too. Idempotent."""
        self.resume()
        self.stop()
        try:
            self.log_path.unlink()
        except OSError:
            pass

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
