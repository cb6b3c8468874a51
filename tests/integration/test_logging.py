"""Logging on real processes: the access log (on and off, logfmt and JSON, a file, stdout),
logrotate's rename + SIGUSR1, an unwritable path, SIGUSR2 and SIGQUIT, `--log-level`, the
event log as JSON, X-Request-Id, and a TCP connection's line.

Static discovery keeps these about logging (the catalog side is tested elsewhere); the
demo backend's `GET /headers` shows what reached the instance. The proxy's stdout and
stderr go to one file (support.procs), so `access = "stdout"` lines are read from there.
Access lines are written by a thread in batches (within about 50 ms): a test polls the
file for the lines it expects, bounded in time, never sleeping blindly.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support.http import RawConnection, fetch, paced_requests
from support.procs import REPO_ROOT, Backend, ProxyProcess, parse_logfmt
from support.tomlconf import toml_table

from proxy.devconsul import free_port

HEX32 = re.compile(r"[0-9a-f]{32}")
WAIT = 10.0  # seconds: the bound of every wait for a log line


def static(*backends: Backend, **keys: Any) -> dict[str, Any]:
    return {"discovery": "static", "endpoints": [f"127.0.0.1:{b.port}" for b in backends],
            **keys}


def with_log(log: dict[str, Any], upstreams: dict[str, dict[str, Any]]) -> str:
    """A config fragment: `[log]` and the upstreams (each on a free loopback port)."""
    parts = [toml_table("[log]", log)]
    for name, keys in upstreams.items():
        parts.append(toml_table("[[upstreams]]", {"name": name,
                                                  "listen": f"127.0.0.1:{free_port()}",
                                                  **keys}))
    return "\n".join(parts)


def wait_for(read: Callable[[], list[dict[str, Any]]], count: int,
             what: str = "access lines") -> list[dict[str, Any]]:
    """Poll `read()` until it returns at least `count` items (bounded by WAIT)."""
    deadline = time.monotonic() + WAIT
    while True:
        items = read()
        if len(items) >= count:
            return items
        assert time.monotonic() < deadline, f"{len(items)} of {count} {what}: {items}"
        time.sleep(0.02)


def file_lines(path: Path) -> Callable[[], list[dict[str, str]]]:
    def read() -> list[dict[str, str]]:
        try:
            return [parse_logfmt(line) for line in path.read_text().splitlines()]
        except FileNotFoundError:
            return []

    return read


def stdout_access(proxy: ProxyProcess, fmt: str = "logfmt") -> list[dict[str, Any]]:
    """Access lines on the proxy's stdout/stderr file: those with a request_id field."""
    out = []
    for line in proxy.stderr_text().splitlines():
        if fmt == "json" and line.startswith("{") and '"request_id"' in line:
            out.append(json.loads(line))
        elif fmt == "logfmt" and " request_id=" in line:
            out.append(parse_logfmt(line))
    return out


# -- off, on, both formats, X-Request-Id ------------------------------------------------


async def test_access_log_off_by_default_and_request_id_added_or_kept(
        start_backend: Callable[..., Backend],
        start_proxy: Callable[..., ProxyProcess]) -> None:
    backend = start_backend("a")
    proxy = start_proxy({"web": static(backend)})
    addr = proxy.listen("web")
    added = json.loads((await fetch(addr, "GET", "/headers")).text)["x-request-id"]
    assert HEX32.fullmatch(added), added
    again = json.loads((await fetch(addr, "GET", "/headers")).text)["x-request-id"]
    assert again != added
    kept = json.loads((await fetch(addr, "GET", "/headers",
                                   headers=[("X-Request-Id", "client-7")])).text)
    assert kept["x-request-id"] == "client-7"  # one, the client's: nothing added
    # No access line anywhere: the proxy's stdout and stderr are this one file.
    assert stdout_access(proxy) == []
    assert all("request_id" not in e for e in proxy.events())
    print(f"access off: X-Request-Id added ({added}) and kept (client-7); no access line")


async def test_access_log_file_logfmt(start_backend: Callable[..., Backend],
                                      start_proxy: Callable[..., ProxyProcess],
                                      tmp_path: Path) -> None:
    backend = start_backend("a")
    path = tmp_path / "access.log"
    proxy = start_proxy(with_log({"access": str(path)}, {"web": static(backend)}))
    addr = proxy.listen("web")
    async with await RawConnection.open(addr) as conn:
        client_port = conn.local_port
        first = await conn.request("GET", "/headers?q=a%20b", headers=[("X-Request-Id", "r-1")])
        second = await conn.request("POST", "/upload", body=b"x" * 1000)
    seen = json.loads(first.text)
    lines = wait_for(file_lines(path), 2)
    assert [line["path"] for line in lines] == ["/headers?q=a%20b", "/upload"]
    get, post = lines
    assert get["upstream"] == "web" and get["method"] == "GET" and get["status"] == "200"
    assert get["client"] == f"127.0.0.1:{client_port}"
    assert get["instance"] == f"127.0.0.1:{backend.port}" and get["attempts"] == "1"
    assert get["reason"] == "" and get["request_id"] == "r-1" == seen["x-request-id"]
    assert int(get["bytes_out"]) > len(first.body) and float(get["duration_ms"]) > 0
    assert post["method"] == "POST" and post["status"] == str(second.status) == "200"
    assert int(post["bytes_in"]) > 1000 and HEX32.fullmatch(post["request_id"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", get["ts"])
    print("access file (logfmt):", path.read_text().splitlines()[0])


async def test_access_log_stdout_json_and_own_errors(
        start_backend: Callable[..., Backend], start_proxy: Callable[..., ProxyProcess]) -> None:
    """JSON lines on stdout; sdproxy's own answers and retries carry their reason."""
    backend = start_backend("a")
    dead = free_port()  # nothing listens there: a connect failure
    proxy = start_proxy(with_log(
        {"access": "stdout", "access_format": "json"},
        {"web": {"discovery": "static", "max_connections": 2,
                 "endpoints": [f"127.0.0.1:{dead}", f"127.0.0.1:{backend.port}"]},
         "gone": {"discovery": "static", "endpoints": [f"127.0.0.1:{dead}"]}}))
    web, gone = proxy.listen("web"), proxy.listen("gone")
    for _ in range(2):  # round robin: one of these tries the dead instance first
        assert (await fetch(web, "GET", "/")).status == 200
    assert (await fetch(gone, "GET", "/x")).status == 502
    async with await RawConnection.open(web) as bad:
        await bad.send(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n")
        assert (await bad.read_response()).status == 400
    # max_connections = 2: two held open, the third is refused with a 503.
    held = [await RawConnection.open(web) for _ in range(2)]
    try:
        async with await RawConnection.open(web) as third:
            assert (await third.read_response()).status == 503
    finally:
        for conn in held:
            await conn.close()
    lines = wait_for(lambda: stdout_access(proxy, "json"), 5)
    by_path: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_path.setdefault(line["path"], []).append(line)
    assert [line["status"] for line in by_path["/"]] == [200, 200]
    retried = [line for line in by_path["/"] if line["attempts"] == 2]
    assert retried, by_path["/"]  # round robin sent at least one to the dead one first
    for line in retried:
        assert line["reason"] == "connect-failure"
        assert line["instance"] == f"127.0.0.1:{backend.port}"
    (failed,) = by_path["/x"]
    assert (failed["status"], failed["instance"], failed["reason"]) == (502, "",
                                                                        "connect-failure")
    own = {(line["status"], line["reason"]) for line in by_path[""]}
    assert own == {(400, "bad-request"), (503, "max-connections")}
    assert all(isinstance(line["bytes_out"], int) for line in lines)
    print("access stdout (json):", json.dumps(failed))


async def test_sighup_turns_the_access_log_on_and_off(
        start_backend: Callable[..., Backend], start_proxy: Callable[..., ProxyProcess],
        tmp_path: Path) -> None:
    backend = start_backend("a")
    path = tmp_path / "access.log"
    proxy = start_proxy({"web": static(backend)})
    addr = proxy.listen("web")
    await fetch(addr, "GET", "/off")
    original = proxy.config_path.read_text()
    proxy.config_path.write_text(f"{original}\n{toml_table('[log]', {'access': str(path)})}")
    proxy.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: proxy.events("reloaded"), 1, "reloaded lines")
    async with await RawConnection.open(addr) as conn:  # a connection opened before...
        await conn.request("GET", "/on")
        proxy.config_path.write_text(original)
        proxy.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: proxy.events("reloaded"), 2, "reloaded lines")
        await conn.request("GET", "/off-again")  # ...follows the reload too
    await fetch(addr, "GET", "/off-again")
    assert [line["path"] for line in wait_for(file_lines(path), 1)] == ["/on"]
    assert [e["access"] for e in proxy.events("access_log_configured")] == [str(path), "off"]


# -- SIGUSR1 (logrotate), an unwritable path ----------------------------------------------


async def test_sigusr1_reopens_the_file_after_a_rename(
        start_backend: Callable[..., Backend], start_proxy: Callable[..., ProxyProcess],
        tmp_path: Path) -> None:
    backend = start_backend("a")
    path = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    proxy = start_proxy(with_log({"access": str(path)}, {"web": static(backend)}))
    addr = proxy.listen("web")
    await fetch(addr, "GET", "/before")
    wait_for(file_lines(path), 1)
    path.rename(rotated)  # logrotate's `create` style: rename, then signal
    await fetch(addr, "GET", "/renamed")  # the open file is the renamed one
    wait_for(file_lines(rotated), 2)
    proxy.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: proxy.events("access_log_reopened"), 1, "reopen lines")
    await fetch(addr, "GET", "/after")
    wait_for(file_lines(path), 1)
    assert [line["path"] for line in file_lines(rotated)()] == ["/before", "/renamed"]
    assert [line["path"] for line in file_lines(path)()] == ["/after"]
    assert proxy.proc.poll() is None
    print("SIGUSR1:", proxy.events("reopening_logs")[0], proxy.events("access_log_reopened")[0])


async def test_unwritable_path_costs_lines_never_requests(
        start_backend: Callable[..., Backend], start_proxy: Callable[..., ProxyProcess],
        tmp_path: Path) -> None:
    backend = start_backend("a")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)  # no write permission (root ignores it: then a missing dir)
    target = locked / "access.log" if os.geteuid() != 0 else locked / "missing" / "access.log"
    proxy = start_proxy(with_log({"access": str(target)}, {"web": static(backend)}))
    # Traffic over about 2.5 s: several batches, and more than one reopen attempt.
    samples = await paced_requests(proxy.listen("web"), rate=20, duration=2.5)
    assert [s.status for s in samples] == [200] * len(samples)
    errors = wait_for(lambda: proxy.events("access_log_error"), 1, "error lines")
    assert len(proxy.events("access_log_error")) == 1, errors
    assert errors[0]["path"] == str(target) and errors[0]["level"] == "error"
    assert not target.exists()
    print(f"{len(samples)} requests served, 200 each; one error line: {errors[0]}")


# -- signals a user may send by habit -----------------------------------------------------


async def test_sigusr2_is_ignored_and_sigquit_drains(
        start_backend: Callable[..., Backend],
        start_proxy: Callable[..., ProxyProcess]) -> None:
    backend = start_backend("a")
    proxy = start_proxy({"web": static(backend)})  # access log off: SIGUSR1 is harmless too
    addr = proxy.listen("web")
    # One at a time: a signal sent while the same one is pending is delivered once.
    for sig, event, count in [(signal.SIGUSR2, "signal_ignored", 1),
                              (signal.SIGUSR1, "reopening_logs", 1),
                              (signal.SIGUSR2, "signal_ignored", 2)]:
        proxy.proc.send_signal(sig)
        wait_for(lambda event=event: proxy.events(event), count, f"{event} lines")
    assert proxy.proc.poll() is None
    assert (await fetch(addr, "GET", "/")).status == 200
    in_flight = asyncio.create_task(fetch(addr, "GET", "/slow?seconds=1"))
    await asyncio.sleep(0.3)  # let it reach the backend (it takes 1 s there)
    proxy.proc.send_signal(signal.SIGQUIT)  # Ctrl-\: a drain, as nginx's QUIT
    assert (await asyncio.wait_for(in_flight, 5)).status == 200
    assert await asyncio.to_thread(proxy.proc.wait, 10) == 0
    assert proxy.events("stopping")[0]["signal"] == "SIGQUIT"
    print("SIGUSR2:", proxy.events("signal_ignored")[0])


# -- the event log: level and format ------------------------------------------------------


async def test_log_level_on_the_command_line_wins(
        start_proxy: Callable[..., ProxyProcess]) -> None:
    dead = free_port()
    tcp = {"mode": "tcp", "discovery": "static", "endpoints": [f"127.0.0.1:{dead}"]}
    # [log] says warning, the command line debug: info and debug lines both appear.
    verbose = start_proxy(with_log({"level": "warning"}, {"t": tcp}),
                          extra_args=("--log-level", "debug"))
    # [log] says debug, the command line info: no debug line.
    quiet = start_proxy(with_log({"level": "debug"}, {"t": tcp}),
                        extra_args=("--log-level", "info"))
    for proxy in (verbose, quiet):
        reader, writer = await asyncio.open_connection(*proxy.listen("t"))
        assert await asyncio.wait_for(reader.read(), 5) == b""  # no instance: closed
        writer.close()
    wait_for(lambda: verbose.events("tcp_no_instance"), 1, "debug lines")
    assert verbose.events("tcp_no_instance")[0]["level"] == "debug"
    assert verbose.events("listening")  # info, below [log]'s warning: shown
    quiet_stopped = await asyncio.to_thread(quiet.stop)
    assert quiet_stopped == 0 and quiet.events("tcp_no_instance") == []
    assert all(e.get("level") != "debug" for e in quiet.events())


def run_unwatched(config: Path, admin: tuple[str, int], names: tuple[str, ...]) -> ProxyProcess:
    """`sdproxy run -c config`, returned at once: the fixtures' start-up wait reads logfmt
    lines, so a proxy logging JSON is watched by its test. Cleaned up by the test."""
    fd, err_name = tempfile.mkstemp(prefix="sdproxy-", suffix=".stderr")
    with os.fdopen(fd, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(config)],
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                cwd=REPO_ROOT, start_new_session=True)
    return ProxyProcess(proc=proc, config_path=config, stderr_path=Path(err_name),
                        admin_addr=admin, upstream_names=names)


async def test_event_log_as_json(start_backend: Callable[..., Backend],
                                 tmp_path: Path) -> None:
    """`format = "json"`: every line sdproxy writes on stderr is one JSON object."""
    backend = start_backend("a")
    listen, admin = free_port(), free_port()
    config = tmp_path / "sdproxy.toml"
    config.write_text("\n".join([
        toml_table("[admin]", {"listen": f"127.0.0.1:{admin}"}),
        toml_table("[log]", {"format": "json", "access": "stderr", "access_format": "json"}),
        toml_table("[[upstreams]]", {"name": "web", "listen": f"127.0.0.1:{listen}",
                                     **static(backend)})]))
    proxy = run_unwatched(config, ("127.0.0.1", admin), ("web",))
    proc = proxy.proc
    try:
        def listening() -> list[dict[str, Any]]:
            assert proc.poll() is None, proxy.stderr_tail()
            return [e for e in map(json.loads, proxy.stderr_text().splitlines())
                    if e.get("event") == "listening"]

        wait_for(listening, 1, "listening lines")
        assert (await fetch(("127.0.0.1", listen), "GET", "/")).status == 200
        assert await asyncio.to_thread(proxy.stop) == 0
        events = [json.loads(line) for line in proxy.stderr_text().splitlines()]
        (listened,) = [e for e in events if e.get("event") == "listening"]
        assert listened["upstream"] == "web" and listened["level"] == "info"
        assert listened["listen"] == f"127.0.0.1:{listen}"
        access = [e for e in events if "request_id" in e]
        assert len(access) == 1 and access[0]["status"] == 200
        assert [e["event"] for e in events if "event" in e][-1] == "stopped"
    finally:
        proxy.cleanup()


# -- TCP mode -----------------------------------------------------------------------------


async def test_tcp_connection_gets_a_line_at_close(
        start_backend: Callable[..., Backend], start_proxy: Callable[..., ProxyProcess],
        tmp_path: Path) -> None:
    backend = start_backend("a")
    path = tmp_path / "access.log"
    proxy = start_proxy(with_log({"access": str(path)},
                                 {"t": static(backend, mode="tcp")}))
    async with await RawConnection.open(proxy.listen("t")) as conn:
        port = conn.local_port
        assert (await conn.request("GET", "/")).text == "a"
        assert file_lines(path)() == []  # open: no line yet
    (line,) = wait_for(file_lines(path), 1)
    assert line["upstream"] == "t" and line["client"] == f"127.0.0.1:{port}"
    assert line["instance"] == f"127.0.0.1:{backend.port}" and line["attempts"] == "1"
    assert line["method"] == line["path"] == line["status"] == line["request_id"] == ""
    assert int(line["bytes_in"]) > 0 and int(line["bytes_out"]) > len("a")
    assert float(line["duration_ms"]) > 0
    print("TCP line:", path.read_text().strip())


# -- workers ------------------------------------------------------------------------------


async def test_workers_share_the_file_and_reopen_on_sigusr1(
        start_backend: Callable[..., Backend], start_proxy: Callable[..., ProxyProcess],
        tmp_path: Path) -> None:
    """`--workers 2 --log-level debug`: both workers append to one file (whole lines), the
    level reaches them, and the supervisor's SIGUSR1 makes each reopen it."""
    backend = start_backend("a")
    path = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    proxy = start_proxy(with_log({"access": str(path), "level": "warning"},
                                 {"web": static(backend)}),
                        workers=2, extra_args=("--log-level", "debug"))
    addr = proxy.listen("web")
    for i in range(40):  # fresh connections: the kernel spreads them over both workers
        assert (await fetch(addr, "GET", f"/{i}")).status == 200
    lines = wait_for(file_lines(path), 40)
    assert sorted(line["path"] for line in lines) == sorted(f"/{i}" for i in range(40))
    assert {e.get("worker") for e in proxy.events("listening")} == {"0", "1"}  # info shown
    path.rename(rotated)
    proxy.proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: proxy.events("access_log_reopened"), 2, "reopen lines (one per worker)")
    for i in range(10):
        assert (await fetch(addr, "GET", f"/after/{i}")).status == 200
    after = wait_for(file_lines(path), 10)
    assert sorted(line["path"] for line in after) == sorted(f"/after/{i}" for i in range(10))
    assert len(file_lines(rotated)()) == 40
