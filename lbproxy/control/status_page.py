"""The HTML status page: the /status data as one self-refreshing page a person reads at a glance.

Owns the markup only (no data gathering, no I/O): a table per server group with a row per
server, coloured by state, and the listeners with their connection counts. Every value is
HTML-escaped; the page loads nothing from elsewhere.

Rates (requests and connections per second) are computed in the browser by a few lines of
inline script: each refresh stores the totals and the proxy's clock in sessionStorage, and the
next one divides the differences. Without script the page still refreshes and shows totals.

The charts (``status_charts``) are drawn by the page itself from the history it carries inline
(the fine resolution of ``GET /status/history``), so nothing is fetched; without script the
history is simply not drawn and the tables are the page.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable
from typing import Any

from .status_charts import CHART_CSS, CHART_SCRIPT

REFRESH_SECONDS = 2

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em} h2{font-size:1.1em;margin:1.4em 0 .4em}
.meta{color:#666;font-size:.9em} h1 .build{font-size:.7em;font-weight:normal;color:#666}
table{border-collapse:collapse;min-width:60%;background:#fff}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#eee} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.up td.state{background:#2e7d32;color:#fff;font-weight:bold}
tr.down td.state{background:#c62828;color:#fff;font-weight:bold}
tr.unknown td.state{background:#f9a825;color:#000;font-weight:bold}
tr.draining td.state{background:#1565c0;color:#fff;font-weight:bold}
tr.down td{background:#fdecea} tr.unknown td{background:#fff8e1}
td.state{text-align:center}
td.rate{color:#1565c0}
.bad{color:#c62828;font-weight:bold}
"""

# Fills every td.rate from its data-total and the totals of the previous refresh.
_SCRIPT = """
(function () {
  var key = "lbproxy-status-rates", body = document.body;
  var now = +body.dataset.time, pid = body.dataset.pid, prev = null, cur = {};
  try { prev = JSON.parse(sessionStorage.getItem(key)); } catch (e) {}
  var cells = document.querySelectorAll("td.rate");
  for (var i = 0; i < cells.length; i++) {
    var td = cells[i], total = +td.dataset.total;
    cur[td.dataset.key] = total;
    if (!prev || prev.pid !== pid || !(now > prev.time)) continue;
    var before = prev.totals[td.dataset.key];
    if (before === undefined || total < before) continue;
    var rate = (total - before) / (now - prev.time);
    td.textContent = rate < 10 ? rate.toFixed(1) : Math.round(rate);
  }
  try {
    sessionStorage.setItem(key, JSON.stringify({pid: pid, time: now, totals: cur}));
  } catch (e) {}
})();
"""


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def _ms(seconds: Any) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _rate(key: str, total: Any) -> str:
    """A per-second rate cell, filled in by the page's script ("-" until the next refresh)."""
    return f"<td class='num rate' data-key='{_e(key)}' data-total='{_e(total)}'>-</td>"


def _both_ways(series: dict[str, list[float | None]]) -> list[float | None]:
    return [
        None if i is None or o is None else round(i + o, 6)
        for i, o in zip(series["ws_messages_in"], series["ws_messages_out"], strict=True)
    ]


def _history_data(history: dict[str, Any] | None) -> str:
    """The fine resolution and the events, as JSON that cannot end its script element. Of
    each server only what the page draws (the page is sent every refresh): its sparkline's
    requests, and its WebSocket messages both ways summed (a line in its group's row)."""
    if history is None or not history.get("resolutions"):
        return "null"
    fine = dict(history["resolutions"][0])
    fine["servers"] = {
        sid: {
            "id": s["id"],
            "group": s["group"],
            "address": s["address"],
            "series": {
                "requests": s["series"]["requests"],
                "ws_messages": _both_ways(s["series"]),
            },
        }
        for sid, s in fine["servers"].items()
    }
    data = {"time": history["time"], "resolution": fine, "events": history["events"]}
    return json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")


def render_status_page(st: dict[str, Any], history: dict[str, Any] | None = None) -> str:
    rows: list[str] = []
    add = rows.append
    add("<!doctype html><html lang=en><head><meta charset=utf-8>")
    add(f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">')
    add("<title>lbproxy status</title>")
    add("<meta name=viewport content='width=device-width, initial-scale=1'>")
    add(f"<style>{_CSS}{CHART_CSS}</style></head>")
    add(f"<body data-time='{_e(st['time'])}' data-pid='{_e(st['pid'])}'>")
    add(f"<h1>lbproxy {_e(st['version'])} <small class=build>{_e(st['build'])}</small></h1>")
    rl = st["last_reload"]
    reload_text = "ok" if rl["success"] else '<span class="bad">FAILED</span>'
    cfg = st["config"]
    config_text = (
        f"config {_e(cfg['path'])} (sha256 {_e((cfg['sha256'] or '')[:12])})"
        if cfg["path"]
        else "config not from a file"
    )
    add(
        f"<div class=meta>pid {_e(st['pid'])} · {config_text} · last reload "
        f"{_e(time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(rl['time'])))} {reload_text}"
        f" · refreshes every {REFRESH_SECONDS}s</div>"
    )
    if not rl["success"]:
        add(f"<pre class=bad>{_e(rl['message'])}</pre>")
    # Filled by CHART_SCRIPT: a row of charts per server group and one for the listeners.
    add("<section id=history hidden><h2 id=history-title>History</h2>")
    add("<div id=charts></div></section>")

    add("<h2>Listeners</h2><table><tr><th>name</th><th>bind</th><th>group</th>")
    add("<th>connections</th><th>websockets</th><th>accepted</th><th>conn/s</th>")
    add("<th>requests</th><th>req/s</th><th>idle timeout</th></tr>")
    for lst in st["listeners"]:
        name = lst["name"]
        add(
            f"<tr class=listener data-listener='{_e(name)}'><td>{_e(name)}</td>"
            f"<td>{_e(lst['bind'])}</td><td>{_e(lst['server_group'])}</td>"
            f"<td class=num>{_e(lst['connections_active'])}</td>"
            f"<td class=num>{_e(lst['websockets_active'])}</td>"
            f"<td class=num>{_e(lst['connections_total'])}</td>"
            f"{_rate(f'l/{name}/conn', lst['connections_total'])}"
            f"<td class=num>{_e(lst['requests_total'])}</td>"
            f"{_rate(f'l/{name}/req', lst['requests_total'])}"
            f"<td class=num>{_e(lst['idle_timeout'])} s</td></tr>"
        )
    add("</table>")

    for g in st["server_groups"]:
        total = len(g["servers"])
        add(
            f"<h2>Server group {_e(g['name'])} <span class=meta>({_e(g['scheduler'])}, "
            f"{_e(g['servers_up'])}/{total} up)</span></h2>"
        )
        rb = g.get("rebalance")
        if rb is not None and rb["in_progress"]:
            add(
                "<p class='rebalance'>Rebalance in progress: moving WebSockets off "
                "servers (a rebalance toward each server's fair share, or a shed)</p>"
            )
        add("<table><tr><th>server</th><th>state</th><th>weight</th><th>last check</th>")
        add("<th>latency</th><th>open</th><th>websockets</th><th>ws total</th>")
        add("<th>requests</th><th>req/s</th><th>errors</th><th>checks ok/failed</th>")
        add("<th class=spark>req/s history</th></tr>")
        for s in g["servers"]:
            errors = sum(s["upstream_errors"].values())
            hc = s["health_checks"]
            check = s["last_check"] if s["checked"] else "checks disabled"
            why = s["last_change_reason"] if s["state"] != "up" else None
            rate = _rate(f"s/{s['id']}/req", s["requests_total"])
            shown = "draining" if s["draining"] else s["state"]
            weight = str(s["weight"])
            if s["override"] is not None:  # the runtime API's values, and the file's
                weight += f" (override; file: {s['config_weight']})"
            if s.get("slow_start") is not None:  # ramping up: the weight in force, and how far
                weight += (
                    f" (slow start {round(100 * s['slow_start'])}%: {s['effective_weight']:.2f})"
                )
            add(
                f"<tr class='server {_e(shown)}' data-server='{_e(s['address'])}'>"
                f"<td>{_e(s['address'])}{' (dns)' if s.get('discovered') else ''}</td>"
                f"<td class=state>{_e(shown).upper()}</td>"
                f"<td class=num>{_e(weight)}</td>"
                f"<td title='{_e(why or check)}'>{_e(check)}</td>"
                f"<td class=num>{_ms(s['last_check_latency'])}</td>"
                f"<td class=num>{_e(s['active_connections'])}</td>"
                f"<td class=num>{_e(s['websockets_active'])}</td>"
                f"<td class=num>{_e(s['websockets_total'])}</td>"
                f"<td class=num>{_e(s['requests_total'])}</td>"
                f"{rate}"
                f"<td class=num>{_e(errors)}</td>"
                f"<td class=num>{_e(hc['success'])}/{_e(hc['failure'])}</td>"
                f"<td class=spark data-id='{_e(s['id'])}'></td></tr>"
            )
        add("</table>")
    cluster = st.get("cluster")
    if cluster is not None:
        _fleet(cluster, add)
    add(f"<script type=application/json id=history-data>{_history_data(history)}</script>")
    add(f"<script>{_SCRIPT}</script><script>{CHART_SCRIPT}</script></body></html>")
    return "".join(rows)


def _fleet(cluster: dict[str, Any], add: Callable[[str], None]) -> None:
    """The fleet (``cluster``): every live instance, this one marked."""
    state = cluster["state"]
    shown = "ok" if state == "ok" else f'<span class="bad">{_e(state).upper()}</span>'
    add(
        f"<h2 class=cluster>Cluster <span class=meta>({_e(cluster['name'])} · Redis "
        f"{_e(cluster['redis']['url'])} · {shown} · {len(cluster['instances'])} live)</span></h2>"
    )
    add("<table><tr><th>instance</th><th>address</th><th>version</th><th>uptime</th>")
    add("<th>connections</th><th>websockets</th><th>req/s</th><th>last seen</th>")
    add("<th>config</th></tr>")
    for i in cluster["instances"]:
        differs = '<span class="bad">differs</span>' if i["config_differs"] else "same"
        add(
            f"<tr class=instance data-instance='{_e(i['name'])}'>"
            f"<td>{_e(i['name'])}{' (this one)' if i['self'] else ''}</td>"
            f"<td>{_e(i['address'])}</td><td>{_e(i['version'])} {_e(i['build'])}</td>"
            f"<td class=num>{i['uptime']:.0f} s</td>"
            f"<td class=num>{_e(i['connections'])}</td><td class=num>{_e(i['tunnels'])}</td>"
            f"<td class=num>{i['requests_per_second']:.1f}</td>"
            f"<td class=num>{i['last_seen']:.1f} s ago</td>"
            f"<td title='{_e(i['config_sha256'])}'>{differs}</td></tr>"
        )
    add("</table>")
