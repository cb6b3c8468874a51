"""An operator's drain and enable, and how they reach every worker (SPEC "Admin
(additions)").

Alone, a drain changes this process's pool at once (`UpstreamRuntime.set_operator_drain`).
Under `--workers N` every worker has a pool of its own and an admin request reaches only
one of them, so the drains are shared through the readings directory
(`proxy.admin.readings`): the worker that got the request records it there and applies it
at once; every worker makes its pools match the record whenever it takes a reading (at
least every PUBLISH_INTERVAL, `sync_operator_drains`); and the request waits, at most
CONFIRM_TIMEOUT, until every live worker's reading shows the change (`applied_by`), so an
answer without `workers_pending` means no worker sends new work to a drained instance any
more. A worker restarted later takes the record up with its first reading.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from typing import Any, Final, Protocol

from proxy.admin.merge import Reading
from proxy.admin.state import AppState, upstreams_of, workers_of

CONFIRM_TIMEOUT: Final = 3.0  # seconds a drain waits for every worker to show it
CONFIRM_POLL: Final = 0.05


class SharedDrains(Protocol):
    def operator_drains(self) -> Mapping[str, AbstractSet[str]]: ...

    def set_operator_drain(self, upstream: str, endpoint_id: str, drained: bool) -> None: ...


def shared_drains(state: AppState) -> SharedDrains | None:
    """Where the workers share drains; None for a process that runs alone."""
    workers = workers_of(state)
    if workers is None or not hasattr(workers, "operator_drains"):
        return None
    return workers  # type: ignore[return-value]  # ReadingFiles, checked structurally


def sync_operator_drains(state: AppState) -> None:
    """Make this worker's pools drain what the shared record says."""
    shared = shared_drains(state)
    if shared is None:
        return
    drains = shared.operator_drains()
    for runtime in upstreams_of(state):
        runtime.apply_operator_drains(drains.get(runtime.name, ()))


def shows(reading: Reading, upstream: str, endpoint_id: str, drained: bool) -> bool:
    """Does this worker's reading show the instance drained (or, not `drained`, back)?
    A worker that does not list the instance keeps the drain for when it comes."""
    for up in reading.upstreams:
        if up.get("name") != upstream:
            continue
        rows: list[dict[str, Any]] = [ep for ep in up.get("endpoints") or ()
                                      if ep.get("id") == endpoint_id]
        if drained:
            return all(ep.get("state") in ("draining", "down") for ep in rows)
        return not any(ep.get("reason") == "operator" for ep in rows)
    return True
