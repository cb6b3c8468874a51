"""Forwarding a head as it arrived (`MessageHead.raw`) sends the same bytes as rebuilding it.

The httptools parsers keep the bytes of a head that came in one read and whose every line
is as `headers.py` writes it; forwarding then copies them with the hop-by-hop lines cut out.
Each case parses a head, checks whether its bytes were kept, and compares what is forwarded
with what the same head forwards with `raw` taken away (the line-by-line path, which the
differential tests hold to h11).
"""

from __future__ import annotations

import pytest
from test_l7_parsers import MAX_HEAD, Recorder

from proxy.l7.headers import PROTO_HTTPS, encode_request, encode_response
from proxy.l7.message import MessageHead
from proxy.l7.parsers import PARSERS


def parse(data: list[bytes], request: bool) -> list[MessageHead]:
    rec = Recorder()
    parser = PARSERS["httptools"][0 if request else 1](rec, MAX_HEAD)
    for piece in data:
        parser.feed(piece)
    return rec.heads


def rebuilt(head: MessageHead) -> MessageHead:
    return MessageHead(method=head.method, target=head.target, status=head.status,
                       reason=head.reason, version=head.version, headers=head.headers,
                       keep_alive=head.keep_alive, framing=head.framing,
                       content_length=head.content_length, upgrade=head.upgrade,
                       connection=head.connection, kinds=head.kinds, drop_at=head.drop_at)


def forwarded_request(head: MessageHead, request_id: bytes) -> bytes:
    return encode_request(head, client_ip=b"10.0.0.7", default_host=b"up.example",
                          request_id=request_id)


REQUEST = b"GET /a?b=c HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n"
KEPT_REQUESTS = [
    REQUEST,
    b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\nUser-Agent: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nConnection: close\r\nHost: h\r\nKeep-Alive: 5\r\nTE: trailers\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nX-Forwarded-Proto: https\r\n\r\nabc",
    b"GET / HTTP/1.1\r\nHost: h\r\nX-Request-Id: abc\r\nProxy-Connection: keep-alive\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nX-Empty: \r\n\r\n",
]
REWRITTEN_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost:h\r\n\r\n",  # no space before the value
    b"GET / HTTP/1.1\r\nHost:  h\r\n\r\n",  # two
    b"GET / HTTP/1.1\r\nHost:\th\r\n\r\n",  # a tab
    b"GET / HTTP/1.1\r\nHost: h \r\n\r\n",  # trailing whitespace
    b"GET / HTTP/1.1\r\nHost: h\r\nX-Empty:\r\n\r\n",  # an empty value without the space
    b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n",  # two spaces in the request line
    b"GET /  HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: h\r\n\r\n",  # forwarded as HTTP/1.1
    b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",  # a blank line before the request
    b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close, x-hop\r\nX-Hop: 1\r\n\r\n",
]


@pytest.mark.parametrize("data", KEPT_REQUESTS)
@pytest.mark.parametrize("request_id", [b"", b"0123456789abcdef0123456789abcdef"])
def test_a_request_in_one_read_is_forwarded_from_its_own_bytes(data: bytes,
                                                               request_id: bytes) -> None:
    (head,) = parse([data], request=True)
    assert head.raw == data[:data.index(b"\r\n\r\n") + 4]
    assert forwarded_request(head, request_id) == forwarded_request(rebuilt(head), request_id)


@pytest.mark.parametrize("data", REWRITTEN_REQUESTS)
def test_a_request_not_as_forwarded_is_rewritten(data: bytes) -> None:
    head = parse([data], request=True)[0]
    if head.raw is not None:  # kept only where the full pass would not change a line
        assert forwarded_request(head, b"") == forwarded_request(rebuilt(head), b"")
    else:
        out = forwarded_request(head, b"")
        assert out.startswith((b"GET / HTTP/1.1\r\n", b"POST / HTTP/1.1\r\n"))
        assert b"Host: h\r\n" in out


@pytest.mark.parametrize("data", KEPT_REQUESTS + REWRITTEN_REQUESTS)
def test_a_tls_client_is_said_to_have_come_over_https(data: bytes) -> None:
    """Behind a TLS listener (PROTO_HTTPS) every path adds `X-Forwarded-Proto: https`,
    where the client sent none; a client's own is forwarded as it is."""
    head = parse([data], request=True)[0]
    outs = [encode_request(h, client_ip=b"10.0.0.7", default_host=b"up.example",
                           proto_line=PROTO_HTTPS) for h in (head, rebuilt(head))]
    assert outs[0] == outs[1]
    lines = outs[0].lower().split(b"\r\n")
    sent = [line for line in lines if line.startswith(b"x-forwarded-proto:")]
    assert sent == [b"x-forwarded-proto: https"], outs[0]


@pytest.mark.parametrize("fields", [
    b"Host:h\r\nA:  b\r\nC:\td \r\n",
    b"Host:h\r\nA:  b\r\nC: d\r\n",  # one space short, one too many: the same length
    b"Host:h\r\nA: b \r\nC: d\r\n",
    b"Host:h\r\nA:\t b\r\nC: d\r\n",
    b"Host: h\r\nA: b\r\nC:\t d\r\n",
])
def test_the_canonical_lines_are_what_is_sent_for_odd_whitespace(fields: bytes) -> None:
    (odd,) = parse([b"GET / HTTP/1.1\r\n" + fields + b"\r\n"], request=True)
    assert odd.raw is None
    assert forwarded_request(odd, b"") == (
        b"GET / HTTP/1.1\r\nHost: h\r\nA: b\r\nC: d\r\nX-Forwarded-For: 10.0.0.7\r\n"
        b"X-Forwarded-Proto: http\r\n\r\n")


def test_a_head_cut_across_reads_is_rewritten() -> None:
    (head,) = parse([REQUEST[:20], REQUEST[20:]], request=True)
    assert head.raw is None
    (whole,) = parse([REQUEST], request=True)
    assert forwarded_request(head, b"") == forwarded_request(whole, b"")


def test_pipelined_requests_keep_only_the_first_head_bytes() -> None:
    second = b"GET /2 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    first, later = parse([REQUEST + second], request=True)
    assert first.raw == REQUEST
    assert later.raw is None  # it did not start the read
    assert forwarded_request(later, b"") == (
        b"GET /2 HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 10.0.0.7\r\n"
        b"X-Forwarded-Proto: http\r\n\r\n")


RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 2\r\nConnection: keep-alive\r\n\r\nok")
KEPT_RESPONSES = [
    RESPONSE,
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
    (b"HTTP/1.1 404 Not Found\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n"
    b"Connection: keep-alive\r\nX-A: b\r\n\r\n"),
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
]
REWRITTEN_RESPONSES = [
    b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n",  # no reason: "-" is sent
    b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",  # sent as HTTP/1.1
    b"HTTP/1.1 200 OK\r\nContent-Length:0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nuntil close",
]


@pytest.mark.parametrize("data", KEPT_RESPONSES)
@pytest.mark.parametrize(("version", "keep"), [(b"1.1", True), (b"1.1", False),
                                               (b"1.0", True), (b"1.0", False)])
def test_a_response_in_one_read_is_forwarded_from_its_own_bytes(data: bytes, version: bytes,
                                                                keep: bool) -> None:
    (head,) = parse([data], request=False)
    assert head.raw == data[:data.index(b"\r\n\r\n") + 4]
    assert (encode_response(head, request_version=version, request_keep_alive=keep)
            == encode_response(rebuilt(head), request_version=version, request_keep_alive=keep))


def test_the_connection_line_is_cut_out_of_a_response() -> None:
    (head,) = parse([RESPONSE], request=False)
    assert encode_response(head, request_version=b"1.1", request_keep_alive=True) == (
        (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 2\r\n\r\n"), False, True)


@pytest.mark.parametrize("data", REWRITTEN_RESPONSES)
def test_a_response_not_as_forwarded_is_rewritten(data: bytes) -> None:
    (head,) = parse([data], request=False)
    out = encode_response(head, request_version=b"1.1", request_keep_alive=True)
    assert out == encode_response(rebuilt(head), request_version=b"1.1",
                                  request_keep_alive=True)
    assert head.raw is None or not head.raw.startswith(b"HTTP/1.0")


def test_an_interim_response_and_the_final_one_in_one_read() -> None:
    heads = parse([b"HTTP/1.1 100 Continue\r\n\r\n" + RESPONSE], request=False)
    assert [h.status for h in heads] == [100, 200]
    assert heads[1].raw is None  # it did not start the read
    assert (encode_response(heads[1], request_version=b"1.1", request_keep_alive=True)
            == encode_response(parse([RESPONSE], request=False)[0], request_version=b"1.1",
                               request_keep_alive=True))
