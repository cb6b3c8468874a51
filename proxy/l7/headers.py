"""Header rewriting and head serialization for the proxied exchange (sans-I/O).

Requests go upstream as HTTP/1.1 with hop-by-hop headers dropped (RFC 9110 section 7.6.1:
Connection and every header it names, Keep-Alive, Proxy-Connection, TE, Trailer,
Transfer-Encoding, Upgrade), `X-Forwarded-For` appended with the client address and
`X-Forwarded-Proto` set when the client did not send one (`https` when the client came over
TLS: the caller passes `PROTO_HTTPS`). `Host` is kept. Framing is
re-established by us: Content-Length is forwarded, chunked bodies are re-chunked.
`X-Request-Id` is kept when the client sent one; otherwise the caller adds a new one
(`next_request_id`: 128 random bits as 32 hex digits).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from typing import Final

from proxy.l7.collect import CLOSE_TOKENS, KEEP_ALIVE_TOKENS
from proxy.l7.framing import connection_tokens
from proxy.l7.message import (
    CHUNKED,
    FORWARDED_FOR,
    FORWARDED_PROTO,
    HOST,
    LENGTH,
    NO_BODY,
    TRANSFER_ENCODING,
    UNTIL_CLOSE,
    UPGRADE,
    MessageHead,
)

HOP_BY_HOP: Final = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te",
                               b"trailer", b"transfer-encoding", b"upgrade"))
# Connection may name extension headers to drop, never the fields that frame the message
# or route it: dropping Content-Length while forwarding the body would let the body be
# read as the next request (request smuggling).
_PROTECTED: Final = frozenset((b"content-length", b"host"))
_CONTENT_LENGTH: Final = b"content-length"
_UPGRADE: Final = b"upgrade"
_XFF: Final = b"x-forwarded-for"
_XFP: Final = b"x-forwarded-proto"
_HOST: Final = b"host"
_CRLF: Final = b"\r\n"
_ACTED_ON_LENGTHS: Final = frozenset(
    len(n) for n in (*HOP_BY_HOP, *_PROTECTED, _CONTENT_LENGTH, _UPGRADE, _XFF, _XFP, _HOST))


def _forwardable(head: MessageHead, drop_length: bool = False
                 ) -> tuple[list[bytes], dict[bytes, bytes]]:
    """Header lines to forward and the values of the few headers we act on."""
    headers = head.headers
    tokens = head.connection
    if tokens is None:
        tokens = connection_tokens(
            [v for n, v in headers if len(n) == 10 and n.lower() == b"connection"])
    drop = HOP_BY_HOP | (tokens - _PROTECTED) if tokens else HOP_BY_HOP
    if drop_length:  # the body is re-chunked: a length would contradict it (RFC 9112 6.3)
        drop = drop | {_CONTENT_LENGTH}
    # Only a name of one of these lengths can need attention: the others are copied as
    # they are, without lowercasing (the per-request cost of a proxy is in such loops).
    lengths = _ACTED_ON_LENGTHS | {len(t) for t in tokens} if tokens else _ACTED_ON_LENGTHS
    lines: list[bytes] = []
    seen: dict[bytes, bytes] = {}
    for name, value in headers:
        if len(name) not in lengths:
            lines.append(name + b": " + value)
            continue
        lname = name.lower()
        if lname in drop:
            if lname == _UPGRADE:  # hop-by-hop, but an upgrade is offered on again
                seen[_UPGRADE] = value
            continue
        if lname == _XFF:
            seen[_XFF] = seen[_XFF] + b", " + value if _XFF in seen else value
            continue
        if lname == _XFP or lname == _HOST:
            seen[lname] = value
        lines.append(name + b": " + value)
    return lines, seen


# Fields only the full pass of `_forwardable` handles; without them, and with no Connection
# token but these, forwarding a head is dropping its hop-by-hop fields, which the parser
# found already (`MessageHead.drop_at`).
_NEEDS_FULL_PASS: Final = FORWARDED_FOR | UPGRADE | TRANSFER_ENCODING
_PLAIN_TOKENS: Final = frozenset((b"close", b"keep-alive"))
_CLOSE: Final = b"close"
_COLON_SPACE: Final = b": "


def _plain(head: MessageHead) -> bool:
    """Whether forwarding the head drops its hop-by-hop fields and changes nothing else."""
    kinds = head.kinds
    if kinds is None or kinds & _NEEDS_FULL_PASS:
        return False
    tokens = head.connection
    if tokens:
        if (tokens is not KEEP_ALIVE_TOKENS and tokens is not CLOSE_TOKENS
                and not tokens <= _PLAIN_TOKENS):
            return False
        # `Connection: close` would drop a field named Close too: leave that to the full pass.
        if _CLOSE in tokens and any(len(n) == 5 and n.lower() == _CLOSE
                                    for n, _v in head.headers):
            return False
    return True


def _plain_lines(head: MessageHead) -> list[bytes] | None:
    """The header lines to forward when the parser's notes suffice, else None."""
    if not _plain(head):
        return None
    lines = list(map(_COLON_SPACE.join, head.headers))
    drop_at = head.drop_at
    if drop_at is not None:
        for i in reversed(drop_at):
            del lines[i]
    return lines


def _kept(head: MessageHead, raw: bytes) -> bytes:
    """The head as received without its hop-by-hop lines and its final CRLF (`_plain`
    heads only: `raw` is `head.raw`)."""
    end = len(raw) - 2
    drop_at = head.drop_at
    drop_from = head.drop_from
    if drop_at is None or drop_from is None:
        return raw[:end]
    headers = head.headers
    pieces: list[bytes] = []
    at = 0
    for i, index in enumerate(drop_at):
        line_at = drop_from[i]
        name, value = headers[index]
        pieces.append(raw[at:line_at])
        at = line_at + len(name) + len(value) + 4
    if at == end and len(pieces) == 1:  # one hop-by-hop line, the last (Connection, often)
        return pieces[0]
    pieces.append(raw[at:end])
    return b"".join(pieces)


_X_REQUEST_ID: Final = b"x-request-id"
_REQUEST_ID_LINE: Final = b"X-Request-Id: "
# The X-Forwarded-Proto line added when the client sent none, by how the client came in;
# the listener's policy holds one, so choosing costs nothing per request.
PROTO_HTTP: Final = b"X-Forwarded-Proto: http\r\n"
PROTO_HTTPS: Final = b"X-Forwarded-Proto: https\r\n"
# Random bytes are read this many at a time: one getrandom(2) call per 256 request ids.
_RANDOM_BLOCK: Final = 16 * 256


def request_id_of(head: MessageHead) -> bytes | None:
    """The client's X-Request-Id (the first, if it sent several), or None."""
    for name, value in head.headers:
        if len(name) == 12 and name.lower() == _X_REQUEST_ID:
            return value
    return None


def _random_ids() -> Iterator[bytes]:
    while True:
        block = os.urandom(_RANDOM_BLOCK).hex().encode()
        for start in range(0, 2 * _RANDOM_BLOCK, 32):
            yield block[start:start + 32]


_ids = _random_ids()


def _fresh_ids_after_fork() -> None:
    # A forked worker must not hand out the ids its parent's buffer still holds.
    global _ids
    _ids = _random_ids()


os.register_at_fork(after_in_child=_fresh_ids_after_fork)


def next_request_id() -> bytes:
    """128 random bits as 32 lowercase hex digits, from os.urandom read in blocks: per
    request, a generator step instead of a system call (measured under callgrind: the
    cheapest of a generator, a list of ids, os.urandom(16) and random.getrandbits)."""
    return next(_ids)


def encode_request(head: MessageHead, *, client_ip: bytes, default_host: bytes,
                   request_id: bytes = b"", proto_line: bytes = PROTO_HTTP) -> bytes:
    """The request head as sent upstream; `request_id`, when given, is added as
    X-Request-Id (the caller found none in the request); `proto_line` (PROTO_HTTP or
    PROTO_HTTPS) is added when the client sent no X-Forwarded-Proto."""
    raw = head.raw
    kinds = head.kinds
    tokens = head.connection
    if (raw is not None and kinds is not None and not kinds & _NEEDS_FULL_PASS
            and (not tokens or _plain(head))):
        # The head as received, hop-by-hop lines cut out (`_plain`, the usual case inline).
        proto = b"" if kinds & FORWARDED_PROTO else proto_line
        host = b"" if kinds & HOST else b"Host: " + default_host + _CRLF
        if request_id:
            return b"".join((raw[:len(raw) - 2] if head.drop_at is None else _kept(head, raw),
                             b"X-Forwarded-For: ", client_ip, _CRLF, proto, host,
                             _REQUEST_ID_LINE, request_id, b"\r\n\r\n"))
        return b"".join((raw[:len(raw) - 2] if head.drop_at is None else _kept(head, raw),
                         b"X-Forwarded-For: ", client_ip, _CRLF, proto, host, _CRLF))
    lines = _plain_lines(head)
    if lines is not None:  # no X-Forwarded-For, Upgrade or Transfer-Encoding to act on
        kinds = head.kinds or 0
        lines.append(b"X-Forwarded-For: " + client_ip)
        if not kinds & FORWARDED_PROTO:
            lines.append(proto_line[:-2])
        if not kinds & HOST:
            lines.append(b"Host: " + default_host)
        if request_id:
            lines.append(_REQUEST_ID_LINE + request_id)
        return b"".join((head.method, b" ", head.target, b" HTTP/1.1\r\n",
                         _CRLF.join(lines), b"\r\n\r\n"))
    lines, seen = _forwardable(head, drop_length=head.framing == CHUNKED)
    xff = seen.get(_XFF)
    lines.append(b"X-Forwarded-For: " + (xff + b", " + client_ip if xff else client_ip))
    if _XFP not in seen:
        lines.append(proto_line[:-2])
    if _HOST not in seen:  # an HTTP/1.0 client may omit Host; HTTP/1.1 upstreams need it
        lines.append(b"Host: " + default_host)
    if head.framing == CHUNKED:
        lines.append(b"Transfer-Encoding: chunked")
    upgrade = seen.get(_UPGRADE)
    if request_id:
        lines.append(_REQUEST_ID_LINE + request_id)
    if head.upgrade and upgrade:  # RFC 9110 section 7.8: offer the same protocols onward
        lines.append(b"Upgrade: " + upgrade)
        lines.append(b"Connection: Upgrade")
    return b"".join((head.method, b" ", head.target, b" HTTP/1.1\r\n",
                     _CRLF.join(lines), b"\r\n\r\n"))


def encode_response(head: MessageHead, *, request_version: bytes,
                    request_keep_alive: bool) -> tuple[bytes, bool, bool]:
    """(head bytes, chunk-encode the body?, keep the client connection?)."""
    framing = head.framing
    rechunk = framing == CHUNKED or framing == UNTIL_CLOSE
    raw = head.raw
    kinds = head.kinds
    tokens = head.connection
    if (raw is not None and not rechunk and kinds is not None and not kinds & _NEEDS_FULL_PASS
            and (not tokens or tokens is KEEP_ALIVE_TOKENS or _plain(head))):
        # The head as received, hop-by-hop lines cut out (`_plain`, the usual case inline),
        # its persistence said anew.
        kept = raw[:len(raw) - 2] if head.drop_at is None else _kept(head, raw)
        if not request_keep_alive:
            return kept + b"Connection: close\r\n\r\n", False, False
        if request_version != b"1.1":
            return kept + b"Connection: keep-alive\r\n\r\n", False, True
        return kept + _CRLF, False, True
    lines = None if rechunk else _plain_lines(head)
    if lines is None:
        lines, _seen = _forwardable(head, drop_length=rechunk)
    keep = request_keep_alive
    chunk = False
    if rechunk:
        if request_version == b"1.1":
            chunk = True
            lines.append(b"Transfer-Encoding: chunked")
        else:
            keep = False  # an HTTP/1.0 client learns the end of the body from the close
    if not keep:
        lines.append(b"Connection: close")
    elif request_version != b"1.1":
        lines.append(b"Connection: keep-alive")
    status_line = _status_line(head.status, head.reason or b"-")
    if not lines:
        return status_line + _CRLF, chunk, keep
    return b"".join((status_line, _CRLF.join(lines), b"\r\n\r\n")), chunk, keep


@functools.lru_cache(maxsize=64)
def _status_line(status: int, reason: bytes) -> bytes:
    # Formatting one costs more than the rest of a small response head; servers repeat a few.
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


def is_upgrade_request(head: MessageHead) -> bool:
    """`Connection: upgrade` with an `Upgrade` field: the client offers a protocol switch."""
    return head.upgrade and any(len(n) == 7 and n.lower() == _UPGRADE for n, _v in head.headers)


def encode_switching(head: MessageHead) -> bytes:
    """A 101 Switching Protocols passed to the client, naming the protocol switched to."""
    lines, seen = _forwardable(head)
    if _UPGRADE in seen:
        lines.append(b"Upgrade: " + seen[_UPGRADE])
    lines.append(b"Connection: Upgrade")
    return b"".join((b"HTTP/1.1 101 %s\r\n" % (head.reason or b"Switching Protocols"),
                     _CRLF.join(lines), b"\r\n\r\n"))


def encode_interim(head: MessageHead) -> bytes:
    """A 1xx response (e.g. 100 Continue) passed through to the client."""
    lines, _seen = _forwardable(head)
    out = b"HTTP/1.1 %d %s\r\n" % (head.status, head.reason or b"-")
    return out + b"".join(line + _CRLF for line in lines) + _CRLF


# Reason phrases of the statuses sdproxy answers itself (SPEC "HTTP mode").
REASONS: Final[dict[int, bytes]] = {
    400: b"Bad Request", 404: b"Not Found", 408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
}


def encode_error(status: int, reason: bytes, upstream: str, detail: str,
                 keep_alive: bool) -> bytes:
    """A short text response sdproxy makes itself, naming the upstream."""
    body = f"sdproxy: upstream {upstream}: {detail}\n".encode()
    return b"".join((
        b"HTTP/1.1 %d %s\r\n" % (status, reason),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"" if keep_alive else b"Connection: close\r\n",
        b"X-Sdproxy-Error: 1\r\n\r\n",
        body,
    ))


def host_field(head: MessageHead) -> bytes | None:
    """The request's Host value; None when it has none (an HTTP/1.0 request may not)."""
    kinds = head.kinds
    if kinds is not None and not kinds & HOST:
        return None
    for name, value in head.headers:
        if len(name) == 4 and name.lower() == _HOST:
            return value
    return None


def chunk(data: bytes) -> bytes:
    # An empty chunk would be the last-chunk marker and end the body early.
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


LAST_CHUNK: Final = b"0\r\n\r\n"

__all__ = [
    "CHUNKED",
    "LAST_CHUNK",
    "LENGTH",
    "NO_BODY",
    "UNTIL_CLOSE",
    "chunk",
    "encode_error",
    "encode_interim",
    "encode_request",
    "encode_response",
    "host_field",
]
