"""Pure rules for etcd discovery: Registrator's keys -> endpoints, and the v3 gateway's JSON.

Owns what etcd's answers mean, never how they are fetched (`discovery/etcd.py`, the I/O
shell, does that): the key range of one service, the request bodies of a range and of a
watch, the decoding of range answers and watch messages (keys and values are base64 in
the gateway's JSON, revisions are decimal strings), and the key/value -> Endpoint rule.
Must not know: sockets, asyncio, clocks, pools.

Rules (SPEC "More registries"):
- Registrator's etcd layout: one key per instance, `<prefix>/<service>/<id>`, whose value
  is `ip:port` (`[v6]:port` and `host:port` too, as file discovery reads them). The
  endpoint id is the `<id>` segment.
- A key directly under `<prefix>/<service>/` with a value that is not `host:port`, an id
  that is empty or not UTF-8, or a deeper key (`<id>/more`, not Registrator's) is left
  out with a reason (`Decoded.rejected`): one broken registration must not freeze or
  empty the whole upstream, and the reason is logged once by the shell.
- Endpoints come out sorted by id, so the same set of keys is the same tuple.
- A gateway error (`{"error": ...}`, at the top or inside a stream message) raises
  `EtcdAnswerError` with etcd's own message; JSON that is not what the gateway sends
  raises `EtcdDecodeError`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.discovery.file_decode import parse_hostport
from proxy.model import Endpoint

PUT = "PUT"
DELETE = "DELETE"


class EtcdDecodeError(ValueError):
    """The JSON is not a gateway answer of the expected shape; says what is wrong."""


class EtcdAnswerError(Exception):
    """etcd (or its gateway) answered with an error; carries its message and gRPC code."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class RangeAnswer:
    """Every key of the range at `revision` (the store's revision when it was read)."""

    revision: int
    kvs: tuple[KeyValue, ...]


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # PUT or DELETE
    key: bytes
    value: bytes  # b"" for DELETE


@dataclass(frozen=True, slots=True)
class WatchMessage:
    """One message of a `/v3/watch` stream."""

    revision: int  # the store's revision as of this message (0 when etcd left it out)
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0  # > 0: the start revision was compacted; read again
    cancel_reason: str = ""
    events: tuple[Event, ...] = ()


@dataclass(frozen=True, slots=True)
class Decoded:
    """The endpoints of one service, and the keys left out with the reason for each."""

    endpoints: tuple[Endpoint, ...]
    rejected: tuple[tuple[str, str], ...] = ()  # (key as text, why)


# -- keys ----------------------------------------------------------------------------------
def service_prefix(prefix: str, service: str) -> bytes:
    """`<prefix>/<service>/`: every key of the service's instances starts with it."""
    return f"{prefix.rstrip('/')}/{service}/".encode()


def range_end(start: bytes) -> bytes:
    """etcd's range end for "every key that starts with `start`" (clientv3.GetPrefixRangeEnd):
    the prefix with its last byte below 0xff incremented, the 0xff bytes after it dropped;
    b"\\0" (to the end of the key space) when every byte is 0xff."""
    end = bytearray(start)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def range_request(start: bytes) -> dict[str, Any]:
    """The body of `/v3/kv/range` for every key under `start` (a linearizable read)."""
    return {"key": b64(start), "range_end": b64(range_end(start))}


def probe_request(start: bytes) -> dict[str, Any]:
    """A range that returns no keys, only the count: cheap, and linearizable, so it fails
    on a member that lost its leader as a watch there would silently stop."""
    return {**range_request(start), "count_only": True}


def watch_request(start: bytes, start_revision: int) -> dict[str, Any]:
    """The body of `/v3/watch` for every key under `start`, from `start_revision` on."""
    return {"create_request": {**range_request(start), "start_revision": str(start_revision)}}


# -- answers -------------------------------------------------------------------------------
def _object(doc: object, what: str) -> Mapping[str, Any]:
    if not isinstance(doc, dict):
        raise EtcdDecodeError(f"{what}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _raise_error(doc: Mapping[str, Any]) -> None:
    """Raise EtcdAnswerError for the gateway's two error shapes: `{"error": "...",
    "message": "...", "code": N}` (a failed call) and `{"error": {"message": ...,
    "grpc_code": N, ...}}` (a stream that failed after it started)."""
    error = doc.get("error")
    if error is None:
        return
    if isinstance(error, dict):
        message = error.get("message") or json.dumps(error)
        code = error.get("grpc_code", error.get("code"))
    else:
        message = doc.get("message") or str(error)
        code = doc.get("code")
    raise EtcdAnswerError(str(message), code if isinstance(code, int) else None)


def _int(doc: Mapping[str, Any], key: str, what: str) -> int:
    """An int64 field: the gateway writes them as decimal strings; absent means 0."""
    value = doc.get(key, 0)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isascii() and value.lstrip("-").isdigit():
        return int(value)
    raise EtcdDecodeError(f"{what}.{key}: expected an integer, got {json.dumps(value)}")


def _bytes(doc: Mapping[str, Any], key: str, what: str) -> bytes:
    value = doc.get(key, "")
    if not isinstance(value, str):
        raise EtcdDecodeError(f"{what}.{key}: expected base64 text, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EtcdDecodeError(f"{what}.{key}: not base64: {value[:40]!r}") from None


def _revision(doc: Mapping[str, Any], what: str) -> int:
    header = doc.get("header", {})
    return _int(_object(header, f"{what}.header"), "revision", f"{what}.header")


def _kvs(items: object, what: str) -> tuple[KeyValue, ...]:
    if not isinstance(items, list):
        raise EtcdDecodeError(f"{what}: expected an array, got {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        kv = _object(item, f"{what}[{i}]")
        out.append(KeyValue(_bytes(kv, "key", f"{what}[{i}]"),
                            _bytes(kv, "value", f"{what}[{i}]")))
    return tuple(out)


def decode_range(doc: object) -> RangeAnswer:
    """A `/v3/kv/range` answer."""
    answer = _object(doc, "range answer")
    _raise_error(answer)
    return RangeAnswer(_revision(answer, "range"), _kvs(answer.get("kvs", []), "range.kvs"))


def decode_watch_line(line: bytes) -> WatchMessage:
    """One line of a `/v3/watch` stream (the gateway writes one JSON object a line)."""
    try:
        doc = json.loads(line)
    except ValueError as exc:
        raise EtcdDecodeError(f"watch: invalid JSON: {exc}") from None
    outer = _object(doc, "watch")
    _raise_error(outer)
    result = _object(outer.get("result"), "watch.result")
    _raise_error(result)
    events = []
    raw_events = result.get("events", [])
    if not isinstance(raw_events, list):
        raise EtcdDecodeError("watch.result.events: expected an array")
    for i, raw in enumerate(raw_events):
        event = _object(raw, f"watch.events[{i}]")
        kind = event.get("type", PUT)  # PUT is the enum's zero value: the gateway omits it
        if kind not in (PUT, DELETE):
            raise EtcdDecodeError(f"watch.events[{i}].type: unknown {json.dumps(kind)}")
        kv = _object(event.get("kv", {}), f"watch.events[{i}].kv")
        key = _bytes(kv, "key", f"watch.events[{i}].kv")
        value = _bytes(kv, "value", f"watch.events[{i}].kv") if kind == PUT else b""
        events.append(Event(kind, key, value))
    return WatchMessage(
        revision=_revision(result, "watch"),
        created=result.get("created") is True,
        canceled=result.get("canceled") is True,
        compact_revision=_int(result, "compact_revision", "watch"),
        cancel_reason=str(result.get("cancel_reason", "")),
        events=tuple(events))


# -- keys -> endpoints -----------------------------------------------------------------------
def apply_events(entries: Mapping[bytes, bytes],
                 events: tuple[Event, ...]) -> dict[bytes, bytes]:
    """The key -> value map after `events`, in order (a new dict; `entries` is kept)."""
    out = dict(entries)
    for event in events:
        if event.kind == PUT:
            out[event.key] = event.value
        else:
            out.pop(event.key, None)
    return out


def decode_entry(key: bytes, value: bytes, start: bytes) -> Endpoint | str:
    """The endpoint of one key under `start` (`service_prefix`), or why it has none."""
    try:
        iid = key[len(start):].decode("utf-8")
    except UnicodeDecodeError:
        return "the id is not UTF-8"
    if not iid:
        return "no id after the service name"
    if "/" in iid:
        return "not <prefix>/<service>/<id> (a deeper key)"
    try:
        text = value.decode("utf-8").strip()
    except UnicodeDecodeError:
        return "the value is not UTF-8"
    try:
        addr = parse_hostport(text)
    except ValueError as exc:
        return f"the value is not ip:port: {exc}"
    return Endpoint(id=iid, address=addr.host, port=addr.port)


def decode_entries(entries: Mapping[bytes, bytes], start: bytes) -> Decoded:
    """Every key under `start` -> the service's endpoints (sorted by id) and rejects."""
    endpoints: list[Endpoint] = []
    rejected: list[tuple[str, str]] = []
    for key, value in entries.items():
        if not key.startswith(start):
            continue  # not ours (a caller's range is wider); never an error
        found = decode_entry(key, value, start)
        if isinstance(found, Endpoint):
            endpoints.append(found)
        else:
            rejected.append((key.decode("utf-8", "backslashreplace"), found))
    endpoints.sort(key=lambda ep: ep.id)
    rejected.sort()
    return Decoded(tuple(endpoints), tuple(rejected))
