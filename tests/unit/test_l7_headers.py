"""proxy.l7.headers, proxy.l7.framing and proxy.l7.exchange.may_retry, as tables.

Heads are built directly as `MessageHead`s (what a parser hands over) and the encoded
bytes are split back into a first line and an ordered header list, so every row states
the exact head that goes on the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.fakes import HeadSink

from proxy.l7.exchange import CONNECT_FAILURE, RESET, TIMEOUT, may_retry
from proxy.l7.framing import (
    connection_tokens,
    parse_content_length,
    request_framing,
    response_framing,
    wants_keep_alive,
)
from proxy.l7.headers import (
    HOP_BY_HOP,
    LAST_CHUNK,
    chunk,
    encode_error,
    encode_interim,
    encode_request,
    encode_response,
)
from proxy.l7.message import CHUNKED, LENGTH, NO_BODY, UNTIL_CLOSE, MessageHead, ParseError
from proxy.l7.parsers import PARSERS
from proxy.outcomes import BY_LABEL, mask_of

Headers = list[tuple[bytes, bytes]]
CLIENT_IP = b"192.0.2.7"
UPSTREAM = b"web"


def split_head(raw: bytes) -> tuple[bytes, Headers, bytes]:
    """(first line, headers in order, bytes after the head); the head must end in CRLFCRLF."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, f"no end of head in {raw!r}"
    first, *lines = head.split(b"\r\n")
    headers = []
    for line in lines:
        name, colon, value = line.partition(b": ")
        assert colon and name and b" " not in name, line
        headers.append((name, value))
    return first, headers, rest


def request(headers: Headers, *, method: bytes = b"GET", target: bytes = b"/",
            version: bytes = b"1.1", framing: int = NO_BODY,
            length: int | None = None) -> MessageHead:
    return MessageHead(method=method, target=target, version=version, headers=headers,
                       framing=framing, content_length=length)


def response(headers: Headers, *, status: int = 200, reason: bytes = b"OK",
             version: bytes = b"1.1", framing: int = LENGTH,
             length: int | None = None) -> MessageHead:
    return MessageHead(status=status, reason=reason, version=version, headers=headers,
                       framing=framing, content_length=length)


XFF_CLIENT = (b"X-Forwarded-For", CLIENT_IP)
XFP_HTTP = (b"X-Forwarded-Proto", b"http")
HOST = (b"Host", b"example.com")


# -- encode_request -------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestRow:
    head: MessageHead
    sent: Headers  # the headers upstream receives, in order


REQUEST_ROWS: dict[str, RequestRow] = {
    "plain-get": RequestRow(
        request([HOST, (b"Accept", b"*/*")]),
        [HOST, (b"Accept", b"*/*"), XFF_CLIENT, XFP_HTTP]),
    "every-hop-by-hop-name-dropped": RequestRow(
        request([HOST, (b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"),
                 (b"Proxy-Connection", b"keep-alive"), (b"TE", b"trailers"),
                 (b"Trailer", b"X-Sum"), (b"Upgrade", b"h2c"), (b"X-App", b"1")]),
        [HOST, (b"X-App", b"1"), XFF_CLIENT, XFP_HTTP]),
    "hop-by-hop-names-any-case": RequestRow(
        request([HOST, (b"KEEP-ALIVE", b"timeout=5"), (b"connection", b"Keep-Alive"),
                 (b"pRoXy-CoNnEcTiOn", b"close")]),
        [HOST, XFF_CLIENT, XFP_HTTP]),
    "names-listed-in-connection-dropped": RequestRow(
        request([HOST, (b"Connection", b"X-Secret, x-other"), (b"X-Secret", b"s"),
                 (b"X-OTHER", b"o"), (b"X-Keep", b"k")]),
        [HOST, (b"X-Keep", b"k"), XFF_CLIENT, XFP_HTTP]),
    "names-listed-in-several-connection-fields": RequestRow(
        request([HOST, (b"Connection", b"x-a"), (b"Connection", b" X-B ,close"),
                 (b"X-A", b"1"), (b"X-B", b"2"), (b"X-C", b"3")]),
        [HOST, (b"X-C", b"3"), XFF_CLIENT, XFP_HTTP]),
    "xff-appended-to-existing": RequestRow(
        request([HOST, (b"X-Forwarded-For", b"203.0.113.1")]),
        [HOST, (b"X-Forwarded-For", b"203.0.113.1, " + CLIENT_IP), XFP_HTTP]),
    "xff-several-fields-combined-in-order": RequestRow(
        request([(b"x-forwarded-for", b"203.0.113.1"), HOST,
                 (b"X-Forwarded-For", b"198.51.100.2, 198.51.100.3")]),
        [HOST, (b"X-Forwarded-For",
                b"203.0.113.1, 198.51.100.2, 198.51.100.3, " + CLIENT_IP), XFP_HTTP]),
    "xfp-kept-when-present": RequestRow(
        request([HOST, (b"X-Forwarded-Proto", b"https")]),
        [HOST, (b"X-Forwarded-Proto", b"https"), XFF_CLIENT]),
    "xfp-lowercase-name-counts-as-present": RequestRow(
        request([HOST, (b"x-forwarded-proto", b"https")]),
        [HOST, (b"x-forwarded-proto", b"https"), XFF_CLIENT]),
    "host-kept-verbatim": RequestRow(
        request([(b"host", b"Example.COM:8080")]),
        [(b"host", b"Example.COM:8080"), XFF_CLIENT, XFP_HTTP]),
    "http10-without-host-gets-one": RequestRow(
        request([(b"Accept", b"*/*")], version=b"1.0"),
        [(b"Accept", b"*/*"), XFF_CLIENT, XFP_HTTP, (b"Host", UPSTREAM)]),
    "http10-with-host-keeps-it": RequestRow(
        request([HOST], version=b"1.0"),
        [HOST, XFF_CLIENT, XFP_HTTP]),
    "content-length-forwarded": RequestRow(
        request([HOST, (b"Content-Length", b"5")], method=b"POST", framing=LENGTH, length=5),
        [HOST, (b"Content-Length", b"5"), XFF_CLIENT, XFP_HTTP]),
    "chunked-request-rechunked": RequestRow(
        request([HOST, (b"Transfer-Encoding", b"chunked")], method=b"POST", framing=CHUNKED),
        [HOST, XFF_CLIENT, XFP_HTTP, (b"Transfer-Encoding", b"chunked")]),
    "http10-chunked-request-rechunked": RequestRow(
        request([(b"Transfer-Encoding", b"chunked")], method=b"POST", version=b"1.0",
                framing=CHUNKED),
        [XFF_CLIENT, XFP_HTTP, (b"Host", UPSTREAM), (b"Transfer-Encoding", b"chunked")]),
    "end-to-end-fields-kept-in-order": RequestRow(
        request([HOST, (b"Expect", b"100-continue"), (b"Cookie", b"a=1"), (b"Cookie", b"b=2"),
                 (b"Authorization", b"Bearer t")], method=b"PUT", framing=LENGTH, length=1),
        [HOST, (b"Expect", b"100-continue"), (b"Cookie", b"a=1"), (b"Cookie", b"b=2"),
         (b"Authorization", b"Bearer t"), XFF_CLIENT, XFP_HTTP]),
}


@pytest.mark.parametrize("row_id", REQUEST_ROWS)
def test_encode_request(row_id: str) -> None:
    row = REQUEST_ROWS[row_id]
    raw = encode_request(row.head, client_ip=CLIENT_IP, default_host=UPSTREAM)
    first, headers, rest = split_head(raw)
    assert first == row.head.method + b" " + row.head.target + b" HTTP/1.1"
    assert headers == row.sent
    assert rest == b""


@pytest.mark.parametrize("row_id", REQUEST_ROWS)
def test_encoded_request_is_valid_http11(row_id: str) -> None:
    """What we send parses as one HTTP/1.1 request (h11 as the judge), with our framing."""
    head = REQUEST_ROWS[row_id].head
    raw = encode_request(head, client_ip=CLIENT_IP, default_host=UPSTREAM)
    server = h11.Connection(h11.SERVER)
    server.receive_data(raw)
    event = server.next_event()
    assert isinstance(event, h11.Request)
    assert event.http_version == b"1.1"
    names = [n for n, _ in event.headers]
    assert names.count(b"host") == 1
    assert (b"transfer-encoding" in names) == (head.framing == CHUNKED)
    assert not {b"connection", b"keep-alive", b"upgrade", b"te"} & set(names)


@pytest.mark.parametrize("method,target", [
    (b"GET", b"/"), (b"OPTIONS", b"*"), (b"GET", b"http://example.com/a?b=c"),
    (b"DELETE", b"/items/7?force=1"),
])
def test_encode_request_first_line(method: bytes, target: bytes) -> None:
    raw = encode_request(request([HOST], method=method, target=target, version=b"1.0"),
                         client_ip=CLIENT_IP, default_host=UPSTREAM)
    assert raw.startswith(method + b" " + target + b" HTTP/1.1\r\n")


def test_hop_by_hop_table() -> None:
    """RFC 9110 section 7.6.1 plus the de-facto Proxy-Connection; all lower-case."""
    assert {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
            b"transfer-encoding", b"upgrade"} == HOP_BY_HOP


@pytest.mark.parametrize("listed", [b"Content-Length", b"content-length, close"])
def test_connection_cannot_remove_request_framing(listed: bytes) -> None:
    head = request([HOST, (b"Content-Length", b"5"), (b"Connection", listed)],
                   method=b"POST", framing=LENGTH, length=5)
    _first, headers, _ = split_head(encode_request(head, client_ip=CLIENT_IP,
                                                   default_host=UPSTREAM))
    assert (b"Content-Length", b"5") in headers


# -- encode_response ------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponseRow:
    head: MessageHead
    request_version: bytes
    request_keep_alive: bool
    sent: Headers
    chunk_body: bool
    keep: bool


CL3 = (b"Content-Length", b"3")
TE_CHUNKED = (b"Transfer-Encoding", b"chunked")
CLOSE = (b"Connection", b"close")
KEEP_ALIVE = (b"Connection", b"keep-alive")

RESPONSE_ROWS: dict[str, ResponseRow] = {
    "11-client-content-length": ResponseRow(
        response([CL3, (b"Content-Type", b"text/plain")], length=3), b"1.1", True,
        [CL3, (b"Content-Type", b"text/plain")], chunk_body=False, keep=True),
    "11-client-chunked-rechunked": ResponseRow(
        response([TE_CHUNKED, (b"X-App", b"1")], framing=CHUNKED), b"1.1", True,
        [(b"X-App", b"1"), TE_CHUNKED], chunk_body=True, keep=True),
    "11-client-close-delimited-rechunked": ResponseRow(
        response([(b"X-App", b"1")], framing=UNTIL_CLOSE), b"1.1", True,
        [(b"X-App", b"1"), TE_CHUNKED], chunk_body=True, keep=True),
    "11-client-asked-close": ResponseRow(
        response([CL3], length=3), b"1.1", False, [CL3, CLOSE], chunk_body=False, keep=False),
    "11-client-asked-close-chunked": ResponseRow(
        response([TE_CHUNKED], framing=CHUNKED), b"1.1", False,
        [TE_CHUNKED, CLOSE], chunk_body=True, keep=False),
    "10-client-keep-alive-content-length": ResponseRow(
        response([CL3], length=3), b"1.0", True, [CL3, KEEP_ALIVE], chunk_body=False,
        keep=True),
    "10-client-keep-alive-chunked-not-rechunked": ResponseRow(
        response([TE_CHUNKED, (b"X-App", b"1")], framing=CHUNKED), b"1.0", True,
        [(b"X-App", b"1"), CLOSE], chunk_body=False, keep=False),
    "10-client-keep-alive-close-delimited": ResponseRow(
        response([], framing=UNTIL_CLOSE), b"1.0", True, [CLOSE], chunk_body=False,
        keep=False),
    "10-client-without-keep-alive": ResponseRow(
        response([CL3], length=3), b"1.0", False, [CL3, CLOSE], chunk_body=False, keep=False),
    "10-client-no-body": ResponseRow(
        response([], status=204, reason=b"No Content", framing=NO_BODY), b"1.0", True,
        [KEEP_ALIVE], chunk_body=False, keep=True),
    "upstream-connection-fields-dropped": ResponseRow(
        response([CL3, CLOSE, (b"Keep-Alive", b"timeout=5"), (b"Connection", b"X-Internal"),
                  (b"X-Internal", b"secret"), (b"X-Public", b"p")], length=3),
        b"1.1", True, [CL3, (b"X-Public", b"p")], chunk_body=False, keep=True),
    "no-body-status-not-chunked": ResponseRow(
        response([(b"ETag", b'"x"')], status=304, reason=b"Not Modified", framing=NO_BODY),
        b"1.1", True, [(b"ETag", b'"x"')], chunk_body=False, keep=True),
    "repeated-fields-kept-in-order": ResponseRow(
        response([(b"Set-Cookie", b"a=1"), CL3, (b"Set-Cookie", b"b=2")], length=3),
        b"1.1", True, [(b"Set-Cookie", b"a=1"), CL3, (b"Set-Cookie", b"b=2")],
        chunk_body=False, keep=True),
}


@pytest.mark.parametrize("row_id", RESPONSE_ROWS)
def test_encode_response(row_id: str) -> None:
    row = RESPONSE_ROWS[row_id]
    raw, chunk_body, keep = encode_response(row.head, request_version=row.request_version,
                                            request_keep_alive=row.request_keep_alive)
    first, headers, rest = split_head(raw)
    assert first == b"HTTP/1.1 %d %s" % (row.head.status, row.head.reason)
    assert (headers, chunk_body, keep, rest) == (row.sent, row.chunk_body, row.keep, b"")


@pytest.mark.parametrize("row_id", RESPONSE_ROWS)
def test_encoded_response_frames_the_body_once(row_id: str) -> None:
    """The client can always find the body's end: one framing, never both, never none
    on a connection that stays open (RFC 9112 section 6.3)."""
    row = RESPONSE_ROWS[row_id]
    raw, chunk_body, keep = encode_response(row.head, request_version=row.request_version,
                                            request_keep_alive=row.request_keep_alive)
    names = [n.lower() for n, _ in split_head(raw)[1]]
    has_cl, has_te = b"content-length" in names, b"transfer-encoding" in names
    assert not (has_cl and has_te)
    assert has_te == chunk_body
    if keep and row.head.framing != NO_BODY:
        assert has_cl or has_te


def test_rechunked_response_drops_content_length() -> None:
    head = response([CL3, TE_CHUNKED], framing=CHUNKED)
    raw, chunk_body, _keep = encode_response(head, request_version=b"1.1",
                                             request_keep_alive=True)
    assert chunk_body
    assert [n for n, _ in split_head(raw)[1]] == [b"Transfer-Encoding"]


def test_connection_cannot_remove_response_framing() -> None:
    head = response([CL3, (b"Connection", b"Content-Length")], length=3)
    raw, chunk_body, keep = encode_response(head, request_version=b"1.1",
                                            request_keep_alive=True)
    assert (chunk_body, keep) == (False, True)
    assert CL3 in split_head(raw)[1]


# -- encode_interim -------------------------------------------------------------------------


@pytest.mark.parametrize("head,expected", [
    (response([], status=100, reason=b"Continue", framing=NO_BODY),
     b"HTTP/1.1 100 Continue\r\n\r\n"),
    (response([(b"Link", b"</s.css>; rel=preload"), (b"Connection", b"keep-alive")],
              status=103, reason=b"Early Hints", framing=NO_BODY),
     b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"),
])
def test_encode_interim(head: MessageHead, expected: bytes) -> None:
    assert encode_interim(head) == expected


# -- encode_error ---------------------------------------------------------------------------


@pytest.mark.parametrize("status,reason,upstream,detail,keep_alive", [
    (400, b"Bad Request", "web", "malformed request", True),
    (400, b"Bad Request", "web", "both Content-Length and Transfer-Encoding", False),
    (408, b"Request Timeout", "api", "header not complete", False),
    (431, b"Request Header Fields Too Large", "api", "header larger than 65536", False),
    (502, b"Bad Gateway", "billing-v2", "no instance could be reached", True),
    (503, b"Service Unavailable", "web", "no passing instance", True),
    (504, b"Gateway Timeout", "web", "request_timeout 30s passed", False),
    (502, b"Bad Gateway", "web", "détail non-ASCII ✓", True),
])
def test_encode_error(status: int, reason: bytes, upstream: str, detail: str,
                      keep_alive: bool) -> None:
    raw = encode_error(status, reason, upstream, detail, keep_alive)
    first, headers, body = split_head(raw)
    assert first == b"HTTP/1.1 %d %s" % (status, reason)
    fields = {n.lower(): v for n, v in headers}
    assert len(fields) == len(headers), "no field repeated"
    assert int(fields[b"content-length"]) == len(body)
    assert fields[b"content-type"].startswith(b"text/plain")
    assert b"transfer-encoding" not in fields
    assert (fields.get(b"connection") == b"close") is (not keep_alive)
    assert b"connection" in fields or keep_alive
    text = body.decode()
    assert f"upstream {upstream}" in text and detail in text
    # and it parses as one complete response, with nothing left over
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    kinds = []
    while (event := client.next_event()) is not h11.NEED_DATA:
        kinds.append(type(event))
        if isinstance(event, h11.EndOfMessage):
            break
    assert kinds == [h11.Response, h11.Data, h11.EndOfMessage]


# -- chunk / LAST_CHUNK ---------------------------------------------------------------------


@pytest.mark.parametrize("data,framed", [
    (b"a", b"1\r\na\r\n"),
    (b"hello", b"5\r\nhello\r\n"),
    (b"x" * 10, b"a\r\n" + b"x" * 10 + b"\r\n"),
    (b"x" * 16, b"10\r\n" + b"x" * 16 + b"\r\n"),
    (b"x" * 255, b"ff\r\n" + b"x" * 255 + b"\r\n"),
    (b"\r\n0\r\n\r\n", b"7\r\n\r\n0\r\n\r\n\r\n"),  # data that looks like framing stays data
])
def test_chunk(data: bytes, framed: bytes) -> None:
    assert chunk(data) == framed


def test_last_chunk() -> None:
    assert LAST_CHUNK == b"0\r\n\r\n"


def test_empty_chunk_is_not_the_end() -> None:
    assert chunk(b"") != LAST_CHUNK


@pytest.mark.parametrize("pieces", [[b"a"], [b"hello", b" ", b"world"], [b"x" * 70000]])
def test_chunks_parse_back(pieces: list[bytes]) -> None:
    server = h11.Connection(h11.SERVER)
    server.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                        + b"".join(chunk(p) for p in pieces) + LAST_CHUNK)
    got = b""
    while not isinstance(event := server.next_event(), h11.EndOfMessage):
        assert event is not h11.NEED_DATA
        if isinstance(event, h11.Data):
            got += event.data
    assert got == b"".join(pieces)


# -- framing.py -----------------------------------------------------------------------------


@pytest.mark.parametrize("values,length", [
    ([b"5"], 5), ([b"0"], 0), ([b"007"], 7), ([b" 7 "], 7), ([b"5", b"5"], 5),
    ([b"5, 5"], 5), ([b"5", b"5,5"], 5), ([b"9" * 18], int(b"9" * 18)),
])
def test_parse_content_length(values: list[bytes], length: int) -> None:
    assert parse_content_length(values) == length


@pytest.mark.parametrize("values", [
    [b"5", b"6"], [b"5, 6"], [b"5,"], [b""], [b"-1"], [b"+1"], [b"1.0"], [b"1e3"],
    [b"0x10"], [b"five"], [b"1 2"], [b"9" * 19], ["٣".encode()],
])
def test_parse_content_length_rejects(values: list[bytes]) -> None:
    with pytest.raises(ParseError):
        parse_content_length(values)


@pytest.mark.parametrize("cl,te,framing", [
    ([], [], (NO_BODY, None)),
    ([b"0"], [], (NO_BODY, 0)),
    ([b"10"], [], (LENGTH, 10)),
    ([b"10", b"10"], [], (LENGTH, 10)),
    ([], [b"chunked"], (CHUNKED, None)),
    ([], [b"CHUNKED"], (CHUNKED, None)),
    ([b"3"], [b"chunked"], ParseError),
    ([b"0"], [b"chunked"], ParseError),
    ([b"3"], [b"gzip"], ParseError),
    ([], [b"gzip"], ParseError),
    ([], [b"chunked, gzip"], ParseError),
    ([], [b"identity"], ParseError),
    ([b"3", b"4"], [], ParseError),
    ([b"abc"], [], ParseError),
    pytest.param([], [b"gzip, chunked"], ParseError,
        id="gzip-then-chunked"),
])
def test_request_framing(cl: list[bytes], te: list[bytes],
                         framing: tuple[int, int | None] | type[ParseError]) -> None:
    if isinstance(framing, tuple):
        assert request_framing(cl, te) == framing
    else:
        with pytest.raises(framing):
            request_framing(cl, te)


@pytest.mark.parametrize("status,method,cl,te,framing", [
    (200, b"GET", [b"3"], [], (LENGTH, 3)),
    (200, b"GET", [b"0"], [], (NO_BODY, 0)),
    (404, b"POST", [b"2"], [], (LENGTH, 2)),
    (200, b"GET", [], [b"chunked"], (CHUNKED, None)),
    (200, b"GET", [b"3"], [b"chunked"], (CHUNKED, None)),  # TE overrides CL (6.3 #3)
    (200, b"GET", [], [], (UNTIL_CLOSE, None)),
    # SPEC: any coding besides a final chunked -> 502 (undone codings never reach a client)
    (200, b"GET", [b"3"], [b"gzip"], ParseError),
    (200, b"GET", [], [b"gzip, chunked"], ParseError),
    (200, b"GET", [], [b"gzip", b"chunked"], ParseError),
    (200, b"GET", [], [b"chunked, gzip"], ParseError),
    (200, b"HEAD", [], [b"gzip, chunked"], (NO_BODY, None)),  # no body: nothing to undo
    (500, b"GET", [], [], (UNTIL_CLOSE, None)),
    (200, b"HEAD", [b"10"], [], (NO_BODY, None)),
    (200, b"HEAD", [], [b"chunked"], (NO_BODY, None)),
    (200, b"HEAD", [b"bogus"], [], (NO_BODY, None)),  # HEAD: the length is not read
    (100, b"POST", [], [], (NO_BODY, None)),
    (101, b"GET", [], [], (NO_BODY, None)),
    (199, b"GET", [b"5"], [], (NO_BODY, None)),
    (204, b"DELETE", [b"5"], [], (NO_BODY, None)),
    (304, b"GET", [b"5"], [b"chunked"], (NO_BODY, None)),
    (200, b"GET", [b"x"], [], ParseError),
    (200, b"GET", [b"3", b"4"], [], ParseError),
])
def test_response_framing(status: int, method: bytes, cl: list[bytes], te: list[bytes],
                          framing: tuple[int, int | None] | type[ParseError]) -> None:
    if isinstance(framing, tuple):
        assert response_framing(status, method, cl, te) == framing
    else:
        with pytest.raises(framing):
            response_framing(status, method, cl, te)


@pytest.mark.parametrize("version,tokens,keep", [
    (b"1.1", set(), True),
    (b"1.1", {b"keep-alive"}, True),
    (b"1.1", {b"close"}, False),
    (b"1.1", {b"keep-alive", b"close"}, False),
    (b"1.0", set(), False),
    (b"1.0", {b"keep-alive"}, True),
    (b"1.0", {b"keep-alive", b"close"}, False),
    (b"1.0", {b"upgrade"}, False),
])
def test_wants_keep_alive(version: bytes, tokens: set[bytes], keep: bool) -> None:
    assert wants_keep_alive(version, frozenset(tokens)) is keep


@pytest.mark.parametrize("values,tokens", [
    ([], set()),
    ([b"close"], {b"close"}),
    ([b"Keep-Alive, Upgrade"], {b"keep-alive", b"upgrade"}),
    ([b"close", b" X-Foo ,, "], {b"close", b"x-foo"}),
    ([b","], set()),
])
def test_connection_tokens(values: list[bytes], tokens: set[bytes]) -> None:
    assert connection_tokens(values) == frozenset(tokens)


# -- exchange.may_retry ---------------------------------------------------------------------

ALL_KINDS = frozenset({CONNECT_FAILURE, RESET, TIMEOUT, "502", "503", "504"})
IDEMPOTENT = (b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE")
NOT_IDEMPOTENT = (b"POST", b"PATCH", b"CONNECT")


@dataclass(frozen=True)
class RetryRow:
    kind: str
    method: bytes
    replayable: bool = True
    attempt: int = 1
    retries: int = 2
    retry_on: frozenset[str] = ALL_KINDS


def rows(kinds: Sequence[str], methods: Sequence[bytes], **kw: object) -> list[RetryRow]:
    return [RetryRow(k, m, **kw) for k in kinds for m in methods]  # type: ignore[arg-type]


AFTER_SENT = (RESET, TIMEOUT, "502", "503", "504")
RETRY_TABLE: list[tuple[RetryRow, bool]] = [
    # a failed connect sent nothing: any method, replayable or not
    *[(r, True) for r in rows([CONNECT_FAILURE], IDEMPOTENT + NOT_IDEMPOTENT)],
    *[(r, True) for r in rows([CONNECT_FAILURE], [b"POST"], replayable=False)],
    # after the request was sent: idempotent and replayable only
    *[(r, True) for r in rows(AFTER_SENT, IDEMPOTENT)],
    *[(r, False) for r in rows(AFTER_SENT, NOT_IDEMPOTENT)],
    *[(r, False) for r in rows(AFTER_SENT, [b"GET", b"PUT"], replayable=False)],
    # the attempt budget: `retries` further attempts after the first
    (RetryRow(CONNECT_FAILURE, b"GET", attempt=2, retries=2), True),
    (RetryRow(CONNECT_FAILURE, b"GET", attempt=3, retries=2), False),
    (RetryRow(RESET, b"GET", attempt=2, retries=2), True),
    (RetryRow(RESET, b"GET", attempt=3, retries=2), False),
    (RetryRow(CONNECT_FAILURE, b"GET", attempt=1, retries=0), False),
    (RetryRow("503", b"GET", attempt=1, retries=0), False),
    # kinds not listed in retry_on are never retried
    (RetryRow(CONNECT_FAILURE, b"GET", retry_on=ALL_KINDS - {CONNECT_FAILURE}), False),
    (RetryRow(RESET, b"GET", retry_on=frozenset({CONNECT_FAILURE})), False),
    (RetryRow("503", b"GET", retry_on=frozenset({"502", "504"})), False),
    (RetryRow("500", b"GET"), False),
    (RetryRow(TIMEOUT, b"GET", retry_on=frozenset()), False),
    (RetryRow("502", b"GET", retry_on=frozenset({"502"})), True),
]


@pytest.mark.parametrize("row,retry", RETRY_TABLE,
                         ids=[f"{r.kind}-{r.method.decode()}-rep{int(r.replayable)}-"
                              f"a{r.attempt}of{r.retries}-{len(r.retry_on)}kinds"
                              for r, _ in RETRY_TABLE])
def test_may_retry(row: RetryRow, retry: bool) -> None:
    """The table names outcomes by their labels, as `retry_on` does; may_retry takes the
    codes (proxy.outcomes) and `retry_on` as a bit set."""
    code = BY_LABEL.get(row.kind)
    if code is None:  # a status that is no outcome (500): never retried, never asked
        assert not retry
        return
    assert may_retry(code, method=row.method, replayable=row.replayable, attempt=row.attempt,
                     retries=row.retries, retry_on=mask_of(row.retry_on)) is retry


# --- the parser's notes give the same forwarding as the full pass -----------------------
# `encode_request`/`encode_response` skip the pass over every field when the parser noted
# nothing but hop-by-hop fields to drop (`MessageHead.kinds`, `drop_at`). Heads parsed from
# random fields must encode to the same bytes with and without those notes.

FIELD_NAMES = [b"Host", b"host", b"HOST", b"Accept", b"Server", b"Date", b"Content-Type",
               b"Connection", b"connection", b"CONNECTION", b"Keep-Alive", b"keep-alive",
               b"Proxy-Connection", b"TE", b"te", b"Trailer", b"Upgrade", b"Close", b"close",
               b"X-Forwarded-For", b"x-forwarded-for", b"X-Forwarded-Proto", b"X-Custom",
               b"Content-Length", b"Transfer-Encoding"]
CONNECTION_VALUES = [b"keep-alive", b"close", b"Keep-Alive", b"close, keep-alive", b"x-custom",
                     b"upgrade", b"te, trailer", b"Close"]
fields = st.lists(st.tuples(st.sampled_from(FIELD_NAMES),
                            st.sampled_from([b"1", b"a b", b"0", b"chunked", b"v "])),
                  max_size=6)


def _parsed(first: bytes, pairs: Headers, connection: list[bytes], parser_name: str,
            side: int) -> MessageHead | None:
    """The head `parser_name` makes of `first`, `pairs` and Connection fields of
    `connection` (side 0: request, 1: response); None when the parser refuses it."""
    fields = [*pairs, *((b"Connection", v) for v in connection)]
    data = first + b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n"
    sink = HeadSink()
    parser = PARSERS[parser_name][side](sink, 65536)
    if side:
        parser.expect(b"GET")
    try:
        parser.feed(data)
    except ParseError:
        return None
    head = sink.heads[0]
    assert head.kinds is not None  # the parser's notes: what the shortcut reads
    return head


def _without_notes(head: MessageHead) -> MessageHead:
    return MessageHead(method=head.method, target=head.target, status=head.status,
                       reason=head.reason, version=head.version, headers=head.headers,
                       keep_alive=head.keep_alive, framing=head.framing,
                       content_length=head.content_length, upgrade=head.upgrade,
                       connection=head.connection)


@settings(max_examples=400, deadline=None)
@given(pairs=fields, connection=st.lists(st.sampled_from(CONNECTION_VALUES), max_size=2),
       version=st.sampled_from([b"1.1", b"1.0"]), parser_name=st.sampled_from(["httptools", "h11"]))
def test_request_notes_forward_like_the_full_pass(pairs: Headers, connection: list[bytes],
                                                  version: bytes, parser_name: str) -> None:
    head = _parsed(b"GET /p HTTP/" + version + b"\r\n", pairs, connection, parser_name, 0)
    if head is None:
        return
    fast = encode_request(head, client_ip=CLIENT_IP, default_host=UPSTREAM)
    assert fast == encode_request(_without_notes(head), client_ip=CLIENT_IP,
                                  default_host=UPSTREAM)


@settings(max_examples=400, deadline=None)
@given(pairs=fields, connection=st.lists(st.sampled_from(CONNECTION_VALUES), max_size=2),
       status=st.sampled_from([200, 204, 404, 503]), request_version=st.sampled_from([b"1.1", b"1.0"]),
       keep=st.booleans(), parser_name=st.sampled_from(["httptools", "h11"]))
def test_response_notes_forward_like_the_full_pass(pairs: Headers, connection: list[bytes],
                                                   status: int, request_version: bytes,
                                                   keep: bool, parser_name: str) -> None:
    head = _parsed(b"HTTP/1.1 %d X\r\n" % status, pairs, connection, parser_name, 1)
    if head is None:
        return
    fast = encode_response(head, request_version=request_version, request_keep_alive=keep)
    assert fast == encode_response(_without_notes(head), request_version=request_version,
                                   request_keep_alive=keep)
