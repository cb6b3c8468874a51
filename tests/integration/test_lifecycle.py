"""Life cycle on real processes: SIGTERM drain, SIGHUP reload, instance drain, workers,
and a second `sdproxy run` refused on an address the first holds.

Static discovery keeps these tests about the proxy's own life cycle (the catalog side is
tested elsewhere); one test drains an instance that leaves a real Consul catalog.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.consul import Registration, unique_service
from support.http import ProtocolError, RawConnection, fetch
from support.procs import REPO_ROOT, Backend, ProxyProcess
from support.tomlconf import build_config

from proxy.devconsul import ConsulAgent

# Bound of a run expected to exit at once (its start-up is a second or two on a busy box).
RUN_TO_EXIT_TIMEOUT = 10.0


def static(*backends: Backend, **keys: Any) -> dict[str, Any]:
    return {"discovery": "static", "endpoints": [f"127.0.0.1:{b.port}" for b in backends],
            **keys}


def wait_exit(proxy: ProxyProcess, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (code := proxy.proc.poll()) is None:
        assert time.monotonic() < deadline, f"proxy still running after {timeout}s"
        time.sleep(0.02)
    return code


def refuses(addr: tuple[str, int]) -> bool:
    import socket

    try:
        socket.create_connection(addr, timeout=0.5).close()
    except OSError:
        return True
    return False


async def test_sigterm_closes_listeners_at_once_and_lets_in_flight_finish(
        start_backend: Callable[..., Backend], start_proxy: Callable[..., ProxyProcess]) -> None:
    backend = start_backend("slow")
    proxy = start_proxy({"web": static(backend)}, defaults={"drain_timeout": "5s"})
    addr = proxy.listen("web")
    in_flight = asyncio.create_task(fetch(addr, "GET", "/slow?seconds=1.5"))
    await asyncio.sleep(0.3)  # let the request reach the backend (it takes 1.5 s there)
    t0 = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    closed_after = None
    while time.monotonic() - t0 < 1.0:
        if await asyncio.to_thread(refuses, addr):
            closed_after = time.monotonic() - t0
            break
        await asyncio.sleep(0.02)
    assert closed_after is not None and closed_after < 0.5, "listener still accepting"
    resp = await asyncio.wait_for(in_flight, 5)
    assert resp.status == 200 and resp.text == "slow"
    assert await asyncio.to_thread(wait_exit, proxy, 5) == 0
    print(f"listener closed {closed_after * 1000:.0f} ms after SIGTERM; in-flight request "
          f"finished; exit 0 after {time.monotonic() - t0:.2f}s")


async def test_sigterm_gives_up_after_drain_timeout(
        start_backend: Callable[..., Backend], start_proxy: Callable[..., ProxyProcess]) -> None:
    backend = start_backend("slower")
    proxy = start_proxy({"web": static(backend)}, defaults={"drain_timeout": "0.5s"})
    in_flight = asyncio.create_task(fetch(proxy.listen("web"), "GET", "/slow?seconds=10"))
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(wait_exit, proxy, 5) == 0
    assert time.monotonic() - t0 < 2.0
    # The cut request fails at once with a reset or an EOF, not a timeout (TimeoutError is
    # an OSError, so it is kept out by naming ConnectionError rather than OSError).
    with pytest.raises((ConnectionError, EOFError, ProtocolError)):
        await asyncio.wait_for(in_flight, 5)


async def test_sighup_adds_removes_and_changes_upstreams_keeping_connections(
        start_backend: Callable[..., Backend], start_proxy: Callable[..., ProxyProcess]) -> None:
    a, b = start_backend("a"), start_backend("b")
    proxy = start_proxy({"one": static(a), "two": static(b)})
    one, two = proxy.listen("one"), proxy.listen("two")
    config = Path(proxy.config_path)
    original = config.read_text()
    async with await RawConnection.open(one) as kept:
        assert (await kept.request("GET", "/")).text == "a"
        # Add "three", drop "two", change "one" (retries) in place.
        three_port = _free_port()
        text = original.replace("retries", "#retries")
        text = _drop_upstream(text, "two") + (
            f'\n[[upstreams]]\nname = "three"\nlisten = "127.0.0.1:{three_port}"\n'
            f'discovery = "static"\nendpoints = ["127.0.0.1:{b.port}"]\n')
        text = text.replace('name = "one"', 'name = "one"\nretries = 1', 1)
        config.write_text(text)
        proxy.proc.send_signal(signal.SIGHUP)
        await _wait_event(proxy, "reloaded", 1)
        reloaded = proxy.events("reloaded")[-1]
        assert reloaded["added"] == "three" and reloaded["removed"] == "two"
        assert reloaded["changed"] == "one"
        assert (await fetch(("127.0.0.1", three_port))).text == "b"
        await _until(lambda: refuses(two), 3)
        # The connection opened before the reload still works, and the instance's
        # counters were not reset by the in-place change.
        assert (await kept.request("GET", "/")).text == "a"
        endpoint = proxy.endpoints("one")[0]
        assert endpoint["requests"] == 2

        # An invalid config is rejected with the problem named; everything keeps serving.
        config.write_text(text + "\nbogus_key = 1\n")
        proxy.proc.send_signal(signal.SIGHUP)
        await _wait_event(proxy, "reload_rejected", 1)
        assert "bogus_key" in proxy.events("reload_rejected")[-1]["problems"]
        assert (await kept.request("GET", "/")).text == "a"
        assert (await fetch(("127.0.0.1", three_port))).text == "b"


async def test_deregistered_instance_finishes_in_flight_work_and_gets_no_new_requests(
        consul: ConsulAgent, start_backend: Callable[..., Backend],
        register: Callable[..., Registration],
        start_proxy: Callable[..., ProxyProcess]) -> None:
    service = unique_service("drain")
    leaving, staying = start_backend("leaving"), start_backend("staying")
    reg_leaving = register(leaving, service, check="ttl")
    reg_staying = register(staying, service, check="ttl")
    proxy = start_proxy({service: {}})
    addr = proxy.listen(service)
    await asyncio.to_thread(proxy.wait_routable, service,
                            {reg_leaving.service_id, reg_staying.service_id})
    # Start slow requests until one is in flight on the instance that will leave.
    slow = [asyncio.create_task(fetch(addr, "GET", "/slow?seconds=1.5")) for _ in range(2)]
    await asyncio.sleep(0.3)
    consul.deregister(reg_leaving.service_id)
    eps = await asyncio.to_thread(
        proxy.wait_endpoints, service,
        lambda eps: any(e["id"] == reg_leaving.service_id and e["state"] == "draining"
                        for e in eps), 3)
    assert eps
    after = [await fetch(addr) for _ in range(6)]
    assert {r.text for r in after} == {"staying"}  # no new work for the leaving one
    answers = await asyncio.gather(*slow)
    assert sorted(r.text for r in answers) == ["leaving", "staying"]  # in-flight finished
    await asyncio.to_thread(
        proxy.wait_endpoints, service,
        lambda eps: all(e["id"] != reg_leaving.service_id for e in eps), 3)
    drained = [e for e in proxy.events("pool_change") if reg_leaving.service_id in
               e.get("removed", "")]
    assert drained, "the pool change was not logged as a diff"


async def test_workers_share_the_listener_and_all_stop_on_sigterm(
        start_backend: Callable[..., Backend], start_proxy: Callable[..., ProxyProcess]) -> None:
    backend = start_backend("w")
    proxy = start_proxy({"web": static(backend)}, workers=2)
    children = _children(proxy.pid)
    assert len(children) == 2
    await _wait_event(proxy, "listening", 2)  # each worker listens on the shared address
    answers = await asyncio.gather(*(fetch(proxy.listen("web")) for _ in range(40)))
    assert all(r.status == 200 for r in answers)
    # A reload that adds an upstream opens its listener in every worker.
    added_port = _free_port()
    config = Path(proxy.config_path)
    config.write_text(config.read_text() + (
        f'\n[[upstreams]]\nname = "added"\nlisten = "127.0.0.1:{added_port}"\n'
        f'discovery = "static"\nendpoints = ["127.0.0.1:{backend.port}"]\n'))
    proxy.proc.send_signal(signal.SIGHUP)
    await _wait_event(proxy, "reloaded", 2)  # the signal reached every worker
    assert [e["added"] for e in proxy.events("reloaded")] == ["added", "added"]
    assert len([e for e in proxy.events("listening") if e["upstream"] == "added"]) == 2
    answers = await asyncio.gather(*(fetch(("127.0.0.1", added_port)) for _ in range(10)))
    assert all(r.status == 200 for r in answers)
    proxy.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(wait_exit, proxy, 5) == 0
    assert all(not os.path.exists(f"/proc/{pid}") or _is_zombie(pid) for pid in children)


@pytest.mark.parametrize("second_workers", [1, 2], ids=["second-single", "second-workers"])
@pytest.mark.parametrize("held", ["upstream", "admin"])
async def test_a_second_run_on_an_address_the_first_holds_exits_1_naming_it(
        consul: ConsulAgent, start_backends: Callable[..., list[Backend]],
        start_proxy: Callable[..., ProxyProcess], tmp_path: Path, held: str,
        second_workers: int) -> None:
    """SPEC: `sdproxy run` refuses a listen address another process holds, even with
    SO_REUSEPORT (which both would use with `--workers`, and the kernel would then split
    the clients between them): exit 1, "address in use". The first keeps its clients."""
    first_backend, second_backend = start_backends("first", "second")
    first = start_proxy({"web": static(first_backend)}, workers=2)
    web = first.listen("web")
    web_text = f"{web[0]}:{web[1]}"
    admin_text = f"{first.admin_addr[0]}:{first.admin_addr[1]}"
    await _wait_event(first, "listening", 2)  # both of its workers hold `web`
    second_config = build_config(
        {"web": static(second_backend,
                       listen=web_text if held == "upstream" else f"127.0.0.1:{_free_port()}")},
        admin_listen=admin_text if held == "admin" else f"127.0.0.1:{_free_port()}",
        consul={"address": consul.http_addr})
    code, stderr = await asyncio.to_thread(_run_to_exit, second_config, second_workers,
                                           tmp_path)
    assert code == 1, f"second sdproxy: exit {code}; stderr:\n{stderr[-2000:]}"
    address = web_text if held == "upstream" else admin_text
    assert f"address in use: {address}" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    # Every client still reaches the first proxy (and through it, its own backend).
    answers = await asyncio.gather(*(fetch(web) for _ in range(20)))
    assert {r.text for r in answers} == {"first"}
    assert len(_children(first.pid)) == 2


# -- helpers ------------------------------------------------------------------------------
def _run_to_exit(config_text: str, workers: int, tmp_path: Path) -> tuple[int | None, str]:
    """Run `sdproxy run` on `config_text` until it exits (bounded): (exit code or None
    when it was still running, its stderr). Its whole process group is killed after."""
    config = tmp_path / "second.toml"
    config.write_text(config_text)
    cmd = [sys.executable, "-m", "proxy", "run", "-c", str(config), "--workers", str(workers)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _out, err = proc.communicate(timeout=RUN_TO_EXIT_TIMEOUT)
        return proc.returncode, err.decode(errors="replace")
    except subprocess.TimeoutExpired:
        return None, "(still running)"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # workers it may have left behind
        except ProcessLookupError:
            pass
        proc.communicate(timeout=5)



def _free_port() -> int:
    from proxy.devconsul import free_port

    return free_port()


def _drop_upstream(text: str, name: str) -> str:
    blocks = text.split("[[upstreams]]")
    kept = [blocks[0]] + [b for b in blocks[1:] if f'name = "{name}"' not in b]
    return "[[upstreams]]".join(kept)


async def _until(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def _wait_event(proxy: ProxyProcess, event: str, count: int, timeout: float = 5) -> None:
    await _until(lambda: len(proxy.events(event)) >= count, timeout)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
