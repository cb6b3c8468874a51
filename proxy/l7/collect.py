"""The field collector and the head rules both parsers share (httptools and h11).

A parser hands each field of a head to `HeadCollector.on_header` and, at the head's end,
builds the `MessageHead` with `request_head` / `response_head`, which hold it to the
request rules of `parsers.py` (version, Host, target, framing per `framing.py`). The
collector notes the few fields that framing or forwarding act on (`MessageHead.kinds`),
and, when the parser names the bytes the head arrived in (`raw`), whether every
field line is exactly as `headers.py` would write it, so that the head can be forwarded
as it came, with only its hop-by-hop lines cut out. Neither parser module imports the
other: both import this one.
"""

from __future__ import annotations

import functools
import re
from typing import Final

from proxy.l7.framing import (
    connection_tokens,
    request_framing,
    response_framing,
    wants_keep_alive,
)
from proxy.l7.message import (
    CONNECTION,
    CONTENT_LENGTH,
    FORWARDED_FOR,
    FORWARDED_PROTO,
    HOP_BY_HOP,
    HOST,
    LENGTH,
    NO_BODY,
    TRANSFER_ENCODING,
    UPGRADE,
    HeadTooLarge,
    MessageHead,
    ParseError,
)

KIND_OF_NAME: Final = {
    b"host": HOST,
    b"content-length": CONTENT_LENGTH,
    b"transfer-encoding": TRANSFER_ENCODING | HOP_BY_HOP,
    b"connection": CONNECTION | HOP_BY_HOP,
    b"keep-alive": HOP_BY_HOP,
    b"proxy-connection": CONNECTION | HOP_BY_HOP,  # llhttp honours its `close`
    b"te": HOP_BY_HOP,
    b"trailer": HOP_BY_HOP,
    b"upgrade": UPGRADE | HOP_BY_HOP,
    b"x-forwarded-for": FORWARDED_FOR,
    b"x-forwarded-proto": FORWARDED_PROTO,
}
# Looked up by the name as sent: the usual spellings are found at once, without
# lowercasing. Only a name of one of these lengths can be one of them: a bit per length,
# tested with integer operations (no hashing of the name, which is new bytes each time).
_KINDS: Final = {
    **KIND_OF_NAME,
    **{b"-".join(p.capitalize() for p in n.split(b"-")): k for n, k in KIND_OF_NAME.items()},
    b"TE": HOP_BY_HOP,
    # Usual fields of those lengths that are none of them (kind 0): found at once too,
    # instead of missing, lowercasing the name and missing again.
    **dict.fromkeys((
        b"Date", b"date", b"Vary", b"vary", b"ETag", b"etag", b"Link", b"link",
        b"Referer", b"referer", b"Expires", b"expires",
        b"User-Agent", b"user-agent", b"Set-Cookie", b"set-cookie",
        b"Accept-Encoding", b"accept-encoding", b"Accept-Language", b"accept-language",
        b"Content-Encoding", b"content-encoding", b"Content-Language", b"content-language",
        b"If-Modified-Since", b"if-modified-since"), 0),
}
_KIND_LENGTHS: Final = sum(1 << n for n in frozenset(len(n) for n in KIND_OF_NAME))
_LONGEST_KIND: Final = max(len(n) for n in KIND_OF_NAME)
_SP: Final = 32
_HTAB: Final = 9
_CR: Final = 13


class HeadCollector:
    """Gathers one head's fields and notes the few that framing or forwarding act on.

    The httptools parsers are collectors themselves, so llhttp calls straight into
    `on_header`, one Python call per field instead of two (a method of the class itself,
    not an alias assigned in a subclass body: mypyc compiles such an alias into an
    attribute httptools cannot call). Lists of values are made only for fields that are
    present (most heads have none of them).

    `raw` is the bytes the head arrived in, from its first byte, while every field line so
    far reads `Name: value` CRLF there (one space, no trailing whitespace); `raw_at` is
    where the next line starts in it. The parser sets both when a head begins a read and
    takes `raw[:raw_at + 2]` at the head's end; one that cannot say where its head began
    leaves `raw` None.
    """

    __slots__ = ("connection", "content_lengths", "drop_at", "drop_from", "head_size",
                 "headers", "hosts", "kinds", "max_head", "raw", "raw_at",
                 "transfer_encodings", "what")

    def __init__(self, max_head: int, what: str) -> None:
        self.max_head = max_head
        self.what = what
        self.raw: bytes | None = None
        self.raw_at = 0
        self.reset()

    def reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_lengths: list[bytes] | None = None
        self.transfer_encodings: list[bytes] | None = None
        self.connection: list[bytes] | None = None
        self.drop_at: list[int] | None = None  # indexes of hop-by-hop fields in `headers`
        self.drop_from: list[int] | None = None  # ... and where their lines start in `raw`
        self.kinds = 0
        self.hosts = 0
        self.head_size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        name_length = len(name)
        value_length = len(value)
        size = self.head_size = self.head_size + name_length + value_length + 4
        if size > self.max_head:
            raise HeadTooLarge(f"{self.what} head larger than {self.max_head} bytes")
        trailing_ows = False
        if value_length:
            last = value[-1]
            if last == _SP or last == _HTAB:  # llhttp keeps trailing OWS; h11 does not
                value = value.rstrip(b" \t")
                trailing_ows = True
                self.raw = None  # the line is not as it is forwarded
        raw = self.raw
        line_at = 0
        if raw is not None:
            line_at = self.raw_at
            # llhttp took `name` from the line's start, skipped the whitespace before the
            # value and ended the value at CR: one space before it and CR right after it
            # leave no other spelling of this line.
            space = line_at + name_length + 1
            cr = space + 1 + value_length
            try:
                if raw[space] == _SP and raw[cr] == _CR:
                    self.raw_at = cr + 2
                else:
                    self.raw = None
            except IndexError:
                self.raw = None
        headers = self.headers
        if name_length > _LONGEST_KIND or not (_KIND_LENGTHS >> name_length) & 1:
            headers.append((name, value))
            return
        kind = _KINDS.get(name)
        if not kind:
            if kind is None:  # not a usual spelling: another case of one, perhaps
                kind = KIND_OF_NAME.get(name.lower())
            if not kind:
                headers.append((name, value))
                return
        if kind & HOP_BY_HOP:
            if self.drop_at is None:
                self.drop_at = [len(headers)]
                self.drop_from = [line_at]
            else:
                self.drop_at.append(len(headers))
                if self.drop_from is not None:
                    self.drop_from.append(line_at)
        headers.append((name, value))
        self.kinds |= kind
        if kind == HOST:
            self.hosts += 1
        elif kind == CONTENT_LENGTH:
            if self.content_lengths is None:
                self.content_lengths = [value]
            else:
                self.content_lengths.append(value)
        elif kind & TRANSFER_ENCODING:
            if trailing_ows:  # llhttp does not read `chunked<TAB>` as chunked: no agreement
                raise ParseError("Transfer-Encoding with trailing whitespace")
            self.transfer_encodings = _appended(self.transfer_encodings, value)
        elif kind & CONNECTION:
            if self.connection is None:
                self.connection = [value]
            else:
                self.connection.append(value)


def _appended(values: list[bytes] | None, value: bytes) -> list[bytes]:
    if values is None:
        return [value]
    values.append(value)
    return values


NO_TOKENS: Final[frozenset[bytes]] = frozenset()
KEEP_ALIVE_TOKENS: Final = frozenset((b"keep-alive",))
CLOSE_TOKENS: Final = frozenset((b"close",))
_NO_VALUES: Final[list[bytes]] = []


@functools.lru_cache(maxsize=64)
def _tokens_of(value: bytes) -> frozenset[bytes]:
    # Servers and clients repeat a few Connection values.
    return connection_tokens([value])


def _tokens(values: list[bytes] | None) -> frozenset[bytes]:
    if values is None:
        return NO_TOKENS
    if len(values) == 1:
        value = values[0]
        # The two usual values, compared rather than hashed (the name is new bytes).
        if value == b"keep-alive":
            return KEEP_ALIVE_TOKENS
        if value == b"close":
            return CLOSE_TOKENS
        return _tokens_of(value)
    return connection_tokens(values)


def _check_target(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    """RFC 9112 section 3.2: origin-form, absolute-form naming the Host, or `*` (OPTIONS).
    A fragment is never sent (RFC 9110 section 4.2.5); a target that names another host
    than Host would route one way here and another way behind us."""
    if b"#" in target:
        raise ParseError("request target with a fragment (#)")
    if target[:1] == b"/":
        return
    if target == b"*" and method == b"OPTIONS":
        return
    scheme, sep, rest = target.partition(b"://")
    scheme = scheme.lower()
    if not sep or scheme not in _DEFAULT_PORTS:
        raise ParseError("request target not in origin or absolute form")
    authority = rest.split(b"/", 1)[0].split(b"?", 1)[0]
    host = next((v for n, v in headers if len(n) == 4 and n.lower() == b"host"), None)
    if host is None or _authority(authority, scheme) != _authority(host, scheme):
        raise ParseError("absolute request target naming another host than Host")


_DEFAULT_PORTS: Final = {b"http": b"80", b"https": b"443"}


def _authority(authority: bytes, scheme: bytes) -> bytes:
    host = authority.strip().lower()
    default = b":" + _DEFAULT_PORTS[scheme]
    return host.removesuffix(default)


def request_head(method: bytes, target: bytes, version: bytes, c: HeadCollector,
                 raw: bytes | None = None) -> MessageHead:
    """The request head the collector gathered (`raw`: its bytes, when the collector kept
    them and its request line reads `method SP target SP HTTP/1.1` CRLF)."""
    if version != b"1.1" and version != b"1.0":
        raise ParseError(f"unsupported HTTP version {version.decode(errors='replace')}")
    if c.hosts > 1 or (not c.hosts and version == b"1.1"):
        raise ParseError("more than one Host" if c.hosts else "missing Host")
    # partition(), not `in`: bytes.__contains__ tries an int needle first, and the TypeError
    # it raises and clears costs more than the scan; find() parses its arguments as a tuple.
    if target[:1] != b"/" or target.partition(b"#")[1]:
        _check_target(method, target, c.headers)
    if not (c.content_lengths or c.transfer_encodings or c.connection):
        # The common request (no body, no Connection field): nothing to decide.
        return MessageHead(method=method, target=target, version=version, headers=c.headers,
                           keep_alive=version == b"1.1", connection=NO_TOKENS, kinds=c.kinds,
                           drop_at=c.drop_at, raw=raw, drop_from=c.drop_from)
    framing, length = request_framing(c.content_lengths or _NO_VALUES,
                                      c.transfer_encodings or _NO_VALUES)
    tokens = _tokens(c.connection)
    # RFC 9112 section 6.1: HTTP/1.0 with Transfer-Encoding is served, then the connection
    # closes (its framing cannot be trusted by whoever reads after it).
    keep_alive = wants_keep_alive(version, tokens) and not (
        c.transfer_encodings and version == b"1.0")
    # An upgrade offered with a body is not passed on: the switch would come after a body
    # the instance reads as HTTP, and llhttp stops at the head of such a request. The
    # request is served as a plain one (Upgrade is hop-by-hop, so it is dropped).
    return MessageHead(method=method, target=target, version=version, headers=c.headers,
                       keep_alive=keep_alive, framing=framing, content_length=length,
                       upgrade=b"upgrade" in tokens and framing == NO_BODY, connection=tokens,
                       kinds=c.kinds, drop_at=c.drop_at, raw=raw, drop_from=c.drop_from)


_BAD_REASON: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]").search
_COMMON_REASONS: Final = frozenset((b"OK", b"Created", b"No Content", b"Not Modified",
                                    b"Found", b"Not Found", b"Moved Permanently",
                                    b"Bad Request", b"Internal Server Error",
                                    b"Service Unavailable"))


def response_head(status: int, reason: bytes, version: bytes, method: bytes,
                  c: HeadCollector, raw: bytes | None = None) -> MessageHead:
    """The response head the collector gathered (`raw`: its bytes, when the collector kept
    them and its status line reads `HTTP/1.1 SP status SP reason` CRLF, reason not empty)."""
    if version != b"1.1" and version != b"1.0":
        raise ParseError(f"unsupported HTTP version {version.decode(errors='replace')}")
    if status < 100:
        raise ParseError(f"invalid status {status}")
    lengths = c.content_lengths
    if status < 200 and (lengths or c.transfer_encodings):
        raise ParseError("a 1xx response with a body")  # llhttp would read one; we would not
    if reason != b"OK" and reason not in _COMMON_REASONS and _BAD_REASON(reason):
        raise ParseError("control character in the reason phrase")
    if (lengths is not None and c.transfer_encodings is None and len(lengths) == 1
            and status >= 200 and status != 204 and status != 304 and method != b"HEAD"):
        value = lengths[0]
        if value.isdigit() and len(value) <= 18:
            length: int | None = int(value)  # the common response, decided at once
            framing = LENGTH if length else NO_BODY
        else:
            framing, length = response_framing(status, method, lengths, _NO_VALUES)
    else:
        framing, length = response_framing(status, method, lengths or _NO_VALUES,
                                           c.transfer_encodings or _NO_VALUES)
    values = c.connection
    if values is None:
        tokens = NO_TOKENS
    elif len(values) == 1 and values[0] == b"keep-alive":  # _tokens(values), the usual case
        tokens = KEEP_ALIVE_TOKENS
    else:
        tokens = _tokens(values)
    if tokens is KEEP_ALIVE_TOKENS or (tokens is NO_TOKENS and version == b"1.1"):
        keep_alive = True
    else:
        keep_alive = wants_keep_alive(version, tokens)
    return MessageHead(status=status, reason=reason, version=version, headers=c.headers,
                       keep_alive=keep_alive, framing=framing,
                       content_length=length, upgrade=status == 101, connection=tokens,
                       kinds=c.kinds, drop_at=c.drop_at, raw=raw, drop_from=c.drop_from)
