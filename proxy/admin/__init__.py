"""Admin API: an aiohttp app (JSON, Prometheus metrics, an HTML dashboard) over the live
state. Entry points: `proxy.admin.server.build_app` and `proxy.admin.server.start_admin`.
"""
