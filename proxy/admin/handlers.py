"""Admin request handlers, one per resource (SPEC "Admin API").

Each handler reads the live state at request time, through `proxy.admin.views` (JSON and
HTML) or the registry's collector (metrics), so every upstream is read once per request
and a reload that replaces the state's dicts is seen at the next request. Handlers do
not log: the admin is scraped every few seconds and a line per scrape would be noise
(an operator's drain or enable is logged by the upstream it changes).
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

from proxy.admin import dashboard
from proxy.admin.auth import refuse_write
from proxy.admin.operator import CONFIRM_POLL, CONFIRM_TIMEOUT, shared_drains, shows
from proxy.admin.rates import RateSampler
from proxy.admin.state import AppState, admin_config
from proxy.admin.views import listed_view, missing_upstreams, readings, upstream_views

STATE = web.AppKey("state", object)  # the AppState; `object` since it is structural
# The Prometheus registry, built at the first scrape: prometheus_client costs about 1 MiB
# of RSS that an idle proxy nobody scrapes need not pay. A holder, because the aiohttp
# application is frozen once it serves.
REGISTRY = web.AppKey("registry", dict)
# The dashboard's rate windows (proxy.admin.rates), sampled once a second off the request path.
SAMPLER = web.AppKey("sampler", RateSampler)

_dumps = functools.partial(json.dumps, indent=2)  # read by people as often as by tools


def _state(request: web.Request) -> AppState:
    return request.app[STATE]  # type: ignore[return-value]


async def handle_healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def handle_ready(request: web.Request) -> web.Response:
    missing = missing_upstreams(_state(request))
    if missing:
        return web.Response(status=503, text="not ready: " + ", ".join(missing))
    return web.Response(text="ready")


async def handle_upstreams(request: web.Request) -> web.Response:
    return web.json_response(upstream_views(_state(request)), dumps=_dumps)


async def handle_metrics(request: web.Request) -> web.Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    holder: dict[str, Any] = request.app[REGISTRY]
    registry: CollectorRegistry | None = holder.get("registry")
    if registry is None:
        from proxy.admin.collector import build_registry

        registry = holder["registry"] = build_registry(_state(request))
    body = generate_latest(registry)
    # CONTENT_TYPE_LATEST carries a charset, which aiohttp refuses in `content_type=`.
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _dashboard_views(request: web.Request) -> list[dict[str, Any]]:
    return dashboard.with_rates(upstream_views(_state(request)),
                                request.app[SAMPLER].windows.figures())


async def handle_dashboard(request: web.Request) -> web.Response:
    state = _state(request)
    page = dashboard.render(_dashboard_views(request),
                            started_at=getattr(state, "started_at", None), now=time.time())
    # no-store: a cached dashboard would show a pool that no longer exists.
    return web.Response(text=page, content_type="text/html",
                        headers={"Cache-Control": "no-store"})


async def handle_dashboard_json(request: web.Request) -> web.Response:
    """What the dashboard's script polls: the views with "rates" per upstream."""
    return web.json_response({"upstreams": _dashboard_views(request)},
                             headers={"Cache-Control": "no-store"})


async def handle_drain(request: web.Request) -> web.Response:
    """POST /upstreams/{name}/endpoints/{id}/drain: no new work for that instance."""
    return await _operator_drain(request, True)


async def handle_enable(request: web.Request) -> web.Response:
    """POST /upstreams/{name}/endpoints/{id}/enable: back in rotation (an ejection by
    the health checks, or an open breaker, still applies)."""
    return await _operator_drain(request, False)


async def _operator_drain(request: web.Request, drained: bool) -> web.Response:
    state = _state(request)
    refusal = refuse_write(admin_config(state), request.headers, request.host)
    if refusal is not None:
        headers = {"WWW-Authenticate": "Bearer"} if refusal.status == 401 else None
        return web.Response(status=refusal.status, text=refusal.message + "\n",
                            headers=headers)
    name, eid = request.match_info["name"], request.match_info["id"]
    runtime = state.upstreams.get(name)
    if runtime is None:
        return web.Response(status=404, text=f"no upstream named {name}\n")
    if not runtime.knows(eid):
        return web.Response(status=404, text=f"upstream {name} has no instance {eid}\n")
    shared = shared_drains(state)
    if shared is not None:  # under workers: every worker takes it up from there
        try:
            shared.set_operator_drain(name, eid, drained)
        except OSError as e:
            return web.Response(status=500, text=f"cannot share the change with the other "
                                                 f"workers: {e}\n")
    runtime.set_operator_drain(eid, drained)
    answer: dict[str, Any] = {"upstream": name, "id": eid, "operator_drained": drained}
    if shared is not None:
        answer["workers_pending"] = await _not_yet_applied(state, name, eid, drained)
    answer["endpoints"] = [listed_view(row) for row in runtime.listing()
                           if row.endpoint.id == eid]
    if (request.content_type == "application/x-www-form-urlencoded"
            and "text/html" in request.headers.get("Accept", "")):
        # The dashboard's button without JavaScript (a browser's form post, which asks for a
        # page): back to the page, which shows the change. API clients get the JSON.
        raise web.HTTPSeeOther("/")
    return web.json_response(answer, dumps=_dumps)


async def _not_yet_applied(state: AppState, name: str, eid: str, drained: bool) -> list[int]:
    """The live workers whose reading does not show the change yet, once every one does
    or CONFIRM_TIMEOUT has passed (a sibling publishes every PUBLISH_INTERVAL)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CONFIRM_TIMEOUT
    while True:
        pending = sorted(r.worker or 0 for r in readings(state)
                         if r.live and not shows(r, name, eid, drained))
        if not pending or loop.time() >= deadline:
            return pending
        await asyncio.sleep(CONFIRM_POLL)
