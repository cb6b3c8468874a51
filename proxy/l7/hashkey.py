"""The request key a `hash` balancer hashes on (`hash_key` in the config).

`source_ip` (the client address), `path` (the target without its query), `header:NAME`
(the first field NAME, case-insensitive), `cookie:NAME` (that cookie's value, RFC 6265
section 5.4 syntax). A request without the header or cookie has no key (None); the
balancer then falls back to its own choice.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.l7.message import MessageHead

KeyFunction = Callable[[MessageHead, bytes], "bytes | None"]


def _no_key(head: MessageHead, client_ip: bytes) -> bytes | None:
    return None


def _source_ip(head: MessageHead, client_ip: bytes) -> bytes | None:
    return client_ip


def _path(head: MessageHead, client_ip: bytes) -> bytes | None:
    return head.target.partition(b"?")[0]


def _header(name: bytes) -> KeyFunction:
    def key(head: MessageHead, client_ip: bytes) -> bytes | None:
        for field, value in head.headers:
            if len(field) == len(name) and field.lower() == name:
                return value
        return None

    return key


def _cookie(name: bytes) -> KeyFunction:
    prefix = name + b"="

    def key(head: MessageHead, client_ip: bytes) -> bytes | None:
        for field, value in head.headers:
            if len(field) == 6 and field.lower() == b"cookie":
                for pair in value.split(b";"):
                    pair = pair.strip()
                    if pair.startswith(prefix):
                        return pair[len(prefix):]
        return None

    return key


def key_function(balance: str, hash_key: str) -> KeyFunction:
    """The key function for an upstream; requests of non-hash upstreams have no key."""
    if balance != "hash":
        return _no_key
    kind, _sep, name = hash_key.partition(":")
    if kind == "header":
        return _header(name.lower().encode())
    if kind == "cookie":
        return _cookie(name.encode())
    return _path if kind == "path" else _source_ip
