"""Differential fuzzing: httptools (llhttp) and the h11 fallback accept and refuse the same bytes.

SPEC: "The h11 fallback parser rejects exactly what the default parser rejects." Every stream
here goes through both parsers with the recording sink of test_l7_parsers.py. The property:
both accept and produce the same events and the same bytes forwarded (`encode_request` /
`encode_response` of each head), or both refuse with the same status class (`HeadTooLarge`,
431, versus `ParseError`, 400). Each parser also gives one outcome however the stream is cut
into reads.

Streams come from a grammar of plausible and hostile pieces (methods, targets, versions,
field names and values with control characters, obs-fold, bare LF, Content-Length and
Transfer-Encoding in every order and casing, chunk sizes and extensions, pipelined messages)
and from a fixed corpus (`smuggling_corpus.py`: the cases of issue 9 and published
request-smuggling variants).

`make test` runs a bounded number of examples; a longer run:

    SDPROXY_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q -p no:cacheprovider \\
        tests/unit/test_parser_differential_fuzz.py
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from smuggling_corpus import REQUESTS, RESPONSES, CorpusCase
from test_l7_parsers import MAX_HEAD, Outcome, Recorder, Step, _drive, cut

from proxy.l7.headers import encode_request, encode_response
from proxy.l7.message import MessageHead
from proxy.l7.parsers import PARSERS

EXAMPLES = int(os.environ.get("SDPROXY_FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(max_examples=EXAMPLES or 150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- running both parsers -------------------------------------------------------------------

def forwarded(heads: Sequence[MessageHead]) -> tuple[bytes, ...]:
    """The head bytes the proxy would send on for each head."""
    out = []
    for head in heads:
        if head.method:
            out.append(encode_request(head, client_ip=b"127.0.0.1", default_host=b"up"))
        else:
            out.append(encode_response(head, request_version=b"1.1",
                                       request_keep_alive=True)[0])
    return tuple(out)


def run(name: str, steps: Sequence[Step], request: bool,
        max_head: int = MAX_HEAD) -> tuple[Outcome, tuple[bytes, ...]]:
    rec = Recorder()
    parser: Any = PARSERS[name][0 if request else 1](rec, max_head)
    outcome = _drive(parser, rec, steps)
    return outcome, forwarded(rec.heads)


def both(steps: Sequence[Step], request: bool, max_head: int = MAX_HEAD
         ) -> dict[str, tuple[Outcome, tuple[bytes, ...]]]:
    return {name: run(name, steps, request, max_head) for name in PARSERS}


def assert_same(steps: Sequence[Step], request: bool, max_head: int = MAX_HEAD) -> None:
    outs = both(steps, request, max_head)
    assert outs["h11"] == outs["httptools"], steps


def cuts_of(steps: Sequence[Step], points: Sequence[int]) -> list[Step]:
    out: list[Step] = []
    for step in steps:
        out.extend([step] if isinstance(step, tuple) else cut(step, points))
    return out


def assert_split_independent(steps: Sequence[Step], request: bool, points: Sequence[int],
                             max_head: int = MAX_HEAD) -> None:
    for name in PARSERS:
        whole = run(name, steps, request, max_head)
        split = run(name, cuts_of(steps, points), request, max_head)
        assert split == whole, (name, points)


# -- the fixed corpus -----------------------------------------------------------------------

def _param(case: CorpusCase) -> Any:
    return pytest.param(case, id=case.name)


@pytest.mark.parametrize("case", [_param(c) for c in REQUESTS])
def test_corpus_requests_agree(case: CorpusCase) -> None:
    steps = [case.data]
    outs = both(steps, True, case.max_head)
    assert outs["h11"] == outs["httptools"]
    if case.expect is not None:
        assert outs["h11"][0].error is case.expect_error(), outs["h11"][0]
    for points in ([1], [len(case.data) // 2], list(range(1, len(case.data), 7))):
        assert_split_independent(steps, True, points, case.max_head)


@pytest.mark.parametrize("case", [_param(c) for c in RESPONSES])
def test_corpus_responses_agree(case: CorpusCase) -> None:
    steps: list[Step] = [("expect", case.method), case.data]
    outs = both(steps, False, case.max_head)
    assert outs["h11"] == outs["httptools"]
    if case.expect is not None:
        assert outs["h11"][0].error is case.expect_error(), outs["h11"][0]
    for points in ([1], [len(case.data) // 2], list(range(1, len(case.data), 7))):
        assert_split_independent(steps, False, points, case.max_head)


# -- the grammar ----------------------------------------------------------------------------

def cased(word: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from([word, word.lower(), word.upper(), word.title(), word.swapcase()])


METHODS = st.sampled_from([
    b"GET", b"GET", b"POST", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"DELETE", b"PATCH",
    b"CONNECT", b"QUERY", b"M-SEARCH", b"PURGE", b"get", b"GETT", b"PRI", b"DESCRIBE",
    b"SOURCE", b"", b"G\x00T", b"A" * 300,
])
TARGETS = st.sampled_from([
    b"/", b"/a?b=1", b"/a/b.c", b"*", b"http://example/x", b"http://example:80/",
    b"HTTP://EXAMPLE/", b"https://other/x", b"/a#frag", b"//x", b"a", b"http:/x",
    b"http://u@h@x/", b"http://u@@h/", b"/%zz", b"/\x01", b"/\x7f", b"/\xff", b"/a\tb",
    b"example:443", b"/?q=?#x#", b"/" + b"p" * 120, b"",
])
VERSIONS = st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0"] * 2 + [
    b"HTTP/0.9", b"HTTP/2.0", b"HTTP/1.2", b"http/1.1", b"RTSP/1.0", b"ICE/1.0", b"HTTP/1.1 ",
    b"HTTP/11", b"HTTP/1.",
])
GAPS = st.sampled_from([b" "] * 8 + [b"  ", b"\t", b""])
EOLS = st.sampled_from([b"\r\n"] * 12 + [b"\n", b"\r", b"\r\r\n", b"\n\r"])
FRAMING_NAMES = [b"Content-Length", b"Transfer-Encoding"]
CONTENT_LENGTHS = [b"0", b"3", b"5", b" 3", b"3 ", b"3\t", b"+3", b"-1", b"0x3", b"003",
                   b"3, 3", b"3,4", b"", b"99999999999999999999", b"1.5", b"3 3"]
CODINGS = [b"chunked", b"Chunked", b"CHUNKED", b" chunked", b"chunked ", b"chunked\t",
           b"xchunked", b"chunked\x0b", b"gzip, chunked", b"chunked, gzip", b"identity",
           b"chunked,", b",chunked", b"chunked, chunked", b"gzip", b"", b'"chunked"']
CONNECTIONS = [b"close", b"keep-alive", b"Keep-Alive", b"upgrade", b"Upgrade, close",
               b"close\t", b" close ", b"closed", b"keep-alive, upgrade"]
VALUES = st.sampled_from([b"v", b"a b", b"a\tb", b"", b" lead", b"trail ", b"a\x00b", b"a\x01",
                          b"\x7f", b"\xff\xfe", b"a\x0bb", b"a\x0cb", b"a\rb", b"x" * 200,
                          b"a\r\n b", b"a\r\n\tb"])


@st.composite
def fields(draw: st.DrawFn, framing: bool = True) -> bytes:
    """One field line (or a hostile stand-in for one)."""
    kind = draw(st.sampled_from(["host", "cl", "te", "conn", "upgrade", "other", "other",
                                 "raw"] if framing else ["other", "other", "conn", "raw"]))
    if kind == "host":
        name, value = draw(cased(b"Host")), draw(st.sampled_from(
            [b"example", b"example:80", b"other", b"", b"a b"]))
    elif kind == "cl":
        name, value = draw(cased(b"Content-Length")), draw(st.sampled_from(CONTENT_LENGTHS))
    elif kind == "te":
        name, value = draw(cased(b"Transfer-Encoding")), draw(st.sampled_from(CODINGS))
    elif kind == "conn":
        name = draw(st.sampled_from([b"Connection", b"connection", b"Proxy-Connection"]))
        value = draw(st.sampled_from(CONNECTIONS))
    elif kind == "upgrade":
        name, value = draw(cased(b"Upgrade")), draw(st.sampled_from([b"websocket", b"", b","]))
    elif kind == "other":
        name = draw(st.sampled_from([b"X-A", b"Accept", b"X-Forwarded-For", b"TE", b"Trailer",
                                     b"Keep-Alive", b"Expect"]))
        value = draw(VALUES)
    else:
        return draw(st.sampled_from([
            b"Content-Length : 3\r\n", b"Transfer-Encoding\t: chunked\r\n", b" X: folded\r\n",
            b"\tX: folded\r\n", b"X\x01: a\r\n", b": empty\r\n", b"No-Colon\r\n",
            b"X:\r\n", b"X: a\n", b"X(y): a\r\n", b"X\xff: a\r\n", b"X: a\r\r\n",
        ]))
    colon = draw(st.sampled_from([b": "] * 6 + [b":", b":\t", b":  "]))
    return name + colon + value + draw(EOLS)


@st.composite
def chunked_body(draw: st.DrawFn) -> bytes:
    out = []
    for _ in range(draw(st.integers(0, 3))):
        data = draw(st.binary(min_size=1, max_size=12))
        size = draw(st.sampled_from([b"%x", b"%X", b"0%x", b"%x ", b"%x\t", b" %x", b"%x;",
                                     b"%x;a", b"%x;a=b", b'%x;a="q d"', b"%x;a=\"q\\\"\"",
                                     b"%x;;a", b"%x;=b", b"%x; a", b"0x%x", b"%x%x"]))
        size = size.replace(b"%x", b"%x" % len(data), 1).replace(b"%X", b"%X" % len(data))
        size = size.replace(b"%x", b"0")
        out.append(size + draw(EOLS) + data + draw(st.sampled_from(
            [b"\r\n"] * 8 + [b"\n", b"", b"X\r\n"])))
    last = draw(st.sampled_from([b"0", b"00", b"0;x=y", b"fffffffffffffffffff", b"0 "]))
    trailers = b"".join(draw(st.lists(fields(framing=False), max_size=2)))
    trailers += draw(st.sampled_from([b"", b"Content-Length: 3\r\n", b"Transfer-Encoding: x\r\n",
                                      b"Connection: close\r\n"]))
    return b"".join(out) + last + draw(EOLS) + trailers + draw(EOLS)


@st.composite
def request(draw: st.DrawFn) -> bytes:
    line = (draw(METHODS) + draw(GAPS) + draw(TARGETS) + draw(GAPS) + draw(VERSIONS)
            + draw(EOLS))
    head = line + b"".join(draw(st.lists(fields(), max_size=6))) + draw(EOLS)
    body = draw(st.sampled_from(["none", "bytes", "chunked", "chunked"]))
    if body == "bytes":
        return head + draw(st.binary(max_size=8))
    if body == "chunked":
        return head + draw(chunked_body())
    return head


@st.composite
def request_stream(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    stream = draw(st.sampled_from([b"", b"\r\n", b"\n\r\n"])) + b"".join(
        draw(st.lists(request(), min_size=1, max_size=3)))
    points = draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=6))
    return stream, points


STATUSES = st.sampled_from([b"200 OK", b"200 OK", b"204 No Content", b"304 NM", b"100 Continue",
                            b"101 Switching", b"103 Hints", b"150 Odd", b"404 ", b"200",
                            b"099 Low", b"2000 X", b"20 X", b"200 a\x00b", b"200 a\x01b",
                            b"200  two"])


@st.composite
def response(draw: st.DrawFn) -> bytes:
    version = draw(st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2",
                                                         b"http/1.1", b"RTSP/1.0", b"HTTP/1.1 "]))
    head = (version + b" " + draw(STATUSES) + draw(EOLS)
            + b"".join(draw(st.lists(fields(), max_size=5))) + draw(EOLS))
    body = draw(st.sampled_from(["none", "bytes", "chunked"]))
    if body == "bytes":
        return head + draw(st.binary(max_size=8))
    if body == "chunked":
        return head + draw(chunked_body())
    return head


@st.composite
def response_steps(draw: st.DrawFn) -> tuple[list[Step], list[int]]:
    steps: list[Step] = []
    for _ in range(draw(st.integers(1, 2))):
        method = draw(st.sampled_from([b"GET", b"GET", b"HEAD", b"POST", b"CONNECT"]))
        steps.append(("expect", method))
        steps.append(draw(response()))
    longest = max(len(s) for s in steps if isinstance(s, bytes))
    points = draw(st.lists(st.integers(1, max(1, longest - 1)), max_size=5))
    return steps, points


# -- the properties -------------------------------------------------------------------------

@FUZZ
@given(request_stream())
def test_generated_requests_agree(sample: tuple[bytes, list[int]]) -> None:
    stream, points = sample
    assert_same([stream], True)
    assert_same(cut(stream, points), True)
    assert_split_independent([stream], True, points)


@FUZZ
@given(request_stream(), st.integers(1, 400))
def test_truncated_requests_agree(sample: tuple[bytes, list[int]], keep: int) -> None:
    """A stream cut short (the peer waits or hangs up): the same events so far, or the same
    refusal, from both."""
    stream = sample[0][:keep]
    assert_same([stream], True)


@FUZZ
@given(response_steps())
def test_generated_responses_agree(sample: tuple[list[Step], list[int]]) -> None:
    steps, points = sample
    assert_same(steps, False)
    assert_same(cuts_of(steps, points), False)
    assert_split_independent(steps, False, points)


@FUZZ
@given(request_stream(), st.sampled_from([64, 128, 256]))
def test_small_head_limits_agree(sample: tuple[bytes, list[int]], max_head: int) -> None:
    """431 against 400 against accepted, with limits the generated heads cross."""
    stream, _points = sample
    assert_same([stream], True, max_head)


def test_fuzz_budget_is_documented() -> None:
    assert "SDPROXY_FUZZ_EXAMPLES" in (__doc__ or "")
