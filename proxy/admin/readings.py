"""The workers' readings on disk: how each worker's numbers reach every admin answer.

Under `--workers N` the supervisor makes a private directory (mode 0700) and removes it
when it exits. Each worker writes its reading (proxy.admin.views.process_reading) there
as `w<K>.<pid>.json` every PUBLISH_INTERVAL and whenever it answers an admin request;
the answer is then merged from every file (proxy.admin.merge). When a worker exits the
supervisor renames its file `dead.w<K>.<pid>.json` (`mark_dead`, as prometheus_client's
multiprocess mode has `mark_process_dead`): its counters keep counting, its gauges stop.

Why files rather than prometheus_client's multiprocess mode: the request path counts in
plain ints folded at scrape time (proxy.metrics), which that mode cannot read without a
shared-memory write per increment; /upstreams and the dashboard need the same numbers,
which that mode does not carry; and one format serves all three, so they agree.
Why not ask the siblings at request time: a killed worker cannot answer, and its counts
would vanish from the sums. What is reported is always what was written first (a worker
writes its own reading before it reads the others'), so a sum never goes down between
two scrapes, whichever workers answer them; the price is that a sibling's numbers are up
to PUBLISH_INTERVAL old.

Writes are atomic (a temporary file, then rename), so a reader never sees half a file.

The directory also holds the operator's drains (DRAINS_FILE, `{upstream: [ids]}`): an
admin request reaches one worker, so a drain is written there (read-modify-write under
an flock, so two workers' drains at once both count) and every worker takes it up
(proxy.admin.operator).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from proxy.admin.merge import Reading

log = logging.getLogger("sdproxy.admin")

PUBLISH_INTERVAL = 1.0  # seconds between a worker's readings when no admin request asks

_NAME = re.compile(r"^(dead\.)?w(\d+)\.(\d+)\.json$")
DRAINS_FILE = "operator-drains.json"  # not a reading's name


def file_name(worker: int, pid: int, *, dead: bool = False) -> str:
    return f"{'dead.' if dead else ''}w{worker}.{pid}.json"


class ReadingFiles:
    """One worker's side of the directory: publish its reading, gather everyone's."""

    def __init__(self, directory: str | Path, worker: int, pid: int | None = None) -> None:
        self.directory = Path(directory)
        self.worker = worker
        self.pid = os.getpid() if pid is None else pid
        self.path = self.directory / file_name(worker, self.pid)
        self._temporary = self.directory / f".{self.path.name}.tmp"  # not a reading's name
        self._failing = False  # a write failed; logged once until one succeeds again
        self._drains: dict[str, set[str]] = {}
        self._drains_key: tuple[int, int, int] | None = None

    def publish(self, upstreams: list[dict[str, Any]]) -> None:
        """Write this worker's reading; a failure costs freshness, never a request."""
        body = json.dumps({"worker": self.worker, "pid": self.pid, "upstreams": upstreams},
                          separators=(",", ":"))
        try:
            self._temporary.write_text(body)
            os.replace(self._temporary, self.path)
        except OSError as e:
            if not self._failing:
                log.error('event=readings_write_failed path=%s error="%s"', self.path, e)
            self._failing = True
            return
        self._failing = False

    def operator_drains(self) -> dict[str, set[str]]:
        """Every worker's drained instance ids by upstream (read again only once the file
        was replaced)."""
        path = self.directory / DRAINS_FILE
        try:
            st = path.stat()
        except OSError:
            return {}  # nothing drained yet
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._drains_key:
            self._drains = _drains_of(_load(path))
            self._drains_key = key
        return self._drains

    def set_operator_drain(self, upstream: str, endpoint_id: str, drained: bool) -> None:
        """Record a drain (or its end) for every worker; raises OSError if it cannot."""
        path = self.directory / DRAINS_FILE
        with open(self.directory / ".operator-drains.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held for one small read and write
            drains = _drains_of(_load(path))
            ids = drains.setdefault(upstream, set())
            if drained:
                ids.add(endpoint_id)
            else:
                ids.discard(endpoint_id)
            body = {name: sorted(ids) for name, ids in sorted(drains.items()) if ids}
            temporary = self.directory / f".{DRAINS_FILE}.{self.pid}.tmp"
            temporary.write_text(json.dumps(body))
            os.replace(temporary, path)

    def gather(self, own: list[dict[str, Any]]) -> list[Reading]:
        """Publish `own`, then return it with every other reading in the directory."""
        self.publish(own)
        found = [Reading(self.worker, self.pid, True, own)]
        found += [r for r in read_all(self.directory)
                  if not (r.worker == self.worker and r.pid == self.pid)]
        return found


def read_all(directory: str | Path) -> list[Reading]:
    """Every reading in `directory`, live and dead, in no particular order."""
    directory = Path(directory)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    # By (worker, pid): a listing taken while the supervisor renames a file may hold
    # both of its names; the dead one wins.
    found: dict[tuple[int, int], Reading] = {}
    for name in sorted(names):  # "dead." sorts first
        match = _NAME.match(name)
        if match is None:
            continue
        dead, worker, pid = bool(match.group(1)), int(match.group(2)), int(match.group(3))
        if (worker, pid) in found:
            continue
        data = _load(directory / name)
        if data is None and not dead:
            # Renamed by the supervisor since the listing: the worker has just exited.
            dead = True
            data = _load(directory / file_name(worker, pid, dead=True))
        if data is None:
            continue
        upstreams = data.get("upstreams")
        found[worker, pid] = Reading(worker, pid, not dead,
                                     upstreams if isinstance(upstreams, list) else [])
    return list(found.values())


def _drains_of(data: dict[str, Any] | None) -> dict[str, set[str]]:
    return {str(name): {str(i) for i in ids} for name, ids in (data or {}).items()
            if isinstance(ids, list)}


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def mark_dead(directory: str | Path, worker: int, pid: int) -> None:
    """The supervisor's note that worker `worker` (process `pid`) has exited.

    A worker killed before its first reading leaves an empty one, so that every exit
    is counted (`sdproxy_worker_exits_total`).
    """
    directory = Path(directory)
    dead = directory / file_name(worker, pid, dead=True)
    try:
        os.replace(directory / file_name(worker, pid), dead)
    except FileNotFoundError:
        try:
            dead.write_text(json.dumps({"worker": worker, "pid": pid, "upstreams": []}))
        except OSError as e:
            log.error('event=readings_write_failed path=%s error="%s"', dead, e)
    except OSError as e:
        log.error('event=readings_write_failed path=%s error="%s"', dead, e)
