"""Bytes -> parser-neutral events, with httptools (llhttp, default) or h11 (fallback).

Each parser calls `sink.on_head / on_body / on_end` (see `message.py`). `feed(data)`
returns None, or the offset in `data` where an upgrade (RFC 9110 section 7.8) left HTTP.
Requests that follow a complete one on the same connection (pipelining) are parsed at
once; the caller queues their events. Head size is bounded by `max_head` (-> 431).

Both parsers enforce the same request rules, so either may drive the proxy: HTTP/1.0
or 1.1 only; exactly one Host on 1.1 (RFC 9112 section 3.2); framing per `framing.py`;
trailing whitespace is not part of a field value (RFC 9110 section 5.5); trailer
fields never join the head already delivered (the proxy re-chunks without them).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from typing import Final, Protocol

import httptools

from proxy.l7.framing import (
    connection_tokens,
    request_framing,
    response_framing,
    wants_keep_alive,
)
from proxy.l7.message import (
    CHUNKED,
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
    MessageSink,
    ParseError,
)


class RequestParser(Protocol):
    def feed(self, data: bytes) -> int | None: ...


class ResponseParser(Protocol):
    def expect(self, request_method: bytes, upgrade: bool = False) -> None:
        """Announce the request whose response comes next (HEAD has no body; only a
        request that offered an upgrade may be answered with 101)."""

    def feed(self, data: bytes) -> int | None: ...


_KIND_OF_NAME: Final = {
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
# lowercasing; only a name of one of these lengths can still be one of them.
_KINDS: Final = {
    **_KIND_OF_NAME,
    **{b"-".join(p.capitalize() for p in n.split(b"-")): k for n, k in _KIND_OF_NAME.items()},
    b"TE": HOP_BY_HOP,
}
_KIND_LENGTHS: Final = frozenset(len(n) for n in _KIND_OF_NAME)
_OWS: Final = (32, 9)


class _HeadCollector:
    """Gathers one head's fields and notes the few that framing or forwarding act on.

    The httptools parsers are collectors themselves, so llhttp calls straight into
    `on_header`, one Python call per field instead of two (a method of the class itself,
    not an alias assigned in a subclass body: mypyc compiles such an alias into an
    attribute httptools cannot call). Lists of values are made only for fields that are
    present (most heads have none of them).
    """

    __slots__ = ("connection", "content_lengths", "drop_at", "head_size", "headers", "hosts",
                 "kinds", "max_head", "transfer_encodings", "what")

    def __init__(self, max_head: int, what: str) -> None:
        self.max_head = max_head
        self.what = what
        self.reset()

    def reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_lengths: list[bytes] | None = None
        self.transfer_encodings: list[bytes] | None = None
        self.connection: list[bytes] | None = None
        self.drop_at: list[int] | None = None  # indexes of hop-by-hop fields in `headers`
        self.kinds = 0
        self.hosts = 0
        self.head_size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self.head_size = self.head_size + len(name) + len(value) + 4
        if size > self.max_head:
            raise HeadTooLarge(f"{self.what} head larger than {self.max_head} bytes")
        if value and value[-1] in _OWS:  # llhttp keeps trailing OWS; h11 does not
            value = value.rstrip(b" \t")
            trailing_ows = True
        else:
            trailing_ows = False
        headers = self.headers
        kind = _KINDS.get(name)
        if kind is None:
            if len(name) not in _KIND_LENGTHS:
                headers.append((name, value))
                return
            kind = _KIND_OF_NAME.get(name.lower())
            if kind is None:
                headers.append((name, value))
                return
        if kind & HOP_BY_HOP:
            if self.drop_at is None:
                self.drop_at = [len(headers)]
            else:
                self.drop_at.append(len(headers))
        headers.append((name, value))
        self.kinds |= kind
        if kind == HOST:
            self.hosts += 1
        elif kind == CONTENT_LENGTH:
            self.content_lengths = _appended(self.content_lengths, value)
        elif kind & TRANSFER_ENCODING:
            if trailing_ows:  # llhttp does not read `chunked<TAB>` as chunked: no agreement
                raise ParseError("Transfer-Encoding with trailing whitespace")
            self.transfer_encodings = _appended(self.transfer_encodings, value)
        elif kind & CONNECTION:
            self.connection = _appended(self.connection, value)


def _appended(values: list[bytes] | None, value: bytes) -> list[bytes]:
    if values is None:
        return [value]
    values.append(value)
    return values


_NO_TOKENS: Final[frozenset[bytes]] = frozenset()
_NO_VALUES: Final[list[bytes]] = []


@functools.lru_cache(maxsize=64)
def _tokens_of(value: bytes) -> frozenset[bytes]:
    # Servers and clients repeat a few Connection values ("keep-alive", "close").
    return connection_tokens([value])


def _tokens(values: list[bytes] | None) -> frozenset[bytes]:
    if values is None:
        return _NO_TOKENS
    if len(values) == 1:
        return _tokens_of(values[0])
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


def _request_head(method: bytes, target: bytes, version: bytes, c: _HeadCollector) -> MessageHead:
    if version != b"1.1" and version != b"1.0":
        raise ParseError(f"unsupported HTTP version {version.decode(errors='replace')}")
    if c.hosts > 1 or (not c.hosts and version == b"1.1"):
        raise ParseError("more than one Host" if c.hosts else "missing Host")
    # find(), not `in`: bytes.__contains__ tries an int needle first, and the TypeError it
    # raises and clears costs more than the scan.
    if target[:1] != b"/" or target.find(b"#") >= 0:
        _check_target(method, target, c.headers)
    if not (c.content_lengths or c.transfer_encodings or c.connection):
        # The common request (no body, no Connection field): nothing to decide.
        return MessageHead(method=method, target=target, version=version, headers=c.headers,
                           keep_alive=version == b"1.1", connection=_NO_TOKENS, kinds=c.kinds,
                           drop_at=c.drop_at)
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
                       kinds=c.kinds, drop_at=c.drop_at)


_BAD_REASON: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]").search
_COMMON_REASONS: Final = frozenset((b"OK", b"Created", b"No Content", b"Not Modified",
                                    b"Found", b"Not Found", b"Moved Permanently",
                                    b"Bad Request", b"Internal Server Error",
                                    b"Service Unavailable"))


def _response_head(status: int, reason: bytes, version: bytes, method: bytes,
                   c: _HeadCollector) -> MessageHead:
    if version != b"1.1" and version != b"1.0":
        raise ParseError(f"unsupported HTTP version {version.decode(errors='replace')}")
    if status < 100:
        raise ParseError(f"invalid status {status}")
    if status < 200 and (c.content_lengths or c.transfer_encodings):
        raise ParseError("a 1xx response with a body")  # llhttp would read one; we would not
    if reason not in _COMMON_REASONS and _BAD_REASON(reason):
        raise ParseError("control character in the reason phrase")
    lengths = c.content_lengths
    if (lengths is not None and c.transfer_encodings is None and len(lengths) == 1
            and status >= 200 and status != 204 and status != 304 and method != b"HEAD"
            and lengths[0].isdigit() and len(lengths[0]) <= 18):
        length: int | None = int(lengths[0])  # the common response, decided at once
        framing = LENGTH if length else NO_BODY
    else:
        framing, length = response_framing(status, method, lengths or _NO_VALUES,
                                           c.transfer_encodings or _NO_VALUES)
    tokens = _tokens(c.connection)
    return MessageHead(status=status, reason=reason, version=version, headers=c.headers,
                       keep_alive=wants_keep_alive(version, tokens), framing=framing,
                       content_length=length, upgrade=status == 101, connection=tokens,
                       kinds=c.kinds, drop_at=c.drop_at)


_VERSIONS: Final = {"1.1": b"1.1", "1.0": b"1.0"}


def _http_version(parser: httptools.HttpRequestParser | httptools.HttpResponseParser,
                  known_11: bool) -> bytes:
    """The message's version. httptools formats it as text on every call (a tenth of the
    parsing cost of a small request), so a message that starts a read and shows
    ` HTTP/1.1` ending its first line, which llhttp has just accepted, skips the call."""
    if known_11:
        return b"1.1"
    text = parser.get_http_version()
    return _VERSIONS.get(text) or text.encode()


def _feed_httptools(parser: httptools.HttpRequestParser | httptools.HttpResponseParser,
                    data: bytes) -> int | None:
    try:
        parser.feed_data(data)
    # One name per exception type: mypyc types an `except ... as` name once, so a name
    # reused for another type fails at run time when compiled.
    except httptools.HttpParserUpgrade as upgrade:
        return int(upgrade.args[0])
    except httptools.HttpParserCallbackError as callback_error:
        cause = callback_error.__context__
        raise (cause if isinstance(cause, ParseError)
               else ParseError(str(callback_error))) from None
    except httptools.HttpParserError as parser_error:
        raise ParseError(str(parser_error)) from None
    return None


class _HttptoolsParser(_HeadCollector):
    """What both httptools parsers share: a head that spans several reads is bounded by
    `max_head`. llhttp calls back only once a field is complete, and httptools buffers a
    field without limit until then (quadratic work and unbounded memory for a head that
    never ends)."""

    __slots__ = ("_began_here", "_fed_in_head", "_in_head")

    def __init__(self, max_head: int, what: str) -> None:
        super().__init__(max_head, what)
        self._in_head = False  # a message began and its head is not complete yet
        self._began_here = False  # ... and it began within the current feed
        self._fed_in_head = 0  # bytes of the incomplete head so far

    def _check_head_bound(self, carried: bool, data: bytes, held: int) -> None:
        """After a feed of `data` that left a head incomplete (`carried`: one was
        incomplete before it too; `held`: what the collector holds of it)."""
        if carried and not self._began_here:
            self._fed_in_head += len(data)
        else:  # llhttp gives no offsets: what we hold plus the unfinished last line
            self._fed_in_head = held + len(data) - data.rfind(b"\n") - 1
        if self._fed_in_head > self.max_head:
            raise HeadTooLarge(f"{self.what} head larger than {self.max_head} bytes")


# What llhttp is fed after it stopped at the head of a request that offered an upgrade
# and has a body: a head of the same framing, not delivered, so that it parses the body
# (and the requests after it) as it would any other.
_BODY_RESUME: Final = {CHUNKED: b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"}


class HttptoolsRequestParser(_HttptoolsParser):
    __slots__ = ("_idle", "_parser", "_resume", "_resuming", "_sink", "_url", "_v11")

    def __init__(self, sink: MessageSink, max_head: int) -> None:
        super().__init__(max_head, "request")
        self._sink = sink
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._idle = True  # between messages: the next byte starts one
        self._v11 = False  # the message starting this read has "HTTP/1.1" ending its line
        self._resume: bytes | None = None  # llhttp stopped before this request's body
        self._resuming = False  # the head fed now is _BODY_RESUME's, not the client's

    def feed(self, data: bytes) -> int | None:
        carried = self._in_head
        self._began_here = False
        if self._idle:
            eol = data.find(b"\n")
            self._v11 = eol >= 10 and data[eol - 10:eol] == b" HTTP/1.1\r"
        offset = _feed_httptools(self._parser, data)
        if offset is not None and self._resume is not None:
            return self._resume_body(data, offset)
        if self._in_head:
            self._check_head_bound(carried, data, self.head_size)
        return offset

    def _resume_body(self, data: bytes, offset: int) -> int | None:
        resume, self._resume = self._resume, None
        assert resume is not None
        self._parser = httptools.HttpRequestParser(self)
        self._resuming = True
        _feed_httptools(self._parser, resume)
        self._resuming = False
        self._idle = False
        rest = data[offset:]
        if not rest:
            return None
        more = self.feed(rest)
        return None if more is None else offset + more

    # httptools callbacks (and on_header, inherited)
    def on_message_begin(self) -> None:
        self._url = b""
        if self.headers:  # trailers of the previous message (the head reset the rest)
            self.reset()
        self._idle = False
        self._in_head = True
        self._began_here = True
        self._fed_in_head = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self.head_size += len(url)
        if self.head_size > self.max_head:
            raise HeadTooLarge(f"request target larger than {self.max_head} bytes")

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._resuming:
            self.reset()
            return
        p = self._parser
        head = _request_head(p.get_method(), self._url, _http_version(p, self._v11), self)
        self.reset()  # trailers must not join the head
        if (not head.upgrade and head.framing != NO_BODY and head.method != b"CONNECT"
                and p.should_upgrade()):
            # llhttp takes the body of an upgrade offer for the new protocol's bytes.
            self._resume = (_BODY_RESUME.get(head.framing)
                            or b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
                            % (head.content_length or 0))
        self._sink.on_head(head)

    def on_body(self, body: bytes) -> None:
        self._sink.on_body(body)

    def on_message_complete(self) -> None:
        self._idle = True
        self._v11 = False  # a further message in this read does not start it
        if self._resume is None:
            self._sink.on_end()


class HttptoolsResponseParser(_HttptoolsParser):
    __slots__ = ("_done_early", "_idle", "_method", "_parser", "_reason", "_sink", "_v11")

    def __init__(self, sink: MessageSink, max_head: int) -> None:
        super().__init__(max_head, "response")
        self._sink = sink
        self._parser = httptools.HttpResponseParser(self)
        self._reason = b""
        self._method = b"GET"
        self._done_early = False
        self._idle = True  # between messages: the next byte starts one
        self._v11 = False  # the message starting this read begins with "HTTP/1.1 "

    def expect(self, request_method: bytes, upgrade: bool = False) -> None:
        self._method = request_method
        if self._done_early:
            # llhttp cannot be told that a response had no body (HEAD): start afresh.
            self._parser = httptools.HttpResponseParser(self)
            self._done_early = False
            self._idle = True

    def feed(self, data: bytes) -> int | None:
        if self._done_early:
            raise ParseError("data after a response without body")
        carried = self._in_head
        self._began_here = False
        if self._idle:
            self._v11 = data.startswith(b"HTTP/1.1 ")
        offset = _feed_httptools(self._parser, data)
        if self._in_head:
            self._check_head_bound(carried, data, self.head_size + len(self._reason))
        return offset

    def on_message_begin(self) -> None:
        self._reason = b""
        if self.headers:  # trailers of the previous message (the head reset the rest)
            self.reset()
        self._idle = False
        self._in_head = True
        self._began_here = True
        self._fed_in_head = 0

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_headers_complete(self) -> None:
        self._in_head = False
        p = self._parser
        head = _response_head(p.get_status_code(), self._reason, _http_version(p, self._v11),
                              self._method, self)
        self.reset()  # trailers must not join the head
        self._sink.on_head(head)
        if self._method == b"HEAD" and head.status >= 200:
            self._done_early = True
            self._sink.on_end()

    def on_body(self, body: bytes) -> None:
        if self._done_early:  # llhttp reads a HEAD response's Content-Length as a body
            raise ParseError("data after a response without body")
        self._sink.on_body(body)

    def on_message_complete(self) -> None:
        self._idle = True
        self._v11 = False  # a further message in this read does not start it
        if not self._done_early:
            self._sink.on_end()


class _Parsers(Mapping[str, tuple[type, type]]):
    """Parser classes by the config's `http_parser` name. h11 is imported only when an
    upstream asks for it: an idle proxy that never uses it need not carry it in memory."""

    def __getitem__(self, name: str) -> tuple[type, type]:
        if name == "httptools":
            return (HttptoolsRequestParser, HttptoolsResponseParser)
        if name == "h11":
            from proxy.l7 import parsers_h11

            return (parsers_h11.H11RequestParser, parsers_h11.H11ResponseParser)
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(("httptools", "h11"))

    def __len__(self) -> int:
        return 2


PARSERS: Final[Mapping[str, tuple[type, type]]] = _Parsers()

__all__ = ["NO_BODY", "PARSERS", "RequestParser", "ResponseParser"]
