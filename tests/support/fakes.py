"""Stand-ins the code under test is handed instead of the real thing, no I/O.

- `FakeClock`: a clock (`clock()` -> seconds) that moves only when the test moves it, for
  the `clock=`/`monotonic=` a component takes (DESIGN "Inject time").
- `State` and `Listener`: what `proxy.admin` reads (`proxy.admin.state.AppState` and a
  listener's counters), without an application around them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.upstream.manager import UpstreamRuntime

T0 = 1_700_000_000.0  # a wall-clock reading (unix time) for tests that need one


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Listener:
    connections: int = 0
    rejected_connections: int = 0


@dataclass
class State:
    upstreams: dict[str, UpstreamRuntime]
    listeners: dict[str, Any] = field(default_factory=dict)
    started_at: float = T0
