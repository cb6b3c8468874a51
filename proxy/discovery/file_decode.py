"""Pure rules for file discovery: a containerpilot services.json -> endpoints.

Owns what the file means: `{"service-name": ["ip:port", "[v6]:port", ...], ...}`, where an
upstream takes the list under its own name. Must not know: files, clocks, asyncio; the
I/O shell (`discovery/file.py`) reads the bytes and passes them in.

Rules of `decode`:
- The whole file is one answer: if any part of it is broken (not UTF-8/JSON, trailing
  garbage, not an object, a value that is not an array, an entry that is not a
  `host:port` string with a port 1..65535), `DecodeError` names the first problem and
  nothing is returned. A writer that is halfway through the file must not shrink the
  pool to the entries it has written so far; the caller keeps the last good answer.
  Every service's list is checked, not only ours: a broken neighbour means a broken
  (probably half-written) file.
- A missing service key is a valid answer with zero endpoints (the service has no
  instances right now).
- id = `address:port` (SPEC "Endpoint ids"), IPv6 in brackets, as static discovery
  writes it. Duplicate entries collapse into one (one instance, one breaker).
- Output sorted by id: the same set of instances gives the same tuple whatever the
  file's order, so reordering the file is not a change.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from proxy.model import Address, Endpoint

# A services.json lists a few hundred instances at most; a file far larger than this is
# not one (a wrong path), and reading it every change would cost the loop's worker pool.
MAX_FILE_BYTES = 4 * 1024 * 1024


class DecodeError(ValueError):
    """The bytes are not a (complete) containerpilot services file; says what is wrong."""


def decode(data: bytes, service: str) -> tuple[Endpoint, ...]:
    """The endpoints listed under `service` in the file `data`, sorted by id."""
    doc = _load(data)
    ours: tuple[Endpoint, ...] = ()
    for name, entries in doc.items():
        endpoints = _service(name, entries)
        if name == service:
            ours = endpoints
    return ours


def _load(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_FILE_BYTES:
        raise DecodeError(f"file larger than {MAX_FILE_BYTES} bytes")
    if not data.strip():
        # What a reader sees between a writer's truncate and its write.
        raise DecodeError("empty file")
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as exc:
        # "Expecting ',' delimiter: line 1 column 30 (char 29)"; "Extra data: ..." for
        # trailing garbage.
        raise DecodeError(f"invalid JSON: {exc}") from None
    except (UnicodeDecodeError, RecursionError) as exc:
        raise DecodeError(f"invalid JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(doc, dict):
        raise DecodeError(f"expected a JSON object of service name -> array, "
                          f"got {_kind(doc)}")
    return doc


def _service(name: str, entries: object) -> tuple[Endpoint, ...]:
    where = json.dumps(name)
    if not isinstance(entries, list):
        raise DecodeError(f"{where}: expected an array of \"host:port\", got {_kind(entries)}")
    by_id: dict[str, Endpoint] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, str):
            raise DecodeError(f"{where}[{i}]: expected a \"host:port\" string, "
                              f"got {_kind(entry)}")
        try:
            addr = parse_hostport(entry)
        except ValueError as exc:
            raise DecodeError(f"{where}[{i}]: {exc}") from None
        ep = Endpoint(id=str(addr), address=addr.host, port=addr.port)
        by_id.setdefault(ep.id, ep)
    return tuple(by_id[k] for k in sorted(by_id))


def parse_hostport(text: str) -> Address:
    """`"10.0.0.1:80"`, `"host:80"` or `"[fd00::1]:80"` -> Address; ValueError says why."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f'expected "[IPv6]:port", got {json.dumps(text)}')
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{json.dumps(host)} is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f'expected "host:port", got {json.dumps(text)}')
        if ":" in host:
            raise ValueError(f'IPv6 addresses need brackets: "[{host}]:{port}"')
    if not host or any(c.isspace() or c in "/[]\"'" for c in host):
        raise ValueError(f"invalid host in {json.dumps(text)}")
    # isascii: "١٢" is digits to str.isdigit() and int(), but not a port anyone wrote.
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"port must be 1..65535, got {json.dumps(port)}")
    return Address(host, int(port))


def _kind(value: object) -> str:
    """A JSON type name for messages: object, array, string, number, boolean, null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    return type(value).__name__
