"""The h11 side of `parsers.py`: the pure-Python fallback, exactly as strict as llhttp.

Loaded only when an upstream sets `http_parser = "h11"`. SPEC: the fallback rejects exactly
what the default parser (httptools, i.e. llhttp 9) rejects, so the bytes are held to
llhttp's grammar here: its method list, request-target forms, field-name and field-value
characters (no control character but HTAB), CRLF line ends only (no bare LF, no obs-fold),
its Content-Length, Transfer-Encoding and Connection handling, chunk-size and chunk-extension
syntax, and what it accepts between messages. A head is held until its end; each line is
checked as it arrives (a bad byte is refused as soon as llhttp would refuse it, a head that
never ends meets the 431 bound), then h11 parses the head as well (its refusal is a 400
too). Bodies are framed here by count and never scanned. Framing, Host, target and head-size
rules are the shared ones of `collect.py`; the differential tests
(tests/unit/test_parser_differential_fuzz.py) hold both parsers to the same events.
"""

from __future__ import annotations

import re
from typing import Final

import h11

from proxy.l7.collect import HeadCollector, request_head, response_head
from proxy.l7.message import NO_BODY, HeadTooLarge, MessageHead, MessageSink, ParseError

# The request methods llhttp 9 accepts with an "HTTP/x.y" version (its METHODS_HTTP1, as
# httptools 0.9 reports them); any other word, lowercase spellings included, is a 400.
LLHTTP_METHODS: Final = frozenset((
    b"DELETE", b"GET", b"HEAD", b"POST", b"PUT", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
    b"LINK", b"UNLINK", b"COPY", b"LOCK", b"MKCOL", b"MOVE", b"PROPFIND", b"PROPPATCH",
    b"SEARCH", b"UNLOCK", b"BIND", b"REBIND", b"UNBIND", b"ACL", b"REPORT", b"MKACTIVITY",
    b"CHECKOUT", b"MERGE", b"M-SEARCH", b"NOTIFY", b"SUBSCRIBE", b"UNSUBSCRIBE", b"MKCALENDAR",
    b"PURGE", b"QUERY", b"SOURCE",
))
# Words llhttp also reads as methods and refuses only later: RTSP's (with "RTSP/x.y" they pass,
# and so do OPTIONS, GET, POST and SOURCE with "RTSP/" or "ICE/") and PRI, the HTTP/2 preface.
_RTSP_METHODS: Final = frozenset((
    b"OPTIONS", b"DESCRIBE", b"ANNOUNCE", b"SETUP", b"PLAY", b"PAUSE", b"TEARDOWN",
    b"GET_PARAMETER", b"SET_PARAMETER", b"REDIRECT", b"RECORD", b"GET", b"POST", b"FLUSH",
))
_METHODS_OF_PROTOCOL: Final = {b"HTTP": LLHTTP_METHODS | {b"PRI"}, b"RTSP": _RTSP_METHODS,
                               b"ICE": frozenset((b"SOURCE",))}
_METHOD_WORDS: Final = LLHTTP_METHODS | _RTSP_METHODS | {b"PRI"}
_METHOD_PREFIXES: Final = frozenset(m[:i] for m in _METHOD_WORDS for i in range(len(m) + 1))
_VERSIONS: Final = frozenset((b"0.9", b"1.0", b"1.1", b"2.0"))  # llhttp refuses the others
_H2_PREFACE = b"\r\n\r\nSM\r\n\r\n"  # after "PRI * HTTP/2.0"
_MAX_CHUNK_SIZE = 0xFFFF_FFFF_FFFF_FFFF

_TCHAR = rb"-!#$%&'*+.^_`|~0-9A-Za-z"
_VCHAR = rb"\t\x20-\x7e\x80-\xff"  # llhttp's field-value bytes: no CTL but HTAB, no DEL
_USERINFO = rb"-_.!~*'()%;:&=+$,0-9A-Za-z\[\]"  # llhttp's authority bytes
_SERVER = rb"(?:[%s]|@(?!@))*" % _USERINFO
_TARGETS = {
    False: rb"[/*][!-~]*|[A-Za-z]+://%s(?:[/?][!-~]*)?" % _SERVER,
    True: rb"%s(?:[/?][!-~]*)?" % _SERVER,  # CONNECT: authority form
}
_TARGET = {k: re.compile(rb"(?:%s)\Z" % v) for k, v in _TARGETS.items()}
_TARGET_PREFIX = {
    False: re.compile(rb"(?:[/*][!-~]*|[A-Za-z]+(?::(?:/(?:/%s(?:[/?][!-~]*)?)?)?)?)?\Z"
                      % _SERVER),
    True: _TARGET[True],
}
_PROTOCOL_PREFIX = re.compile(
    rb"(?:H(?:TT?)?|R(?:TS?)?|IC?)?\Z"
    rb"|(?P<p>HTTP|RTSP|ICE)(?P<slash>/(?P<v>[0-9](?:\.[0-9]?)?)?)?(?P<rest>[^ ]*)\Z")
_REQUEST_WORDS = re.compile(rb"([^ \r\n]*)( +)([^ \r\n]*)", re.DOTALL)
_STATUS_LINE = re.compile(rb"(HTTP|RTSP|ICE)/([0-9]\.[0-9]) ([0-9]{3})(?: ([^\r\n]*))?\r\n")
_STATUS_PREFIX = re.compile(
    rb"(?:H(?:T(?:TP?)?)?|R(?:T(?:SP?)?)?|I(?:CE?)?)?\Z"
    rb"|(?:HTTP|RTSP|ICE)(?:/(?:(?P<v>[0-9](?:\.[0-9]?)?)"
    rb"(?: (?:[0-9]{1,2}|[0-9]{3}(?: (?P<reason>[^\r\n]*))?\r?)?)?)?)?\Z")
_FIELD = re.compile(rb"([%s]+):[ \t]*([%s]*)\r\n" % (_TCHAR, _VCHAR))
_FIELD_PREFIX = re.compile(rb"(?:\r|[%s]+(?::[%s]*\r?)?)?\Z" % (_TCHAR, _VCHAR))
_NAME_COLON = re.compile(rb"[%s]+:" % _TCHAR)
_TOKEN_RUN = re.compile(rb"[%s]+" % _TCHAR)
_CRLF_RUN = re.compile(rb"[\r\n]*")
# llhttp's chunk extensions: ";name", ";name=token", ";name=\"quoted\"" (an empty name only
# before "=" or ";").
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[%s])*"' % _VCHAR
_EXT_VALUE = rb"=[%s]*(?:%s)?" % (_TCHAR, _QUOTED)
_EXTENSION = rb";(?:[%s]+(?:%s)?|%s|(?=;))" % (_TCHAR, _EXT_VALUE, _EXT_VALUE)
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]+)(?:%s)*\r\n" % _EXTENSION)
_CONTENT_LENGTH = re.compile(rb"[0-9]+[ \t]*")
_CHUNKED_LAST = re.compile(rb"chunked *", re.IGNORECASE)
_CONNECTION_WORD = re.compile(rb"(close|keep-alive|upgrade)[ \t]*", re.IGNORECASE)

# llhttp's flags (what it acts on besides our shared rules)
_F_KEEP_ALIVE, _F_CLOSE, _F_CONN_UPGRADE, _F_CHUNKED = 1, 2, 4, 8
_F_UPGRADE, _F_CONTENT_LENGTH, _F_TRANSFER_ENCODING = 16, 32, 64
_SPECIAL = {b"connection": 1, b"proxy-connection": 1, b"content-length": 2,
            b"transfer-encoding": 3, b"upgrade": 4}
_SPECIAL_LENGTHS = frozenset(len(n) for n in _SPECIAL)

# Where a connection's bytes are.
_START, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS = range(7)
_UNTIL_CLOSE, _CLOSED, _LEFT_HTTP = range(7, 10)


class _Llhttp:
    """One direction of a connection, parsed as llhttp parses it."""

    def __init__(self, sink: MessageSink, max_head: int, request: bool) -> None:
        self._sink = sink
        self._max_head = max_head
        self._request = request
        self._what = "request" if request else "response"
        self._state = _START
        self._held = b""  # an unfinished head, chunk-size line, chunk end or trailer section
        self._remaining = 0  # body bytes still due
        self._method = b"GET"  # of the request (whose response this parses)
        self._done_early = False  # a HEAD response ended with its head
        self._new_message()

    def _new_message(self) -> None:
        self._flags = 0
        self._content_length = 0
        self._c = HeadCollector(self._max_head, self._what)
        self._pending: tuple[bytes, bytes] | None = None  # a field not yet counted
        self._fields: list[tuple[bytes, bytes]] = []
        self._url_counted = 0
        self._reason_seen = 0
        self._fed = 0  # bytes of an unfinished head, as parsers.py bounds them
        self._began_here = False
        self._start_line: tuple[bytes, ...] | None = None
        self._scan = 0  # where the next unchecked line of the held head starts

    # -- feeding ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> int | None:
        if self._done_early:
            raise ParseError("data after a response without body")
        carried = self._state == _HEAD
        self._began_here = False
        pos, n = 0, len(data)
        while pos < n:
            state = self._state
            if state == _START:
                pos = _CRLF_RUN.match(data, pos).end()  # type: ignore[union-attr]
                if pos == n:
                    break
                self._new_message()
                self._began_here = True
                self._state = _HEAD
            elif state == _HEAD:
                pos = self._head(data, pos)
                if pos < 0:  # the head goes on in a later read
                    self._bound(carried, data)
                    return None
                if self._state == _LEFT_HTTP:
                    return pos
            elif state == _LENGTH or state == _CHUNK_DATA:
                if self._done_early:
                    raise ParseError("data after a response without body")
                take = min(self._remaining, n - pos)
                self._sink.on_body(data[pos:pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    if state == _LENGTH:
                        self._message_done()
                    else:
                        self._state = _CHUNK_END
            elif state == _UNTIL_CLOSE:
                if self._done_early:
                    raise ParseError("data after a response without body")
                self._sink.on_body(data[pos:])
                return None
            elif state == _CLOSED:
                pos = _CRLF_RUN.match(data, pos).end()  # type: ignore[union-attr]
                if pos < n:
                    raise ParseError(f"data after the last {self._what} of the connection")
            elif state == _CHUNK_END:
                pos = self._chunk_end(data, pos)
            elif state == _CHUNK_SIZE:
                pos = self._chunk_size(data, pos)
            elif state == _TRAILERS:
                pos = self._trailers(data, pos)
            else:  # _LEFT_HTTP: the caller stops feeding us
                return pos
            if pos < 0:
                return None
            if self._state == _LEFT_HTTP:
                return pos
        return None

    def _held_and(self, data: bytes, pos: int) -> tuple[bytes, int]:
        """The held bytes joined with the rest of `data`, and the shift: `buf[i]` is
        `data[i - shift]`."""
        if not self._held:
            return data, 0
        return self._held + data[pos:], len(self._held) - pos

    def _bound(self, carried: bool, data: bytes) -> None:
        # As parsers.py bounds an unfinished head: what was counted plus the unfinished last
        # line of this read, or every byte of the reads after the one the head began in.
        if carried and not self._began_here:
            self._fed += len(data)
        else:
            self._fed = (self._c.head_size + self._reason_seen + len(data)
                         - data.rfind(b"\n") - 1)
        if self._fed > self._max_head or len(self._held) > 2 * self._max_head + 65536:
            raise HeadTooLarge(f"{self._what} head larger than {self._max_head} bytes")

    # -- heads -----------------------------------------------------------------------------

    def _head(self, data: bytes, pos: int) -> int:
        """Scans the head from `data[pos]`; returns where its end is in `data`, or -1."""
        joined = bool(self._held)
        if joined:  # buf[i] is data[i - shift]
            buf, i, shift = self._held + data[pos:], self._scan, len(self._held) - pos
        else:
            buf, i, shift = data, pos, 0
        if self._start_line is None:
            line = i
            i = self._request_line(buf, i) if self._request else self._status_line(buf, i)
            if i < 0:
                self._hold(buf, pos, joined, line)
                return -1
        while True:
            if buf.startswith(b"\r\n", i):
                self._count_pending()
                self._held = b""
                self._head_done()
                return i + 2 - shift
            m = _FIELD.match(buf, i)
            if m is None:
                self._bad_or_unfinished_field(buf, i)
                self._hold(buf, pos, joined, i)
                return -1
            self._count_pending()
            self._field(m[1], m[2], in_head=True)
            i = m.end()

    def _hold(self, buf: bytes, pos: int, joined: bool, line: int) -> None:
        """Keeps the unfinished head; scanning resumes at the line starting at `buf[line]`."""
        if joined:
            self._held, self._scan = bytes(buf), line
        else:
            self._held, self._scan = bytes(buf[pos:]), line - pos

    def _count_pending(self) -> None:
        # httptools hands a field over when the next one's name (or the head's end) is read.
        if self._pending is not None:
            name, value = self._pending
            self._pending = None
            self._c.on_header(name, value)

    def _bad_or_unfinished_field(self, buf: bytes, i: int) -> None:
        named = _NAME_COLON.match(buf, i)
        if named or (buf.find(b"\n", i) < 0 and _TOKEN_RUN.match(buf, i)):
            self._count_pending()
        if buf.find(b"\n", i) >= 0 or not _FIELD_PREFIX.match(buf, i):
            raise ParseError(f"invalid {self._what} field line")
        if named and len(named[0]) == 15 and named[0].lower() == b"content-length:":
            # llhttp reads a Content-Length as it comes: refused at its first wrong byte.
            value = buf[named.end():].lstrip(b" \t").rstrip(b"\r")
            flags = self._flags
            if flags & _F_TRANSFER_ENCODING or value and (
                    flags & _F_CONTENT_LENGTH or not _CONTENT_LENGTH.fullmatch(value)
                    or int(value.rstrip(b" \t")) > _MAX_CHUNK_SIZE):
                raise ParseError("invalid Content-Length")
        if named and len(named[0]) == 18 and named[0].lower() == b"transfer-encoding:":
            value = buf[named.end():].lstrip(b" \t")
            pieces = [p.lstrip(b" \t") for p in value.split(b",")]
            if self._flags & _F_CONTENT_LENGTH or self._request and value and (
                    self._flags & _F_CHUNKED
                    or any(_CHUNKED_LAST.fullmatch(p) for p in pieces[:-1])):
                raise ParseError("invalid Transfer-Encoding")

    def _request_line(self, buf: bytes, i: int) -> int:
        """Checks the request line at `buf[i]`: where the first field starts, or -1."""
        eol = buf.find(b"\n", i)
        line = buf[i:] if eol < 0 else buf[i:eol + 1]
        m = _REQUEST_WORDS.match(line)
        if m is None:  # no space yet: a method being read
            if b"\n" in line or b"\r" in line or line not in _METHOD_PREFIXES:
                raise ParseError("invalid method")
            return -1
        method, target = m[1], m[3]
        if method not in _METHOD_WORDS:
            raise ParseError("invalid method")
        connect = method == b"CONNECT"
        rest = line[m.end():]
        if not rest:  # the target may go on
            if target and not _TARGET_PREFIX[connect].match(target):
                raise ParseError("invalid request target")
            self._count_url(target)
            return -1
        if not (connect or target) or not _TARGET[connect].match(target):
            raise ParseError("invalid request target")
        self._count_url(target)
        if rest[:1] != b" ":  # "\r\n" or "\n" right after the target: HTTP/0.9
            if rest == b"\r":
                return -1
            if rest not in (b"\r\n", b"\n"):
                raise ParseError("invalid request line")
            self._start_line = (method, target, b"0.9")
            return i + len(line)
        stripped = rest.lstrip(b" ")
        p = _PROTOCOL_PREFIX.match(stripped)
        if p is None:
            raise ParseError("invalid request line")
        protocol, version, tail = p["p"], p["v"] or b"", p["rest"] or b""
        if protocol and method not in _METHODS_OF_PROTOCOL[protocol]:
            raise ParseError(f"invalid method for {protocol.decode()}")
        if len(version) == 3 and version not in _VERSIONS:
            raise ParseError("invalid HTTP version")
        if tail and (len(version) < 3 or not p["slash"]):
            raise ParseError("invalid request line")
        if method == b"PRI" and len(version) == 3:
            # llhttp wants the rest of the HTTP/2 preface, and refuses it whole or not.
            at = i + m.end() + len(rest) - len(stripped) + p.end("v")
            preface = buf[at:at + len(_H2_PREFACE) + 1]
            if len(preface) < len(_H2_PREFACE) and _H2_PREFACE.startswith(preface):
                return -1
            raise ParseError("HTTP/2 connection preface")
        if tail != b"\r\n":
            if eol >= 0 or tail not in (b"", b"\r"):
                raise ParseError("invalid request line")
            return -1
        self._start_line = (method, target, version)
        return i + len(line)

    def _count_url(self, target: bytes) -> None:
        # httptools counts the target into the head as it reads it (on_url).
        self._c.head_size += len(target) - self._url_counted
        self._url_counted = len(target)
        if self._c.head_size > self._max_head:
            raise HeadTooLarge(f"request target larger than {self._max_head} bytes")

    def _status_line(self, buf: bytes, i: int) -> int:
        m = _STATUS_LINE.match(buf, i)
        if m is None:
            eol = buf.find(b"\n", i)
            line = buf[i:] if eol < 0 else buf[i:eol + 1]
            p = _STATUS_PREFIX.match(line)
            if eol >= 0 or p is None or (p["v"] and len(p["v"]) == 3
                                         and p["v"] not in _VERSIONS):
                raise ParseError("invalid status line")
            self._reason_seen = len(p["reason"] or b"")  # httptools holds it (on_status)
            return -1
        if m[2] not in _VERSIONS:
            raise ParseError("invalid HTTP version")
        self._start_line = (m[3], m[4] or b"", m[2])
        self._reason_seen = len(m[4] or b"")
        return m.end()

    def _field(self, name: bytes, value: bytes, in_head: bool) -> None:
        """llhttp's checks and flags for one field line (head or trailer)."""
        kind = _SPECIAL.get(name.lower()) if len(name) in _SPECIAL_LENGTHS else None
        flags = self._flags
        if kind == 2:  # Content-Length
            if flags & _F_TRANSFER_ENCODING:
                raise ParseError("Content-Length with Transfer-Encoding")
            if not value:
                raise ParseError("empty Content-Length")
            if flags & _F_CONTENT_LENGTH:
                raise ParseError("duplicate Content-Length")
            if not _CONTENT_LENGTH.fullmatch(value):
                raise ParseError("invalid Content-Length")
            length = int(value.rstrip(b" \t"))
            if length > _MAX_CHUNK_SIZE:
                raise ParseError("Content-Length overflow")
            self._flags = flags | _F_CONTENT_LENGTH
            self._content_length = length
        elif kind == 3:  # Transfer-Encoding
            if flags & _F_CONTENT_LENGTH:
                raise ParseError("Transfer-Encoding with Content-Length")
            if not value:  # httptools 0.9's llhttp refuses it
                raise ParseError("empty Transfer-Encoding")
            if value:
                pieces = [p.lstrip(b" \t") for p in value.split(b",")]
                if self._request and (flags & _F_CHUNKED or any(
                        _CHUNKED_LAST.fullmatch(p) for p in pieces[:-1])):
                    raise ParseError("Transfer-Encoding after chunked")
                flags = (flags | _F_TRANSFER_ENCODING) & ~_F_CHUNKED
                if _CHUNKED_LAST.fullmatch(pieces[-1]):
                    flags |= _F_CHUNKED
                self._flags = flags
        elif kind == 1:  # Connection, Proxy-Connection
            for piece in value.split(b","):
                word = _CONNECTION_WORD.fullmatch(piece.lstrip(b" \t"))
                if word is not None:
                    self._flags |= {b"close": _F_CLOSE, b"keep-alive": _F_KEEP_ALIVE,
                                    b"upgrade": _F_CONN_UPGRADE}[word[1].lower()]
        elif kind == 4 and value:  # Upgrade
            self._flags = flags | _F_UPGRADE
        if in_head:
            self._fields.append((name, value))
        self._pending = (name, value)

    def _head_done(self) -> None:
        line = self._start_line
        assert line is not None
        c = self._c
        if self._request:
            method, target, version = line
            _confirm(b"%s %s HTTP/1.0\r\n" % (method, target), self._fields, True)
            head = request_head(method, target, version, c)
            self._sink.on_head(head)
            self._afterrequest_head(head)
        else:
            status = int(line[0])
            _confirm(b"HTTP/1.1 200 OK\r\n", self._fields, False)
            head = response_head(status, line[1], line[2], self._method, c)
            self._sink.on_head(head)
            self._afterresponse_head(head, status)

    def _afterrequest_head(self, head: MessageHead) -> None:
        flags = self._flags
        has_body = flags & _F_CHUNKED or self._content_length > 0
        # httptools stops at the head of an upgrade offer (and of CONNECT); parsers.py serves
        # an upgrade offer with a body as a plain request.
        connect = head.method == b"CONNECT"
        if connect or (flags & _F_UPGRADE and flags & _F_CONN_UPGRADE
                       and (not has_body or head.upgrade)):
            self._sink.on_end()
            self._state = _LEFT_HTTP
            return
        if flags & _F_CHUNKED:
            self._state = _CHUNK_SIZE
        elif flags & _F_TRANSFER_ENCODING:
            raise ParseError("request Transfer-Encoding other than chunked")
        elif self._content_length:
            self._state = _LENGTH
            self._remaining = self._content_length
        else:
            self._message_done()

    def _afterresponse_head(self, head: MessageHead, status: int) -> None:
        flags = self._flags
        if status == 101:  # llhttp leaves HTTP; httptools reports it only for an upgrade
            self._sink.on_end()
            if not (flags & _F_UPGRADE and flags & _F_CONN_UPGRADE):
                raise ParseError("101 without Upgrade and Connection: upgrade")
            self._state = _LEFT_HTTP
            return
        if self._method == b"HEAD" and status >= 200:
            # parsers.py ends a HEAD response with its head; llhttp still frames what follows
            # by the fields (a body byte is refused) until the next feed, which is refused.
            self._sink.on_end()
            self._done_early = True
        if status in (100, 102, 103, 204, 304):
            self._message_done()
        elif flags & _F_CHUNKED:
            self._state = _CHUNK_SIZE
        elif flags & _F_TRANSFER_ENCODING:
            self._state = _UNTIL_CLOSE
        elif flags & _F_CONTENT_LENGTH:
            if self._content_length:
                self._state = _LENGTH
                self._remaining = self._content_length
            else:
                self._message_done()
        elif status // 100 == 1:
            self._message_done()
        else:
            self._state = _UNTIL_CLOSE
        del head

    def _message_done(self) -> None:
        if not self._done_early:
            self._sink.on_end()
        flags = self._flags
        line = self._start_line
        assert line is not None
        version = line[2]
        if version[0] != 48 and version[2] != 48:  # x.y with neither 0: HTTP/1.1
            keep = not flags & _F_CLOSE
        else:
            keep = bool(flags & _F_KEEP_ALIVE)
        if not self._request and flags & _F_TRANSFER_ENCODING and not flags & _F_CHUNKED:
            keep = False
        self._state = _START if keep else _CLOSED

    # -- chunked bodies --------------------------------------------------------------------

    def _chunk_size(self, data: bytes, pos: int) -> int:
        buf, shift = self._held_and(data, pos)
        start = 0 if self._held else pos
        m = _CHUNK_LINE.match(buf, start)
        if m is None:
            eol = buf.find(b"\n", start)
            if eol >= 0 or not _chunk_line_prefix(buf[start:]):
                raise ParseError("invalid chunk-size line")
            if len(buf) - start > self._max_head:
                raise HeadTooLarge(f"chunk-size line longer than {self._max_head} bytes")
            self._held = bytes(buf[start:])
            return -1
        size = int(m[1], 16)
        if size > _MAX_CHUNK_SIZE:
            raise ParseError("chunk size overflow")
        self._held = b""
        if size:
            self._state = _CHUNK_DATA
            self._remaining = size
        else:
            self._state = _TRAILERS
            self._c = HeadCollector(self._max_head, self._what)
            self._pending = None
        return m.end() - shift

    def _chunk_end(self, data: bytes, pos: int) -> int:
        need = b"\r\n"[len(self._held):]
        got = data[pos:pos + len(need)]
        if not need.startswith(got):
            raise ParseError("chunk data longer than its size")
        if len(got) < len(need):
            self._held += got
            return -1
        self._held = b""
        self._state = _CHUNK_SIZE
        return pos + len(need)

    def _trailers(self, data: bytes, pos: int) -> int:
        buf, shift = self._held_and(data, pos)
        i = 0 if self._held else pos
        while True:
            if buf.startswith(b"\r\n", i):
                self._count_pending()
                self._held = b""
                self._message_done()
                return i + 2 - shift
            m = _FIELD.match(buf, i)
            if m is None:
                self._bad_or_unfinished_field(buf, i)
                if len(buf) - i > self._max_head:
                    raise HeadTooLarge(f"trailer larger than {self._max_head} bytes")
                self._held = bytes(buf[i:])
                return -1
            self._count_pending()
            self._field(m[1], m[2], in_head=False)
            i = m.end()


_CHUNK_LINE_PREFIX = re.compile(
    rb"(?:[0-9A-Fa-f]+(?:%s)*(?:;(?:[%s]*(?:=[%s]*(?:\"(?:[\t !#-\[\]-~\x80-\xff]|\\[%s])*"
    rb"\\?)?)?)?|\r)?)?\Z" % (_EXTENSION, _TCHAR, _TCHAR, _VCHAR))


def _chunk_line_prefix(line: bytes) -> bool:
    m = _CHUNK_LINE_PREFIX.match(line)
    if m is None:
        return False
    digits = _HEX_RUN.match(line)
    return digits is None or int(digits[0], 16) <= _MAX_CHUNK_SIZE


_HEX_RUN = re.compile(rb"[0-9A-Fa-f]+")


def _confirm(start_line: bytes, fields: list[tuple[bytes, bytes]], request: bool) -> None:
    """h11 parses the head too (with a plain start line: that one is llhttp's grammar) and
    must find the same fields; a refusal of either is a 400."""
    conn = h11.Connection(h11.SERVER if request else h11.CLIENT)
    if not request:
        conn.send(h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"x")]))
        conn.send(h11.EndOfMessage())
    lines = b"".join(b"%s: %s\r\n" % f for f in fields if not _framing_field(f[0]))
    conn.receive_data(start_line + lines + b"\r\n")
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as e:
        raise ParseError(str(e)) from None
    if not isinstance(event, (h11.Request, h11.Response, h11.InformationalResponse)):
        raise ParseError("h11 did not read the head")
    got = event.headers.raw_items()
    want = [(n, v.rstrip(b" \t")) for n, v in fields if not _framing_field(n)]
    if list(got) != want:
        raise ParseError("h11 reads the fields otherwise")


def _framing_field(name: bytes) -> bool:
    # Framing fields are llhttp's and the shared rules' to judge (h11 refuses some codings
    # and lists that llhttp and framing.py decide on themselves).
    return len(name) in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding")


class H11RequestParser(_Llhttp):
    """Requests as llhttp reads them; h11 confirms each head."""

    def __init__(self, sink: MessageSink, max_head: int) -> None:
        super().__init__(sink, max_head, request=True)


class H11ResponseParser(_Llhttp):
    def __init__(self, sink: MessageSink, max_head: int) -> None:
        super().__init__(sink, max_head, request=False)

    def expect(self, request_method: bytes, upgrade: bool = False) -> None:
        """Announce the request whose response comes next (HEAD has no body)."""
        self._method = request_method
        if self._done_early:  # as parsers.py starts llhttp afresh after a HEAD response
            self._done_early = False
            self._state = _START
            self._held = b""


__all__ = ["LLHTTP_METHODS", "NO_BODY", "H11RequestParser", "H11ResponseParser"]
