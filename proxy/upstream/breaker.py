"""Per-instance circuit breaker: pybreaker's state machine, driven without blocking.

Rules (SPEC "Routing rules", `[upstreams.breaker]`):
- closed -> open after `failures` consecutive failed attempts (connect failure, reset,
  timeout, 5xx listed in `retry_on`); any success resets the count;
- open -> half-open once `reset_timeout` has passed;
- half-open lets one trial attempt through at a time: success closes, failure re-opens.

pybreaker keeps the count and the state and notifies listeners on every transition; we
feed it each outcome after the fact with a synchronous `call` (so its lock is never held
across an await) and decide ourselves, on an injected monotonic clock, when an open
breaker becomes half-open (pybreaker would only look at the wall clock on its next call).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

import pybreaker

CLOSED: Final = pybreaker.STATE_CLOSED  # "closed"
OPEN: Final = pybreaker.STATE_OPEN  # "open"
HALF_OPEN: Final = pybreaker.STATE_HALF_OPEN  # "half-open"

# Our names for the states, as /upstreams and /metrics show them.
STATE_NAMES: Final = {CLOSED: "healthy", OPEN: "open", HALF_OPEN: "half_open"}


class AttemptFailed(Exception):
    """The outcome we hand to pybreaker for a failed attempt."""


def _succeed() -> None:
    return None


def _fail() -> None:
    raise AttemptFailed()


StateListener = Callable[["HostBreaker", str, str], None]


class _Relay(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: HostBreaker) -> None:
        self.owner = owner

    def state_change(self, cb: pybreaker.CircuitBreaker,
                     old_state: pybreaker.CircuitBreakerState | None,
                     new_state: pybreaker.CircuitBreakerState) -> None:
        self.owner.on_state_change(old_state.name if old_state else CLOSED, new_state.name)


class HostBreaker:
    __slots__ = (
        "cb",
        "clock",
        "name",
        "on_change",
        "opened_at",
        "reset_timeout",
        "state",
        "trial_in_flight",
    )

    def __init__(self, name: str, failures: int, reset_timeout: float, *,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: StateListener | None = None) -> None:
        self.name = name
        self.reset_timeout = reset_timeout
        self.clock = clock
        self.opened_at = 0.0
        self.trial_in_flight = False
        self.on_change = on_change
        self.state = CLOSED  # mirrors pybreaker's, updated by its listener
        self.cb = pybreaker.CircuitBreaker(fail_max=failures, reset_timeout=reset_timeout,
                                           listeners=[_Relay(self)], name=name)

    def on_state_change(self, old: str, new: str) -> None:
        self.state = new
        if new == OPEN:
            self.opened_at = self.clock()
        self.trial_in_flight = False
        if self.on_change is not None:
            self.on_change(self, old, new)

    def due_for_trial(self, now: float) -> bool:
        return self.state == OPEN and now >= self.opened_at + self.reset_timeout

    def to_half_open(self) -> None:
        self.cb.half_open()

    def allows(self) -> bool:
        """May a new attempt go to this host now? (closed, or a free half-open trial)"""
        state = self.state
        if state == CLOSED:
            return True
        return state == HALF_OPEN and not self.trial_in_flight

    def on_attempt(self) -> None:
        if self.state == HALF_OPEN:
            self.trial_in_flight = True

    def record_success(self) -> None:
        state = self.state
        if state == OPEN:
            return  # an attempt that began before the breaker opened proves nothing new
        if state == CLOSED and not self.cb._state_storage.counter:
            return  # nothing to reset: skip pybreaker's lock on the common path
        self.cb.call(_succeed)
        self.trial_in_flight = False

    def record_failure(self) -> None:
        if self.state == OPEN:
            return
        try:
            self.cb.call(_fail)
        except (AttemptFailed, pybreaker.CircuitBreakerError):
            pass
        self.trial_in_flight = False

    @property
    def failures(self) -> int:
        return self.cb.fail_counter
