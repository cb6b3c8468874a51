"""A small HTTP backend for the demo, the integration tests and the load tests.

`python -m proxy.demo.backend --port N --name NAME [--host 127.0.0.1]` serves HTTP/1.1
with aiohttp and prints exactly one line on stdout once it accepts connections:
`event=backend_listening name=NAME port=N` (with `--port 0` the port the kernel chose).
Nothing else is written to stdout, so a parent may read that one line from a pipe and
never drain it again.

Routes (every response carries `X-Backend: NAME`):
- `GET /health` -> 200 `ok`
- `GET /headers` -> JSON object of the request headers as received: keys lowercased, a
  string for a name seen once, a list for a repeated name; plus `_peer` (`ip:port` of the
  connection the request came on), `_method`, `_path` and `_version` (`1.1`).
- `POST|PUT /upload` -> reads the body streaming (never whole in memory) and answers
  JSON `{"sha256": hex, "bytes": n, "name": NAME}`.
- `GET /download?bytes=N&seed=S[&chunked=1]` -> N deterministic bytes, produced block by
  block (see `download_blocks`); Content-Length unless `chunked=1`.
- `* /status/<code>` -> that status, body NAME.
- `GET /slow?seconds=S` -> 200 after S seconds (at most 60): work that stays in flight.
- `GET /ws` -> a WebSocket echo (text and binary).
- `* /reset` -> reads the whole request, then resets the connection (RST, no response).
- anything else, any method -> 200, body NAME (a request body is read and discarded).

With `--tls-cert FILE --tls-key FILE` it serves HTTPS instead (the same routes); adding
`--tls-client-ca FILE` makes it require a client certificate signed by that CA (mTLS).

SIGTERM or SIGINT stop it cleanly (exit 0). It knows nothing of the proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import signal
import socket
import ssl
import struct
import sys
from collections.abc import Iterator

from aiohttp import WSMsgType, web

BLOCK_SIZE = 65536
READ_CHUNK = 65536


def download_blocks(nbytes: int, seed: int | str) -> Iterator[bytes]:
    """The bytes `/download?bytes=nbytes&seed=seed` sends, in blocks of at most 64 KiB.

    One `random.Random(seed)` yields successive `randbytes(BLOCK_SIZE)` blocks; the last
    one is cut to length. The same arguments always give the same bytes, so a client can
    regenerate them (also handy as an upload payload of any size).
    """
    rng = random.Random(seed)
    left = nbytes
    while left > 0:
        block = rng.randbytes(BLOCK_SIZE)
        if left < BLOCK_SIZE:
            block = block[:left]
        left -= len(block)
        yield block


def expected_download_sha256(nbytes: int, seed: int | str) -> str:
    """Hex SHA-256 of what `/download?bytes=nbytes&seed=seed` sends."""
    digest = hashlib.sha256()
    for block in download_blocks(nbytes, seed):
        digest.update(block)
    return digest.hexdigest()


def _seed(raw: str) -> int | str:
    """Query seeds are ints when they look like one, so `seed=7` matches `seed=7` in tests."""
    try:
        return int(raw)
    except ValueError:
        return raw


def build_app(name: str) -> web.Application:
    """The aiohttp application; one catch-all route dispatching by path and method."""

    def reply(status: int = 200, text: str | None = None) -> web.Response:
        body = name if text is None else text
        if status < 200 or status in (204, 304):
            return web.Response(status=status, headers={"X-Backend": name})
        return web.Response(status=status, text=body, headers={"X-Backend": name})

    async def health(_: web.Request) -> web.StreamResponse:
        return reply(text="ok")

    async def headers(request: web.Request) -> web.StreamResponse:
        seen: dict[str, str | list[str]] = {}
        for raw_key, raw_value in request.raw_headers:
            key = raw_key.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            prev = seen.get(key)
            if prev is None:
                seen[key] = value
            elif isinstance(prev, list):
                prev.append(value)
            else:
                seen[key] = [prev, value]
        peer = request.transport.get_extra_info("peername") if request.transport else None
        result: dict[str, object] = dict(seen)
        result["_peer"] = f"{peer[0]}:{peer[1]}" if peer else ""
        result["_method"] = request.method
        result["_path"] = request.path_qs
        result["_version"] = f"{request.version.major}.{request.version.minor}"
        return web.json_response(result, headers={"X-Backend": name})

    async def upload(request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        total = 0
        async for chunk in request.content.iter_chunked(READ_CHUNK):
            digest.update(chunk)
            total += len(chunk)
        return web.json_response({"sha256": digest.hexdigest(), "bytes": total, "name": name},
                                 headers={"X-Backend": name})

    async def download(request: web.Request) -> web.StreamResponse:
        try:
            nbytes = int(request.query.get("bytes", "0"))
        except ValueError:
            return reply(400, "bad bytes")
        seed = _seed(request.query.get("seed", "0"))
        resp = web.StreamResponse(headers={"X-Backend": name,
                                           "Content-Type": "application/octet-stream"})
        if request.query.get("chunked") == "1":
            resp.enable_chunked_encoding()
        else:
            resp.content_length = nbytes
        await resp.prepare(request)
        if request.method != "HEAD":
            for block in download_blocks(nbytes, seed):
                await resp.write(block)
        await resp.write_eof()
        return resp

    async def status(request: web.Request) -> web.StreamResponse:
        await _discard_body(request)
        try:
            code = int(request.path.rsplit("/", 1)[1])
        except ValueError:
            return reply(400, "bad status")
        if not 100 <= code <= 599:
            return reply(400, "bad status")
        return reply(code)

    async def default(request: web.Request) -> web.StreamResponse:
        await _discard_body(request)
        return reply()

    async def websocket_echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        ws.headers["X-Backend"] = name
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    async def reset(request: web.Request) -> web.StreamResponse:
        """Read the whole request, then reset the connection (RST, no response)."""
        await _discard_body(request)
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:  # SO_LINGER 0: close() sends RST instead of FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        raise asyncio.CancelledError  # nothing more to say on this connection

    async def slow(request: web.Request) -> web.StreamResponse:
        """Answer after `seconds` (bounded to 60): a request that is in flight for a while."""
        await _discard_body(request)
        try:
            seconds = min(60.0, float(request.query.get("seconds", "1")))
        except ValueError:
            return reply(400, "bad seconds")
        await asyncio.sleep(seconds)
        return reply()

    async def dispatch(request: web.Request) -> web.StreamResponse:
        path, method = request.path, request.method
        if path == "/slow":
            return await slow(request)
        if path == "/ws" and method == "GET":
            return await websocket_echo(request)
        if path == "/reset":
            return await reset(request)
        if path == "/health" and method in ("GET", "HEAD"):
            return await health(request)
        if path == "/headers" and method in ("GET", "HEAD"):
            return await headers(request)
        if path == "/upload" and method in ("POST", "PUT"):
            return await upload(request)
        if path == "/download" and method in ("GET", "HEAD"):
            return await download(request)
        if path.startswith("/status/"):
            return await status(request)
        return await default(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


async def _discard_body(request: web.Request) -> None:
    async for _ in request.content.iter_chunked(READ_CHUNK):
        pass


def tls_context(cert_file: str, key_file: str, client_ca: str | None) -> ssl.SSLContext:
    """The server context for `--tls-cert`/`--tls-key` (and `--tls-client-ca`: mTLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    if client_ca:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def serve(host: str, port: int, name: str,
                tls: ssl.SSLContext | None = None) -> None:
    """Serve until SIGTERM/SIGINT; print the listening line once the socket accepts."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(build_app(name), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, ssl_context=tls)
    await site.start()
    bound = int(runner.addresses[0][1]) if runner.addresses else port  # port 0: the chosen one
    print(f"event=backend_listening name={name} port={bound}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.demo.backend",
                                     description="demo/test HTTP backend")
    parser.add_argument("--port", type=int, required=True, help="0: let the kernel choose")
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="the private key of --tls-cert (PEM)")
    parser.add_argument("--tls-client-ca", help="require client certificates from this CA")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    try:
        tls = (tls_context(args.tls_cert, args.tls_key, args.tls_client_ca)
               if args.tls_cert else None)
        asyncio.run(serve(args.host, args.port, args.name, tls))
    except OSError as e:
        print(f"backend {args.name}: cannot listen on {args.host}:{args.port}: {e}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
