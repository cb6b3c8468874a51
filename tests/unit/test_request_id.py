"""X-Request-Id (proxy.l7.headers): kept when the client sent one, else a new random one.

`encode_request` adds the header only when the caller passes an id (it found none in the
request); the ids are 32 lowercase hex digits, distinct, and a forked worker does not
repeat its parent's.
"""

from __future__ import annotations

import os
import re

import pytest
from support.fakes import parse_request

from proxy.l7.headers import encode_request, next_request_id, request_id_of
from proxy.l7.message import HOST, MessageHead
from proxy.l7.parsers import PARSERS

HEX32 = re.compile(rb"[0-9a-f]{32}")


def parse(raw: bytes, parser: str) -> MessageHead:
    return parse_request(raw, parser)


@pytest.mark.parametrize("parser", sorted(PARSERS))
@pytest.mark.parametrize("name", [b"X-Request-Id", b"x-request-id", b"X-REQUEST-ID"])
def test_the_clients_id_is_found_in_any_case(parser: str, name: bytes) -> None:
    head = parse(b"GET / HTTP/1.1\r\nHost: a\r\n" + name + b": abc-1\r\n"
                 + name + b": second\r\n\r\n", parser)
    assert request_id_of(head) == b"abc-1"


def test_no_id() -> None:
    head = MessageHead(method=b"GET", target=b"/", headers=[(b"Host", b"a"),
                                                            (b"X-Request-Idx", b"1")])
    assert request_id_of(head) is None


@pytest.mark.parametrize("notes", [True, False], ids=["parser-notes", "full-pass"])
def test_encode_request_adds_the_given_id_once(notes: bool) -> None:
    head = MessageHead(method=b"GET", target=b"/", headers=[(b"Host", b"a")],
                       kinds=HOST if notes else None)
    raw = encode_request(head, client_ip=b"192.0.2.1", default_host=b"up", request_id=b"f" * 32)
    assert raw.count(b"\r\nX-Request-Id: " + b"f" * 32 + b"\r\n") == 1
    without = encode_request(head, client_ip=b"192.0.2.1", default_host=b"up")
    assert b"X-Request-Id" not in without


def test_ids_are_128_random_bits_in_hex() -> None:
    ids = [next_request_id() for _ in range(2000)]  # past one block of random bytes
    assert all(HEX32.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)
    # Every hex digit turns up in every position: not a counter, not a fixed prefix.
    for position in (0, 15, 31):
        assert len({i[position] for i in ids}) == 16


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    next_request_id()  # the parent's block is in use
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover -- the child
        os.close(read)
        os.write(write, b"".join(next_request_id() for _ in range(10)))
        os._exit(0)
    os.close(write)
    child = b""
    while chunk := os.read(read, 4096):
        child += chunk
    os.close(read)
    os.waitpid(pid, 0)
    parent = [next_request_id() for _ in range(10)]
    assert len(child) == 320
    assert not {child[i:i + 32] for i in range(0, 320, 32)} & set(parent)
