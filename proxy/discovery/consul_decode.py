"""Pure rules for reading Consul: health answers -> endpoints, blocking-query bookkeeping.

Owns: what a `GET /v1/health/service/<name>` answer means for routing (which instances
may take traffic, at which address and weight), how the next blocking query's `index` is
chosen from `X-Consul-Index`, and how fast the query loop may go (backoff after errors,
a token bucket against busy loops). Must not know: HTTP, asyncio, aiohttp, clocks or
randomness; the I/O shell (`discovery/consul.py`) passes in data, the time and an rng.

Rules of `decode` (SPEC "Routing rules"):
- An instance is usable when the worst of its checks (node checks such as `serfHealth`
  included) is `passing`, or `warning` with `include_warning`. `critical`, maintenance
  (Consul reports it as a `critical` check) and any status we do not know exclude it.
  No checks at all is passing, as Consul's own aggregation says.
- `tags`: the instance carries every listed tag, compared case-insensitively as Consul's
  own `?tag=` filter does.
- address = `Service.Address`, else `Node.Address`; weight = `Service.Weights.Passing`
  (`.Warning` when the worst check warns), 1 when Weights is missing; weight 0 = do not
  route. Port 0 (a service registered without one) cannot be routed to either.
- id = `Service.ID`. IDs are unique per node only (the ID defaults to the service name),
  so when one answer holds the same ID on several nodes, each of those becomes
  `<ID>@<Node>`; otherwise two instances would share one breaker and one pool.
- Output sorted by id: equal catalogs give equal tuples, whatever Consul's order.
- Instances that are not usable only because of their checks (critical, maintenance, or
  warning without `include_warning`) and that pass the tag filter come back apart from
  the usable ones, by `decode_answer`, as `DownInstance(endpoint, reason)` so an operator
  sees them (SPEC "Instance state and reason"): `Endpoint.status` is the aggregated
  status and `reason` the worst check's `Output` (else its `Notes`, as maintenance mode
  has, else its name and status), stripped and cut to REASON_CHARS characters. They never
  reach the pool.
- A structurally broken answer raises `DecodeError` instead of guessing: the caller keeps
  the last good pool rather than route on half an answer.

Rules of `select_datacenter` (SPEC "Datacenter failover"), over the latest answer of each
datacenter in the upstream's `datacenters` order:
- The first datacenter whose answer holds at least one usable endpoint (as `decode` says:
  passing, or warning with `include_warning`) wins; later ones are only a fallback.
- A datacenter that has not answered yet blocks the decision (None: "do not publish"), so
  a slow first answer from dc1 never lets dc2 win for a moment at startup. A datacenter
  that has not answered yet and whose query failed ("unreachable") is passed over, as an
  empty one would be: a datacenter that cannot be read must not hold the others hostage.
- Every datacenter answered empty or unreachable: the empty selection `("", ())`, but
  only when at least one of them did answer; nothing answered at all is undecided (None),
  so an upstream never seen yet stays "not answered" for `/ready`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from typing import Any, NamedTuple

from proxy.model import Endpoint

# Check statuses from best to worst; a status not listed here counts as critical.
STATUS_RANK: dict[str, int] = {"passing": 0, "warning": 1, "critical": 2, "maintenance": 2}
CRITICAL_RANK = 2
REASON_CHARS = 200  # of a check's output shown as a down instance's reason


class DecodeError(ValueError):
    """The answer does not have the shape of a Consul health answer."""


class DownInstance(NamedTuple):
    """An instance the catalog lists but whose checks keep it out of the pool."""

    endpoint: Endpoint
    reason: str  # the worst check's output


def _field(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(key)
    # bool is an int in Python; a JSON `true` is never a valid port or weight.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DecodeError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, "
                          f"got {type(value).__name__}")
    return value


def aggregate_status(checks: Sequence[Mapping[str, Any]]) -> str:
    """The worst status among `checks`: "passing", "warning" or "critical"."""
    worst = 0
    for check in checks:
        worst = max(worst, STATUS_RANK.get(str(check.get("Status")), CRITICAL_RANK))
    return ("passing", "warning", "critical")[worst]


def check_reason(checks: Sequence[Mapping[str, Any]]) -> str:
    """Why the worst of `checks` is not passing, for an operator (REASON_CHARS at most)."""
    worst = max(checks, key=lambda c: STATUS_RANK.get(str(c.get("Status")), CRITICAL_RANK),
                default=None)
    if worst is None:
        return ""
    for key in ("Output", "Notes"):
        text = worst.get(key)
        if isinstance(text, str) and text.strip():
            return text.strip()[:REASON_CHARS]
    name = worst.get("Name") or worst.get("CheckID") or "a check"
    return f"{name}: {worst.get('Status')}"[:REASON_CHARS]


def _weight(service: Mapping[str, Any], status: str, where: str) -> int:
    weights = service.get("Weights")
    if weights is None:
        return 1
    if not isinstance(weights, Mapping):
        raise DecodeError(f"{where}.Service.Weights: expected object")
    key = "Warning" if status == "warning" else "Passing"
    if weights.get(key) is None:
        return 1
    value: int = _field(weights, key, int, f"{where}.Service.Weights")
    return value


def _has_tags(service_tags: Sequence[str], wanted: Sequence[str]) -> bool:
    have = {t.lower() for t in service_tags}
    return all(t.lower() in have for t in wanted)


def _endpoint(where: str, eid: str, node: Mapping[str, Any], service: Mapping[str, Any],
              status: str, tags: tuple[str, ...], datacenter: str,
              routable: bool) -> Endpoint | None:
    """The instance as an Endpoint; None when it lacks a wanted tag or (`routable`) when
    weight 0 or port 0 say it is not one to route to, whatever its checks say."""
    service_tags = service.get("Tags") or []
    if not isinstance(service_tags, list) or not all(isinstance(t, str) for t in service_tags):
        raise DecodeError(f"{where}.Service.Tags: expected array of strings")
    if not _has_tags(service_tags, tags):
        return None
    weight = _weight(service, status, where)
    port: int = _field(service, "Port", int, f"{where}.Service")
    if routable and (weight <= 0 or port <= 0):
        return None
    address = service.get("Address") or ""
    if not isinstance(address, str):
        raise DecodeError(f"{where}.Service.Address: expected string")
    if not address:
        address = _field(node, "Address", str, f"{where}.Node")
    if not address:
        raise DecodeError(f"{where}: neither Service.Address nor Node.Address is set")
    meta = service.get("Meta") or {}
    if not isinstance(meta, Mapping):
        raise DecodeError(f"{where}.Service.Meta: expected object")
    node_dc = node.get("Datacenter")
    return Endpoint(
        id=eid,
        address=address,
        port=port,
        node=str(node.get("Node")),
        datacenter=node_dc if isinstance(node_dc, str) and node_dc else datacenter,
        tags=tuple(service_tags),
        weight=weight,
        status=status,
        meta=tuple(sorted((str(k), str(v)) for k, v in meta.items())),
    )


def decode(entries: Any, *, tags: tuple[str, ...], include_warning: bool,
           datacenter: str) -> tuple[Endpoint, ...]:
    """Usable endpoints of a `/v1/health/service/<name>` answer, sorted by id."""
    return decode_answer(entries, tags=tags, include_warning=include_warning,
                         datacenter=datacenter)[0]


def decode_answer(entries: Any, *, tags: tuple[str, ...], include_warning: bool,
                  datacenter: str) -> tuple[tuple[Endpoint, ...], tuple[DownInstance, ...]]:
    """(usable endpoints, instances down by their checks) of a health answer, by id."""
    if not isinstance(entries, list):
        raise DecodeError(f"answer: expected a JSON array, got {type(entries).__name__}")
    parsed: list[tuple[str, str, Mapping[str, Any], Mapping[str, Any], list[Any]]] = []
    for i, entry in enumerate(entries):
        where = f"[{i}]"
        if not isinstance(entry, Mapping):
            raise DecodeError(f"{where}: expected object")
        node = _field(entry, "Node", Mapping, where)
        service = _field(entry, "Service", Mapping, where)
        checks = entry.get("Checks") or []
        if not isinstance(checks, list) or not all(isinstance(c, Mapping) for c in checks):
            raise DecodeError(f"{where}.Checks: expected array of objects")
        sid = _field(service, "ID", str, f"{where}.Service")
        node_name = _field(node, "Node", str, f"{where}.Node")
        parsed.append((sid, node_name, node, service, checks))

    # Count over the whole answer, not the usable part, so an instance's id does not
    # change when a same-ID instance on another node merely turns critical.
    id_count = Counter(sid for sid, *_ in parsed)
    allowed = ("passing", "warning") if include_warning else ("passing",)
    out: list[Endpoint] = []
    down: list[DownInstance] = []
    for i, (sid, node_name, node, service, checks) in enumerate(parsed):
        status = aggregate_status(checks)
        eid = sid if id_count[sid] == 1 else f"{sid}@{node_name}"
        if status in allowed:
            endpoint = _endpoint(f"[{i}]", eid, node, service, status, tags, datacenter,
                                 routable=True)
            if endpoint is not None:
                out.append(endpoint)
            continue
        try:
            endpoint = _endpoint(f"[{i}]", eid, node, service, status, tags, datacenter,
                                 routable=False)
        except DecodeError:
            continue  # only listed, never routed: a broken one must not cost the answer
        if endpoint is not None:
            down.append(DownInstance(endpoint, check_reason(checks)))
    out.sort(key=lambda e: e.id)
    down.sort(key=lambda d: d.endpoint.id)
    return tuple(out), tuple(down)


# -- datacenter failover ------------------------------------------------------------------

def select_datacenter(order: Sequence[str], answers: Mapping[str, tuple[Endpoint, ...]],
                      unreachable: Collection[str] = ()
                      ) -> tuple[str, tuple[Endpoint, ...]] | None:
    """`(datacenter, endpoints)` to route to, `("", ())` when none has any, None: undecided.

    `answers` holds the latest decoded answer of each datacenter that answered at least
    once (kept across its later errors); `unreachable` the datacenters whose query failed
    before they ever answered. See the module's rules.
    """
    for dc in order:
        endpoints = answers.get(dc)
        if endpoints:
            return dc, endpoints
        if endpoints is None and dc not in unreachable:
            return None  # not heard from yet: wait rather than fail over too early
    if not any(dc in answers for dc in order):
        return None
    return "", ()


# -- blocking queries (https://developer.hashicorp.com/consul/api-docs/features/blocking,
#    "Implementation details") --------------------------------------------------------

def parse_index(header_value: str | None) -> int | None:
    """`X-Consul-Index` as an int, or None when missing or not a number."""
    if header_value is None:
        return None
    try:
        return int(header_value.strip())
    except ValueError:
        return None


def next_index(previous: int, header_value: str | None) -> int:
    """The `index` for the next blocking query after an answer carrying `header_value`.

    0 means "send no index": a plain read that answers at once.
    - Missing or unparseable header: we cannot block on anything known, so start over (0).
    - Lower than `previous`: the index went backwards (snapshot restore, a server that is
      behind when `stale`, ...); blocking on the old value could miss updates for an
      unbounded time, so reset to 0 and read afresh.
    - 0 or negative: a Consul bug. Blocking on it (or on no index) would answer at once
      forever, so use 1, which is always safe: it blocks until anything changes. This
      rule comes first: the answer that carried 0 is already in hand, so there is nothing
      to read afresh, and comparing a bogus 0 with `previous` would loop without blocking.
    """
    new = parse_index(header_value)
    if new is None:
        return 0
    if new < 1:
        return 1
    if new < previous:
        return 0
    return new


def backoff_delay(attempt: int, rng: random.Random, *, base: float = 0.1,
                  cap: float = 5.0) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)].

    Full jitter spreads the retries of many proxies that lost the same agent at once.
    `attempt` counts consecutive failures before this one (0 for the first retry).
    """
    ceiling = min(cap, base * (2 ** min(attempt, 32)))  # clamp the exponent: no overflow
    return rng.uniform(0.0, ceiling)


class TokenBucket:
    """Paces a loop: `burst` quick passes, then one per `interval` seconds.

    Consul's docs advise against a fixed sleep per iteration (it delays every update)
    and recommend a token bucket with a small burst, so the happy path never waits and
    a loop whose answers come back at once degrades into polling instead of spinning.
    Time is passed in; the bucket itself never sleeps.
    """

    def __init__(self, burst: int, interval: float) -> None:
        self.burst = burst
        self.interval = interval
        self._tokens = float(burst)
        self._last: float | None = None

    def take(self, now: float) -> float:
        """Spend one token; return how long to wait before it may be used (0 = at once)."""
        if self._last is not None and self.interval > 0:
            self._tokens = min(float(self.burst),
                               self._tokens + (now - self._last) / self.interval)
        self._last = now
        self._tokens -= 1.0
        # A negative balance is a debt the caller pays by waiting; refill repays it.
        return 0.0 if self._tokens >= 0 else -self._tokens * self.interval
