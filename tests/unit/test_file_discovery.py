"""File discovery: `file_decode.decode` as parametrized tables (no I/O), then the watcher
stepped by hand with `poll_once` on a tmp file, with the stat and the wall clock injected
so that "the signature did not move" and "the read was racy" are decided by the test,
not by timestamp granularity. No sleeping, no timing: the integration tests time it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from proxy.config import UpstreamConfig
from proxy.discovery.file import (
    RACY_WINDOW_NS,
    FileWatcher,
    Signature,
    logfmt_value,
    stat_signature,
)
from proxy.discovery.file_decode import MAX_FILE_BYTES, DecodeError, decode, parse_hostport
from proxy.model import Address, CatalogAnswer, Endpoint


def doc(obj: Any) -> bytes:
    return json.dumps(obj).encode()


# -- decode: valid files -------------------------------------------------------------------
@pytest.mark.parametrize("data, expected", [
    pytest.param(doc({"web": ["10.0.0.1:8080", "10.0.0.2:80"]}),
                 [("10.0.0.1:8080", "10.0.0.1", 8080), ("10.0.0.2:80", "10.0.0.2", 80)],
                 id="valid"),
    pytest.param(doc({"web": ["[fd00::1]:80", "[::1]:9000"]}),
                 [("[::1]:9000", "::1", 9000), ("[fd00::1]:80", "fd00::1", 80)],
                 id="ipv6"),
    pytest.param(doc({"web": ["backend.internal:80"]}),
                 [("backend.internal:80", "backend.internal", 80)], id="hostname"),
    pytest.param(doc({"other": ["10.0.0.1:80"]}), [], id="missing-key"),
    pytest.param(doc({}), [], id="empty-object"),
    pytest.param(doc({"web": []}), [], id="empty-list"),
    pytest.param(doc({"web": ["10.0.0.2:80", "10.0.0.1:80"]}),
                 [("10.0.0.1:80", "10.0.0.1", 80), ("10.0.0.2:80", "10.0.0.2", 80)],
                 id="sorted-by-id"),
    pytest.param(doc({"web": ["10.0.0.1:80", "10.0.0.1:80"]}),
                 [("10.0.0.1:80", "10.0.0.1", 80)], id="duplicates-collapse"),
    pytest.param(doc({"web": ["10.0.0.1:80"], "db": ["10.0.0.9:5432"]}),
                 [("10.0.0.1:80", "10.0.0.1", 80)], id="only-own-service"),
    pytest.param(b'\n  {"web": ["10.0.0.1:1", "10.0.0.1:65535"]}\n',
                 [("10.0.0.1:1", "10.0.0.1", 1), ("10.0.0.1:65535", "10.0.0.1", 65535)],
                 id="whitespace-and-port-range"),
    pytest.param(b'\xef\xbb\xbf{"web": ["10.0.0.1:80"]}', [("10.0.0.1:80", "10.0.0.1", 80)],
                 id="utf8-bom"),
])
def test_decode_valid(data: bytes, expected: list[tuple[str, str, int]]) -> None:
    endpoints = decode(data, "web")
    assert [(e.id, e.address, e.port) for e in endpoints] == expected
    assert all(e == Endpoint(id=e.id, address=e.address, port=e.port) for e in endpoints)


def test_decode_order_of_the_file_is_not_a_change() -> None:
    a = decode(doc({"web": ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]}), "web")
    b = decode(doc({"web": ["10.0.0.3:80", "10.0.0.1:80", "10.0.0.2:80"]}), "web")
    assert a == b


# -- decode: invalid files (the whole file is rejected) -------------------------------------
GOOD = '{"web": ["10.0.0.1:80", "10.0.0.2:80"]}'


@pytest.mark.parametrize("data, message", [
    pytest.param(b"[]", "expected a JSON object of service name -> array, got array",
                 id="not-an-object-array"),
    pytest.param(b'"web"', "got string", id="not-an-object-string"),
    pytest.param(b"null", "got null", id="not-an-object-null"),
    pytest.param(doc({"web": "10.0.0.1:80"}), '"web": expected an array of "host:port", '
                 "got string", id="value-not-a-list"),
    pytest.param(doc({"web": None}), "got null", id="value-null"),
    pytest.param(doc({"web": ["10.0.0.1:80", 8080]}),
                 '"web"[1]: expected a "host:port" string, got number', id="non-string-entry"),
    pytest.param(doc({"web": [{"ip": "10.0.0.1"}]}), '"web"[0]: expected a "host:port" '
                 "string, got object", id="object-entry"),
    pytest.param(doc({"web": ["10.0.0.1:http"]}), 'port must be 1..65535, got "http"',
                 id="bad-port-name"),
    pytest.param(doc({"web": ["10.0.0.1:0"]}), 'got "0"', id="bad-port-zero"),
    pytest.param(doc({"web": ["10.0.0.1:65536"]}), 'got "65536"', id="bad-port-too-big"),
    pytest.param(doc({"web": ["10.0.0.1:"]}), 'got ""', id="bad-port-empty"),
    pytest.param(doc({"web": ["10.0.0.1:-1"]}), 'got "-1"', id="bad-port-negative"),
    pytest.param(doc({"web": ["10.0.0.1"]}), 'expected "host:port", got "10.0.0.1"',
                 id="no-port"),
    pytest.param(doc({"web": [":80"]}), "invalid host", id="no-host"),
    pytest.param(doc({"web": ["10.0.0.1 :80"]}), "invalid host", id="space-in-host"),
    pytest.param(doc({"web": ["fd00::1:80"]}), 'IPv6 addresses need brackets: "[fd00::1]:80"',
                 id="ipv6-without-brackets"),
    pytest.param(doc({"web": ["[fd00::zz]:80"]}), '"fd00::zz" is not an IPv6 address',
                 id="ipv6-invalid"),
    pytest.param(doc({"web": ["[fd00::1]"]}), 'expected "[IPv6]:port"', id="ipv6-no-port"),
    pytest.param(doc({"web": ["10.0.0.1:80"], "db": ["10.0.0.9"]}), '"db"[0]',
                 id="broken-neighbour-service"),
    pytest.param((GOOD + '{"web": []}').encode(), "invalid JSON: Extra data",
                 id="trailing-garbage"),
    pytest.param(GOOD[:-8].encode(), "invalid JSON:", id="half-written"),
    pytest.param(GOOD[:1].encode(), "invalid JSON:", id="half-written-first-byte"),
    pytest.param(b"", "empty file", id="empty"),
    pytest.param(b" \n", "empty file", id="whitespace-only"),
    pytest.param(b'{"web": ["10.0.0.1:80\xff"]}', "invalid JSON", id="not-utf8"),
    pytest.param(b" " * (MAX_FILE_BYTES + 1), "larger than", id="too-large"),
])
def test_decode_invalid(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(data, "web")
    assert message in str(info.value)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:80", Address("127.0.0.1", 80)),
    ("[::1]:80", Address("::1", 80)),
    ("[fe80::1%eth0]:80", Address("fe80::1%eth0", 80)),
    ("localhost:65535", Address("localhost", 65535)),
])
def test_parse_hostport(text: str, expected: Address) -> None:
    assert parse_hostport(text) == expected
    assert str(parse_hostport(text)) == text  # the id round-trips to what was written


def test_parse_hostport_rejects_non_ascii_digits() -> None:
    with pytest.raises(ValueError, match="port must be"):
        parse_hostport("10.0.0.1:\u0661\u0662")  # Arabic-Indic "12": isdigit() says yes


# -- the watcher, stepped with poll_once ---------------------------------------------------
class ListSink:
    def __init__(self) -> None:
        self.answers: list[CatalogAnswer] = []
        self.errors: list[str] = []

    def on_catalog_answer(self, answer: CatalogAnswer) -> None:
        self.answers.append(answer)

    def on_catalog_error(self, error: str) -> None:
        self.errors.append(error)


def ids(answer: CatalogAnswer) -> list[str]:
    return [e.id for e in answer.endpoints]


def services(path: Path, *entries: str, name: str = "web") -> None:
    path.write_text(json.dumps({name: list(entries)}))


def settled_wall(path: Path) -> int:
    """A wall clock far enough past the file's change for its signature to be trusted."""
    st = path.stat()
    return max(st.st_mtime_ns, st.st_ctime_ns) + RACY_WINDOW_NS + 1


def watcher(path: Path, sink: ListSink, **kw: Any) -> FileWatcher:
    upstream = UpstreamConfig(name="web", listen=Address("127.0.0.1", 0), discovery="file",
                              file=str(path))
    kw.setdefault("wall_ns", lambda: settled_wall(path) if path.exists() else 0)
    return FileWatcher(upstream, sink, clock=lambda: 42.0, **kw)


async def test_first_good_read_emits_then_unchanged_file_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "services.json"
    services(path, "10.0.0.1:80")
    sink = ListSink()
    w = watcher(path, sink)
    await w.poll_once()
    assert [ids(a) for a in sink.answers] == [["10.0.0.1:80"]]
    assert sink.answers[0].index is None and w.last_success == 42.0
    await w.poll_once()
    await w.poll_once()
    assert w.reads == 1 and len(sink.answers) == 1 and sink.errors == []


async def test_changed_content_emits_and_same_content_rewritten_does_not(
        tmp_path: Path) -> None:
    path = tmp_path / "services.json"
    services(path, "10.0.0.1:80")
    sink = ListSink()
    w = watcher(path, sink)
    await w.poll_once()
    services(path, "10.0.0.2:80", "10.0.0.1:80")
    await w.poll_once()
    services(path, "10.0.0.1:80", "10.0.0.2:80")  # same set, other order
    os.utime(path, ns=(0, 10**9))  # signature moves for sure (mtime), content equal
    await w.poll_once()
    assert w.reads == 3
    assert [ids(a) for a in sink.answers] == [["10.0.0.1:80"], ["10.0.0.1:80", "10.0.0.2:80"]]


async def test_racy_read_is_done_again_at_the_next_poll(tmp_path: Path) -> None:
    path = tmp_path / "services.json"
    services(path, "10.0.0.1:80")
    sink = ListSink()
    now = [0]
    w = watcher(path, sink, wall_ns=lambda: now[0])
    now[0] = path.stat().st_ctime_ns  # read in the same tick as the write: not trusted
    await w.poll_once()
    await w.poll_once()
    assert w.reads == 2
    now[0] = settled_wall(path)
    await w.poll_once()  # the second read was still racy, this one is read and trusted
    await w.poll_once()
    assert w.reads == 3
    assert len(sink.answers) == 1  # reads are cheap, emission is only on change


async def test_missing_file_reports_once_and_emits_nothing_until_it_appears(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "services.json"
    sink = ListSink()
    w = watcher(path, sink)
    with caplog.at_level(logging.WARNING, logger="sdproxy.discovery.file"):
        for _ in range(3):
            await w.poll_once()
    assert sink.answers == [] and w.endpoints is None
    assert sink.errors == [f"file {path}: missing"]
    assert [r.getMessage() for r in caplog.records] == [
        f'event=catalog_error upstream=web file={path} error="missing"']
    services(path, "10.0.0.1:80")
    await w.poll_once()
    assert [ids(a) for a in sink.answers] == [["10.0.0.1:80"]]


async def test_half_written_keeps_last_pool_and_reports_each_distinct_problem_once(
        tmp_path: Path) -> None:
    path = tmp_path / "services.json"
    services(path, "10.0.0.1:80", "10.0.0.2:80")
    sink = ListSink()
    w = watcher(path, sink)
    await w.poll_once()
    good = w.endpoints
    path.write_text('{"web": ["10.0.0.1:80", "10.0')  # the writer is halfway
    await w.poll_once()
    await w.poll_once()
    path.write_text("")  # truncated: another problem
    await w.poll_once()
    assert len(sink.answers) == 1 and w.endpoints == good
    assert len(sink.errors) == 2 and w.errors == 2
    assert sink.errors[0].startswith(f"file {path}: invalid JSON: ")
    assert sink.errors[1] == f"file {path}: empty file"
    services(path, "10.0.0.3:80")
    await w.poll_once()
    assert [ids(a) for a in sink.answers][-1] == ["10.0.0.3:80"]


async def test_first_good_read_after_an_error_emits_even_if_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "services.json"
    services(path, "10.0.0.1:80")
    sink = ListSink()
    w = watcher(path, sink)
    await w.poll_once()
    path.unlink()
    await w.poll_once()
    services(path, "10.0.0.1:80")
    await w.poll_once()
    assert [ids(a) for a in sink.answers] == [["10.0.0.1:80"], ["10.0.0.1:80"]]
    path.unlink()  # the same problem again, after a recovery: reported again
    await w.poll_once()
    assert sink.errors == [f"file {path}: missing"] * 2


async def test_force_reads_even_when_the_signature_did_not_move(tmp_path: Path) -> None:
    path = tmp_path / "services.json"
    services(path, "10.0.0.1:80")
    frozen = Signature(1, 2, 3, 4, 5)  # what a stat that cannot see the change says
    sink = ListSink()
    w = watcher(path, sink, stat=lambda _p: frozen, wall_ns=lambda: 10**12)
    await w.poll_once()
    services(path, "10.0.0.2:80")
    await w.poll_once()
    assert w.reads == 1 and len(sink.answers) == 1  # invisible to polling
    await w.poll_once(force=True)
    assert [ids(a) for a in sink.answers][-1] == ["10.0.0.2:80"]


async def test_a_sink_that_raises_gets_the_answer_again_at_the_next_poll(
        tmp_path: Path) -> None:
    path = tmp_path / "services.json"
    services(path, "10.0.0.1:80")

    class Flaky(ListSink):
        failures = 1

        def on_catalog_answer(self, answer: CatalogAnswer) -> None:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("sink bug")
            super().on_catalog_answer(answer)

    sink = Flaky()
    w = watcher(path, sink)
    with pytest.raises(RuntimeError):
        await w.poll_once()
    assert w.endpoints is None
    await w.poll_once()
    assert [ids(a) for a in sink.answers] == [["10.0.0.1:80"]]


async def test_unreadable_path_is_an_error_not_a_crash(tmp_path: Path) -> None:
    sink = ListSink()
    w = watcher(tmp_path, sink, wall_ns=lambda: 10**30)  # a directory
    await w.poll_once()
    assert sink.errors == [f"file {tmp_path}: cannot read: Is a directory"]


def test_stat_signature_follows_symlinks(tmp_path: Path) -> None:
    # Kubernetes swaps a ConfigMap by re-pointing a symlink: the watched name's target
    # changes inode, which only a stat that follows links sees.
    a, b, link = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "services.json"
    a.write_text("{}")
    b.write_text("{}")
    link.symlink_to(a)
    before = stat_signature(str(link))
    link.unlink()
    link.symlink_to(b)
    assert stat_signature(str(link)).ino != before.ino == a.stat().st_ino


@pytest.mark.parametrize("text, expected", [
    ("/etc/services.json", "/etc/services.json"),
    ("/data/my services.json", '"/data/my services.json"'),
    ("", '""'),
])
def test_logfmt_value(text: str, expected: str) -> None:
    assert logfmt_value(text) == expected
