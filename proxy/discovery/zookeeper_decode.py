"""Pure rules for ZooKeeper discovery: Curator service-instance znodes -> endpoints.

Owns what Apache Curator's service-discovery layout means for routing: under
`<base>/<service>` every child znode is one instance, named by its id, holding the JSON
Curator's `JsonInstanceSerializer` writes (`{"name", "id", "address", "port", "sslPort",
"payload", "registrationTimeUTC", "serviceType", "uriSpec", "enabled"}`). Must not know:
ZooKeeper sessions, watches, kazoo, asyncio; the I/O shell (`discovery/zookeeper.py`)
reads the children and their data and passes them in.

Rules of `decode`:
- id = the znode name (SPEC "Endpoint ids"), not the JSON `id`: the name is unique under
  the service's znode, the JSON is whatever the registrant wrote.
- address = `address` (an IPv4 or IPv6 literal or a host name; IPv6 may come bracketed),
  port = `port` (an integer 1..65535). `sslPort`, when an integer, is kept in the
  endpoint's meta as `ssl_port` (for the admin API); sdproxy routes to `port`. `payload`
  and the other fields are ignored.
- `enabled: false` (Curator 4's flag for an instance taken out of rotation) leaves the
  instance out, as Curator's own ServiceProvider does.
- Each znode stands alone (ZooKeeper writes a znode's data atomically, so a broken one is
  a broken registrant, not a half-written answer): one that is not such JSON is skipped
  with a reason, and the others still route. Skipped ones are returned so that the
  caller can log them.
- Output sorted by id: the same instances give the same tuple whatever the order
  ZooKeeper lists the children in.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.model import Endpoint

# Curator's serializer writes a few hundred bytes; ZooKeeper caps a znode at 1 MiB.
MAX_INSTANCE_BYTES = 64 * 1024


class DecodeError(ValueError):
    """One instance znode does not hold a routable Curator instance; says why."""


@dataclass(frozen=True, slots=True)
class Decoded:
    """What a service's children say: the routable endpoints, and the znodes left out
    with the reason (`disabled`, or what is wrong with their data), both sorted by id."""

    endpoints: tuple[Endpoint, ...]
    skipped: tuple[tuple[str, str], ...] = ()


def decode(children: Mapping[str, bytes]) -> Decoded:
    """Every child znode name -> its data, decoded into the routable endpoints."""
    endpoints: list[Endpoint] = []
    skipped: list[tuple[str, str]] = []
    for name in sorted(children):
        try:
            endpoint = decode_instance(name, children[name])
        except DecodeError as exc:
            skipped.append((name, str(exc)))
            continue
        if endpoint is None:
            skipped.append((name, "disabled (enabled: false)"))
        else:
            endpoints.append(endpoint)
    return Decoded(tuple(endpoints), tuple(skipped))


def decode_instance(name: str, data: bytes) -> Endpoint | None:
    """One znode -> its Endpoint, None when Curator's `enabled` is false; DecodeError
    when the data is not a routable instance."""
    doc = _load(data)
    if doc.get("enabled") is False:
        return None
    address = _address(doc.get("address"))
    ssl_port = _optional_port(doc.get("sslPort"), "sslPort")
    port = doc.get("port")
    if port is None and ssl_port is not None:
        raise DecodeError(f"no port, only sslPort {ssl_port} (sdproxy routes to `port`)")
    port = _optional_port(port, "port")
    if port is None:
        raise DecodeError("no port")
    meta = (("ssl_port", str(ssl_port)),) if ssl_port is not None else ()
    return Endpoint(id=name, address=address, port=port, meta=meta)


def _load(data: bytes) -> dict[str, Any]:
    if not data:
        raise DecodeError("empty znode (a Curator instance holds JSON)")
    if len(data) > MAX_INSTANCE_BYTES:
        raise DecodeError(f"data larger than {MAX_INSTANCE_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise DecodeError(f"invalid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DecodeError(f"expected a JSON object, got {_kind(doc)}")
    return doc


def _address(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise DecodeError(f"address: expected a non-empty string, got {_kind(value)}")
    bracketed = value.startswith("[") and value.endswith("]")
    host = value[1:-1] if bracketed else value
    if bracketed or ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise DecodeError(f"address: {json.dumps(value)} is neither a host name "
                              "nor an IP address") from None
    elif any(c.isspace() or c in "/[]\"'" for c in host):
        raise DecodeError(f"address: invalid host {json.dumps(value)}")
    return host


def _optional_port(value: object, key: str) -> int | None:
    if value is None:
        return None
    # bool is an int in Python; a JSON `true` is never a port.
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodeError(f"{key}: expected an integer, got {_kind(value)}")
    if not 1 <= value <= 65535:
        raise DecodeError(f"{key}: must be 1..65535, got {value}")
    return value


def _kind(value: object) -> str:
    """A JSON type name for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string" if value else "empty string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
