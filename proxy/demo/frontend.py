"""`python -m proxy.demo.frontend`: the frontend of compose.yaml, which calls its sidecar.

    python -m proxy.demo.frontend --port 8080 --upstream http://127.0.0.1:8081

Owns nothing but one route, to show the sidecar pattern from the frontend's side: the
frontend knows one local address (its sdproxy) and never which instances exist.

- `GET /` -> calls `GET <upstream>/` once and answers 200 with one line,
  `frontend -> sdproxy -> <X-Backend> (<status>)`; 502 with the reason when the sidecar
  cannot be reached or does not answer within 5 s.
- `GET /health` -> 200 `ok` (the frontend itself, not its upstream).

It prints `event=frontend_listening port=N` on stdout once it accepts connections, and
stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

UPSTREAM_TIMEOUT = 5.0
SESSION = web.AppKey("session", aiohttp.ClientSession)


def build_app(upstream: str) -> web.Application:
    target = upstream.rstrip("/") + "/"

    async def index(request: web.Request) -> web.Response:
        session = request.app[SESSION]
        try:
            async with session.get(target) as resp:
                await resp.read()
                backend = resp.headers.get("X-Backend", "?")
                return web.Response(text=f"frontend -> sdproxy -> {backend} ({resp.status})\n")
        except (aiohttp.ClientError, TimeoutError) as e:
            reason = str(e) or type(e).__name__
            return web.Response(status=502, text=f"frontend: sidecar {target}: {reason}\n")

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def session_context(app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=UPSTREAM_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            app[SESSION] = session
            yield

    app = web.Application()
    app.cleanup_ctx.append(session_context)
    app.router.add_get("/", index)
    app.router.add_get("/health", health)
    return app


async def serve(host: str, port: int, upstream: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(build_app(upstream), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound = int(runner.addresses[0][1]) if runner.addresses else port
    print(f"event=frontend_listening port={bound} upstream={upstream}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.demo.frontend",
                                     description="demo frontend that calls its sidecar")
    parser.add_argument("--port", type=int, required=True, help="0: let the kernel choose")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--upstream", default="http://127.0.0.1:8081",
                        help="the sidecar's listener (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.host, args.port, args.upstream))
    except OSError as e:
        print(f"frontend: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
