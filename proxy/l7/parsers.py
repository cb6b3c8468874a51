"""Bytes -> parser-neutral events, with httptools (llhttp, default) or h11 (fallback).

Each parser calls `sink.on_head / on_body / on_end` (see `message.py`). `feed(data)`
returns None, or the offset in `data` where an upgrade (RFC 9110 section 7.8) left HTTP.
Requests that follow a complete one on the same connection (pipelining) are parsed at
once; the caller queues their events. Head size is bounded by `max_head` (-> 431).
"""

from __future__ import annotations

from typing import Protocol

import h11
import httptools

from proxy.l7.framing import connection_tokens, request_framing, response_framing, wants_keep_alive
from proxy.l7.message import NO_BODY, HeadTooLarge, MessageHead, MessageSink, ParseError


class RequestParser(Protocol):
    def feed(self, data: bytes) -> int | None: ...


class ResponseParser(Protocol):
    def expect(self, request_method: bytes) -> None:
        """Announce the request whose response comes next (HEAD has no body)."""

    def feed(self, data: bytes) -> int | None: ...


class _HeadCollector:
    """Gathers one head's fields and the header values framing depends on."""

    __slots__ = ("connection", "content_lengths", "head_size", "headers", "transfer_encodings")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_lengths: list[bytes] = []
        self.transfer_encodings: list[bytes] = []
        self.connection: list[bytes] = []
        self.head_size = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self.head_size += len(name) + len(value) + 4
        if len(name) in (10, 14, 17):  # only then can it be one of the three names below
            lname = name.lower()
            if lname == b"content-length":
                self.content_lengths.append(value)
            elif lname == b"transfer-encoding":
                self.transfer_encodings.append(value)
            elif lname == b"connection":
                self.connection.append(value)


def _request_head(method: bytes, target: bytes, version: bytes, c: _HeadCollector) -> MessageHead:
    framing, length = request_framing(c.content_lengths, c.transfer_encodings)
    tokens = connection_tokens(c.connection)
    return MessageHead(method=method, target=target, version=version, headers=c.headers,
                       keep_alive=wants_keep_alive(version, tokens), framing=framing,
                       content_length=length, upgrade=b"upgrade" in tokens)


def _response_head(status: int, reason: bytes, version: bytes, method: bytes,
                   c: _HeadCollector) -> MessageHead:
    framing, length = response_framing(status, method, c.content_lengths, c.transfer_encodings)
    tokens = connection_tokens(c.connection)
    return MessageHead(status=status, reason=reason, version=version, headers=c.headers,
                       keep_alive=wants_keep_alive(version, tokens), framing=framing,
                       content_length=length, upgrade=status == 101)


class HttptoolsRequestParser:
    __slots__ = ("_fed_in_head", "_head", "_in_head", "_max_head", "_parser", "_sink", "_url")

    def __init__(self, sink: MessageSink, max_head: int) -> None:
        self._sink = sink
        self._max_head = max_head
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._head = _HeadCollector()
        self._in_head = True
        self._fed_in_head = 0  # bytes fed while a head is incomplete (bounds buffering)

    def feed(self, data: bytes) -> int | None:
        if self._in_head:
            self._fed_in_head += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            return int(e.args[0])
        except httptools.HttpParserCallbackError as e:
            raise (e.__context__ if isinstance(e.__context__, ParseError)
                   else ParseError(str(e))) from None
        except httptools.HttpParserError as e:
            raise ParseError(str(e)) from None
        if self._in_head and self._fed_in_head > self._max_head:
            raise HeadTooLarge(f"request head larger than {self._max_head} bytes")
        return None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._head = _HeadCollector()
        self._in_head = True
        self._fed_in_head = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._max_head:
            raise HeadTooLarge(f"request target larger than {self._max_head} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head.add(name, value)
        if self._head.head_size + len(self._url) > self._max_head:
            raise HeadTooLarge(f"request head larger than {self._max_head} bytes")

    def on_headers_complete(self) -> None:
        self._in_head = False
        p = self._parser
        self._sink.on_head(_request_head(p.get_method(), self._url,
                                         p.get_http_version().encode(), self._head))

    def on_body(self, body: bytes) -> None:
        self._sink.on_body(body)

    def on_message_complete(self) -> None:
        self._sink.on_end()


class HttptoolsResponseParser:
    __slots__ = ("_done_early", "_head", "_max_head", "_method", "_parser", "_reason", "_sink")

    def __init__(self, sink: MessageSink, max_head: int) -> None:
        self._sink = sink
        self._max_head = max_head
        self._parser = httptools.HttpResponseParser(self)
        self._reason = b""
        self._head = _HeadCollector()
        self._method = b"GET"
        self._done_early = False

    def expect(self, request_method: bytes) -> None:
        self._method = request_method
        if self._done_early:
            # llhttp cannot be told that a response had no body (HEAD): start afresh.
            self._parser = httptools.HttpResponseParser(self)
            self._done_early = False

    def feed(self, data: bytes) -> int | None:
        if self._done_early:
            raise ParseError("data after a response without body")
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            return int(e.args[0])
        except httptools.HttpParserCallbackError as e:
            raise (e.__context__ if isinstance(e.__context__, ParseError)
                   else ParseError(str(e))) from None
        except httptools.HttpParserError as e:
            raise ParseError(str(e)) from None
        return None

    def on_message_begin(self) -> None:
        self._reason = b""
        self._head = _HeadCollector()

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head.add(name, value)
        if self._head.head_size > self._max_head:
            raise HeadTooLarge(f"response head larger than {self._max_head} bytes")

    def on_headers_complete(self) -> None:
        p = self._parser
        head = _response_head(p.get_status_code(), self._reason, p.get_http_version().encode(),
                              self._method, self._head)
        self._sink.on_head(head)
        if self._method == b"HEAD" and head.status >= 200:
            self._done_early = True
            self._sink.on_end()

    def on_body(self, body: bytes) -> None:
        self._sink.on_body(body)

    def on_message_complete(self) -> None:
        if not self._done_early:
            self._sink.on_end()


def _h11_error(e: h11.RemoteProtocolError, what: str) -> ParseError:
    if e.error_status_hint == 431:
        return HeadTooLarge(f"{what} head too large")
    return ParseError(str(e))


class H11RequestParser:
    """The strict pure-Python reference: h11 decides validity, we decide framing."""

    def __init__(self, sink: MessageSink, max_head: int) -> None:
        self._sink = sink
        self._max_head = max_head
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)

    def feed(self, data: bytes) -> int | None:
        self._conn.receive_data(data)
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as e:
                raise _h11_error(e, "request") from None
            if event is h11.NEED_DATA:
                return None
            if event is h11.PAUSED:
                trailing, _closed = self._conn.trailing_data
                if self._conn.their_state is not h11.DONE:  # an Upgrade request
                    return len(data) - len(trailing)
                # h11 waits for our response before the next request; we answer through
                # our own writer, so a fresh connection object parses the next request.
                self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head)
                self._conn.receive_data(bytes(trailing))
                continue
            if isinstance(event, h11.Request):
                c = _HeadCollector()
                for name, value in event.headers.raw_items():
                    c.add(name, value)
                if c.head_size + len(event.target) > self._max_head:
                    raise HeadTooLarge(f"request head larger than {self._max_head} bytes")
                self._sink.on_head(_request_head(event.method, event.target,
                                                 event.http_version, c))
            elif isinstance(event, h11.Data):
                self._sink.on_body(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._sink.on_end()
            elif isinstance(event, h11.ConnectionClosed):
                return None


class H11ResponseParser:
    def __init__(self, sink: MessageSink, max_head: int) -> None:
        self._sink = sink
        self._max_head = max_head
        self._method = b"GET"
        self._conn = self._new_conn()

    def _new_conn(self) -> h11.Connection:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max_head)
        # h11 must know the request to frame the response (HEAD has no body).
        conn.send(h11.Request(method=self._method, target=b"/", headers=[(b"host", b"x")]))
        conn.send(h11.EndOfMessage())
        return conn

    def expect(self, request_method: bytes) -> None:
        self._method = request_method
        self._conn = self._new_conn()

    def feed(self, data: bytes) -> int | None:
        self._conn.receive_data(data)
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as e:
                raise _h11_error(e, "response") from None
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return None
            if event is h11.PAUSED:
                trailing, _closed = self._conn.trailing_data
                return len(data) - len(trailing)
            if isinstance(event, (h11.Response, h11.InformationalResponse)):
                c = _HeadCollector()
                for name, value in event.headers.raw_items():
                    c.add(name, value)
                self._sink.on_head(_response_head(event.status_code, event.reason,
                                                  event.http_version, self._method, c))
                if isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                    self._sink.on_end()
            elif isinstance(event, h11.Data):
                self._sink.on_body(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._sink.on_end()


PARSERS: dict[str, tuple[type, type]] = {
    "httptools": (HttptoolsRequestParser, HttptoolsResponseParser),
    "h11": (H11RequestParser, H11ResponseParser),
}

__all__ = ["NO_BODY", "PARSERS", "RequestParser", "ResponseParser"]
