"""The demo backend on its own: proves the harness before any proxy is involved."""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from support.consul import Registration, wait_passing
from support.http import RawConnection, fetch
from support.procs import Backend

from proxy.demo.backend import download_blocks, expected_download_sha256
from proxy.devconsul import ConsulAgent

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def url(b: Backend, path: str) -> str:
    return f"http://{b.host}:{b.port}{path}"


async def test_health_and_default_routes(start_backend: Callable[..., Backend]) -> None:
    b = start_backend("alpha")
    resp = await fetch(b.addr, "GET", "/health")
    assert (resp.status, resp.text) == (200, "ok")
    for method in ("GET", "POST", "DELETE"):
        resp = await fetch(b.addr, method, "/anything/else?x=1", body=b"ignored")
        assert (resp.status, resp.text, resp.header("x-backend")) == (200, "alpha", "alpha")
    head = await fetch(b.addr, "HEAD", "/x")
    assert head.status == 200 and head.body == b"" and head.header("x-backend") == "alpha"
    for code in (201, 404, 503):
        resp = await fetch(b.addr, "GET", f"/status/{code}")
        assert (resp.status, resp.text) == (code, "alpha")


async def test_headers_echo(start_backend: Callable[..., Backend]) -> None:
    b = start_backend("beta")
    async with await RawConnection.open(b.addr) as conn:
        resp = await conn.request("GET", "/headers", headers=[
            ("Host", "example.test:81"), ("X-One", "1"), ("X-Twice", "a"), ("x-twice", "b")])
        assert resp.status == 200
        seen = json.loads(resp.body)
        assert seen["host"] == "example.test:81"
        assert seen["x-one"] == "1"
        assert seen["x-twice"] == ["a", "b"]
        assert seen["_peer"] == f"127.0.0.1:{conn.local_port}"
        assert seen["_version"] == "1.1"
        # keep-alive: a second request on the same connection works
        again = await conn.request("GET", "/headers")
        assert json.loads(again.body)["_peer"] == seen["_peer"]


async def test_upload_hash_streamed(start_backend: Callable[..., Backend]) -> None:
    b = start_backend("gamma")
    size = 16 * MiB + 123
    expected = expected_download_sha256(size, "up")

    async def body() -> AsyncIterator[bytes]:
        for block in download_blocks(size, "up"):
            yield block

    async with aiohttp.ClientSession() as session:
        async with session.post(url(b, "/upload"), data=body()) as resp:  # chunked
            assert resp.status == 200
            assert await resp.json() == {"sha256": expected, "bytes": size, "name": "gamma"}
        data = b"x" * 1000
        async with session.put(url(b, "/upload"), data=data) as resp:  # Content-Length
            got = await resp.json()
            assert got["sha256"] == hashlib.sha256(data).hexdigest() and got["bytes"] == 1000


@pytest.mark.parametrize("chunked", [False, True])
async def test_download_deterministic(start_backend: Callable[..., Backend],
                                      chunked: bool) -> None:
    b = start_backend("delta")
    size = 8 * MiB + 7
    q = f"/download?bytes={size}&seed=42" + ("&chunked=1" if chunked else "")
    digest = hashlib.sha256()
    total = 0
    async with aiohttp.ClientSession() as session, session.get(url(b, q)) as resp:
        assert resp.status == 200
        if chunked:
            assert resp.headers.get("Transfer-Encoding") == "chunked"
        else:
            assert resp.headers.get("Content-Length") == str(size)
        async for chunk in resp.content.iter_chunked(65536):
            digest.update(chunk)
            total += len(chunk)
    assert total == size
    assert digest.hexdigest() == expected_download_sha256(size, 42)
    assert expected_download_sha256(size, 42) != expected_download_sha256(size, 43)


def test_sigterm_clean_exit_and_kill9(start_backends: Callable[..., list[Backend]]) -> None:
    a, b = start_backends("one", "two")
    assert a.port != b.port
    assert a.stop_signal(signal.SIGTERM) == 0
    b.kill9()
    assert b.proc.returncode == -signal.SIGKILL


def test_consul_http_check_sees_backend(consul: ConsulAgent,
                                        start_backend: Callable[..., Backend],
                                        register: Callable[..., Registration],
                                        service_name: Callable[[str], str]) -> None:
    """The registration helpers against the real agent: an HTTP check starting critical
    turns passing once Consul probes the backend's /health; a TTL check flips on demand."""
    b = start_backend("epsilon")
    svc = service_name("harness")
    reg = register(b, svc, check="http", status="critical")
    assert reg.service_id == f"{svc}-epsilon" and reg.check_id == f"{reg.service_id}:http"
    wait_passing(consul, svc, {reg.service_id}, timeout=10.0)
    ttl = register(b.port, svc, service_id=f"{svc}-ttl", check="ttl")
    wait_passing(consul, svc, {reg.service_id, ttl.service_id})
    consul.check_fail(ttl.check_id)
    wait_passing(consul, svc, {reg.service_id})
