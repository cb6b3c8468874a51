"""Fixed byte streams for the parser differential (test_parser_differential_fuzz.py).

The cases of issue 9 (what the h11 fallback once accepted and llhttp refuses) and published
request-smuggling variants: CL.TE, TE.CL, TE.TE obfuscations, Content-Length spellings,
chunk-size tricks, line-end and control-character tricks. Each case states the status class
both parsers must give (None: only that they agree).
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.l7.message import HeadTooLarge, ParseError

OK = 200
BAD = 400
TOO_LARGE = 431


@dataclass(frozen=True)
class CorpusCase:
    name: str
    data: bytes
    expect: int | None = None  # OK, BAD or TOO_LARGE
    method: bytes = b"GET"  # the request a response answers
    max_head: int = 8192

    def expect_error(self) -> type[ParseError] | None:
        return {OK: None, BAD: ParseError, TOO_LARGE: HeadTooLarge}[self.expect or OK]


H = b"Host: example\r\n"
POST = b"POST / HTTP/1.1\r\n" + H
CHUNK_BODY = b"3\r\nabc\r\n0\r\n\r\n"


def te(value: bytes, name: bytes = b"Transfer-Encoding") -> bytes:
    return POST + name + b": " + value + b"\r\n\r\n" + CHUNK_BODY


REQUESTS: list[CorpusCase] = [
    # -- issue 9: accepted by the h11 fallback, refused by llhttp
    CorpusCase("issue9-ctl-in-value", b"GET / HTTP/1.1\r\n" + H + b"X: a\x01b\r\n\r\n", BAD),
    CorpusCase("issue9-del-in-value", b"GET / HTTP/1.1\r\n" + H + b"X: a\x7fb\r\n\r\n", BAD),
    CorpusCase("issue9-esc-in-value", b"GET / HTTP/1.1\r\n" + H + b"X: \x1b[31m\r\n\r\n", BAD),
    CorpusCase("issue9-obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X: a\r\n b\r\n\r\n", BAD),
    CorpusCase("issue9-obs-fold-tab", b"GET / HTTP/1.1\r\n" + H + b"X: a\r\n\tb\r\n\r\n", BAD),
    CorpusCase("issue9-bare-lf", b"GET / HTTP/1.1\nHost: example\n\n", BAD),
    CorpusCase("issue9-bare-lf-one-field", b"GET / HTTP/1.1\r\nHost: example\nX: y\r\n\r\n",
               BAD),
    CorpusCase("issue9-bare-lf-end", b"GET / HTTP/1.1\r\n" + H + b"\n", BAD),
    CorpusCase("issue9-duplicate-content-length",
               POST + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", BAD),
    CorpusCase("issue9-content-length-list", POST + b"Content-Length: 3, 3\r\n\r\nabc", BAD),
    CorpusCase("issue9-70kb-method", b"A" * 70_000 + b" / HTTP/1.1\r\n" + H + b"\r\n", BAD),
    CorpusCase("issue9-long-known-prefix", b"GETTTTT / HTTP/1.1\r\n" + H + b"\r\n", BAD),
    CorpusCase("issue9-lowercase-method", b"get / HTTP/1.1\r\n" + H + b"\r\n", BAD),
    CorpusCase("issue9-unknown-method", b"BREW / HTTP/1.1\r\n" + H + b"\r\n", BAD),
    CorpusCase("issue9-rtsp-method", b"DESCRIBE / HTTP/1.1\r\n" + H + b"\r\n", BAD),
    # -- CL.TE and TE.CL
    CorpusCase("cl-te", POST + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"0\r\n\r\nG", BAD),
    CorpusCase("te-cl", POST + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
               + b"5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n", BAD),
    CorpusCase("cl-te-lowercase", POST + b"content-length: 4\r\ntransfer-encoding: chunked\r\n"
               + b"\r\n" + CHUNK_BODY, BAD),
    CorpusCase("te-in-trailer-cl", POST + b"Transfer-Encoding: chunked\r\n\r\n"
               + b"0\r\nContent-Length: 5\r\n\r\n", BAD),
    # -- TE.TE obfuscations
    CorpusCase("te-xchunked", te(b"xchunked"), BAD),
    CorpusCase("te-leading-space", te(b" chunked"), OK),
    # Refused by both: llhttp reads `chunked<TAB>` as another coding, so no trailing OWS.
    CorpusCase("te-trailing-space", te(b"chunked "), BAD),
    CorpusCase("te-vertical-tab", te(b"chunked\x0b"), BAD),
    CorpusCase("te-form-feed", te(b"\x0cchunked"), BAD),
    CorpusCase("te-trailing-tab", te(b"chunked\t"), BAD),
    CorpusCase("te-tab-before-colon", POST + b"Transfer-Encoding\t: chunked\r\n\r\n"
               + CHUNK_BODY, BAD),
    CorpusCase("te-space-before-colon", POST + b"Transfer-Encoding : chunked\r\n\r\n"
               + CHUNK_BODY, BAD),
    CorpusCase("te-duplicate", POST + b"Transfer-Encoding: chunked\r\n"
               + b"Transfer-Encoding: chunked\r\n\r\n" + CHUNK_BODY, BAD),
    CorpusCase("te-duplicate-identity", POST + b"Transfer-Encoding: chunked\r\n"
               + b"Transfer-Encoding: identity\r\n\r\n" + CHUNK_BODY, BAD),
    CorpusCase("te-chunked-comma", te(b"chunked, identity"), BAD),
    CorpusCase("te-gzip-chunked", te(b"gzip, chunked"), BAD),
    CorpusCase("te-quoted", te(b'"chunked"'), BAD),
    CorpusCase("te-uppercase", te(b"CHUNKED"), OK),
    CorpusCase("te-name-uppercase", te(b"chunked", b"TRANSFER-ENCODING"), OK),
    CorpusCase("te-obs-fold", POST + b"Transfer-Encoding:\r\n chunked\r\n\r\n" + CHUNK_BODY,
               BAD),
    CorpusCase("te-nul", te(b"chunked\x00"), BAD),
    CorpusCase("te-http10", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
               + CHUNK_BODY, OK),
    # -- Content-Length spellings
    CorpusCase("cl-plus", POST + b"Content-Length: +5\r\n\r\nabcde", BAD),
    CorpusCase("cl-hex", POST + b"Content-Length: 0x5\r\n\r\nabcde", BAD),
    CorpusCase("cl-leading-zeros", POST + b"Content-Length: 005\r\n\r\nabcde", OK),
    CorpusCase("cl-negative", POST + b"Content-Length: -5\r\n\r\n", BAD),
    CorpusCase("cl-empty", POST + b"Content-Length:\r\n\r\n", BAD),
    CorpusCase("cl-spaces-inside", POST + b"Content-Length: 5 5\r\n\r\nabcde", BAD),
    CorpusCase("cl-trailing-tab", POST + b"Content-Length: 5\t\r\n\r\nabcde", OK),
    CorpusCase("cl-overflow", POST + b"Content-Length: 18446744073709551616\r\n\r\n", BAD),
    CorpusCase("cl-19-digits", POST + b"Content-Length: 1000000000000000000\r\n\r\n", BAD),
    CorpusCase("cl-differing", POST + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
               BAD),
    CorpusCase("cl-space-before-colon", POST + b"Content-Length : 3\r\n\r\nabc", BAD),
    CorpusCase("cl-nul", POST + b"Content-Length: 3\x00\r\n\r\nabc", BAD),
    # -- chunk sizes and extensions
    CorpusCase("chunk-huge-size", te(b"chunked")[:-len(CHUNK_BODY)] + b"1" * 17 + b"\r\n", BAD),
    CorpusCase("chunk-max-size", te(b"chunked")[:-len(CHUNK_BODY)] + b"f" * 16 + b"\r\nab"),
    CorpusCase("chunk-size-overflow-20", te(b"chunked")[:-len(CHUNK_BODY)]
               + b"fffffffffffffffffff\r\n", BAD),
    CorpusCase("chunk-leading-zeros", te(b"chunked")[:-len(CHUNK_BODY)]
               + b"0000000003\r\nabc\r\n0\r\n\r\n", OK),
    CorpusCase("chunk-0x", te(b"chunked")[:-len(CHUNK_BODY)] + b"0x3\r\nabc\r\n0\r\n\r\n", BAD),
    CorpusCase("chunk-space-after-size", te(b"chunked")[:-len(CHUNK_BODY)]
               + b"3 \r\nabc\r\n0\r\n\r\n", BAD),
    CorpusCase("chunk-extension", te(b"chunked")[:-len(CHUNK_BODY)]
               + b'3;a=b;c="d e";f\r\nabc\r\n0;g\r\n\r\n', OK),
    CorpusCase("chunk-extension-empty", te(b"chunked")[:-len(CHUNK_BODY)]
               + b"3;\r\nabc\r\n0\r\n\r\n", BAD),
    CorpusCase("chunk-extension-space", te(b"chunked")[:-len(CHUNK_BODY)]
               + b"3; a=b\r\nabc\r\n0\r\n\r\n", BAD),
    CorpusCase("chunk-extension-ctl", te(b"chunked")[:-len(CHUNK_BODY)]
               + b"3;a=\x01\r\nabc\r\n0\r\n\r\n", BAD),
    CorpusCase("chunk-extension-lf", te(b"chunked")[:-len(CHUNK_BODY)]
               + b"3;a\nabc\r\n0\r\n\r\n", BAD),
    CorpusCase("chunk-size-lf", te(b"chunked")[:-len(CHUNK_BODY)] + b"3\nabc\r\n0\r\n\r\n", BAD),
    CorpusCase("chunk-data-lf", te(b"chunked")[:-len(CHUNK_BODY)] + b"3\r\nabc\n0\r\n\r\n", BAD),
    CorpusCase("chunk-data-longer", te(b"chunked")[:-len(CHUNK_BODY)]
               + b"3\r\nabcd\r\n0\r\n\r\n", BAD),
    CorpusCase("chunk-trailer-lf", te(b"chunked")[:-len(CHUNK_BODY)] + b"0\r\n\n", BAD),
    CorpusCase("chunk-trailer-ctl", te(b"chunked")[:-len(CHUNK_BODY)]
               + b"0\r\nX: a\x01\r\n\r\n", BAD),
    CorpusCase("chunk-trailer-fold", te(b"chunked")[:-len(CHUNK_BODY)]
               + b"0\r\nX: a\r\n b\r\n\r\n", BAD),
    # -- line ends, NUL, whitespace
    CorpusCase("nul-in-target", b"GET /\x00 HTTP/1.1\r\n" + H + b"\r\n", BAD),
    CorpusCase("nul-in-name", b"GET / HTTP/1.1\r\n" + H + b"X\x00: a\r\n\r\n", BAD),
    CorpusCase("cr-in-value", b"GET / HTTP/1.1\r\n" + H + b"X: a\rb\r\n\r\n", BAD),
    CorpusCase("lf-cr-line-end", b"GET / HTTP/1.1\n\rHost: example\r\n\r\n", BAD),
    CorpusCase("space-first-field", b"GET / HTTP/1.1\r\n Host: example\r\n\r\n", BAD),
    CorpusCase("leading-empty-lines", b"\r\n\r\n\nGET / HTTP/1.1\r\n" + H + b"\r\n", OK),
    CorpusCase("two-spaces-in-request-line", b"GET  /  HTTP/1.1\r\n" + H + b"\r\n", OK),
    CorpusCase("tab-in-request-line", b"GET\t/ HTTP/1.1\r\n" + H + b"\r\n", BAD),
    CorpusCase("http09", b"GET /\r\n\r\n", BAD),
    CorpusCase("http09-with-fields", b"GET /\r\n" + H + b"\r\n", BAD),
    CorpusCase("version-glued-to-target", b"GET /HTTP/1.1\r\n" + H + b"\r\n", BAD),
    CorpusCase("http2-version", b"GET / HTTP/2.0\r\n" + H + b"\r\n", BAD),
    CorpusCase("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", BAD),
    CorpusCase("rtsp-version", b"OPTIONS * RTSP/1.0\r\n\r\n", OK),
    CorpusCase("data-after-close", b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n"
               + b"GET / HTTP/1.1\r\n" + H + b"\r\n", BAD),
    CorpusCase("crlf-after-close", b"GET / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n"
               + b"\r\n\r\n", OK),
    CorpusCase("close-with-tab-pipelined", b"GET / HTTP/1.1\r\n" + H
               + b"Connection: close\t\r\n\r\nGET / HTTP/1.1\r\n" + H + b"\r\n", BAD),
    CorpusCase("upgrade-without-connection", b"GET / HTTP/1.1\r\n" + H + b"Upgrade: ws\r\n\r\n"
               + b"GET /2 HTTP/1.1\r\n" + H + b"\r\n", OK),
    CorpusCase("upgrade-request", b"GET / HTTP/1.1\r\n" + H
               + b"Connection: upgrade\r\nUpgrade: ws\r\n\r\n\x81\x00", OK),
    CorpusCase("upgrade-with-body", b"GET / HTTP/1.1\r\n" + H
               + b"Connection: upgrade\r\nUpgrade: ws\r\nContent-Length: 2\r\n\r\nhi"
               + b"GET /2 HTTP/1.1\r\n" + H + b"\r\n", OK),
    CorpusCase("connect", b"CONNECT example:443 HTTP/1.1\r\nHost: example:443\r\n\r\n", BAD),
    # found by the fuzz: llhttp stops at a CONNECT head whatever its framing
    CorpusCase("connect-with-length", b"CONNECT / HTTP/1.1\r\n" + H
               + b"Content-Length: 3\r\n\r\n"),
    # -- shared rules (parsers.py)
    CorpusCase("fragment-in-target", b"GET /a#b HTTP/1.1\r\n" + H + b"\r\n", BAD),
    CorpusCase("absolute-form-other-host", b"GET http://other/ HTTP/1.1\r\n" + H + b"\r\n",
               BAD),
    CorpusCase("absolute-form-same-host", b"GET http://example/ HTTP/1.1\r\n" + H + b"\r\n",
               OK),
    # Both parsers deliver every field; max_header_count is the listener's (test_hostile).
    CorpusCase("header-count-101", b"GET / HTTP/1.1\r\n" + H
               + b"".join(b"X-%d: v\r\n" % i for i in range(100)) + b"\r\n", OK),
    CorpusCase("header-count-100", b"GET / HTTP/1.1\r\n" + H
               + b"".join(b"X-%d: v\r\n" % i for i in range(99)) + b"\r\n", OK),
    # -- head size
    CorpusCase("head-too-large", b"GET / HTTP/1.1\r\n" + H + b"X: " + b"x" * 300 + b"\r\n\r\n",
               TOO_LARGE, max_head=200),
    CorpusCase("target-too-large", b"GET /" + b"t" * 300 + b" HTTP/1.1\r\n" + H + b"\r\n",
               TOO_LARGE, max_head=200),
    CorpusCase("head-never-ends", b"GET / HTTP/1.1\r\n" + H + b"X: " + b"x" * 300, TOO_LARGE,
               max_head=200),
    CorpusCase("many-fields-too-large", b"GET / HTTP/1.1\r\n" + H
               + b"".join(b"X-H%d: v\r\n" % i for i in range(40)) + b"\r\n", TOO_LARGE,
               max_head=200),
    CorpusCase("trailers-too-large", te(b"chunked")[:-len(CHUNK_BODY)] + b"0\r\nX: "
               + b"x" * 300 + b"\r\n\r\n", TOO_LARGE, max_head=200),
]

RESPONSES: list[CorpusCase] = [
    CorpusCase("resp-ctl-in-value", b"HTTP/1.1 200 OK\r\nX: a\x01\r\nContent-Length: 0\r\n\r\n",
               BAD),
    CorpusCase("resp-obs-fold", b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",
               BAD),
    CorpusCase("resp-bare-lf", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", BAD),
    CorpusCase("resp-status-cr-cr", b"HTTP/1.1 200 OK\r\rContent-Length: 0\r\n\r\n", BAD),
    CorpusCase("resp-cl-te", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + CHUNK_BODY, BAD),
    CorpusCase("resp-duplicate-cl", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
               b"Content-Length: 3\r\n\r\nabc", BAD),
    CorpusCase("resp-te-gzip", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxyz", BAD),
    CorpusCase("resp-te-gzip-chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked"
               b"\r\n\r\n" + CHUNK_BODY, BAD),
    CorpusCase("resp-te-chunked-tab", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\t\r\n\r\n"
               + CHUNK_BODY, BAD),
    CorpusCase("resp-chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               + CHUNK_BODY, OK),
    CorpusCase("resp-head-with-length", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", OK,
               method=b"HEAD"),
    CorpusCase("resp-head-then-bytes", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", BAD,
               method=b"HEAD"),
    CorpusCase("resp-101-without-upgrade", b"HTTP/1.1 101 Switching\r\n\r\nxx", BAD),
    CorpusCase("resp-101", b"HTTP/1.1 101 Switching\r\nUpgrade: ws\r\nConnection: upgrade"
               b"\r\n\r\nxx", OK),
    CorpusCase("resp-1xx-with-body", b"HTTP/1.1 150 Odd\r\nContent-Length: 3\r\n\r\nabc", BAD),
    CorpusCase("resp-status-099", b"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n", BAD),
    CorpusCase("resp-version-2", b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", BAD),
    CorpusCase("resp-nul-in-reason", b"HTTP/1.1 200 a\x00b\r\nContent-Length: 0\r\n\r\n", BAD),
    CorpusCase("resp-data-after-close", b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
               b"Content-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", BAD),
    CorpusCase("resp-head-too-large", b"HTTP/1.1 200 OK\r\nX: " + b"y" * 300
               + b"\r\nContent-Length: 0\r\n\r\n", TOO_LARGE, max_head=200),
    CorpusCase("resp-head-never-ends", b"HTTP/1.1 200 " + b"r" * 300, TOO_LARGE, max_head=200),
]
