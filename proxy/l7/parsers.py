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

from collections.abc import Iterator, Mapping
from typing import Final, Protocol

import httptools

from proxy.l7.collect import HeadCollector, request_head, response_head
from proxy.l7.message import (
    CHUNKED,
    NO_BODY,
    HeadTooLarge,
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


_VERSIONS: Final = {"1.1": b"1.1", "1.0": b"1.0"}
_SP: Final = 32
_CR: Final = 13


def _http_version(parser: httptools.HttpRequestParser | httptools.HttpResponseParser) -> bytes:
    """The message's version. httptools formats it as text on every call (a tenth of the
    parsing cost of a small request), so the parsers skip the call for a message that
    starts a read and shows ` HTTP/1.1` ending its first line, which llhttp has just
    accepted."""
    text = parser.get_http_version()
    return _VERSIONS.get(text) or text.encode()


def _feed_httptools(parser: httptools.HttpRequestParser | httptools.HttpResponseParser,
                    data: bytes) -> int | None:
    """Feed llhttp: None, or where an upgrade left HTTP. (The parsers' `feed` has these
    lines written out: they run once per read.)"""
    try:
        parser.feed_data(data)
    # One name per exception type: mypyc types an `except ... as` name once, so a name
    # reused for another type fails at run time when compiled.
    except httptools.HttpParserUpgrade as upgrade:
        return int(upgrade.args[0])
    except httptools.HttpParserError as parser_error:
        raise _parse_error(parser_error) from None
    return None


def _parse_error(error: httptools.HttpParserError) -> ParseError:
    """What llhttp refused, as ours: a ParseError raised in a callback comes out of
    httptools as the context of an HttpParserCallbackError."""
    if isinstance(error, httptools.HttpParserCallbackError):
        cause = error.__context__
        if isinstance(cause, ParseError):
            return cause
    return ParseError(str(error))


class _HttptoolsParser(HeadCollector):
    """What both httptools parsers share: a head that spans several reads is bounded by
    `max_head`. llhttp calls back only once a field is complete, and httptools buffers a
    field without limit until then (quadratic work and unbounded memory for a head that
    never ends)."""

    __slots__ = ("_began_here", "_fed_in_head", "_in_head", "_line_end")

    def __init__(self, max_head: int, what: str) -> None:
        super().__init__(max_head, what)
        self._in_head = False  # a message began and its head is not complete yet
        self._began_here = False  # ... and it began within the current feed
        self._fed_in_head = 0  # bytes of the incomplete head so far
        self._line_end = 0  # where the first line of the message starting this read ends

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
            if self._v11:
                self.raw = data  # the head begins here (see HeadCollector)
                self.raw_at = self._line_end = eol + 1
        try:  # _feed_httptools(self._parser, data), written out: once per read
            self._parser.feed_data(data)
            offset = None
        except httptools.HttpParserUpgrade as upgrade:
            offset = int(upgrade.args[0])
        except httptools.HttpParserError as parser_error:
            raise _parse_error(parser_error) from None
        if offset is not None and self._resume is not None:
            return self._resume_body(data, offset)
        if self._in_head:
            self.raw = None  # the head goes on in the next read: not in one piece
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
        raw = self.raw
        self.raw = None  # a later head does not begin at data[0]
        if self._resuming:
            self.reset()
            return
        p = self._parser
        method = p.get_method()
        url = self._url
        if raw is not None:
            end = self.raw_at + 2
            if len(method) + len(url) + 12 != self._line_end:
                raw = None  # more than one space between the words of the request line
            elif len(raw) != end:
                raw = raw[:end]
        version = b"1.1" if self._v11 else _http_version(p)
        head = request_head(method, url, version, self, raw)
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
        self.raw = None
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
            if self._v11:
                self.raw = data  # the head begins here; on_status says where its fields do
        try:  # _feed_httptools(self._parser, data), written out: once per read
            self._parser.feed_data(data)
            offset = None
        except httptools.HttpParserUpgrade as upgrade:
            offset = int(upgrade.args[0])
        except httptools.HttpParserError as parser_error:
            raise _parse_error(parser_error) from None
        if self._in_head:
            self.raw = None  # the head goes on in the next read: not in one piece
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
        reason = self._reason = self._reason + status
        # `HTTP/1.1 NNN reason` CRLF, if the head began this read (llhttp takes three digits)
        self.raw_at = len(reason) + 15

    def on_headers_complete(self) -> None:
        self._in_head = False
        reason = self._reason
        raw = self.raw
        self.raw = None  # a later head does not begin at data[0]
        if raw is not None:
            end = self.raw_at + 2
            if not reason or raw[len(reason) + 13] != _CR or raw[12] != _SP:
                raw = None  # the status line is not `HTTP/1.1 NNN reason`: it is rewritten
            elif len(raw) != end:
                raw = raw[:end]
        p = self._parser
        version = b"1.1" if self._v11 else _http_version(p)
        head = response_head(p.get_status_code(), reason, version, self._method, self, raw)
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
        self.raw = None
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
