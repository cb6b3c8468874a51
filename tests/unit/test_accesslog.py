"""proxy.accesslog: the line formats, and the writer thread against real files.

Formats are tables of records and the exact line each must give; both formats are read
back (logfmt with the tests' own parser, JSON with `json.loads`) to show that any path
or request id a client may send stays one parseable line. The writer is driven through
its public calls only (`add`, `reopen`, `sync`, `close`) on files in `tmp_path`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from support.procs import parse_logfmt

from proxy.accesslog import FIELDS, PATH_LIMIT, AccessLog, Record, format_line

TS = 1764646800.1235  # 2025-12-02T03:40:00.123Z (milliseconds are cut, not rounded)


def record(**kw: object) -> Record:
    values: dict[str, object] = {
        "ts": TS, "upstream": "web", "ip": b"127.0.0.1", "port": 50123, "method": b"GET",
        "path": b"/a?b=1", "status": 200, "bytes_in": 40, "bytes_out": 120,
        "duration": 0.0012345, "instance": "web-1", "attempts": 1, "reason": "",
        "request_id": b"0123456789abcdef0123456789abcdef",
    }
    values.update(kw)
    return tuple(values.values())  # type: ignore[return-value]


def test_logfmt_line_has_every_field_in_spec_order() -> None:
    line = format_line(record())
    assert line == (
        'ts=2025-12-02T03:40:00.123Z upstream=web client=127.0.0.1:50123 method=GET '
        'path="/a?b=1" status=200 bytes_in=40 bytes_out=120 duration_ms=1.234 '
        'instance=web-1 attempts=1 reason= request_id=0123456789abcdef0123456789abcdef')
    assert list(parse_logfmt(line)) == list(FIELDS)


def test_json_line_has_every_field_with_its_type() -> None:
    fields = json.loads(format_line(record(), "json"))
    assert list(fields) == list(FIELDS)
    assert fields == {
        "ts": "2025-12-02T03:40:00.123Z", "upstream": "web", "client": "127.0.0.1:50123",
        "method": "GET", "path": "/a?b=1", "status": 200, "bytes_in": 40, "bytes_out": 120,
        "duration_ms": 1.234, "instance": "web-1", "attempts": 1, "reason": "",
        "request_id": "0123456789abcdef0123456789abcdef",
    }


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_absent_values_tcp_line(fmt: str) -> None:
    """A TCP connection has no method, path, status or request id; bytes are not counted."""
    tcp = record(method=b"", path=b"", status=None, bytes_in=None, bytes_out=None,
                 request_id=b"", reason="connect-failure", attempts=2)
    line = format_line(tcp, fmt)
    if fmt == "json":
        fields = json.loads(line)
        assert (fields["status"], fields["bytes_in"], fields["bytes_out"]) == (None, None, None)
        assert (fields["method"], fields["path"], fields["request_id"]) == ("", "", "")
    else:
        fields = parse_logfmt(line)
        assert "status= bytes_in= bytes_out=" in line
        assert fields["method"] == fields["path"] == fields["request_id"] == ""
    assert fields["reason"] == "connect-failure" and str(fields["attempts"]) == "2"


def test_ipv6_client_in_brackets() -> None:
    assert parse_logfmt(format_line(record(ip=b"::1")))["client"] == "[::1]:50123"


# Paths and request ids a client may send: quotes, backslashes, spaces (already escaped
# by a parser, but not by a sloppy client), control and non-ASCII bytes.
HOSTILE = [
    b'/a"b', b"/a\\b", b"/a b", b"/a=b", b"/tab\there", b"/nl\nx", b"/\xc3\xa9t\xc3\xa9",
    b"/\xff\xfe", b"/\x7f",
]


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_hostile_values_stay_one_parseable_line(fmt: str, value: bytes) -> None:
    line = format_line(record(path=value, request_id=value), fmt)
    assert "\n" not in line and line.isascii()
    fields = json.loads(line) if fmt == "json" else parse_logfmt(line)
    assert list(fields) == list(FIELDS)
    expected = value.decode("utf-8", "backslashreplace")
    assert fields["path"] == fields["request_id"] == expected


def test_path_cut_to_1_kib() -> None:
    fields = parse_logfmt(format_line(record(path=b"/" + b"x" * 5000)))
    assert len(fields["path"]) == PATH_LIMIT == 1024


# -- the writer -----------------------------------------------------------------------------


def lines(path: Path) -> list[dict[str, str]]:
    return [parse_logfmt(line) for line in path.read_text().splitlines()]


def test_writes_every_line_in_order(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    access = AccessLog(str(path))
    for i in range(500):
        access.add(record(path=f"/{i}".encode()))
    assert access.close()
    assert [fields["path"] for fields in lines(path)] == [f"/{i}" for i in range(500)]
    assert (access.written, access.dropped) == (500, 0)


def test_reopen_after_rename_goes_to_the_new_file(tmp_path: Path) -> None:
    """logrotate: rename the file, then SIGUSR1 (`reopen`); new lines go to a new file."""
    path = tmp_path / "access.log"
    access = AccessLog(str(path))
    access.add(record(path=b"/before"))
    assert access.sync()
    path.rename(tmp_path / "access.log.1")
    access.add(record(path=b"/renamed"))  # still the old file: not reopened yet
    assert access.sync()
    access.reopen()
    access.add(record(path=b"/after"))
    assert access.close()
    assert [f["path"] for f in lines(tmp_path / "access.log.1")] == ["/before", "/renamed"]
    assert [f["path"] for f in lines(path)] == ["/after"]


def test_unwritable_path_drops_lines_and_logs_once(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "no-such-dir" / "access.log"
    caplog.set_level(logging.INFO, "sdproxy.accesslog")
    access = AccessLog(str(missing))
    for _ in range(3):  # three batches, three failed writes, one error line
        access.add(record())
        assert access.sync()
    errors = [r.getMessage() for r in caplog.records if "event=access_log_error" in r.getMessage()]
    assert len(errors) == 1, errors
    assert "op=open" in errors[0] and str(missing) in errors[0]
    assert access.dropped == 3 and access.written == 0
    # The directory appears; a reopen (SIGUSR1) tries at once and lines flow again.
    missing.parent.mkdir()
    access.reopen()
    access.add(record(path=b"/back"))
    assert access.close()
    assert [f["path"] for f in lines(missing)] == ["/back"]
    assert any("event=access_log_reopened" in r.getMessage() for r in caplog.records)


def test_full_disk_drops_lines_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    caplog.set_level(logging.INFO, "sdproxy.accesslog")
    access = AccessLog("/dev/full")
    for _ in range(3):
        access.add(record())
        assert access.sync()
    assert access.close()
    errors = [r.getMessage() for r in caplog.records if "event=access_log_error" in r.getMessage()]
    assert len(errors) == 1 and "op=write" in errors[0], errors
    assert access.dropped == 3 and access.written == 0


def test_full_queue_drops_and_counts_without_waiting(tmp_path: Path) -> None:
    """While the writer is held up (here: it waits for its batch delay), `add` beyond
    max_queued returns at once and counts the line as dropped."""
    path = tmp_path / "access.log"
    access = AccessLog(str(path), max_queued=10, flush_delay=30.0)
    for _ in range(25):
        access.add(record())
    assert access.dropped_full == 15
    assert access.close(timeout=5.0)  # close cuts the batch delay short and writes the 10
    assert len(lines(path)) == 10


def test_json_file_is_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "access.json"
    access = AccessLog(str(path), "json")
    access.add(record(path=b'/q?x="1"'))
    access.add(record(status=None, bytes_in=None, bytes_out=None))
    assert access.close()
    parsed = [json.loads(line) for line in path.read_text().splitlines()]
    assert parsed[0]["path"] == '/q?x="1"' and parsed[1]["status"] is None
