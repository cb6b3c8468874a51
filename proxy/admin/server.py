"""The admin HTTP server: routes, and starting it on `admin.listen`.

`build_app(state)` wires the handlers over one application state and a private
Prometheus registry built for it at the first scrape; `start_admin(state, listen)` serves that app and
returns the runner, which the composition root keeps and `await runner.cleanup()`s at
shutdown. Binding failures (a port already in use) surface as OSError for the caller to
report; nothing here exits the process. Per-request access logging is off on purpose.
"""

from __future__ import annotations

from aiohttp import web

from proxy.admin.handlers import (
    REGISTRY,
    SAMPLER,
    STATE,
    handle_dashboard,
    handle_dashboard_json,
    handle_drain,
    handle_enable,
    handle_healthz,
    handle_metrics,
    handle_ready,
    handle_upstreams,
)
from proxy.admin.rates import RateSampler
from proxy.admin.state import AppState
from proxy.admin.views import rate_counters
from proxy.model import Address


def build_app(state: AppState) -> web.Application:
    app = web.Application()
    app[STATE] = state
    app[REGISTRY] = {}  # the registry itself is built at the first scrape
    sampler = app[SAMPLER] = RateSampler(lambda: rate_counters(state))

    async def start_sampling(_app: web.Application) -> None:
        sampler.start()

    async def stop_sampling(_app: web.Application) -> None:
        await sampler.stop()

    app.on_startup.append(start_sampling)
    app.on_cleanup.append(stop_sampling)
    app.router.add_get("/", handle_dashboard)
    app.router.add_get("/dashboard.json", handle_dashboard_json)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/ready", handle_ready)
    app.router.add_get("/upstreams", handle_upstreams)
    app.router.add_get("/metrics", handle_metrics)
    # An id may hold any character a catalog allows, "/" included (sent as %2F).
    app.router.add_post("/upstreams/{name}/endpoints/{id:.+}/drain", handle_drain)
    app.router.add_post("/upstreams/{name}/endpoints/{id:.+}/enable", handle_enable)
    return app


async def start_admin(state: AppState, listen: Address) -> web.AppRunner:
    """Serve the admin app on `listen`; raise OSError if the address cannot be bound."""
    # handle_signals=False: the composition root owns SIGTERM/SIGHUP.
    runner = web.AppRunner(build_app(state), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, listen.host, listen.port, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
