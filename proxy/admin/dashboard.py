"""The HTML dashboard at `GET /`: one self-contained page that updates itself in place.

Renders the same views `/upstreams` serialises (proxy.admin.views), plus per upstream the
figures of proxy.admin.rates over the last 10 s and 5 min: request rate, error rate (5xx),
p50/p99 latency and responses by status class. Per instance: its state and reason (a
`down` instance, critical in the catalog, is greyed, not hidden) and a Drain or Enable
button.

Works without JavaScript: the page is a plain server-rendered table, the buttons are forms
that POST (the admin answers a form post with a redirect back here) and a `<noscript>`
refresh reloads it. With JavaScript, an inline script polls `/dashboard.json` every
POLL_SECONDS, rewrites the cells in place (no reload) and sends the buttons with fetch.
The script writes text with `textContent` only, and every value the server renders is
escaped, numbers included: instance ids, tags, node names and catalog errors come from the
catalog, which anyone able to register a service can write to. No external assets.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from proxy.admin.rates import WINDOWS

POLL_SECONDS = 1
NOSCRIPT_REFRESH_SECONDS = 5
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


# CSS class per instance state; a state not listed renders unstyled (never from input).
_STATE_CLASS = {"healthy": "ok", "open": "bad", "half_open": "warn", "ejected": "bad",
                "draining": "muted", "down": "down"}

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.15em;margin:1.4em 0 .3em}
table{border-collapse:collapse;background:#fff;min-width:40em;margin:.3em 0}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
.meta{color:#555}.ok{color:#17702b}.warn{color:#9a6700}.bad{color:#b3261e;font-weight:600}
.muted{color:#888}tr.down td{color:#999;background:#eee}tr.down td.down{font-weight:600}
code{background:#eee;padding:0 .25em}form{margin:0}button{font:inherit;padding:0 .5em}
"""

# The page's script: poll, then rewrite cells found by data attributes. Rows are rebuilt
# only when the set of instances changed, so a button under the pointer stays put.
_SCRIPT = """
(function(){
var STATE_CLASS=%(state_class)s;
function txt(v){return v===null||v===undefined||v===''?'-':String(v);}
function set(root,key,value){var el=root.querySelector('[data-k="'+key+'"]');
 if(el&&el.textContent!==value){el.textContent=value;}}
function pct(x){return (x*100).toFixed(1)+'%%';}
function ms(x){return x===null||x===undefined?'-':x.toFixed(1)+' ms';}
function classes(map){var out=[];for(var k in map){out.push(k+'='+map[k]);}
 return out.length?out.join(' '):'-';}
function endpointClasses(responses){var c={};for(var code in responses){
 var k=String(code).charAt(0)+'xx';c[k]=(c[k]||0)+responses[code];}return classes(c);}
function actionFor(up,ep){return '/upstreams/'+encodeURIComponent(up)+'/endpoints/'+
 encodeURIComponent(ep.id)+'/'+(ep.state==='draining'?'enable':'drain');}
function rowId(tr){var td=tr.querySelector('td[data-id]');return td?td.dataset.id:null;}
function fillRow(tr,up,ep){
 tr.className=ep.state==='down'?'down':'';
 set(tr,'address',txt(ep.address)+':'+txt(ep.port));
 set(tr,'node',txt(ep.node));set(tr,'datacenter',txt(ep.datacenter));
 set(tr,'tags',txt((ep.tags||[]).join(', ')));set(tr,'weight',txt(ep.weight));
 var st=tr.querySelector('[data-k="state"]');st.textContent=txt(ep.state);
 st.className=STATE_CLASS[ep.state]||'';
 set(tr,'reason',txt(ep.reason));set(tr,'active',txt(ep.active));
 set(tr,'requests',txt(ep.requests));set(tr,'failures',txt(ep.failures));
 set(tr,'responses',endpointClasses(ep.responses||{}));
 var form=tr.querySelector('form');form.action=actionFor(up,ep);
 form.querySelector('button').textContent=ep.state==='draining'?'Enable':'Drain';}
function newRow(up,ep){var tr=document.createElement('tr');
 ['id','address','node','datacenter','tags','weight','state','reason','active','requests',
  'failures','responses'].forEach(function(k){var td=document.createElement('td');
  td.dataset.k=k;if(k==='id'){var c=document.createElement('code');c.textContent=ep.id;
  td.appendChild(c);td.removeAttribute('data-k');td.dataset.id=ep.id;}tr.appendChild(td);});
 var td=document.createElement('td'),f=document.createElement('form'),
  b=document.createElement('button');f.method='post';b.type='submit';f.appendChild(b);
 td.appendChild(f);tr.appendChild(td);return tr;}
function update(data){(data.upstreams||[]).forEach(function(up){
 var sec=document.querySelector('section[data-upstream="'+CSS.escape(up.name)+'"]');
 if(!sec){return;}
 var rates=up.rates||{};Object.keys(rates).forEach(function(w){var r=rates[w];
  set(sec,w+'.seconds',r.seconds.toFixed(0)+' s');set(sec,w+'.rate',r.rate.toFixed(1)+'/s');set(sec,w+'.error_rate',pct(r.error_rate));
  set(sec,w+'.p50',ms(r.p50_ms));set(sec,w+'.p99',ms(r.p99_ms));
  Object.keys(r.classes).forEach(function(c){set(sec,w+'.'+c,String(r.classes[c]));});});
 set(sec,'totals',classes(up.responses||{}));
 var body=sec.querySelector('tbody.endpoints');var eps=up.endpoints||[];
 var rows=body.querySelectorAll('tr');
 var same=rows.length===eps.length&&eps.every(function(ep,i){return rowId(rows[i])===ep.id;});
 if(!same){body.textContent='';eps.forEach(function(ep){body.appendChild(newRow(up.name,ep));});
  rows=body.querySelectorAll('tr');}
 eps.forEach(function(ep,i){fillRow(rows[i],up.name,ep);});});
 var u=document.getElementById('updated');if(u){u.textContent=new Date().toLocaleTimeString();}}
function poll(){fetch('/dashboard.json',{cache:'no-store'}).then(function(r){return r.json();})
 .then(update).catch(function(){});}
document.addEventListener('submit',function(e){var f=e.target;e.preventDefault();
 fetch(f.action,{method:'POST'}).then(poll,poll);});
setInterval(poll,%(poll_ms)d);poll();
})();
"""


def _e(value: Any) -> str:
    """Escape anything for HTML text or a quoted attribute; None renders as a dash."""
    return "-" if value is None or value == "" else html.escape(str(value), quote=True)


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ts))} ({now - ts:.1f}s ago)"


def with_rates(views: list[dict[str, Any]],
               figures: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The views, each with "rates" (window -> figures; {} until two samples exist)."""
    for view in views:
        view["rates"] = dict(figures.get(str(view.get("name")), {}))
    return views


def _classes(counts: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in counts.items()) or "-"


def _endpoint_classes(responses: Mapping[str, Any]) -> str:
    by_class: dict[str, int] = {}
    for code, n in responses.items():
        key = f"{str(code)[:1]}xx"
        by_class[key] = by_class.get(key, 0) + int(n)
    return _classes(by_class)


def _action(upstream: str, ep: Mapping[str, Any]) -> tuple[str, str]:
    """(form action, button label) for the instance's Drain or Enable button."""
    verb = "enable" if ep.get("state") == "draining" else "drain"
    path = (f"/upstreams/{quote(upstream, safe='')}/endpoints/"
            f"{quote(str(ep.get('id')), safe='')}/{verb}")
    return path, verb.capitalize()


def _endpoint_row(upstream: str, ep: Mapping[str, Any]) -> str:
    state = str(ep.get("state", ""))
    css = _STATE_CLASS.get(state, "")
    tags = ", ".join(str(t) for t in ep.get("tags") or ())
    row_class = ' class="down"' if state == "down" else ""  # greyed, not hidden
    action, label = _action(upstream, ep)
    return (
        f"<tr{row_class}>"
        f'<td data-id="{_e(ep.get("id"))}"><code>{_e(ep.get("id"))}</code></td>'
        f'<td data-k="address">{_e(ep.get("address"))}:{_e(ep.get("port"))}</td>'
        f'<td data-k="node">{_e(ep.get("node"))}</td>'
        f'<td data-k="datacenter">{_e(ep.get("datacenter"))}</td>'
        f'<td data-k="tags">{_e(tags)}</td>'
        f'<td data-k="weight" class="n">{_e(ep.get("weight"))}</td>'
        f'<td data-k="state" class="{css}">{_e(state)}</td>'
        f'<td data-k="reason">{_e(ep.get("reason"))}</td>'
        f'<td data-k="active" class="n">{_e(ep.get("active"))}</td>'
        f'<td data-k="requests" class="n">{_e(ep.get("requests"))}</td>'
        f'<td data-k="failures" class="n">{_e(ep.get("failures"))}</td>'
        f'<td data-k="responses">{_e(_endpoint_classes(ep.get("responses") or {}))}</td>'
        f'<td><form method="post" action="{_e(action)}">'
        f'<button type="submit">{label}</button></form></td>'
        "</tr>"
    )


def _rates_table(rates: Mapping[str, Mapping[str, Any]]) -> str:
    rows = []
    for label, _seconds in WINDOWS:
        r = rates.get(label) or {}
        rate = f"{float(r['rate']):.1f}/s" if r else "-"
        errors = f"{float(r['error_rate']) * 100:.1f}%" if r else "-"
        p50 = f"{r['p50_ms']:.1f} ms" if r.get("p50_ms") is not None else "-"
        p99 = f"{r['p99_ms']:.1f} ms" if r.get("p99_ms") is not None else "-"
        classes = r.get("classes") or {}
        cells = "".join(f'<td class="n" data-k="{label}.{c}">{_e(classes.get(c, "-"))}</td>'
                        for c in CLASSES)
        over = f"{float(r['seconds']):.0f} s" if r else "-"
        rows.append(
            f"<tr><th>last {_e(label)}</th>"
            f'<td class="n muted" data-k="{label}.seconds">{_e(over)}</td>'
            f'<td class="n" data-k="{label}.rate">{_e(rate)}</td>'
            f'<td class="n" data-k="{label}.error_rate">{_e(errors)}</td>'
            f'<td class="n" data-k="{label}.p50">{_e(p50)}</td>'
            f'<td class="n" data-k="{label}.p99">{_e(p99)}</td>{cells}</tr>')
    head = "".join(f"<th>{c}</th>" for c in CLASSES)
    return (f'<table class="rates"><tr><th>window</th><th title="measured so far: a window '
            f'fills up after a start">over</th><th>requests</th><th>errors (5xx)</th>'
            f"<th>p50</th><th>p99</th>{head}</tr>{''.join(rows)}</table>")


def _upstream_section(up: Mapping[str, Any], now: float) -> str:
    name = str(up.get("name"))
    endpoints: Sequence[Mapping[str, Any]] = up.get("endpoints") or ()
    stale = float(up.get("stale_seconds") or 0.0)
    ready = ('<span class="ok">ready</span>' if up.get("answered")
             else '<span class="bad">waiting for the first catalog answer</span>')
    stale_html = (f'<span class="bad">{stale:.1f}s stale</span>' if stale > 0
                  else '<span class="ok">fresh</span>')
    error = up.get("last_error")
    error_html = f' · last error: <code>{_e(error)}</code>' if error else ""
    failovers = ", ".join(f"{_e(k)}={_e(v)}" for k, v in (up.get("failovers") or {}).items())
    rows = "".join(_endpoint_row(name, ep) for ep in endpoints)
    empty = "" if endpoints else '<p class="muted">no instances</p>'
    return f"""
<section data-upstream="{_e(name)}">
<h2>{_e(name)} <span class="meta">({_e(up.get('mode'))})</span></h2>
<p class="meta">listen <code>{_e(up.get('listen'))}</code> · discovery {_e(up.get('discovery'))}
 · balance {_e(up.get('balance'))} · {ready} · catalog {stale_html}
 · index {_e(up.get('catalog_index'))} · last update {_e(_ago(up.get('last_update'), now))}
 · updates {_e(up.get('catalog_updates'))} · errors {_e(up.get('catalog_errors'))}{error_html}</p>
<p class="meta">connections {_e(up.get('connections'))}
 · rejected {_e(up.get('rejected_connections'))}
 · no-instance responses {_e(up.get('no_instance_responses'))}
 · failovers {failovers or 'none'}
 · responses since start <span data-k="totals">{_e(_classes(up.get('responses') or {}))}</span></p>
{_rates_table(up.get('rates') or {})}
<table class="instances">
<thead><tr><th>id</th><th>address</th><th>node</th><th>dc</th><th>tags</th><th>weight</th>
<th>state</th><th>reason</th><th>active</th><th>requests</th><th>failures</th>
<th>responses</th><th></th></tr></thead>
<tbody class="endpoints">{rows}</tbody>
</table>{empty}{_routes_table(up.get('routes') or ())}
</section>"""


def _routes_table(routes: Sequence[Mapping[str, Any]]) -> str:
    """A routed listener's route table (host "" shows as *), with requests per route."""
    if not routes:
        return ""
    rows = "".join(
        f"<tr><td>{_e(r.get('host') or '*')}</td><td><code>{_e(r.get('path_prefix'))}</code>"
        f"</td><td>{_e(r.get('upstream'))}</td><td>{'yes' if r.get('strip_prefix') else 'no'}"
        f"</td><td>{_e(r.get('source'))}</td><td class=\"n\">{_e(r.get('requests'))}</td></tr>"
        for r in routes)
    return ('\n<table class="routes"><thead><tr><th>host</th><th>path prefix</th>'
            '<th>upstream</th><th>strip</th><th>from</th><th>requests</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>")


def render(upstreams: Sequence[Mapping[str, Any]], *, started_at: float | None,
           now: float) -> str:
    """The whole page for the given upstream views (see proxy.admin.views), each with
    "rates" (see with_rates)."""
    uptime = f"up {now - started_at:.0f}s" if started_at else ""
    body = "".join(_upstream_section(up, now) for up in upstreams) or "<p>no upstreams</p>"
    script = _SCRIPT % {"state_class": json.dumps(_STATE_CLASS), "poll_ms": POLL_SECONDS * 1000}
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<noscript><meta http-equiv="refresh" content="{NOSCRIPT_REFRESH_SECONDS}"></noscript>
<title>sdproxy</title>
<style>{_CSS}</style>
</head>
<body>
<h1>sdproxy</h1>
<p class="meta">{_e(uptime)} · <a href="/upstreams">/upstreams</a> (JSON)
 · <a href="/metrics">/metrics</a> (Prometheus) · <a href="/ready">/ready</a>
 · <a href="/dashboard.json">/dashboard.json</a> · updated <span id="updated">{
 _e(time.strftime('%H:%M:%S', time.localtime(now)))}</span></p>
{body}
<script>{script}</script>
</body>
</html>
"""
