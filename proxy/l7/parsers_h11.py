"""The h11 side of `parsers.py`: the strict pure-Python reference parser.

Loaded only when an upstream sets `http_parser = "h11"`. h11 decides validity; framing,
Host rules and head limits are the shared ones of `parsers.py`, so both parsers drive
the proxy the same way (the differential tests hold them to it).
"""

from __future__ import annotations

import h11

from proxy.l7.message import HeadTooLarge, MessageSink, ParseError
from proxy.l7.parsers import _HeadCollector, _request_head, _response_head


def _h11_error(e: h11.RemoteProtocolError, what: str) -> ParseError:
    if e.error_status_hint == 431:
        return HeadTooLarge(f"{what} head too large")
    return ParseError(str(e))


def _collect(headers: h11._headers.Headers, size: int, max_head: int,
             what: str) -> _HeadCollector:
    # h11 bounds only an incomplete head; one that arrives whole is bounded by `add`.
    c = _HeadCollector(max_head, what)
    c.head_size = size
    for name, value in headers.raw_items():
        c.add(name, value)
    return c


class H11RequestParser:
    """The strict pure-Python reference: h11 decides validity, we decide framing."""

    def __init__(self, sink: MessageSink, max_head: int) -> None:
        self._sink = sink
        self._max_head = max_head
        self._keep_alive = True  # of the last request head
        self._conn = self._new_conn()

    def _new_conn(self) -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head)

    def feed(self, data: bytes) -> int | None:
        self._conn.receive_data(data)
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as e:
                raise _h11_error(e, "request") from None
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return None
            if event is h11.PAUSED:  # only an Upgrade request pauses h11 here
                trailing, _closed = self._conn.trailing_data
                return len(data) - len(trailing)
            if isinstance(event, h11.Request):
                c = _collect(event.headers, len(event.target), self._max_head, "request")
                head = _request_head(event.method, event.target, event.http_version, c)
                self._keep_alive = head.keep_alive
                self._sink.on_head(head)
            elif isinstance(event, h11.Data):
                self._sink.on_body(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                upgrade = self._conn.their_state is h11.MIGHT_SWITCH_PROTOCOL  # type: ignore[attr-defined]
                self._sink.on_end()
                if self._keep_alive and not upgrade:
                    # h11 would wait for our response, and never keeps an HTTP/1.0
                    # connection alive even when the client asked: a fresh connection
                    # object parses whatever follows. (Empty data would mean EOF to h11.)
                    trailing, _closed = self._conn.trailing_data
                    self._conn = self._new_conn()
                    if trailing:
                        self._conn.receive_data(bytes(trailing))


class H11ResponseParser:
    def __init__(self, sink: MessageSink, max_head: int) -> None:
        self._sink = sink
        self._max_head = max_head
        self._method = b"GET"
        self._upgrade = False
        self._conn = self._new_conn()

    def _new_conn(self) -> h11.Connection:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max_head)
        # h11 must know the request to frame the response (HEAD has no body; a 101 needs
        # an upgrade on offer).
        headers = [(b"host", b"x")]
        if self._upgrade:
            headers += [(b"connection", b"upgrade"), (b"upgrade", b"websocket")]
        conn.send(h11.Request(method=self._method, target=b"/", headers=headers))
        conn.send(h11.EndOfMessage())
        return conn

    def expect(self, request_method: bytes, upgrade: bool = False) -> None:
        self._method = request_method
        self._upgrade = upgrade
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
                if self._conn.their_state is not h11.SWITCHED_PROTOCOL:
                    # Bytes after a complete response, which no request asked for: the
                    # connection is out of step (llhttp reports the same as an error).
                    raise ParseError("data after a complete response")
                trailing, _closed = self._conn.trailing_data
                return len(data) - len(trailing)
            if isinstance(event, (h11.Response, h11.InformationalResponse)):
                c = _collect(event.headers, len(event.reason), self._max_head, "response")
                self._sink.on_head(_response_head(event.status_code, event.reason,
                                                  event.http_version, self._method, c))
                if isinstance(event, h11.InformationalResponse):  # 1xx heads end there
                    self._sink.on_end()
            elif isinstance(event, h11.Data):
                self._sink.on_body(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._sink.on_end()
