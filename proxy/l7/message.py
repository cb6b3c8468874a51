"""Parser-neutral HTTP/1.x message events.

Both parsers (httptools and h11) turn bytes into the same three calls on a sink:
`on_head(MessageHead)`, `on_body(bytes)`, `on_end()`. The proxy logic sees only these, so
either parser can drive it. Header names keep the case the peer sent; comparisons use
`lower()`d names.
"""

from __future__ import annotations

from typing import Final, Protocol

# Framing of a message body (RFC 9112 section 6).
NO_BODY: Final = 0
LENGTH: Final = 1
CHUNKED: Final = 2
UNTIL_CLOSE: Final = 3

# What a parser notes about a field, by name (bits of `MessageHead.kinds`), so that
# forwarding (headers.py) need not look at every field again.
HOST: Final = 1
CONTENT_LENGTH: Final = 2
TRANSFER_ENCODING: Final = 4
CONNECTION: Final = 8
HOP_BY_HOP: Final = 16  # dropped when forwarding (RFC 9110 section 7.6.1)
UPGRADE: Final = 32
FORWARDED_FOR: Final = 64
FORWARDED_PROTO: Final = 128

IDEMPOTENT_METHODS: Final = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))


class MessageHead:
    """The head of a request or a response, with the framing the parser decided."""

    __slots__ = (
        "connection",
        "content_length",
        "drop_at",
        "drop_from",
        "framing",
        "headers",
        "keep_alive",
        "kinds",
        "method",
        "raw",
        "reason",
        "status",
        "target",
        "upgrade",
        "version",
    )

    def __init__(self, *, method: bytes = b"", target: bytes = b"", status: int = 0,
                 reason: bytes = b"", version: bytes = b"1.1",
                 headers: list[tuple[bytes, bytes]] | None = None, keep_alive: bool = True,
                 framing: int = NO_BODY, content_length: int | None = None,
                 upgrade: bool = False, connection: frozenset[bytes] | None = None,
                 kinds: int | None = None, drop_at: list[int] | None = None,
                 raw: bytes | None = None, drop_from: list[int] | None = None) -> None:
        self.method = method
        # Tokens of the Connection fields, lowercased, when the parser collected them
        # (None: not known, derive from `headers`).
        self.connection = connection
        self.target = target
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers if headers is not None else []
        self.keep_alive = keep_alive
        self.framing = framing
        self.content_length = content_length
        self.upgrade = upgrade
        # What the parser noted while collecting `headers` (the kind bits above; None:
        # not known, so forwarding looks at every field) and the indexes of the
        # hop-by-hop fields among them.
        self.kinds = kinds
        self.drop_at = drop_at
        # The head's bytes as received, when each of its lines is exactly as forwarding
        # writes it (start line as HTTP/1.1, `Name: value` CRLF fields): forwarding then
        # copies them and cuts out the hop-by-hop lines, which start at `drop_from` (in
        # the order of `drop_at`). None: the head is written from `headers`.
        self.raw = raw
        self.drop_from = drop_from

    def __repr__(self) -> str:
        first = (f"{self.method!r} {self.target!r}" if self.method else f"{self.status}")
        return f"MessageHead({first} HTTP/{self.version.decode()} framing={self.framing})"


class MessageSink(Protocol):
    def on_head(self, head: MessageHead) -> None: ...

    def on_body(self, data: bytes) -> None: ...

    def on_end(self) -> None: ...


class ParseError(Exception):
    """The peer sent bytes that are not valid HTTP/1.x (maps to 400 for a client)."""


class HeadTooLarge(ParseError):
    """The head grew past the configured limit (maps to 431 for a client)."""
