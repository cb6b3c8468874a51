"""The HTML dashboard at `GET /`: one self-contained page, refreshing itself.

Renders the same views `/upstreams` serialises (proxy.admin.views), so the page and the
JSON agree. No JavaScript and no external assets: the CSS is inline and the page reloads
itself every REFRESH_SECONDS via `<meta http-equiv="refresh">`. Every value is escaped,
numbers included: instance ids, tags, node names and catalog errors come from the
catalog, which anyone able to register a service can write to.
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence
from typing import Any

REFRESH_SECONDS = 2

# CSS class per instance state; a state not listed renders unstyled (never from input).
_STATE_CLASS = {"healthy": "ok", "open": "bad", "half_open": "warn", "ejected": "bad",
                "draining": "muted", "down": "down"}

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.4em 0 .3em}
table{border-collapse:collapse;background:#fff;min-width:40em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
.meta{color:#555}.ok{color:#17702b}.warn{color:#9a6700}.bad{color:#b3261e;font-weight:600}
.muted{color:#888}tr.down td{color:#999;background:#f4f4f4}code{background:#eee;padding:0 .25em}
"""


def _e(value: Any) -> str:
    """Escape anything for HTML text or a quoted attribute; None renders as a dash."""
    return "-" if value is None else html.escape(str(value), quote=True)


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts))} ({now - ts:.1f}s ago)"


def _endpoint_row(ep: Mapping[str, Any]) -> str:
    state = str(ep.get("state", ""))
    css = _STATE_CLASS.get(state, "")
    tags = ", ".join(str(t) for t in ep.get("tags") or ())
    row_class = ' class="down"' if state == "down" else ""  # greyed, not hidden
    return (
        f"<tr{row_class}>"
        f"<td><code>{_e(ep.get('id'))}</code></td>"
        f"<td>{_e(ep.get('address'))}:{_e(ep.get('port'))}</td>"
        f"<td>{_e(ep.get('node') or None)}</td>"
        f"<td>{_e(ep.get('datacenter') or None)}</td>"
        f"<td>{_e(tags or None)}</td>"
        f"<td class=\"n\">{_e(ep.get('weight'))}</td>"
        f"<td class=\"{css}\">{_e(state)}</td>"
        f"<td>{_e(ep.get('reason') or None)}</td>"
        f"<td class=\"n\">{_e(ep.get('active'))}</td>"
        f"<td class=\"n\">{_e(ep.get('requests'))}</td>"
        f"<td class=\"n\">{_e(ep.get('failures'))}</td>"
        "</tr>"
    )


def _upstream_section(up: Mapping[str, Any], now: float) -> str:
    endpoints: Sequence[Mapping[str, Any]] = up.get("endpoints") or ()
    stale = float(up.get("stale_seconds") or 0.0)
    ready = ('<span class="ok">ready</span>' if up.get("answered")
             else '<span class="bad">waiting for the first catalog answer</span>')
    stale_html = (f'<span class="bad">{stale:.1f}s stale</span>' if stale > 0
                  else '<span class="ok">fresh</span>')
    error = up.get("last_error")
    error_html = f' · last error: <code>{_e(error)}</code>' if error else ""
    failovers = ", ".join(f"{_e(k)}={_e(v)}" for k, v in (up.get("failovers") or {}).items())
    if endpoints:
        rows = "".join(_endpoint_row(ep) for ep in endpoints)
    else:
        rows = '<tr><td colspan="11" class="muted">no instances</td></tr>'
    return f"""
<section>
<h2>{_e(up.get('name'))} <span class="meta">({_e(up.get('mode'))})</span></h2>
<p class="meta">listen <code>{_e(up.get('listen'))}</code> · discovery {_e(up.get('discovery'))}
 · balance {_e(up.get('balance'))} · {ready} · catalog {stale_html}
 · index {_e(up.get('catalog_index'))} · last update {_e(_ago(up.get('last_update'), now))}
 · updates {_e(up.get('catalog_updates'))} · errors {_e(up.get('catalog_errors'))}{error_html}</p>
<p class="meta">connections {_e(up.get('connections'))}
 · rejected {_e(up.get('rejected_connections'))}
 · no-instance responses {_e(up.get('no_instance_responses'))}
 · failovers {failovers or 'none'}</p>
<table>
<tr><th>id</th><th>address</th><th>node</th><th>dc</th><th>tags</th><th>weight</th>
<th>state</th><th>reason</th><th>active</th><th>requests</th><th>failures</th></tr>
{rows}
</table>
</section>"""


def render(upstreams: Sequence[Mapping[str, Any]], *, started_at: float | None,
           now: float) -> str:
    """The whole page for the given upstream views (see proxy.admin.views)."""
    uptime = f"up {now - started_at:.0f}s" if started_at else ""
    body = "".join(_upstream_section(up, now) for up in upstreams) or "<p>no upstreams</p>"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>sdproxy</title>
<style>{_CSS}</style>
</head>
<body>
<h1>sdproxy</h1>
<p class="meta">{_e(uptime)} · <a href="/upstreams">/upstreams</a> (JSON)
 · <a href="/metrics">/metrics</a> (Prometheus) · <a href="/ready">/ready</a>
 · refreshes every {REFRESH_SECONDS}s</p>
{body}
</body>
</html>
"""
